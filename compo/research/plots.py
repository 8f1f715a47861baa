"""Figures for the noise-robustness study: metric vs injected noise, held-out margin histograms
and per-pair log-prob trajectories during stage 2. Each function writes one PNG atomically."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

Point = tuple[float, float, Optional[float], Optional[float]]

TRAINED_COLOR = "tab:blue"
UNTRAINED_COLOR = "tab:orange"


def _num(x: Any) -> float | None:
    """`x` as a finite float, or None when missing, NaN or infinite."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _finite(values: Iterable[Any]) -> list[float]:
    return [v for v in (_num(x) for x in values) if v is not None]


def _save(fig: Figure, out: Path) -> Path:
    """Write `fig` to `out` as PNG atomically (temp file + rename, the user's umask), then close it."""
    from compo.core.rundir import atomic_write_bytes

    out = Path(out)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def series(rows: list[dict], metric: str) -> dict[str, list[Point]]:
    """Per method, the (noise, mean, ci_low, ci_high) points of `metric`, sorted by noise.

    Rows of other metrics, and rows whose mean or noise is missing/NaN, are dropped; a missing
    or non-finite CI bound becomes None."""
    out: dict[str, list[Point]] = defaultdict(list)
    for r in rows:
        if r.get("metric") != metric:
            continue
        noise, mean = _num(r.get("noise")), _num(r.get("mean"))
        if noise is None or mean is None:
            continue
        out[str(r.get("method"))].append((noise, mean, _num(r.get("ci_low")), _num(r.get("ci_high"))))
    return {m: sorted(pts, key=lambda p: p[0]) for m, pts in sorted(out.items())}


def plot_metric_vs_noise(rows: list[dict], metric: str, out: Path, title: str | None = None) -> Path:
    """One line per method of `metric` over the noise rates, with asymmetric CI error bars."""
    fig, ax = plt.subplots(figsize=(6, 4))
    data = series(rows, metric)
    for method, pts in data.items():
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        (line,) = ax.plot(xs, ys, marker="o", label=method)
        bars = [p for p in pts if p[2] is not None and p[3] is not None]
        if bars:
            lo = [max(0.0, p[1] - p[2]) for p in bars]
            hi = [max(0.0, p[3] - p[1]) for p in bars]
            ax.errorbar([p[0] for p in bars], [p[1] for p in bars], yerr=[lo, hi], fmt="none",
                        ecolor=line.get_color(), capsize=3)
    if data:
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"no data for {metric}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("injected label noise rate")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title(title if title is not None else f"{metric} vs label noise")
    return _save(fig, out)


def plot_margin_histograms(margins: dict[str, list[float]], out: Path, title: str | None = None,
                           bins: int = 30) -> Path:
    """Overlaid step histograms of held-out margins on shared bins, with a line at 0."""
    fig, ax = plt.subplots(figsize=(6, 4))
    clean = {label: _finite(vals) for label, vals in margins.items()}
    clean = {label: vals for label, vals in clean.items() if vals}
    if clean:
        edges = np.histogram_bin_edges(np.concatenate([np.asarray(v) for v in clean.values()]), bins=bins)
        for label, vals in clean.items():
            share = sum(v > 0 for v in vals) / len(vals)
            ax.hist(vals, bins=edges, histtype="step", linewidth=1.5, label=f"{label} (>0: {share:.1%})")
        ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
        ax.legend()
        ax.set_xlabel("log p(chosen) - log p(rejected)")
        ax.set_ylabel("pairs")
    else:
        _empty(ax, "no margins")
    ax.set_title(title if title is not None else "held-out margins")
    return _save(fig, out)


def _relative(steps: list[int], values: list[float]) -> tuple[list[float], list[float]]:
    """(steps, values - first value), keeping only points with a finite value."""
    pts = [(float(s), v) for s, v in zip(steps, (_num(x) for x in values)) if v is not None]
    if not pts:
        return [], []
    start = pts[0][1]
    return [p[0] for p in pts], [p[1] - start for p in pts]


def _mean_curve(curves: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float]]:
    """Mean over curves at each step any of them has."""
    by_step: dict[float, list[float]] = defaultdict(list)
    for xs, ys in curves:
        for x, y in zip(xs, ys):
            by_step[x].append(y)
    steps = sorted(by_step)
    return steps, [float(np.mean(by_step[s])) for s in steps]


def plot_trajectories(tracks: list[dict], out: Path, title: str | None = None) -> Path:
    """Per-pair log p(chosen) / log p(rejected) relative to start, trained vs untrained pairs."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    panels = (("chosen", "log p(chosen) - start"), ("rejected", "log p(rejected) - start"))
    if not tracks:
        for ax, (_, label) in zip(axes, panels):
            _empty(ax, "no tracked pairs")
            ax.set_title(label)
    else:
        for ax, (key, label) in zip(axes, panels):
            groups: dict[bool, list[tuple[list[float], list[float]]]] = {True: [], False: []}
            for t in tracks:
                xs, ys = _relative(list(t.get("steps", [])), list(t.get(key, [])))
                if xs:
                    groups[bool(t.get("trained"))].append((xs, ys))
            for trained, curves in groups.items():
                color = TRAINED_COLOR if trained else UNTRAINED_COLOR
                for xs, ys in curves:
                    ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                if curves:
                    mx, my = _mean_curve(curves)
                    ax.plot(mx, my, color=color, linewidth=2.5)
            ax.axhline(0.0, color="black", linewidth=0.8, linestyle=":")
            ax.set_title(label)
            ax.set_xlabel("stage-2 step")
            ax.grid(alpha=0.3)
        counts = {flag: sum(bool(t.get("trained")) == flag for t in tracks) for flag in (True, False)}
        handles = [
            Line2D([], [], color=TRAINED_COLOR, alpha=0.4, label=f"trained pair ({counts[True]})"),
            Line2D([], [], color=UNTRAINED_COLOR, alpha=0.4, label=f"untrained pair ({counts[False]})"),
            Line2D([], [], color=TRAINED_COLOR, linewidth=2.5, label="trained mean"),
            Line2D([], [], color=UNTRAINED_COLOR, linewidth=2.5, label="untrained mean"),
        ]
        axes[1].legend(handles=handles, fontsize=8)
    fig.suptitle(title if title is not None else "noisy-pair log-prob trajectories (stage 2)")
    return _save(fig, out)
