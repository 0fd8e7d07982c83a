"""Token dataset: on-disk format, loader (ours + the paper's .npy), and the chunked builder.

Format (a directory):
  tokens.npy  uint16 [N, h*w]  memory-mappable token ids, row order = sorted file list (image row, then
                               its horizontal-flip row on the train split)
  labels.npy  int64  [N]       class index of each row (classes = sorted folder names)
  meta.json                   codebook_size, grid, seq_len, resolution, tokenizer hash, class names,
                               counts, rows_per_image, skipped files with reasons; written last, so a
                               directory without it is incomplete.
The paper's format is one int64 .npy whose rows are [label, L ids].
"""
import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from libs.atomic_io import (atomic_save_npy, atomic_savez, atomic_write, atomic_write_json, clean_stale_temps,
                            is_disk_full, disk_full, preallocate)
from libs.checkpoint import file_sha256, require_file
from libs.data.images import ImageFileDataset, collate_images, scan_image_folder
from libs.distributed import Distributed
from libs.errors import BadInput, MissingInput
from libs.folder_lock import lock_folder
from libs.models.factory import load_tokenizer

FORMAT_VERSION = 1
TOKENS_FILE, LABELS_FILE, META_FILE = "tokens.npy", "labels.npy", "meta.json"
PARTIAL_DIR = "_partial"        # per-chunk results of an unfinished extraction
PLAN_FILE = "plan.json"         # what the chunks in PARTIAL_DIR were computed for
BUILD_HINT = "python extract_imagenet_feature.py --path data --split train"
SCAN_ROWS = 1 << 16             # rows per block when scanning a (memory-mapped) token array

log = logging.getLogger("token_dataset")


class TokenDatasetError(BadInput):
    """A token dataset (or a partial extraction) is inconsistent or does not match what was asked."""


class MissingTokenDatasetError(MissingInput):
    """The token dataset path does not exist or holds no finished dataset."""


class StopRequested(RuntimeError):
    """Raised by `--stop-after-chunks` (a testing aid that simulates a crash)."""


# ----------------------------------------------------------------------------- small I/O helpers


def save_npy_atomic(path, array: np.ndarray):
    """np.save to `path` atomically (libs.atomic_io: temp file + rename, DiskFull when the disk is full)."""
    return atomic_save_npy(path, array)


def write_json_atomic(path, obj):
    """JSON (sorted keys, so equal content gives equal bytes) to `path` atomically."""
    return atomic_write_json(path, obj)


def missing_dataset_message(path) -> str:
    """Error text for a token dataset that is not there."""
    return (f"token dataset not found: {path}\n"
            f"  build it from an ImageFolder tree data/train/<class>/*.JPEG with:\n"
            f"    {BUILD_HINT}   (add --out {path} to write it there)")


# ----------------------------------------------------------------------------- format and loader


def id_range(tokens: np.ndarray):
    """(min, max) of a 2-D token array, scanned in row blocks so memmaps stay out of RAM."""
    lo, hi = None, None
    for start in range(0, tokens.shape[0], SCAN_ROWS):
        block = np.asarray(tokens[start:start + SCAN_ROWS])  # [<=SCAN_ROWS, L]
        if block.size:
            lo = int(block.min()) if lo is None else min(lo, int(block.min()))
            hi = int(block.max()) if hi is None else max(hi, int(block.max()))
    return lo, hi


# meta.json keys that hold sizes: the smallest value each may take (absent or null: derived from the arrays)
META_SIZES = {"format_version": 1, "codebook_size": 1, "grid": 1, "seq_len": 1, "num_classes": 1, "num_rows": 0,
              "rows_per_image": 1}


