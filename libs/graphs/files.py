"""Reading and writing the KA-MIG graph files: G_co / G_s edge lists, packed G_p, token samples.

Edge graphs are pickles of `[edge_index LongTensor [2,E], edge_weight Tensor [E]]`, exactly like the
released `codebook_*.pkl` files, plus a sidecar `<file>.json` with metadata. They are read with a
restricted unpickler that only rebuilds tensors / arrays (no arbitrary code). G_p is an .npz of the
packed occurrence bits (libs.graphs.occurrence_bits); the paper's dense [C,L,K] tensor (.pt/.npy)
is accepted too. Every file is written atomically (temp file + rename, libs.atomic_io) and byte-reproducibly:
the same graph and metadata give the same bytes (tensor storages are pickled as torch zip archives, which
hold no memory addresses; the .npz has fixed zip timestamps; JSON keys are sorted).
A sidecar records the sha256 of its graph file (`file_sha256`) and, for graphs made by build_graphs, the token
dataset they come from (`source_dataset`, `source_sha256`); `load_graph_folder`, what training and sampling read
graphs through, refuses a file its sidecar does not describe, a folder mixing graphs of two token datasets, and
sizes (codebook, tokens per image, classes) other than the model's. Sidecars of build_graphs also record the
tokenizer of those tokens (`tokenizer_sha256`); `check_graph_tokenizer` refuses a training token dataset or a
sampling tokenizer checkpoint of another tokenizer (released files record none and pass).
"""
import collections
import io
import itertools
import json
import math
import pickle
from pathlib import Path

import numpy as np
import torch

from libs.atomic_io import atomic_savez, atomic_write, atomic_write_json
from libs.checkpoint import file_sha256
from libs.errors import BadInput, MissingInput
from libs.graphs.recipes import dense_to_occurrence, sample_image_indices, unpack_occurrence

BUILD_HINT = "it is built by `python -m graph_construction.build_graphs --tokens <dataset> --out graph_prior/`"

# The file of each graph inside a graph folder (config.graph.dir). The two edge-graph names are those of the
# files released with the paper, so a folder holding the released files works unchanged.
GRAPH_FILES = {
    "co": "codebook_co_occurrence_norm_self_50.pkl",   # G_co
    "sim": "codebook_replace_graph_norm_self.pkl",     # G_s
    "incompat": "incompatibility.npz",                 # G_p (packed bits)
}
GRAPH_TITLES = {"co": "G_co", "sim": "G_s", "incompat": "G_p"}


def graph_paths(graph_dir) -> dict:
    """{'co' | 'sim' | 'incompat': Path} of the three graph files in `graph_dir`."""
    return {name: Path(graph_dir) / file for name, file in GRAPH_FILES.items()}


def missing_graph_error(path) -> MissingInput:
    """MissingInput (a FileNotFoundError) naming the graph file and the command that builds it."""
    return MissingInput(f"graph file not found: {path}\n  {BUILD_HINT}")


def meta_path(path) -> Path:
    """The metadata sidecar of a graph file: `<path>.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_json(path, obj):
    """Atomically writes `obj` as indented JSON with sorted keys."""
    atomic_write_json(path, obj)


def read_meta(path) -> dict:
    """The sidecar metadata of a graph file, or {} if it has none."""
    mp = meta_path(path)
    if not mp.is_file():
        return {}
    try:
        return json.loads(mp.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BadInput(f"{mp}: unreadable graph metadata ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------- safe unpickling

def _storage_from_bytes(data: bytes):
    """Safe stand-in for torch.storage._load_from_bytes (what pickled tensors call)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _allowed_globals() -> dict:
    """(module, name) -> object: the only globals a graph pickle may reference."""
    allowed = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # pickles of numpy 1 and 2
        allowed[(mod, "_reconstruct")] = _reconstruct
    for name in ("float16", "float32", "float64", "int32", "int64"):
        allowed[("torch", name)] = getattr(torch, name)
    return allowed


class GraphUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds tensors and numpy arrays and refuses every other global."""

    ALLOWED = None

    def find_class(self, module, name):
        """The allowed global (module, name), else UnpicklingError."""
        allowed = type(self).ALLOWED = type(self).ALLOWED or _allowed_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return allowed[(module, name)]


def _as_tensor(x, name: str, path) -> torch.Tensor:
    """Tensor from a tensor or numpy array, else BadInput naming the file."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise BadInput(f"{path}: {name} is a {type(x).__name__}, expected a tensor or numpy array")


# ----------------------------------------------------------------------------- reproducible pickles

