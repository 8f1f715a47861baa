"""`compo zo` / the pipeline's stage 2: pick the noisy pairs, build the oracles, train, save."""

from __future__ import annotations

import time

import torch
from safetensors.torch import save_file

from compo.core import faults
from compo.scoring.logprobs import PairScores, score_pairs
from compo.core.progress import say
from compo.scoring.split import margins_of, noisy_mask
from compo.zo.track import first_steps


def select_noisy(ws, split) -> list[int]:
    """Indices of the pairs stage 2 trains on.

    paper: the noisy part of the reference split. code: re-score with the current policy
    (after stage 1) and keep |m| < delta with m > 0 (the official code's rule).
    """
    cfg = ws.cfg
    if cfg.zo.noisy_rule == "paper":
        return split.noisy.nonzero().flatten().tolist()
    scores = score_pairs(ws.model, split.encoded.items, ws.pad_id, cfg.split.batch_size, desc="policy margins",
                          shared=cfg.model.share_prompt)
    margins = margins_of(scores.chosen, scores.rejected, scores.chosen_tokens, scores.rejected_tokens, cfg.split.margin)
    mask = noisy_mask(margins, cfg.split.rule, cfg.split.delta, cfg.split.quantile,
                      require_positive=True)
    return mask.nonzero().flatten().tolist()


def _noisy_shifts(before, after, prefix: str = "noisy") -> dict:
    """The likelihood-displacement signal of stage 2 itself: chosen should rise, rejected fall."""
    return {
        f"{prefix}/shift_chosen": float((after.chosen - before.chosen).mean()),
        f"{prefix}/shift_rejected": float((after.rejected - before.rejected).mean()),
        f"{prefix}/frac_chosen_up": float((after.chosen > before.chosen).float().mean()),
        f"{prefix}/frac_rejected_down": float((after.rejected < before.rejected).float().mean()),
    }


def step_diagnostics(run) -> dict:
    """Means over the logged stage-2 steps: the signal cosine of u (near 0: the update is noise;
    first-order for the likelihood rule, with the moment estimate beside it), the vocabulary
    support's size and first-order energy, the share of votes agreeing with the rest (1/2
    without signal; when counted), the share of the direction's energy the sparsity rule kept
    (taken steps)."""
    from compo.core.rundir import read_jsonl

    recs = [r for r in read_jsonl(run.metrics) if r.get("stage") == "stage2"] if run.metrics.exists() else []
    taken = [r for r in recs if not r.get("skipped")]
    out = {}
    for key, among in (("signal_cos", recs), ("signal_cos_moment", recs), ("support_size", recs),
                       ("support_energy", recs), ("agree_rate", recs), ("energy_kept", taken)):
        if among and all(key in r for r in among):  # (absent from records of older runs)
            out[f"mean_{key}"] = sum(r[key] for r in among) / len(among)
    if "mean_support_energy" in out:
        out["min_support_energy"] = min(r["support_energy"] for r in recs)
    from oracles.judges import run_totals  # judge requests, ties, position bias over the run

    for prefix in ("oracle/", "accept_oracle/"):
        out.update(run_totals(recs, prefix))
    return out


def _subset(scores: PairScores, mask: torch.Tensor) -> PairScores:
    return PairScores(scores.chosen[mask], scores.rejected[mask], scores.chosen_tokens[mask], scores.rejected_tokens[mask])


def _paused_wall(ws, resume: bool) -> float:
    """Stage-2 seconds of the paused sessions a resume continues (summary.json keeps them under
    stage2.wall_s when a session pauses; their checkpoint is the one the resume loads)."""
    s2 = ws.run.summary().get("stage2") or {}
    if resume and (ws.run.checkpoints / "zo").exists() and "stopped" in s2:
        return float(s2.get("wall_s") or 0.0)
    return 0.0


