"""Checkpoint loading: strict state-dict loading with readable errors, the published assets' names, file hashes."""
import hashlib
import json
import warnings
from pathlib import Path

import torch

from libs.atomic_io import atomic_save_safetensors
from libs.errors import BadInput, MissingInput, one_line

README_ASSETS = "README.md, section 'Checkpoints (assets/)'"

# Published files the pipeline can use, with where they come from.
ASSETS = {
    "vqgan_jax_strongaug.ckpt": "the MAGE VQGAN tokenizer (MAGE / AutoNAT releases)",
    "nnet_ema.pth": "the AutoNAT-L backbone EMA weights (AutoNAT release)",
    "graph_nnet_ema.pth": "the KA-MIG model weights (KA-MIG release)",
    "pt_inception-2015-12-05-6726825d.pth": "pytorch-fid's FID Inception weights (pytorch-fid GitHub release)",
    "tokenizer_imagenet256.safetensors": "the MaskGIT VQGAN tokenizer (official MaskGIT release, converted)",
    "maskgit_imagenet256.safetensors": "the MaskGIT backbone (official MaskGIT release, converted)",
    "ka_maskgit_ema.safetensors": "the KA-MaskGIT model weights (none released: what a KA-MaskGIT training run writes)",
}

# The command that writes an asset, for the assets a tool of this repository makes from a released file.
CONVERT_MASKGIT = ("python -m tools.convert_maskgit --tokenizer <tokenizer_imagenet256_checkpoint> --transformer "
                   "<maskgit_imagenet256_checkpoint> --out assets/")
TRAIN_KA_MASKGIT = ("train_graph.py --config configs/ka_maskgit.py, then pass its output/<run>/model_ema.safetensors "
                    "with --checkpoint")
ASSET_COMMANDS = {"tokenizer_imagenet256.safetensors": CONVERT_MASKGIT,
                  "maskgit_imagenet256.safetensors": CONVERT_MASKGIT,
                  "ka_maskgit_ema.safetensors": TRAIN_KA_MASKGIT}


class MissingAssetError(MissingInput):
    """A weight file the user must place under assets/."""


def folder_of(path) -> str:
    """The folder of `path` as written in messages, ending in one '/' ('/' for a file in the root, './' for a
    bare name)."""
    folder = str(Path(path).parent)
    return folder if folder.endswith("/") else folder + "/"


def missing_asset_message(path) -> str:
    """Lines naming a missing weights file: what it is (for the published names of ASSETS), the folder it goes
    in, the flags that point elsewhere, and how to get it (the command that writes it, else README_ASSETS)."""
    path = Path(path)
    what = f"this is {ASSETS[path.name]}; " if path.name in ASSETS else ""
    how = f"`{ASSET_COMMANDS[path.name]}` ({README_ASSETS})" if path.name in ASSET_COMMANDS else README_ASSETS
    return (f"checkpoint not found: {path}\n"
            f"  {what}put '{path.name}' in the folder '{folder_of(path)}' "
            f"(or pass its path: --checkpoint for the token model, --config.tokenizer.checkpoint=<path> for "
            f"the tokenizer, --config.train.init_checkpoint=<path> for training).\n"
            f"  How to get it: {how}.")


def require_file(path) -> Path:
    """Returns `path` if it exists, else raises MissingAssetError naming the file and where it goes."""
    path = Path(path)
    if not path.is_file():
        raise MissingAssetError(missing_asset_message(path))
    return path


