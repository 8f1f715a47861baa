"""Sequence log-probs of completions: batched, padded (either side), masked.

``sequence_logps`` is the one primitive: the sum of log p(token) over completion tokens of
every row, their count (for per-token means), and optionally the final hidden states at the
scored positions (the input of the output layer, which stage 2 perturbs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from compo.encode import Encoded, collate


@dataclass
class SeqLogps:
    logps: torch.Tensor  # (N,) summed completion log-probs, fp32
    n_tokens: torch.Tensor  # (N,) scored tokens per row
    hidden: list[torch.Tensor] | None = None  # per row (n_tokens_i, H): output-layer inputs at scored positions
    targets: list[torch.Tensor] | None = None  # per row (n_tokens_i,): the scored token ids


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, so left- and right-padded rows give identical results."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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
    try:
        out = model(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask), use_cache=False,
        )
    finally:
        if hook is not None:
            hook.remove()
    scored = completion_mask[:, 1:] & attention_mask[:, 1:].bool()
    targets = input_ids[:, 1:]
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
    for start in tqdm(range(0, len(sequences), batch_size), desc=desc, disable=not progress, leave=False):
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
    progress: bool = True,
) -> PairScores:
    """Chosen and rejected log-probs of every encoded pair; a pair's two rows share a forward."""
    seqs = [s for it in items for s in ((it.prompt, it.completions[0]), (it.prompt, it.completions[1]))]
    logps, counts = score_sequences(model, seqs, pad_id, 2 * batch_size, desc, progress)
    return PairScores(logps[0::2], logps[1::2], counts[0::2], counts[1::2])
