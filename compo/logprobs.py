"""Sequence log-probs of completions: batched, padded (either side), masked.

``sequence_logps`` is the one primitive: the sum of log p(token) over completion tokens of
every row, their count (for per-token means), and optionally the final hidden states at the
scored positions (the input of the output layer, which stage 2 perturbs).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from compo.encode import Encoded, collate
from compo.progress import bar


@dataclass
class SeqLogps:
    logps: torch.Tensor  # (N,) summed completion log-probs, fp32
    n_tokens: torch.Tensor  # (N,) scored tokens per row
    hidden: list[torch.Tensor] | None = None  # per row (n_tokens_i, H): output-layer inputs at scored positions
    targets: list[torch.Tensor] | None = None  # per row (n_tokens_i,): the scored token ids


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, so left- and right-padded rows give identical results."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _keeps_logits(model) -> bool:
    """Does the (unwrapped: DDP, PEFT) model's forward take ``logits_to_keep``?"""
    for _ in range(4):
        inner = getattr(model, "module", None) or (model.get_base_model() if hasattr(model, "get_base_model") else None)
        if inner is None or inner is model:
            break
        model = inner
    return _forward_takes_logits_to_keep(type(model))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in fp32 without materialising the full log-softmax twice."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
    capture_hidden: bool = False,
) -> SeqLogps:
    """Summed log-probs of the completion tokens of each row (gradients flow if enabled)."""
    captured: list[torch.Tensor] = []
    hook = None
    if capture_hidden:
        head = model.get_output_embeddings()
        hook = head.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0]))
    scored = completion_mask[:, 1:] & attention_mask[:, 1:].bool()
    cols = scored.any(0).nonzero()
    start = int(cols[0]) if cols.numel() else scored.shape[1]
    extra = {"logits_to_keep": input_ids.shape[1] - start} if start > 0 and _keeps_logits(model) else {}
    try:
        out = model(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask), use_cache=False, **extra,
        )
    finally:
        if hook is not None:
            hook.remove()
    # logits (and the head's input) cover the last positions only: before the batch's first
    # scored position nothing is scored, and skipping it saves the V-wide head and log-softmax there
    offset = input_ids.shape[1] - out.logits.shape[1]
    scored, targets = scored[:, offset:], input_ids[:, offset + 1 :]
    per_token = token_logps(out.logits[:, :-1], targets) * scored
    result = SeqLogps(per_token.sum(-1), scored.sum(-1))
    if capture_hidden:
        h = captured[0][:, :-1]
        result.hidden = [h[j][scored[j]].detach() for j in range(h.shape[0])]
        result.targets = [targets[j][scored[j]] for j in range(h.shape[0])]
    return result


@dataclass
class PairScores:
    chosen: torch.Tensor  # (N,) summed log-probs
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    JSON_KEYS = ("logp_chosen", "logp_rejected", "chosen_tokens", "rejected_tokens")

    def to_json(self) -> dict:
        """Plain lists under :attr:`JSON_KEYS` (the layout of eval_scores.json)."""
        return dict(zip(self.JSON_KEYS, (t.tolist() for t in (self.chosen, self.rejected, self.chosen_tokens,
                                                                self.rejected_tokens))))

    @classmethod
    def from_json(cls, d: dict) -> "PairScores":
        return cls(*(torch.tensor(d[k]) for k in cls.JSON_KEYS))


@torch.no_grad()
def score_sequences(
    model, sequences: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 16,
    desc: str = "log-probs", progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, token counts) of (prompt ids, completion ids) sequences, no gradient."""
    device = next(model.parameters()).device
    logps, counts = [], []
    was_training = model.training
    model.eval()
    for start in bar(range(0, len(sequences), batch_size), desc, unit="batch", transient=True, enabled=progress):
        batch = {k: v.to(device) for k, v in collate(sequences[start : start + batch_size], pad_id).items()}
        s = sequence_logps(model, **batch)
        logps.append(s.logps.cpu())
        counts.append(s.n_tokens.cpu())
    model.train(was_training)
    if not logps:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logps), torch.cat(counts)


def score_pairs(
    model, items: Sequence[Encoded], pad_id: int, batch_size: int = 16, desc: str = "log-probs",
    progress: bool = True, distributed: bool = False,
) -> PairScores:
    """Chosen and rejected log-probs of every encoded pair; a pair's two rows share a forward.

    ``distributed`` (every process must call it): each process scores a contiguous share of the
    batches and all get every score (:func:`score_pairs_sharded`)."""
    if distributed:
        return score_pairs_sharded(model, items, pad_id, batch_size, desc, progress)
    seqs = [s for it in items for s in ((it.prompt, it.completions[0]), (it.prompt, it.completions[1]))]
    logps, counts = score_sequences(model, seqs, pad_id, 2 * batch_size, desc, progress)
    return PairScores(logps[0::2], logps[1::2], counts[0::2], counts[1::2])


def score_pairs_sharded(
    model, items: Sequence[Encoded], pad_id: int, batch_size: int = 16, desc: str = "log-probs",
    progress: bool = True,
) -> PairScores:
    """:func:`score_pairs` with the batches shared out across torch.distributed processes.

    A pair's log-probs depend on the batch it is scored in (padding to the batch's longest row
    changes the shapes the kernels see), so the shards are whole batches of the one-process
    order: batch k holds pairs [k*batch_size, (k+1)*batch_size) for any number of processes,
    each process scores a contiguous run of batches, and the scores are gathered by copying.
    Every process ends with the same scores, bit-identical to one process on the same device."""
    from compo.dist import gather_shards, shard_bounds, world_info

    world, rank = world_info()
    if world == 1:
        return score_pairs(model, items, pad_id, batch_size, desc, progress)
    n_batches = -(-len(items) // batch_size)
    pairs = [tuple(min(len(items), b * batch_size) for b in shard_bounds(n_batches, world, r)) for r in range(world)]
    lo, hi = pairs[rank]
    mine = score_pairs(model, items[lo:hi], pad_id, batch_size, desc, progress)
    sizes = [b - a for a, b in pairs]
    device = next(model.parameters()).device
    lp = gather_shards(torch.stack([mine.chosen, mine.rejected], 1).float(), sizes, device)
    nt = gather_shards(torch.stack([mine.chosen_tokens, mine.rejected_tokens], 1).long(), sizes, device)
    return PairScores(lp[:, 0], lp[:, 1], nt[:, 0], nt[:, 1])