def _is_int(value) -> bool:
    """True for a JSON integer (not a bool, a float or a string)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_meta(meta, source) -> dict:
    """Returns `meta` (the parsed meta.json of a token dataset) if usable, else TokenDatasetError listing every
    problem: not a JSON object, a size that is not an integer in range (META_SIZES), class_names that are not
    strings or not num_classes of them."""
    if not isinstance(meta, dict):
        raise TokenDatasetError(f"{source}: holds a JSON {type(meta).__name__}, expected an object of sizes "
                                f"(codebook_size, grid, num_classes, ...)")
    problems = []
    for key, low in META_SIZES.items():
        value = meta.get(key)
        if value is not None and (not _is_int(value) or value < low):
            problems.append(f"{key} = {json.dumps(value)} (expected an integer >= {low})")
    names = meta.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            problems.append(f"class_names = {json.dumps(names)[:60]} (expected a list of strings)")
        elif _is_int(meta.get("num_classes")) and len(names) != meta["num_classes"]:
            problems.append(f"{len(names)} class_names for num_classes = {meta['num_classes']}")
    if problems:
        raise TokenDatasetError(f"{source}: " + "; ".join(problems))
    return meta


def read_token_meta(path) -> dict:
    """The checked meta.json of the token dataset folder `path` (check_meta); TokenDatasetError when it does not
    parse or is malformed, MissingTokenDatasetError when it is absent."""
    meta_file = Path(path) / META_FILE
    try:
        text = meta_file.read_text()
    except FileNotFoundError as e:
        raise MissingTokenDatasetError(missing_dataset_message(path)) from e
    except (OSError, UnicodeDecodeError) as e:
        raise TokenDatasetError(f"{meta_file}: unreadable ({type(e).__name__}: {e})") from e
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise TokenDatasetError(f"{meta_file}: not valid JSON ({e})") from e
    return check_meta(meta, meta_file)


def load_array(path: Path, what: str, mmap: bool) -> np.ndarray:
    """An integer .npy array of a token dataset (memory-mapped with `mmap`); TokenDatasetError when the file is
    absent, unreadable, not one array or not integers (float ids would be truncated silently)."""
    if not path.is_file():
        raise TokenDatasetError(f"{path}: missing: the token dataset is incomplete; rebuild it with {BUILD_HINT}")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # empty, truncated, pickled objects
        raise TokenDatasetError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from e
    if not isinstance(arr, np.ndarray):
        arr.close()  # an .npz archive under an .npy name
        raise TokenDatasetError(f"{path}: expected one .npy array of {what}, got an .npz archive")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TokenDatasetError(f"{path}: {what} are {arr.dtype}, expected integers (uint16 ids and int64 labels "
                                f"as extract_imagenet_feature.py writes them)")
    return arr


def check_rows(tokens: np.ndarray, labels: np.ndarray, source):
    """TokenDatasetError unless tokens are [N,L] and labels [N] with N >= 1."""
    if tokens.ndim != 2 or labels.ndim != 1:
        raise TokenDatasetError(f"{source}: expected tokens [N,L] and labels [N], got "
                                f"{tuple(tokens.shape)} and {tuple(labels.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise TokenDatasetError(f"{source}: holds no token maps (tokens {tuple(tokens.shape)}); nothing to train "
                                f"on or build graphs from")


def validate_tokens(tokens: np.ndarray, labels: np.ndarray, meta: dict, source="token dataset"):
    """Checks shapes against meta, ids in [0, codebook_size) and labels in [0, num_classes)."""
    check_rows(tokens, labels, source)
    if tokens.shape[0] != labels.shape[0]:
        raise TokenDatasetError(f"{source}: {tokens.shape[0]} token rows but {labels.shape[0]} labels")
    if meta.get("num_rows") is not None and tokens.shape[0] != meta["num_rows"]:
        raise TokenDatasetError(f"{source}: meta says {meta['num_rows']} rows, tokens.npy has {tokens.shape[0]}")
    if tokens.shape[1] != meta["seq_len"] or meta["grid"] ** 2 != meta["seq_len"]:
        raise TokenDatasetError(f"{source}: rows of {tokens.shape[1]} ids do not match seq_len "
                                f"{meta['seq_len']} / grid {meta['grid']}x{meta['grid']}")
    lo, hi = id_range(tokens)
    if lo is not None and (lo < 0 or hi >= meta["codebook_size"]):
        raise TokenDatasetError(f"{source}: token ids span [{lo},{hi}], outside [0,{meta['codebook_size']})")
    if labels.size:
        lab_lo, lab_hi = int(labels.min()), int(labels.max())
        n_cls = meta.get("num_classes")
        if lab_lo < 0 or (n_cls is not None and lab_hi >= n_cls):
            raise TokenDatasetError(f"{source}: labels span [{lab_lo},{lab_hi}], outside [0,{n_cls})")


def load_paper_npy(path: Path, codebook_size=None, mmap=True, validate=True):
    """The paper's format: int64 .npy rows [label, L ids] -> (tokens [N,L] view, labels [N], derived meta)."""
    arr = load_array(path, "rows [label, ids]", mmap)  # [N, 1+L]
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise TokenDatasetError(f"{path}: expected an integer array [N, 1+L] of rows [label, ids], "
                                f"got {arr.dtype} {tuple(arr.shape)}")
    tokens = arr[:, 1:]  # [N, L] (a strided view; stays memory-mapped)
    labels = np.ascontiguousarray(arr[:, 0], dtype=np.int64)  # [N]
    check_rows(tokens, labels, path)
    seq_len = tokens.shape[1]
    grid = math.isqrt(seq_len)
    if grid * grid != seq_len:
        raise TokenDatasetError(f"{path}: rows hold {seq_len} ids, not a square token grid")
    if codebook_size is None or validate:
        lo, hi = id_range(tokens)
        if codebook_size is None:
            codebook_size = (hi + 1) if hi is not None else 0
    meta = {"format": "paper-npy", "source": str(path), "codebook_size": int(codebook_size), "grid": grid,
            "seq_len": seq_len, "resolution": None, "tokenizer_sha256": "", "class_names": None,
            "num_classes": int(labels.max()) + 1 if labels.size else 0, "num_rows": int(arr.shape[0]),
            "num_images": None, "rows_per_image": None, "skipped": []}
    return tokens, labels, meta


