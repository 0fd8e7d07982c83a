"""Image generation shared by generate_img.py, generate_npz.py and periodic FID: model, labels, PNGs."""
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from libs.atomic_io import atomic_write
from libs.errors import BadInput
from libs.models.cpu_kernels import CPU_KERNELS
from libs.models.factory import (DEFAULT_CHECKPOINTS, MODEL_KINDS, backbone_config, check_tokenizer_matches,
                                  tokenizer_config)
from libs.sampling.decoding import generate, schedule_from_config

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# How decoded images in [0,1] become uint8 pixels (config.sample.pixels): "truncate" is (x * 255).to(uint8), as
# the paper's sampling scripts (and so its FID) do; "round" rounds to the nearest level.
PIXELS = ("truncate", "round")


def pick_device(name=None) -> torch.device:
    """cuda if available (or as asked), else cpu."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def class_labels(num: int, num_classes: int, mode="balanced", seed=0) -> np.ndarray:
    """Labels of sample indices 0..num-1: balanced (index i -> i mod C) or seeded uniform random."""
    if mode == "balanced":
        return np.arange(num) % num_classes
    if mode == "random":
        return np.random.default_rng(seed).integers(0, num_classes, num)
    raise BadInput(f"unknown label mode '{mode}' (balanced or random)")


def index_generators(indices, seed, device) -> list:
    """One torch.Generator per global sample index, so a sample does not depend on its batch mates."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + int(i)) for i in indices]


def check_pixels(pixels: str) -> str:
    """`pixels` if it is a known quantisation mode, else BadInput naming the config key."""
    if pixels not in PIXELS:
        raise BadInput(f"unknown pixel quantisation config.sample.pixels='{pixels}' (one of {', '.join(PIXELS)})")
    return pixels


def to_uint8(images: torch.Tensor, pixels: str = "truncate") -> torch.Tensor:
    """float images [B,3,H,W] in [0,1] -> uint8 [B,3,H,W]: truncated ((x*255).to(uint8)) or rounded."""
    x = images.float() * 255
    if check_pixels(pixels) == "round":
        x = x.round()
    return x.clamp(0, 255).to(torch.uint8)  # the cast truncates towards zero


@torch.no_grad()
def sample_images(model, tokenizer, class_ids, schedule, generators, precision="fp32",
                  pixels="truncate") -> np.ndarray:
    """Class ids [B] -> uint8 images [B,H,W,3] (decoded tokens, quantised by `pixels` as they are saved)."""
    device = class_ids.device
    dtype = PRECISIONS[precision]
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        ids = generate(model, class_ids, schedule, seq_len=model.cfg.seq_len, mask_token_id=model.mask_token_id,
                       null_class_id=model.null_class_id, generator=generators)
    images = tokenizer.decode(ids).float()  # [B,3,H,W] in [0,1]
    return to_uint8(images, pixels).permute(0, 2, 3, 1).cpu().numpy()


def save_png(path, image: np.ndarray):
    """Atomic PNG write of one uint8 [H,W,3] image."""
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def png_ok(path) -> bool:
    """True if `path` exists and decodes."""
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any unreadable file counts as missing
        return False


