"""Per-step log-probs of a few noisy pairs during stage 2: pairs the schedule trains early and
pairs it never (or only late) trains, so a user sees whether an update on one pair moves the
others (``zo.track_pairs``; plotted by `compo study`)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from compo.zo.head import capture, head_logps


def first_steps(n: int, total: int, pairs_for_step: Callable[[int, int], list[int]]) -> dict[int, int]:
    """{pair index: the first step (1-based) of the schedule that trains it}, trained pairs only."""
    first: dict[int, int] = {}
    for t in range(total):
        for i in pairs_for_step(t, n):
            first.setdefault(i, t + 1)
    return first


def tracked_indices(first: dict[int, int], n: int, k: int) -> dict[int, int | None]:
    """{pair index: first step that trains it, or None}: ceil(k/2) pairs trained first, then
    untrained pairs, topped up with the last-trained ones (``first``: see :func:`first_steps`)."""
    trained = sorted(first, key=first.get)
    untrained = [i for i in range(n) if i not in first]
    pick = trained[: math.ceil(k / 2)]
    rest = untrained + [i for i in reversed(trained) if i not in pick]
    pick += rest[: max(0, min(k, n) - len(pick))]
    return {i: first.get(i) for i in pick}


class PairTracker:
    """Adds ``tracked`` ([log p(chosen), log p(rejected)] per tracked pair after the step) to each
    stage-2 record, and ``tracked_pairs`` / ``tracked_start`` to the first step's record. The
    body is frozen, so the pairs' hidden states are captured once."""

    def __init__(self, model, items: Sequence, texts: Sequence, pad_id: int, which: dict[int, int | None],
                 shared: bool = True):
        self.which = which
        idx = list(which)
        self.inp = capture(model, [items[i] for i in idx], pad_id, check=False, shared=shared) if idx else None
        self.sources = [texts[i].source for i in idx]

    def _logps(self, w: torch.Tensor) -> list[list[float]]:
        lp = head_logps(w, self.inp)
        b = self.inp.n_pairs
        return [[float(lp[j]), float(lp[b + j])] for j in range(b)]

    def start(self, w: torch.Tensor) -> None:
        self.initial = self._logps(w) if self.inp is not None else []

    def __call__(self, t: int, rec: dict, w: torch.Tensor) -> None:
        if self.inp is None:
            return
        if t == 0:
            rec["tracked_pairs"] = [{"source": s, "trained_at": a} for s, a in zip(self.sources, self.which.values())]
            rec["tracked_start"] = self.initial
        rec["tracked"] = self._logps(w)
