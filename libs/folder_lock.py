"""One process per output folder: every writer of a folder holds an OS file lock on `<folder>/.ka-mig.lock`.

The lock is `fcntl.flock` (exclusive, non-blocking) on that file. The kernel drops it when the holder's last
descriptor closes, which includes any death of the process (SIGKILL, a crash, a lost node), so a lock is never
stale: a file left behind by a killed run is simply locked again by the next one. A second process that asks
for a held folder fails at once with `FolderBusy`, a one-line user error naming the holder's pid (and host),
which the holder writes into the lock file (information only: the lock itself is the flock).

Within one process the lock is reentrant: asking again for a folder this process holds counts up, and the lock
goes when the last holder releases it. Releasing removes the lock file (while still locked, so no other
process can have taken it) and the folders the lock created if they are still empty, so a run refused by a
later check leaves nothing behind. Under torchrun only the main process (global rank 0) holds the lock; use
`Distributed.on_main(lock.acquire)` so every rank gets its verdict.

The lock file is written in place, not through libs.atomic_io: replacing it by a rename would change the file
the other processes lock.
"""
import errno
import json
import os
import socket
import warnings
import weakref
from pathlib import Path

from libs.errors import BadInput, UserError

LOCK_FILE = ".ka-mig.lock"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # file systems without flock
_OPEN_TRIES = 20  # a releasing holder may remove the file or folder between our open and our lock: try again

_held = {}  # os.path.realpath(folder) -> _Entry of the locks this process holds


class FolderBusy(UserError):
    """Another live process holds the folder's lock (one-line message naming its pid)."""


class _Entry:
    """This process's hold on one folder: the locked descriptor, a count of holders, folders to tidy."""

    def __init__(self, fd, lock_path: Path, created: list):
        self.fd, self.lock_path, self.created = fd, lock_path, created
        self.count, self.pid = 0, os.getpid()


def holder_info(fd) -> dict:
    """{'pid': ..., 'host': ...} read from a lock file's descriptor; {} when unreadable (being written)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    pid = info.get("pid", "unknown")
    host = info.get("host")
    return f"pid {pid}" + (f" on host {host}" if host and host != socket.gethostname() else "")


class FolderLock:
    """The lock of one output folder. `acquire()` raises FolderBusy (another process holds it) or BadInput (the
    folder cannot be created or written); `release()` is idempotent; also a context manager.

    `what` names the folder in messages ("run folder", "--out"); `hint` says what to do instead of waiting
    (e.g. "or choose another --out")."""

    def __init__(self, folder, what: str = "output folder", hint: str = "or write elsewhere"):
        self.folder = Path(folder)
        self.what, self.hint = what, hint
        self.lock_path = self.folder / LOCK_FILE
        self._key = None
        self._finalizer = None

    @property
    def held(self) -> bool:
        """True while this handle holds the lock."""
        return self._finalizer is not None and self._finalizer.alive

    def acquire(self) -> "FolderLock":
        """Takes the lock (creating the folder if needed); returns self."""
        if self.held:
            return self
        key = os.path.realpath(self.folder)
        entry = _held.get(key)
        if entry is None or entry.pid != os.getpid():  # an entry inherited through fork is not ours
            created = self._make_folder()
            try:
                fd = self._open_locked()
            except BaseException:
                _remove_empty(created)
                raise
            entry = _held[key] = _Entry(fd, self.lock_path, created)
            if fd is not None:
                self._write_holder(fd)
        entry.count += 1
        self._key = key
        self._finalizer = weakref.finalize(self, _drop, key)  # also released when this handle is collected
        return self

    def acquire_on_main(self, dist) -> "FolderLock":
        """Acquires on the main process only: `dist.on_main(check)` (libs.distributed.Distributed, the trainer)
        runs it there and raises its FolderBusy / BadInput on every process. Returns self."""
        dist.on_main(self._acquire_no_value)
        return self

    def _acquire_no_value(self):
        self.acquire()  # no return value: what on_main sends to the other processes must pickle

    def release(self):
        """Gives this handle's hold back (the lock goes with the last one in the process)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    # --- helpers

    def _make_folder(self) -> list:
        """Creates the folder (and missing parents); returns those it created, deepest first. BadInput."""
        created = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError as e:
            raise BadInput(f"cannot use {self.what} {self.folder}: it exists and is not a folder") from e
        except OSError as e:
            raise BadInput(f"cannot use {self.what} {self.folder}: cannot create it "
                           f"({e.strerror or type(e).__name__})") from e
        if not self.folder.is_dir():
            raise BadInput(f"cannot use {self.what} {self.folder}: it is not a folder")
        return created

    def _open_locked(self):
        """The descriptor of the locked lock file (None where the file system has no locks)."""
        import fcntl
        for _ in range(_OPEN_TRIES):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except FileNotFoundError:  # a releasing holder removed the (empty) folder it had created
                self._make_folder()
                continue
            except OSError as e:
                raise BadInput(f"cannot use {self.what} {self.folder}: cannot create {self.lock_path.name} "
                               f"there ({e.strerror or type(e).__name__})") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = holder_info(fd)
                os.close(fd)
                raise FolderBusy(f"{self.what} {self.folder} is in use by another process ({_describe(info)}), "
                                 f"which holds {self.lock_path}; wait for it to end (or stop it), "
                                 f"{self.hint}") from None
            except OSError as e:
                os.close(fd)
                if e.errno not in UNSUPPORTED:
                    raise
                warnings.warn(f"{self.folder}: the file system does not support file locks "
                              f"({e.strerror}); nothing stops a second process from writing there")
                return None
            if self._is_current(fd):
                return fd
            os.close(fd)  # we locked a file its holder had just removed: lock the current one
        raise BadInput(f"cannot lock {self.what} {self.folder}: {self.lock_path.name} keeps being replaced")

    def _is_current(self, fd) -> bool:
        """True when `fd` is the file now at lock_path (not one removed after we opened it)."""
        try:
            now, ours = os.stat(self.lock_path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino)

    @staticmethod
    def _write_holder(fd):
        """Records this process in the lock file, for the message a second process prints."""
        data = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError:  # e.g. a full disk: the lock holds all the same, the message says "pid unknown"
            pass


def _drop(key):
    """One holder fewer for folder `key`; the last one removes the lock file and unlocks (this process only)."""
    entry = _held.get(key)
    if entry is None or entry.pid != os.getpid():
        return
    entry.count -= 1
    if entry.count > 0:
        return
    del _held[key]
    if entry.fd is not None:
        try:
            entry.lock_path.unlink()  # still locked: nobody else can hold this file now
        except OSError:
            pass
        os.close(entry.fd)
    _remove_empty(entry.created)


def _remove_empty(folders):
    """Removes the given folders (deepest first) while they are empty."""
    for made in folders:  # folders the lock created, if nothing was written into them
        try:
            made.rmdir()
        except OSError:
            break


def lock_folder(folder, dist=None, what: str = "output folder", hint: str = "or write elsewhere") -> FolderLock:
    """A FolderLock on `folder` held by the main process; with `dist` (libs.distributed.Distributed) every rank
    gets the verdict (FolderBusy / BadInput on all of them). Release it with `.release()` on every rank."""
    lock = FolderLock(folder, what, hint)
    return lock.acquire() if dist is None else lock.acquire_on_main(dist)