def file_sha256(path, block=1 << 20) -> str:
    """Hex sha256 of a file's content (checkpoints, assets), read in blocks; computed anew on every call."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for data in iter(lambda: f.read(block), b""):
            h.update(data)
    return h.hexdigest()


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def strip_wrapper_prefixes(state_dict: dict, expected=None):
    """(state dict, stripped prefixes): removes `module.` / `_orig_mod.` (repeatedly, in any order) while every
    key carries it and, when `expected` (the model's keys) is given, the model's own keys do not."""
    stripped = []
    while state_dict:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None or (expected is not None and any(k.startswith(prefix) for k in expected)):
            break
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
        stripped.append(prefix)
    return state_dict, stripped


def _warn_stripped(source, stripped):
    if stripped:
        warnings.warn(f"{source}: every key started with {' + '.join(repr(p) for p in stripped)} (saved from a "
                      f"wrapped model: DDP 'module.' / torch.compile '_orig_mod.'); stripped it", stacklevel=3)


TRAINING_CHECKPOINT_KEYS = {"model", "ema", "optimizer", "step"}  # a train_graph.py checkpoints/step_*.pt


SAFETENSORS_MAX_HEADER = 100 << 20  # bytes of JSON header accepted (safetensors' own limit)


def weights_format(path) -> str:
    """'safetensors' or 'torch', from the file's first bytes (not its name): a safetensors file starts with an
    8-byte little-endian header length then '{'; a torch file with 'PK' (zip) or a pickle opcode. Raises
    MissingAssetError (absent), BadInput (neither)."""
    path = require_file(path)
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= min(
            size - 8, SAFETENSORS_MAX_HEADER):
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip archive (torch >= 1.6) / pickle protocol >= 2 (legacy)
        return "torch"
    raise BadInput(f"{path}: not a readable weights file (neither a torch file nor a .safetensors file: it "
                   f"starts with {head[:8]!r})")


def read_safetensors(path) -> tuple:
    """(tensors, metadata) of a .safetensors file, memory-mapped on the CPU; BadInput if it is malformed."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # truncated file, header and data disagree
        raise BadInput(f"{path}: not a readable weights file ({type(e).__name__}: {one_line(e)[:200]})") from e


def weights_metadata(path) -> dict:
    """The string metadata of a .safetensors weights file ({} for a torch file); 'config' holds the JSON of
    the config that built the model when the writer knew it."""
    return read_safetensors(path)[1] if weights_format(path) == "safetensors" else {}


def read_weights_file(path):
    """The object in a weights file, by content: a .safetensors file's dict of tensors, or a torch file
    loaded with weights_only (no code runs). Raises MissingAssetError, BadInput (unreadable)."""
    if weights_format(path) == "safetensors":
        return read_safetensors(path)[0]
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled code
        raise BadInput(f"{path}: not a readable weights file ({type(e).__name__}: {one_line(e)[:200]})") from e


EXPORT_NAME = "model_ema.safetensors"  # the inference weights a training run exports into its folder
FORMAT_METADATA = {"format": "pt"}  # what the safetensors / Hugging Face loaders expect of torch weights


def save_weights(state: dict, path, config: dict = None) -> Path:
    """Writes a state dict as .safetensors (weights only), atomically and byte-reproducibly, with `config`
    (the resolved config that built the model, JSON-able) as JSON text under the metadata key 'config'."""
    metadata = dict(FORMAT_METADATA)
    if config is not None:
        metadata["config"] = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return atomic_save_safetensors(state, path, metadata)


def load_state_dict_file(path, key=None) -> dict:
    """Loads a state dict from a .safetensors file or a torch file saved bare or under 'state_dict' (or under
    `key`, e.g. 'ema' of our checkpoints); the format is told by content, not by name.

    Wrapper prefixes every key carries (`module.` of DDP, `_orig_mod.` of torch.compile) are stripped with a
    warning.
    """
    path = require_file(path)
    obj = read_weights_file(path)
    for k in ([key] if key else []) + ["state_dict"]:
        if isinstance(obj, dict) and isinstance(obj.get(k), dict):
            obj = obj[k]
            break
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        hint = ""
        if isinstance(obj, dict) and TRAINING_CHECKPOINT_KEYS <= set(obj):
            hint = (" (it is a train_graph.py training checkpoint, which holds only the trained tensors: use the "
                    "run folder's model_ema.safetensors)")
        raise BadInput(f"{path}: not a state dict (expected a dict of tensors, bare or under 'state_dict'){hint}")
    obj, stripped = strip_wrapper_prefixes(obj)
    _warn_stripped(path, stripped)
    return obj


def describe_mismatch(expected: dict, found: dict, limit: int = 10) -> list:
    """Lines naming the first tensors that differ between two {name: shape} maps."""
    lines = []
    for name, shape in expected.items():
        if name not in found:
            lines.append(f"missing {name} {tuple(shape)}")
        elif tuple(found[name]) != tuple(shape):
            lines.append(f"shape of {name}: model {tuple(shape)} vs checkpoint {tuple(found[name])}")
    lines += [f"unexpected {name} {tuple(shape)}" for name, shape in found.items() if name not in expected]
    return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])


