"""Converts the committed demo weights of demo/assets/<dataset>/ from torch files to .safetensors, in place.

    python -m tools.demo_assets_to_safetensors [folder ...] [--remove-old]

In each folder (default: demo/assets/fashion and demo/assets/synthetic):
  vqgan_demo.pth -> vqgan_demo.safetensors (tools.to_safetensors: its 'tokenizer' and 'train' entries go into the
  metadata 'config'), its report vqgan_demo.pth.json -> vqgan_demo.safetensors.json, and
  autonat_demo.pth -> autonat_demo.safetensors (already safetensors content: rewritten byte-reproducibly);
  each new file is checked to hold exactly the tensors of the old one (names, dtypes, shapes, values).
Every manifest of the folder (manifest.json, <stem>_manifest.json) that names an old file is rewritten: its
`files` entry under the new name with the new file's bytes and sha256, and the old names in its text (recipe,
overrides). With --remove-old the old files are deleted once their conversion is checked.
Idempotent: a second run (with the old files, or after they were removed) changes nothing.
"""
import json
from pathlib import Path

import torch

from libs.atomic_io import atomic_write_json
from libs.checkpoint import file_sha256, load_state_dict_file, weights_format
from libs.cli import ArgumentParser, run_main
from libs.errors import BadInput, MissingInput

FOLDERS = ("demo/assets/fashion", "demo/assets/synthetic")
RENAMES = {"vqgan_demo.pth": "vqgan_demo.safetensors", "autonat_demo.pth": "autonat_demo.safetensors"}
REPORT = ".json"  # the tokenizer's training report is <weights file> + REPORT


def same_tensors(a: dict, b: dict) -> bool:
    """True when two state dicts hold the same names, dtypes, shapes and values (bit for bit)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def renamed(text: str) -> str:
    """`text` with every old file name replaced by its new one."""
    for old, new in RENAMES.items():
        text = text.replace(old, new)
    return text


def renamed_values(obj):
    """A JSON value with the old file names replaced in every string (keys included)."""
    if isinstance(obj, str):
        return renamed(obj)
    if isinstance(obj, list):
        return [renamed_values(v) for v in obj]
    if isinstance(obj, dict):
        return {renamed(k): renamed_values(v) for k, v in obj.items()}
    return obj


def write_json(path: Path, obj):
    """Atomic JSON in the layout demo/pipeline.py writes (indent 1, keys in the order given)."""
    atomic_write_json(path, obj, indent=1, sort_keys=False)


def convert_file(folder: Path, old: str, new: str) -> str:
    """Converts folder/old to folder/new (and its report) when folder/old exists; checks the tensors.
    Returns a line saying what was done. Raises BadInput when the tensors differ."""
    from tools.to_safetensors import convert
    src, dst = folder / old, folder / new
    if not src.is_file():
        return f"{dst}: kept ({old} is gone)" if dst.is_file() else f"{folder}: no {old} nor {new}"
    convert(src, dst)
    if weights_format(dst) != "safetensors" or not same_tensors(load_state_dict_file(src), load_state_dict_file(dst)):
        raise BadInput(f"{dst}: does not hold the tensors of {src}")
    report = Path(str(src) + REPORT)
    if report.is_file():
        write_json(Path(str(dst) + REPORT), renamed_values(json.loads(report.read_text())))
    return f"{src} -> {dst}: same tensors ({len(load_state_dict_file(dst))})"


def manifests(folder: Path) -> list:
    """The manifests of a folder: manifest.json and every <stem>_manifest.json."""
    return sorted(p for p in folder.glob("*manifest.json") if p.is_file())


def rewrite_manifest(path: Path) -> bool:
    """Renames the old files in a manifest (entries, with the new files' bytes and sha256, and text); True when
    it changed. Raises MissingInput when a renamed entry's new file is absent."""
    manifest = json.loads(path.read_text())
    files = manifest.get("files", {})
    if not any(old in json.dumps(manifest) for old in RENAMES):
        return False
    out = renamed_values(manifest)
    new_files = {}
    for name, info in files.items():
        if name in RENAMES:
            target = path.parent / RENAMES[name]
            if not target.is_file():
                raise MissingInput(f"{path}: lists {name} but {target} does not exist (convert it first)")
            info = {"bytes": target.stat().st_size, "sha256": file_sha256(target)}
        new_files[renamed(name)] = info
    if files:
        out["files"] = new_files
    write_json(path, out)
    return True


def convert_folder(folder, remove_old: bool = False) -> list:
    """Converts one demo assets folder (see the module docstring); returns the lines saying what was done.
    Raises MissingInput (no such folder), BadInput (a conversion that does not hold the same tensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInput(f"demo assets folder not found: {folder}")
    lines = [convert_file(folder, old, new) for old, new in RENAMES.items()]
    lines += [f"{p}: rewritten" for p in manifests(folder) if rewrite_manifest(p)]
    if remove_old:
        for old in RENAMES:
            for path in (folder / old, folder / (old + REPORT)):
                if path.is_file():
                    path.unlink()
                    lines.append(f"{path}: removed")
    return lines


def main(argv=None):
    parser = ArgumentParser(prog="python -m tools.demo_assets_to_safetensors", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", default=list(FOLDERS), help=f"demo assets folders (default {FOLDERS})")
    parser.add_argument("--remove-old", action="store_true", help="delete the torch files once converted")
    args = parser.parse_args(argv)
    for folder in args.folders:
        for line in convert_folder(folder, args.remove_old):
            print(line)
    return 0


if __name__ == "__main__":
    run_main(main)
