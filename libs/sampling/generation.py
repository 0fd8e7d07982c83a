"""Image generation shared by generate_img.py, generate_npz.py and periodic FID: model, labels, PNGs."""
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from libs.atomic_io import atomic_write
from libs.checkpoint import file_sha256
from libs.data.tokens import META_FILE, read_token_meta
from libs.devices import check_device
from libs.errors import BadInput, UserError
from libs.graphs.files import check_graph_tokenizer, recorded_tokenizer
from libs.models.cpu_kernels import CPU_KERNELS
from libs.models.factory import (DEFAULT_CHECKPOINTS, GRAPH_KINDS, MODEL_KINDS, backbone_config, check_model_kind,
                                  check_tokenizer_matches, default_kind, tokenizer_config)
from libs.sampling.decoding import GUIDANCE_SCHEDULES, ORDERS, generate, schedule_from_config

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# How decoded images in [0,1] become uint8 pixels (config.sample.pixels): "truncate" is (x * 255).to(uint8), as
# the paper's sampling scripts (and so its FID) do; "round" rounds to the nearest level.
PIXELS = ("truncate", "round")


def pick_device(name=None) -> torch.device:
    """cuda if available (or as asked), else cpu; BadInput for a device this machine lacks (libs.devices)."""
    return check_device(name or None)


def class_labels(num: int, num_classes: int, mode="balanced", seed=0) -> np.ndarray:
    """Labels of sample indices 0..num-1: balanced (index i -> i mod C) or seeded uniform random."""
    if mode == "balanced":
        return np.arange(num) % num_classes
    if mode == "random":
        return np.random.default_rng(seed).integers(0, num_classes, num)
    raise BadInput(f"unknown label mode '{mode}' (balanced or random)")


SEED_STRIDE = 1_000_003  # sample i of seed s is drawn with a generator seeded with s * SEED_STRIDE + i
MAX_SAMPLES = 2 ** 32  # sample indices a seed must cover when the count is not known


def index_generators(indices, seed, device) -> list:
    """One torch.Generator per global sample index, so a sample does not depend on its batch mates."""
    return [torch.Generator(device=device).manual_seed(seed * SEED_STRIDE + int(i)) for i in indices]


def max_sample_seed(count: int = MAX_SAMPLES) -> int:
    """The largest seed whose `count` samples' generator seeds (seed * SEED_STRIDE + i) stay below 2**64, the
    limit of torch.Generator.manual_seed."""
    return (2 ** 64 - max(int(count), 1)) // SEED_STRIDE


def check_sample_seed(seed: int, flag: str = "--seed", count: int = MAX_SAMPLES):
    """BadInput unless 0 <= seed <= max_sample_seed(count) (`count` samples, indices 0..count-1)."""
    top = max_sample_seed(count)
    if not 0 <= seed <= top:
        raise BadInput(f"{flag} {seed} is outside [0, {top}]: sample i is seeded with seed * {SEED_STRIDE} + i, "
                       f"which torch.Generator takes below 2**64")


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
                  pixels="truncate", init_ids=None, known=None) -> np.ndarray:
    """Class ids [B] -> uint8 images [B,H,W,3] (decoded tokens, quantised by `pixels` as they are saved).

    With `init_ids` [B,L] (and optionally `known` [B,L]) only the unknown tokens are decoded (editing; see
    libs.sampling.decoding.generate); without, every token is.
    """
    device = class_ids.device
    dtype = PRECISIONS[precision]
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        ids = generate(model, class_ids, schedule, seq_len=model.cfg.seq_len, mask_token_id=model.mask_token_id,
                       null_class_id=model.null_class_id, generator=generators, init_ids=init_ids, known=known)
    images = tokenizer.decode(ids).float()  # [B,3,H,W] in [0,1]
    return to_uint8(images, pixels).permute(0, 2, 3, 1).cpu().numpy()


def compile_token_model(sampler):
    """torch.compile of the token model, in place, block by block: every transformer block and the head are
    compiled (nn.Module.compile: the state_dict keeps its names); embeddings and the KA-MIG fusion gathers
    stay eager. Works for a bare AutoNAT and for the FusionCache around a KA-MIG model. Returns `sampler`.

    The model must use plain linear layers (--cpu-kernels default): inductor cannot lower oneDNN's fused op.
    """
    model = getattr(sampler, "model", sampler)  # FusionCache -> its KAMIG
    for block in model.blocks:
        block.compile()
    model.mlm_layer.compile()
    return sampler


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


