"""Sequence log-probs of completions: batched, padded (either side), masked.

``sequence_logps`` is the one primitive: the sum of log p(token) over completion tokens of
every row, their count (for per-token means), and optionally the final hidden states at the
scored positions (the input of the output layer, which stage 2 perturbs).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from compo.data.encode import Encoded, collate, position_ids_from_mask  # noqa: F401 - re-exported
from compo.core.errors import UserError
from compo.data.pair_batch import PairBatch, shared_batch, two_row_batch
from compo.core.progress import bar


@dataclass
class SeqLogps:
    logps: torch.Tensor  # (N,) summed completion log-probs, fp32
    n_tokens: torch.Tensor  # (N,) scored tokens per row
    hidden: list[torch.Tensor] | None = None  # per row (n_tokens_i, H): output-layer inputs at scored positions
    targets: list[torch.Tensor] | None = None  # per row (n_tokens_i,): the scored token ids


def unwrapped(model):
    """The model inside its DDP / FSDP / PEFT wrappers."""
    for _ in range(4):
        inner = getattr(model, "module", None) or (model.get_base_model() if hasattr(model, "get_base_model") else None)
        if inner is None or inner is model:
            break
        model = inner
    return model


def _keeps_logits(model) -> bool:
    """Does the (unwrapped) model's forward take ``logits_to_keep``?"""
    return _forward_takes_logits_to_keep(type(unwrapped(model)))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def forward_kwargs(model, width: int, start: int) -> dict:
    """``logits_to_keep`` so logits cover positions ``start..width-1`` only, where the model takes it.

    Nothing before the first position that predicts a scored token is needed: skipping it saves
    the V-wide head and log-softmax there."""
    return {"logits_to_keep": width - start} if start > 0 and _keeps_logits(model) else {}


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
    extra = forward_kwargs(model, input_ids.shape[1], start)
    try:
        out = model(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask), use_cache=False, **extra,
        )
    finally:
        if hook is not None:
            hook.remove()
    offset = input_ids.shape[1] - out.logits.shape[1]
    scored, targets = scored[:, offset:], input_ids[:, offset + 1 :]
    per_token = token_logps(out.logits[:, :-1], targets) * scored
    result = SeqLogps(per_token.sum(-1), scored.sum(-1))
    if capture_hidden:
        h = captured[0][:, :-1]
        result.hidden = [h[j][scored[j]].detach() for j in range(h.shape[0])]
        result.targets = [targets[j][scored[j]] for j in range(h.shape[0])]
    return result


