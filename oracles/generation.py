"""GenerationOracle: turns any pairwise judge into a stage-2 comparison oracle.

Per step, stage 2 generates one response per prompt from the base head (once) and from every
candidate head (in batches, each row applying its own head); the judge compares base (A) with
candidate (B) per prompt; a B win is a 'better' vote for that pair, an A win 'not better', a
tie or abstention 0; the batch rule (any / all / majority) makes one vote per candidate.
"""

from __future__ import annotations

import torch

from oracles.judges.base import PairwiseJudge
from oracles.base import ABSTAIN, BETTER, NOT_BETTER, Evidence, Oracle, OracleBatch, aggregate, register_oracle

_VOTE = {"B": BETTER, "A": NOT_BETTER, "tie": ABSTAIN, "abstain": ABSTAIN}


def prompt_text(prompt) -> str:
    """A judge-readable prompt: plain text, or the conversation as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


@register_oracle("generation")
class GenerationOracle(Oracle):
    """Votes by asking a judge whether the candidate head's response beats the base head's."""

    needs = Evidence.GENERATIONS
    name = "generation"

    def __init__(self, judge: str | PairwiseJudge = "openai", judge_options: dict | None = None, aggregation: str = "any",
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0):
        from oracles.judges import build_judge
        from oracles.options import OptionError

        try:
            self.judge = judge if isinstance(judge, PairwiseJudge) else build_judge(judge, **(judge_options or {}))
        except OptionError as e:
            raise e.under("judge_options") from None
        self.aggregation = aggregation
        aggregate(torch.zeros(1, 1), aggregation)
        self.max_new_tokens, self.do_sample, self.temperature = max_new_tokens, do_sample, temperature

    def compare(self, batch: OracleBatch) -> torch.Tensor:
        if batch.generate is None or "base_responses" not in batch.extra:
            raise ValueError("GenerationOracle needs generated responses: run it through compo's stage 2")
        base = batch.extra["base_responses"]
        cands = batch.generate()  # (n_candidates, n_prompts)
        prompts = [prompt_text(p) for p in batch.prompts]
        n, p = len(cands), len(prompts)
        verdicts = self.judge.judge(prompts * n, base * n, [c for row in cands for c in row])
        per_pair = torch.tensor([_VOTE[j.verdict] for j in verdicts], dtype=torch.int8).view(n, p)
        return aggregate(per_pair, self.aggregation)

    def stats(self) -> dict:
        return self.judge.stats()

    def budget_refusals(self) -> int:
        return self.judge.budget_refusals

    def close(self) -> None:
        self.judge.close()