def load_tokens(path, codebook_size=None, mmap=True, validate=True, expected_from=""):
    """Token dataset dir or paper .npy -> (tokens [N,L] integers (memmap), labels [N] integers, meta dict).

    The one reader of token datasets: a malformed meta.json, a missing, unreadable, empty or non-integer
    tokens.npy / labels.npy, a dataset without rows and (with `validate`) ids or labels out of range raise
    TokenDatasetError (BadInput) naming the file; an absent dataset MissingTokenDatasetError.
    `codebook_size` (optional) is the size the caller's model expects: it must match the dataset's
    (our format) or replaces the max-id-derived one (paper format); `expected_from` names where it comes from.
    """
    path = Path(path)
    if not path.exists():
        raise MissingTokenDatasetError(missing_dataset_message(path))
    if path.is_file():
        if path.suffix != ".npy":
            raise TokenDatasetError(f"{path}: expected a token dataset directory or a paper-format .npy file")
        tokens, labels, meta = load_paper_npy(path, codebook_size, mmap, validate)
    else:
        if not (path / META_FILE).is_file():
            if (path / PARTIAL_DIR).is_dir():
                raise MissingTokenDatasetError(
                    f"token dataset {path} is unfinished ({path / PARTIAL_DIR} holds partial results and "
                    f"there is no {META_FILE}); rerun the same extract_imagenet_feature.py command to resume")
            raise MissingTokenDatasetError(missing_dataset_message(path))
        meta = read_token_meta(path)
        if (meta.get("format_version") or FORMAT_VERSION) > FORMAT_VERSION:
            raise TokenDatasetError(f"{path}: format version {meta['format_version']} is newer than this code's "
                                    f"({FORMAT_VERSION}); update the repository")
        tokens = load_array(path / TOKENS_FILE, "token ids", mmap)  # [N, L] uint16
        labels = load_array(path / LABELS_FILE, "labels", mmap)  # [N] int64
        check_rows(tokens, labels, path)
        if meta.get("seq_len") is None:
            meta["seq_len"] = int(tokens.shape[1])
        if meta.get("grid") is None:
            meta["grid"] = math.isqrt(meta["seq_len"])
        if meta.get("codebook_size") is None:  # hand-written meta.json: the caller's size, else max id + 1
            hi = id_range(tokens)[1] if codebook_size is None else codebook_size - 1
            meta["codebook_size"] = hi + 1
        if codebook_size is not None and codebook_size != meta["codebook_size"]:
            raise TokenDatasetError(f"{path}: tokenized with a {meta['codebook_size']}-code tokenizer, "
                                    f"but {codebook_size} codes were expected"
                                    + (f" ({expected_from})" if expected_from else ""))
    if validate:
        validate_tokens(tokens, labels, meta, source=str(path))
    return tokens, labels, meta


