"""Stage-2 checkpoints: the fp32 master head with the step, seed and totals, one directory swap."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from compo.core import faults
from compo.core.rundir import atomic_save_dir, atomic_write_json, read_json


def save_head(ckpt_dir: Path, w: torch.Tensor, step: int, seed: int, totals: dict, m: int, radius: float) -> None:
    """Write ``ckpt_dir`` (head.safetensors + state.json) whole or not at all."""

    def save(tmp: Path) -> None:
        save_file({"weight": w.contiguous().cpu()}, str(tmp / "head.safetensors"))
        faults.point("zo.checkpoint")
        atomic_write_json(tmp / "state.json", {"step": step, "seed": seed, "totals": totals, "m": m, "radius": radius})

    atomic_save_dir(ckpt_dir, save)


def load_head(ckpt_dir: Path, shape: tuple[int, ...], total: int) -> tuple[int, dict, torch.Tensor]:
    """(step, totals, fp32 head) from ``ckpt_dir``, checking the step range, the shape and the values."""
    from compo.core.files import ZO_STATE_KEYS, check_head_file, check_step

    state = read_json(ckpt_dir / "state.json", required=ZO_STATE_KEYS)
    step = check_step(ckpt_dir / "state.json", state["step"], 0, total, "stage-2")
    return step, state["totals"], check_head_file(ckpt_dir / "head.safetensors", shape)
