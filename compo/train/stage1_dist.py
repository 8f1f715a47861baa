"""Stage 1 across processes (accelerate: DDP, FSDP, DeepSpeed ZeRO), free of the process count.

A run's global batch (``rows_per_step``: ``batch_size x grad_accum x processes`` when it starts)
is kept in its checkpoints. A step's rows form the same micro-batches of ``stage1.batch_size``
for any number of processes W, and process r takes micro-batches r, r+W, r+2W, ... Each process
accumulates its k micro-batches' gradients with weight 1/k (accelerate's accumulation) and DDP
averages over the W processes, so the update is the mean over all micro-batches, as one process
computes it; only the order of the floating-point sums differs (see docs/scaling.md). Dropout
is seeded per (step, micro-batch), so it depends neither on which process runs a micro-batch
nor on accelerate's per-process RNG files: a checkpoint resumes with any number of processes
that divides its micro-batches per step.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from compo.core.errors import UserError

SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


def rows_per_step(cfg, world: int, state: dict | None = None) -> int:
    """The global batch: a checkpoint's own (so a resume keeps it), else this config's at ``world``."""
    saved = (state or {}).get("rows_per_step")
    return saved if saved is not None else cfg.stage1.batch_size * cfg.stage1.grad_accum * world


def check_rows(path: Path, rows: int, batch_size: int, world: int) -> int:
    """Micro-batches per process for ``rows`` rows per step; a UserError naming the checkpoint
    when ``world`` processes cannot share them evenly."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0 or rows % batch_size:
        raise UserError(str(path), f"'rows_per_step' is {rows!r}, not a positive multiple of "
                        f"stage1.batch_size={batch_size}; the checkpoint is damaged or from another config")
    micro = rows // batch_size
    if micro % world:
        fits = [w for w in range(1, micro + 1) if micro % w == 0]
        raise UserError(str(path), f"the checkpoint's steps hold {rows} rows ({micro} micro-batches of "
                        f"stage1.batch_size={batch_size}), which {world} processes cannot share evenly; "
                        f"resume with {', '.join(map(str, fits))} processes")
    return micro // world


def micro_batches(rows: list[int], batch_size: int, world: int, rank: int) -> list[tuple[int, list[int]]]:
    """(index in the step, rows) of this process's micro-batches of one step's ``rows``."""
    micro = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return [(j, micro[j]) for j in range(rank, len(micro), world)]


def micro_seed(seed: int, step: int, j: int) -> int:
    """The torch seed of micro-batch ``j`` of ``step`` (dropout), the same on any process."""
    return ((seed * 1000003 + step) * 10007 + j) % (1 << 63)


def prepare_accumulation(accelerator, s1, per_rank: int) -> None:
    """Accumulate ``per_rank`` micro-batches per optimizer step (before ``prepare``). Under
    DeepSpeed its config's ``auto`` batch, accumulation and clipping are filled from stage1.*;
    a fixed value that differs is a UserError (DeepSpeed would scale and clip otherwise)."""
    accelerator.gradient_accumulation_steps = per_rank
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, value in (("train_micro_batch_size_per_gpu", s1.batch_size), ("gradient_accumulation_steps", per_rank),
                       ("gradient_clipping", s1.max_grad_norm)):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise UserError(f"deepspeed_config.{key}", f"is {ds[key]!r} but compo's stage 1 runs {value!r} "
                            "(from stage1.batch_size, grad_accum and max_grad_norm): set it to auto")


def register_plain_weights(accelerator) -> None:
    """Checkpoints hold the unwrapped model's tensor names (no DDP ``module.`` prefix), so one
    written by N processes loads into M (FSDP and DeepSpeed save their own formats)."""
    if accelerator.distributed_type in SHARDED:
        return

    def save(models, weights, _out) -> None:
        for i in range(len(weights)):
            weights[i] = OrderedDict(accelerator.unwrap_model(models[i]).state_dict())

    def load(models, input_dir) -> None:
        from safetensors.torch import load_model

        for i, m in enumerate(models):
            name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
            load_model(accelerator.unwrap_model(m), str(Path(input_dir) / name))  # read on the CPU, copied in
        models.clear()  # loaded here

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def full_state_dict(accelerator, model) -> dict | None:
    """Under FSDP / DeepSpeed ZeRO-3 the whole model's weights, gathered (every process calls it;
    rank 0 gets them); None otherwise (the unwrapped model saves itself)."""
    return accelerator.get_state_dict(model) if accelerator.distributed_type in SHARDED else None


def trained_in_shards() -> bool:
    """Whether stage 1 ran under FSDP / DeepSpeed: the in-memory model is sharded (reload model/)."""
    from accelerate.state import AcceleratorState, is_initialized

    return is_initialized() and AcceleratorState().distributed_type in SHARDED


def grad_norm_value(norm) -> float | None:
    """accelerate's clip_grad_norm_ result as a float (None under DeepSpeed: it clips itself)."""
    return None if norm is None else float(norm)


def reduce_mean(values: list[float], accelerator) -> list[float]:
    """Means over processes of per-process means, in float64 (one process: the values as they are)."""
    t = torch.tensor(values, dtype=torch.float64)
    if accelerator.num_processes == 1:
        return t.tolist()
    return accelerator.reduce(t.to(accelerator.device), "mean").cpu().tolist()


def params_finite(model, accelerator) -> bool:
    """Whether every process's weights (its shards, under FSDP) are finite; all processes agree."""
    ok = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())
    if accelerator.num_processes == 1:
        return ok
    bad = accelerator.reduce(torch.tensor([0 if ok else 1], device=accelerator.device), "sum")
    return int(bad.item()) == 0


def sharded_checkpoint(path: Path) -> bool:
    """Whether a stage-1 checkpoint holds FSDP's or DeepSpeed's own model files (not model.safetensors)."""
    return any(Path(path).glob("pytorch_model_fsdp*")) or (Path(path) / "pytorch_model").is_dir()
