"""Every file ka-mig writes goes through here: atomic, byte-reproducible, and clear when the disk is full.

- Atomic: the content is written to a temp file `.<name>.<pid>.tmp` in the target's folder, flushed to disk
  (fsync), then renamed over the target, so a reader never sees a half-written file, even after a crash or a
  power loss. A write first removes stale temp files of the same target left by killed runs (those whose
  process is gone); the temp files of live processes are kept. One process writes a given target from one
  thread at a time (the temp name holds the pid only).
- Byte-reproducible: the same content gives the same bytes. torch.save gets a file object (so no temp name
  ends up inside the archive), and .npz archives are written with fixed zip timestamps.
- Disk full: ENOSPC (or EDQUOT, a full quota) ends with `DiskFull` naming the path (and the size when known),
  and the temp file is removed. Files written through a memory map are preallocated first (`preallocate`), so
  a full disk is an error at allocation time instead of a SIGBUS while writing into the map.
"""
import collections
import errno
import glob
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from libs.errors import DiskFull

TMP_SUFFIX = ".tmp"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: every member of every archive gets it
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # "no space left" and "disk quota exceeded"


def temp_path(path: Path, pid: int = None) -> Path:
    """The temp file this process uses while writing `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}{TMP_SUFFIX}")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _temp_owner(tmp: Path, target_name: str):
    """The pid in a temp name `.<target_name>.<pid>.tmp`, or None if `tmp` is not such a name."""
    prefix = f".{target_name}."
    name = tmp.name
    if not (name.startswith(prefix) and name.endswith(TMP_SUFFIX)):
        return None
    owner = name[len(prefix):-len(TMP_SUFFIX)]
    return int(owner) if owner.isdigit() else None


def _remove(p: Path):
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def remove_stale_temps(path) -> list:
    """Deletes temp files (or folders) of `path` left by processes that are gone (or by this one); returns them.

    Only names of the exact form `.<name>.<pid>.tmp` count: the temp of another target whose name extends
    this one (`.<name>.json.<pid>.tmp`) is never touched.
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"):
        owner = _temp_owner(tmp, path.name)
        if owner is None or (owner != os.getpid() and _alive(owner)):
            continue  # not one of ours, or a live writer's file
        _remove(tmp)
        removed.append(tmp)
    return removed


def clean_stale_temps(folder) -> list:
    """Deletes every stale temp (`.<name>.<pid>.tmp` of a process that is gone) directly inside `folder`."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(f".*.*{TMP_SUFFIX}"):
        owner = tmp.name[:-len(TMP_SUFFIX)].rsplit(".", 1)[-1]
        if owner.isdigit() and int(owner) != os.getpid() and not _alive(int(owner)):
            _remove(tmp)
            removed.append(tmp)
    return removed


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in FULL_ERRNOS


def disk_full(path, size=None) -> DiskFull:
    """The DiskFull error for `path` (size in bytes when known)."""
    need = f" (about {size / 2 ** 20:.1f} MiB needed)" if size else ""
    error = DiskFull(f"no space left on device while writing {path}{need}; free space or write elsewhere, "
                     f"then rerun")
    error.errno = errno.ENOSPC
    return error


def _fsync_path(path: Path, directory: bool = False):
    """Flushes a file (or, best effort, a folder's entries) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not directory or is_disk_full(e):
            raise
    finally:
        os.close(fd)


def atomic_write(path, write_fn, size=None) -> Path:
    """Calls write_fn(tmp_path), then renames tmp over `path`. Raises DiskFull on ENOSPC (temp removed)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        write_fn(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent, directory=True)
    except OSError as e:
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise disk_full(path, size) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)  # after a failure; after the rename there is nothing left to remove
    return path


def atomic_write_dir(path, write_fn) -> Path:
    """Calls write_fn(tmp_dir) on a fresh temp folder `.<name>.<pid>.tmp`, then puts it in place of `path`.

    An existing `path` is removed just before the rename, so readers see the old tree or the new one (or,
    for that instant, none), never a partly written one. Raises DiskFull on ENOSPC (temp folder removed).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp.mkdir()
        write_fn(tmp)
        if path.exists():
            _remove(path)
        os.replace(tmp, path)
        _fsync_path(path.parent, directory=True)
    except OSError as e:
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise disk_full(path) from e
        raise
    finally:
        if tmp.exists():
            _remove(tmp)
    return path


def preallocate(path, size: int):
    """Reserves `size` bytes for the file at `path` (posix_fallocate), so a full disk raises DiskFull here
    instead of killing a later write through a memory map with SIGBUS."""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(path, size) from e
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOSYS", -1)):
                raise
            _fill_zeros(fd, size, path)  # a file system without fallocate: write the blocks ourselves
    finally:
        os.close(fd)


def _fill_zeros(fd: int, size: int, path):
    current = os.fstat(fd).st_size
    block = b"\0" * (1 << 20)
    try:
        os.lseek(fd, current, os.SEEK_SET)
        while current < size:
            current += os.write(fd, block[:min(len(block), size - current)])
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path, size) from e
        raise


