"""Start-up checks of what a run directory already holds: the saved split, the finished-stage
marker in model/, and checkpoints (fingerprint, step range, tensor names and shapes).

Every problem is a :class:`~compo.core.errors.CheckpointError` naming the file, raised before any
work; ``--resume`` with a different config refuses (:mod:`compo.core.fingerprint`).
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path


from compo.core import fingerprint
from compo.core.errors import CheckpointError
from compo.core.files import (
    ZO_STATE_KEYS, ZO_TOTAL_KEYS, check_head_file, check_step, check_tensor_file, stage_marker,
)
from compo.core.rundir import read_json, read_jsonl

SPLIT_KEYS = ("logp_chosen", "logp_rejected", "chosen_tokens", "rejected_tokens", "noisy")


def read_split(path: Path, n_pairs: int) -> list[dict]:
    """split.jsonl rows, checked: the required keys, finite numbers, one row per pair."""
    rows = read_jsonl(path, required=SPLIT_KEYS)
    if len(rows) != n_pairs:
        raise CheckpointError(path, f"holds {len(rows)} rows but the data has {n_pairs} usable pairs; "
                              "the file is damaged or from another data set")
    for n, r in enumerate(rows, 1):
        if not isinstance(r["noisy"], bool):
            raise CheckpointError(path, f"line {n}: 'noisy' must be true or false, got {r['noisy']!r}")
        for k in SPLIT_KEYS[:4]:
            v = r[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise CheckpointError(path, f"line {n}: '{k}' must be a finite number, got {v!r}")
    return rows


def _has_artifacts(ws, stage: str) -> bool:
    run = ws.run
    if stage == "split":
        return run.split.exists()
    if stage == "stage1":
        return (run.checkpoints / "stage1").exists() or ws.done_stage in ("stage1", "stage2")
    return (run.checkpoints / "zo").exists() or ws.done_stage == "stage2"


def check_saved_state(ws) -> None:
    """Before the model is loaded: what is finished, what may be reused, and whether a resume fits."""
    run, stages = ws.run, ws.stages
    if run.summary_path.exists():  # every stage merges into it: damage would surface mid-run
        read_json(run.summary_path)
    if run.metrics.exists():  # read back (and truncated) when a stage starts
        read_jsonl(run.metrics)
    marker = stage_marker(run.model) if run.model.exists() else None
    if ws.resume and marker is not None:
        done = marker["stage"]
        if done not in ("stage1", "stage2"):
            raise CheckpointError(run.model / "compo_stage.json", f"unknown stage {done!r}")
        if done in stages:  # `compo zo` starts from model.path: a finished stage1 there is not its own
            ws.done_stage = done
    for stage in stages:
        fp = ws.fingerprints[stage]
        if ws.resume and _has_artifacts(ws, stage):
            diff = fingerprint.check(run, stage, fp, ws.force_resume)
            if diff:
                ws.forced[stage] = diff
    if "split" in stages and run.split.exists():
        same = fingerprint.recorded(run).get("split") == ws.fingerprints["split"] or "split" in ws.forced
        if ws.resume or same:
            ws.saved_split = read_split(run.split, len(ws.encoded.items))
    if ws.resume and "stage2" in stages and ws.done_stage != "stage2":
        _check_zo_state(ws)


def _check_zo_state(ws) -> None:
    d = ws.run.checkpoints / "zo"
    if not d.exists():
        return
    state_path = d / "state.json"
    if not state_path.exists():
        raise CheckpointError(d, "incomplete checkpoint (no state.json); delete the folder to restart stage 2")
    state = read_json(state_path, required=ZO_STATE_KEYS)
    total = None
    if ws.saved_split is not None and ws.cfg.zo.noisy_rule == "paper":
        from compo.zo.trainer import zo_total_steps

        total = zo_total_steps(ws.cfg.zo, sum(r["noisy"] for r in ws.saved_split))
    check_step(state_path, state["step"], 0, total, "stage-2")
    if not isinstance(state["totals"], dict) or any(k not in state["totals"] for k in ZO_TOTAL_KEYS):
        raise CheckpointError(state_path, f"'totals' must hold {', '.join(ZO_TOTAL_KEYS)}")
    if state["seed"] != ws.cfg.seed and not ws.force_resume:
        raise CheckpointError(state_path, f"written with seed {state['seed']}, this run has seed {ws.cfg.seed}")
    if not (d / "head.safetensors").exists():
        raise CheckpointError(d / "head.safetensors", "missing: the checkpoint is incomplete")


def check_checkpoints(ws) -> None:
    """After the model is loaded: checkpoint tensors must fit it."""
    if not ws.resume:
        return
    sd_shapes = {k: tuple(v.shape) for k, v in ws.model.state_dict().items()}
    if ws.done_stage is not None:
        files = sorted(ws.run.model.glob("*.safetensors"))
        files = [f for f in files if f.name != "zo_head_fp32.safetensors"]
        if not files:
            raise CheckpointError(ws.run.model, "holds no *.safetensors weights; the directory is damaged")
        for f in files:
            check_tensor_file(f, sd_shapes, exact=False)
    head = ws.model.get_output_embeddings().weight
    zo_head = ws.run.checkpoints / "zo" / "head.safetensors"
    if "stage2" in ws.stages and ws.done_stage != "stage2" and zo_head.exists():
        check_head_file(zo_head, tuple(head.shape))
    root = ws.run.checkpoints / "stage1"
    if "stage1" in ws.stages and ws.done_stage is None and root.exists():
        from compo.train.stage1 import latest_checkpoint

        last = latest_checkpoint(root)
        if last is None:
            return
        state = read_json(last / "trainer_state.json", required=("step",))
        check_step(last / "trainer_state.json", state["step"], 1, _stage1_total(ws, last / "trainer_state.json", state), "stage-1")
        weights = last / "model.safetensors"
        from compo.train.stage1_dist import sharded_checkpoint

        sharded = sharded_checkpoint(last)  # FSDP / DeepSpeed wrote their own model files (accelerate reads them)
        if not weights.exists() and not sharded:
            raise CheckpointError(weights, "missing: the checkpoint is incomplete")
        from compo.train import lora

        if sharded:
            pass
        elif lora.enabled(ws.cfg):  # a LoRA checkpoint holds the adapter tensors alone
            check_tensor_file(weights, lora.adapter_shapes(ws.model, ws.cfg.stage1.peft))
        else:
            check_tensor_file(weights, sd_shapes, exact=False)
        for f in sorted(last.iterdir()):  # optimizer, scheduler, RNG states: torch.save zip archives
            if f.suffix in (".bin", ".pkl", ".pt") and not zipfile.is_zipfile(f):
                raise CheckpointError(f, "not a complete torch.save archive; the checkpoint is damaged")


def _stage1_total(ws, path: Path, state: dict) -> int | None:
    """Stage 1's optimizer steps for paired losses on the saved split (None: not known yet), at
    the checkpoint's global batch, which this number of processes must be able to share."""
    from compo.core.dist import world_info
    from compo.train.stage1 import PAIRED_LOSSES, step_schedule
    from compo.train.stage1_dist import check_rows, rows_per_step

    world = world_info()[0]
    rows = rows_per_step(ws.cfg, world, state)
    check_rows(path, rows, ws.cfg.stage1.batch_size, world)
    if ws.saved_split is None or ws.cfg.stage1.loss not in PAIRED_LOSSES:
        return None
    n = sum(ws.cfg.stage1.train_on == "all" or not r["noisy"] for r in ws.saved_split)
    return step_schedule(n, ws.cfg, world, rows)[1]
