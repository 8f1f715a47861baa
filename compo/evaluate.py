"""Held-out preference evaluation: does the model rank chosen above rejected?"""

from __future__ import annotations

from compo.logprobs import PairScores


def preference_metrics(scores: PairScores, ref: PairScores | None = None, beta: float = 0.1) -> dict:
    """Accuracy of the model's log-likelihood margin against the labels (gold on eval data),
    mean log-probs, and, given the reference scores, TRL's implicit-reward metrics and the
    mean log-prob shifts (likelihood displacement: both shifts negative is the bad case)."""
    if len(scores.chosen) == 0:
        return {}
    margin = scores.chosen - scores.rejected
    out = {
        "accuracy": float((margin > 0).float().mean()),
        "logps/chosen": float(scores.chosen.mean()),
        "logps/rejected": float(scores.rejected.mean()),
    }
    if ref is not None:
        rc, rr = beta * (scores.chosen - ref.chosen), beta * (scores.rejected - ref.rejected)
        out.update({
            "rewards/chosen": float(rc.mean()),
            "rewards/rejected": float(rr.mean()),
            "rewards/accuracies": float((rc > rr).float().mean()),
            "rewards/margins": float((rc - rr).mean()),
            "shift/chosen": float((scores.chosen - ref.chosen).mean()),
            "shift/rejected": float((scores.rejected - ref.rejected).mean()),
        })
    return out
