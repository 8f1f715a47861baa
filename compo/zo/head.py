"""Head evaluation with the body's hidden states cached once per step.

Only the output layer changes between candidates, so per step we keep the scored positions'
hidden states h (T x H), their targets and which sequence each row belongs to. A candidate
head W + s z then costs one matmul ``h z^T`` (T x V), a log-softmax over V and a gather:
never a full-model forward (DESIGN.md §2, "Cost").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compo.encode import collate
from compo.logprobs import sequence_logps


@dataclass
class HeadInputs:
    """Cached, fixed-within-a-step inputs of the output layer for 2B sequences (chosen, rejected)."""

    h: torch.Tensor  # (T, H) fp32 hidden states at scored positions
    targets: torch.Tensor  # (T,) token ids
    seq: torch.Tensor  # (T,) sequence index in [0, n_seq)
    n_seq: int
    forward_logps: torch.Tensor  # (n_seq,) log-probs from the model's own forward (for checking)
    bias: torch.Tensor | None = None

    @property
    def n_pairs(self) -> int:
        return self.n_seq // 2


@torch.no_grad()
def capture(model, items, pad_id: int) -> HeadInputs:
    """One forward of the frozen body over the pairs' chosen then rejected sequences."""
    device = next(model.parameters()).device
    seqs = [(it.prompt, it.completions[0]) for it in items] + [(it.prompt, it.completions[1]) for it in items]
    batch = {k: v.to(device) for k, v in collate(seqs, pad_id).items()}
    s = sequence_logps(model, **batch, capture_hidden=True)
    h = torch.cat(s.hidden).float()
    targets = torch.cat(s.targets)
    seq = torch.cat([torch.full((len(t),), j, dtype=torch.long, device=device) for j, t in enumerate(s.targets)])
    head = model.get_output_embeddings()
    bias = head.bias.detach().float() if getattr(head, "bias", None) is not None else None
    return HeadInputs(h, targets, seq, len(seqs), s.logps.float(), bias)


def _seq_sums(tok: torch.Tensor, seq: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Sum per-token values (..., T) into per-sequence sums (..., n_seq)."""
    out = torch.zeros((*tok.shape[:-1], n_seq), dtype=tok.dtype, device=tok.device)
    return out.index_add_(-1, seq, tok)


def logits_logps(logits: torch.Tensor, inp: HeadInputs) -> torch.Tensor:
    """Per-sequence summed log-probs from logits (..., T, V)."""
    tgt = inp.targets.expand(*logits.shape[:-1])
    tok = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return _seq_sums(tok, inp.seq, inp.n_seq)


def base_logits(w: torch.Tensor, inp: HeadInputs) -> torch.Tensor:
    logits = inp.h @ w.T
    return logits + inp.bias if inp.bias is not None else logits


def head_logps(w: torch.Tensor, inp: HeadInputs) -> torch.Tensor:
    """(n_seq,) log-probs under head ``w`` (fp32)."""
    return logits_logps(base_logits(w, inp), inp)


def candidate_logps(base: torch.Tensor, h: torch.Tensor, z: torch.Tensor, scales: torch.Tensor,
                    inp: HeadInputs) -> torch.Tensor:
    """(c, n_seq) log-probs of candidates W + s_i z_i given base logits (T, V).

    ``h`` is the hidden states in the basis ``z`` lives in: the full h (T x H) with z of shape
    (c, V, H), or the projected h Q (T x k) with z of shape (c, V, k).
    """
    delta = torch.matmul(h, z.transpose(1, 2))  # (c, T, V)
    delta.mul_(scales.view(-1, 1, 1)).add_(base)
    return logits_logps(delta, inp)


def projection_basis(h: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis Q (H x k) of span{h_t}; k = numerical rank of h."""
    u, s, _ = torch.linalg.svd(h.T.double(), full_matrices=False)
    k = int((s > rtol * s.max()).sum()) if s.numel() else 0
    return u[:, : max(k, 1)].float()


def chunk_size(budget_mb: int, v: int, width: int, n_tokens: int) -> int:
    """Perturbations per chunk so the draws and the candidate logits fit ``budget_mb``."""
    per = 4 * (v * width + 2 * n_tokens * v)
    return max(1, int(budget_mb * 2**20 // per))
