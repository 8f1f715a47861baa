"""Orchestration: load -> normalise -> tokenize -> log-probs -> split -> train -> evaluate.

Each command (split, train, zo, pipeline) is a thin function over the pure pieces; all of
them read and write the same run directory (see compo/core/rundir.py).
"""

from __future__ import annotations

import time

import torch

from compo.core import fingerprint
from compo.core.config import RunConfig
from compo.core.dist import world_info
from compo.core.errors import UserError
from compo.core.files import stage_marker
from compo.core.rundir import is_writer
from compo.run.heldout import evaluate, fmt_metrics, paired_effect, saved_eval
from compo.run.split_stage import SplitResult, run_split
from compo.run.workspace import Workspace, say
from compo.scoring.logprobs import score_pairs
from compo.run.workspace import open_workspace as _open


def open_workspace(cfg: RunConfig, command: str = "pipeline", resume: bool = False,
                   force_resume: bool = False) -> Workspace:
    """Validate everything ``command`` will use, load the model (see compo/run/workspace.py); start
    the ``report_to`` trackers (their packages are checked first, before any work). Under
    torchrun this process joins the process group first (docs/scaling.md)."""
    from compo.core import progress, tracking
    from compo.core.dist import init_distributed, leave_distributed
    from compo.scoring.models import check_device

    tracking.check(cfg)
    progress.configure(cfg.logging.progress_steps, cfg.logging.progress_seconds)
    progress.library_bars()
    owns = init_distributed(check_device(cfg.model.device))
    try:
        ws = _open(cfg, command, resume, force_resume)
    except BaseException:
        if owns:
            leave_distributed()
        raise
    ws.owns_group = owns
    try:
        tracking.attach(ws.run, cfg, cpu=next(ws.model.parameters()).device.type == "cpu")
    except BaseException:
        ws.close()
        raise
    return ws


# ---------------------------------------------------------------- stage 1


def run_stage1(ws: Workspace, split: SplitResult | None, resume: bool = False) -> dict:
    """Stage 1 on the clean pairs (or all, per stage1.train_on); saves run_dir/model."""
    from compo.train.stage1 import PAIRED_LOSSES, Stage1Data, paired_objective, train_stage1

    cfg = ws.cfg
    if not (resume and (ws.run.checkpoints / "stage1").exists()) and is_writer():  # a fresh stage 1: stage 2's old state is void
        fingerprint.record(ws.run, "stage1", ws.fingerprints.get("stage1") or fingerprint.current(cfg, "stage1"))
        ws.run.drop_checkpoints("zo")
    if cfg.stage1.loss not in PAIRED_LOSSES:
        from compo.train.stage1_unpaired import run_unpaired_stage1

        return run_unpaired_stage1(ws, split, resume)
    if split is None:
        from compo.train.stage1_unpaired import paired_data_message

        raise UserError("stage1.loss", paired_data_message(cfg.stage1.loss, cfg.data.path))
    idx = split.train_indices(cfg.stage1.train_on)
    items = [split.encoded.items[i] for i in idx]
    ref = torch.stack([split.scores.chosen[idx], split.scores.rejected[idx]], dim=1)
    if cfg.split.reference:
        ref_scores = score_pairs(ws.model, items, ws.pad_id, cfg.split.batch_size, desc="policy-reference log-probs",
                                 distributed=True, shared=cfg.model.share_prompt)
        ref = torch.stack([ref_scores.chosen, ref_scores.rejected], dim=1)
    say(f"stage1: {cfg.stage1.loss} on {len(items)} {cfg.stage1.train_on} pairs")
    t0 = time.time()
    final = train_stage1(ws.model, ws.tokenizer, Stage1Data(items, ref), cfg, ws.run,
                         paired_objective(cfg, ws.pad_id), resume=resume)
    from compo.train.stage1_dist import trained_in_shards

    if trained_in_shards():  # FSDP / ZeRO-3 left the in-memory model in shards: go on with model/
        from compo.scoring.models import load_pretrained

        ws.model, _ = load_pretrained(str(ws.run.model), cfg)
    final["wall_s"] = round(time.time() - t0, 2)
    if ws.forced.get("stage1"):
        final["forced_resume"] = ws.forced["stage1"]
    ws.run.update_summary(stage1=final, model_stage="stage1")
    return final


