"""``split.score: stage1``: rank pairs by their implicit-reward margin after a brief DPO on all pairs.

The small-loss rule of noisy-label learning: a model trained briefly on every pair learns the
pattern most labels share first, so a pair whose label goes against it (a flip) keeps a large
loss, a low (signed) implicit margin ``(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``.
Unlike the reference margin, this can find flips placed anywhere, not only in close calls.

The brief model trains on a copy of the loaded model with stage 1's beta, learning rate and batch
size for ``split.stage1_steps`` steps and is saved to ``run_dir/split_stage1/model``. A later run in
the same directory with the same split fingerprint loads it instead of training again (and a study
shares split.jsonl, and this directory, between the methods of a noise setting).
"""

from __future__ import annotations

import copy

import torch

from compo.core import fingerprint
from compo.core.config import RunConfig
from compo.core.files import stage_marker
from compo.core.progress import say
from compo.core.rundir import RunDir, is_writer, read_json
from compo.data.encode import Encoded
from compo.scoring.logprobs import PairScores, score_pairs

DIR = "split_stage1"


def brief_config(cfg: RunConfig) -> RunConfig:
    """The stage-1 config of the brief DPO: plain DPO on all pairs for split.stage1_steps steps."""
    brief = cfg.model_copy(deep=True)
    s1 = brief.stage1
    s1.loss, s1.label_smoothing, s1.train_on = "dpo", 0.0, "all"
    s1.max_steps, s1.save_steps, s1.enabled = cfg.split.stage1_steps, 0, True
    return brief


def implicit_margins(policy: PairScores, ref: PairScores, kind: str) -> torch.Tensor:
    """Signed implicit-reward margin per pair, summed (``sum``) or per token (``mean``)."""
    c, r = policy.chosen - ref.chosen, policy.rejected - ref.rejected
    if kind == "mean":
        c, r = c / ref.chosen_tokens.clamp(min=1), r / ref.rejected_tokens.clamp(min=1)
    return c - r


def lowest(scores: torch.Tensor, quantile: float) -> torch.Tensor:
    """Mask of the ``quantile`` fraction with the lowest scores (ties: the earlier pair first)."""
    k = int(round(quantile * len(scores)))
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[torch.sort(scores.float(), stable=True).indices[:k]] = True
    return mask


def _kept(run: RunDir, fp: dict) -> bool:
    """Does run_dir/split_stage1 hold a finished brief model of this split fingerprint?"""
    marker = stage_marker(run.model)
    if marker is None or marker.get("stage") != "stage1" or not run.fingerprint.exists():
        return False
    return not fingerprint.differences(read_json(run.fingerprint).get("split", {}), fp)


def brief_scores(model, tokenizer, items: list[Encoded], ref: PairScores, cfg: RunConfig, run_root,
                 pad_id: int) -> PairScores:
    """Train (or load) the brief DPO model on all ``items`` (labels as given, noise included) and
    return every pair's log-probs under it."""
    from compo.train.stage1 import Stage1Data, paired_objective, train_stage1

    brief = brief_config(cfg)
    sub = RunDir(run_root / DIR)
    fp = fingerprint.current(cfg, "split")
    if _kept(sub, fp):
        from compo.scoring.models import load_pretrained

        say(f"split: reusing the brief DPO model in {sub.model}")
        trained, _ = load_pretrained(str(sub.model), brief)
    else:
        if is_writer():
            fingerprint.record(sub, "split", None)
        say(f"split: brief DPO on all {len(items)} pairs for {cfg.split.stage1_steps} steps (split.score=stage1)")
        trained = copy.deepcopy(model)
        data = Stage1Data(items, torch.stack([ref.chosen, ref.rejected], dim=1))
        train_stage1(trained, tokenizer, data, brief, sub, paired_objective(brief, pad_id), resume=False)
        if is_writer():
            fingerprint.record(sub, "split", fp)
    scores = score_pairs(trained, items, pad_id, cfg.split.batch_size, desc="brief-DPO log-probs",
                         distributed=True, shared=cfg.model.share_prompt)
    del trained
    return scores