def slots_of(seq: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Each token's index among the earlier tokens of its sequence."""
    onehot = torch.nn.functional.one_hot(seq, n_seq)
    return (onehot.cumsum(0) - 1).gather(1, seq[:, None]).squeeze(1)


def seq_sums(values: torch.Tensor, seq: torch.Tensor, n_seq: int, slot: torch.Tensor | None = None,
             width: int | None = None) -> torch.Tensor:
    """Per-token values (..., T) summed into per-sequence sums (..., n_seq).

    The values go into a padded (sequence, slot) table that is summed along its rows. This is
    deterministic on every device; ``index_add_`` is not on CUDA, where it adds atomically.
    ``slot`` / ``width`` (the longest sequence), when known, save recomputing them."""
    slot = slots_of(seq, n_seq) if slot is None else slot
    if width is None:
        width = int(slot.max()) + 1 if slot.numel() else 1
    table = values.new_zeros(*values.shape[:-1], n_seq, width)
    table[..., seq, slot] = values
    return table.sum(-1)


def pair_batch(model, items: Sequence[Encoded], pad_id: int, shared: bool) -> PairBatch:
    """The pairs in the layout asked for, on the model's device, with the mask its attention takes."""
    param = next(model.parameters())
    if not shared:
        return two_row_batch(items, pad_id).to(param.device)
    impl = getattr(unwrapped(model).config, "_attn_implementation", None) or "sdpa"
    return shared_batch(items, pad_id, param.dtype, bool_mask=impl == "sdpa").to(param.device)


def pair_logps(model, items: Sequence[Encoded], pad_id: int, shared: bool = True,
               capture_hidden: bool = False) -> SeqLogps:
    """Summed completion log-probs of every pair: 2n sequences, the chosen ones first.

    ``shared``: each pair in one row that holds its prompt once (:mod:`compo.data.pair_batch`);
    otherwise two padded rows. Gradients flow if enabled. ``capture_hidden`` also returns the
    output layer's input at every scored position (what stage 2 perturbs the head against)."""
    if shared:
        check_shared_prompt(model)
    return batch_logps(model, pair_batch(model, items, pad_id, shared), capture_hidden)


def batch_logps(model, batch: PairBatch, capture_hidden: bool = False) -> SeqLogps:
    """:func:`pair_logps` of a built batch: one forward, then a gather at the scored positions."""
    captured: list[torch.Tensor] = []
    hook = None
    if capture_hidden:
        hook = model.get_output_embeddings().register_forward_hook(lambda _m, inp, _o: captured.append(inp[0]))
    start = int(batch.pos.min()) if batch.pos.numel() else batch.input_ids.shape[1] - 1
    try:
        out = model(**batch.model_inputs(), use_cache=False, **forward_kwargs(model, batch.input_ids.shape[1], start))
    finally:
        if hook is not None:
            hook.remove()
    offset = batch.input_ids.shape[1] - out.logits.shape[1]
    logits = out.logits.float()
    where = (batch.row, batch.pos - offset)
    per_token = logits[where + (batch.target,)] - torch.logsumexp(logits, dim=-1)[where]
    counts = torch.bincount(batch.seq, minlength=batch.n_seq)
    result = SeqLogps(seq_sums(per_token, batch.seq, batch.n_seq, batch.slot), counts)
    if capture_hidden:
        splits = counts.tolist()
        result.hidden = list(captured[0][where].detach().split(splits))
        result.targets = list(batch.target.split(splits))
    return result


_SHARED_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # models that passed the check


def shared_prompt_error(model) -> float:
    """Largest per-token gap (nats) between the shared-prompt and two-row log-probs of two
    probe pairs. In the first, the chosen completion repeats one token 24 times and the
    rejected one repeats it again: a model that lets rejected tokens see the chosen ones (a 4D
    mask ignored) predicts that token far better. The second is random, with other lengths,
    so padding and position ids are exercised too."""
    vocab = unwrapped(model).get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    tok = ids(1)
    items = [Encoded(0, ids(7), (tok * 24, tok * 6)), Encoded(1, ids(3), (ids(9), ids(2)))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            shared = batch_logps(model, pair_batch(model, items, 0, True))
            plain = batch_logps(model, pair_batch(model, items, 0, False))
    finally:
        model.train(was_training)
    return float(((shared.logps - plain.logps).abs() / plain.n_tokens).max())


def check_shared_prompt(model) -> None:
    """Refuse, once per model, a model whose forward gives other log-probs in the shared layout.

    The tolerance covers rounding (the two layouts sum attention in other orders): 1e-3
    nats/token in fp32, otherwise 64 ulps of the dtype the output layer computed in during the
    check (bf16 0.5, fp16 0.0625), which covers autocast and accelerate's mixed precision. SmolLM2
    with SDPA measures 0.006 (bf16), 0.009 (fp16) and 6e-6 (fp32); the same model ignoring the
    mask is off by 8.7 nats/token, ignoring the position ids by 3.6, in every dtype."""
    inner = unwrapped(model)  # checked once, before or inside its DDP / FSDP wrapper
    if inner in _SHARED_OK:
        return
    name = type(inner).__name__
    seen: list[torch.dtype] = []  # the dtype the head computes in, whatever autocast or wrapper set it
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    hook = head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype)) if head is not None else None
    try:
        err = shared_prompt_error(model)
    except Exception as e:  # noqa: BLE001 - e.g. an attention kernel that takes no 4D mask
        raise UserError("model.share_prompt", f"{name} cannot score a pair in one row "
                        f"({type(e).__name__}: {e}); set model.share_prompt=false") from None
    finally:
        if hook is not None:
            hook.remove()
    dtype = max(seen, key=lambda d: torch.finfo(d).eps) if seen else next(model.parameters()).dtype
    tol = max(1e-3, 64 * torch.finfo(dtype).eps)
    if not err <= tol:
        raise UserError("model.share_prompt", f"{name} ignores the 4D attention mask or position ids of a "
                        f"shared-prompt row (log-probs off by {err:.3g} nats/token, tolerance {tol:.3g}); "
                        "set model.share_prompt=false")
    _SHARED_OK[inner] = True


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


