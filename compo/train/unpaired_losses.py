"""Stage-1 unpaired losses, KTO and BCO, as pure functions of log-probabilities (DESIGN.md
section 3), with KTO's mismatched-pair reference point and BCO's reward shift. The conventions
(``(losses, metrics)``, TRL's metric names, per-class sums so no metric is NaN) are those of
:mod:`compo.train.losses`."""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from compo.train.losses import _f, _scalar

__all__ = ["kto_loss", "mismatched_indices", "kto_weight_warning", "bco_loss", "bco_rewards", "RewardShift"]


# --------------------------------------------------------------------------------------------
# Unpaired helpers
# --------------------------------------------------------------------------------------------


def _class_metrics(
    rewards: Tensor, logps: Tensor, labels: Tensor
) -> dict[str, Tensor]:
    """Per-class sums, counts and (only for present classes) means. Never NaN."""
    up = labels
    down = ~labels
    out: dict[str, Tensor] = {}
    for name, mask in (("chosen", up), ("rejected", down)):
        m = mask.to(rewards.dtype)
        n = m.sum()
        r_sum = (rewards * m).sum()
        l_sum = (logps * m).sum()
        out[f"count/{name}"] = _scalar(n)
        out[f"rewards/{name}_sum"] = _scalar(r_sum)
        out[f"logps/{name}_sum"] = _scalar(l_sum)
        if bool(mask.any()):
            out[f"rewards/{name}"] = _scalar(r_sum / n)
            out[f"logps/{name}"] = _scalar(l_sum / n)
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def _labels(labels: Tensor | Sequence[bool], device: torch.device) -> Tensor:
    lab = torch.as_tensor(labels, device=device)
    if lab.dtype != torch.bool:
        lab = lab != 0
    return lab


# --------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------


def mismatched_indices(n: int) -> list[int]:
    """Completion index to pair with each prompt for KTO's KL reference point.

    Prompt ``i`` is paired with completion ``i - 1`` (rotation by one): ``[n-1, 0, 1, ..., n-2]``.
    For ``n <= 1`` there is no mismatched completion and ``[]`` is returned; ``kto_loss`` then
    receives empty KL tensors and uses its ``kl_fallback`` (see there).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n <= 1:
        return []
    return [(i - 1) % n for i in range(n)]


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor | Sequence[bool],
    kl_policy_logps: Tensor,
    kl_ref_logps: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reduce_kl: Callable[[Tensor], Tensor] | None = None,
    kl_fallback: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO loss on unpaired rows ``(x, y, label)``; ``labels`` True = desirable.

    ``kl_policy_logps`` / ``kl_ref_logps`` are the log-probs of the mismatched pairs
    ``(x_i, y_{mismatched_indices(B)[i]})``. The reference point is
    ``z = max(0, mean(kl_policy - kl_ref))``, detached.

    Multi-process: ``reduce_kl`` is applied to the detached 2-vector ``[sum, count]`` of the local
    mismatched log-ratios (e.g. ``lambda t: accelerator.reduce(t, "sum")`` or an all-reduce
    mean -- the ratio ``sum / count`` is the same either way), so the global mean is weighted by
    rows and every process makes the collective call even when it has no mismatched pair.
    Default: identity.

    If no mismatched pair exists anywhere (global count 0, e.g. batch size 1 on one process), ``z``
    falls back to ``kl_fallback`` (default 0.0: the KL term is a non-negative quantity whose lower
    bound is 0; a caller may pass a running estimate instead), still clamped at >= 0.

    Row losses: desirable ``w_d (1 - sigmoid(beta (lr - z)))``; undesirable
    ``w_u (1 - sigmoid(beta (z - lr)))``. One-class batches are finite: metrics of the absent
    class are omitted (counts and sums are 0).
    """
    pl, rl = _f(policy_logps), _f(ref_logps)
    lab = _labels(labels, pl.device)
    if lab.shape != pl.shape:
        raise ValueError(f"labels shape {tuple(lab.shape)} != logps shape {tuple(pl.shape)}")

    kl_lr = (_f(kl_policy_logps) - _f(kl_ref_logps)).detach().to(pl.device, pl.dtype).reshape(-1)
    stats = torch.stack([kl_lr.sum(), torch.tensor(float(kl_lr.numel()), dtype=pl.dtype,
                                                   device=pl.device)])
    if reduce_kl is not None:
        stats = reduce_kl(stats)
    total, count = stats[0], stats[1]
    if float(count) > 0:
        z = total / count
    else:
        z = torch.tensor(float(kl_fallback), dtype=pl.dtype, device=pl.device)
    z = z.clamp(min=0.0).detach()

    lr = pl - rl
    desirable = desirable_weight * (1.0 - torch.sigmoid(beta * (lr - z)))
    undesirable = undesirable_weight * (1.0 - torch.sigmoid(beta * (z - lr)))
    losses = torch.where(lab, desirable, undesirable)

    rewards = (beta * lr).detach()
    metrics = _class_metrics(rewards, pl.detach(), lab)
    metrics["kl"] = _scalar(z)
    return losses, metrics


