"""Clean / noisy split of preference pairs by the reference log-likelihood margin.

m = log pi_ref(chosen) - log pi_ref(rejected). Pairs the reference cannot tell apart are
noisy (DESIGN.md §2): ``|m| < delta`` (paper, delta 3), optionally also ``m > 0`` (official
code), or the ``q`` fraction with the smallest ``|m|`` (quantile rule).
"""

from __future__ import annotations

import math

import torch


def noisy_mask(
    margins: torch.Tensor, rule: str = "absolute", delta: float = 3.0, quantile: float = 0.2,
    require_positive: bool = False,
) -> torch.Tensor:
    """Boolean mask, True for noisy pairs."""
    margins = margins.float()
    mag = margins.abs()
    if rule == "absolute":
        noisy = mag < delta
    elif rule == "quantile":
        k = int(round(quantile * len(margins)))
        order = torch.sort(mag, stable=True).indices
        noisy = torch.zeros(len(margins), dtype=torch.bool)
        noisy[order[:k]] = True
    else:
        raise ValueError(f"unknown split rule '{rule}', allowed: absolute, quantile")
    if require_positive:
        noisy &= margins > 0
    return noisy


def histogram(margins: torch.Tensor, bins: int = 12, width: int = 40) -> str:
    """A text histogram of the margins, for the console."""
    if len(margins) == 0:
        return "(no pairs)"
    lo, hi = float(margins.min()), float(margins.max())
    if math.isclose(lo, hi):
        hi = lo + 1.0
    counts = torch.histc(margins.float(), bins=bins, min=lo, max=hi).long().tolist()
    step = (hi - lo) / bins
    top = max(counts) or 1
    lines = []
    for i, c in enumerate(counts):
        a = lo + i * step
        lines.append(f"  [{a:8.2f}, {a + step:8.2f}) {c:6d} {'#' * round(width * c / top)}")
    return "\n".join(lines)


def summarize(margins: torch.Tensor, noisy: torch.Tensor) -> dict:
    """Counts and margin statistics for summary.json."""
    q = torch.tensor([0.1, 0.5, 0.9])
    qs = margins.float().quantile(q).tolist() if len(margins) else [float("nan")] * 3
    return {
        "n_pairs": int(len(margins)),
        "n_clean": int((~noisy).sum()),
        "n_noisy": int(noisy.sum()),
        "margin_mean": float(margins.float().mean()) if len(margins) else float("nan"),
        "margin_p10": qs[0], "margin_p50": qs[1], "margin_p90": qs[2],
        "frac_positive_margin": float((margins > 0).float().mean()) if len(margins) else float("nan"),
    }


def margins_of(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, kind: str = "sum") -> torch.Tensor:
    """The split's margin: summed log-probs (paper), or per-token means (``mean``), which does
    not grow with response length."""
    if kind == "sum":
        return chosen - rejected
    if kind == "mean":
        return chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)
    raise ValueError(f"unknown margin kind {kind!r}, allowed: sum, mean")


SUM_DELTAS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0)
MEAN_DELTAS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
QUANTILES = (0.1, 0.2, 0.3, 0.5)


def calibration(margins: dict[str, torch.Tensor]) -> list[dict]:
    """How many pairs each rule and threshold would mark noisy, per margin kind: the table a user
    picks ``split.margin`` / ``split.delta`` / ``split.quantile`` from."""
    rows = []
    for kind, m in margins.items():
        n = len(m)
        for d in SUM_DELTAS if kind == "sum" else MEAN_DELTAS:
            k = int(noisy_mask(m, "absolute", d).sum())
            rows.append({"margin": kind, "rule": "absolute", "threshold": d, "n_noisy": k, "frac_noisy": k / max(n, 1)})
        for q in QUANTILES:
            mask = noisy_mask(m, "quantile", quantile=q)
            edge = float(m.abs()[mask].max()) if bool(mask.any()) else float("nan")
            rows.append({"margin": kind, "rule": "quantile", "threshold": q, "n_noisy": int(mask.sum()),
                         "frac_noisy": int(mask.sum()) / max(n, 1), "abs_margin_below": edge})
    return rows


def calibration_text(rows: list[dict]) -> str:
    """The calibration table for the console: one line per margin kind and rule."""
    lines = []
    for kind in dict.fromkeys(r["margin"] for r in rows):
        for rule, key in (("absolute", "delta"), ("quantile", "q")):
            cells = [f"{key}={r['threshold']:g}: {r['n_noisy']}" for r in rows if r["margin"] == kind and r["rule"] == rule]
            lines.append(f"  margin={kind:4s} {rule:8s} " + "  ".join(cells))
    return "\n".join(lines)