@torch.no_grad()
def score_pairs(
    model, items: Sequence[Encoded], pad_id: int, batch_size: int = 16, desc: str = "log-probs",
    progress: bool = True, distributed: bool = False, shared: bool = True,
) -> PairScores:
    """Chosen and rejected log-probs of every encoded pair, ``batch_size`` pairs per forward.

    ``shared``: a pair's prompt goes through the model once (``model.share_prompt``).
    ``distributed`` (every process must call it): each process scores a contiguous share of the
    batches and all get every score (:func:`score_pairs_sharded`).

    Pairs are scored longest first (batches of similar lengths: little padding, and the largest
    batch, the one that could run out of memory, comes first); scores return in ``items`` order."""
    order = longest_first(items)
    if order != list(range(len(items))):
        scores = score_pairs(model, [items[i] for i in order], pad_id, batch_size, desc, progress, distributed, shared)
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.tensor(order)] = torch.arange(len(order))
        return PairScores(*(t[back] for t in (scores.chosen, scores.rejected, scores.chosen_tokens,
                                               scores.rejected_tokens)))
    if distributed:
        return score_pairs_sharded(model, items, pad_id, batch_size, desc, progress, shared)
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    was_training = model.training
    model.eval()
    try:
        for start in bar(range(0, len(items), batch_size), desc, unit="batch", transient=True, enabled=progress):
            s = pair_logps(model, items[start : start + batch_size], pad_id, shared)
            parts.append((s.logps.view(2, -1).cpu(), s.n_tokens.view(2, -1).cpu()))
    finally:
        model.train(was_training)
    if not parts:
        return PairScores(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    lp, nt = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
    return PairScores(lp[0], lp[1], nt[0], nt[1])


def longest_first(items: Sequence[Encoded]) -> list[int]:
    """Indices of ``items``, longest pair (prompt and both completions) first; ties keep their order."""
    return sorted(range(len(items)), key=lambda i: -(len(items[i].prompt) + sum(len(c) for c in items[i].completions)))


def score_pairs_sharded(
    model, items: Sequence[Encoded], pad_id: int, batch_size: int = 16, desc: str = "log-probs",
    progress: bool = True, shared: bool = True,
) -> PairScores:
    """:func:`score_pairs` with the batches shared out across torch.distributed processes.

    A pair's log-probs depend on the batch it is scored in (padding to the batch's longest row
    changes the shapes the kernels see), so the shards are whole batches of the one-process
    order: batch k holds pairs [k*batch_size, (k+1)*batch_size) for any number of processes,
    each process scores a contiguous run of batches, and the scores are gathered by copying.
    Every process ends with the same scores, bit-identical to one process on the same device."""
    from compo.core.dist import gather_shards, shard_bounds, world_info

    world, rank = world_info()
    if world == 1:
        return score_pairs(model, items, pad_id, batch_size, desc, progress, shared=shared)
    n_batches = -(-len(items) // batch_size)
    pairs = [tuple(min(len(items), b * batch_size) for b in shard_bounds(n_batches, world, r)) for r in range(world)]
    lo, hi = pairs[rank]
    mine = score_pairs(model, items[lo:hi], pad_id, batch_size, desc, progress, shared=shared)
    sizes = [b - a for a, b in pairs]
    device = next(model.parameters()).device
    lp = gather_shards(torch.stack([mine.chosen, mine.rejected], 1).float(), sizes, device)
    nt = gather_shards(torch.stack([mine.chosen_tokens, mine.rejected_tokens], 1).long(), sizes, device)
    return PairScores(lp[:, 0], lp[:, 1], nt[:, 0], nt[:, 1])
