"""Console output: verbosity, messages and progress, readable both on a terminal and in a log file.

One verbosity for the whole process (``--quiet`` / ``--verbose``): :data:`QUIET` keeps warnings
and a command's final line, :data:`NORMAL` adds informational messages and progress,
:data:`VERBOSE` also a progress line per step (off a terminal) and the Hugging Face libraries' own
progress bars (on one). Progress is a tqdm bar when stderr is a terminal; otherwise one plain line
every ``steps`` steps or ``seconds`` seconds plus a closing line, never carriage-return frames.
Messages print on the main process only (``RANK`` 0). Warnings logged by the judges and oracles
(logger ``oracles``) print through :func:`warn` too, as ``warning: ...``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

QUIET, NORMAL, VERBOSE = 0, 1, 2


@dataclass
class _Settings:
    level: int = NORMAL
    steps: int = 0  # off a terminal: a line every N steps (0 = by time alone)
    seconds: float = 30.0  # ... and whenever this long has passed since the last line (0 = by steps alone)


_settings = _Settings()


def set_verbosity(level: int) -> None:
    """QUIET, NORMAL or VERBOSE for everything printed from here on."""
    if level not in (QUIET, NORMAL, VERBOSE):
        raise ValueError(f"verbosity must be {QUIET}, {NORMAL} or {VERBOSE}, got {level!r}")
    _settings.level = level


def verbosity() -> int:
    return _settings.level


def configure(steps: int | None = None, seconds: float | None = None) -> None:
    """How often a progress line is printed off a terminal (``logging.progress_steps/seconds``)."""
    if steps is not None:
        _settings.steps = int(steps)
    if seconds is not None:
        _settings.seconds = float(seconds)


def main_process() -> bool:
    """Whether this is the main process: rank 0 of torch.distributed once it runs, else the
    launcher's ``RANK`` (0 or unset), so messages before the group is joined print once too."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") in ("", "0")


def say(msg: str, level: int = NORMAL) -> None:
    """Print an informational message when the verbosity is at least ``level``."""
    if _settings.level >= level and main_process():
        print(msg, file=sys.stdout, flush=True)


def warn(msg: str) -> None:
    """``warning: msg``, printed at every verbosity (``--quiet`` included)."""
    say(f"warning: {msg}", QUIET)


class _OracleWarnings(logging.Handler):
    """The judges and oracles log their warnings (and non-fatal errors) on the ``oracles``
    logger, which keeps that package free of compo's console; this prints them with
    :func:`warn`, so a run has one warning format on one stream. Records still propagate."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            warn(record.getMessage())
        except Exception:  # noqa: BLE001 - a log line must never break a run
            self.handleError(record)


def _route_oracle_warnings() -> None:
    logger = logging.getLogger("oracles")
    if not any(h.get_name() == "compo.core.progress" for h in logger.handlers):
        handler = _OracleWarnings(logging.WARNING)
        handler.set_name("compo.core.progress")
        logger.addHandler(handler)


_route_oracle_warnings()  # on import: every compo entry point imports this module


def result(msg: str) -> None:
    """A command's final line, printed at every verbosity."""
    say(msg, QUIET)


def interactive() -> bool:
    """Whether progress can redraw in place: stderr (where tqdm draws) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def library_bars() -> None:
    """The Hugging Face libraries draw their own bars (loading weights, saving shards, datasets'
    map): shown only under ``--verbose`` on a terminal, so a log file never gets their frames."""
    import huggingface_hub.utils as hub
    import transformers.utils.logging as tf

    show = _settings.level >= VERBOSE and interactive()
    (tf.enable_progress_bar if show else tf.disable_progress_bar)()
    (hub.enable_progress_bars if show else hub.disable_progress_bars)()
    if "datasets" in sys.modules:
        import datasets

        (datasets.enable_progress_bars if show else datasets.disable_progress_bars)()
    elif not show:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported


# ---------------------------------------------------------------- progress


class _Bar:
    """What every progress object offers: iteration and tqdm's ``set_postfix``."""

    def __init__(self, iterable: Iterable):
        self.iterable = iterable
        self.postfix: dict[str, object] = {}

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def set_postfix(self, ordered_dict: dict | None = None, **fields) -> None:
        self.postfix = {**(ordered_dict or {}), **fields}

    def close(self) -> None:
        pass


class _TqdmBar(_Bar):
    def __init__(self, iterable: Iterable, desc: str, total: int | None, initial: int, unit: str, transient: bool):
        from tqdm.auto import tqdm

        super().__init__(iterable)
        self.bar = tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, leave=not transient,
                        dynamic_ncols=True)

    def __iter__(self) -> Iterator:
        return iter(self.bar)

    def set_postfix(self, ordered_dict: dict | None = None, **fields) -> None:
        self.bar.set_postfix(ordered_dict, **fields)

    def close(self) -> None:
        self.bar.close()


def duration(s: float) -> str:
    """A short wall time: 42s, 3m05s, 2h07m."""
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


class LineBar(_Bar):
    """Progress as plain lines: one every ``steps`` steps or ``seconds`` seconds and one at the end.

    ``transient`` bars (short inner loops such as scoring) print only when they ran long enough
    to print an intermediate line, so quick ones leave no trace."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None = None, initial: int = 0, unit: str = "it",
                 transient: bool = False, steps: int = 0, seconds: float = 30.0, out: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(iterable)
        if total is None and hasattr(iterable, "__len__"):
            total = initial + len(iterable)  # type: ignore[arg-type]
        self.desc, self.total, self.initial, self.unit, self.transient = desc, total, initial, unit, transient
        self.steps, self.seconds, self.clock = steps, seconds, clock
        self.out = out or (lambda line: say(line, QUIET))
        self.n = initial
        self.printed = 0

    def __iter__(self) -> Iterator:
        t0 = last = self.clock()
        for x in self.iterable:
            yield x
            self.n += 1
            now = self.clock()
            if self.total is not None and self.n >= self.total:
                continue  # the closing line follows
            by_steps = self.steps > 0 and self.n % self.steps == 0
            by_time = self.seconds > 0 and now - last >= self.seconds
            if by_steps or by_time:
                self.out(self.line(now - t0))
                self.printed += 1
                last = now
        if self.printed or not self.transient:
            self.out(self.line(self.clock() - t0, final=True))

    def line(self, elapsed: float, final: bool = False) -> str:
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        pos = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        speed = (f"{rate:.2f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}") if rate > 0 else ""
        if final:
            timing = f"done in {duration(elapsed)}" + (f", {speed}" if speed else "")
        else:
            left = f", ~{duration((self.total - self.n) / rate)} left" if self.total and rate > 0 else ""
            timing = f"{duration(elapsed)} elapsed" + (f", {speed}" if speed else "") + left
        info = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return f"{self.desc}: {pos}{pct} {timing}" + (f" | {info}" if info else "")


def bar(iterable: Iterable, desc: str, total: int | None = None, initial: int = 0, unit: str = "it",
        transient: bool = False, enabled: bool = True) -> _Bar:
    """Progress over ``iterable``: tqdm on a terminal, :class:`LineBar` otherwise, nothing under
    ``--quiet``, off a main process or with ``enabled=False``. ``initial``/``total`` place a
    resumed loop (``range(start, total)``) at its real position."""
    if not enabled or _settings.level <= QUIET or not main_process():
        return _Bar(iterable)
    if interactive():
        return _TqdmBar(iterable, desc, total, initial, unit, transient)
    steps = 1 if _settings.level >= VERBOSE and not transient else _settings.steps
    return LineBar(iterable, desc, total, initial, unit, transient, steps, _settings.seconds)
