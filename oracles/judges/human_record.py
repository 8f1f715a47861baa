"""What the terminal and the browser human judges share: the answer record, the seeded
left/right order, the answer vocabulary and the per-batch plan with its budget.

The record is a JSONL file, one answer per line, appended and fsync'ed as soon as it is given,
keyed by a hash of ``(prompt, response_a, response_b)``. Both judges write the same fields, so
either can resume the other's file. A pair on record with its responses the other way round is
reused with the labels flipped. Two identical responses are a tie without asking (a shuffled
answer about two copies of one text would be a vote made of noise).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

from oracles.judges.base import Judgement, PairwiseJudge, check_batch, flip

log = logging.getLogger(__name__)

#: Typed answer -> choice ("left" / "right" mean the response shown on that side).
ANSWERS = {
    "a": "left", "1": "left", "l": "left", "left": "left",
    "b": "right", "2": "right", "r": "right", "right": "right",
    "t": "tie", "tie": "tie", "=": "tie",
    "s": "skip", "skip": "skip",
    "q": "quit", "quit": "quit", "exit": "quit",
}
RECORDED_VERDICTS = ("A", "B", "tie", "abstain")


def pair_key(prompt: str, response_a: str, response_b: str) -> str:
    blob = json.dumps([prompt, response_a, response_b], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def shown_swapped(seed: int, key: str) -> bool:
    """Whether the pair is shown as (B, A): a seeded function of the pair, so it never changes."""
    return random.Random(f"{seed}:{key}").random() < 0.5


def verdict_for(choice: str, swapped: bool) -> str:
    """The verdict, in the caller's labels, of a choice made on screen."""
    if choice == "skip":
        return "abstain"
    if choice == "tie":
        return "tie"
    if choice not in ("left", "right"):
        raise ValueError(f"not an answer: {choice!r}")
    shown = "A" if choice == "left" else "B"
    return flip(shown) if swapped else shown