def atomic_write_bytes(path, data: bytes) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write(path, write, size=len(data))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj, indent=2, sort_keys=True) -> Path:
    """Indented JSON with sorted keys (so equal objects give equal bytes), newline-terminated."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n")


class _RecordingWriter:
    """A file object wrapper that remembers the OSError of a failed write (torch.save reports it as a bare
    RuntimeError without errno)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def canonical_tree(obj):
    """A copy of nested dicts / lists / tuples whose object sharing depends on the content only: every string
    is interned (one object per distinct text) and every container is a new object. Pickle writes a
    repeated object as a back-reference, so without this the same content could give other bytes depending
    on where its strings came from (a source literal, or a loaded checkpoint after a resume). Tensors and
    other leaves are kept as they are; an OrderedDict keeps its type and its `_metadata` (module versions)."""
    if isinstance(obj, str):
        return sys.intern(str(obj))
    if type(obj) in (dict, collections.OrderedDict):
        new = type(obj)((canonical_tree(k), canonical_tree(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            new._metadata = canonical_tree(obj._metadata)
        return new
    if type(obj) is list:
        return [canonical_tree(v) for v in obj]
    if type(obj) is tuple:
        return tuple(canonical_tree(v) for v in obj)
    return obj


def atomic_torch_save(obj, path) -> Path:
    """torch.save through a file object (the archive's inner folder is 'archive', not a temp name) of the
    canonical copy of `obj`, so equal content gives equal bytes."""
    obj = canonical_tree(obj)

    def write(tmp):
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            try:
                torch.save(obj, writer)
            except RuntimeError as e:
                if writer.error is not None:
                    raise writer.error from e
                raise
    return atomic_write(path, write)


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_bytes(tensors: dict, metadata: dict = None) -> bytes:
    """The .safetensors encoding of `tensors` (name -> tensor, any device) with string `metadata`: tensors in
    name order, JSON header with sorted keys padded with spaces to 8 bytes, so equal content gives equal bytes.

    Raises ValueError for a non-tensor entry, a dtype safetensors has no code for, or non-string metadata.
    """
    header, blobs, offset = {}, [], 0
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor) or t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"entry {name!r} is not a tensor of a safetensors dtype ({type(t).__name__}"
                             f"{'' if not isinstance(t, torch.Tensor) else ', ' + str(t.dtype)})")
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # little-endian
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def atomic_save_safetensors(tensors: dict, path, metadata: dict = None) -> Path:
    """Writes `tensors` as a .safetensors file (weights only, no pickle) with string `metadata`, atomically."""
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def atomic_save_npy(path, array: np.ndarray) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append '.npy' to a bare name
            np.save(f, array, allow_pickle=False)
    return atomic_write(path, write, size=np.asarray(array).nbytes)


def write_npz(f, arrays: dict, compressed: bool = False):
    """np.savez into the open binary file `f` with fixed timestamps, members in `arrays` order."""
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(f, "w", compression=method, allowZip64=True) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
            info.compress_type = method
            info.external_attr = 0o644 << 16
            info.create_system = 3  # unix, whatever the platform writing it
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def atomic_savez(path, arrays: dict, compressed: bool = False) -> Path:
    """An .npz of `arrays` ({name: array}) that np.load reads; equal arrays give equal bytes."""
    def write(tmp):
        with open(tmp, "wb") as f:
            write_npz(f, arrays, compressed)
    return atomic_write(path, write, size=sum(np.asarray(v).nbytes for v in arrays.values()))


def append_lines(path, text: str) -> Path:
    """Appends `text` (whole lines, ending in a newline) to the file at `path`, created if absent, and flushes it
    to disk; what the file holds is never rewritten. A last line without its newline (cut by a crash) is
    removed first, so the new lines start a line of their own. For logs that grow by rows; one process appends
    to a given file at a time. Raises DiskFull on ENOSPC."""
    path = Path(path)
    data = text.encode()
    try:
        with open(path, "ab+") as f:
            _cut_unfinished_line(f)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise disk_full(path, len(data)) from e
        raise
    return path


def _cut_unfinished_line(f, block: int = 1 << 16):
    """Truncates the binary file `f` after its last newline (to empty if it has none)."""
    end = f.seek(0, os.SEEK_END)
    pos = end
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        chunk = f.read(pos - start)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            keep = start + nl + 1
            break
        pos = start
    else:
        keep = 0
    if keep != end:
        f.truncate(keep)


def atomic_write_files(folder, write_fn) -> list:
    """Calls write_fn(stage) on a fresh temp folder `.staging.<pid>.tmp` inside `folder`, then renames every file
    it wrote into `folder` at once, in name order (so a file comes before its `<name>.json` sidecar); returns
    their new paths. Nothing in `folder` changes until write_fn has written every file: an error (or a kill)
    while writing leaves the old files as they were, and the stage is removed (a killed run's by the next).
    Raises DiskFull on ENOSPC."""
    folder = Path(folder)
    stage = temp_path(folder / "staging")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder / "staging")
        stage.mkdir()
        write_fn(stage)
        names = sorted(p.name for p in stage.iterdir() if p.is_file())
        for name in names:  # renames only: microseconds for the whole set
            os.replace(stage / name, folder / name)
        _fsync_path(folder, directory=True)
    except OSError as e:
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise disk_full(folder) from e
        raise
    finally:
        if stage.exists():
            _remove(stage)
    return [folder / name for name in names]
