"""Reference log-probs kept in the run directory under a key of what they depend on.

A study scores the same pairs with the same reference for every injected noise rate; the scores
are kept before any label is flipped (a flip only swaps a pair's two numbers), keyed by
:func:`compo.core.fingerprint.reference_key`, so runs that share the key score once."""

from __future__ import annotations

from pathlib import Path

from compo.core.rundir import atomic_write_json, read_json
from compo.scoring.logprobs import PairScores

FILE = "reference_scores.json"


def load(run_root: Path, key: str, sources: list[str]) -> PairScores | None:
    """The kept scores of these pairs under this key, or None."""
    path = Path(run_root) / FILE
    if not path.exists():
        return None
    saved = read_json(path)
    if saved.get("key") != key or saved.get("sources") != sources:
        return None
    return PairScores.from_json(saved["scores"])


def save(run_root: Path, key: str, sources: list[str], scores: PairScores) -> None:
    atomic_write_json(Path(run_root) / FILE, {"key": key, "sources": sources, "scores": scores.to_json()})
