"""Sample class-conditional images with KA-MIG (or the bare AutoNAT backbone) into PNGs and a grid, or edit an image.

    python generate_img.py                                    # KA-MIG, AutoNAT T=8 strategy
    python generate_img.py --model autonat --classes 88 207   # bare backbone
    python generate_img.py --config configs/ka_maskgit.py --checkpoint <run>/model_ema.safetensors   # KA-MaskGIT
    python generate_img.py --schedule maskgit --steps 12 --cfg 3 --temp 4.5
    python generate_img.py --edit photo.jpg --mask 64,64,192,192 --class 207           # inpainting
    python generate_img.py --edit photo.jpg --mask outside:64,64,192,192 --class 207   # outpainting
    python generate_img.py --edit photo.jpg --mask mask.png --class 88 --per-class 8   # 8 variants

Output: --out/<model>_seed<seed>_<id>/ with <index>_class<c>.png, grid.png and fingerprint.json. The folder
name is deterministic: <id> is a short hash of the run's fingerprint (model, checkpoint / tokenizer / graph
hashes, schedule, seed, classes and images per class, precision, CPU kernels, compilation, pixel quantisation,
configs, sampler version), so the same command always writes the same folder and different settings never
share one. Rerunning the same command reuses the PNGs already there (only missing or unreadable ones are
sampled) and rewrites the grid; a folder whose fingerprint.json differs is refused, and --overwrite deletes
the old PNGs first. A user error ends with one line `error: ...`, exit status 2. Logits that turn NaN/inf
(sampling or editing, e.g. an fp16 overflow) stop the run with one line naming the decoding step, the precision
and what to try, exit status 1; the PNGs of that batch are not written.

Editing (--edit IMAGE --mask MASK --class C): the image is preprocessed as for tokenization (centre crop to
the tokenizer's resolution) and tokenized; tokens with any pixel inside the mask are regenerated under class C
with the same decoding schedule, all others are kept. MASK is a box `x0,y0,x1,y1` (pixels of the preprocessed
image, x1/y1 exclusive), `outside:x0,y0,x1,y1` (outpainting), or a mask PNG of the preprocessed size (white =
regenerate); see libs/sampling/editing.py. --class is required unless the model has a single class;
--per-class N gives N variants (seeds as for sampling). Output: --out/edit_<model>_seed<seed>_<id>/ with
<index>_edit_class<c>.png, input.png (preprocessed), mask.png (the mask as given), mask_tokens.png (the
patches regenerated), strip.png (input | regenerated region greyed | edits) and fingerprint.json, which adds
the input image's sha256, the mask (box, or the mask PNG's sha256) and the class to the fingerprint.
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from libs.atomic_io import atomic_write
from libs.checkpoint import file_sha256
from libs.cli import ArgumentParser, check_writable, run_main
from libs.config import parse_args_with_config
from libs.data.images import read_rgb
from libs.errors import BadInput
from libs.models.factory import DEFAULT_CHECKPOINTS, load_tokenizer_and_model, tokenizer_config
from libs.sampling.editing import (edit_strip, encode_image, load_edit_image, mask_png, parse_mask,
                                   token_mask, token_mask_pixels)
from libs.sampling.generation import (add_sampling_flags, check_graphs_tokenizer, check_inputs, class_names_of,
                                      compile_token_model, index_generators, labelled_grid, pick_device, png_ok,
                                      sample_images, save_png, schedule_args, schedule_from_flags)
from libs.sampling.provenance import claim_folder, fingerprint_id, input_files, sampling_fingerprint

DEFAULT_CLASSES = [88, 207, 279, 360, 387, 388, 417, 974]  # eight ImageNet classes


def build_parser():
    """Flags (the config file and --config.* overrides are added by parse_with_config)."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_flags(parser)
    parser.add_argument("--classes", type=int, nargs="+", default=None,
                        help=f"class ids to sample (default: {' '.join(map(str, DEFAULT_CLASSES))}, eight ImageNet "
                             "classes)")
    parser.add_argument("--per-class", type=int, default=4, help="images per class (with --edit: variants)")
    parser.add_argument("--out", default="output/samples",
                        help="output folder; the run goes to its subfolder <model>_seed<seed>_<fingerprint id> "
                             "(edit_<model>_... with --edit)")
    parser.add_argument("--edit", default=None, metavar="IMAGE",
                        help="edit this image: regenerate the tokens under --mask, keep the others")
    parser.add_argument("--mask", default=None, metavar="MASK",
                        help="with --edit: x0,y0,x1,y1 (box to regenerate, pixels of the preprocessed image), "
                             "outside:x0,y0,x1,y1 (outpainting) or a mask PNG of the preprocessed size (white = "
                             "regenerate)")
    parser.add_argument("--class", dest="edit_class", type=int, default=None,
                        help="with --edit: the class the region is regenerated under (required unless the model "
                             "has one class)")
    return parser


