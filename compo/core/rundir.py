"""The run directory contract, atomic file writes (temp file + rename: nothing half-written)
and readers that turn a damaged run-directory file into an error naming that file."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from compo.core.errors import CheckpointError, Diverged, one_line

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
STAGE_ORDER = {"stage1": 1, "stage2": 2}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask_by_setting() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_by_setting()  # import time is single-threaded: setting and restoring is safe then


def _umask() -> int:
    """The process umask, read without changing it (Linux /proc/self/status), so a file another
    thread creates meanwhile never gets a wrong mode; elsewhere the umask compo was imported with.
    A temp file (mkstemp: 0600, mkdtemp: 0700) is given ``0o666 & ~umask`` (``0o777`` for a
    directory) before it is renamed, the mode an ordinary ``open`` would have given it."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as JSON; a NaN / inf in it (JSON has none) is :class:`Diverged` naming the file
    and the keys, and nothing is written."""
    bad = non_finite_keys(obj)
    if bad:
        raise Diverged(f"{path}: not written: non-finite {first_few(bad)}")
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def json_line(record: dict) -> str:
    """One strict JSON line: a non-finite number becomes null (bare NaN / Infinity are not JSON)."""
    return json.dumps(_finite_or_null(record), ensure_ascii=False, allow_nan=False) + "\n"


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json_line(r) for r in rows))


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise CheckpointError(path, "is a directory, expected a file") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CheckpointError(path, f"line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); "
                                    "the file is damaged") from None


def _require(path: Path, obj: Any, required: Iterable[str], where: str = "") -> dict:
    """``obj`` must be a JSON object holding ``required``; ``where`` prefixes the message (a line)."""
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"{where}expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(path, f"{where}missing key(s) {', '.join(missing)}; the file is damaged or from another tool")
    return obj


def read_json(path: str | Path, required: Iterable[str] = ()) -> dict:
    """A JSON object from a run-directory file; any damage is a CheckpointError naming it."""
    path = Path(path)
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"not valid JSON (line {e.lineno}: {e.msg}); the file is damaged") from None
    return _require(path, obj, required)


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict]:
    """JSON lines from a run-directory file; a bad line is a CheckpointError naming file and line."""
    path, required = Path(path), tuple(required)
    rows = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CheckpointError(path, f"line {n}: not valid JSON ({e.msg}); the file is damaged") from None
        rows.append(_require(path, row, required, f"line {n}: "))
    return rows


def _umask_modes(root: Path) -> None:
    """Give ``root`` and everything in it the modes an ordinary ``open`` / ``mkdir`` would have:
    ``mkdtemp`` makes ``root`` 0700, and some writers (safetensors) create their files 0600.
    Executable bits a writer set are kept (as far as the umask allows)."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        mode = stat.S_IMODE(p.stat().st_mode)
        os.chmod(p, (0o777 if p.is_dir() else 0o666 | (mode & 0o111)) & ~mask)


