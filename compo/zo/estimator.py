"""The ComPO estimator as pure functions: direction, sparsity, skip rule, update (DESIGN.md §2)."""

from __future__ import annotations

import math

import torch


def normalise(u: torch.Tensor) -> torch.Tensor | None:
    """g = u / ||u||_2, or None when u is zero (no usable direction)."""
    norm = torch.linalg.vector_norm(u, dtype=torch.float64)
    if norm == 0 or not torch.isfinite(norm):
        return None
    return u / norm.to(u.dtype)


def sparsify(g: torch.Tensor, rule: str = "absolute", lambda_g: float = 2.2e-4, rho: float = 0.01) -> torch.Tensor:
    """Zero small entries without renormalising: |g_j| >= lambda_g (paper) or the top rho fraction."""
    if rule == "absolute":
        return g.masked_fill(g.abs() < lambda_g, 0.0)
    if rule == "top_fraction":
        k = max(1, min(g.numel(), math.ceil(rho * g.numel())))
        flat = g.flatten()
        keep = torch.topk(flat.abs(), k, sorted=False).indices
        out = torch.zeros_like(flat)
        out[keep] = flat[keep]
        return out.view_as(g)
    raise ValueError(f"unknown sparsity rule '{rule}', allowed: absolute, top_fraction")


def skip_reason(n_minus: int, m: int, threshold: float) -> str | None:
    """Why the step is skipped (too few 'better' votes: N-/m < lambda), or None to proceed."""
    if n_minus / m < threshold:
        return f"weak signal: N-/m = {n_minus}/{m} = {n_minus / m:.3f} < {threshold}"
    return None


def proposed_head(w: torch.Tensor, g_sparse: torch.Tensor, gamma: float, frac: float) -> torch.Tensor:
    """W - gamma * (N-/m) * g_sparse: a step against the estimated 'worse' direction."""
    return w - (gamma * frac) * g_sparse
