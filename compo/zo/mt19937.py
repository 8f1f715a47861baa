"""torch's CPU normal stream (``zo.rng: torch``) drawn ~2.5x faster, with the same numbers.

torch's CPU ``randn`` makes its uniforms one at a time through the generator's engine (most of
its ~2.8 ns a number); :mod:`compo.zo.mt_kernel` runs the same mt19937 engine and the same
Box-Muller arithmetic in a numba kernel. :class:`TorchCPUStream` stands in for a seeded
``torch.Generator`` on the CPU: :meth:`TorchCPUStream.fill` gives what ``torch.randn(...,
generator=gen, out=rows)`` would, and advances the stream as it would. It is used only where
:func:`available` has found the kernel to give torch.randn's numbers bit for bit in this process
(torch's kernels differ by CPU: without AVX2 its Box-Muller uses the C library's ln, sin and
cos), so a run draws the same numbers whichever path it takes; otherwise draws use torch.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

_OK: bool | None = None
_SEED_MASK = 0xFFFFFFFF  # torch seeds mt19937 with a seed's low 32 bits
_F32 = dict(dtype=torch.float32, device="cpu")  # what draws fill, whatever torch's defaults


class TorchCPUStream:
    """The stream of ``torch.Generator().manual_seed(seed)``, at its start."""

    def __init__(self, seed: int):
        from compo.zo import mt_kernel

        self._kernel = mt_kernel
        self.state = np.empty(mt_kernel.N, np.uint32)
        mt_kernel.seed(self.state, seed & _SEED_MASK)
        self.pos = np.array([mt_kernel.N], np.int64)  # a fresh engine twists before its first word

    def fill(self, rows: torch.Tensor) -> None:
        """``rows`` (contiguous float32 CPU, >= 16 numbers) = the stream's next normals."""
        if rows.numel() < 16 or rows.dtype != torch.float32 or not rows.is_contiguous():
            raise ValueError("TorchCPUStream fills contiguous float32 blocks of 16 numbers or more "
                             f"(torch draws fewer another way), not {tuple(rows.shape)} {rows.dtype}")
        self._kernel.fill(rows.view(-1).numpy(), self.state, self.pos)


def _matches_torch() -> bool:
    """Whether the kernel gives torch.randn's numbers here, fills chained as PerturbationSource
    chains them: whole draws, tails (not multiples of 16), blocks of tiles, seeds past 32 bits."""
    cases = ((12345, (16,)), (2**40 + 7, (37, 7)), (0x7FFF_FFFF_FFFF_FFFF, (4100,)),
             (987654321, (3, 1249)), (5, (48, 96)))
    for s, shape in cases:
        gen = torch.Generator().manual_seed(s)
        stream = TorchCPUStream(s)
        for _ in range(2):  # the second draw continues each stream
            want = torch.randn(shape, generator=gen, **_F32)
            got = torch.empty(shape, **_F32)
            stream.fill(got)
            if not torch.equal(want.view(torch.int32), got.view(torch.int32)):
                return False
    gen, stream = torch.Generator().manual_seed(77), TorchCPUStream(77)
    want, got = torch.randn((40, 6), generator=gen, **_F32), torch.empty((40, 6), **_F32)
    for a in range(0, 40, 8):  # tiles of 48 numbers, as the fused path fills them
        stream.fill(got[a : a + 8])
    return torch.equal(want.view(torch.int32), got.view(torch.int32))


def available() -> bool:
    """Whether CPU draws under ``zo.rng: torch`` can use the kernel (numba importable and its
    numbers torch.randn's in this process); checked once. A kernel that cannot load or run is
    said once (draws are then ~2.5x slower, with the same numbers); one whose numbers differ
    (a torch whose normal kernel is another, e.g. on a CPU without AVX2) is left unused quietly."""
    global _OK
    if _OK is None:
        try:
            _OK = _matches_torch()
        except Exception as e:  # numba missing, broken, or without a writable cache
            warnings.warn(f"zo.rng=torch: compo's CPU draw kernel is unavailable ({type(e).__name__}: {e}); "
                          "perturbations are drawn by torch (the same numbers, ~2.5x slower)", stacklevel=2)
            _OK = False
    return _OK