STRATEGY_KEYS = ("schedule", "ratios", "conf_temps", "sample_temps", "guidance", "steps", "cfg_scale", "temp",
                 "guidance_schedule", "guidance_power", "guidance_steps", "order")  # what --strategy may set
SAMPLE_FLAGS = {"schedule": "--schedule", "steps": "--steps", "cfg_scale": "--cfg", "temp": "--temp",
                "guidance_schedule": "--guidance-schedule", "guidance_power": "--guidance-power",
                "guidance_steps": "--guidance-steps", "order": "--order"}  # config.sample key -> its flag
SAMPLE_DEFAULTS = {"guidance_schedule": "linear", "guidance_power": 1.0, "guidance_steps": "all",
                   "order": "confidence"}  # keys configs written before them may lack


def load_strategy_file(path) -> dict:
    """{key: value} of the decoding-strategy keys in a get_config() file (configs/autonat_t8_strategy.py or a
    file written by `python -m libs.sampling.strategy_search`). Keys outside STRATEGY_KEYS (pixels, ...) are not
    part of a strategy and are left out. MissingInput if the file is absent, BadInput if it holds no strategy or a
    value the config.sample rules refuse (libs.config_schema: NaN, a ratio outside [0, 1], lists of unequal length).
    """
    from libs.config import load_config_file  # noqa: PLC0415 - only the scripts need it
    from libs.config_schema import check_config  # noqa: PLC0415 - it imports this module
    try:
        cfg = load_config_file(path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken Python file is the user's input
        raise BadInput(f"--strategy {path}: cannot load its get_config() ({type(e).__name__}: {e})") from e
    values = {k: cfg[k] for k in STRATEGY_KEYS if k in cfg}
    if "schedule" not in values:
        raise BadInput(f"--strategy {path}: get_config() has no 'schedule' key (autonat or maskgit)")
    values = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in values.items()}
    check_config({"sample": values}, what=f"--strategy {path}", only="sample", require=False)  # before merging
    if isinstance(values.get("guidance_steps"), list):  # the config keeps it as text ('all' or '4,5,6')
        values["guidance_steps"] = ",".join(str(int(s)) for s in values["guidance_steps"])
    return values


def schedule_from_flags(config, schedule=None, steps=None, cfg_scale=None, temp=None, *, strategy=None,
                        guidance_schedule=None, guidance_power=None, guidance_steps=None, order=None):
    """The config's sampling schedule, with an optional --strategy file, then the flag overrides
    (--schedule/--steps/--cfg/--temp/--guidance-schedule/--guidance-power/--guidance-steps/--order).

    config.sample is updated in place (so that it describes what is sampled), then checked by the config.sample
    rules (libs.config_schema; messages name the flag or file a value came from). Bad values (steps < 1, a
    schedule of inconsistent lengths, an unknown schedule, NaN or negative temperatures and guidance, a guidance
    schedule asked for with the autonat strategy, guidance steps outside the schedule) raise BadInput.
    """
    from libs.config_schema import check_config  # noqa: PLC0415 - it imports this module
    if steps is not None and steps < 1:
        raise BadInput(f"--steps must be at least 1, got {steps}")
    sample, sources = config.sample, {}
    with sample.unlocked():
        for key, value in SAMPLE_DEFAULTS.items():
            if key not in sample:
                sample[key] = value
        if strategy:
            for key, value in load_strategy_file(strategy).items():
                sample[key], sources[f"sample.{key}"] = value, f"--strategy {strategy}"
        for key, value in (("schedule", schedule), ("steps", steps), ("cfg_scale", cfg_scale), ("temp", temp),
                           ("guidance_schedule", guidance_schedule), ("guidance_power", guidance_power),
                           ("guidance_steps", guidance_steps), ("order", order)):
            if value is not None and value != "":
                sample[key], sources[f"sample.{key}"] = value, SAMPLE_FLAGS[key]
    check_config(config, what="sampling settings", only="sample", require=False, sources=sources)
    if sample.schedule not in ("autonat", "maskgit"):
        raise BadInput(f"unknown schedule config.sample.schedule='{sample.schedule}' (autonat or maskgit)")
    if sample.schedule == "maskgit" and sample.steps < 1:
        raise BadInput(f"config.sample.steps must be at least 1, got {sample.steps}")
    if sample.schedule == "autonat" and (guidance_schedule is not None or guidance_power is not None):
        raise BadInput("--guidance-schedule / --guidance-power shape the maskgit schedule's guidance; the autonat "
                       "strategy keeps its per-step guidance list (use --schedule maskgit, or --guidance-steps to "
                       "switch guidance off at some steps)")
    try:
        return schedule_from_config(sample)
    except ValueError as e:  # lengths of the schedule lists do not fit together, bad guidance or order values
        raise BadInput(f"config.sample: {e}") from e