def kto_weight_warning(
    n_desirable: int,
    n_undesirable: int,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> str | None:
    """Warning text if ``(w_d * n_d) / (w_u * n_u)`` is outside the KTO authors' [1, 4/3], else None."""
    lo, hi = 1.0, 4.0 / 3.0
    if n_desirable <= 0 or n_undesirable <= 0:
        return (
            f"KTO data has {n_desirable} desirable and {n_undesirable} undesirable examples; "
            "both classes are needed (the recommended weighted ratio "
            "desirable_weight*n_desirable / (undesirable_weight*n_undesirable) is in [1, 4/3])."
        )
    if desirable_weight <= 0 or undesirable_weight <= 0:
        return (
            f"KTO weights must be positive (desirable_weight={desirable_weight}, "
            f"undesirable_weight={undesirable_weight})."
        )
    ratio = (desirable_weight * n_desirable) / (undesirable_weight * n_undesirable)
    tol = 1e-9
    if lo - tol <= ratio <= hi + tol:
        return None
    d_lo = lo * undesirable_weight * n_undesirable / n_desirable
    d_hi = hi * undesirable_weight * n_undesirable / n_desirable
    return (
        f"KTO weighted class ratio desirable_weight*n_desirable / "
        f"(undesirable_weight*n_undesirable) = {desirable_weight}*{n_desirable} / "
        f"({undesirable_weight}*{n_undesirable}) = {ratio:.4g} is outside the recommended "
        f"[1, 4/3]; with undesirable_weight={undesirable_weight}, use desirable_weight in "
        f"[{d_lo:.4g}, {d_hi:.4g}]."
    )


# --------------------------------------------------------------------------------------------
# BCO
# --------------------------------------------------------------------------------------------


def bco_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float = 0.1) -> Tensor:
    """Detached BCO rewards ``beta * (policy - ref)``: what ``RewardShift.accumulate`` expects."""
    return (beta * (_f(policy_logps) - _f(ref_logps))).detach()


def bco_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor | Sequence[bool],
    delta: float | Tensor,
    beta: float = 0.1,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """BCO loss; ``labels`` True = thumbs-up. ``r = beta * lr``.

    thumbs-up: ``-logsigmoid(r - delta)``; thumbs-down: ``-w logsigmoid(-(r - delta))``.
    ``delta`` (float or 0-dim tensor, detached) is the reward shift, normally
    ``RewardShift.delta``. ``weights`` (``Tensor[B]``, optional) are the UDM density-ratio
    weights; only the thumbs-down rows use them (thumbs-up rows are weighted 1 whatever the
    value passed). Metrics add ``delta``.
    """
    pl, rl = _f(policy_logps), _f(ref_logps)
    lab = _labels(labels, pl.device)
    if lab.shape != pl.shape:
        raise ValueError(f"labels shape {tuple(lab.shape)} != logps shape {tuple(pl.shape)}")
    d = torch.as_tensor(delta, dtype=pl.dtype, device=pl.device).detach()
    r = beta * (pl - rl)
    up = -F.logsigmoid(r - d)
    down = -F.logsigmoid(-(r - d))
    if weights is not None:
        w = _f(weights).to(pl.device, pl.dtype).detach()
        if w.shape != pl.shape:
            raise ValueError(f"weights shape {tuple(w.shape)} != logps shape {tuple(pl.shape)}")
        down = w * down
    losses = torch.where(lab, up, down)
    metrics = _class_metrics(r.detach(), pl.detach(), lab)
    metrics["delta"] = _scalar(d)
    return losses, metrics


