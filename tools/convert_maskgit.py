"""Converts the official MaskGIT Flax checkpoints into PyTorch state dicts that load strictly (no JAX needed).

    python -m tools.convert_maskgit --tokenizer tokenizer_imagenet256_checkpoint \\
                                    --transformer maskgit_imagenet256_checkpoint --out assets/

Either flag may be given alone (`--codebook-size` then tells the transformer's K when no tokenizer is given).
Each input `<name>[_checkpoint]` becomes `<out>/<name>.safetensors`: the state dict (weights only) of
`libs.models.vqgan.VQGAN` (tokenizer) or `libs.models.maskgit.MaskGIT` (transformer), with the model's config
(JSON) under the metadata key 'config'. The sizes are read from the
tensors and printed; they must match the config used to load the file (configs/maskgit.py for the release).

The files are what `flax.serialization.to_bytes` writes: msgpack maps of maps whose leaves are msgpack
extension objects (type 1: an ndarray packed as the msgpack triple (shape, dtype name, C-order bytes); type 3: a
numpy scalar in the same packing); arrays above 1 GiB are split into `{'__msgpack_chunked_array__': True,
'shape': {...}, 'chunks': {...}}` maps. The variables sit under 'params' (or are the top level). The name
mapping of the transformer is in libs/models/maskgit.py; the tokenizer's:

    encoder/Conv_0                        encoder.conv_in (no bias)
    encoder/ResBlock_{i*R+j}              encoder.down.i.block.j     (level i, block j; R = num_res_blocks)
    encoder/ResBlock_{n*R}, _{n*R+1}      encoder.mid.block_1, block_2 (n levels)
    encoder/GroupNorm_0, Conv_1           encoder.norm_out, encoder.conv_out
    decoder/Conv_0                        decoder.conv_in
    decoder/ResBlock_0, _1                decoder.mid.block_1, block_2
    decoder/ResBlock_{R+(n-1-i)*R+j}      decoder.up.i.block.j       (levels run from the deepest)
    decoder/Conv_{n-i} (i > 0)            decoder.up.i.upsample.conv
    decoder/GroupNorm_0, Conv_n           decoder.norm_out, decoder.conv_out
    ResBlock/{GroupNorm_0, Conv_0, GroupNorm_1, Conv_1, Conv_2}  -> {norm1, conv1, norm2, conv2, nin_shortcut}
    quantizer/codebook                    quantize.embedding.weight
    conv kernels [kh,kw,in,out] -> weight [out,in,kh,kw]; GroupNorm scale -> weight

A missing file raises MissingInput, an unreadable, truncated or foreign one BadInput, each naming the file.
"""
import re
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import msgpack
import numpy as np
import torch

from libs.checkpoint import load_strict, save_weights
from libs.cli import ArgumentParser, check_writable, run_main
from libs.errors import BadInput, MissingInput, one_line
from libs.models.maskgit import MaskGIT, MaskGITConfig
from libs.models.vqgan import VQGAN, VQGANConfig

EXT_NDARRAY, EXT_SCALAR = 1, 3  # flax.serialization's msgpack extension codes
CHUNKED = "__msgpack_chunked_array__"
MID_BLOCKS = 2  # middle res blocks of libs.models.vqgan (the release's num_res_blocks)


# ----------------------------------------------------------------------------- reading Flax msgpack


def _ndarray(data: bytes) -> np.ndarray:
    """An ndarray from flax's packing: msgpack (shape, dtype name, C-order bytes)."""
    shape, dtype, buffer = msgpack.unpackb(data, raw=True)
    dtype = dtype.decode()
    if dtype == "bfloat16":  # numpy has none: the upper 16 bits of a float32
        words = np.frombuffer(buffer, dtype=np.uint16).astype(np.uint32) << 16
        return words.view(np.float32).reshape(shape)
    return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape).copy()


def _ext_hook(code, data):
    if code == EXT_NDARRAY:
        return _ndarray(data)
    if code == EXT_SCALAR:
        return _ndarray(data)[()]
    raise ValueError(f"unknown msgpack extension type {code}")


