"""The pairwise judge interface, its counters and the judge registry.

A judge answers, for a batch of ``(prompt, response_a, response_b)`` triples, which response
is better. It is batch-oriented so that a stage-2 oracle can call :meth:`PairwiseJudge.judge`
once per step with every (base, candidate) text pair of that step.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable, Literal, Sequence

from oracles.base import load_object

Verdict = Literal["A", "B", "tie", "abstain"]
VERDICTS: tuple[str, ...] = ("A", "B", "tie", "abstain")

#: Counters every judge reports from :meth:`PairwiseJudge.stats` (judges may add more).
STAT_KEYS: tuple[str, ...] = (
    "calls",  # requests sent to the backend (API requests, RM pairs scored, questions asked)
    "cache_hits",  # answers served from the cache / record file, at no cost
    "retries",  # extra attempts after a retryable failure (429, 5xx, timeout, connection)
    "abstentions",  # returned judgements whose verdict is "abstain"
    "input_tokens",  # prompt tokens billed (API judges)
    "output_tokens",  # completion tokens billed (API judges)
    "errors",  # requests that failed for good (retries exhausted or non-retryable)
    "budget_exhausted",  # bool: the judge's call / token budget is spent (not reset on read)
)

#: Counters :func:`run_totals` sums over a run's step records (API judges report the last four).
SUMMED_KEYS: tuple[str, ...] = ("calls", "cache_hits", "abstentions", "errors", "input_tokens", "output_tokens",
                                "identical_ties", "swap_pairs", "swap_disagreements", "length_overruns")

JUDGE_GROUP = "compo.judges"


class JudgeQuit(Exception):
    """Raised by an interactive judge when the user asks to stop.

    Every answer given before the quit is already recorded, so the caller can stop cleanly
    at a step boundary and resume later without being asked again.
    """


class JudgeError(RuntimeError):
    """A judge cannot go on (bad credentials, unknown model, invalid configuration)."""


@dataclass(frozen=True)
class Judgement:
    """One verdict on a pair.

    ``verdict``: "A" or "B" (that response is better), "tie", or "abstain" (no usable answer:
    skipped, failed, over budget or unparseable). ``prob_a``: the judge's probability that A
    is better, when it has one (reward models); ``raw``: the judge's raw answer text, if any.
    """

    verdict: Verdict
    prob_a: float | None = None
    raw: str | None = None

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


def flip(verdict: str) -> str:
    """Swap the labels of a verdict (A <-> B); tie and abstain are unchanged."""
    return {"A": "B", "B": "A"}.get(verdict, verdict)


def combine_swapped(v_ab: str, v_ba: str) -> str:
    """Combine the verdicts of the two presentation orders, both in the caller's labels.

    Agreement gives that verdict, disagreement gives "tie" (position bias cancels out). If
    either order has no usable answer the pair abstains: a one-sided verdict would bring the
    position bias back (the answered half stays cached, so a later run completes the pair).
    """
    if v_ab == "abstain" or v_ba == "abstain":
        return "abstain"
    return v_ab if v_ab == v_ba else "tie"


def check_batch(prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> None:
    if not (len(prompts) == len(responses_a) == len(responses_b)):
        raise ValueError(
            f"prompts, responses_a and responses_b must have the same length, got "
            f"{len(prompts)}, {len(responses_a)}, {len(responses_b)}"
        )
    for name, seq in (("prompts", prompts), ("responses_a", responses_a), ("responses_b", responses_b)):
        for i, x in enumerate(seq):
            if not isinstance(x, str):
                raise TypeError(f"{name}[{i}] must be a str, got {type(x).__name__}")


def run_totals(records: Iterable[dict], prefix: str = "oracle/") -> dict:
    """The judge counters ``{prefix}<name>`` of per-step records summed over the run, plus
    ``{prefix}swap_disagreement``: the run's position-bias rate (share of the pairs asked in
    both orders whose two verdicts differ), when any pair was. {} when no record has counters."""
    totals: dict[str, Any] = {}
    for rec in records:
        for key in SUMMED_KEYS:
            value = rec.get(prefix + key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                totals[key] = totals.get(key, 0) + value
    if totals.get("swap_pairs"):
        totals["swap_disagreement"] = totals["swap_disagreements"] / totals["swap_pairs"]
    return {prefix + k: v for k, v in totals.items()}


def totals_line(summary: dict, prefix: str = "oracle/") -> str | None:
    """One summary line from :func:`run_totals` keys in ``summary`` (None when there are none)."""
    if prefix + "calls" not in summary:
        return None

    def get(key: str) -> Any:
        return summary.get(prefix + key, 0)

    line = (f"judge ({prefix.rstrip('/')}): {get('calls')} requests, {get('cache_hits')} cache hits, "
            f"{get('abstentions')} abstentions, {get('identical_ties')} identical-response ties")
    if prefix + "swap_disagreement" in summary:
        line += (f"; position bias: the two orders disagree on {summary[prefix + 'swap_disagreement']:.3f} "
                 f"of {get('swap_pairs')} pairs")
    if get("length_overruns"):
        line += f"; {get('length_overruns')} replies longer than max_output_tokens (see docs/judges.md)"
    return line


class PairwiseJudge(ABC):
    """Decides which of two responses to the same prompt is better.

    Subclasses implement :meth:`judge`; they count what they do with :meth:`_count` and say
    whether their budget is spent through :attr:`budget_exhausted`.
    """

    name: str = "judge"
    #: Judge-specific counters reported (as 0 when unused) besides :data:`STAT_KEYS`.
    extra_stat_keys: tuple[str, ...] = ()

    @abstractmethod
    def judge(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[Judgement]:
        """Return one :class:`Judgement` per ``(prompt, response_a, response_b)`` triple."""

    # -- counters -----------------------------------------------------------------------
    def _counter_state(self) -> tuple[threading.Lock, dict[str, int]]:
        # Created lazily so that subclasses need not call super().__init__().
        state = self.__dict__.get("_judge_counters")
        if state is None:
            state = self.__dict__.setdefault("_judge_counters", (threading.Lock(), {}))
        return state

    def _count(self, key: str, n: int = 1) -> None:
        lock, counters = self._counter_state()
        with lock:
            counters[key] = counters.get(key, 0) + n

    @property
    def budget_exhausted(self) -> bool:
        return False

    @property
    def budget_refusals(self) -> int:
        """Requests refused so far because the budget is spent (monotonic, never reset)."""
        return 0

    def stats(self) -> dict:
        """Counters since the last call (see :data:`STAT_KEYS`), then reset them.

        ``budget_exhausted`` is a state, not a counter: it stays true while the budget is spent.
        """
        lock, counters = self._counter_state()
        with lock:
            out: dict[str, Any] = {k: 0 for k in (*STAT_KEYS, *self.extra_stat_keys)}
            out.update(counters)
            counters.clear()
        out["budget_exhausted"] = bool(self.budget_exhausted)
        return out

    def close(self) -> None:
        """Release clients, caches and files."""

    def __enter__(self) -> "PairwiseJudge":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_REGISTRY: dict[str, type] = {}


def register_judge(name: str) -> Callable[[type], type]:
    """Class decorator: make a judge available to configs under ``name``."""

    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls

    return deco


def available_judges() -> list[str]:
    return sorted(set(_REGISTRY) | {ep.name for ep in entry_points(group=JUDGE_GROUP)})


def build_judge(spec: str, **kwargs: Any) -> PairwiseJudge:
    """Instantiate the judge ``spec``: a registered name, an entry point in group
    ``compo.judges``, or ``module:Class``; ``kwargs`` go to its constructor."""
    from oracles.options import check_options

    factory = load_object(spec, JUDGE_GROUP, _REGISTRY)
    judge = factory(**check_options(factory, kwargs, f"judge '{spec}'"))
    if not isinstance(judge, PairwiseJudge):
        raise TypeError(f"'{spec}' built a {type(judge).__name__}, which is not a PairwiseJudge")
    return judge