def check_inputs(args, config, sample_seeds: dict = None) -> str:
    """Flag and config checks shared by the sampling scripts, before any model is built; returns config.sample.pixels.

    Resolves `args.model` (None: config.backbone's model, with the graphs when the config has a graph block) and
    `args.cpu_kernels` (None: 'onednn', or 'default' with --compile). Bad values (a --model of another backbone
    than config.backbone, batch size, --device, sample seeds (`sample_seeds`: flag -> seed, default
    {'--seed': args.seed}, each for `args.num` samples or MAX_SAMPLES), pixel mode, --compile with oneDNN kernels,
    no tokenizer checkpoint, a tokenizer that does not fit the backbone) raise BadInput.
    """
    try:
        args.model = args.model or default_kind(config)
        check_model_kind(config, args.model)
    except ValueError as e:
        raise BadInput(f"--model: {e}") from e
    if args.batch_size < 1:
        raise BadInput(f"--batch-size must be at least 1, got {args.batch_size}")
    for flag, seed in (sample_seeds or {"--seed": args.seed}).items():
        check_sample_seed(seed, flag, getattr(args, "num", None) or MAX_SAMPLES)
    check_device(args.device)  # 'gpu', 'cuda:99', cuda without a GPU: one line now, not a traceback later
    if getattr(args, "compile", False) and args.cpu_kernels == "onednn":
        raise BadInput("--compile needs plain linear layers: drop --cpu-kernels onednn (with --compile the "
                       "default is --cpu-kernels default; inductor makes its own CPU kernels)")
    if args.cpu_kernels is None:
        args.cpu_kernels = "default" if getattr(args, "compile", False) else "onednn"
    pixels = check_pixels(config.sample.get("pixels", "truncate"))
    if not config.tokenizer.checkpoint:
        raise BadInput("no tokenizer checkpoint: set --config.tokenizer.checkpoint=<file>")
    tok = tokenizer_config(config.tokenizer)
    try:
        check_tokenizer_matches(tok.codebook_size, tok.grid_size, backbone_config(config.model))
    except ValueError as e:
        raise BadInput(str(e)) from e
    return pixels


def check_graphs_tokenizer(config, kind: str):
    """For a model with graphs (`kind` in GRAPH_KINDS), BadInput when config.tokenizer.checkpoint's sha256 is not
    the tokenizer sha256 a graph sidecar of config.graph.dir records; returns that sha256 (hex) when the file was
    hashed (to reuse in the fingerprint), else None (no graphs, no record, or files absent: their loaders tell)."""
    if kind not in GRAPH_KINDS:
        return None
    g = config.graph
    names = [n for n, on in (("co", g.use_co), ("sim", g.use_sim), ("incompat", g.use_incompat)) if on]
    checkpoint = Path(config.tokenizer.checkpoint)
    if not checkpoint.is_file() or recorded_tokenizer(g.dir, names) is None:
        return None
    sha = file_sha256(checkpoint)
    check_graph_tokenizer(g.dir, names, sha, f"tokenizer checkpoint {checkpoint} (config.tokenizer.checkpoint)")
    return sha


