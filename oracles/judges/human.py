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
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import sys
import textwrap
import time
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from oracles.judges.base import Judgement, JudgeError, JudgeQuit, PairwiseJudge, check_batch, flip, register_judge

log = logging.getLogger(__name__)

_ANSWERS = {
    "a": "left", "1": "left", "l": "left", "left": "left",
    "b": "right", "2": "right", "r": "right", "right": "right",
    "t": "tie", "tie": "tie", "=": "tie",
    "s": "skip", "skip": "skip",
    "q": "quit", "quit": "quit", "exit": "quit",
}
QUESTION = "Which response is better? [a] / [b] / [t]ie / [s]kip / [q]uit: "


def pair_key(prompt: str, response_a: str, response_b: str) -> str:
    blob = json.dumps([prompt, response_a, response_b], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


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
class HumanJudge(PairwiseJudge):
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
    ):
        self.record_path = Path(record_path).expanduser()
        self.input_fn = input_fn
        self.output = output
        self.seed = seed
        self.width = width
        self.min_columns_width = min_columns_width
        self.max_bad_answers = max_bad_answers
        self._answers: dict[str, dict[str, Any]] = {}
        self._load()

    # -- record file -----------------------------------------------------------------------
    def _load(self) -> None:
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.record_path.exists():
            return
        with open(self.record_path, "rb") as f:
            data = f.read()
        bad = 0
        for line in data.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if rec["verdict"] not in ("A", "B", "tie", "abstain"):
                    raise ValueError(rec["verdict"])
                self._answers[str(rec["key"])] = rec
            except (ValueError, KeyError, TypeError):
                bad += 1
        if bad:
            log.warning("human judge: ignored %d unreadable line(s) in %s", bad, self.record_path)
        if data and not data.endswith(b"\n"):  # a write cut short: start the next record on a new line
            self._append_bytes(b"\n")

    def _append_bytes(self, data: bytes) -> None:
        with open(self.record_path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def _record(self, rec: dict[str, Any]) -> None:
        self._append_bytes((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        self._answers[rec["key"]] = rec

    def recorded(self) -> dict[str, str]:
        """key -> verdict for every answer on record."""
        return {k: r["verdict"] for k, r in self._answers.items()}

    # -- interaction -----------------------------------------------------------------------
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

    def _shown_swapped(self, key: str) -> bool:
        return random.Random(f"{self.seed}:{key}").random() < 0.5

    def _show(self, i: int, n: int, prompt: str, left: str, right: str) -> None:
        width = self._width()
        self._print("=" * min(width, 100))
        self._print(f"Pair {i + 1}/{n}")
        self._print("Prompt:")
        self._print("\n".join(_wrap(prompt, max(10, width))))
        self._print()
        layout = side_by_side if width >= self.min_columns_width else stacked
        self._print(layout(left, right, width))
        self._print()

    def _ask(self) -> tuple[str, str]:
        for _ in range(self.max_bad_answers):
            try:
                answer = self.input_fn(QUESTION)
            except EOFError:
                return "quit", ""
            choice = _ANSWERS.get(str(answer).strip().lower())
            if choice is not None:
                return choice, str(answer).strip()
            self._print(f"Please answer a, b, t(ie), s(kip) or q(uit), not {str(answer).strip()!r}.")
        raise JudgeError(f"human judge: {self.max_bad_answers} unreadable answers in a row")

    def judge(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> list[Judgement]:
        check_batch(prompts, responses_a, responses_b)
        out: list[Judgement] = []
        n = len(prompts)
        for i, (p, a, b) in enumerate(zip(prompts, responses_a, responses_b)):
            key = pair_key(p, a, b)
            rec = self._answers.get(key)
            verdict: str
            if rec is not None:
                verdict, raw = rec["verdict"], rec.get("answer")
                self._count("cache_hits")
            elif (rev := self._answers.get(pair_key(p, b, a))) is not None:
                verdict, raw = flip(rev["verdict"]), rev.get("answer")
                self._count("cache_hits")
            else:
                swapped = self._shown_swapped(key)
                left, right = (b, a) if swapped else (a, b)
                self._show(i, n, p, left, right)
                choice, raw = self._ask()
                if choice == "quit":
                    self._print("Stopping; every answer so far is saved.")
                    raise JudgeQuit(f"quit by the user at pair {i + 1}/{n}")
                if choice == "skip":
                    verdict = "abstain"
                elif choice == "tie":
                    verdict = "tie"
                else:
                    shown = "A" if choice == "left" else "B"
                    verdict = flip(shown) if swapped else shown
                self._count("calls")
                self._record({
                    "key": key, "verdict": verdict, "answer": raw, "shown_swapped": swapped,
                    "time": time.time(), "seed": self.seed,
                    "prompt": p, "response_a": a, "response_b": b,
                })
            if verdict == "abstain":
                self._count("abstentions")
            out.append(Judgement(verdict, None, raw))
        return out

    def __repr__(self) -> str:
        return f"HumanJudge(record_path={str(self.record_path)!r}, seed={self.seed})"
