"""Held-out scores of stage 2 from the stage-1 model's output-layer inputs (``eval.cache_hidden_mb``).

Stage 2 changes only the output layer, so after it the body computes the held-out pairs' hidden
states exactly as after stage 1. Evaluating stage 1 through the body once, keeping the head's
input at every scored position (``eval_hidden.pt``), lets stage 2's evaluation run the head
alone: one matmul, a log-softmax and a gather per token instead of a full forward. Both stages'
held-out scores then come from the same hidden states, so stage 2's paired effect is the head's
alone. The file is keyed by the stage-1 fingerprint and the held-out pairs; anything else (no
file, another stage 1, other pairs, several processes) falls back to a full forward.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from compo.core import fingerprint
from compo.core.config import RunConfig
from compo.core.progress import bar, say
from compo.data.encode import Encoded
from compo.scoring.logprobs import PairScores, longest_first
from compo.zo.head import HeadInputs, capture, head_logps

FILE = "eval_hidden.pt"


def cache_key(cfg: RunConfig) -> str:
    """What the kept hidden states depend on: everything up to and including stage 1."""
    return fingerprint.digest(fingerprint.current(cfg, "stage1"))


def size_mb(items: Sequence[Encoded], hidden_size: int) -> float:
    """MB the fp32 hidden states of every scored token of ``items`` take."""
    return sum(len(c) for it in items for c in it.completions) * hidden_size * 4 / 2**20


def _head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    bias = head.bias.detach().float() if getattr(head, "bias", None) is not None else None
    return head.weight.detach().float(), bias


def _scores(parts: list[tuple[list[int], torch.Tensor, torch.Tensor]], n: int) -> PairScores:
    """Per-batch (pair indices, per-sequence log-probs, token counts) back in pair order."""
    lp, nt = torch.zeros(2, n), torch.zeros(2, n, dtype=torch.long)
    for idx, logps, counts in parts:
        k = len(idx)
        lp[:, idx] = logps.view(2, k).cpu().float()
        nt[:, idx] = counts.view(2, k).cpu()
    return PairScores(lp[0], lp[1], nt[0], nt[1])


@torch.no_grad()
def score_and_keep(model, items: Sequence[Encoded], pad_id: int, batch_size: int, shared: bool, path: Path,
                   key: str, sources: list[str]) -> PairScores:
    """Score ``items`` through the body once (longest first), keeping the head's inputs in ``path``."""
    order = longest_first(items)
    w, _ = _head(model)
    was_training = model.training
    model.eval()
    kept, parts = [], []
    try:
        for start in bar(range(0, len(order), batch_size), "eval stage1 (keeping hidden states)", unit="batch",
                         transient=True):
            idx = order[start:start + batch_size]
            inp = capture(model, [items[i] for i in idx], pad_id, check=False, shared=shared)
            parts.append((idx, head_logps(w, inp), torch.bincount(inp.seq, minlength=inp.n_seq)))
            kept.append({"idx": idx, "h": inp.h.cpu(), "targets": inp.targets.cpu(), "seq": inp.seq.cpu(),
                         "n_seq": inp.n_seq})
    finally:
        model.train(was_training)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"key": key, "sources": sources, "batches": kept}, tmp)
    os.replace(tmp, path)
    return _scores(parts, len(items))


@torch.no_grad()
def head_only(model, path: Path, key: str, sources: list[str]) -> PairScores | None:
    """Scores under ``model``'s head from the kept hidden states, or None when they do not apply."""
    if not path.exists():
        return None
    saved = torch.load(path, weights_only=True)
    if saved.get("key") != key or saved.get("sources") != sources:
        return None
    w, bias = _head(model)
    device = w.device
    parts = []
    for b in bar(saved["batches"], "eval stage2 (head only)", unit="batch", transient=True):
        inp = HeadInputs(b["h"].to(device), b["targets"].to(device), b["seq"].to(device), b["n_seq"], None, bias)
        parts.append((b["idx"], head_logps(w, inp), torch.bincount(inp.seq, minlength=inp.n_seq)))
    return _scores(parts, len(sources))


def scores(ws, items: Sequence[Encoded], sources: list[str], label: str) -> PairScores | None:
    """The held-out scores of ``label`` through the kept hidden states, or None (score as usual)."""
    cfg = ws.cfg
    path, key = ws.run.root / FILE, cache_key(cfg)
    if label == "stage2":
        out = head_only(ws.model, path, key, sources)
        if out is not None:
            say(f"eval stage2: head only, on the stage-1 hidden states kept in {path}")
        return out
    hidden = ws.model.get_output_embeddings().weight.shape[1]
    need = size_mb(items, hidden)
    if need > cfg.eval.cache_hidden_mb:
        say(f"eval: the held-out hidden states need {need:.0f} MB > eval.cache_hidden_mb="
            f"{cfg.eval.cache_hidden_mb}: not kept (stage 2 is evaluated with a full forward)")
        return None
    ws.run.root.mkdir(parents=True, exist_ok=True)
    return score_and_keep(ws.model, items, ws.pad_id, cfg.split.batch_size, cfg.model.share_prompt, path, key, sources)
