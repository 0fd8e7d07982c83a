"""Command-line helpers of the entry scripts: one-line user errors, flag errors, early output checks.

`run_main(main)` ends a user error (libs.errors) with one line `error: ...` on stderr and exit status 2; a flag
error (unknown option, bad value, unknown --config.* key) of `ArgumentParser` does the same. Values that turned
NaN/inf (libs.errors.NonFiniteValues) end with one line and exit status 1.
"""
import argparse
import os
import sys
from pathlib import Path

from libs.errors import BadInput, NonFiniteValues, UserError, one_line


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors print one line `error: <prog>: <message>` (no usage block) and exit with status 2."""

    def error(self, message):
        print(f"error: {self.prog}: {one_line(message)} (see --help)", file=sys.stderr)
        sys.exit(2)


def _probe_folder(folder: Path, what: str):
    """Checks that a file can be created in `folder` (BadInput if not); folders made for the check are removed."""
    created = [p for p in [folder, *folder.parents] if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise BadInput(f"cannot write {what}: {folder} exists and is not a folder") from e
    except OSError as e:
        blocker = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)  # a file in the way
        reason = f"{blocker} is a file, not a folder" if blocker else e.strerror or type(e).__name__
        raise BadInput(f"cannot write {what}: cannot create the folder {folder} ({reason})") from e
    if not folder.is_dir():
        raise BadInput(f"cannot write {what}: {folder} is not a folder")
    probe = folder / f".write_probe.{os.getpid()}.tmp"
    try:
        with open(probe, "wb") as f:
            f.write(b"0")
    except OSError as e:
        raise BadInput(f"cannot write {what}: the folder {folder} is not writable "
                       f"({e.strerror or type(e).__name__})") from e
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
        for made in created:  # a failed run leaves no empty output folders behind
            try:
                made.rmdir()
            except OSError:
                break


def same_file(a, b) -> bool:
    """True when paths `a` and `b` name one file: the same resolved path, or (both existing) a link to it."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_writable(*paths, folders=()):
    """Checks, before any expensive work, that each file in `paths` can be written (its folder exists or can be
    made and accepts new files; the path itself is not a folder) and that each of `folders` can hold files."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            raise BadInput(f"cannot write {path}: it is a folder")
        _probe_folder(path.parent, str(path))
    for folder in folders:
        _probe_folder(Path(folder), f"into {folder}")


def run_main(main, argv=None):
    """sys.exit(main(argv)); a UserError ends with one line `error: ...` on stderr and exit status 2, values that
    turned NaN/inf (NonFiniteValues) with one line and exit status 1."""
    try:
        status = main(argv)
    except UserError as e:
        if not getattr(e, "reported_elsewhere", False):  # a verdict rank 0 printed already (torchrun)
            print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteValues as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(e.exit_status)
    sys.exit(status if isinstance(status, int) else 0)
