"""Every file ka-mig writes goes through here: atomic, byte-reproducible, and clear when the disk is full.

- Atomic: the content is written to a temp file `.<name>.<pid>.tmp` in the target's folder, then renamed over
  the target, so a reader never sees a half-written file. A write first removes stale temp files of the same
  target left by killed runs (those whose process is gone); the temp files of live processes are kept.
- Byte-reproducible: the same content gives the same bytes. torch.save gets a file object (so no temp name
  ends up inside the archive), and .npz archives are written with fixed zip timestamps.
- Disk full: ENOSPC ends with `DiskFull` naming the path (and the size when known), and the temp file is removed.
"""
import errno
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from libs.errors import DiskFull

TMP_SUFFIX = ".tmp"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: every member of every archive gets it


def temp_path(path: Path, pid: int = None) -> Path:
    """The temp file this process uses while writing `path`."""
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}{TMP_SUFFIX}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(path) -> list:
    """Deletes temp files of `path` left by processes that are gone (or by this one); returns them."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
        owner = tmp.name[len(path.name) + 2:-len(TMP_SUFFIX)]
        if owner.isdigit() and int(owner) != os.getpid() and _alive(int(owner)):
            continue  # a live writer's file
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def disk_full(path, size=None) -> DiskFull:
    """The DiskFull error for `path` (size in bytes when known)."""
    need = f" (about {size / 2 ** 20:.1f} MiB needed)" if size else ""
    error = DiskFull(f"no space left on device while writing {path}{need}; free space or write elsewhere, "
                     f"then rerun")
    error.errno = errno.ENOSPC
    return error


def atomic_write(path, write_fn, size=None) -> Path:
    """Calls write_fn(tmp_path), then renames tmp over `path`. Raises DiskFull on ENOSPC (temp removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC and not isinstance(e, DiskFull):
            raise disk_full(path, size) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


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


def atomic_torch_save(obj, path) -> Path:
    """torch.save through a file object: the archive's inner folder is 'archive', not a temp name."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


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
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def atomic_savez(path, arrays: dict, compressed: bool = False) -> Path:
    """An .npz of `arrays` ({name: array}) that np.load reads; equal arrays give equal bytes."""
    def write(tmp):
        with open(tmp, "wb") as f:
            write_npz(f, arrays, compressed)
    return atomic_write(path, write, size=sum(np.asarray(v).nbytes for v in arrays.values()))
