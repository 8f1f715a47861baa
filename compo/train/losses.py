"""Stage-1 paired preference losses (DPO and its sigmoid / hinge / IPO / robust variants) as pure
functions of log-probabilities (DESIGN.md section 3); the unpaired ones (KTO, BCO) are in
:mod:`compo.train.unpaired_losses`, with the same conventions.

Every loss takes *sequence* log-probabilities (sums over completion tokens) of the policy and of
the frozen reference model and returns ``(losses, metrics)``:

* ``losses`` -- a ``Tensor[B]`` of per-row losses (the caller reduces, usually ``.mean()``);
  computed in at least float32 whatever the input dtype.
* ``metrics`` -- ``dict[str, Tensor]`` of detached 0-dim float tensors (call ``float()`` to log;
  tensors so that a trainer can gather them across processes without a host sync per key).
  Names follow TRL: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
  ``rewards/margins``, ``logps/chosen``, ``logps/rejected``; KTO adds ``kl``, BCO adds ``delta``.
  Unpaired losses (KTO, BCO) also report ``count/chosen``, ``count/rejected`` and the sums
  ``rewards/chosen_sum``, ``rewards/rejected_sum``, ``logps/chosen_sum``, ``logps/rejected_sum``
  (always present, 0 for an absent class) so means can be aggregated exactly across batches and
  processes; the per-class means are reported only for classes present in the batch, so no
  metric is ever NaN.

Rewards are ``beta * (logp_policy - logp_ref)``, detached.

Notation: ``lr = logp_policy - logp_ref`` (log-ratio), ``D = lr_chosen - lr_rejected``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DPO_LOSS_TYPES", "dpo_loss"]

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def _f(x: Tensor | float | Sequence[float]) -> Tensor:
    """As a tensor of at least float32 precision (bf16/fp16 inputs are upcast)."""
    t = torch.as_tensor(x)
    if not torch.is_floating_point(t) or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t


def _scalar(x: Tensor) -> Tensor:
    return x.detach().to(torch.float32).reshape(())


def _zero_like(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.float32, device=x.device)


# --------------------------------------------------------------------------------------------
# DPO family
# --------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Tensor | int | None = None,
    rejected_tokens: Tensor | int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Paired DPO-family loss on ``D = (pc - rc) - (pr - rr)``.

    loss_type:
      * ``"sigmoid"`` (DPO): ``-logsigmoid(beta D)``; with ``label_smoothing`` eps > 0 this is
        conservative DPO (cDPO): ``-(1-eps) logsigmoid(beta D) - eps logsigmoid(-beta D)``.
      * ``"hinge"`` (SLiC): ``relu(1 - beta D)``.
      * ``"ipo"``: ``(D - 1/(2 beta))^2`` on *per-token mean* log-probs. Pass either means
        directly, or sums together with ``chosen_tokens`` / ``rejected_tokens`` (completion token
        counts, int or ``Tensor[B]``) and they are divided here. The counts are ignored for the
        other loss types.
      * ``"robust"`` (rDPO, unbiased under label-flip rate eps = ``label_smoothing`` < 0.5):
        ``(-(1-eps) logsigmoid(beta D) + eps logsigmoid(-beta D)) / (1 - 2 eps)``.

    ``label_smoothing`` must be 0 for hinge and ipo (raises ``ValueError`` otherwise, rather than
    silently ignoring it). Rewards (metrics) are ``beta * lr`` of the same log-probs the loss uses
    (per-token means for IPO); ``logps/*`` are the policy log-probs as used by the loss.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    eps = float(label_smoothing)
    if loss_type in ("hinge", "ipo") and eps != 0.0:
        raise ValueError(f"label_smoothing is not defined for loss_type={loss_type!r}")
    if loss_type == "sigmoid" and not 0.0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for sigmoid, got {eps}")
    if loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for robust, got {eps}")

    pc, pr, rc, rr = _f(policy_chosen), _f(policy_rejected), _f(ref_chosen), _f(ref_rejected)
    if loss_type == "ipo":
        if chosen_tokens is not None:
            n = _f(chosen_tokens).to(pc.device)
            pc, rc = pc / n, rc / n
        if rejected_tokens is not None:
            n = _f(rejected_tokens).to(pr.device)
            pr, rr = pr / n, rr / n

    lr_c = pc - rc
    lr_r = pr - rr
    d = lr_c - lr_r
    bd = beta * d

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(bd)
        if eps > 0.0:
            losses = (1.0 - eps) * losses - eps * F.logsigmoid(-bd)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - bd)
    elif loss_type == "ipo":
        losses = (d - 1.0 / (2.0 * beta)) ** 2
    else:  # robust
        losses = (-(1.0 - eps) * F.logsigmoid(bd) + eps * F.logsigmoid(-bd)) / (1.0 - 2.0 * eps)

    chosen_rewards = (beta * lr_c).detach()
    rejected_rewards = (beta * lr_r).detach()
    metrics = {
        "rewards/chosen": _scalar(chosen_rewards.mean()),
        "rewards/rejected": _scalar(rejected_rewards.mean()),
        "rewards/accuracies": _scalar((chosen_rewards > rejected_rewards).float().mean()),
        "rewards/margins": _scalar((chosen_rewards - rejected_rewards).mean()),
        "logps/chosen": _scalar(pc.detach().mean()),
        "logps/rejected": _scalar(pr.detach().mean()),
    }
    return losses, metrics
