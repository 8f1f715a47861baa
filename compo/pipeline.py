"""Orchestration: load -> normalise -> tokenize -> log-probs -> split -> train -> evaluate.

Each command (split, train, zo, pipeline) is a thin function over the pure pieces; all of
them read and write the same run directory (see compo/rundir.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from compo import fingerprint
from compo.config import RunConfig
from compo.encode import EncodeResult
from compo.errors import Diverged, UserError
from compo.evaluate import preference_metrics
from compo.logprobs import PairScores, score_pairs
from compo.rows import PairRow
from compo.rundir import write_jsonl
from compo.split import histogram, noisy_mask, summarize
from compo.workspace import Workspace, load_data, say, stage_marker  # noqa: F401 - re-exported
from compo.workspace import open_workspace as _open


def open_workspace(cfg: RunConfig, command: str = "pipeline", resume: bool = False,
                   force_resume: bool = False) -> Workspace:
    """Validate everything ``command`` will use, load the model (see compo/workspace.py)."""
    return _open(cfg, command, resume, force_resume)


def _prompt_json(prompt):
    return prompt if isinstance(prompt, str) else [dict(m) for m in prompt]


# ---------------------------------------------------------------- split


@dataclass
class SplitResult:
    rows: list[PairRow]  # the pairs that survived the length policy, in split.jsonl order
    encoded: EncodeResult
    scores: PairScores  # reference log-probs
    noisy: torch.Tensor

    def train_indices(self, train_on: str) -> list[int]:
        """Pairs stage 1 trains on: the clean ones, or all with ``stage1.train_on=all``."""
        keep = torch.ones_like(self.noisy) if train_on == "all" else ~self.noisy
        idx = keep.nonzero().flatten().tolist()
        if not idx:
            raise UserError("split.delta", "no clean pairs to train on: lower split.delta or set stage1.train_on=all")
        return idx


def _split_needs(ws: Workspace) -> tuple[bool, bool]:
    """(needs clean pairs, needs noisy pairs): what the later stages of this command train on."""
    cfg = ws.cfg
    clean = "stage1" in ws.stages and cfg.stage1.train_on == "clean"
    noisy = "stage2" in ws.stages and cfg.zo.noisy_rule == "paper"
    return clean, noisy


def run_split(ws: Workspace) -> SplitResult:
    """Reference margins for every pair, the noisy mask, split.jsonl and the console summary.

    A split.jsonl that start-up found reusable (its fingerprint matches this config, or
    ``--resume``) is read back instead of scoring again."""
    cfg, run = ws.cfg, ws.run
    if ws.kind != "paired":
        raise UserError(cfg.data.path, "the clean/noisy split needs paired data (chosen/rejected); stage1 "
                        "KTO/BCO on unpaired data runs with the split skipped")
    enc = ws.encoded if ws.encoded is not None else ws.encode(ws.train)
    rows = [ws.train[it.index] for it in enc.items]
    if ws.saved_split is not None:
        saved = ws.saved_split
        scores = PairScores(*(torch.tensor([r[k] for r in saved]) for k in
                              ("logp_chosen", "logp_rejected", "chosen_tokens", "rejected_tokens")))
        noisy = torch.tensor([r["noisy"] for r in saved])
        say(f"split: reusing {run.split} ({int(noisy.sum())} noisy of {len(saved)})")
        return SplitResult(rows, enc, scores, noisy)
    if enc.n_dropped:
        say(f"split: dropped {enc.n_dropped} pairs whose prompt exceeds data.max_prompt_length={cfg.data.max_prompt_length}")
    ref_model = ws.model
    if cfg.split.reference:
        from compo.models import load_pretrained

        ref_model, _ = load_pretrained(cfg.split.reference, cfg)
    scores = score_pairs(ref_model, enc.items, ws.pad_id, cfg.split.batch_size, desc="reference log-probs")
    if ref_model is not ws.model:
        del ref_model
    margins = scores.chosen - scores.rejected
    bad = (~torch.isfinite(margins)).nonzero().flatten().tolist()
    if bad:
        raise Diverged(f"split: the reference model gives non-finite log-probs for {len(bad)} pairs "
                       f"(first: {rows[bad[0]].source}); split.jsonl was not written")
    noisy = noisy_mask(margins, cfg.split.rule, cfg.split.delta, cfg.split.quantile, cfg.split.require_positive)
    need_clean, need_noisy = _split_needs(ws)
    if need_clean and not bool((~noisy).any()):
        raise UserError("split.delta", f"all {len(rows)} pairs are noisy (|margin| < {cfg.split.delta}), so stage 1 "
                        "has nothing to train on: lower split.delta, use split.rule=quantile or stage1.train_on=all")
    if need_noisy and not bool(noisy.any()):
        raise UserError("split.delta", f"no pair is noisy (|margin| < {cfg.split.delta}), so stage 2 has nothing to "
                        "train on: raise split.delta, use split.rule=quantile, or zo.enabled=false")
    fingerprint.record(run, "split", None)
    write_jsonl(run.split, (
        {"prompt": _prompt_json(r.prompt), "chosen": r.chosen, "rejected": r.rejected,
         "logp_chosen": float(scores.chosen[i]), "logp_rejected": float(scores.rejected[i]),
         "chosen_tokens": int(scores.chosen_tokens[i]), "rejected_tokens": int(scores.rejected_tokens[i]),
         "margin": float(margins[i]), "noisy": bool(noisy[i]), "source": r.source}
        for i, r in enumerate(rows)
    ))
    fingerprint.record(run, "split", ws.fingerprints.get("split") or fingerprint.current(cfg, "split"))
    stats = summarize(margins, noisy)
    stats["n_dropped_long_prompt"] = enc.n_dropped
    stats["n_truncated"] = enc.n_truncated
    run.update_summary(**{k: stats[k] for k in ("n_pairs", "n_clean", "n_noisy")}, split=stats)
    say(f"split: {stats['n_pairs']} pairs -> {stats['n_clean']} clean, {stats['n_noisy']} noisy "
        f"(rule={cfg.split.rule}, delta={cfg.split.delta}); margin p10/p50/p90 = "
        f"{stats['margin_p10']:.2f}/{stats['margin_p50']:.2f}/{stats['margin_p90']:.2f}")
    say("reference margin histogram:\n" + histogram(margins))
    return SplitResult(rows, enc, scores, noisy)


# ---------------------------------------------------------------- stage 1


def run_stage1(ws: Workspace, split: SplitResult | None, resume: bool = False) -> dict:
    """Stage 1 on the clean pairs (or all, per stage1.train_on); saves run_dir/model."""
    from compo.stage1 import PAIRED_LOSSES, Stage1Data, paired_objective, train_stage1

    cfg = ws.cfg
    if not (resume and (ws.run.checkpoints / "stage1").exists()):  # a fresh stage 1: stage 2's old state is void
        fingerprint.record(ws.run, "stage1", ws.fingerprints.get("stage1") or fingerprint.current(cfg, "stage1"))
        ws.run.drop_checkpoints("zo")
    if cfg.stage1.loss not in PAIRED_LOSSES:
        from compo.stage1_unpaired import run_unpaired_stage1

        return run_unpaired_stage1(ws, split, resume)
    if split is None:
        from compo.stage1_unpaired import paired_data_message

        raise UserError("stage1.loss", paired_data_message(cfg.stage1.loss, cfg.data.path))
    idx = split.train_indices(cfg.stage1.train_on)
    items = [split.encoded.items[i] for i in idx]
    ref = torch.stack([split.scores.chosen[idx], split.scores.rejected[idx]], dim=1)
    if cfg.split.reference:
        ref_scores = score_pairs(ws.model, items, ws.pad_id, cfg.split.batch_size, desc="policy-reference log-probs")
        ref = torch.stack([ref_scores.chosen, ref_scores.rejected], dim=1)
    say(f"stage1: {cfg.stage1.loss} on {len(items)} {cfg.stage1.train_on} pairs")
    t0 = time.time()
    final = train_stage1(ws.model, ws.tokenizer, Stage1Data(items, ref), cfg, ws.run,
                         paired_objective(cfg, ws.pad_id), resume=resume)
    final["wall_s"] = round(time.time() - t0, 2)
    if ws.forced.get("stage1"):
        final["forced_resume"] = ws.forced["stage1"]
    ws.run.update_summary(stage1=final, model_stage="stage1")
    return final


# ---------------------------------------------------------------- evaluation


def evaluate(ws: Workspace, ref: PairScores | None = None, label: str = "") -> tuple[dict, PairScores | None]:
    """Preference metrics of the current model on the held-out pairs."""
    if not ws.eval:
        return {}, None
    enc = ws.encode(ws.eval)
    scores = score_pairs(ws.model, enc.items, ws.pad_id, ws.cfg.split.batch_size, desc=f"eval {label}".strip())
    return preference_metrics(scores, ref, ws.cfg.stage1.beta), scores


def _fmt(m: dict, keys=("accuracy", "shift/chosen", "shift/rejected")) -> str:
    return ", ".join(f"{k}={m[k]:.4f}" for k in keys if k in m)


def run_pipeline(cfg: RunConfig, resume: bool = False, force_resume: bool = False) -> dict:
    """split -> stage 1 -> stage 2 -> evaluation, all into cfg.run_dir; returns summary.json."""
    t0 = time.time()
    ws = open_workspace(cfg, "pipeline", resume, force_resume)
    try:
        return _pipeline(ws, t0)
    finally:
        ws.close()


def _resume_finished(ws: Workspace) -> str | None:
    """Load model/ when it holds a finished stage this run may skip; tidy that stage's leftovers."""
    done = ws.done_stage
    if done is None:
        return None

    from compo.models import load_pretrained

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
    split = run_split(ws) if ws.kind == "paired" else None
    if split is None:
        say("split: skipped (unpaired data has no chosen/rejected margin; see README 'Unpaired data')")
    before, ref_eval = evaluate(ws, label="reference")
    evals = {"reference": before}
    if before:
        say(f"eval reference: {_fmt(before)}")
    done = _resume_finished(ws)
    if cfg.stage1.enabled and done is None:
        run_stage1(ws, split, ws.resume)
    if cfg.stage1.enabled and done == "stage2":
        evals["stage1"] = ws.run.summary().get("eval", {}).get("stage1", {})
    elif cfg.stage1.enabled:
        evals["stage1"], _ = evaluate(ws, ref_eval, "stage1")
        say(f"eval after stage1: {_fmt(evals['stage1'])}")
        ws.run.update_summary(eval=evals)
    if cfg.zo.enabled and split is not None:
        from compo.zo.run import run_stage2

        if done != "stage2":
            run_stage2(ws, split, ws.resume)
        evals["stage2"], _ = evaluate(ws, ref_eval, "stage2")
        say(f"eval after stage2: {_fmt(evals['stage2'])}")
    extra = {"forced_resume": ws.forced} if ws.forced else {}
    summary = ws.run.update_summary(eval=evals, wall_s=round(time.time() - t0, 2), **extra)
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    say("=" * 60)
    say("run summary" + (f"  (wall {summary['wall_s']:.1f} s)" if "wall_s" in summary else ""))
    if "n_pairs" in summary:
        say(f"  pairs: {summary['n_pairs']}  clean: {summary['n_clean']}  noisy: {summary['n_noisy']}")
    if "stage1" in summary:
        s = summary["stage1"]
        keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "kl", "delta")
        say("  stage1 final: " + ", ".join(f"{k}={s[k]:.4f}" for k in keys if k in s))
    if "stage2" in summary:
        s = summary["stage2"]
        say("  stage2: " + ", ".join(f"{k}={v}" for k, v in s.items() if not isinstance(v, (dict, list))))
        for w in s.get("warnings", []):
            say(f"  warning: {w}")
    for name, m in summary.get("eval", {}).items():
        if m:
            say(f"  held-out after {name:9s}: {_fmt(m)}")
    say("=" * 60)