def load_tokens_for_model(path, model_cfg, key="config.data.path"):
    """load_tokens of `path`, checked against a config's `model` block: codebook, tokens per map (grid) and
    classes must be the model's; BadInput naming both sides (MissingInput when `path` is empty or absent)."""
    if not path:
        raise MissingTokenDatasetError(f"no token dataset given: set {key}=<token dataset>")
    tokens, labels, meta = load_tokens(path, codebook_size=model_cfg.codebook_size,
                                       expected_from="config.model.codebook_size")
    if tokens.shape[1] != model_cfg.seq_len:
        raise TokenDatasetError(f"token dataset {path} has {tokens.shape[1]} tokens per image (grid "
                                f"{meta['grid']}x{meta['grid']}) but the model expects {model_cfg.seq_len} "
                                f"(config.model.seq_len)")
    declared = meta.get("num_classes") if meta.get("format") != "paper-npy" else None  # paper: max label + 1
    if declared is not None and declared != model_cfg.num_classes:
        raise TokenDatasetError(f"token dataset {path} has {declared} classes (meta.json num_classes) but the "
                                f"model has {model_cfg.num_classes} (config.model.num_classes)")
    if int(labels.max()) >= model_cfg.num_classes:
        raise TokenDatasetError(f"token dataset {path} has class id {int(labels.max())} but the model has "
                                f"{model_cfg.num_classes} classes (config.model.num_classes)")
    return tokens, labels, meta


def dataset_sha256(path) -> str:
    """sha256 of a token dataset's arrays (tokens.npy then labels.npy; a paper .npy: the file): its content's id,
    whatever folder it sits in."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for name in (TOKENS_FILE, LABELS_FILE):
        h.update(file_sha256(path / name).encode())
    return h.hexdigest()


def write_token_dataset(out_dir, tokens: np.ndarray, labels: np.ndarray, meta: dict):
    """Writes an in-memory token dataset (tokens [N,L], labels [N]) atomically, meta.json last."""
    out_dir = Path(out_dir)
    if tokens.size and int(tokens.max()) > np.iinfo(np.uint16).max:
        raise TokenDatasetError("token ids do not fit uint16")
    (out_dir / META_FILE).unlink(missing_ok=True)  # mark incomplete while the arrays change
    save_npy_atomic(out_dir / TOKENS_FILE, np.ascontiguousarray(tokens, dtype=np.uint16))
    save_npy_atomic(out_dir / LABELS_FILE, np.ascontiguousarray(labels, dtype=np.int64))
    meta = dict(meta, num_rows=int(tokens.shape[0]), seq_len=int(tokens.shape[1]), format_version=FORMAT_VERSION)
    write_json_atomic(out_dir / META_FILE, meta)
    return meta


# ----------------------------------------------------------------------------- builder (chunks, merge)


def open_npy_memmap(path, dtype, shape):
    """A writable memory map of a new .npy file (the bytes np.save would write), its space reserved first.

    The file is preallocated before it is mapped: on a full disk this raises DiskFull at once, where a
    plain np.lib.format.open_memmap (a sparse file) would die with SIGBUS at the first page that finds no
    free block."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    nbytes = int(np.prod(shape)) * dtype.itemsize
    try:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            offset = f.tell()
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path, nbytes) from e
        raise
    preallocate(path, offset + nbytes)
    return np.memmap(path, dtype=dtype, mode="r+", offset=offset, shape=tuple(shape))


def chunk_path(partial_dir: Path, c: int) -> Path:
    """File of chunk c (fixed slice of the file list, independent of the number of processes)."""
    return partial_dir / f"chunk_{c:07d}.npz"


