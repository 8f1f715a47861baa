"""Comparison oracles (stage 2) and pairwise judges.

An oracle answers, for each candidate head, whether it is better than the base head on a
batch of noisy pairs: -1 (better), +1 (not better) or 0 (tie / abstain).
"""

from oracles.base import (
    ABSTAIN,
    BETTER,
    NOT_BETTER,
    Evidence,
    Oracle,
    OracleBatch,
    SeqLogProbs,
    aggregate,
    available_oracles,
    build_oracle,
    register_oracle,
)
from oracles.likelihood import LikelihoodOracle
from oracles.generation import GenerationOracle

__all__ = [
    "ABSTAIN", "BETTER", "NOT_BETTER", "Evidence", "Oracle", "OracleBatch", "SeqLogProbs",
    "aggregate", "available_oracles", "build_oracle", "register_oracle", "LikelihoodOracle", "GenerationOracle",
]
