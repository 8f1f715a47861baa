"""The split stage: reference log-probs of every training pair (kept under a reference key), the
injected label noise, the clean / noisy mask (reference margin, or ``split.score: stage1``'s
brief DPO), split.jsonl, and how well the split finds the wrong labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compo.core import fingerprint
from compo.core.dist import broadcast_object
from compo.core.errors import Diverged, UserError
from compo.core.rundir import is_writer, write_jsonl
from compo.data.encode import Encoded, EncodeResult
from compo.data.noise import PairNoise, apply_to_pairs, label_quality, pair_noise, swap_pairs
from compo.data.rows import PairRow
from compo.run.workspace import Workspace, say
from compo.scoring.logprobs import PairScores, score_pairs
from compo.scoring.split import calibration, calibration_text, histogram, margins_of, noisy_mask, summarize


def _prompt_json(prompt):
    return prompt if isinstance(prompt, str) else [dict(m) for m in prompt]


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


def _flip_encoded(enc: EncodeResult, flipped: list[int]) -> EncodeResult:
    """The encoded pairs with the completions of the flipped pairs swapped."""
    items = list(enc.items)
    for i in flipped:
        it = items[i]
        items[i] = Encoded(it.index, it.prompt, (it.completions[1], it.completions[0]))
    return EncodeResult(items, enc.n_dropped, enc.n_truncated)


def _inject_noise(ws: Workspace, rows: list[PairRow], enc: EncodeResult,
                  scores: PairScores) -> tuple[list[PairRow], EncodeResult, PairScores, dict | None]:
    """Flip or coin-label training pairs per data.noise, after reference scoring (a flip swaps
    the two log-probs, so nothing is scored twice); returns the changed rows and a summary."""
    nc = ws.cfg.data.noise
    if nc.kind not in ("flip", "ambiguous"):
        return rows, enc, scores, None
    seed = ws.cfg.seed if nc.seed is None else nc.seed
    margins = margins_of(scores.chosen, scores.rejected, scores.chosen_tokens, scores.rejected_tokens, ws.cfg.split.margin)
    pn = pair_noise(nc.kind, nc.rate, len(rows), seed, nc.bias, margins.abs().tolist())
    lp = swap_pairs(torch.stack([scores.chosen, scores.rejected], 1), pn.flipped)
    nt = swap_pairs(torch.stack([scores.chosen_tokens, scores.rejected_tokens], 1), pn.flipped)
    say(f"noise: {nc.kind} ({nc.bias}) flipped {len(pn.flipped)} of {len(rows)} training labels"
        + (f" ({len(pn.ambiguous)} given coin labels)" if pn.ambiguous else ""))
    return (apply_to_pairs(rows, pn), _flip_encoded(enc, pn.flipped),
            PairScores(lp[:, 0], lp[:, 1], nt[:, 0], nt[:, 1]), pn.summary())


def _reuse_flips(ws: Workspace, rows: list[PairRow], enc: EncodeResult) -> tuple[list[PairRow], EncodeResult]:
    """Re-apply the label flips a reused split.jsonl records (its log-probs are already swapped)."""
    saved = ws.saved_split
    flipped = [i for i, r in enumerate(saved) if r.get("label_flipped")]
    amb = [i for i, r in enumerate(saved) if r.get("ambiguous")]
    nc = ws.cfg.data.noise
    rows = apply_to_pairs(rows, PairNoise(nc.kind, nc.rate, nc.bias, len(rows), flipped, amb))
    for i, (r, s) in enumerate(zip(rows, saved)):
        if s.get("chosen", r.chosen) != r.chosen:
            raise UserError(str(ws.run.split), f"line {i + 1} does not match the data's pair {r.source} "
                            "(another data set or noise setting): delete it or use a new run_dir")
    return rows, _flip_encoded(enc, flipped)


def _label_flags(rows: list[PairRow]) -> list[bool] | None:
    """Per pair, whether its training label is wrong against the original (or gold) label."""
    if not any("label_flipped" in r.meta or "gold" in r.meta for r in rows):
        return None
    return [bool(r.meta.get("label_flipped", False)) != (r.meta.get("gold", True) is False) for r in rows]


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
        rows, enc = _reuse_flips(ws, rows, enc)
        say(f"split: reusing {run.split} ({int(noisy.sum())} noisy of {len(saved)})")
        return SplitResult(rows, enc, scores, noisy)
    if enc.n_dropped:
        say(f"split: dropped {enc.n_dropped} pairs whose prompt exceeds data.max_prompt_length={cfg.data.max_prompt_length}")
    scores = _reference_scores(ws, rows, enc)
    # a flip swaps a pair's two log-probs: |margin| and finiteness are the same before and after it
    rows, enc, scores, noise_summary = _inject_noise(ws, rows, enc, scores)
    kinds = {k: margins_of(scores.chosen, scores.rejected, scores.chosen_tokens, scores.rejected_tokens, k)
             for k in ("sum", "mean")}
    margins = kinds[cfg.split.margin]
    bad = (~torch.isfinite(margins)).nonzero().flatten().tolist()
    if bad:
        raise Diverged(f"split: the reference model gives non-finite log-probs for {len(bad)} pairs "
                       f"(first: {rows[bad[0]].source}); split.jsonl was not written")
    ref_noisy = noisy_mask(margins, cfg.split.rule, cfg.split.delta, cfg.split.quantile, cfg.split.require_positive)
    noisy, brief = ref_noisy, None
    if cfg.split.score == "stage1":
        from compo.train.split_model import brief_scores, implicit_margins, lowest

        brief = implicit_margins(brief_scores(ws.model, ws.tokenizer, enc.items, scores, cfg, run.root, ws.pad_id),
                                 scores, cfg.split.margin)
        if not bool(torch.isfinite(brief).all()):
            raise Diverged("split: the brief DPO model (split.score=stage1) gives non-finite log-probs; "
                           "split.jsonl was not written")
        noisy = lowest(brief, cfg.split.quantile)
    table = calibration(kinds)
    need_clean, need_noisy = _split_needs(ws)
    how = f"|{cfg.split.margin} margin| < {cfg.split.delta}" if cfg.split.rule == "absolute" else f"quantile {cfg.split.quantile}"
    if need_clean and not bool((~noisy).any()):
        say("split calibration (pairs marked noisy):\n" + calibration_text(table))
        raise UserError("split.delta", f"all {len(rows)} pairs are noisy ({how}), so stage 1 has nothing to train "
                        "on: lower split.delta, use split.rule=quantile or stage1.train_on=all")
    if need_noisy and not bool(noisy.any()):
        say("split calibration (pairs marked noisy):\n" + calibration_text(table))
        raise UserError("split.delta", f"no pair is noisy ({how}), so stage 2 has nothing to train on: raise "
                        "split.delta, use split.rule=quantile or split.margin=mean, or zo.enabled=false")
    if is_writer():
        _write_split(ws, rows, scores, kinds, noisy, brief)
    stats = summarize(margins, noisy)
    stats.update(margin=cfg.split.margin, n_dropped_long_prompt=enc.n_dropped, n_truncated=enc.n_truncated,
                 calibration=table)
    if noise_summary:
        stats["noise"] = noise_summary
    flags = _label_flags(rows)
    if flags is not None:
        stats.update(label_quality(flags, noisy.tolist()))
        rules = {"reference": ref_noisy, "stage1": noisy if brief is not None else None}
        stats["flip_detection"] = flip_detection(flags, rules)
    stats["score"] = cfg.split.score
    run.update_summary(**{k: stats[k] for k in ("n_pairs", "n_clean", "n_noisy")}, split=stats)
    say(f"split: {stats['n_pairs']} pairs -> {stats['n_clean']} clean, {stats['n_noisy']} noisy "
        f"({how}); {cfg.split.margin} margin p10/p50/p90 = "
        f"{stats['margin_p10']:.2f}/{stats['margin_p50']:.2f}/{stats['margin_p90']:.2f}")
    if flags is not None and stats["wrong_labels"]:
        lc_n, lc_c, share = stats["label_correct/noisy"], stats["label_correct/clean"], stats["wrong_labels_in_noisy"]
        say(f"split: correct labels {_pct(lc_n)} of noisy vs {_pct(lc_c)} of clean pairs; {_pct(share)} of the "
            f"{stats['wrong_labels']} wrong labels are in the noisy part")
    say("split calibration (pairs marked noisy):\n" + calibration_text(table))
    say(f"reference {cfg.split.margin} margin histogram:\n" + histogram(margins))
    return SplitResult(rows, enc, scores, noisy)


def _reference_scores(ws: Workspace, rows: list[PairRow], enc: EncodeResult) -> PairScores:
    """Reference log-probs of the training pairs before any noise: kept ones with the same
    reference key (see compo/scoring/ref_cache.py), else scored (and kept)."""
    from compo.scoring import ref_cache

    cfg = ws.cfg
    key, sources = fingerprint.reference_key(cfg), [r.source for r in rows]
    kept = broadcast_object(ref_cache.load(ws.run.root, key, sources) if is_writer() else None)
    if kept is not None:
        say(f"split: reference log-probs from {ws.run.root / ref_cache.FILE} (same reference key)")
        return kept
    ref_model = ws.model
    if cfg.split.reference:
        from compo.scoring.models import load_pretrained

        ref_model, _ = load_pretrained(cfg.split.reference, cfg)
    scores = score_pairs(ref_model, enc.items, ws.pad_id, cfg.split.batch_size, desc="reference log-probs",
                         distributed=True, shared=cfg.model.share_prompt)  # under torchrun: each process scores a share, all get every score
    if is_writer():
        ref_cache.save(ws.run.root, key, sources, scores)
    return scores


def flip_detection(flags: list[bool], masks: dict[str, torch.Tensor | None]) -> dict:
    """Per split rule that ran (its mask is not None): flip recall (the share of wrong labels in the
    noisy part) and precision (the share of the noisy part that is wrong), beside what a random
    split of the same size gives (recall = its share of the pairs, precision = the noise rate)."""
    n, wrong = len(flags), sum(flags)
    out = {}
    for name, mask in masks.items():
        if mask is None:
            continue
        noisy = mask.tolist()
        k = sum(noisy)
        hit = sum(1 for f, m in zip(flags, noisy) if f and m)
        out[name] = {"n_noisy": k, "recall": hit / wrong if wrong else None, "precision": hit / k if k else None,
                     "random_recall": k / n if n else None, "random_precision": wrong / n if n else None}
    return out


def _write_split(ws: Workspace, rows: list[PairRow], scores: PairScores, kinds: dict, noisy: torch.Tensor,
                 brief: torch.Tensor | None = None) -> None:
    """split.jsonl, between forgetting and recording the split's fingerprint (rank 0 only)."""
    run = ws.run
    fingerprint.record(run, "split", None)
    write_jsonl(run.split, (
        {"prompt": _prompt_json(r.prompt), "chosen": r.chosen, "rejected": r.rejected,
         "logp_chosen": float(scores.chosen[i]), "logp_rejected": float(scores.rejected[i]),
         "chosen_tokens": int(scores.chosen_tokens[i]), "rejected_tokens": int(scores.rejected_tokens[i]),
         "margin": float(kinds["sum"][i]), "margin_mean": float(kinds["mean"][i]), "noisy": bool(noisy[i]),
         **({"margin_stage1": float(brief[i])} if brief is not None else {}),
         "label_flipped": bool(r.meta.get("label_flipped", False)),
         **({"ambiguous": bool(r.meta["ambiguous"])} if "ambiguous" in r.meta else {}), "source": r.source}
        for i, r in enumerate(rows)
    ))
    fingerprint.record(run, "split", ws.fingerprints.get("split") or fingerprint.current(ws.cfg, "split"))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