def plan_fingerprint(items, flip: bool, chunk_size: int, resolution: int, tokenizer: dict, tok_sha: str) -> str:
    """Hash of everything the chunk contents depend on (file list, labels, chunking, tokenizer)."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": FORMAT_VERSION, "flip": flip, "chunk_size": chunk_size,
                         "resolution": resolution, "tokenizer": tokenizer, "sha": tok_sha},
                        sort_keys=True).encode())
    for rel, label in items:
        h.update(f"{label}\t{rel}\n".encode())
    return h.hexdigest()


def write_chunk(path: Path, tokens, labels, image_index, skipped, fingerprint: str):
    """Atomically saves one chunk: tokens [rows,L] uint16, labels [rows], encoded image indices, skips
    (a reproducible .npz: equal chunks give equal bytes)."""
    atomic_savez(path, {"tokens": np.asarray(tokens), "labels": np.asarray(labels, dtype=np.int64),
                        "image_index": np.asarray(image_index, dtype=np.int64),
                        "skipped_index": np.asarray([i for i, _ in skipped], dtype=np.int64),
                        "skipped_reason": np.asarray([r for _, r in skipped], dtype=str),
                        "fingerprint": np.asarray(fingerprint)})


def read_chunk(path: Path, fingerprint: str, keys=("labels", "image_index", "skipped_index", "skipped_reason")):
    """Loads the named arrays of one chunk, refusing a chunk computed for another plan."""
    with np.load(path, allow_pickle=False) as z:
        if str(z["fingerprint"]) != fingerprint:
            raise TokenDatasetError(f"{path} was computed for a different file list or tokenizer")
        return {k: z[k] for k in keys}


def prepare_output(out_dir: Path, fingerprint: str, n_items: int, chunk_size: int, overwrite: bool) -> str:
    """Rank 0: 'done' if out_dir already holds this dataset, else readies the partial dir -> 'run'."""
    meta_path, partial = out_dir / META_FILE, out_dir / PARTIAL_DIR
    if meta_path.is_file() and not overwrite:
        try:
            old = read_token_meta(out_dir).get("fingerprint")
        except TokenDatasetError:  # a damaged meta.json: some other dataset, kept unless --overwrite
            old = None
        if old == fingerprint:
            return "done"
        raise TokenDatasetError(f"{out_dir} already holds a token dataset made from other files or another "
                                f"tokenizer; pass --overwrite to replace it, or choose another --out")
    plan = {"fingerprint": fingerprint, "num_files": n_items, "chunk_size": chunk_size}
    if partial.is_dir():
        try:
            with open(partial / PLAN_FILE) as f:
                same = json.load(f) == plan
        except (OSError, ValueError):
            same = False
        if not same and not overwrite:
            raise TokenDatasetError(f"{partial} holds partial results of a different run (other files, "
                                    f"tokenizer or --chunk-size); pass --overwrite to discard them")
        if not same or overwrite:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    for folder in (out_dir, partial):  # temp files of killed runs (never those of a live process)
        clean_stale_temps(folder)
    if overwrite:
        meta_path.unlink(missing_ok=True)
    if not (partial / PLAN_FILE).is_file():
        write_json_atomic(partial / PLAN_FILE, plan)
    return "run"


def encode_images(model, images_u8: torch.Tensor, flip: bool, device) -> np.ndarray:
    """uint8 [B,3,R,R] -> uint16 ids [B or 2B, L]; with flip, each image row is followed by its mirror's."""
    x = images_u8.to(device, non_blocking=True).float() / 255.0  # [B,3,R,R] in [0,1]
    B = x.shape[0]
    if flip:
        x = torch.cat([x, x.flip(3)])  # [2B,3,R,R]: images, then mirrored images
    ids = model.encode(x).flatten(1)  # [B or 2B, L]
    if flip:
        ids = ids.view(2, B, -1).transpose(0, 1).reshape(2 * B, -1)  # interleave: image, flip, image, ...
    return ids.cpu().numpy().astype(np.uint16)


def tokens_per_image(model) -> int:
    """Sequence length L = grid^2 of the tokenizer."""
    return model.grid_size ** 2


def chunk_batches(chunks, chunk_size: int, n_items: int, batch_size: int):
    """Index batches that never straddle a chunk -> (batches, chunk id of each batch)."""
    batches, owner = [], []
    for c in chunks:
        stop = min((c + 1) * chunk_size, n_items)
        for s in range(c * chunk_size, stop, batch_size):
            batches.append(list(range(s, min(s + batch_size, stop))))
            owner.append(c)
    return batches, owner


