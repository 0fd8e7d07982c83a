"""User errors: problems with the user's input that entry scripts report in one line (exit status 2).

Loaders raise `MissingInput` (a file that is not there) or `BadInput` (a file, flag or size that is wrong);
they subclass FileNotFoundError / ValueError so callers that catch those keep working. Anything else is a
bug and keeps its traceback: `libs.cli.run_main`, the wrapper of every entry script's `__main__`, reports
only these.
"""

class UserError(Exception):
    """A problem with the user's input, reported as `error: <message>` without a traceback."""


class MissingInput(UserError, FileNotFoundError):
    """A file the user must provide (weights, graphs, token dataset, statistics) is absent."""


class BadInput(UserError, ValueError):
    """An input file, flag value or size is unusable (unreadable, malformed, mismatched)."""


class DiskFull(UserError, OSError):
    """Writing a file ran out of space (ENOSPC); names the path and, when known, the size needed."""


def one_line(error: BaseException) -> str:
    """The error's message on one line: its lines joined with a space (or '; ' after a line without final
    punctuation)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "".join(line + ("" if i == len(lines) - 1 else " " if line[-1] in ".:;,(" else "; ")
                   for i, line in enumerate(lines))


class NonFiniteValues(RuntimeError):
    """A model's numbers turned NaN/inf (logits while sampling or scoring): the run stops before they become
    output. Not the user's input: entry scripts end it with one line `error: ...` and exit status 1, as a
    diverged training run (train_graph.py)."""
    exit_status = 1
