"""The likelihood rule (strict / relaxed) and batch aggregation on hand-made log-probs."""

import pytest
import torch

from oracles import LikelihoodOracle, OracleBatch, SeqLogProbs, aggregate, build_oracle
from oracles.likelihood import likelihood_votes

BASE_C, BASE_R = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -19.0])
# candidates x pairs
CAND_C = torch.tensor([[-9.0, -19.0],   # chosen up on both
                       [-9.0, -21.0],   # chosen up on pair 0 only
                       [-11.0, -21.0],  # chosen down on both
                       [-9.5, -19.5]])
CAND_R = torch.tensor([[-13.0, -20.0],  # rejected down on both -> strict better on both
                       [-11.0, -20.0],  # pair 0: rejected up (strict no; relaxed margin 2 == 2 -> no)
                       [-13.0, -20.0],
                       [-11.6, -18.0]])  # pair 0: margin 2.1 > 2 (relaxed yes, strict no); pair 1: rejected up


def test_strict_rule():
    v = likelihood_votes(BASE_C[None], BASE_R[None], CAND_C, CAND_R, "strict")
    assert v.tolist() == [[-1, -1], [1, 1], [1, 1], [1, 1]]


def test_relaxed_rule():
    v = likelihood_votes(BASE_C[None], BASE_R[None], CAND_C, CAND_R, "relaxed")
    assert v.tolist() == [[-1, -1], [1, 1], [1, 1], [-1, 1]]


def test_aggregation_any_all_majority():
    per_pair = torch.tensor([[-1, -1, -1], [-1, 1, 1], [-1, -1, 1], [1, 1, 1], [0, 0, 0], [-1, 0, 1], [-1, 0, 0]])
    assert aggregate(per_pair, "any").tolist() == [-1, -1, -1, 1, 0, -1, -1]
    assert aggregate(per_pair, "all").tolist() == [-1, 1, 1, 1, 0, 1, -1]
    assert aggregate(per_pair, "majority").tolist() == [-1, 1, -1, 1, 0, 0, -1]
    with pytest.raises(ValueError, match="allowed: any, all, majority"):
        aggregate(per_pair, "most")


def test_oracle_end_to_end_and_registry():
    batch = OracleBatch(["p0", "p1"], ["c0", "c1"], ["r0", "r1"], 4, SeqLogProbs(BASE_C, BASE_R), SeqLogProbs(CAND_C, CAND_R))
    assert LikelihoodOracle("strict", "all").compare(batch).tolist() == [-1, 1, 1, 1]
    assert build_oracle("likelihood", rule="relaxed", aggregation="any").compare(batch).tolist() == [-1, 1, 1, -1]
    assert build_oracle("oracles.likelihood:LikelihoodOracle").compare(batch).tolist() == [-1, 1, 1, 1]
    with pytest.raises(ValueError, match="unknown name 'nope'"):
        build_oracle("nope")
