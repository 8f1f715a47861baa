"""A custom judge used by tests/test_judges_local.py to exercise ``module:Class`` and entry-point
loading through ``build_judge``."""

from __future__ import annotations

from oracles.judges import Judgement, PairwiseJudge


class ConstantJudge(PairwiseJudge):
    """Always gives the same verdict (and does not call ``super().__init__``)."""

    def __init__(self, verdict: str = "A"):
        self.verdict = verdict

    def judge(self, prompts, responses_a, responses_b):
        self._count("calls", len(prompts))
        return [Judgement(self.verdict) for _ in prompts]


class NotAJudge:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
