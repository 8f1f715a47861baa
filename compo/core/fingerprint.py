"""What determines a stage's result, recorded in the run directory and checked on ``--resume``.

A stage's fingerprint is a flat ``{key: value}`` dict: the config keys that can change its
result (output-only keys and judge runtime limits such as ``max_calls`` are left out, so a
budget can be raised on resume), the SHA-256 of the data files, the model's identity and the
compo version. Each stage inherits the keys of the stages before it, so a change upstream
(other data, another split) also refuses a resume downstream.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import compo
from compo.core.config import RunConfig
from compo.core.errors import ResumeMismatch
from compo.core.redact import redact, secret_key
from compo.core.rundir import RunDir, atomic_write_json, read_json

#: Keys that change what is written or logged, never the numbers.
OUTPUT_ONLY = {"run_dir", "stage1.enabled", "zo.enabled", "stage1.logging_steps", "stage1.save_steps",
               "zo.checkpoint_every", "zo.track_pairs", "zo.agreement_stats"}
#: Judge / oracle options that limit or route a run without changing any answer.
RUNTIME_OPTIONS = {"max_calls", "max_tokens_total", "max_concurrency", "timeout", "max_retries", "cache_path",
                   "api_key_env", "api_key_file", "fail_fast", "retry_initial", "retry_max_wait",
                   "max_retry_after", "record_path", "stream", "input_stream", "output_stream",
                   "host", "port", "width", "min_columns_width", "max_bad_answers"}
SCOPES = {"split": ("seed", "model.", "data.", "split."), "stage1": ("stage1.",), "stage2": ("zo.",)}
_HEAD = 1 << 20
#: Stage-1 settings the brief DPO of ``split.score: stage1`` uses (so they belong to the split too).
BRIEF_STAGE1 = tuple(f"stage1.{k}" for k in ("beta", "learning_rate", "weight_decay", "warmup_ratio", "batch_size",
                                             "grad_accum", "max_grad_norm", "group_by_length", "mixed_precision",
                                             "peft"))
#: What reference log-probs depend on: the split's keys less the noise and the split rule.
REFERENCE_SCOPE = ("seed", "model.", "data.", "split.reference", "split.batch_size", "compo_version")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _file_digest(path: Path, full: bool = True) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if full or size <= 4 * _HEAD:
            for block in iter(lambda: f.read(_HEAD), b""):
                h.update(block)
        else:  # weights: size plus first and last MiB (a full hash of 14 GB at every start is too slow)
            h.update(f.read(_HEAD))
            f.seek(size - _HEAD)
            h.update(f.read(_HEAD))
    return f"{size}:{h.hexdigest()[:32]}"


@functools.lru_cache(maxsize=256)
def _cached_file_digest(path: Path, full: bool, size: int, mtime_ns: int) -> str:
    return _file_digest(path, full)


def _digest(path: Path, full: bool) -> str:
    """:func:`_file_digest`, cached by (resolved path, size, mtime)."""
    st = path.stat()
    return _cached_file_digest(path.resolve(), full, st.st_size, st.st_mtime_ns)


def path_digest(path: str, full: bool = True) -> str:
    """Digest of a file, or of every file below a directory; the name itself when not local.

    A file's digest is cached by (path, size, mtime), so a study's many cells hash its data once."""
    p = Path(os.path.expanduser(path))
    if p.is_file():
        return _digest(p, full)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
            h.update(f"{f.relative_to(p)}={_digest(f, full)};".encode())
        return h.hexdigest()[:32]
    return f"name:{path}"


def current(cfg: RunConfig, stage: str, after_stage1: bool = False) -> dict[str, Any]:
    """The fingerprint of ``stage`` ("split", "stage1", "stage2") for this config."""
    flat = {k: v for k, v in flatten(cfg.model_dump(mode="json")).items()
            if k not in OUTPUT_ONLY and not (".options." in k and k.rsplit(".", 1)[-1] in RUNTIME_OPTIONS)}
    scopes = SCOPES["split"] + (SCOPES["stage1"] if stage == "stage1" or (after_stage1 and stage == "stage2")
                                else ()) + (SCOPES["stage2"] if stage == "stage2" else ())
    fp = {k: v for k, v in flat.items() if k == "seed" or k.startswith(scopes)}
    if flat.get("split.score") == "stage1":  # the split's brief DPO trains with these stage-1 settings
        fp.update({k: v for k, v in flat.items() if k.startswith(BRIEF_STAGE1)})
    fp["compo_version"] = compo.__version__
    for key in ("data.path", "data.eval_path"):
        if flat.get(key) and flat[key] != "toy":
            fp[f"{key}#sha256"] = path_digest(flat[key])
    for key in ("model.path", "split.reference"):
        if flat.get(key) and flat[key] != "toy":
            fp[f"{key}#identity"] = path_digest(flat[key], full=False)
    return redact(fp)  # recorded in run directories and study cells: no API key or URL credential


def digest(fp: dict, length: int = 16) -> str:
    """A short, order-independent hash of a fingerprint dict (names and keys of shared work)."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:length]