def compute_chunks(model, dataset, chunks, partial: Path, fingerprint: str, *, chunk_size: int, flip: bool,
                   batch_size: int, workers: int, device, show_progress: bool, stop_after_chunks: int = 0):
    """Encodes the given chunks of `dataset` and writes one file per chunk."""
    batches, owner = chunk_batches(chunks, chunk_size, len(dataset), batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         collate_fn=collate_images, pin_memory=str(device).startswith("cuda"))
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", disable=not show_progress, desc="tokenizing")
    acc = {"tokens": [], "labels": [], "index": [], "skipped": []}
    written, n_skipped = 0, 0
    for j, (index, labels, images, failed) in enumerate(loader):
        for i, reason in failed:
            log.warning("skipped %s: %s", dataset.items[i][0], reason)
        acc["skipped"] += failed
        n_skipped += len(failed)
        if images is not None:
            acc["tokens"].append(encode_images(model, images, flip, device))  # [rows, L]
            acc["labels"] += [lab for lab in labels for _ in range(2 if flip else 1)]
            acc["index"] += index
        bar.update(len(index) + len(failed))
        bar.set_postfix(skipped=n_skipped)
        if j + 1 == len(batches) or owner[j + 1] != owner[j]:  # last batch of this chunk
            tokens = (np.concatenate(acc["tokens"]) if acc["tokens"]  # [rows, L]
                      else np.zeros((0, tokens_per_image(model)), np.uint16))
            write_chunk(chunk_path(partial, owner[j]), tokens, acc["labels"], acc["index"], acc["skipped"],
                        fingerprint)
            acc = {"tokens": [], "labels": [], "index": [], "skipped": []}
            written += 1
            if stop_after_chunks and written >= stop_after_chunks:
                bar.close()
                raise StopRequested(f"stopped after {written} chunks (--stop-after-chunks)")
    bar.close()
    return written


def merge_chunks(out_dir: Path, n_chunks: int, fingerprint: str, items, meta: dict) -> dict:
    """Rank 0: concatenates the chunk files in order into tokens.npy / labels.npy, then meta.json."""
    partial = out_dir / PARTIAL_DIR
    missing = [c for c in range(n_chunks) if not chunk_path(partial, c).is_file()]
    if missing:
        raise TokenDatasetError(f"{len(missing)} of {n_chunks} chunks are missing in {partial} (first: "
                                f"{chunk_path(partial, missing[0]).name}); rerun the same command to compute them")
    chunks = [read_chunk(chunk_path(partial, c), fingerprint) for c in range(n_chunks)]  # small arrays only
    n_rows = sum(len(ch["labels"]) for ch in chunks)
    if n_rows == 0:
        raise TokenDatasetError(f"none of the {len(items)} image files could be read; nothing to write")
    L = meta["seq_len"]

    def write_tokens(tmp):
        mm = open_npy_memmap(tmp, np.uint16, (n_rows, L))  # [N, L], disk space reserved
        row = 0
        for c in range(n_chunks):  # one chunk's tokens in memory at a time
            tokens = read_chunk(chunk_path(partial, c), fingerprint, keys=("tokens",))["tokens"]  # [rows, L]
            if len(tokens) and tokens.shape[1] != L:
                raise TokenDatasetError(f"{chunk_path(partial, c)} holds rows of {tokens.shape[1]} ids, not {L}")
            mm[row:row + len(tokens)] = tokens
            row += len(tokens)
        if row != n_rows:
            raise TokenDatasetError(f"chunks in {partial} hold {row} token rows but {n_rows} labels")
        mm.flush()
        del mm

    (out_dir / META_FILE).unlink(missing_ok=True)  # the directory counts as unfinished until meta.json
    atomic_write(out_dir / TOKENS_FILE, write_tokens, size=n_rows * L * np.dtype(np.uint16).itemsize)
    save_npy_atomic(out_dir / LABELS_FILE, np.concatenate([ch["labels"] for ch in chunks]).astype(np.int64))
    skipped = [{"file": items[int(i)][0], "reason": str(r)}
               for ch in chunks for i, r in zip(ch["skipped_index"], ch["skipped_reason"])]
    meta = dict(meta, num_rows=n_rows, skipped=skipped, num_skipped=len(skipped),
                num_images=int(sum(len(ch["image_index"]) for ch in chunks)))
    write_json_atomic(out_dir / META_FILE, meta)
    return meta


def extract_token_dataset(image_root, out_dir, tok_cfg, *, dist: Distributed = None, **options) -> dict:
    """Tokenizes an ImageFolder tree into a token dataset at out_dir (resumable, shardable); returns meta.

    One process per out_dir: the main process holds the folder's lock (libs.folder_lock) for the whole run, so
    a second extraction into it stops at once with FolderBusy naming the first one's pid. `options`: those
    of `tokenize_into` (flip, batch_size, workers, device, chunk_size, overwrite, keep_partial, ...)."""
    dist = dist or Distributed()
    lock = lock_folder(out_dir, dist, "token dataset folder", "or choose another --out")
    try:
        return tokenize_into(image_root, out_dir, tok_cfg, dist=dist, **options)
    finally:
        lock.release()


