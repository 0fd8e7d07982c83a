"""What the interactive page does, without gradio: load the models, sample a grid, check an upload, turn the
brush layer into an edit mask, run an edit, list and describe strategy files.

Every image comes from the same library calls as generate_img.py: `libs.sampling.generation.sample_images`
with one seeded generator per sample index (`index_generators`), the schedule from `schedule_from_flags`, the
grid from `labelled_grid`, and for edits `libs.sampling.editing` (`encode_image`, `token_mask`, the
`init_ids` / `known` decoding). The same class, count, seed and settings give the same pixels as
`generate_img.py` (tests/test_app_logic.py checks it bit for bit). Problems with what the user gave raise
`libs.errors.BadInput` / `MissingInput` with a one-line message (the page shows it; `libs.errors.one_line`).
"""
import argparse
import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from libs.config import resolve_config
from libs.data.images import UnreadableImage, load_image_file
from libs.errors import BadInput, MissingInput
from libs.graphs.files import graph_paths
from libs.models.factory import DEFAULT_CHECKPOINTS, load_tokenizer_and_model, tokenizer_config
from libs.sampling.editing import edit_strip, encode_image, token_mask, token_mask_pixels
from libs.sampling.generation import (check_graphs_tokenizer, check_inputs, check_sample_seed, class_names_of,
                                      index_generators, labelled_grid, load_strategy_file, sample_images,
                                      schedule_from_flags)

DEMO_CONFIG = "configs/demo_fashion.py"                  # committed Fashion-MNIST demo weights (CPU, seconds)
DEMO_CHECKPOINT = "demo/assets/fashion/autonat_demo.safetensors"
IMAGENET_CONFIG = "configs/ka_mig_l.py"                  # the published ImageNet weights in assets/
WEIGHTS = ("auto", "demo", "imagenet")
MAX_UPLOAD_BYTES = 20_000_000    # largest image file the page takes
MAX_UPLOAD_PIXELS = 40_000_000   # largest width * height the page decodes (checked from the header first)
MAX_IMAGES = 64                  # images per request (grid or variants)
DISPLAY_SIZE = 256               # images are shown at least this large (integer nearest-neighbour upscaling)
MODE_NOTES = {"RGBA": "alpha dropped (not composited)", "LA": "alpha dropped, gray copied into R, G, B",
              "PA": "alpha dropped", "L": "gray copied into R, G, B", "1": "black and white copied into R, G, B",
              "P": "palette converted to RGB", "CMYK": "CMYK converted to RGB", "YCbCr": "YCbCr converted to RGB",
              "I;16": "16-bit values scaled to 8 bits", "I": "32-bit integer values scaled to 8 bits",
              "F": "float values 0..1 scaled to 8 bits"}


# ----------------------------------------------------------------------------- models


@dataclass
class WeightChoice:
    """Which config, model kind and checkpoint the page loads, and a one-line note on why."""
    config: str
    kind: Optional[str]
    checkpoint: Optional[str]
    note: str
    overrides: List[str] = field(default_factory=list)


def imagenet_files(config_path: str = IMAGENET_CONFIG):
    """(kind, checkpoint, []) of the published ImageNet weights in assets/: KA-MIG when its weights and the three
    graphs are there, else the bare AutoNAT-L backbone when nnet_ema.pth is; (None, None, what is missing) if
    neither."""
    config = resolve_config(config_path, [])
    tokenizer = Path(config.tokenizer.checkpoint)
    graphs = [p for p in graph_paths(config.graph.dir).values()]
    ka_mig = [Path(DEFAULT_CHECKPOINTS["ka_mig"]), *graphs]
    backbone = Path(DEFAULT_CHECKPOINTS["autonat"])
    if tokenizer.is_file() and all(p.is_file() for p in ka_mig):
        return "ka_mig", str(ka_mig[0]), []
    if tokenizer.is_file() and backbone.is_file():
        return "autonat", str(backbone), []
    missing = [str(tokenizer)] if not tokenizer.is_file() else []
    if not backbone.is_file():
        missing.append(f"{backbone} or {' + '.join(str(p) for p in ka_mig if not p.is_file())}")
    return None, None, missing