class ReproduciblePickler(pickle.Pickler):
    """A pickler whose output depends on the tensors' contents only.

    A plain pickle of a tensor stores its storage as a legacy torch.save archive keyed by the storage's memory
    address, so the same graph pickled twice gives different bytes. Here each storage becomes
    `torch.storage._load_from_bytes(<torch zip archive>)`: the call plain pickle.load, torch.load and
    GraphUnpickler make for the released files too, and a zip archive written to a buffer holds no address.
    """

    def reducer_override(self, obj):
        if isinstance(obj, torch.storage.TypedStorage):
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            return torch.storage._load_from_bytes, (buffer.getvalue(),)
        return NotImplemented


# ----------------------------------------------------------------------------- edge graphs

def save_edge_graph(path, edge_index, edge_weight, meta: dict = None):
    """Writes `[edge_index, edge_weight]` (torch tensors, as the released pickles) + `<path>.json` meta."""
    ei = edge_index if isinstance(edge_index, torch.Tensor) else torch.from_numpy(np.array(edge_index))
    ew = edge_weight if isinstance(edge_weight, torch.Tensor) else torch.from_numpy(np.array(edge_weight))
    ei, ew = ei.detach().cpu().long().contiguous(), ew.detach().cpu().contiguous()  # [2,E], [E]
    if ei.ndim != 2 or ei.shape[0] != 2 or ew.shape != (ei.shape[1],):
        raise ValueError(f"edge_index must be [2,E] and edge_weight [E], "
                         f"got {tuple(ei.shape)} and {tuple(ew.shape)}")

    def write(tmp):
        with open(tmp, "wb") as f:
            ReproduciblePickler(f, protocol=4).dump([ei, ew])

    atomic_write(path, write)
    meta = dict(meta or {})
    meta.setdefault("num_nodes", int(ei.max()) + 1 if ei.numel() else 0)
    meta.update(num_edges=int(ei.shape[1]), weight_dtype=str(ew.dtype).replace("torch.", ""),
                file_sha256=file_sha256(path))  # ties the sidecar to these very bytes
    write_json(meta_path(path), meta)
    return Path(path)


def load_edge_graph(path, dtype=torch.float32):
    """(edge_index LongTensor [2,E], edge_weight [E] as `dtype` (None keeps the file's), num_nodes).

    Reads our files and the released pickles unchanged. num_nodes comes from the sidecar meta when
    present, else max index + 1 (every node has a self-loop in both recipes).
    """
    path = Path(path)
    if not path.is_file():
        raise missing_graph_error(path)
    try:
        with open(path, "rb") as f:
            obj = GraphUnpickler(f).load()
    except Exception as e:  # truncated file, foreign pickle, refused global
        raise BadInput(f"{path}: not a readable graph pickle ({type(e).__name__}: {e})") from e
    if not (isinstance(obj, (list, tuple)) and len(obj) == 2):
        raise BadInput(f"{path}: expected a pickled [edge_index, edge_weight], got {type(obj).__name__}"
                         + (f" of length {len(obj)}" if isinstance(obj, (list, tuple)) else ""))
    ei, ew = _as_tensor(obj[0], "edge_index", path), _as_tensor(obj[1], "edge_weight", path)
    if ei.ndim != 2 or ei.shape[0] != 2 or ei.dtype.is_floating_point or ei.dtype == torch.bool:
        raise BadInput(f"{path}: edge_index must be an integer [2,E] tensor, got {ei.dtype} {tuple(ei.shape)}")
    if ew.shape != (ei.shape[1],) or not ew.dtype.is_floating_point:
        raise BadInput(f"{path}: edge_weight must be a float [E] = [{ei.shape[1]}] tensor, "
                         f"got {ew.dtype} {tuple(ew.shape)}")
    ei = ei.long()
    if ei.numel() and int(ei.min()) < 0:
        raise BadInput(f"{path}: negative node index in edge_index")
    if not bool(torch.isfinite(ew).all()):
        raise BadInput(f"{path}: edge_weight has non-finite values")
    num_nodes = int(ei.max()) + 1 if ei.numel() else 0
    declared = read_meta(path).get("num_nodes")
    if declared is not None:
        if int(declared) < num_nodes:
            raise BadInput(f"{path}: meta says {declared} nodes but edge_index uses node {num_nodes - 1}")
        num_nodes = int(declared)
    return ei, (ew if dtype is None else ew.to(dtype)), num_nodes


# ----------------------------------------------------------------------------- G_p

