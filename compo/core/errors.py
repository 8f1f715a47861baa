"""compo's error classes and the exit code each maps to.

One error path: anything the user can fix (config, data, checkpoint, run directory, a missing
API key) is a :class:`UserError` and exits 2 with one line ``compo: error: <where>: <what>``;
a run stopped by non-finite numbers exits 3; a run paused at a step boundary (judge budget
spent, the human judge quit) exits 4 and ``--resume`` continues it; anything else is a bug
and exits 1 (tracebacks only with ``--debug``).
"""

from __future__ import annotations

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_DIVERGED, EXIT_PAUSED = 0, 1, 2, 3, 4


def one_line(text: object, limit: int = 400) -> str:
    """Collapse whitespace (wrapped exception texts carry newlines) and cut to ``limit`` chars."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


class CompoError(Exception):
    """Base of compo's own errors; ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_INTERNAL

    def lines(self) -> list[str]:
        return [one_line(self)]


class UserError(CompoError, ValueError):
    """Something the user can fix; ``where`` names the file (row, field) or config key."""

    exit_code = EXIT_USER

    def __init__(self, where: str, what: str):
        self.where, self.what = str(where), one_line(what)
        super().__init__(f"{self.where}: {self.what}")


class CheckpointError(UserError):
    """A checkpoint or run-directory file is unreadable, incomplete or does not fit this run."""


class ResumeMismatch(UserError):
    """``--resume`` with a config / data / model that differs from the run directory's."""


class Diverged(CompoError, RuntimeError):
    """Training produced non-finite values; nothing non-finite was saved."""

    exit_code = EXIT_DIVERGED


class Paused(CompoError):
    """The run stopped cleanly at a step boundary with a checkpoint; ``--resume`` continues."""

    exit_code = EXIT_PAUSED

    def __init__(self, message: str, totals: dict | None = None):
        super().__init__(message)
        self.totals = totals or {}
