"""GenerationOracle: turns any pairwise judge into a stage-2 comparison oracle.

Per step, stage 2 generates one response per prompt from the base head (once) and from every
candidate head (in batches, each row applying its own head); the judge compares base (A) with
candidate (B) per prompt; a B win is a 'better' vote for that pair, an A win 'not better', a
tie or abstention 0; the batch rule (any / all / majority) makes one vote per candidate.

Stage 2 calls :meth:`GenerationOracle.collect` for each chunk of candidates (generation only)
and :meth:`GenerationOracle.settle` once per step: the judge then sees the step's questions in
one batch, in candidate order, whatever the chunking. Across processes (torchrun) every rank
generates its own candidates' responses and ``settle`` is collective: a sum of the question
digests tells each rank which questions it owns (those whose first occurrence it holds), each
owner asks the judge about every occurrence of its questions, and a sum of the verdict codes
gives every rank all m votes. So each distinct question is asked by one rank, the judge's
counters add up to one process's, and a judge with a budget (API judges) spends it across
ranks as one process would: each rank may send its share of the requests left, in rank order.
Only fixed-size integer tensors travel, never text (docs/scaling.md, "Bytes per step").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

from oracles.base import ABSTAIN, BETTER, NOT_BETTER, Evidence, Oracle, OracleBatch, aggregate, register_oracle
from oracles.judges.base import STAT_KEYS, JudgeError, JudgeQuit, PairwiseJudge
from oracles.judges.budget import Budget

_VOTE = {"B": BETTER, "A": NOT_BETTER, "tie": ABSTAIN, "abstain": ABSTAIN}
_CODE = {"A": 1, "B": 2, "tie": 3, "abstain": 4}  # 0: a slot nobody collected
_CODE_VOTE = torch.tensor([ABSTAIN, NOT_BETTER, BETTER, ABSTAIN, ABSTAIN], dtype=torch.int8)
_MASK63 = (1 << 63) - 1


def prompt_text(prompt) -> str:
    """A judge-readable prompt: plain text, or the conversation as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def question_digest(prompt: str, a: str, b: str) -> int:
    """A positive 63-bit hash of one question (its texts in shown order); 0 means 'no question'."""
    h = hashlib.blake2b(digest_size=8)
    for part in (prompt, a, b):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return (int.from_bytes(h.digest(), "little") & _MASK63) or 1