def _unchunk(tree):
    """The tree with every chunked-array map joined back into one array."""
    if not isinstance(tree, dict):
        return tree
    if tree.get(CHUNKED):
        shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
        chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
        return np.concatenate([np.ravel(c) for c in chunks]).reshape(shape)
    return {k: _unchunk(v) for k, v in tree.items()}


def read_flax_msgpack(path, what: str) -> dict:
    """The variable tree {name: subtree or ndarray} of a flax.serialization file (under 'params' if present).

    `what` names the expected content in errors. Raises MissingInput (no file), BadInput (not msgpack, truncated,
    not a tree of arrays).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{what} not found: {path} (see README.md, section 'Checkpoints (assets/)')")
    data = path.read_bytes()
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except Exception as e:  # truncated, trailing bytes, another format
        raise BadInput(f"{path}: not a readable Flax msgpack checkpoint ({type(e).__name__}: "
                       f"{one_line(e)[:120]}); expected {what}") from e
    if not isinstance(tree, dict) or not tree:
        raise BadInput(f"{path}: holds a {type(tree).__name__}, not a Flax variable tree; expected {what}")
    tree = _unchunk(tree)
    params = tree.get("params", tree)
    if not isinstance(params, dict):
        raise BadInput(f"{path}: 'params' is not a tree of arrays; expected {what}")
    return params


def flatten(tree, prefix="") -> dict:
    """{'a/b/c': leaf} of a nested dict."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + "/") if isinstance(v, dict) else {key: v})
    return out


def _tensor(a) -> torch.Tensor:
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        raise ValueError(f"a {type(a).__name__} of dtype {getattr(a, 'dtype', '-')}, not a float array")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


# ----------------------------------------------------------------------------- transformer


TRANSFORMER_MODULES = {"Embed_0": "embed", "Attention_0": "attention", "Mlp_0": "mlp", "MlmLayer_0": "mlm_layer",
                       "self_attention": None}
LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def transformer_name(path: str):
    """The PyTorch name of a transformer leaf path, or None if its leaf is not one of the model's."""
    parts = path.split("/")
    if parts[-2:] == ["mlm_bias", "bias"] and parts[:-2] == ["MlmLayer_0"]:
        return "mlm_layer.mlm_bias"
    names = []
    for part in parts[:-1]:
        layer = re.fullmatch(r"TransformerLayer_(\d+)", part)
        if layer:
            names.append(f"layers.{layer.group(1)}")
        elif part in TRANSFORMER_MODULES:
            names += [TRANSFORMER_MODULES[part]] if TRANSFORMER_MODULES[part] else []
        else:
            names.append(part)
    if parts[-1] not in LEAVES:
        return None
    return ".".join(names + [LEAVES[parts[-1]]])


def transformer_tensor(path: str, a: np.ndarray) -> torch.Tensor:
    """The PyTorch layout of the Flax leaf at `path`: dense kernels [in,out] (attention q/k/v [D,H,Dh], out
    [H,Dh,D]) as weights [out,in], attention biases [H,Dh] flattened."""
    t = _tensor(a)
    leaf = path.rpartition("/")[2]
    if leaf == "kernel":
        if t.dim() == 3:
            t = t.reshape(-1, t.shape[-1]) if "self_attention/out/" in path else t.reshape(t.shape[0], -1)
        return t.t().contiguous()
    return t.reshape(-1) if leaf == "bias" and t.dim() == 2 else t


def transformer_config(flat: dict, codebook_size: int, source) -> MaskGITConfig:
    """MaskGITConfig read from the tensors' shapes (K comes from the tokenizer or the flag)."""
    try:
        V, D = flat["Embed_0/word_embeddings/embedding"].shape
        positions = flat["Embed_0/position_embeddings/embedding"].shape[0]
        heads = flat["TransformerLayer_0/Attention_0/self_attention/query/kernel"].shape[1]
        hidden = flat["TransformerLayer_0/Mlp_0/intermediate_output/kernel"].shape[1]
    except KeyError as e:
        raise BadInput(f"{source}: no {e.args[0]} tensor: not a MaskGIT transformer checkpoint "
                       f"({describe_tree(flat)})") from None
    depth = len({p.split("/")[0] for p in flat if p.startswith("TransformerLayer_")})
    classes = V - codebook_size - 1
    side = int(round((positions - 1) ** 0.5))
    if classes < 1 or side * side != positions - 1:
        raise BadInput(f"{source}: vocabulary {V} and {positions} positions do not fit codebook size "
                       f"{codebook_size} + classes + [MASK] over a square token grid + class token")
    return MaskGITConfig(codebook_size=codebook_size, seq_len=positions - 1, num_classes=classes, embed_dim=D,
                         depth=depth, num_heads=heads, mlp_ratio=hidden / D)


