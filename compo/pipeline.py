"""Orchestration: load -> normalise -> tokenize -> log-probs -> split -> train -> evaluate.

Each command (split, train, zo, pipeline) is a thin function over the pure pieces; all of
them read and write the same run directory (see compo/core/rundir.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from compo.core import fingerprint
from compo.core.config import RunConfig
from compo.data.encode import Encoded, EncodeResult
from compo.core.errors import Diverged, UserError
from compo.core.dist import broadcast_object, world_info
from compo.scoring.logprobs import PairScores, score_pairs
from compo.data.rows import PairRow
from compo.core.rundir import is_writer, write_jsonl
from compo.data.noise import PairNoise, apply_to_pairs, label_quality, pair_noise, swap_pairs
from compo.scoring.split import calibration, calibration_text, histogram, margins_of, noisy_mask, summarize
from compo.run.heldout import evaluate, fmt_metrics, paired_effect, saved_eval
from compo.core.files import stage_marker
from compo.run.workspace import Workspace, say
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
        stats["flip_detection"] = flip_detection(flags, {"reference": ref_noisy, "stage1": brief is not None and noisy})
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


def flip_detection(flags: list[bool], masks: dict) -> dict:
    """Per split rule (masks that are not False): flip recall (the share of wrong labels in the
    noisy part) and precision (the share of the noisy part that is wrong), beside what a random
    split of the same size gives (recall = its share of the pairs, precision = the noise rate)."""
    n, wrong = len(flags), sum(flags)
    out = {}
    for name, mask in masks.items():
        if mask is False:
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
