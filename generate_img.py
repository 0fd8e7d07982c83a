"""Sample class-conditional images with KA-MIG (or the bare AutoNAT backbone) into PNGs and a grid.

    python generate_img.py                                    # KA-MIG, AutoNAT T=8 strategy
    python generate_img.py --model autonat --classes 88 207   # bare backbone
    python generate_img.py --schedule maskgit --steps 12 --cfg 3 --temp 4.5

Output: --out/<model>_seed<seed>_<id>/ with <index>_class<c>.png, grid.png and fingerprint.json. The folder
name is deterministic: <id> is a short hash of the run's fingerprint (model, checkpoint / tokenizer / graph
hashes, schedule, seed, classes and images per class, precision, CPU kernels, pixel quantisation, configs,
sampler version), so the same command always writes the same folder and different settings never share
one. Rerunning the same command reuses the PNGs already there (only missing or unreadable ones are sampled)
and rewrites the grid; a folder whose fingerprint.json differs is refused, and --overwrite deletes the old
PNGs first. A user error ends with one line `error: ...`, exit status 2.
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from libs.atomic_io import atomic_write
from libs.cli import ArgumentParser, check_writable, parse_with_config
from libs.data.images import read_rgb
from libs.errors import BadInput, run_main
from libs.models.factory import DEFAULT_CHECKPOINTS, load_tokenizer_and_model
from libs.sampling.generation import (add_sampling_flags, check_inputs, class_names_of, index_generators,
                                      labelled_grid, pick_device, png_ok, sample_images, save_png,
                                      schedule_from_flags)
from libs.sampling.provenance import claim_folder, fingerprint_id, input_files, sampling_fingerprint


def build_parser():
    """Flags (the config file and --config.* overrides are added by parse_with_config)."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_flags(parser)
    parser.add_argument("--classes", type=int, nargs="+", default=[88, 207, 279, 360, 387, 388, 417, 974],
                        help="class ids to sample (default: eight ImageNet classes)")
    parser.add_argument("--per-class", type=int, default=4, help="images per class")
    parser.add_argument("--out", default="output/samples",
                        help="output folder; the run goes to its subfolder <model>_seed<seed>_<fingerprint id>")
    return parser


def main(argv=None):
    """Samples the grid (resuming a folder of the same fingerprint); returns the run folder."""
    parser = build_parser()
    args, config = parse_with_config(parser, "configs/ka_mig_l.py", argv)
    bad = [c for c in args.classes if not 0 <= c < config.model.num_classes]
    if bad:
        raise BadInput(f"class ids {bad} are outside [0, {config.model.num_classes})")
    if args.per_class < 1:
        raise BadInput(f"--per-class must be at least 1, got {args.per_class}")
    pixels = check_inputs(args, config)
    check_writable(folders=[args.out])
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINTS[args.model]
    device = pick_device(args.device)
    schedule = schedule_from_flags(config, args.schedule, args.steps, args.cfg, args.temp)
    tokenizer, model = load_tokenizer_and_model(config, args.model, checkpoint, device,
                                                cpu_kernels=args.cpu_kernels)
    labels = np.repeat(np.array(args.classes), args.per_class)
    fingerprint = sampling_fingerprint(config, kind=args.model, checkpoint=checkpoint, schedule=schedule,
                                       seed=args.seed, label_mode="classes", labels=labels, precision=args.precision,
                                       cpu_kernels=args.cpu_kernels, pixels=pixels, device=device)
    run_dir = Path(args.out) / f"{args.model}_seed{args.seed}_{fingerprint_id(fingerprint)}"
    names = [run_dir / f"{i:05d}_class{labels[i]}.png" for i in range(len(labels))]
    previous = sorted(run_dir.glob("*_class*.png")) if run_dir.is_dir() else []
    status = claim_folder(run_dir, fingerprint, previous + [run_dir / "grid.png"], overwrite=args.overwrite,
                          files=input_files(config, args.model, checkpoint))
    images = []
    for start in tqdm(range(0, len(labels), args.batch_size), desc="sampling"):
        idx = np.arange(start, min(start + args.batch_size, len(labels)))
        if all(png_ok(names[i]) for i in idx):  # done by an earlier run of this fingerprint
            images.append(np.stack([read_rgb(names[i]) for i in idx]))
            continue
        cls = torch.as_tensor(labels[idx], device=device)
        batch = sample_images(model, tokenizer, cls, schedule, index_generators(idx, args.seed, device),
                              args.precision, pixels=pixels)
        for i, img in zip(idx, batch):
            save_png(names[i], img)
        images.append(batch)
    images = np.concatenate(images)
    grid = labelled_grid(images, labels, class_names_of(config), columns=args.per_class)
    atomic_write(run_dir / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
    print(f"wrote {len(images)} images and {run_dir / 'grid.png'}"
          f"{' (resumed: same fingerprint)' if status == 'resume' else ''}")
    return run_dir


if __name__ == "__main__":
    run_main(main)
