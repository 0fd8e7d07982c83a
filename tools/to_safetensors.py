"""Converts a released weights file (.pth / .ckpt, a torch pickle) into a .safetensors file: weights only.

    python -m tools.to_safetensors <in.pth> <out.safetensors>

The input is a state dict, bare or under 'state_dict' (as every loader of ka-mig accepts it). Entries stored
beside 'state_dict' (e.g. the demo tokenizer's 'tokenizer' config and 'train' recipe) go into the metadata as
'config' (JSON text with sorted keys). The output is byte-reproducible: the same input gives the same bytes.
"""
import json
import warnings
from pathlib import Path

from libs.cli import ArgumentParser, check_writable, run_main, same_file
from libs.errors import BadInput, MissingInput

def side_config(obj):
    """The entries stored beside 'state_dict' in a loaded torch file, or None when there are none."""
    if not (isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)):
        return None
    extra = {k: v for k, v in obj.items() if k != "state_dict"}
    return extra or None


def config_json(config) -> str:
    """`config` as JSON text with sorted keys (tuples become lists); BadInput if it holds non-JSON values."""
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"))
    except TypeError as e:
        raise BadInput(f"the entries beside 'state_dict' are not plain config values ({e})") from e


def check_paths(src, dst):
    """Refuses, before reading anything, a missing `src` (MissingInput), a `dst` that is `src` itself (same
    resolved path or same file) or that cannot be written, e.g. an existing folder (BadInput)."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise MissingInput(f"input not found: {src}")
    if src.is_dir():
        raise BadInput(f"input {src} is a folder, not a weights file")
    if same_file(src, dst):
        raise BadInput(f"output {dst} is the input {src} itself; write the .safetensors file to another path")
    check_writable(dst)  # BadInput: a folder, or a folder that cannot hold it


def convert(src, dst) -> dict:
    """Writes the state dict of `src` to `dst` as .safetensors; returns its metadata.

    Raises MissingInput (no `src`), BadInput (`dst` is `src` or not writable; not a weights file, non-tensor
    entries, an unsupported dtype).
    """
    from libs.checkpoint import load_state_dict_file, read_weights_file, save_weights, weights_metadata
    check_paths(src, dst)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prefix warning is repeated by load_state_dict_file below
        config = side_config(read_weights_file(src))
    state = load_state_dict_file(src)  # dict of tensors, prefixes stripped; BadInput otherwise
    if config is not None:
        config_json(config)  # BadInput for values JSON cannot hold
    try:
        save_weights(state, dst, config)
    except ValueError as e:
        if isinstance(e, BadInput):
            raise
        raise BadInput(f"{src}: {e}") from e
    return weights_metadata(dst)


def main(argv=None):
    parser = ArgumentParser(prog="python -m tools.to_safetensors", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="the torch weights file (.pth / .ckpt)")
    parser.add_argument("dst", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    metadata = convert(args.src, args.dst)
    print(f"wrote {args.dst}" + (" (config in its metadata)" if "config" in metadata else ""))
    return 0


if __name__ == "__main__":
    run_main(main)
