"""Held-out preference metrics with bootstrap confidence intervals (pure functions).

Every metric is the mean of a per-pair value (an indicator for rates), so one set of
bootstrap resamples of the pairs gives an interval for all of them:

* ``accuracy``: raw-likelihood preference accuracy, ``log p(chosen) > log p(rejected)``;
* ``rewards/*`` (TRL names): implicit rewards ``beta (log p - log p_ref)``;
  ``rewards/accuracies`` is the implicit-reward preference accuracy;
* likelihood displacement against the reference: ``shift/chosen``, ``shift/rejected`` (mean
  change of the log-probs), ``displacement/both_down`` (share of pairs where both fall),
  ``displacement/chosen_down``, ``displacement/margin_up`` (share where the margin grew).
"""

from __future__ import annotations

import math

import torch

from compo.scoring.logprobs import PairScores


def pair_values(scores: PairScores, ref: PairScores | None = None, beta: float = 0.1) -> dict[str, torch.Tensor]:
    """Per-pair values whose means are the metrics (float64, one entry per pair)."""
    c, r = scores.chosen.double(), scores.rejected.double()
    margin = c - r
    out = {"accuracy": (margin > 0).double(), "margin": margin, "logps/chosen": c, "logps/rejected": r}
    if ref is not None:
        rc, rr = ref.chosen.double(), ref.rejected.double()
        dc, dr = c - rc, r - rr
        out.update({
            "rewards/chosen": beta * dc,
            "rewards/rejected": beta * dr,
            "rewards/accuracies": (dc > dr).double(),
            "rewards/margins": beta * (dc - dr),
            "shift/chosen": dc,
            "shift/rejected": dr,
            "displacement/both_down": ((dc < 0) & (dr < 0)).double(),
            "displacement/chosen_down": (dc < 0).double(),
            "displacement/margin_up": (margin > rc - rr).double(),
        })
    return out


EFFECT_KEYS = ("accuracy", "rewards/accuracies", "shift/chosen", "shift/rejected", "margin")


def paired_differences(before: PairScores, after: PairScores, ref: PairScores, beta: float = 0.1) -> dict[str, torch.Tensor]:
    """Per held-out pair, a metric's value after minus before (e.g. stage 2 minus stage 1): on the
    same pairs, so its bootstrap interval is much tighter than two separate intervals suggest."""
    a, b = pair_values(after, ref, beta), pair_values(before, ref, beta)
    return {k: a[k] - b[k] for k in EFFECT_KEYS}


def bootstrap_means(values: dict[str, torch.Tensor], n_boot: int = 1000, level: float = 0.95,
                    seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of each value's mean, all from the same resamples of the
    pairs (seeded). An empty or single-pair input gives (nan, nan)."""
    n = len(next(iter(values.values()))) if values else 0
    if n < 2 or n_boot <= 0:
        return {k: (math.nan, math.nan) for k in values}
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    out = {}
    for k, v in values.items():
        means = v.double()[idx].mean(1)
        q = torch.quantile(means, torch.tensor([lo_q, hi_q], dtype=torch.float64))
        out[k] = (float(q[0]), float(q[1]))
    return out


def stratified_mean(strata: list[torch.Tensor], n_boot: int = 1000, level: float = 0.95,
                    seed: int = 0) -> tuple[float, float, float]:
    """(value, low, high): the mean over strata of each stratum's mean (every stratum weighs the
    same, as seeds do in a mean over seeds), with a percentile bootstrap interval that resamples
    each stratum's pairs within it; the strata themselves are held fixed."""
    value = sum(float(v.double().mean()) for v in strata) / len(strata)
    if n_boot <= 0 or any(len(v) < 2 for v in strata):
        return value, math.nan, math.nan
    gen = torch.Generator().manual_seed(seed)
    means = sum(v.double()[torch.randint(0, len(v), (n_boot, len(v)), generator=gen)].mean(1) for v in strata)
    q = torch.quantile(means / len(strata), torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64))
    return value, float(q[0]), float(q[1])


def summarise(values: dict[str, torch.Tensor], n_boot: int = 1000, level: float = 0.95,
              seed: int = 0) -> dict[str, dict]:
    """{metric: {"value", "ci_low", "ci_high", "n"}} for every per-pair value."""
    cis = bootstrap_means(values, n_boot, level, seed)
    out = {}
    for k, v in values.items():
        lo, hi = cis[k]
        out[k] = {"value": float(v.double().mean()) if len(v) else math.nan, "ci_low": lo, "ci_high": hi,
                  "n": int(len(v))}
    return out


def preference_metrics(scores: PairScores, ref: PairScores | None = None, beta: float = 0.1) -> dict:
    """The metrics' point values as a flat dict (summary.json's ``eval`` entries)."""
    if len(scores.chosen) == 0:
        return {}
    return {k: float(v.mean()) for k, v in pair_values(scores, ref, beta).items() if k != "margin"}


def with_intervals(scores: PairScores, ref: PairScores | None, beta: float, n_boot: int, level: float,
                   seed: int) -> dict:
    """preference_metrics plus ``ci``: {metric: [low, high]} (omitted when n_boot is 0)."""
    out = preference_metrics(scores, ref, beta)
    if out and n_boot > 0:
        vals = {k: v for k, v in pair_values(scores, ref, beta).items() if k != "margin"}
        out["ci"] = {k: list(v) for k, v in bootstrap_means(vals, n_boot, level, seed).items()}
    return out