def add_sampling_flags(parser, helps=None):
    """Flags shared by the generation scripts and the strategy search; `helps`: flag -> help text where a script
    gives a flag another meaning (e.g. --seed, --overwrite of the search)."""
    helps = helps or {}

    def add(flag, **kwargs):
        parser.add_argument(flag, **{**kwargs, **({"help": helps[flag]} if flag in helps else {})})

    add("--model", choices=MODEL_KINDS, default=None,
        help="ka_mig (KA-MIG, graph_nnet_ema.pth) or autonat (the bare AutoNAT backbone, nnet_ema.pth) with an "
             "AutoNAT config; ka_maskgit or maskgit (the bare MaskGIT) with a MaskGIT config "
             "(config.backbone='maskgit', configs/ka_maskgit.py); default: the config's backbone, with the graphs "
             "when the config has a graph block")
    add("--checkpoint", default=None,
        help="weights (default by --model: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_CHECKPOINTS.items()) + ")")
    add("--schedule", choices=["autonat", "maskgit"], default=None,
        help="decoding schedule (default: the config's AutoNAT T=8 strategy)")
    add("--strategy", default=None,
        help="a decoding strategy file with get_config() (configs/autonat_t8_strategy.py, or one "
             "written by python -m libs.sampling.strategy_search); replaces the config's schedule keys, "
             "the flags below still override it")
    add("--steps", type=int, default=None, help="maskgit schedule: number of steps T")
    add("--cfg", type=float, default=None, help="maskgit schedule: guidance scale")
    add("--temp", type=float, default=None, help="maskgit schedule: confidence temperature")
    add("--guidance-schedule", choices=list(GUIDANCE_SCHEDULES), default=None,
        help="maskgit schedule: guidance per step: constant, linear (0 -> --cfg, the default) or "
             "pow-cosine (--cfg * (1 - cos(pi * (t/(T-1))^power)) / 2)")
    add("--guidance-power", type=float, default=None,
        help="maskgit schedule, pow-cosine guidance: the power (default 1)")
    add("--guidance-steps", default=None,
        help="steps where guidance applies, 0 elsewhere: 'all' (default) or indices / ranges "
             "('4-7', '0,2,5'); any schedule")
    add("--order", choices=list(ORDERS), default=None,
        help="which masked tokens stay masked after a step: 'confidence' (default) or 'halton' "
             "(a fixed low-discrepancy order over the token grid, same counts per step)")
    add("--seed", type=int, default=0,
        help="sample i is drawn with its own generator seeded from (seed, i), so any batch size or "
             "number of processes gives the same images")
    add("--batch-size", type=int, default=25)
    add("--overwrite", action="store_true",
        help="start fresh: delete the samples and fingerprint.json an earlier run left in the output "
             "folder (otherwise a run whose settings differ from that fingerprint is refused)")
    add("--device", default=None, help="cuda or cpu (default: cuda if available)")
    add("--precision", choices=list(PRECISIONS), default="fp32",
        help="autocast dtype of the token model (the tokenizer decodes in fp32)")
    add("--cpu-kernels", choices=CPU_KERNELS, default=None,
        help="fp32 CPU inference: 'onednn' (the default without --compile) runs the backbone's linears "
             "through oneDNN with GELU fused (logits equal within 1e-5, faster on CPU); 'default' uses "
             "F.linear (the default with --compile). No effect on GPU")
    add("--compile", action="store_true",
        help="torch.compile the token model's blocks and head (off by default; the first batch "
             "pays the compilation, logits equal eager within about 1e-5)")


def schedule_args(args) -> dict:
    """The keyword arguments of schedule_from_flags given by the shared sampling flags."""
    return dict(strategy=args.strategy, guidance_schedule=args.guidance_schedule,
                guidance_power=args.guidance_power, guidance_steps=args.guidance_steps, order=args.order)


def class_names_of(config) -> list:
    """Class names from the token dataset's meta.json (config.data.path) when present, else None; read before any
    sampling: BadInput when that meta.json is malformed (libs.data.tokens.read_token_meta) or names another
    number of classes than the model's."""
    if not config.data.path or not (Path(config.data.path) / META_FILE).is_file():
        return None
    names = read_token_meta(config.data.path).get("class_names")
    if names is not None and len(names) != config.model.num_classes:
        raise BadInput(f"{Path(config.data.path) / META_FILE} names {len(names)} classes but the model has "
                       f"{config.model.num_classes} (config.model.num_classes): set --config.data.path to the "
                       f"model's training token dataset")
    return names