class RewardShift:
    """BCO reward shift delta from running means over all training so far (not EMAs).

    * ``mode="midpoint"`` (paper, default): ``(mean_up + mean_down) / 2``, where each mean is over
      every thumbs-up (thumbs-down) reward seen so far. Until both classes have been seen, it falls
      back to the mean of all rewards seen.
    * ``mode="mean"`` (TRL): the running mean of all rewards.

    ``delta`` is 0.0 before any data. Usage per optimizer step::

        for micro in micro_batches:
            loss, m = bco_loss(..., delta=shift.delta)      # same delta for every micro-batch
            shift.accumulate(bco_rewards(...), labels)
        optimizer.step(); shift.step()                       # fold buffered sums once

    ``all_reduce`` (multi-process): called in ``step()`` on the CPU float64 tensor
    ``[sum_up, n_up, sum_down, n_down]`` of this process's buffered micro-batches; must return a
    tensor of the same shape, e.g. ``lambda t: accelerator.reduce(t.to(device), "sum").cpu()``.
    A sum or a mean both work (delta only uses ratios of sums to counts). ``step()`` calls it
    even when nothing was buffered, so every process must call ``step()`` at the same points.
    Default: identity.

    ``state_dict()`` holds plain floats (JSON-serialisable) and is saved with checkpoints.
    """

    MODES = ("midpoint", "mean")

    def __init__(
        self,
        mode: str = "midpoint",
        all_reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.all_reduce = all_reduce
        self.sum_up = 0.0
        self.n_up = 0.0
        self.sum_down = 0.0
        self.n_down = 0.0
        self._pending = [0.0, 0.0, 0.0, 0.0]

    # -- statistics -----------------------------------------------------------------------
    @property
    def delta(self) -> float:
        n = self.n_up + self.n_down
        if n <= 0:
            return 0.0
        if self.mode == "midpoint" and self.n_up > 0 and self.n_down > 0:
            return 0.5 * (self.sum_up / self.n_up + self.sum_down / self.n_down)
        return (self.sum_up + self.sum_down) / n

    @property
    def mean_up(self) -> float | None:
        return self.sum_up / self.n_up if self.n_up > 0 else None

    @property
    def mean_down(self) -> float | None:
        return self.sum_down / self.n_down if self.n_down > 0 else None

    # -- updates --------------------------------------------------------------------------
    def accumulate(self, rewards: Tensor | Sequence[float], labels: Tensor | Sequence[bool]) -> None:
        """Buffer one micro-batch of rewards (``beta * lr``, detached); ``labels`` True = up."""
        r = torch.as_tensor(rewards).detach().to("cpu", torch.float64).reshape(-1)
        lab = _labels(labels, torch.device("cpu")).reshape(-1)
        if lab.shape != r.shape:
            raise ValueError(f"labels shape {tuple(lab.shape)} != rewards shape {tuple(r.shape)}")
        if not bool(torch.isfinite(r).all()):
            raise ValueError("RewardShift.accumulate got non-finite rewards")
        self._pending[0] += float(r[lab].sum())
        self._pending[1] += float(lab.sum())
        self._pending[2] += float(r[~lab].sum())
        self._pending[3] += float((~lab).sum())

    def step(self) -> None:
        """Fold the buffered micro-batches into the running sums (once per optimizer step)."""
        t = torch.tensor(self._pending, dtype=torch.float64)
        if self.all_reduce is not None:
            t = self.all_reduce(t)
        vals = [float(v) for v in torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1)]
        if len(vals) != 4:
            raise ValueError(f"all_reduce must return 4 values, got {len(vals)}")
        self.sum_up += vals[0]
        self.n_up += vals[1]
        self.sum_down += vals[2]
        self.n_down += vals[3]
        self._pending = [0.0, 0.0, 0.0, 0.0]

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, float | str | list[float]]:
        return {
            "mode": self.mode,
            "sum_up": float(self.sum_up),
            "n_up": float(self.n_up),
            "sum_down": float(self.sum_down),
            "n_down": float(self.n_down),
            "pending": [float(v) for v in self._pending],
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore the running sums. The sums serve both modes, so ``mode`` stays as constructed."""
        self.sum_up = float(state["sum_up"])  # type: ignore[arg-type]
        self.n_up = float(state["n_up"])  # type: ignore[arg-type]
        self.sum_down = float(state["sum_down"])  # type: ignore[arg-type]
        self.n_down = float(state["n_down"])  # type: ignore[arg-type]
        pending = state.get("pending", [0.0, 0.0, 0.0, 0.0])
        self._pending = [float(v) for v in pending]  # type: ignore[union-attr]
        for v in (self.sum_up, self.n_up, self.sum_down, self.n_down, *self._pending):
            if not math.isfinite(v):
                raise ValueError("RewardShift state has non-finite values")

    def __repr__(self) -> str:
        return (
            f"RewardShift(mode={self.mode!r}, delta={self.delta:.6g}, n_up={self.n_up:g}, "
            f"n_down={self.n_down:g})"
        )