def save_incompatibility(path, packed, meta: dict = None):
    """Writes packed occurrence bits [C,L,ceil(K/8)] + codebook_size, grid, num_classes (.npz) and meta."""
    packed = np.asarray(packed.cpu() if isinstance(packed, torch.Tensor) else packed)
    meta = dict(meta or {})
    if packed.dtype != np.uint8 or packed.ndim != 3:
        raise ValueError(f"packed occurrence bits must be uint8 [C,L,ceil(K/8)], "
                         f"got {packed.dtype} {packed.shape}")
    C, L, nbytes = packed.shape
    K = int(meta.get("codebook_size", nbytes * 8))
    if math.ceil(K / 8) != nbytes:
        raise ValueError(f"codebook_size {K} needs {math.ceil(K / 8)} bytes per row, packed has {nbytes}")
    grid = meta.get("grid", math.isqrt(L))
    side = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if side[0] * side[1] != L:
        raise ValueError(f"grid {grid} does not give the {L} positions of the packed bits")
    meta.update(codebook_size=K, grid=grid, num_classes=C, seq_len=L)

    atomic_savez(path, {"packed": packed, "codebook_size": np.int64(K), "grid": np.asarray(side, np.int64),
                        "num_classes": np.int64(C), "meta": np.asarray(json.dumps(meta, sort_keys=True, default=str))},
                 compressed=True)
    write_json(meta_path(path), {**meta, "file_sha256": file_sha256(path)})  # the sidecar names these bytes
    return Path(path)


