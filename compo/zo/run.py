"""`compo zo` / the pipeline's stage 2: pick the noisy pairs, build the oracles, train, save."""

from __future__ import annotations

import time

from safetensors.torch import save_file

from compo.logprobs import score_pairs
from compo.rundir import atomic_save_dir
from compo.split import noisy_mask
from oracles.base import build_oracle


def select_noisy(ws, split) -> list[int]:
    """Indices of the pairs stage 2 trains on.

    paper: the noisy part of the reference split. code: re-score with the current policy
    (after stage 1) and keep |m| < delta with m > 0 (the official code's rule).
    """
    cfg = ws.cfg
    if cfg.zo.noisy_rule == "paper":
        return split.noisy.nonzero().flatten().tolist()
    scores = score_pairs(ws.model, split.encoded.items, ws.pad_id, cfg.split.batch_size, desc="policy margins")
    mask = noisy_mask(scores.chosen - scores.rejected, cfg.split.rule, cfg.split.delta, cfg.split.quantile,
                      require_positive=True)
    return mask.nonzero().flatten().tolist()


def run_stage2(ws, split, resume: bool = False) -> dict:
    """Stage 2 on the noisy pairs of ``split``; under torchrun the m perturbations of each step
    are shared out across processes and only votes travel (the result does not depend on the
    number of processes)."""
    from compo.dist import init_distributed, world_info
    from compo.zo.trainer import ZOTrainer

    init_distributed()

    cfg = ws.cfg
    idx = select_noisy(ws, split)
    oracle = build_oracle(cfg.zo.oracle.name, **cfg.zo.oracle.options)
    accept = build_oracle(cfg.zo.accept_oracle.name, **cfg.zo.accept_oracle.options) if cfg.zo.accept_oracle else None
    print(f"stage2: ComPO on {len(idx)} noisy pairs (rule={cfg.zo.noisy_rule}), m={cfg.zo.m}, "
          f"r={cfg.zo.radius}, oracle={cfg.zo.oracle.name}, estimator={cfg.zo.estimator}", flush=True)
    noisy_items = [split.encoded.items[i] for i in idx]
    before = score_pairs(ws.model, noisy_items, ws.pad_id, cfg.split.batch_size, desc="noisy pairs before")
    t0 = time.time()
    trainer = ZOTrainer(ws.model, cfg.zo, cfg.seed, oracle, ws.pad_id, accept, ws.tokenizer)
    try:
        totals = trainer.train([split.encoded.items[i] for i in idx], [split.rows[i] for i in idx], ws.run, resume)
    finally:
        oracle.close()
        if accept is not None:
            accept.close()
    steps = max(1, totals["steps"])
    final = {
        "steps": totals["steps"], "steps_taken": totals["steps_taken"], "steps_skipped": totals["steps_skipped"],
        "skip_reasons": totals["skip_reasons"], "mean_frac_minus": totals["sum_frac_minus"] / steps,
        "n_noisy_pairs": len(idx), "untied_head": trainer.untied, "wall_s": round(time.time() - t0, 2),
    }
    for key in ("stopped", "budget_exhausted"):
        if key in totals:
            final[key] = totals[key]
    after = score_pairs(ws.model, noisy_items, ws.pad_id, cfg.split.batch_size, desc="noisy pairs after")
    # the likelihood-displacement signal of stage 2 itself: chosen should rise, rejected fall
    final["noisy/shift_chosen"] = float((after.chosen - before.chosen).mean())
    final["noisy/shift_rejected"] = float((after.rejected - before.rejected).mean())
    final["noisy/frac_chosen_up"] = float((after.chosen > before.chosen).float().mean())
    final["noisy/frac_rejected_down"] = float((after.rejected < before.rejected).float().mean())
    if world_info()[1] != 0:
        return final
    model, tok = ws.model, ws.tokenizer
    atomic_save_dir(ws.run.model, lambda d: (model.save_pretrained(d), tok.save_pretrained(d),
                                             save_file({"weight": trainer.w.contiguous().cpu()}, str(d / "zo_head_fp32.safetensors"))))
    ws.run.update_summary(stage2=final, model_stage="stage2")
    return final