def tokenize_into(image_root, out_dir, tok_cfg, *, flip: bool, batch_size=64, workers=4, device="cpu",
                  chunk_size=1024, overwrite=False, keep_partial=False, stop_after_chunks=0,
                  dist: Distributed = None) -> dict:
    """`extract_token_dataset` once out_dir is locked (call that instead)."""
    dist = dist or Distributed()
    out_dir = Path(out_dir)
    if tok_cfg.checkpoint:
        require_file(tok_cfg.checkpoint)  # fail fast, before building the model or listing files
    model = load_tokenizer(tok_cfg, device=device)  # MissingAssetError naming the file if absent
    if model.codebook_size > np.iinfo(np.uint16).max + 1:
        raise TokenDatasetError(f"codebook of {model.codebook_size} codes does not fit uint16 tokens")
    listing = scan_image_folder(image_root)  # loops / unreadable entries become skipped items, never errors
    classes, items = listing.classes, listing.items
    resolution = model.cfg.resolution
    tok_sha = dist.broadcast(file_sha256(tok_cfg.checkpoint) if dist.is_main else None)
    fingerprint = plan_fingerprint(items, flip, chunk_size, resolution, model.config_dict(), tok_sha)
    n_chunks = math.ceil(len(items) / chunk_size)

    partial = out_dir / PARTIAL_DIR
    status, pending = None, None
    if dist.is_main:
        try:
            status = prepare_output(out_dir, fingerprint, len(items), chunk_size, overwrite)
            pending = [c for c in range(n_chunks) if not chunk_path(partial, c).is_file()]
        except TokenDatasetError as e:
            status = f"error: {e}"
    # one listing, made before anyone writes: ranks listing for themselves could see each other's new chunks
    status, pending, main_fp = dist.broadcast((status, pending, fingerprint))
    if main_fp != fingerprint:
        raise TokenDatasetError(f"rank {dist.rank} sees another file list or tokenizer than rank 0")
    if status.startswith("error: "):
        raise TokenDatasetError(status[len("error: "):])
    if status == "done":
        if dist.is_main:
            log.info("%s already holds this token dataset (pass --overwrite to rebuild)", out_dir)
        with open(out_dir / META_FILE) as f:
            return json.load(f)

    mine = pending[dist.rank::dist.world]  # round robin over what is left, so resumes stay balanced
    if dist.is_main:
        log.info("%d files in %d classes -> %d chunks of %d: %d finished, %d to do on %d process(es)",
                 len(items), len(classes), n_chunks, chunk_size, n_chunks - len(pending), len(pending), dist.world)
    dataset = ImageFileDataset(image_root, items, resolution, problems=listing.problems)
    compute_chunks(model, dataset, mine, partial, fingerprint, chunk_size=chunk_size, flip=flip,
                   batch_size=batch_size, workers=workers, device=device, show_progress=dist.is_main,
                   stop_after_chunks=stop_after_chunks)
    dist.barrier()
    if not dist.is_main:
        return {}
    ckpt = str(tok_cfg.checkpoint)
    meta = {"format": "ka-mig-tokens", "format_version": FORMAT_VERSION, "codebook_size": model.codebook_size,
            "grid": model.grid_size, "seq_len": tokens_per_image(model), "resolution": resolution,
            "tokenizer_checkpoint": ckpt, "tokenizer_sha256": tok_sha, "tokenizer": model.config_dict(),
            "class_names": classes, "num_classes": len(classes), "num_files": len(items),
            "rows_per_image": 2 if flip else 1, "flip": flip, "source": str(image_root),
            "chunk_size": chunk_size, "fingerprint": fingerprint}
    meta = merge_chunks(out_dir, n_chunks, fingerprint, items, meta)
    if meta["skipped"]:
        log.warning("skipped %d unreadable file(s) (listed in %s):%s", meta["num_skipped"], out_dir / META_FILE,
                    "".join(f"\n  {s['file']}: {s['reason']}" for s in meta["skipped"][:20]))
    if not keep_partial:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("wrote %d rows (%d images x %d) of %d tokens to %s", meta["num_rows"], meta["num_images"],
             meta["rows_per_image"], meta["seq_len"], out_dir)
    return meta
