"""How an API judge turns a batch into requests, and the replies back into one verdict per pair.

* Two identical responses are a tie, answered without any request (``identical_ties``).
* Identical requests inside one batch are sent once.
* With ``swap=True`` each pair is asked in both orders, (A, B) and (B, A); agreeing verdicts
  stand, disagreeing ones become "tie" and a pair abstains when either order has no answer.
  ``swap_pairs`` counts the pairs both orders answered, ``swap_disagreements`` those where the
  two orders disagree, and ``swap_disagreement`` (their ratio) measures the judge's position bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from oracles.judges.base import Judgement, combine_swapped, flip
from oracles.judges.prompting import parse_verdict

#: One pair's requests: (request key, whether it shows the responses as (B, A)) per order;
#: None for identical responses (a tie without asking).
Row = list[tuple[str, bool]] | None


@dataclass
class Reply:
    """What one request gave: its raw text (None: no answer) and how it was obtained."""

    raw: str | None
    status: str  # ok | cached | budget | error | malformed | skipped

    @property
    def verdict(self) -> str:
        return parse_verdict(self.raw) if self.raw is not None else "abstain"


class SwapPlanMixin:
    """The plan / combine half of an API judge with ``swap``, ``cache``, ``_key(prompt, first,
    second)`` (a request's cache key) and ``_count``."""

    swap: bool

    def _plan(self, prompts: Sequence[str], resp_a: Sequence[str], resp_b: Sequence[str]
              ) -> tuple[dict[str, tuple[str, str, str]], list[Row]]:
        """The batch's distinct requests (key -> (prompt, first, second)) and each pair's :data:`Row`."""
        requests: dict[str, tuple[str, str, str]] = {}
        plan: list[Row] = []
        for p, a, b in zip(prompts, resp_a, resp_b):
            if a == b:
                plan.append(None)
                continue
            orders = [(a, b, False)] + ([(b, a, True)] if self.swap else [])
            row = []
            for first, second, swapped in orders:
                k = self._key(p, first, second)  # type: ignore[attr-defined]
                requests.setdefault(k, (p, first, second))
                row.append((k, swapped))
            plan.append(row)
        return requests, plan

    def requests_needed(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> int:
        """How many requests :meth:`judge` would send for this batch now (its distinct requests
        not in the cache): a process's claim on a budget several processes share."""
        requests, _ = self._plan(prompts, responses_a, responses_b)
        return sum(1 for k in requests if self.cache.get(k) is None)  # type: ignore[attr-defined]

    def _combine(self, row: Row, by_key: dict[str, Reply]) -> Judgement:
        """One pair's judgement from the replies to its order(s), counting ties and disagreements."""
        count = self._count  # type: ignore[attr-defined]
        if row is None:
            count("identical_ties")
            return Judgement("tie")
        verdicts, raws = [], []
        for k, swapped in row:
            reply = by_key[k]
            verdicts.append(flip(reply.verdict) if swapped else reply.verdict)
            raws.append(reply.raw)
        if self.swap:
            verdict = combine_swapped(verdicts[0], verdicts[1])
            if "abstain" not in verdicts:
                count("swap_pairs")
                if verdicts[0] != verdicts[1]:
                    count("swap_disagreements")
            raw = None if raws == [None, None] else f"[order A,B]\n{raws[0]}\n\n[order B,A]\n{raws[1]}"
        else:
            verdict, raw = verdicts[0], raws[0]
        if verdict == "abstain":
            count("abstentions")
        return Judgement(verdict, None, raw)

    def stats(self) -> dict:
        """The counters of :meth:`PairwiseJudge.stats`; with ``swap``, also ``swap_disagreement``:
        the share of pairs answered in both orders whose two verdicts differ (None: no such pair)."""
        out = super().stats()  # type: ignore[misc]
        if self.swap:
            n = out["swap_pairs"]
            out["swap_disagreement"] = out["swap_disagreements"] / n if n else None
        return out


__all__ = ["Reply", "Row", "SwapPlanMixin"]