def choose_weights(weights: str = "auto", config: str = None, checkpoint: str = None, kind: str = None,
                   overrides=()) -> WeightChoice:
    """The weights to load: --config/--checkpoint/--model when given (a trained run), else `weights`:
    'demo' (committed Fashion-MNIST weights), 'imagenet' (assets/; MissingInput naming the absent files) or
    'auto' (ImageNet when its files are in assets/, else the demo, with a note saying so)."""
    if weights not in WEIGHTS:
        raise BadInput(f"--weights {weights}: one of {', '.join(WEIGHTS)}")
    if config or checkpoint:
        return WeightChoice(config or IMAGENET_CONFIG, kind, checkpoint,
                            f"weights {checkpoint or 'of the config'} with {config or IMAGENET_CONFIG}", list(overrides))
    if weights == "demo":
        return WeightChoice(DEMO_CONFIG, "autonat", DEMO_CHECKPOINT, "Fashion-MNIST demo weights (demo/assets/fashion/)",
                            list(overrides))
    found_kind, found, missing = imagenet_files()
    if found_kind:
        return WeightChoice(IMAGENET_CONFIG, found_kind, found, f"ImageNet weights: {found_kind} from {found}",
                            list(overrides))
    if weights == "imagenet":
        raise MissingInput(f"--weights imagenet: missing in assets/: {', '.join(missing)} (see the README's "
                           "checkpoint table)")
    return WeightChoice(DEMO_CONFIG, "autonat", DEMO_CHECKPOINT,
                        f"ImageNet weights not in assets/ (missing {', '.join(missing)}): using the Fashion-MNIST "
                        "demo weights (demo/assets/fashion/)", list(overrides))


@dataclass
class Models:
    """Loaded tokenizer and token model with what the page needs about them."""
    config: object          # the resolved ml_collections config (never changed: schedules work on copies)
    kind: str
    checkpoint: str
    tokenizer: object
    model: object
    device: torch.device
    pixels: str
    class_names: Optional[list]
    note: str
    cpu_kernels: str

    @property
    def num_classes(self) -> int:
        return int(self.config.model.num_classes)

    @property
    def resolution(self) -> int:
        return tokenizer_config(self.config.tokenizer).resolution

    def class_label(self, c: int) -> str:
        """'c: name' for the class menus."""
        return f"{c}: {self.class_names[c]}" if self.class_names else f"class {c}"


def load_models(choice: WeightChoice, device: str = "cpu", cpu_kernels: str = None, fallback_names=None) -> Models:
    """Builds and loads what `choice` names with generate_img.py's checks and loader (same CPU kernels default:
    oneDNN for fp32 on CPU). `fallback_names`: class names when the config's token dataset has none."""
    config = resolve_config(choice.config, choice.overrides)
    args = argparse.Namespace(model=choice.kind, batch_size=1, seed=0, device=device, compile=False,
                              cpu_kernels=cpu_kernels)
    pixels = check_inputs(args, config)  # resolves args.model and args.cpu_kernels as the scripts do
    check_graphs_tokenizer(config, args.model)
    checkpoint = choice.checkpoint or DEFAULT_CHECKPOINTS[args.model]
    dev = torch.device(device)
    tokenizer, model = load_tokenizer_and_model(config, args.model, checkpoint, dev, cpu_kernels=args.cpu_kernels)
    names = class_names_of(config) or fallback_names
    if names is not None and len(names) != config.model.num_classes:
        names = None
    return Models(config, args.model, str(checkpoint), tokenizer, model, dev, pixels, names, choice.note,
                  args.cpu_kernels)


# ----------------------------------------------------------------------------- schedules and sampling


