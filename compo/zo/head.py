"""Head evaluation with the body's hidden states cached once per step.

Only the output layer changes between candidates, so per step we keep the scored positions'
hidden states h (T x H), their targets and which sequence each row belongs to. A candidate
head W + s z then costs one matmul ``h z^T`` (T x V), a log-softmax over V and a gather:
never a full-model forward (DESIGN.md §2, "Cost").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from compo.scoring.logprobs import check_shared_prompt, pair_batch, pair_logps, seq_sums, slots_of


@dataclass
class HeadInputs:
    """Cached, fixed-within-a-step inputs of the output layer for 2B sequences (chosen, rejected)."""

    h: torch.Tensor  # (T, H) fp32 hidden states at scored positions
    targets: torch.Tensor  # (T,) token ids
    seq: torch.Tensor  # (T,) sequence index in [0, n_seq)
    n_seq: int
    forward_logps: torch.Tensor | None  # (n_seq,) log-probs of the model's own forward (check=True only)
    bias: torch.Tensor | None = None

    @property
    def n_pairs(self) -> int:
        return self.n_seq // 2

    @functools.cached_property
    def layout(self) -> tuple[torch.Tensor, int]:
        """(each token's index within its sequence, the longest sequence): made once, not per chunk."""
        slot = slots_of(self.seq, self.n_seq)
        return slot, int(slot.max()) + 1 if slot.numel() else 1

    def sums(self, per_token: torch.Tensor) -> torch.Tensor:
        """Per-token values (..., T) summed per sequence (..., n_seq), deterministically."""
        return seq_sums(per_token, self.seq, self.n_seq, *self.layout)


class _HeadInput(Exception):
    """Raised by a pre-hook on the output layer to stop the forward once its input is known."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = x


@torch.no_grad()
def capture(model, items, pad_id: int, check: bool = True, shared: bool = True) -> HeadInputs:
    """One forward of the frozen body over the pairs (``shared``: each pair in one row, its prompt once).

    ``check=True`` runs the full model (logits over V at every scored position) so
    ``forward_logps`` can be compared with the cached head once; ``check=False`` stops at the
    output layer's input: the full-vocab matmul and log-softmax are skipped.
    """
    head = model.get_output_embeddings()
    bias = head.bias.detach().float() if getattr(head, "bias", None) is not None else None
    n_seq = 2 * len(items)
    if check:
        s = pair_logps(model, items, pad_id, shared, capture_hidden=True)
        h = torch.cat(s.hidden).float()
        targets = torch.cat(s.targets)
        seq = torch.cat([torch.full((len(t),), j, dtype=torch.long, device=h.device) for j, t in enumerate(s.targets)])
        return HeadInputs(h, targets, seq, n_seq, s.logps.float(), bias)

    def stop(_module, args):
        raise _HeadInput(args[0])

    if shared:
        check_shared_prompt(model)
    batch = pair_batch(model, items, pad_id, shared)
    hook = head.register_forward_pre_hook(stop)
    try:
        model(**batch.model_inputs(), use_cache=False)
        raise RuntimeError("the model's forward never called its output layer")
    except _HeadInput as e:
        hidden = e.x
    finally:
        hook.remove()
    # the batch lists scored tokens by sequence, then position: the order of the per-row concatenation
    return HeadInputs(hidden[batch.row, batch.pos].float(), batch.target, batch.seq, n_seq, None, bias)


@dataclass
class SelfCheck:
    """The outcome of :func:`self_check`: per-sequence mean per-token errors against a tolerance."""

    err: torch.Tensor  # (n_seq,) |reference - forward| / n_tokens, nats per token
    tol: float  # per-token tolerance used
    max_abs_logit: float
    dtype: torch.dtype

    @property
    def max_err(self) -> float:
        return float(self.err.max()) if self.err.numel() else 0.0

    @property
    def ok(self) -> bool:
        return self.max_err <= self.tol


def self_check_tolerance(dtype: torch.dtype, max_abs_logit: float, floor: float = 2e-3, k: float = 1.0) -> float:
    """Per-token tolerance of the stage-2 self-check: ``max(floor, k * eps(dtype) * max|logit|)``.

    Why this scale: rounding a logit z to ``dtype`` moves it by at most half an ulp,
    ``eps/2 * |z|``, and a token's log-prob ``z_y - logsumexp(z)`` moves by at most
    ``|dz_y| + max_i |dz_i|``; so ``eps * max|logit|`` (k = 1) is the worst-case per-token
    effect of the model's own logit rounding. Rounding errors grow with the logit scale: the
    fp32 head on upcast hidden states misses a bf16 forward by ~1e-2 nats/token at realistic
    logits (std ~8, max ~30; SmolLM2-135M bf16: 6.2e-3), an fp16 one by ~3e-3, both over 2e-3.
    :func:`self_check` recomputes the rounded logits themselves, so the two sides differ only
    where a kernel accumulates in another order (an occasional 1-ulp flip): measured <= 5e-6
    nats/token on the CPU in fp32, bf16 and fp16, against tolerances of ~0.23 (bf16) and ~0.029
    (fp16) at max|logit| ~ 30. Logit post-processing moves log-probs by whole nats (on the same
    model: soft-capping ``30 tanh(z/30)`` 2.8, ``5 tanh(z/5)`` 15, a logit scale of 0.5 11
    nats/token) and stays detected. ``floor`` keeps fp32 (eps ~ 1.2e-7) at the fixed 2e-3
    nats/token the check always used.
    """
    return max(floor, k * torch.finfo(dtype).eps * max_abs_logit)


@torch.no_grad()
def self_check(inp: HeadInputs, weight: torch.Tensor, bias: torch.Tensor | None = None,
               floor: float = 2e-3, k: float = 1.0) -> SelfCheck:
    """Do the cached hidden states and the output layer reproduce the model's own log-probs?

    Stage 2 assumes ``logits = h W^T (+ b)`` exactly: a model that post-processes its logits
    (Gemma-2 final soft-capping ``30 tanh(z/30)``, Cohere's ``logit_scale``) would be trained
    on a head its forward does not use. The reference log-probs are computed the way the model
    computes them: the head (``weight``, ``bias``: the model's own, in its dtype) applied in
    that dtype to the hidden states, then a log-softmax in fp32. ``inp.h`` is the head's input
    upcast to fp32, which is exact, so ``inp.h.to(weight.dtype)`` is that input bit for bit.
    So a bf16/fp16 model is not flagged for the rounding of its own logits, as it was when the
    fp32 master head was compared with a fixed 2e-3. The per-sequence mean per-token error
    against ``inp.forward_logps`` must stay within :func:`self_check_tolerance`.
    """
    if inp.forward_logps is None:
        raise ValueError("self_check needs HeadInputs captured with check=True")
    h = inp.h.to(device=weight.device, dtype=weight.dtype)
    logits = torch.nn.functional.linear(h, weight, None if bias is None else bias.to(weight.dtype)).float()
    max_abs = float(logits.abs().max()) if logits.numel() else 0.0
    n_tok = torch.bincount(inp.seq, minlength=inp.n_seq).to(logits.dtype).clamp(min=1)
    err = (logits_logps(logits, inp, inplace=True) - inp.forward_logps.to(logits.device)).abs() / n_tok
    return SelfCheck(err, self_check_tolerance(weight.dtype, max_abs, floor, k), max_abs, weight.dtype)


def require_plain_head(inp: HeadInputs, head: torch.nn.Module, floor: float = 2e-3) -> None:
    """Raise unless the output layer's input reproduces the model's log-probs (no hidden logit
    post-processing). The reference is the head applied in the model's dtype
    (:func:`self_check`), with a tolerance that follows that dtype's precision."""
    chk = self_check(inp, head.weight.detach(), getattr(head, "bias", None), floor=floor)
    if not chk.ok:
        raise RuntimeError(
            f"the output layer's input does not reproduce the model's log-probs (max per-token error "
            f"{chk.max_err:.2e} > tolerance {chk.tol:.2e} for {str(chk.dtype).removeprefix('torch.')}, "
            f"max |logit| {chk.max_abs_logit:.1f}); the model post-processes logits (soft-capping or "
            "scaling?), which stage 2 does not support")


def logits_logps(logits: torch.Tensor, inp: HeadInputs, inplace: bool = False,
                 lse_out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence summed log-probs from logits (..., T, V).

    ``inplace`` computes the log-sum-exp in the logits' own storage (they are overwritten), so
    no second tensor of their size is allocated. ``lse_out`` (T,): the logits are a support's
    columns and this is the log-sum-exp of the rest, combined stably (compo/zo/support.py).
    """
    tgt = inp.targets.expand(*logits.shape[:-1])
    picked = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    if inplace:
        mx = logits.amax(dim=-1, keepdim=True)
        lse = logits.sub_(mx).exp_().sum(dim=-1).log_().add_(mx.squeeze(-1))
    else:
        lse = torch.logsumexp(logits, dim=-1)
    return inp.sums(picked - _with_outside(lse, lse_out))


def _with_outside(lse: torch.Tensor, lse_out: torch.Tensor | None) -> torch.Tensor:
    """log(exp(lse) + exp(lse_out)) by logaddexp (a max and a log1p: nothing nearly equal is
    subtracted); ``lse_out`` None or -inf leaves ``lse``."""
    return lse if lse_out is None else torch.logaddexp(lse, lse_out)


def base_logits(w: torch.Tensor, inp: HeadInputs) -> torch.Tensor:
    logits = inp.h @ w.T
    return logits + inp.bias if inp.bias is not None else logits


def head_logps(w: torch.Tensor, inp: HeadInputs) -> torch.Tensor:
    """(n_seq,) log-probs under head ``w`` (fp32)."""
    return logits_logps(base_logits(w, inp), inp)


def shift_rows(base: torch.Tensor) -> torch.Tensor:
    """Base logits minus each row's max: log-probs are unchanged, and a candidate's logits
    (base + a small offset) can go through exp() without the max pass of a log-sum-exp."""
    return base - base.amax(dim=-1, keepdim=True)


TILE_BYTES = 1 << 20  # a CPU tile of candidate logits: about this many bytes, so it stays in a core's L2


def vocab_tile(device: torch.device | str, n_tok: int, v: int) -> int:
    """Vocab columns per tile of a candidate's logits; 0: the whole chunk at once.

    On the CPU a (c, T, V) block of candidate logits is far larger than the caches, so each of
    its passes (matmul, add, exp, sum) went to memory; a (T, tile) tile of one candidate stays
    in cache through all of them. GPUs get the one batched matmul (0), and so does a vocabulary
    that one tile would hold (a small head: per-candidate Python would cost more than it saves)."""
    if torch.device(device).type != "cpu":
        return 0
    tile = max(512, TILE_BYTES // (4 * max(1, n_tok)) // 512 * 512)
    return tile if tile < v else 0


def candidate_logps(base: torch.Tensor, h: torch.Tensor, z: torch.Tensor, scales: torch.Tensor,
                    inp: HeadInputs, out: torch.Tensor | None = None, matmul_dtype: torch.dtype = torch.float32,
                    scratch=None, tile: int = 0, lse_out: torch.Tensor | None = None) -> torch.Tensor:
    """(c, n_seq) log-probs of candidates W + s_i z_i given base logits (T, V).

    ``h`` is the hidden states in the basis ``z`` lives in: the full h (T x H) with z of shape
    (c, V, H), or the projected h Q (T x k) with z of shape (c, V, k). Each candidate's logits are
    ``base + (s_i h) z_i^T`` (the scale folded into the small h); pass ``base`` through
    :func:`shift_rows` and the log-sum-exp needs no max pass (a chunk whose exp() overflows is
    redone with one). ``tile`` (:func:`vocab_tile`): evaluate one candidate's logits ``tile``
    vocab columns at a time, never the whole block; 0: the whole chunk at once, in ``out``, a
    reusable buffer of at least c*T*V floats (overwritten; the log-sum-exp is done in place, so no
    other (c, T, V) fp32 tensor is allocated). ``matmul_dtype`` (``zo.matmul_dtype``): bfloat16 /
    float16 round z and h for the matmul, whose product is added to the fp32 base;
    ``scratch(name, numel, dtype)`` gives reusable buffers for that. ``lse_out`` (T,): ``base``
    and ``z`` cover a vocabulary support and this is the base log-sum-exp outside it.
    """
    hs = h.unsqueeze(0) * scales.view(-1, 1, 1)  # (c, T, width)
    if tile:
        return tiled_logps(base, hs, z, inp, tile, matmul_dtype, scratch, lse_out=lse_out)
    c, n_tok, v = z.shape[0], h.shape[0], z.shape[1]
    logits = (out.view(-1)[: c * n_tok * v].view(c, n_tok, v) if out is not None
              else torch.empty((c, n_tok, v), dtype=torch.float32, device=z.device))

    def fill() -> torch.Tensor:
        if matmul_dtype == torch.float32:
            torch.matmul(hs, z.transpose(1, 2), out=logits)
            return logits.add_(base)
        zl = z.to(matmul_dtype) if scratch is None else scratch("z_low", z.numel(), matmul_dtype).view_as(z).copy_(z)
        low = None if scratch is None else scratch("logits_low", c * n_tok * v, matmul_dtype).view(c, n_tok, v)
        low = torch.matmul(hs.to(matmul_dtype), zl.transpose(1, 2), out=low)
        return logits.copy_(low).add_(base)  # two passes: a mixed-dtype add is several times slower

    lp = shifted_logps(fill(), inp, lse_out)
    if lp is None:  # exp() overflowed or every term underflowed: the max-shifted log-sum-exp
        lp = logits_logps(fill(), inp, inplace=True, lse_out=lse_out)
    return lp


def tiled_logps(base: torch.Tensor, hs: torch.Tensor | None, z: torch.Tensor | None, inp: HeadInputs, tile: int,
                matmul_dtype: torch.dtype = torch.float32, scratch=None, fill=None,
                lse_out: torch.Tensor | None = None) -> torch.Tensor:
    """(c, n_seq) log-probs of logits ``base + hs_i z_i^T``, one candidate and ``tile`` vocab
    columns at a time (``hs`` None: the base alone, c = 1, with the same arithmetic).

    The target logits come from a (c, T, width) gather of z's target rows, not from the tiles;
    each row's sum of exp() is summed over its tiles in a fixed order. As in
    :func:`candidate_logps`, a shifted base needs no max pass; a candidate whose sum is not
    finite is redone, alone, with a per-tile max (combined exactly: ``M + log sum_j s_j
    exp(m_j - M)``), so its numbers do not depend on the chunk it came in. ``fill(i, a, b)``,
    when given, writes rows a..b of z_i just before their tile is first used (z drawn block by
    block while in cache: compo/zo/fused.py). ``lse_out``: as in :func:`candidate_logps`.
    """
    n_tok, v = base.shape
    low = None if matmul_dtype == torch.float32 else matmul_dtype
    if low is not None and hs is not None:
        hs = hs.to(low)
    lse = _tiled_lse(base, hs, z, tile, low, scratch, shift=False, fill=fill)
    bad = (~torch.isfinite(lse).all(1)).nonzero().squeeze(1)  # exp() overflowed or every term underflowed
    if bad.numel():
        lse[bad] = _tiled_lse(base, None if hs is None else hs[bad], None if z is None else z[bad], tile, low,
                              scratch, shift=True)
    picked = base.gather(1, inp.targets.unsqueeze(1)).squeeze(1).expand(1 if hs is None else hs.shape[0], n_tok)
    if hs is not None:
        zt = z.index_select(1, inp.targets)  # (c, T, width): each token's target row of z
        if low is not None:
            zt = zt.to(low)
        picked = picked + (hs.float() * zt.float()).sum(-1).to(hs.dtype).float()
    return inp.sums(picked - _with_outside(lse, lse_out))


def _tiled_lse(base, hs, z, tile: int, low, scratch, shift: bool, fill=None) -> torch.Tensor:
    """(c, T) log-sum-exp over V of base + hs_i z_i^T, built one (T, tile) tile at a time."""
    n_tok, v = base.shape
    c = 1 if hs is None else hs.shape[0]
    edges = list(range(0, v, tile))
    get = scratch or (lambda name, numel, dtype: torch.empty(numel, dtype=dtype, device=base.device))
    buf = get("tile", n_tok * tile, torch.float32).view(n_tok, tile)
    buf_low = None if low is None else get("tile_low", n_tok * tile, low).view(n_tok, tile)
    z_low = None if low is None else get("z_tile_low", tile * z.shape[2], low).view(tile, z.shape[2])
    sums = torch.empty((c, len(edges), n_tok), dtype=torch.float32, device=base.device)
    tops = torch.empty_like(sums) if shift else None
    for i in range(c):
        for j, a in enumerate(edges):
            b = min(v, a + tile)
            t = buf[:, : b - a]
            if fill is not None:
                fill(i, a, b)
            if hs is None:
                t.copy_(base[:, a:b])
            else:
                _tile_logits(t, base, hs[i], z[i, a:b], a, z_low, buf_low)
            if shift:
                torch.amax(t, -1, out=tops[i, j])
                t.sub_(tops[i, j].unsqueeze(1))
            torch.sum(exp_(t), -1, out=sums[i, j])
    if not shift:
        return sums.sum(1).log_()
    top = tops.amax(1, keepdim=True)
    return (sums * (tops - top).exp()).sum(1).log_().add_(top.squeeze(1))


def exp_(t: torch.Tensor) -> torch.Tensor:
    """``t.exp_()``; a CPU float32 tile of 32K+ entries goes through NumPy's exp, about twice as
    fast as torch's on one core here (both vectorised, both within a few ulps), with the GIL
    released (on a small one NumPy's fixed cost would outweigh that)."""
    if t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() >= 1 << 15:
        a = t.numpy()
        with np.errstate(over="ignore", under="ignore"):  # an overflow is caught by the caller's finiteness check
            np.exp(a, out=a)
        return t
    return t.exp_()


def _tile_logits(t: torch.Tensor, base: torch.Tensor, hs: torch.Tensor, rows: torch.Tensor, a: int,
                z_low: torch.Tensor | None = None, buf_low: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` (T, n) = base[:, a:a+n] + hs rows^T for one candidate's z rows a..a+n; with the
    low-precision buffers (``z_low``: >= n x width, ``buf_low``: T x >= n) the matmul is in their dtype."""
    n = rows.shape[0]
    if z_low is None:
        return torch.addmm(base[:, a : a + n], hs, rows.T, out=t)
    zl = z_low[:n].copy_(rows)
    return t.copy_(torch.mm(hs, zl.T, out=buf_low[:, :n])).add_(base[:, a : a + n])


def base_logps(base: torch.Tensor, inp: HeadInputs, tile: int = 0,
               lse_out: torch.Tensor | None = None) -> torch.Tensor | None:
    """(n_seq,) log-probs of the (shifted) base logits with the candidates' arithmetic at offset
    0, so a candidate whose offset is 0 ties with the base; None when not finite."""
    lp = (shifted_logps(base.clone(), inp, lse_out) if not tile
          else tiled_logps(base, None, None, inp, tile, lse_out=lse_out)[0])
    return lp if lp is not None and torch.isfinite(lp).all() else None


def shifted_logps(logits: torch.Tensor, inp: HeadInputs, lse_out: torch.Tensor | None = None) -> torch.Tensor | None:
    """:func:`logits_logps` in place without the max shift (logits near or below 0 by
    construction); None when a log-sum-exp (over ``logits``' own columns) is not finite."""
    picked = logits.gather(-1, inp.targets.expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    lse = logits.exp_().sum(dim=-1).log_()
    if not torch.isfinite(lse).all():
        return None
    return inp.sums(picked - _with_outside(lse, lse_out))


def projection_basis(h: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis Q (H x k) of span{h_t}; k = numerical rank of h."""
    u, s, _ = torch.linalg.svd(h.T.double(), full_matrices=False)
    k = int((s > rtol * s.max()).sum()) if s.numel() else 0
    return u[:, : max(k, 1)].float()


def chunk_size(budget_mb: int, v: int, width: int, n_tokens: int, low_bytes: int = 0) -> int:
    """Perturbations per chunk so the draws and the candidate logits fit ``budget_mb``
    (``low_bytes``: the element size of a reduced-precision matmul's copies of both). Tiled
    evaluation (:func:`vocab_tile`) needs less; the chunk stays the same, so the order in which
    the votes are summed does too."""
    per = 4 * (v * width + 2 * n_tokens * v) + low_bytes * (v * width + n_tokens * v)
    return max(1, int(budget_mb * 2**20 // per))