def convert_transformer(params: dict, codebook_size: int, source="transformer checkpoint"):
    """(state dict in MaskGIT's key order, MaskGITConfig) of a Flax MaskGIT variable tree; BadInput on a mismatch."""
    flat = flatten(params)
    cfg = transformer_config(flat, codebook_size, source)
    state, foreign = {}, []
    for path, a in flat.items():
        name = transformer_name(path)
        if name is None:
            foreign.append(path)
            continue
        try:
            state[name] = transformer_tensor(path, a)
        except ValueError as e:
            raise BadInput(f"{source}: tensor {path} is {e}") from None
    return strict_state(MaskGIT(cfg), state, foreign, source), cfg


# ----------------------------------------------------------------------------- tokenizer


RESBLOCK = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "GroupNorm_1": "norm2", "Conv_1": "conv2",
            "Conv_2": "nin_shortcut"}


def _indices(flat, prefix, kind):
    return {int(m.group(1)) for p in flat for m in [re.match(rf"{prefix}/{kind}_(\d+)/", p)] if m}


def tokenizer_config(flat: dict, resolution: int, source) -> VQGANConfig:
    """VQGANConfig read from the tensors' shapes (`resolution` is not stored: the images it will see)."""
    try:
        channels = flat["encoder/Conv_0/kernel"].shape[-1]
        codebook_size, embed_dim = flat["quantizer/codebook"].shape
    except KeyError as e:
        raise BadInput(f"{source}: no {e.args[0]} tensor: not a MaskGIT VQGAN tokenizer checkpoint "
                       f"({describe_tree(flat)})") from None
    levels = max(_indices(flat, "decoder", "Conv"), default=0)  # conv_in, one upsample conv per level > 0, conv_out
    blocks = len(_indices(flat, "encoder", "ResBlock"))
    if levels < 1 or blocks % (levels + 1):
        raise BadInput(f"{source}: {blocks} encoder res blocks do not fit {levels} levels + a middle")
    per_level = blocks // (levels + 1)
    if per_level != MID_BLOCKS:
        raise BadInput(f"{source}: {per_level} res blocks per level (and as many in the middle); "
                       f"libs/models/vqgan.py has {MID_BLOCKS} middle blocks, as the released tokenizer")
    mult = tuple(flat[f"encoder/ResBlock_{i * per_level}/Conv_0/kernel"].shape[-1] // channels
                 for i in range(levels))
    return VQGANConfig(channels=channels, channel_mult=mult, num_res_blocks=per_level, embed_dim=embed_dim,
                       codebook_size=codebook_size, resolution=resolution)


def tokenizer_names(cfg: VQGANConfig) -> dict:
    """{Flax module path: PyTorch module name} of every layer of a VQGAN of `cfg`."""
    n, R = len(cfg.channel_mult), cfg.num_res_blocks
    blocks = {}
    for i in range(n):
        for j in range(R):
            blocks[f"encoder/ResBlock_{i * R + j}"] = f"encoder.down.{i}.block.{j}"
            blocks[f"decoder/ResBlock_{R + (n - 1 - i) * R + j}"] = f"decoder.up.{i}.block.{j}"
    for j in range(MID_BLOCKS):
        blocks[f"encoder/ResBlock_{n * R + j}"] = f"encoder.mid.block_{j + 1}"
        blocks[f"decoder/ResBlock_{j}"] = f"decoder.mid.block_{j + 1}"
    names = {f"{f}/{sub}": f"{t}.{RESBLOCK[sub]}" for f, t in blocks.items() for sub in RESBLOCK}
    names.update({"encoder/Conv_0": "encoder.conv_in", "encoder/GroupNorm_0": "encoder.norm_out",
                  "encoder/Conv_1": "encoder.conv_out", "decoder/Conv_0": "decoder.conv_in",
                  "decoder/GroupNorm_0": "decoder.norm_out", f"decoder/Conv_{n}": "decoder.conv_out"})
    names.update({f"decoder/Conv_{n - i}": f"decoder.up.{i}.upsample.conv" for i in range(1, n)})
    return names


