"""Held-out evaluation inside a run: preference metrics with bootstrap intervals, the per-pair
scores kept in eval_scores.json (reused on resume), and stage 2's own paired effect."""

from __future__ import annotations

from compo.core import fingerprint
from compo.core.config import RunConfig
from compo.core.dist import broadcast_object, world_info
from compo.scoring.evaluate import bootstrap_means, paired_differences, with_intervals
from compo.scoring.logprobs import PairScores, score_pairs
from compo.core.progress import say
from compo.core.rundir import atomic_write_json, read_json
from compo.run.workspace import Workspace


def _saved(ws: Workspace, sources: list[str]) -> dict:
    """eval_scores.json when it holds the same held-out pairs, else a fresh record of them."""
    saved = read_json(ws.run.eval_scores) if ws.run.eval_scores.exists() else {}
    return saved if saved.get("sources") == sources else {"sources": sources}


def saved_eval(ws: Workspace, label: str, sources: list[str]) -> PairScores | None:
    """Held-out scores of ``label`` kept in eval_scores.json for the same held-out pairs."""
    saved = _saved(ws, sources)
    return PairScores.from_json(saved[label]) if label in saved else None


def evaluate(ws: Workspace, ref: PairScores | None = None, label: str = "", reuse: bool = False) -> tuple[dict, PairScores | None]:
    """Preference metrics (with bootstrap intervals) of the current model on the held-out pairs;
    their per-pair log-probs are kept in eval_scores.json under ``label`` (and, with ``reuse``,
    read back from there instead of scoring again)."""
    if not ws.eval:
        return {}, None
    cfg = ws.cfg
    enc = ws.encode(ws.eval)
    if enc.n_dropped and label == "reference":
        say(f"eval: dropped {enc.n_dropped} of {len(ws.eval)} held-out pairs whose prompt exceeds "
            f"data.max_prompt_length={cfg.data.max_prompt_length}")
    sources = [ws.eval[it.index].source for it in enc.items]
    key = fingerprint.reference_key(cfg) if label == "reference" else None
    saved = _saved(ws, sources)
    if key is not None and not reuse:  # the same reference and pairs (a study's other noise rate)
        reuse = saved.get("reference_key") == key
    scores = PairScores.from_json(saved[label]) if reuse and label in saved else None
    if reuse:  # every process takes rank 0's answer, so all of them score (a collective) or none
        scores = broadcast_object(scores)
    if scores is not None:
        say(f"eval {label}: reusing the held-out scores in {ws.run.eval_scores}")
    elif label in ("stage1", "stage2") and cfg.eval.cache_hidden_mb and world_info()[0] == 1:
        from compo.run import head_eval

        scores = head_eval.scores(ws, enc.items, sources, label)
    if scores is None:
        scores = score_pairs(ws.model, enc.items, ws.pad_id, cfg.split.batch_size, desc=f"eval {label}".strip(),
                             distributed=True, shared=cfg.model.share_prompt)
    out = with_intervals(scores, ref, cfg.stage1.beta, cfg.eval.bootstrap, cfg.eval.level, cfg.seed)
    out["n_pairs"], out["n_dropped"] = len(enc.items), enc.n_dropped
    if label and world_info()[1] == 0:
        saved[label] = scores.to_json()
        if key is not None:
            saved["reference_key"] = key
        atomic_write_json(ws.run.eval_scores, saved)
    return out, scores


def fmt_metrics(m: dict, keys=("accuracy", "shift/chosen", "shift/rejected")) -> str:
    ci = m.get("ci", {})
    parts = []
    for k in keys:
        if k in m:
            lo, hi = ci.get(k, (None, None))
            parts.append(f"{k}={m[k]:.4f}" + (f" [{lo:.4f}, {hi:.4f}]" if lo is not None and lo == lo else ""))
    return ", ".join(parts)


def paired_effect(before: PairScores, after: PairScores, ref: PairScores, cfg: RunConfig) -> dict:
    """Stage 2's own effect: per held-out pair, the metric after stage 2 minus after stage 1, with
    a paired bootstrap interval (``ci``), in the format of the other ``eval`` entries."""
    diff = paired_differences(before, after, ref, cfg.stage1.beta)
    out = {k: float(v.mean()) for k, v in diff.items()}
    if cfg.eval.bootstrap:
        out["ci"] = {k: list(v) for k, v in bootstrap_means(diff, cfg.eval.bootstrap, cfg.eval.level, cfg.seed).items()}
    return out