def load_dense_incompatibility(path):
    """The paper's dense G_p [C,L,K] from a .pt (tensor) or .npy file, memory-mapped when possible."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, torch.Tensor):
        raise BadInput(f"{path}: expected a dense [C,L,K] tensor, got {type(obj).__name__}")
    return obj


def load_incompatibility(path, num_classes: int = None) -> dict:
    """dict(packed uint8 tensor [C,L,ceil(K/8)], codebook_size, seq_len, num_classes, meta).

    Reads our .npz, or a dense [C,L,K] G_p (.pt/.npy, rows 1/|I| on never-occurring tokens) as the
    paper's code used; a dense tensor's class count is its first dimension. With `num_classes`,
    the file must hold that many classes; a trailing all-zero null class (C = num_classes + 1,
    as a dense tensor may carry) is dropped, since the model gives the null class zeros by its id.
    """
    path = Path(path)
    if not path.is_file():
        raise missing_graph_error(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                packed = z["packed"]
                K, C = int(z["codebook_size"]), int(z["num_classes"])
                meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        else:
            dense = load_dense_incompatibility(path)
            packed, (C, _, K), meta = dense_to_occurrence(dense), tuple(dense.shape), {"source": "dense"}
    except (OSError, KeyError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        raise BadInput(f"{path}: not a readable incompatibility file ({type(e).__name__}: {e})") from e
    if packed.dtype != np.uint8 or packed.ndim != 3 or packed.shape[::2] != (C, math.ceil(K / 8)):
        raise BadInput(f"{path}: packed bits {packed.dtype} {packed.shape} do not match "
                         f"num_classes {C}, codebook_size {K}")
    if num_classes is not None and C != num_classes:
        null_is_zero = C == num_classes + 1 and bool(unpack_occurrence(packed[-1], K).all())
        if not null_is_zero:
            raise BadInput(f"{path}: holds {C} classes, the model has {num_classes} "
                             f"(plus the null class {num_classes}, whose prior is zero)")
        packed, C = packed[:-1], num_classes  # drop the all-zero null class
    return dict(packed=torch.from_numpy(np.ascontiguousarray(packed)), codebook_size=K,
                seq_len=int(packed.shape[1]), num_classes=C, meta=meta)


# ----------------------------------------------------------------------------- graph folders

def checked_meta(path) -> dict:
    """The sidecar metadata of graph file `path` ({} without one), checked to describe this very file: BadInput
    when the file's sha256 is not the one its sidecar recorded (the file was replaced, or a folder update was
    cut short)."""
    meta = read_meta(path)
    recorded = meta.get("file_sha256")
    if recorded is not None and recorded != file_sha256(path):
        raise BadInput(f"{path} is not the file its sidecar {meta_path(path).name} describes (sha256 differs): "
                       f"rebuild the graph folder ({BUILD_HINT.replace('it is built by ', '')}), or delete the "
                       f"sidecar to use the file as it is")
    return meta


def describe_source(meta: dict) -> str:
    """The token dataset a sidecar names: its path, and the first digits of its content hash when recorded."""
    sha = meta.get("source_sha256")
    return f"{meta.get('source_dataset', '?')}" + (f" (tokens sha256 {sha[:12]})" if sha else "")


def same_source(a: dict, b: dict) -> bool:
    """Whether two sidecars name the same token dataset: by content hash when both record one, else by path."""
    if a.get("source_sha256") and b.get("source_sha256"):
        return a["source_sha256"] == b["source_sha256"]
    return a.get("source_dataset") == b.get("source_dataset")


def mixed_sources(metas: dict):
    """For {graph name: sidecar meta}, the first two graphs built from different token datasets, described in
    words; None when every sidecar that names a dataset names the same one."""
    named = [(n, m) for n, m in metas.items() if m.get("source_dataset") or m.get("source_sha256")]
    for (n1, m1), (n2, m2) in itertools.combinations(named, 2):
        if not same_source(m1, m2):
            return (f"{GRAPH_TITLES[n1]} was built from {describe_source(m1)}, {GRAPH_TITLES[n2]} from "
                    f"{describe_source(m2)}")
    return None


def recorded_tokenizer(graph_dir, names):
    """(sidecar path, tokenizer sha256) of the first present graph sidecar among `names` that records the
    tokenizer of its source tokens; None when none does (released files, older builds, files absent)."""
    for name, path in graph_paths(graph_dir).items():
        if name in names and path.is_file():
            sha = read_meta(path).get("tokenizer_sha256")
            if sha:
                return meta_path(path), str(sha)
    return None


def check_graph_tokenizer(graph_dir, names, sha256: str, source: str):
    """BadInput when a graph sidecar of `names` records a tokenizer sha256 other than `sha256`, the tokenizer
    `source` (a file, in words) stands for; nothing when either side records none."""
    recorded = recorded_tokenizer(graph_dir, names) if sha256 else None
    if recorded and recorded[1] != sha256:
        raise BadInput(f"{source} has tokenizer sha256 {sha256[:12]} but the graphs were built from tokens of "
                       f"tokenizer sha256 {recorded[1][:12]} ({recorded[0]}): use the tokenizer the graphs' "
                       f"tokens were made with, or rebuild the graphs (python -m graph_construction.build_graphs "
                       f"--tokens <dataset> --out {graph_dir})")


def check_sizes(path, meta: dict, codebook_size: int, seq_len: int):
    """BadInput when a graph's metadata names another codebook size or token count than the model's."""
    for key, want, cfg_key, what in (("codebook_size", codebook_size, "codebook_size", "codes"),
                                     ("seq_len", seq_len, "seq_len", "tokens per image")):
        have = meta.get(key)
        if have is not None and want is not None and int(have) != int(want):
            raise BadInput(f"{path} was built for {have} {what} but the model has {want} "
                           f"(config.model.{cfg_key}); build the graphs from this model's tokens")


def load_graph_folder(graph_dir, names, codebook_size: int, seq_len: int = None, num_classes: int = None) -> dict:
    """The graphs `names` ('co', 'sim', 'incompat') of `graph_dir`, every one checked before use:
    {'co' | 'sim': (edge_index [2,E], edge_weight [E] float32, num_nodes), 'incompat': packed uint8 [C,L,ceil(K/8)]}.

    Raises MissingInput (a file absent) or BadInput: a file not the one its sidecar describes, sidecars naming
    two different source token datasets (a mixed folder), or a codebook size, token count or class count other
    than the model's (`codebook_size`, `seq_len`, `num_classes`), each naming the file and both sides.
    """
    paths = {n: p for n, p in graph_paths(graph_dir).items() if n in names}
    for path in paths.values():
        if not path.is_file():
            raise missing_graph_error(path)
    metas = {n: checked_meta(p) for n, p in paths.items()}
    mixed = mixed_sources(metas)
    if mixed:
        raise BadInput(f"graph folder {graph_dir} mixes graphs of two token datasets: {mixed}; rebuild them "
                       f"together: python -m graph_construction.build_graphs --tokens <dataset> --out {graph_dir}")
    graphs = {}
    for name, path in paths.items():
        check_sizes(path, metas[name], codebook_size, seq_len)
        if name == "incompat":
            g = load_incompatibility(path, num_classes=num_classes)
            check_sizes(path, g, codebook_size, seq_len)
            graphs[name] = g["packed"]
            continue
        graph = load_edge_graph(path)
        if graph[2] != codebook_size:
            raise BadInput(f"{path} is a graph over {graph[2]} tokens (a {graph[2]}-code codebook) but the model "
                           f"has {codebook_size} codes (config.model.codebook_size); build the graphs from this "
                           f"model's tokens")
        graphs[name] = graph
    return graphs


# ----------------------------------------------------------------------------- token samples

def sample_tokens(tokens, max_images: int, seed: int) -> dict:
    """{image index: list of ids} for a seeded random subset of the rows of tokens [N,L]."""
    if getattr(tokens, "ndim", None) != 2:
        raise ValueError(f"tokens must be [N,L], got shape {getattr(tokens, 'shape', None)}")
    idx = sample_image_indices(tokens.shape[0], max_images, seed)
    rows = np.asarray(tokens[idx]).astype(np.int64)  # [n,L]
    return {int(i): row.tolist() for i, row in zip(idx, rows)}


def save_sample_tokens(path, sample: dict):
    """Writes a `train_img_50K_token.pkl`-style pickle (dict image index -> list of ids)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            ReproduciblePickler(f, protocol=4).dump(sample)

    return atomic_write(path, write)