class AnswerRecord:
    """The JSONL answer file: loaded once, then appended to (flush + fsync) per answer."""

    def __init__(self, path: str | PathLike):
        self.path = Path(path).expanduser()
        self.answers: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        bad = 0
        for line in data.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if rec["verdict"] not in RECORDED_VERDICTS:
                    raise ValueError(rec["verdict"])
                self.answers[str(rec["key"])] = rec
            except (ValueError, KeyError, TypeError):
                bad += 1
        if bad:
            log.warning("human judge: ignored %d unreadable line(s) in %s", bad, self.path)
        if data and not data.endswith(b"\n"):  # a write cut short: start the next record on a new line
            self._append_bytes(b"\n")

    def _append_bytes(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def lookup(self, prompt: str, response_a: str, response_b: str) -> tuple[str, str | None] | None:
        """(verdict, raw answer) on record for the pair, either way round, or None."""
        rec = self.answers.get(pair_key(prompt, response_a, response_b))
        if rec is not None:
            return rec["verdict"], rec.get("answer")
        rev = self.answers.get(pair_key(prompt, response_b, response_a))
        if rev is not None:
            return flip(rev["verdict"]), rev.get("answer")
        return None

    def add(self, key: str, verdict: str, answer: str, swapped: bool, seed: int,
            prompt: str, response_a: str, response_b: str) -> None:
        rec = {"key": key, "verdict": verdict, "answer": answer, "shown_swapped": swapped,
               "time": time.time(), "seed": seed, "prompt": prompt, "response_a": response_a,
               "response_b": response_b}
        self._append_bytes((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        self.answers[key] = rec

    def __len__(self) -> int:
        return len(self.answers)


@dataclass
class Question:
    """One pair to put to the person; ``left`` / ``right`` are the texts in screen order."""

    key: str
    prompt: str
    response_a: str
    response_b: str
    swapped: bool

    @property
    def left(self) -> str:
        return self.response_b if self.swapped else self.response_a

    @property
    def right(self) -> str:
        return self.response_a if self.swapped else self.response_b


class RecordedHumanJudge(PairwiseJudge):
    """A person answers, every answer lands in an :class:`AnswerRecord` at once.

    :meth:`judge` ties identical responses at once (``identical_ties``: not asked, not recorded,
    no budget), serves pairs on record from it, puts each other distinct pair to the person once
    (at most ``max_calls`` questions per judge object; the rest abstain and count as budget
    refusals, so stage 2 pauses before that step) and returns the verdicts in batch order.
    Subclasses implement :meth:`_ask_all` (the terminal, a browser page).
    """

    extra_stat_keys = ("identical_ties",)

    def __init__(self, record_path: str | PathLike, seed: int = 0, max_calls: int | None = None):
        if max_calls is not None and (isinstance(max_calls, bool) or max_calls < 0):
            raise ValueError(f"max_calls must be a non-negative integer or None, got {max_calls!r}")
        self.record = AnswerRecord(record_path)
        self.record_path = self.record.path
        self.seed = seed
        self.max_calls = max_calls
        self._asked = 0  # questions answered by this judge object (the budget's unit)
        self._refused = 0

    def recorded(self) -> dict[str, str]:
        """key -> verdict for every answer on record."""
        return {k: r["verdict"] for k, r in self.record.answers.items()}

    @property
    def budget_left(self) -> int | None:
        return None if self.max_calls is None else max(0, self.max_calls - self._asked)

    @property
    def budget_exhausted(self) -> bool:
        return self.max_calls is not None and self._asked >= self.max_calls

    @property
    def budget_refusals(self) -> int:
        return self._refused

    def answer(self, q: Question, choice: str, raw: str) -> str:
        """Record the person's ``choice`` on ``q``; returns the verdict in the caller's labels."""
        verdict = verdict_for(choice, q.swapped)
        self.record.add(q.key, verdict, raw, q.swapped, self.seed, q.prompt, q.response_a, q.response_b)
        self._asked += 1
        self._count("calls")
        return verdict

    def _ask_all(self, questions: list[Question]) -> None:
        """Put every question to the person, calling :meth:`answer` for each; raise
        :class:`JudgeQuit` when they stop (answers given so far are already recorded)."""
        raise NotImplementedError

    def _plan(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> list[Question]:
        """The distinct pairs of the batch with two different responses and not on record
        (either way round), in batch order."""
        todo: dict[str, Question] = {}
        for p, a, b in zip(prompts, responses_a, responses_b):
            key = pair_key(p, a, b)
            if a == b or key in todo or pair_key(p, b, a) in todo or self.record.lookup(p, a, b) is not None:
                continue
            todo[key] = Question(key, p, a, b, shown_swapped(self.seed, key))
        return list(todo.values())

    def judge(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> list[Judgement]:
        check_batch(prompts, responses_a, responses_b)
        questions = self._plan(prompts, responses_a, responses_b)
        left = self.budget_left
        refused = set() if left is None else {q.key for q in questions[left:]}
        asked = [q for q in questions if q.key not in refused]
        if asked:
            self._ask_all(asked)
        out: list[Judgement] = []
        fresh = {q.key for q in asked}
        for p, a, b in zip(prompts, responses_a, responses_b):
            if a == b:
                self._count("identical_ties")
                out.append(Judgement("tie"))
                continue
            key = pair_key(p, a, b)
            if key in refused or pair_key(p, b, a) in refused:
                self._refused += 1
                verdict, raw = "abstain", None
            else:
                found = self.record.lookup(p, a, b)
                if found is None:  # _ask_all returned without an answer: a bug in the subclass
                    raise RuntimeError(f"{type(self).__name__}: no answer for a pair it was asked")
                verdict, raw = found
                if key in fresh:
                    fresh.discard(key)  # the first occurrence was the question; repeats are hits
                else:
                    self._count("cache_hits")
            if verdict == "abstain":
                self._count("abstentions")
            out.append(Judgement(verdict, None, raw))
        return out


__all__ = ["ANSWERS", "AnswerRecord", "Question", "RecordedHumanJudge", "pair_key",
           "shown_swapped", "verdict_for"]