@dataclass
class Settings:
    """Decoding settings from the page; None keeps the config's value (as an absent flag of generate_img.py).

    With a `strategy` file, its keys replace the config's schedule and the other fields still override them.
    """
    schedule: Optional[str] = None
    steps: Optional[int] = None
    cfg: Optional[float] = None
    temp: Optional[float] = None
    guidance_schedule: Optional[str] = None
    guidance_power: Optional[float] = None
    guidance_steps: Optional[str] = None
    order: Optional[str] = None
    strategy: Optional[str] = None
    seed: int = 0
    batch_size: int = 25


def build_schedule(models: Models, settings: Settings):
    """The decoding Schedule for `settings` (schedule_from_flags on a copy of the config); BadInput as the flags."""
    config = copy.deepcopy(models.config)
    return schedule_from_flags(config, settings.schedule, settings.steps, settings.cfg, settings.temp,
                               strategy=settings.strategy, guidance_schedule=settings.guidance_schedule,
                               guidance_power=settings.guidance_power, guidance_steps=settings.guidance_steps,
                               order=settings.order)


def check_classes(models: Models, classes, what: str = "class"):
    """Class ids as ints, BadInput when one is outside [0, num_classes)."""
    ids = [int(c) for c in classes]
    bad = [c for c in ids if not 0 <= c < models.num_classes]
    if bad:
        raise BadInput(f"{what} {bad} outside [0, {models.num_classes})")
    return ids


def check_count(n: int, what: str):
    """BadInput unless 1 <= n <= MAX_IMAGES."""
    if not 1 <= n <= MAX_IMAGES:
        raise BadInput(f"{what}: {n} images asked, the page makes 1 to {MAX_IMAGES} at a time")


def sample_batches(models: Models, labels: np.ndarray, settings: Settings, schedule, **edit) -> np.ndarray:
    """uint8 [N,H,W,3]: sample i of `labels` drawn with generator (seed, i), batch by batch as generate_img.py.
    `edit`: init_ids [L] / known [L] for editing (expanded over each batch)."""
    check_sample_seed(settings.seed, "seed", len(labels))
    out = []
    for start in range(0, len(labels), settings.batch_size):
        idx = np.arange(start, min(start + settings.batch_size, len(labels)))
        cls = torch.as_tensor(labels[idx], device=models.device)  # [B]
        extra = {k: v.expand(len(idx), -1) for k, v in edit.items()}  # [B,L]
        out.append(sample_images(models.model, models.tokenizer, cls, schedule,
                                 index_generators(idx, settings.seed, models.device), pixels=models.pixels, **extra))
    return np.concatenate(out)


def sample_grid(models: Models, classes, per_class: int, settings: Settings):
    """(images uint8 [N,R,R,3], labels [N]) for `per_class` images of each class, in generate_img.py's order."""
    ids = check_classes(models, classes)
    if not ids:
        raise BadInput("no class picked: pick at least one class to sample")
    check_count(len(ids) * int(per_class), f"{len(ids)} classes x {per_class} per class")
    labels = np.repeat(np.array(ids), int(per_class))  # [N]
    schedule = build_schedule(models, settings)
    return sample_batches(models, labels, settings, schedule), labels