def atomic_save_dir(target: str | Path, save: Callable[[Path], Any]) -> None:
    """Call ``save(tmp_dir)`` then swap the directory into place, so ``target`` is always whole.

    Between the two renames a kill leaves ``.<name>.old`` and no ``<name>``:
    :meth:`RunDir.clean_leftovers` puts the old one back.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX))
    try:
        save(tmp)
        _swap_in(target, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(target: Path, tmp: Path) -> None:
    _umask_modes(tmp)
    old = target.with_name(f".{target.name}{OLD_SUFFIX}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    from compo.core import faults

    faults.point(f"swap.{target.name}")
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def atomic_save_dir_all(target: str | Path, save: Callable[[Path], Any]) -> None:
    """:func:`atomic_save_dir` for a directory every process writes into (accelerate's
    ``save_state``: sharded model and optimizer states, one RNG file per process). Rank 0 makes
    the temp directory (its name is broadcast) and swaps it in once every process has written;
    the run directory must be on a file system all processes share."""
    from compo.core.dist import barrier, broadcast_object, world_info

    world, rank = world_info()
    if world == 1:
        atomic_save_dir(target, save)
        return
    target = Path(target)
    tmp = None
    if rank == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX)
    tmp = Path(broadcast_object(tmp))
    try:
        save(tmp)
        barrier()
        if rank == 0:
            _swap_in(target, tmp)
        barrier()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_writer() -> bool:
    """Whether this process writes the run directory: the main process (see compo.core.progress)."""
    from compo.core.progress import main_process

    return main_process()


def clean_dir_leftovers(folder: Path, restore_only: bool = False) -> list[str]:
    """Remove the temp files / dirs of interrupted atomic writes in ``folder``; restore a
    ``.<name>.old`` whose replacement never arrived (only that with ``restore_only``)."""
    done = []
    if not folder.is_dir():
        return done
    for p in sorted(folder.iterdir()):
        if not p.name.startswith("."):
            continue
        if restore_only and not (p.name.endswith(OLD_SUFFIX) and not p.with_name(p.name[1 : -len(OLD_SUFFIX)]).exists()):
            continue
        if p.name.endswith(TMP_SUFFIX):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            done.append(f"removed {p}")
        elif p.name.endswith(OLD_SUFFIX):
            live = p.with_name(p.name[1 : -len(OLD_SUFFIX)])
            if live.exists():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                done.append(f"removed {p}")
            else:
                os.replace(p, live)
                done.append(f"restored {live} from an interrupted swap")
    return done


class RunDir:
    """Paths of one run: config.yaml, split.jsonl, metrics.jsonl, summary.json, reference/, model/.

    Nothing is created until something is written, so a run that fails validation leaves no trace.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.trackers = None  # compo.core.tracking.Trackers while a command reports to trackers (report_to)

    config = property(lambda self: self.root / "config.yaml")
    split = property(lambda self: self.root / "split.jsonl")
    eval_scores = property(lambda self: self.root / "eval_scores.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    summary_path = property(lambda self: self.root / "summary.json")
    fingerprint = property(lambda self: self.root / "fingerprint.json")
    reference = property(lambda self: self.root / "reference")
    model = property(lambda self: self.root / "model")
    checkpoints = property(lambda self: self.root / "checkpoints")

    def log(self, record: dict) -> None:
        """Append one metrics record (one JSON object per line, flushed); trackers get it too.
        The methods that write (this, summary, metrics, checkpoints, leftovers) do nothing on a
        process other than rank 0 (see :func:`is_writer`)."""
        if not is_writer():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json_line(record))
            f.flush()
        if self.trackers is not None:
            self.trackers.log(record)

    def summary(self) -> dict:
        return read_json(self.summary_path) if self.summary_path.exists() else {}

    def update_summary(self, **fields: Any) -> dict:
        """Merge ``fields`` into summary.json; a non-finite number is written as null, never NaN."""
        s = self.summary()
        s.update(fields)
        if is_writer():
            atomic_write_json(self.summary_path, _finite_or_null(s))
        return s

    def truncate_metrics(self, stage: str, upto_step: int) -> int:
        """Keep the records of earlier stages and of ``stage`` up to ``upto_step``; drop the rest
        (a resumed stage then logs each step exactly once); the trackers are rewound to match
        (see compo.core.tracking). Returns the number dropped."""
        if not is_writer() or not self.metrics.exists():
            return 0
        order = STAGE_ORDER[stage]
        rows = read_jsonl(self.metrics)
        keep = [r for r in rows if STAGE_ORDER.get(r.get("stage"), 0) < order
                or (r.get("stage") == stage and isinstance(r.get("step"), int) and r["step"] <= upto_step)]
        if len(keep) != len(rows):
            write_jsonl(self.metrics, keep)
            if self.trackers is not None:
                self.trackers.rewind(keep)
        return len(rows) - len(keep)

    def drop_checkpoints(self, name: str) -> None:
        """Remove a finished stage's checkpoints (and checkpoints/ when nothing is left in it)."""
        if not is_writer():
            return
        shutil.rmtree(self.checkpoints / name, ignore_errors=True)
        try:
            self.checkpoints.rmdir()
        except OSError:
            pass

    def clean_leftovers(self, restore_only: bool = False) -> list[str]:
        """Temp entries of interrupted writes in the run dir and its checkpoint folders.

        ``restore_only``: just roll back interrupted directory swaps (done before the run dir is
        read, so what it holds is what the last finished write left)."""
        done = []
        if not is_writer():
            return done
        for folder in (self.root, self.checkpoints, self.checkpoints / "stage1"):
            done += clean_dir_leftovers(folder, restore_only)
        return done


def check_run_dir(path: str | Path) -> None:
    """The run directory must be a directory (or not exist yet) under a writable parent."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CheckpointError(p, "the run directory exists and is not a directory")
    parent = p if p.exists() else next((q for q in p.absolute().parents if q.exists()), None)
    if parent is None or not parent.is_dir():
        raise CheckpointError(p, f"cannot create the run directory: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(p, f"the run directory is not writable ({parent})")


def non_finite_keys(obj: Any, where: str = "") -> list[str]:
    """Dotted paths of the non-finite floats in a JSON-like ``obj`` (``[i]`` for list items)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return [where or "value"]
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in non_finite_keys(v, f"{where}.{key}" if where else str(key))]
    if isinstance(obj, (list, tuple)):
        return [k for i, v in enumerate(obj) for k in non_finite_keys(v, f"{where}[{i}]")]
    return []


def first_few(names: list[str], n: int = 3) -> str:
    """``a, b, c, ...``: the first ``n`` of ``names``, for a one-line message."""
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def describe_exc(e: BaseException) -> str:
    """``Type: message`` on one line, for wrapping a library's exception."""
    return one_line(f"{type(e).__name__}: {e}", 240)
