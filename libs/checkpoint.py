"""Checkpoint loading: strict state-dict loading with readable errors, and the published assets' names."""
from pathlib import Path

import torch

from libs.errors import BadInput, MissingInput

README_ASSETS = "README.md, section 'Checkpoints (assets/)'"

# Published files the pipeline can use, with where they come from.
ASSETS = {
    "vqgan_jax_strongaug.ckpt": "the MAGE VQGAN tokenizer (MAGE / AutoNAT releases)",
    "nnet_ema.pth": "the AutoNAT-L backbone EMA weights (AutoNAT release)",
    "graph_nnet_ema.pth": "the KA-MIG model weights (KA-MIG release)",
    "pt_inception-2015-12-05-6726825d.pth": "pytorch-fid's FID Inception weights (pytorch-fid GitHub release)",
}


class MissingAssetError(MissingInput):
    """A weight file the user must place under assets/."""


def missing_asset_message(path) -> str:
    path = Path(path)
    what = ASSETS.get(path.name, "a checkpoint")
    return (f"checkpoint not found: {path}\n"
            f"  this is {what}; put '{path.name}' in the folder '{path.parent}/' "
            f"(or pass its path with the matching flag).\n"
            f"  How to get it: {README_ASSETS}.")


def require_file(path) -> Path:
    """Returns `path` if it exists, else raises MissingAssetError naming the file and where it goes."""
    path = Path(path)
    if not path.is_file():
        raise MissingAssetError(missing_asset_message(path))
    return path


def load_state_dict_file(path, key=None) -> dict:
    """Loads a state dict saved bare or under 'state_dict' (or under `key`, e.g. 'ema' of our checkpoints)."""
    path = require_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for k in ([key] if key else []) + ["state_dict"]:
        if isinstance(obj, dict) and isinstance(obj.get(k), dict):
            obj = obj[k]
            break
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise BadInput(f"{path}: not a state dict (expected a dict of tensors, bare or under 'state_dict')")
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


def load_strict(module: torch.nn.Module, state_dict: dict, source: str = "checkpoint", allow_missing=()):
    """Loads `state_dict` into `module` requiring every name and shape to match.

    `allow_missing` lists name prefixes that may be absent (kept at their current values).
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = [p for p in describe_mismatch(expected, found, limit=10 ** 9)
                if not (p.startswith("missing ") and p.split()[1].startswith(tuple(allow_missing)))]
    if problems:
        shown = problems[:10] + ([f"... {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise BadInput(f"{source} does not match {type(module).__name__} "
                         f"({len(problems)} mismatched tensors); first ones:\n  " + "\n  ".join(shown))
    result = module.load_state_dict(state_dict, strict=False)
    return [k for k in result.missing_keys]