def reference_key(cfg: RunConfig) -> str:
    """A short hash of what the reference log-probs of the training and held-out pairs depend on
    (model, data, length policy, seed; not the injected noise or the split rule): runs with the
    same key can share those scores (a study's noise rates do)."""
    return digest({k: v for k, v in current(cfg, "split").items()
                   if k.startswith(REFERENCE_SCOPE) and not k.startswith("data.noise.")})


def merged(fps: Iterable[dict]) -> dict[str, Any]:
    """One flat dict of several stages' fingerprints (later stages repeat earlier keys unchanged)."""
    out: dict[str, Any] = {}
    for fp in fps:
        out.update(fp)
    return out


def recorded(run: RunDir) -> dict[str, dict]:
    return read_json(run.fingerprint) if run.fingerprint.exists() else {}


ORDER = ("split", "stage1", "stage2")


def record(run: RunDir, stage: str, fp: dict | None) -> None:
    """Remember the fingerprint a stage was started with (None: forget it). Later stages are
    forgotten too: they were computed from what this stage is about to replace."""
    allfp = recorded(run)
    for s in ORDER[ORDER.index(stage):]:
        allfp.pop(s, None)
    if fp is not None:
        allfp[stage] = fp
    atomic_write_json(run.fingerprint, allfp)


#: Keys whose default changed after they first existed: a record without the key was made when
#: the option did not exist, so it ran with the value here (zo.rng: torch's stream was the only
#: one until Philox became the default).
RECORDED_BEFORE = {"zo.rng": "torch"}


@functools.cache
def _defaults() -> dict[str, Any]:
    return {**flatten(RunConfig().model_dump(mode="json")), **RECORDED_BEFORE}


def differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ; a key that only one side has counts as at its default there
    (a run recorded before an option existed ran with the option's default then:
    :data:`RECORDED_BEFORE`, else today's). Secret keys are
    not compared (they are recorded as ``***``; a rotated API key changes no answer)."""
    dflt = _defaults()
    return sorted(k for k in set(old) | set(new)
                  if not secret_key(k) and old.get(k, dflt.get(k)) != new.get(k, dflt.get(k)))


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def describe(diff: list[str], old: dict, new: dict, limit: int = 6) -> str:
    """``key: old -> new; ...`` for the first ``limit`` differing keys."""
    shown = "; ".join(f"{k}: {_show(old.get(k, '(unset)'))} -> {_show(new.get(k, '(unset)'))}" for k in diff[:limit])
    return shown + (f" and {len(diff) - limit} more" if len(diff) > limit else "")


def check(run: RunDir, stage: str, fp: dict, force: bool) -> list[str]:
    """Refuse to continue ``stage`` from this run dir when its recorded fingerprint differs.

    Returns the differing keys (non-empty only with ``force``)."""
    old = recorded(run).get(stage)
    if old is None:
        if force:
            return ["(no fingerprint recorded)"]
        raise ResumeMismatch(run.fingerprint, f"--resume: the run directory has {stage} results but no "
                             f"recorded fingerprint for them (made by an older compo?); --force-resume continues anyway")
    diff = differences(old, fp)
    if diff and not force:
        raise ResumeMismatch(run.fingerprint, f"--resume would continue {stage} of another run: {describe(diff, old, fp)}; "
                             "use a new --run-dir, drop --resume to start over, or --force-resume")
    return diff