def _first_component(keys):
    """The dotted first component every key shares, else None."""
    heads = {k.split(".", 1)[0] for k in keys if "." in k}
    return next(iter(heads)) if len(heads) == 1 and all("." in k for k in keys) else None


def likely_cause(expected: dict, found: dict, missing: list, unexpected: list, kinds=("autonat", "ka_mig")) -> str:
    """A sentence naming the probable reason for a mismatch, when the pattern is clear ('' otherwise); `kinds`
    (bare, with the graphs) are the --model values of the loading model's backbone (factory.BACKBONE_KINDS)."""
    bare, with_graphs = kinds
    head = _first_component(found)
    if head is not None and _first_component(expected) != head:
        inner = {k[len(head) + 1:] for k in found}
        if inner & set(expected):
            return (f"every checkpoint key starts with '{head}.' (saved from a wrapper around the model); "
                    f"strip that prefix from the keys")
    head = _first_component(expected)
    if head is not None and _first_component(found) != head and {f"{head}.{k}" for k in found} & set(expected):
        return f"every model key starts with '{head}.' but no checkpoint key does"
    found_graph = any(k.startswith("graph_layer.") for k in unexpected)
    if found_graph and not any(k.startswith("graph_layer.") for k in expected):
        return (f"the checkpoint holds graph_layer.* tensors: it is a {with_graphs} checkpoint (backbone with the "
                f"graphs), use --model {with_graphs} (or load it into a {with_graphs} model)")
    if (missing and all(k.startswith("graph_layer.") for k in missing) and not unexpected):
        return (f"the checkpoint has no graph_layer.* tensors: it is a bare {bare} backbone, use --model {bare} "
                f"(or train {with_graphs} on it with train.init_checkpoint)")
    if not missing and not unexpected:
        return "every name matches but some shapes differ: the checkpoint was made with other sizes (see the config)"
    return ""


def load_strict(module: torch.nn.Module, state_dict: dict, source: str = "checkpoint", allow_missing=(),
                kinds=("autonat", "ka_mig")):
    """Loads `state_dict` into `module` requiring every name and shape to match.

    `allow_missing` lists name prefixes that may be absent (kept at their current values). Wrapper prefixes
    (`module.`, `_orig_mod.`) that every key carries and the module's keys do not are stripped with a warning.
    A mismatch raises BadInput showing missing keys beside unexpected ones (first few of each, with counts)
    and the likely cause when the pattern is clear; `kinds` (bare, with the graphs) are the model kinds of the
    module's backbone that the cause names.
    """
    module_state = module.state_dict()
    state_dict, stripped = strip_wrapper_prefixes(state_dict, expected=module_state)
    _warn_stripped(source, stripped)
    expected = {k: tuple(v.shape) for k, v in module_state.items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in found and not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and found[k] != expected[k]]
    if missing or unexpected or shapes:
        show = 5
        lines = [f"{source} does not match {type(module).__name__}: {len(missing)} missing, {len(unexpected)} "
                 f"unexpected, {len(shapes)} of another shape (model {len(expected)} tensors, checkpoint "
                 f"{len(found)})"]
        cause = likely_cause(expected, found, missing, unexpected, kinds)
        if cause:
            lines.append(f"likely cause: {cause}")
        for title, names, fmt in (
                ("missing", missing, lambda k: f"{k} {expected[k]}"),
                ("unexpected", unexpected, lambda k: f"{k} {found[k]}"),
                ("shape", shapes, lambda k: f"{k}: model {expected[k]} vs checkpoint {found[k]}")):
            if names:
                more = f" (+{len(names) - show} more)" if len(names) > show else ""
                lines.append(f"{title}: " + ", ".join(fmt(k) for k in names[:show]) + more)
        raise BadInput("\n  ".join(lines))
    result = module.load_state_dict(state_dict, strict=False)
    return [k for k in result.missing_keys]