def convert_tokenizer(params: dict, resolution: int = 256, source="tokenizer checkpoint"):
    """(state dict in VQGAN's key order, VQGANConfig) of a Flax MaskGIT VQVAE variable tree; BadInput on a
    mismatch."""
    flat = flatten(params)
    cfg = tokenizer_config(flat, resolution, source)
    names = tokenizer_names(cfg)
    state, foreign = {}, []
    for path, a in flat.items():
        module, _, leaf = path.rpartition("/")
        try:
            if path == "quantizer/codebook":
                state["quantize.embedding.weight"] = _tensor(a)
            elif module in names and leaf in LEAVES:
                t = _tensor(a)
                state[f"{names[module]}.{LEAVES[leaf]}"] = t.permute(3, 2, 0, 1).contiguous() if t.dim() == 4 else t
            else:
                foreign.append(path)
        except ValueError as e:
            raise BadInput(f"{source}: tensor {path} is {e}") from None
    return strict_state(VQGAN(cfg), state, foreign, source), cfg


# ----------------------------------------------------------------------------- shared


def describe_tree(flat: dict) -> str:
    tops = sorted({p.split("/")[0] for p in flat})
    return f"its top-level entries: {', '.join(tops[:6])}{' ...' if len(tops) > 6 else ''}"


def strict_state(model: torch.nn.Module, state: dict, foreign: list, source) -> OrderedDict:
    """`state` in the model's key order after a strict load into `model`; BadInput naming unmapped Flax tensors."""
    if foreign:
        more = f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else ""
        raise BadInput(f"{source}: tensors that {type(model).__name__} does not have: {', '.join(foreign[:5])}{more}")
    load_strict(model, state, source=str(source))
    return OrderedDict((k, state[k]) for k in model.state_dict())


def output_name(path: Path) -> str:
    """`<name>.safetensors` of an input `<name>[_checkpoint][.msgpack]`."""
    stem = path.name[: -len(".msgpack")] if path.name.endswith(".msgpack") else path.name
    return (stem[: -len("_checkpoint")] if stem.endswith("_checkpoint") else stem) + ".safetensors"


def main(argv=None):
    parser = ArgumentParser(prog="python -m tools.convert_maskgit", description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, help="the official VQGAN Flax checkpoint "
                                                        "(tokenizer_imagenet256_checkpoint)")
    parser.add_argument("--transformer", type=Path, help="the official transformer Flax checkpoint "
                                                          "(maskgit_imagenet256_checkpoint)")
    parser.add_argument("--out", type=Path, default=Path("assets"), help="output folder (default assets/)")
    parser.add_argument("--codebook-size", type=int, default=1024,
                        help="K of the transformer when no --tokenizer is given (default 1024)")
    parser.add_argument("--resolution", type=int, default=256, help="image size the tokenizer is for (printed "
                                                                     "with its sizes; default 256)")
    args = parser.parse_args(argv)
    if args.tokenizer is None and args.transformer is None:
        parser.error("give --tokenizer and/or --transformer")
    check_writable(folders=[args.out])
    codebook_size = args.codebook_size
    if args.tokenizer is not None:
        params = read_flax_msgpack(args.tokenizer, "the MaskGIT VQGAN tokenizer (--tokenizer)")
        state, cfg = convert_tokenizer(params, args.resolution, source=args.tokenizer)
        codebook_size = cfg.codebook_size
        target = save_weights(state, args.out / output_name(args.tokenizer), {"tokenizer": asdict(cfg)})
        print(f"wrote {target}: VQGAN {cfg}")
    if args.transformer is not None:
        params = read_flax_msgpack(args.transformer, "the MaskGIT transformer (--transformer)")
        state, cfg = convert_transformer(params, codebook_size, source=args.transformer)
        target = save_weights(state, args.out / output_name(args.transformer), {"model": asdict(cfg)})
        print(f"wrote {target}: MaskGIT {cfg} ({sum(t.numel() for t in state.values()):,} parameters)")
    return 0


if __name__ == "__main__":
    run_main(main)