def check_class_ids(ids, num_classes: int, flag: str):
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad:
        raise BadInput(f"{flag}: class ids {bad} are outside [0, {num_classes})")


def sample_into(names, labels, batch_size: int, device, sample_batch) -> np.ndarray:
    """uint8 [N,H,W,3]: PNG `names[i]` for every label, sampled by sample_batch(indices, class ids) batch by
    batch; batches whose PNGs all read back (an earlier run of the same fingerprint) are reused."""
    images = []
    for start in tqdm(range(0, len(labels), batch_size), desc="sampling"):
        idx = np.arange(start, min(start + batch_size, len(labels)))
        if all(png_ok(names[i]) for i in idx):  # done by an earlier run of this fingerprint
            images.append(np.stack([read_rgb(names[i]) for i in idx]))
            continue
        batch = sample_batch(idx, torch.as_tensor(labels[idx], device=device))
        for i, img in zip(idx, batch):
            save_png(names[i], img)
        images.append(batch)
    return np.concatenate(images)


def main(argv=None):
    """Samples the grid, or the edits with --edit (resuming a folder of the same fingerprint); returns the run
    folder."""
    parser = build_parser()
    args, config = parse_args_with_config(parser, "configs/ka_mig_l.py", argv)
    num_classes = config.model.num_classes
    if args.per_class < 1:
        raise BadInput(f"--per-class must be at least 1, got {args.per_class}")
    edit = None
    if args.edit is None:
        for flag, value in (("--mask", args.mask), ("--class", args.edit_class)):
            if value is not None:
                raise BadInput(f"{flag} is an editing flag: give the image to edit with --edit IMAGE")
        classes = DEFAULT_CLASSES if args.classes is None else args.classes
        check_class_ids(classes, num_classes, "--classes")
        labels = np.repeat(np.array(classes), args.per_class)
    else:
        edit = check_edit_inputs(args, config)
        labels = np.full(args.per_class, edit["class"])
    pixels = check_inputs(args, config)
    tokenizer_sha = check_graphs_tokenizer(config, args.model)  # hashed once, reused by the fingerprint
    class_names = class_names_of(config) if edit is None else None  # the grid's captions, read before sampling
    check_writable(folders=[args.out])
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINTS[args.model]
    device = pick_device(args.device)
    schedule = schedule_from_flags(config, args.schedule, args.steps, args.cfg, args.temp, **schedule_args(args))
    tokenizer, model = load_tokenizer_and_model(config, args.model, checkpoint, device,
                                                cpu_kernels=args.cpu_kernels)
    if args.compile:
        compile_token_model(model)
    fingerprint = sampling_fingerprint(config, kind=args.model, checkpoint=checkpoint, schedule=schedule,
                                       seed=args.seed, label_mode="edit" if edit else "classes", labels=labels,
                                       precision=args.precision, cpu_kernels=args.cpu_kernels, pixels=pixels,
                                       device=device, compile=args.compile, tokenizer_sha256=tokenizer_sha)
    files = input_files(config, args.model, checkpoint)
    if args.strategy:
        files["strategy"] = str(args.strategy)
    if edit:
        fingerprint["edit"] = edit["record"]
        files.update(edit_image=str(args.edit), edit_mask=str(args.mask))
        return run_edit(args, edit, fingerprint, files, labels, pixels, device, schedule, tokenizer, model)
    run_dir = Path(args.out) / f"{args.model}_seed{args.seed}_{fingerprint_id(fingerprint)}"
    names = [run_dir / f"{i:05d}_class{labels[i]}.png" for i in range(len(labels))]
    previous = sorted(run_dir.glob("*_class*.png")) if run_dir.is_dir() else []
    status = claim_folder(run_dir, fingerprint, previous + [run_dir / "grid.png"], overwrite=args.overwrite,
                          files=files)

    def sample_batch(idx, cls):
        return sample_images(model, tokenizer, cls, schedule, index_generators(idx, args.seed, device),
                             args.precision, pixels=pixels)

    images = sample_into(names, labels, args.batch_size, device, sample_batch)
    grid = labelled_grid(images, labels, class_names, columns=args.per_class)
    atomic_write(run_dir / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
    print(f"wrote {len(images)} images and {run_dir / 'grid.png'}"
          f"{' (resumed: same fingerprint)' if status == 'resume' else ''}")
    return run_dir


def check_edit_inputs(args, config) -> dict:
    """Everything --edit needs, checked before any model is built: the class, the mask and the image.

    Returns {'class', 'image' uint8 [R,R,3], 'pixel_mask' bool [R,R], 'unknown' bool [L], 'record' (for the
    fingerprint)}; BadInput / MissingInput otherwise.
    """
    if args.classes is not None:
        raise BadInput("--classes is for sampling; with --edit give one class with --class")
    if args.mask is None:
        raise BadInput("--edit needs --mask: x0,y0,x1,y1, outside:x0,y0,x1,y1 or a mask PNG (white = regenerate)")
    num_classes = config.model.num_classes
    cls = args.edit_class
    if cls is None:
        if num_classes != 1:
            raise BadInput(f"--edit needs --class C: the class (0..{num_classes - 1}) the masked region is "
                           "regenerated under")
        cls = 0
    check_class_ids([cls], num_classes, "--class")
    tok = tokenizer_config(config.tokenizer)
    resolution, grid = tok.resolution, tok.grid_size
    pixel_mask, mask_record = parse_mask(args.mask, resolution)
    image = load_edit_image(args.edit, resolution)
    unknown = token_mask(pixel_mask, grid)
    record = {"image_sha256": file_sha256(args.edit), "mask": mask_record, "class": int(cls),
              "unknown_tokens": int(unknown.sum())}
    return {"class": int(cls), "image": image, "pixel_mask": pixel_mask, "unknown": unknown, "record": record}


def run_edit(args, edit, fingerprint, files, labels, pixels, device, schedule, tokenizer, model):
    """Writes the edits, input, masks and strip into the run folder; returns it."""
    run_dir = Path(args.out) / f"edit_{args.model}_seed{args.seed}_{fingerprint_id(fingerprint)}"
    names = [run_dir / f"{i:05d}_edit_class{labels[i]}.png" for i in range(len(labels))]
    extras = {name: run_dir / f"{name}.png" for name in ("input", "mask", "mask_tokens", "strip")}
    previous = sorted(run_dir.glob("*_edit_class*.png")) if run_dir.is_dir() else []
    status = claim_folder(run_dir, fingerprint, previous + list(extras.values()), overwrite=args.overwrite,
                          files=files)
    ids = encode_image(tokenizer, edit["image"], device)  # [L]
    known = torch.as_tensor(~edit["unknown"], device=device)  # [L]

    def sample_batch(idx, cls):
        n = len(idx)
        return sample_images(model, tokenizer, cls, schedule, index_generators(idx, args.seed, device),
                             args.precision, pixels=pixels, init_ids=ids.expand(n, -1),
                             known=known.expand(n, -1))

    edits = sample_into(names, labels, args.batch_size, device, sample_batch)
    region = token_mask_pixels(edit["unknown"], edit["image"].shape[0])
    save_png(extras["input"], edit["image"])
    save_png(extras["mask"], mask_png(edit["pixel_mask"]))
    save_png(extras["mask_tokens"], mask_png(region))
    strip = edit_strip(edit["image"], region, edits)
    atomic_write(extras["strip"], lambda tmp: strip.save(tmp, format="PNG"))
    print(f"wrote {len(edits)} edits ({int(edit['unknown'].sum())} of {len(edit['unknown'])} tokens regenerated) "
          f"and {extras['strip']}{' (resumed: same fingerprint)' if status == 'resume' else ''}")
    return run_dir


if __name__ == "__main__":
    run_main(main)
