"""libs.atomic_io: byte-reproducible writes, stale temp files, a full disk (injected and, as root, a real tmpfs)."""
import errno
import hashlib
import io
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from libs import atomic_io
from libs.atomic_io import (atomic_save_npy, atomic_savez, atomic_torch_save, atomic_write, atomic_write_json,
                            atomic_write_text, clean_stale_temps, preallocate, temp_path)
from libs.errors import DiskFull


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(folder) -> list:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def later_clock(monkeypatch):
    """Call it to move the wall clock an hour ahead (zip members get the time they are written)."""
    def shift():
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600.0)
    return shift


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- reproducible bytes


def test_torch_checkpoint_bytes_depend_on_content_only(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(4, 3, generator=g), "step": 7, "nested": {"b": torch.arange(5)}}
    atomic_torch_save(state, tmp_path / "a" / "model.pth")
    atomic_torch_save({k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()},
                      tmp_path / "b" / "model.pth")  # other tensors, other folder, same content
    assert sha256(tmp_path / "a" / "model.pth") == sha256(tmp_path / "b" / "model.pth")
    names = zipfile.ZipFile(tmp_path / "a" / "model.pth").namelist()
    assert all(n.startswith("archive/") for n in names), names  # no temp file name inside the archive
    loaded = torch.load(tmp_path / "a" / "model.pth", weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7
    assert leftovers(tmp_path / "a") == []


def test_torch_bytes_do_not_depend_on_which_string_objects_hold_the_keys(tmp_path):
    loaded_key = "".join(["st", "ep"])  # equal text, but another object than the literal (as after torch.load)
    w = torch.ones(2)
    atomic_torch_save({"optimizer": {"state": {loaded_key: w}}, "step": 3}, tmp_path / "resumed.pt")
    atomic_torch_save({"optimizer": {"state": {"step": w.clone()}}, "step": 3}, tmp_path / "fresh.pt")
    assert sha256(tmp_path / "resumed.pt") == sha256(tmp_path / "fresh.pt")
    sd = torch.nn.BatchNorm1d(2).state_dict()  # an OrderedDict with module versions in _metadata
    atomic_torch_save(sd, tmp_path / "bn.pt")
    assert torch.load(tmp_path / "bn.pt", weights_only=True)._metadata == sd._metadata


def test_npz_bytes_do_not_depend_on_the_time_of_writing(tmp_path, later_clock):
    arrays = {"packed": np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "n": np.int64(3),
              "names": np.asarray(["a", "bc"])}
    for compressed in (False, True):
        atomic_savez(tmp_path / f"a{compressed}.npz", arrays, compressed=compressed)
    later_clock()
    for compressed in (False, True):
        atomic_savez(tmp_path / f"b{compressed}.npz", arrays, compressed=compressed)
        assert sha256(tmp_path / f"a{compressed}.npz") == sha256(tmp_path / f"b{compressed}.npz")
        with np.load(tmp_path / f"b{compressed}.npz", allow_pickle=False) as z:
            assert z.files == ["packed", "n", "names"] and np.array_equal(z["packed"], arrays["packed"])
            assert list(z["names"]) == ["a", "bc"]


def test_npy_text_and_json_writers(tmp_path):
    atomic_save_npy(tmp_path / "x.npy", np.arange(6, dtype=np.uint16))
    assert np.array_equal(np.load(tmp_path / "x.npy"), np.arange(6))  # no '.npy' appended to the temp name
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    atomic_write_json(tmp_path / "b.json", {"a": [1, 2], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    atomic_write_text(tmp_path / "t.txt", "hello\n")
    assert (tmp_path / "t.txt").read_text() == "hello\n" and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- stale temp files


def test_stale_temps_of_dead_processes_go_live_ones_and_other_targets_stay(tmp_path):
    target = tmp_path / "step_0000010.pt"
    dead = dead_pid()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        stale = temp_path(target, dead)
        live = temp_path(target, sleeper.pid)
        other = tmp_path / f".{target.name}.json.{dead}.tmp"   # another target's temp (name extends ours)
        other_live = tmp_path / f".{target.name}.json.{sleeper.pid}.tmp"
        for p in (stale, live, other, other_live):
            p.write_bytes(b"partial")
        atomic_write_text(target, "done")
        assert target.read_text() == "done"
        assert not stale.exists()
        assert live.exists(), "the temp file of a live writer was removed"
        assert other.exists() and other_live.exists(), "a write removed the temp file of another target"
        removed = clean_stale_temps(tmp_path)  # folder-wide cleanup (used on resume): dead owners only
        assert other in removed and not other.exists()
        assert live.exists() and other_live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_temp_name_is_deterministic(tmp_path):
    assert temp_path(tmp_path / "model_ema.safetensors").name == f".model_ema.safetensors.{os.getpid()}.tmp"


# ----------------------------------------------------------------------------- full disk


class FullDiskFile(io.RawIOBase):
    """A binary file whose writes fail with ENOSPC after `room` bytes (the file is really created)."""

    def __init__(self, path, room):
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.room = room

    def writable(self):
        return True

    def write(self, data):
        data = bytes(data)
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def close(self):
        self.f.close()
        super().close()


@pytest.mark.parametrize("writer", ["torch", "npy", "npz", "text"])
def test_enospc_gives_disk_full_naming_the_path_and_leaves_no_temp(tmp_path, monkeypatch, writer):
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        if "w" in mode and "b" in mode:
            return FullDiskFile(path, room=64)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic_io, "open", full_open, raising=False)  # the module's writes hit a full disk
    target = tmp_path / "out" / f"file.{writer}"
    big = np.arange(10_000, dtype=np.int64)
    write = {"torch": lambda: atomic_torch_save({"w": torch.from_numpy(big)}, target),
             "npy": lambda: atomic_save_npy(target, big),
             "npz": lambda: atomic_savez(target, {"a": big}),
             "text": lambda: atomic_write_text(target, "x" * 10_000)}[writer]
    with pytest.raises(DiskFull) as err:
        write()
    assert str(target) in str(err.value) and "no space left" in str(err.value)
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    assert not target.exists() and leftovers(target.parent) == []


def test_other_write_errors_keep_their_type_and_leave_no_temp(tmp_path):
    def failing(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("writer bug")

    with pytest.raises(RuntimeError, match="writer bug"):
        atomic_write(tmp_path / "x.bin", failing)
    assert list(tmp_path.iterdir()) == []


def test_preallocate_turns_enospc_into_disk_full(tmp_path, monkeypatch):
    path = tmp_path / "big.npy"
    path.write_bytes(b"")

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(DiskFull, match="big.npy"):
        preallocate(path, 1 << 20)


def _mount_tmpfs(mount_point: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    mount_point.mkdir()
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                         capture_output=True, text=True)
    return run.returncode == 0


def test_real_full_tmpfs(tmp_path):
    """A real 1 MiB file system: checkpoints, npz and memory-mapped token files end with DiskFull."""
    disk = tmp_path / "small_disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("mounting a tmpfs is not permitted here (needs root and CAP_SYS_ADMIN)")
    try:
        big = torch.zeros(400_000)  # 1.6 MB
        with pytest.raises(DiskFull, match="model.pth"):
            atomic_torch_save({"w": big}, disk / "model.pth")
        with pytest.raises(DiskFull, match="arrays.npz"):
            atomic_savez(disk / "arrays.npz", {"a": big.numpy()})
        # a memory map of a file larger than the disk: DiskFull before the map, never SIGBUS while writing
        code = ("import sys, numpy as np\nfrom libs.data.tokens import open_npy_memmap\n"
                "from libs.errors import DiskFull\n"
                "try:\n    mm = open_npy_memmap(sys.argv[1], np.uint16, (1000, 1000))\n    mm[:] = 7\n"
                "except DiskFull as e:\n    print('DiskFull:', e)\n")
        run = subprocess.run([sys.executable, "-c", code, str(disk / "tokens.npy")], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=120)
        assert run.returncode == 0, f"exit {run.returncode} (-7 is SIGBUS): {run.stderr[-2000:]}"
        assert "DiskFull" in run.stdout and "tokens.npy" in run.stdout
        (disk / "tokens.npy").unlink(missing_ok=True)
        assert leftovers(disk) == []
        atomic_torch_save({"w": torch.zeros(10)}, disk / "small.pth")  # space is back: writes work again
        assert torch.equal(torch.load(disk / "small.pth")["w"], torch.zeros(10))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
