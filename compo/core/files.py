"""What compo's own files must hold, checked when they are read back: a checkpoint's step range,
safetensors names and shapes, a saved fp32 head, the stage-2 checkpoint's state keys, and the
finished-stage marker in model/. Every problem is a :class:`~compo.core.errors.CheckpointError`
naming the file. The stages read their checkpoints through these; compo.run.checks runs them all
at start-up."""

from __future__ import annotations

from pathlib import Path

import torch

from compo.core.errors import CheckpointError
from compo.core.rundir import describe_exc, read_json

ZO_STATE_KEYS = ("step", "seed", "totals", "m", "radius")
ZO_TOTAL_KEYS = ("steps", "steps_taken", "steps_skipped", "skip_reasons", "sum_frac_minus")
STAGE_FILE = "compo_stage.json"  # inside model/: which stage it holds (swapped in with the weights)


def check_step(path: Path, step, lo: int, hi: int | None, what: str) -> int:
    """A checkpoint's step must be a whole number in [lo, hi] (hi None: not known yet)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < lo or (hi is not None and step > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise CheckpointError(path, f"'step' is {step!r} but this run's {what} steps are {rng}")
    return step


def check_tensor_file(path: Path, expect: dict[str, tuple], exact: bool = True) -> None:
    """Open a safetensors file and check tensor names and shapes. ``exact``: exactly the names of
    ``expect``; otherwise a non-empty subset of them (tied weights are saved once)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = [k for k in expect if k not in keys]
            if (exact and missing) or not keys:
                raise CheckpointError(path, f"missing tensor(s) {', '.join(missing[:3])}; not a checkpoint of this model")
            extra = sorted(keys - set(expect))
            if extra:
                raise CheckpointError(path, f"unexpected tensor(s) {', '.join(extra[:3])}; not a checkpoint of this model")
            for k in keys:
                got = tuple(f.get_slice(k).get_shape())
                if got != tuple(expect[k]):
                    raise CheckpointError(path, f"tensor '{k}' has shape {list(got)}, this model needs {list(expect[k])}")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise CheckpointError(path, f"cannot read the tensors ({describe_exc(e)}); the file is damaged") from None


def check_head_file(path: Path, shape: tuple) -> torch.Tensor:
    """Load a saved fp32 head (``weight``) after checking its name, shape, dtype and values."""
    from safetensors.torch import load_file

    check_tensor_file(path, {"weight": shape})
    w = load_file(str(path))["weight"]
    if w.dtype != torch.float32:
        raise CheckpointError(path, f"the head is {w.dtype}, expected torch.float32")
    if not torch.isfinite(w).all():
        raise CheckpointError(path, "the head holds non-finite values")
    return w


def stage_marker(model_dir: Path) -> dict | None:
    """model/'s finished-stage marker ({"stage": ..., "metrics": ...}), or None without one."""
    p = Path(model_dir) / STAGE_FILE
    return read_json(p, required=("stage",)) if p.exists() else None