def display_factor(resolution: int) -> int:
    """Integer upscaling that shows an R x R image at least DISPLAY_SIZE pixels wide."""
    return max(1, DISPLAY_SIZE // resolution)


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of uint8 [...,H,W,3] by an integer factor (undone by [::factor, ::factor])."""
    return images.repeat(factor, axis=-3).repeat(factor, axis=-2)


def grid_image(models: Models, images: np.ndarray, labels, columns: int, factor: int = 1) -> Image.Image:
    """labelled_grid of the images (upscaled by `factor` first; factor 1 = generate_img.py's grid.png)."""
    return labelled_grid(upscale(images, factor), labels, models.class_names, columns=columns)


# ----------------------------------------------------------------------------- uploads and masks


def _header(path: Path, name: str):
    """(width, height, mode, format) from the file's header, without decoding the pixels; BadInput otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            with Image.open(path) as im:
                return im.size[0], im.size[1], im.mode, im.format
    except Image.DecompressionBombError as e:
        raise BadInput(f"{name}: its header declares a huge image ({e.args[0].split(' pixels')[0].split('(')[-1]} "
                       f"pixels; a decompression bomb?); the page takes images up to "
                       f"{MAX_UPLOAD_PIXELS / 1e6:g} megapixels") from e
    except UnidentifiedImageError as e:
        raise BadInput(f"{name}: not an image (PIL cannot identify its format); upload a PNG or JPEG") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadInput(f"{name}: unreadable image header ({type(e).__name__}: {e})") from e


def check_upload(path, resolution: int, name: str = None, max_bytes: int = MAX_UPLOAD_BYTES,
                 max_pixels: int = MAX_UPLOAD_PIXELS):
    """An uploaded image file -> (uint8 [R,R,3] preprocessed as for tokenization, one-line note on what was done).

    The size of the file and the pixel count in its header are checked before anything is decoded; the
    pixels are then read by the project's one reader (libs.data.images: any mode to 8-bit RGB, alpha dropped)
    and centre-cropped to R x R. BadInput / MissingInput with a one-line message naming the file otherwise.
    """
    if path is None:
        raise MissingInput("no image: upload a PNG or JPEG first (or load one from the sampled grid)")
    path = Path(path)
    name = name or path.name
    if not path.is_file():
        raise MissingInput(f"{name}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise BadInput(f"{name}: empty file (0 bytes)")
    if size > max_bytes:
        raise BadInput(f"{name}: {size / 1e6:.1f} MB; the page takes image files up to {max_bytes / 1e6:g} MB")
    w, h, mode, fmt = _header(path, name)
    if w * h > max_pixels:
        raise BadInput(f"{name}: {w}x{h} pixels ({w * h / 1e6:.1f} megapixels); the page takes images up to "
                       f"{max_pixels / 1e6:g} megapixels")
    try:
        image = load_image_file(path, resolution)  # [R,R,3] uint8
    except UnreadableImage as e:
        raise BadInput(f"{name}: {e.reason}") from e
    notes = [f"{name}: {fmt} {w}x{h} {mode}"]
    if mode in MODE_NOTES or mode.startswith("I;16"):
        notes.append(MODE_NOTES.get(mode, MODE_NOTES["I;16"]))
    if (w, h) != (resolution, resolution):
        notes.append(f"centre-cropped and resized to {resolution}x{resolution}")
    return image, "; ".join(notes)


def brush_mask(layers, resolution: int) -> np.ndarray:
    """The brushed pixels of the editor's layers (RGBA [H,W,4] of the shown canvas, any H, W) -> bool [R,R]:
    True where a painted (alpha > 0) canvas pixel falls on that preprocessed pixel. BadInput if nothing is
    painted."""
    painted = None
    for layer in layers or []:
        a = np.asarray(layer)
        if a.ndim != 3 or a.shape[-1] not in (2, 4):
            raise BadInput(f"brush layer of shape {a.shape}: expected an RGBA image")
        alpha = a[..., -1] > 0  # [H,W]
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        raise BadInput("the brush layer is empty: paint the region to regenerate on the image first")
    h, w = painted.shape
    rows, cols = np.nonzero(painted)
    mask = np.zeros((resolution, resolution), dtype=bool)
    mask[rows * resolution // h, cols * resolution // w] = True  # canvas pixel -> preprocessed pixel
    return mask


EDIT_MODES = ("inpaint", "outpaint")


def edit_region(brush: np.ndarray, mode: str) -> np.ndarray:
    """bool [R,R] pixels to regenerate: the brushed ones (inpaint) or all others (outpaint); BadInput if none."""
    if mode not in EDIT_MODES:
        raise BadInput(f"edit mode '{mode}': one of {', '.join(EDIT_MODES)}")
    region = brush if mode == "inpaint" else ~brush
    if not region.any():
        raise BadInput("outpaint: the brush covers the whole image, so nothing is left to regenerate")
    return region


@dataclass
class EditResult:
    """edits uint8 [V,R,R,3]; unknown bool [L] (tokens regenerated); region bool [R,R] (their pixels);
    input_ids long [L] (the input's tokens, kept wherever unknown is False); strip (input | region | edits)."""
    edits: np.ndarray
    unknown: np.ndarray
    region: np.ndarray
    input_ids: torch.Tensor
    strip: Image.Image


def run_edit(models: Models, image: np.ndarray, pixel_mask: np.ndarray, cls: int, variants: int,
             settings: Settings) -> EditResult:
    """`variants` edits of the uint8 [R,R,3] image: tokens touching `pixel_mask` (bool [R,R]) regenerated under
    class `cls`, the others kept, as generate_img.py --edit (same seeds: variant i uses generator (seed, i))."""
    (cls,) = check_classes(models, [cls])
    check_count(int(variants), "variants")
    r = models.resolution
    if image.shape != (r, r, 3) or pixel_mask.shape != (r, r):
        raise BadInput(f"edit: image {image.shape} and mask {pixel_mask.shape} must be {r}x{r}")
    grid = tokenizer_config(models.config.tokenizer).grid_size
    unknown = token_mask(pixel_mask, grid)  # [L]
    schedule = build_schedule(models, settings)
    ids = encode_image(models.tokenizer, image, models.device)  # [L]
    known = torch.as_tensor(~unknown, device=models.device)  # [L]
    labels = np.full(int(variants), cls)
    edits = sample_batches(models, labels, settings, schedule, init_ids=ids, known=known)
    region = token_mask_pixels(unknown, r)
    return EditResult(edits, unknown, region, ids, edit_strip(image, region, edits))


# ----------------------------------------------------------------------------- strategy files


def strategy_files(extra=()) -> list:
    """Strategy files the page offers: configs/*strategy*.py, best_strategy.py files of strategy searches under
    output/ (two levels down at most) and `extra` (--strategy)."""
    found = sorted(Path("configs").glob("*strategy*.py"))
    found += sorted(Path("output").glob("*/best_strategy.py")) + sorted(Path("output").glob("*/*/best_strategy.py"))
    paths = [str(p) for p in extra if p] + [str(p) for p in found]
    return list(dict.fromkeys(paths))


def describe_strategy(path) -> str:
    """One line on a strategy file (schedule, steps, what it sets); MissingInput / BadInput as --strategy."""
    values = load_strategy_file(path)
    steps = len(values["sample_temps"]) if "sample_temps" in values else values.get("steps")
    return f"strategy {path}: {values['schedule']} schedule, T={steps}; sets {', '.join(sorted(values))}"


def page_settings(schedule, strategy, steps, cfg, temp, guidance_schedule, guidance_power, guidance_steps, order,
                  seed) -> Settings:
    """The page's controls -> Settings. The maskgit controls (steps, guidance scale and schedule, power,
    temperature) apply with the maskgit schedule only; a strategy file replaces the schedule and those controls;
    guidance steps and order apply always. BadInput for a seed that is not a whole number >= 0."""
    if seed is None or float(seed) != int(seed) or int(seed) < 0:
        raise BadInput(f"seed {seed}: a whole number >= 0")
    maskgit = schedule == "maskgit" and not strategy
    pick = (lambda v, cast: cast(v) if maskgit and v is not None else None)  # noqa: E731
    return Settings(schedule=None if strategy else schedule, steps=pick(steps, int), cfg=pick(cfg, float),
                    temp=pick(temp, float), guidance_schedule=pick(guidance_schedule, str),
                    guidance_power=pick(guidance_power, float), guidance_steps=(guidance_steps or "all").strip(),
                    order=order or None, strategy=strategy or None, seed=int(seed))
