"""The paper's comparison oracle: a candidate head is better on a pair when it raises the
chosen log-prob and lowers the rejected one (strict), or raises the chosen log-prob and the
margin (relaxed, from the official code)."""

from __future__ import annotations

import torch

from oracles.base import BETTER, NOT_BETTER, Evidence, Oracle, OracleBatch, aggregate, register_oracle

RULES = ("strict", "relaxed")


def likelihood_votes(
    base_chosen: torch.Tensor,
    base_rejected: torch.Tensor,
    cand_chosen: torch.Tensor,
    cand_rejected: torch.Tensor,
    rule: str = "strict",
) -> torch.Tensor:
    """Per-pair votes (n, B): -1 where the candidate is better on that pair, else +1."""
    if rule not in RULES:
        raise ValueError(f"unknown likelihood rule '{rule}', allowed: {', '.join(RULES)}")
    up = cand_chosen > base_chosen
    if rule == "strict":
        better = up & (cand_rejected < base_rejected)
    else:
        better = up & ((cand_chosen - cand_rejected) > (base_chosen - base_rejected))
    return torch.where(better, BETTER, NOT_BETTER).to(torch.int8)


@register_oracle("likelihood")
class LikelihoodOracle(Oracle):
    """ComPO's log-likelihood oracle (Chen et al. 2025, Alg. 1) with batch aggregation."""

    needs = Evidence.LOGPROBS
    name = "likelihood"

    def __init__(self, rule: str = "strict", aggregation: str = "any"):
        if rule not in RULES:
            raise ValueError(f"unknown likelihood rule '{rule}', allowed: {', '.join(RULES)}")
        self.rule, self.aggregation = rule, aggregation
        aggregate(torch.zeros(1, 1), aggregation)  # validates the name early

    def compare(self, batch: OracleBatch) -> torch.Tensor:
        assert batch.base is not None and batch.candidates is not None
        votes = likelihood_votes(
            batch.base.chosen[None], batch.base.rejected[None],
            batch.candidates.chosen, batch.candidates.rejected, self.rule,
        )
        return aggregate(votes, self.aggregation)
