"""Sample class-conditional images with KA-MIG (or the bare AutoNAT backbone) into PNGs and a grid.

    python generate_img.py                                    # KA-MIG, AutoNAT T=8 strategy
    python generate_img.py --model autonat --classes 88 207   # bare backbone
    python generate_img.py --schedule maskgit --steps 12 --cfg 3 --temp 4.5
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from libs.atomic_io import atomic_write
from libs.config import parse_args_with_config
from libs.models.factory import load_tokenizer_and_model
from libs.sampling.generation import (add_sampling_flags, class_names_of, index_generators, labelled_grid,
                                      pick_device, sample_images, save_png, schedule_from_flags)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_flags(parser)
    parser.add_argument("--classes", type=int, nargs="+", default=[88, 207, 279, 360, 387, 388, 417, 974],
                        help="class ids to sample (default: eight ImageNet classes)")
    parser.add_argument("--per-class", type=int, default=4, help="images per class")
    parser.add_argument("--out", default="output/samples", help="output folder (a run subfolder is made)")
    args, config = parse_args_with_config(parser, "configs/ka_mig_l.py", argv)

    bad = [c for c in args.classes if not 0 <= c < config.model.num_classes]
    if bad:
        parser.error(f"class ids {bad} are outside [0, {config.model.num_classes})")
    device = pick_device(args.device)
    schedule = schedule_from_flags(config, args.schedule, args.steps, args.cfg, args.temp)
    tokenizer, model = load_tokenizer_and_model(config, args.model, args.checkpoint, device,
                                                cpu_kernels=args.cpu_kernels)
    labels = np.repeat(np.array(args.classes), args.per_class)
    run_dir = Path(args.out) / f"{args.model}_seed{args.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    images = []
    for start in tqdm(range(0, len(labels), args.batch_size), desc="sampling"):
        idx = np.arange(start, min(start + args.batch_size, len(labels)))
        cls = torch.as_tensor(labels[idx], device=device)
        batch = sample_images(model, tokenizer, cls, schedule, index_generators(idx, args.seed, device),
                              args.precision)
        for i, img in zip(idx, batch):
            save_png(run_dir / f"{i:05d}_class{labels[i]}.png", img)
        images.append(batch)
    images = np.concatenate(images)
    grid = labelled_grid(images, labels, class_names_of(config), columns=args.per_class)
    atomic_write(run_dir / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
    info = dict(model=args.model, checkpoint=args.checkpoint, seed=args.seed, classes=args.classes,
                per_class=args.per_class, schedule=vars(schedule), precision=args.precision, device=str(device),
                cpu_kernels=args.cpu_kernels)
    atomic_write(run_dir / "args.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))
    print(f"wrote {len(images)} images and {run_dir / 'grid.png'}")
    return run_dir


if __name__ == "__main__":
    main()