def labelled_grid(images: np.ndarray, labels, names=None, columns=None) -> Image.Image:
    """A grid PNG of uint8 [N,H,W,3] with captions: one per row when the row is one class, else one per image."""
    n, h, w, _ = images.shape
    columns = columns or min(n, 8)
    rows = math.ceil(n / columns)
    caption = 14
    grid = Image.new("RGB", (columns * w, rows * (h + caption)), "white")
    draw = ImageDraw.Draw(grid)

    def label(k, width):  # about 6 px per character of PIL's default font
        text = names[int(labels[k])] if names else f"class {int(labels[k])}"
        return str(text)[: max(4, width // 6)]

    for r in range(rows):
        row = range(r * columns, min(n, (r + 1) * columns))
        one_class = len({int(labels[k]) for k in row}) == 1
        for k in row:
            c = k - r * columns
            grid.paste(Image.fromarray(images[k]), (c * w, r * (h + caption) + caption))
            if not one_class:
                draw.text((c * w + 2, r * (h + caption) + 1), label(k, w), fill="black")
        if one_class:
            draw.text((2, r * (h + caption) + 1), label(row[0], len(row) * w), fill="black")
    return grid


def schedule_from_flags(config, schedule=None, steps=None, cfg_scale=None, temp=None):
    """The config's sampling schedule, with optional --schedule/--steps/--cfg/--temp overrides.

    Bad values (steps < 1, a schedule of inconsistent lengths, an unknown schedule) raise BadInput.
    """
    if steps is not None and steps < 1:
        raise BadInput(f"--steps must be at least 1, got {steps}")
    sample = config.sample
    with sample.unlocked():
        if schedule:
            sample.schedule = schedule
        if steps is not None:
            sample.steps = steps
        if cfg_scale is not None:
            sample.cfg_scale = cfg_scale
        if temp is not None:
            sample.temp = temp
    if sample.schedule not in ("autonat", "maskgit"):
        raise BadInput(f"unknown schedule config.sample.schedule='{sample.schedule}' (autonat or maskgit)")
    if sample.schedule == "maskgit" and sample.steps < 1:
        raise BadInput(f"config.sample.steps must be at least 1, got {sample.steps}")
    try:
        return schedule_from_config(sample)
    except ValueError as e:  # lengths of the schedule lists do not fit together
        raise BadInput(f"config.sample: {e}") from e


def check_inputs(args, config) -> str:
    """Flag and config checks shared by the sampling scripts, before any model is built; returns config.sample.pixels.

    Bad values (batch size, pixel mode, no tokenizer checkpoint, a tokenizer that does not fit the backbone)
    raise BadInput.
    """
    if args.batch_size < 1:
        raise BadInput(f"--batch-size must be at least 1, got {args.batch_size}")
    pixels = check_pixels(config.sample.get("pixels", "truncate"))
    if not config.tokenizer.checkpoint:
        raise BadInput("no tokenizer checkpoint: set --config.tokenizer.checkpoint=<file>")
    tok = tokenizer_config(config.tokenizer)
    try:
        check_tokenizer_matches(tok.codebook_size, tok.grid_size, backbone_config(config.model))
    except ValueError as e:
        raise BadInput(str(e)) from e
    return pixels


def add_sampling_flags(parser):
    """Flags shared by the two generation scripts."""
    parser.add_argument("--model", choices=MODEL_KINDS, default="ka_mig",
                        help="KA-MIG (graph_nnet_ema.pth) or the bare AutoNAT backbone (nnet_ema.pth)")
    parser.add_argument("--checkpoint", default=None,
                        help=f"weights (default {DEFAULT_CHECKPOINTS['ka_mig']} or {DEFAULT_CHECKPOINTS['autonat']} "
                             "by --model)")
    parser.add_argument("--schedule", choices=["autonat", "maskgit"], default=None,
                        help="decoding schedule (default: the config's AutoNAT T=8 strategy)")
    parser.add_argument("--steps", type=int, default=None, help="maskgit schedule: number of steps T")
    parser.add_argument("--cfg", type=float, default=None, help="maskgit schedule: guidance scale")
    parser.add_argument("--temp", type=float, default=None, help="maskgit schedule: confidence temperature")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--overwrite", action="store_true",
                        help="start fresh: delete the samples and fingerprint.json an earlier run left in the output "
                             "folder (otherwise a run whose settings differ from that fingerprint is refused)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="autocast dtype of the token model (the tokenizer decodes in fp32)")
    parser.add_argument("--cpu-kernels", choices=CPU_KERNELS, default="onednn",
                        help="fp32 CPU inference: 'onednn' runs the backbone's linears through oneDNN with GELU fused "
                             "(logits equal within 1e-5, faster on CPU); 'default' uses F.linear. No effect on GPU")


def class_names_of(config) -> list:
    """Class names from the token dataset's meta.json when present (else None)."""
    meta = Path(config.data.path) / "meta.json" if config.data.path else None
    if meta is not None and meta.is_file():
        return json.loads(meta.read_text()).get("class_names")
    return None
