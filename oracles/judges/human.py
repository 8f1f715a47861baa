"""A human judge at the terminal, with a crash-safe answer record and resume.

Each pair is shown as the prompt and the two responses side by side (two wrapped columns;
stacked when the terminal is narrower than ``min_columns_width``). The left/right order is a
seeded pseudo-random function of the pair, so the same pair is always shown the same way and
the labels [A]/[B] on screen say nothing about the caller's A/B; answers are mapped back.

Answers: ``a``/``1``/``left`` or ``b``/``2``/``right`` (the response shown on that side),
``t``/``tie``, ``s``/``skip`` (abstain) and ``q``/``quit`` (raises :class:`JudgeQuit`). Each
answer, skips included, is appended to a JSONL file at once (flush + fsync), keyed by a hash
of the texts; a new judge on the same file reuses those answers without asking again (a pair
already answered with the responses the other way round is reused with the labels flipped).
Two identical responses are a tie without asking. The record, the order and the budget
(``max_calls`` questions) are shared with the browser judge ``human_web``
(:mod:`oracles.judges.human_record`): either resumes the other's file.
"""

from __future__ import annotations

import itertools
import shutil
import sys
import textwrap
from os import PathLike
from typing import Callable, TextIO

from oracles.judges.base import JudgeError, JudgeQuit, register_judge
from oracles.judges.human_record import ANSWERS, Question, RecordedHumanJudge, pair_key

QUESTION = "Which response is better? [a] / [b] / [t]ie / [s]kip / [q]uit: "


def _wrap(text: str, width: int) -> list[str]:
    out: list[str] = []
    for line in text.expandtabs(4).splitlines() or [""]:
        out.extend(textwrap.wrap(line, width, break_long_words=True, break_on_hyphens=False) or [""])
    return out


def side_by_side(left: str, right: str, width: int, labels: tuple[str, str] = ("[A]", "[B]")) -> str:
    """Two wrapped columns separated by a rule, ``width`` characters wide in all."""
    gap = " | "
    col = max(1, (width - len(gap)) // 2)
    lines = [f"{labels[0]:<{col}}{gap}{labels[1]}", "-" * col + "-+-" + "-" * col]
    for l, r in itertools.zip_longest(_wrap(left, col), _wrap(right, col), fillvalue=""):
        lines.append(f"{l:<{col}}{gap}{r}".rstrip())
    return "\n".join(lines)


def stacked(left: str, right: str, width: int, labels: tuple[str, str] = ("[A]", "[B]")) -> str:
    w = max(10, width)
    return "\n".join([labels[0], *_wrap(left, w), "", labels[1], *_wrap(right, w)])


@register_judge("human")
class HumanJudge(RecordedHumanJudge):
    """Asks a person; ``input_fn`` / ``output`` make it scriptable (tests, notebooks)."""

    name = "human"

    def __init__(
        self,
        record_path: str | PathLike,
        input_fn: Callable[[str], str] = input,
        output: TextIO | None = None,
        seed: int = 0,
        *,
        width: int | None = None,
        min_columns_width: int = 60,
        max_bad_answers: int = 100,
        max_calls: int | None = None,
    ):
        super().__init__(record_path, seed, max_calls)
        self.input_fn = input_fn
        self.output = output
        self.width = width
        self.min_columns_width = min_columns_width
        self.max_bad_answers = max_bad_answers

    def _out(self) -> TextIO:
        return self.output if self.output is not None else sys.stdout

    def _print(self, text: str = "") -> None:
        out = self._out()
        print(text, file=out)
        try:
            out.flush()
        except Exception:  # pragma: no cover
            pass

    def _width(self) -> int:
        return self.width or shutil.get_terminal_size((100, 24)).columns

    def _show(self, i: int, n: int, q: Question) -> None:
        width = self._width()
        self._print("=" * min(width, 100))
        budget = "" if self.max_calls is None else f"  (budget: {self._asked}/{self.max_calls} answers used)"
        self._print(f"Pair {i + 1}/{n}{budget}")
        self._print("Prompt:")
        self._print("\n".join(_wrap(q.prompt, max(10, width))))
        self._print()
        layout = side_by_side if width >= self.min_columns_width else stacked
        self._print(layout(q.left, q.right, width))
        self._print()

    def _ask(self) -> tuple[str, str]:
        for _ in range(self.max_bad_answers):
            try:
                answer = self.input_fn(QUESTION)
            except EOFError:
                return "quit", ""
            choice = ANSWERS.get(str(answer).strip().lower())
            if choice is not None:
                return choice, str(answer).strip()
            self._print(f"Please answer a, b, t(ie), s(kip) or q(uit), not {str(answer).strip()!r}.")
        raise JudgeError(f"human judge: {self.max_bad_answers} unreadable answers in a row")

    def _ask_all(self, questions: list[Question]) -> None:
        n = len(questions)
        for i, q in enumerate(questions):
            self._show(i, n, q)
            choice, raw = self._ask()
            if choice == "quit":
                self._print("Stopping; every answer so far is saved.")
                raise JudgeQuit(f"quit by the user at pair {i + 1}/{n}")
            self.answer(q, choice, raw)

    def __repr__(self) -> str:
        return f"HumanJudge(record_path={str(self.record_path)!r}, seed={self.seed})"


__all__ = ["HumanJudge", "QUESTION", "pair_key", "side_by_side", "stacked"]
