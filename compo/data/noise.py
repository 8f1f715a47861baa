"""Label-noise injection for robustness studies: pure, seeded, and recorded.

Three kinds (``data.noise.kind``):

* ``flip``: exactly ``round(rate * N)`` training pairs get chosen and rejected swapped, drawn
  uniformly or, with ``bias: low_margin``, with weight ``exp(-|m| / median|m|)`` (annotators
  err on close calls). A flip negates the reference margin and keeps ``|m|``, so the split by
  ``|m|`` sees the same pairs: the study measures whether it isolates the flipped ones.
* ``ambiguous``: ``round(rate * N)`` pairs get their label from a fair coin (an annotator who
  cannot tell): about half of them flip, and their labels carry no information.
* ``shift`` (thumbs-up/down rows): the thumbs-up rows with the shortest prompts and the
  thumbs-down rows with the longest prompts are dropped (``round(rate * n)`` of each class), so
  the two classes' prompt distributions differ: the case BCO's UDM reweighting corrects.

Every changed pair carries ``meta["label_flipped"]`` (and ``meta["ambiguous"]``), written to
split.jsonl, so results are scored against the original labels.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from compo.data.rows import PairRow, UnpairedRow


def count_of(rate: float, n: int) -> int:
    """round(rate * n), halves rounded up (not to even), so the count is what a user computes."""
    return min(n, int(math.floor(rate * n + 0.5)))


def weighted_sample(weights: Sequence[float], k: int, seed: int) -> list[int]:
    """k distinct indices drawn without replacement with probability proportional to weights
    (Efraimidis-Spirakis keys u^(1/w)), in increasing order."""
    rng = random.Random(seed)
    keys = []
    for i, w in enumerate(weights):
        u = rng.random()
        keys.append((math.log(u) / w if w > 0 else -math.inf, i))
    keys.sort(reverse=True)
    return sorted(i for _, i in keys[:k])


def low_margin_weights(abs_margins: Sequence[float]) -> list[float]:
    """exp(-|m| / median |m|): close calls are flipped more often (scale-free across models)."""
    vals = [abs(float(m)) for m in abs_margins]
    if not vals:
        return []
    scale = sorted(vals)[len(vals) // 2] or 1.0
    return [math.exp(-v / scale) for v in vals]


@dataclass
class PairNoise:
    """Which pairs changed: ``flipped`` swap chosen/rejected; ``ambiguous`` got a coin label."""

    kind: str
    rate: float
    bias: str
    n: int
    flipped: list[int] = field(default_factory=list)
    ambiguous: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        return {"kind": self.kind, "rate": self.rate, "bias": self.bias, "n_pairs": self.n,
                "n_flipped": len(self.flipped), "n_ambiguous": len(self.ambiguous)}


def pair_noise(kind: str, rate: float, n: int, seed: int, bias: str = "uniform",
               abs_margins: Sequence[float] | None = None) -> PairNoise:
    """The (seeded) choice of pairs to change; ``abs_margins`` is needed for ``bias=low_margin``."""
    out = PairNoise(kind, rate, bias, n)
    if kind == "none" or rate == 0 or n == 0:
        return out
    k = count_of(rate, n)
    if bias == "low_margin":
        if abs_margins is None or len(abs_margins) != n:
            raise ValueError("bias=low_margin needs the reference margin of every pair")
        chosen = weighted_sample(low_margin_weights(abs_margins), k, seed)
    elif bias == "uniform":
        chosen = sorted(random.Random(seed).sample(range(n), k))
    else:
        raise ValueError(f"unknown noise bias {bias!r}, allowed: uniform, low_margin")
    if kind == "flip":
        out.flipped = chosen
    elif kind == "ambiguous":
        coin = random.Random(seed + 1)
        out.ambiguous = chosen
        out.flipped = [i for i in chosen if coin.random() < 0.5]
    else:
        raise ValueError(f"noise kind {kind!r} does not apply to pairs, allowed: none, flip, ambiguous")
    return out


def apply_to_pairs(rows: Sequence[PairRow], noise: PairNoise) -> list[PairRow]:
    """The rows with the chosen pairs swapped and every row marked (original labels kept)."""
    flipped, amb = set(noise.flipped), set(noise.ambiguous)
    out = []
    for i, r in enumerate(rows):
        meta = {**r.meta, "label_flipped": i in flipped}
        if amb:
            meta["ambiguous"] = i in amb
        if i in flipped:
            out.append(replace(r, chosen=r.rejected, rejected=r.chosen, meta=meta))
        else:
            out.append(replace(r, meta=meta))
    return out


def swap_pairs(values: torch.Tensor, flipped: Sequence[int]) -> torch.Tensor:
    """(N, 2) chosen/rejected columns with the flipped rows swapped (log-probs, token counts)."""
    out = values.clone()
    idx = torch.as_tensor(list(flipped), dtype=torch.long)
    if len(idx):
        out[idx] = values[idx].flip(-1)
    return out


def shift_unpaired(rows: Sequence[UnpairedRow], rate: float, seed: int) -> tuple[list[UnpairedRow], list[int]]:
    """Drop the round(rate * n_up) thumbs-up rows with the shortest prompts and the
    round(rate * n_down) thumbs-down rows with the longest (ties broken by a seeded shuffle).
    Returns (kept rows in their order, dropped indices)."""
    rng = random.Random(seed)
    tiebreak = list(range(len(rows)))
    rng.shuffle(tiebreak)

    def length(i: int) -> int:
        p = rows[i].prompt
        return len(p) if isinstance(p, str) else sum(len(m["content"]) for m in p)

    up = [i for i, r in enumerate(rows) if r.label]
    down = [i for i, r in enumerate(rows) if not r.label]
    up.sort(key=lambda i: (length(i), tiebreak[i]))
    down.sort(key=lambda i: (-length(i), tiebreak[i]))
    dropped = set(up[: count_of(rate, len(up))]) | set(down[: count_of(rate, len(down))])
    kept = [replace(r, meta={**r.meta, "shift_kept": True}) for i, r in enumerate(rows) if i not in dropped]
    return kept, sorted(dropped)


def label_quality(flags: Sequence[bool], noisy: Sequence[bool]) -> dict:
    """How well the split isolates wrong labels: the share of correct labels among noisy and
    clean pairs, and the share of wrong labels that landed in the noisy part."""
    pairs = list(zip(flags, noisy))
    wrong_noisy = sum(1 for f, n in pairs if f and n)
    n_noisy = sum(1 for _, n in pairs if n)
    n_clean = len(pairs) - n_noisy
    wrong = sum(1 for f, _ in pairs if f)
    return {
        "label_correct/noisy": (n_noisy - wrong_noisy) / n_noisy if n_noisy else None,
        "label_correct/clean": (n_clean - (wrong - wrong_noisy)) / n_clean if n_clean else None,
        "wrong_labels": wrong,
        "wrong_labels_in_noisy": wrong_noisy / wrong if wrong else None,
    }