class RankGroup(Protocol):
    """The processes of one stage-2 run, as :meth:`GenerationOracle.settle` needs them."""

    world: int
    rank: int

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of a CPU int64 tensor over all ranks (every rank gets the result)."""


@dataclass
class _Question:
    slot: int  # candidate * n_prompts + prompt
    prompt: str
    a: str
    b: str

    @property
    def digest(self) -> int:
        return question_digest(self.prompt, self.a, self.b)


def _owned(digests: list[int], local: dict[int, "_Question"]) -> list[tuple[int, "_Question"]]:
    """(slot, question) for every occurrence of the questions this rank owns, in slot order: a
    question belongs to the rank holding its first occurrence (its texts are that rank's)."""
    first: dict[int, int] = {}
    for s, d in enumerate(digests):
        if d:
            first.setdefault(d, s)
    return [(s, local[first[d]]) for s, d in enumerate(digests) if d and first[d] in local]


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
        self._questions: list[_Question] = []
        self._summed: dict[str, int] = {}  # judge counters summed over ranks by settle(), until stats()

    def compare(self, batch: OracleBatch) -> torch.Tensor:
        return self.vote([(batch, 0)], batch.n_candidates, len(batch.prompts))

    def vote(self, batches: Iterable[tuple[OracleBatch, int]], n_candidates: int, n_prompts: int,
             group: RankGroup | None = None) -> torch.Tensor:
        """One round: (batch, its first candidate's index) pairs, generated as they come (a lazy
        iterable may reuse its perturbation buffer between batches), then every question judged
        at once; (n_candidates,) votes. With ``group`` every rank calls it once a round, each with
        its own batches, and every rank gets every vote (:meth:`settle`)."""
        for batch, first in batches:
            self.collect(batch, first)
        return self.settle(n_candidates, n_prompts, group)

    def collect(self, batch: OracleBatch, first: int) -> None:
        """Generate the responses of candidates ``first .. first + n - 1`` and keep their questions."""
        if batch.generate is None or "base_responses" not in batch.extra:
            raise ValueError("GenerationOracle needs generated responses: run it through compo's stage 2")
        base = batch.extra["base_responses"]
        prompts = [prompt_text(p) for p in batch.prompts]
        for i, row in enumerate(batch.generate()):  # (n_candidates, n_prompts)
            for j, (p, a, b) in enumerate(zip(prompts, base, row)):
                self._questions.append(_Question((first + i) * len(prompts) + j, p, a, b))

    def settle(self, n_candidates: int, n_prompts: int, group: RankGroup | None = None) -> torch.Tensor:
        """Judge every collected question; (n_candidates,) votes. With ``group`` (world > 1) every
        rank must call it once per round, and every rank gets every vote."""
        qs, self._questions = self._questions, []
        world = group.world if group is not None else 1
        slots = n_candidates * n_prompts
        digests = torch.zeros(slots, dtype=torch.int64)
        for q in qs:
            digests[q.slot] = q.digest
        if world > 1:
            digests = group.sum(digests)
        mine = _owned(digests.tolist(), {q.slot: q for q in qs})
        asked = ([q.prompt for _, q in mine], [q.a for _, q in mine], [q.b for _, q in mine])
        budget = self._shared_budget() if world > 1 else None
        spent0 = budget.spent() if budget is not None else {"calls": 0, "tokens": 0}
        codes = torch.zeros(slots, dtype=torch.int64)
        failure: Exception | None = None
        try:  # a failure must reach the other ranks (in the sum below), or they would wait forever
            need = self.judge.requests_needed(*asked) if budget is not None and mine else 0
        except Exception as e:
            need, failure = 0, e
        if budget is not None:
            self._take_share(budget, group, need)
        try:
            for (s, _), v in zip(mine, self.judge.judge(*asked) if mine and failure is None else []):
                codes[s] = _CODE[v.verdict]
        except Exception as e:
            if world == 1:
                raise
            failure = e
        keys, counters = self._counter_keys(), self.judge.stats()
        spent = budget.spent() if budget is not None else spent0
        tail = [int(isinstance(failure, JudgeQuit)), int(failure is not None and not isinstance(failure, JudgeQuit)),
                spent["calls"] - spent0["calls"], spent["tokens"] - spent0["tokens"]]
        result = torch.cat([codes, torch.tensor(tail + [int(counters.get(k) or 0) for k in keys], dtype=torch.int64)])
        if world > 1:
            result = group.sum(result)
        codes, (quits, errors, d_calls, d_tokens, *summed) = result[:slots], result[slots:].tolist()
        if budget is not None:
            budget.adopt(spent0["calls"] + d_calls, spent0["tokens"] + d_tokens)
        for k, n in zip(keys, summed):
            self._summed[k] = self._summed.get(k, 0) + n
        for k, v in counters.items():  # a custom judge's own counters stay per rank
            if k not in keys and isinstance(v, int) and not isinstance(v, bool):
                self._summed[k] = self._summed.get(k, 0) + v
        if errors:
            raise failure if failure is not None and not isinstance(failure, JudgeQuit) else JudgeError(
                "the judge failed on another process (see that process's log)")
        if quits:
            raise failure if isinstance(failure, JudgeQuit) else JudgeQuit("the judge was stopped on another process")
        per_pair = _CODE_VOTE[codes.clamp(0, 4)].view(n_candidates, n_prompts)
        return aggregate(per_pair, self.aggregation)

    def _counter_keys(self) -> list[str]:
        """The judge's integer counters, in an order every rank shares (its declared keys)."""
        return [k for k in dict.fromkeys((*STAT_KEYS, *getattr(self.judge, "extra_stat_keys", ())))
                if k != "budget_exhausted"]

    def _shared_budget(self) -> Budget | None:
        budget = getattr(self.judge, "budget", None)
        if isinstance(budget, Budget) and budget.limited and hasattr(self.judge, "requests_needed"):
            return budget
        return None

    @staticmethod
    def _take_share(budget: Budget, group: RankGroup, need: int) -> None:
        """This rank's share of the requests the budget has left: ranks claim their needs (the
        requests their questions would send) in rank order, so the round sends min(left, total
        need) requests, as one process would."""
        needs = torch.zeros(group.world, dtype=torch.int64)
        needs[group.rank] = need
        needs = group.sum(needs).tolist()
        left = budget.calls_left()
        before = sum(needs[: group.rank])
        budget.share(need if left is None else max(0, min(need, left - before)))

    def stats(self) -> dict:
        out = self.judge.stats()
        for k, n in self._summed.items():  # what settle() counted (summed over ranks)
            out[k] = out.get(k, 0) + n
        self._summed = {}
        if "swap_disagreement" in out and "swap_pairs" in out:
            out["swap_disagreement"] = out["swap_disagreements"] / out["swap_pairs"] if out["swap_pairs"] else None
        return out

    def budget_refusals(self) -> int:
        return self.judge.budget_refusals

    def close(self) -> None:
        self.judge.close()
