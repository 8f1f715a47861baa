"""CPU stage-2 candidates one per thread, drawn and evaluated a vocab tile at a time.

Each worker thread owns whole perturbations. It draws z_i one (tile, width) block at a time and
evaluates that block's candidate logits while the block is still in cache: draw, matmul, exp,
row sums, with single-threaded torch ops. The draws equal one whole-tensor draw
(:meth:`PerturbationSource.tiles_match`), and the arithmetic is :func:`tiled_logps`'s, one
candidate at a time. With at least as many candidates in a chunk as threads, a candidate's
numbers do not depend on which thread ran it or on how many threads there were. A chunk with
fewer candidates (a large head's small chunk, a step's last one) shares the spare threads out
to each worker's ops, and then MKL's matmul may round by its thread count, as it does off this path.
"""

from __future__ import annotations

import threading

import torch

from compo.zo.head import HeadInputs, tiled_logps
from compo.zo.perturb import PerturbationSource, in_workers

_LOCAL = threading.local()
FUSE_MIN_NUMBERS = 1 << 20  # per draw; below it a candidate's ~20 small ops per thread cost more than they save


def worth_fusing(v: int, width: int) -> bool:
    """Whether a (v, width) perturbation is big enough for one thread a candidate: a small head's
    candidates are mostly Python and lock hand-offs between the threads (the toy quickstart's
    986-number draws ran 4x slower fused), so it keeps the batched path."""
    return v * width >= FUSE_MIN_NUMBERS


def _scratch(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's flat buffer ``name`` of at least ``numel`` entries, kept across calls."""
    bufs = _LOCAL.__dict__.setdefault("bufs", {})
    buf = bufs.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = bufs[name] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def fused_logps(source: PerturbationSource, step: int, indices: list[int], z: torch.Tensor, base: torch.Tensor,
                hz: torch.Tensor, inp: HeadInputs, tile: int,
                matmul_dtype: torch.dtype = torch.float32,
                lse_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """((c, n_seq) log-probs of candidates W + s_i z_i, (c,) scales s) for perturbations
    ``indices`` of ``step``, with ``z`` (>= c, V, width) filled as ``source.draw`` fills it.

    ``base``: the shifted base logits (T, V) (:func:`shift_rows`); ``hz``: h in z's basis;
    ``lse_out``: a support's outside log-sum-exp (:func:`tiled_logps`).
    A gaussian source draws each block just before it is used; a sphere needs ||z_i|| before
    its first block, so its z is drawn whole first (the candidates still go one per thread).
    """
    c = len(indices)
    interleave = source.distribution == "gaussian" and source.tiles_match(tile)
    if interleave:
        scales = torch.full((c,), source.radius)
    else:
        scales = source.scales(source.draw(step, indices, out=z))
    lp = torch.empty((c, inp.n_seq))
    workers = max(1, min(source.threads, c))

    @torch.no_grad()  # grad mode is per thread: the pool's start with it on
    def one(j: int) -> None:
        gen = source.generator(step, indices[j]) if interleave else None
        fill = None if gen is None else (lambda i, a, b: source.fill(gen, z[j, a:b]))
        lp[j] = tiled_logps(base, (hz * scales[j])[None], z[j : j + 1], inp, tile, matmul_dtype, _scratch, fill,
                            lse_out)[0]

    # fewer candidates than threads (a large head's small chunk): the spare threads go to each worker's ops
    in_workers(workers, lambda w: [one(j) for j in range(w, c, workers)], max(1, source.threads // workers))
    return lp, scales