def run_stage2(ws, split, resume: bool = False) -> dict:
    """Stage 2 on the noisy pairs of ``split``; under torchrun the m perturbations of each step
    are shared out across processes and only votes travel (the result does not depend on the
    number of processes). A pause (judge budget spent, human quit) keeps model/ as it was,
    records why in summary.json and raises :class:`~compo.core.errors.Paused`."""
    from compo.core import fingerprint
    from compo.core.dist import init_distributed, world_info
    from compo.core.errors import Paused, UserError
    from compo.train.stage1 import save_model
    from compo.zo.trainer import ZOTrainer
    from compo.zo.oracles import build_oracles

    init_distributed()

    cfg = ws.cfg
    idx = select_noisy(ws, split)
    if not idx:
        raise UserError("split.delta", f"stage 2 has no noisy pairs to train on (rule={cfg.zo.noisy_rule}, "
                        f"delta={cfg.split.delta}): raise split.delta or use split.rule=quantile")
    oracle, accept = ws.oracles if ws.oracles is not None else build_oracles(cfg)
    ws.oracles = None  # closed below
    say(f"stage2: ComPO on {len(idx)} noisy pairs (rule={cfg.zo.noisy_rule}), m={cfg.zo.m}, "
        f"r={cfg.zo.radius}, oracle={cfg.zo.oracle.name}, estimator={cfg.zo.estimator}, support={cfg.zo.support}"
        + (f" (k={cfg.zo.support_k})" if cfg.zo.support == "topk" else ""))
    rank0 = world_info()[1] == 0
    if rank0 and not (resume and (ws.run.checkpoints / "zo").exists()):
        fingerprint.record(ws.run, "stage2", ws.fingerprints.get("stage2") or fingerprint.current(cfg, "stage2"))
    noisy_items = [split.encoded.items[i] for i in idx]
    before = score_pairs(ws.model, noisy_items, ws.pad_id, cfg.split.batch_size, desc="noisy pairs before",
                         shared=cfg.model.share_prompt)
    t0, earlier = time.time(), _paused_wall(ws, resume)
    trainer = ZOTrainer(ws.model, cfg.zo, cfg.seed, oracle, ws.pad_id, accept, ws.tokenizer,
                        share_prompt=cfg.model.share_prompt)
    total = trainer.total_steps(len(idx))
    schedule = first_steps(len(idx), total, trainer.pairs_for_step)  # the pairs stage 2 trains
    if cfg.zo.track_pairs:
        from compo.zo.track import PairTracker, tracked_indices

        tracker = PairTracker(ws.model, noisy_items, [split.rows[i] for i in idx], ws.pad_id,
                              tracked_indices(schedule, len(idx), cfg.zo.track_pairs), cfg.model.share_prompt)
        tracker.start(trainer.w)
        trainer.extras.append(tracker)
    try:
        totals = trainer.train(noisy_items, [split.rows[i] for i in idx], ws.run, resume)
    except Paused as e:
        if rank0:
            ws.run.update_summary(stage2={"stopped": str(e), "steps_done": e.totals.get("steps", 0),
                                          "wall_s": round(earlier + time.time() - t0, 2)})
        raise
    finally:
        oracle.close()
        if accept is not None:
            accept.close()
    steps = max(1, totals["steps"])
    final = {
        "steps": totals["steps"], "steps_taken": totals["steps_taken"], "steps_skipped": totals["steps_skipped"],
        "skip_reasons": totals["skip_reasons"], "mean_frac_minus": totals["sum_frac_minus"] / steps,
        "n_noisy_pairs": len(idx), "untied_head": trainer.untied, "wall_s": round(earlier + time.time() - t0, 2),
    }
    for key in ("budget_exhausted", "warnings"):
        if key in totals:
            final[key] = totals[key]
    if ws.forced.get("stage2"):
        final["forced_resume"] = ws.forced["stage2"]
    after = score_pairs(ws.model, noisy_items, ws.pad_id, cfg.split.batch_size, desc="noisy pairs after",
                        shared=cfg.model.share_prompt)
    final.update(_noisy_shifts(before, after))
    trained = torch.tensor([i in schedule for i in range(len(idx))])
    for name, mask in (("trained", trained), ("untrained", ~trained)):
        if bool(mask.any()):
            final.update(_noisy_shifts(_subset(before, mask), _subset(after, mask), f"noisy_{name}"))
        final[f"noisy_{name}/n"] = int(mask.sum())
    final.update(step_diagnostics(ws.run))
    if not rank0:
        return final
    w = trainer.w
    save_model(ws.run.model, ws.model, ws.tokenizer, "stage2", final,
               extra=lambda d: save_file({"weight": w.contiguous().cpu()}, str(d / "zo_head_fp32.safetensors")))
    faults.point("stage2.saved")
    ws.run.drop_checkpoints("zo")
    ws.run.update_summary(stage2=final, model_stage="stage2")
    return final