# ---------------------------------------------------------------- evaluation


def run_pipeline(cfg: RunConfig, resume: bool = False, force_resume: bool = False) -> dict:
    """split -> stage 1 -> stage 2 -> evaluation, all into cfg.run_dir; returns summary.json."""
    t0 = time.time()
    ws = open_workspace(cfg, "pipeline", resume, force_resume)
    try:
        return _pipeline(ws, t0)
    except BaseException:  # a paused or failed session's time still counts toward a --resume's wall_s
        if world_info()[1] == 0:
            try:
                ws.run.update_summary(**session_wall(ws, t0))
            except Exception:  # noqa: BLE001 - never hide the error that ended the run
                pass
        raise
    finally:
        ws.close()


def session_wall(ws: Workspace, t0: float) -> dict:
    """``wall_s`` over the run's sessions: ``--resume`` keeps the earlier sessions' seconds
    (``wall_s_sessions``, one per invocation that ended: finished, paused or failed) and adds this
    one's; a run without ``--resume`` starts the list anew."""
    prior = ws.run.summary() if ws.resume else {}
    sessions = list(prior.get("wall_s_sessions") or ([prior["wall_s"]] if "wall_s" in prior else []))
    sessions.append(round(time.time() - t0, 2))
    return {"wall_s": round(sum(sessions), 2), "wall_s_sessions": sessions}


def _resume_finished(ws: Workspace) -> str | None:
    """Load model/ when it holds a finished stage this run may skip; tidy that stage's leftovers."""
    done = ws.done_stage
    if done is None:
        return None

    from compo.scoring.models import load_pretrained

    ws.model, _ = load_pretrained(str(ws.run.model), ws.cfg)
    marker = stage_marker(ws.run.model) or {}
    for name in ("zo", "stage1") if done == "stage2" else ("stage1",):
        ws.run.drop_checkpoints(name)
    if marker.get("metrics") and ws.run.summary().get("model_stage") != done:
        ws.run.update_summary(**{done: marker["metrics"]}, model_stage=done)
    say(f"resume: {ws.run.model} holds the finished {done}; not running it again")
    return done


def _pipeline(ws: Workspace, t0: float) -> dict:
    cfg = ws.cfg
    s1 = None
    split = run_split(ws) if ws.kind == "paired" else None
    if split is None:
        say("split: skipped (unpaired data has no chosen/rejected margin; see README 'Unpaired data')")
    before, ref_eval = evaluate(ws, label="reference", reuse=ws.saved_split is not None)
    evals = {"reference": before}
    if before:
        say(f"eval reference: {fmt_metrics(before)}")
    done = _resume_finished(ws)
    if cfg.stage1.enabled and done is None:
        run_stage1(ws, split, ws.resume)
    if cfg.stage1.enabled and done == "stage2":
        evals["stage1"] = ws.run.summary().get("eval", {}).get("stage1", {})
        s1 = saved_eval(ws, "stage1", [ws.eval[it.index].source for it in ws.encode(ws.eval).items]) if ws.eval else None
    elif cfg.stage1.enabled:
        evals["stage1"], s1 = evaluate(ws, ref_eval, "stage1", reuse=done == "stage1")
        say(f"eval after stage1: {fmt_metrics(evals['stage1'])}")
        ws.run.update_summary(eval=evals)
    if cfg.zo.enabled and split is not None:
        from compo.zo.run import run_stage2

        if done != "stage2":
            run_stage2(ws, split, ws.resume)
        evals["stage2"], s2 = evaluate(ws, ref_eval, "stage2")
        say(f"eval after stage2: {fmt_metrics(evals['stage2'])}")
        if s1 is not None and s2 is not None:
            evals["stage2_effect"] = paired_effect(s1, s2, ref_eval, cfg)
    from compo.core.tracking import log_eval

    log_eval(ws.run, evals)
    extra = {"forced_resume": ws.forced} if ws.forced else {}
    summary = ws.run.update_summary(eval=evals, **session_wall(ws, t0), **extra)
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    """summary.json as aligned tables (see compo/run/summary_table.py)."""
    from compo.run.summary_table import summary_lines

    say("\n".join(summary_lines(summary)))
