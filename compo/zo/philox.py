"""Standard normals from Philox4x32-10 (``zo.rng: philox``), the same numbers on every device.

Philox (Salmon et al., SC'11; behind cuRAND and PyTorch's CUDA generator) is counter-based:
block c of a stream keyed by (k0, k1) is a pure function of c, so any slice of a draw is
computed on its own, in any order, on any thread. Number j of a stream is lane j % 4 of the
block for counter (j // 4 low word, j // 4 high word, 0, 0). Lanes (0, 1) and (2, 3) are turned
into two normals each by Box-Muller: ``r = sqrt(-2 ln u)`` with ``u = ((a >> 8) + 1) 2^-24`` in
(0, 1] and the angle ``(b >> 30 + ((b >> 6) & 0xFFFFFF) 2^-24) pi/2``, in float32 with series
for ln, sin and cos written out as single multiplies and adds (no library ln/sin/cos, no fused
multiply-add), so CPUs and CUDA GPUs give the same bits (CUDA untested so far; MPS, lacking
float64, is refused). On the CPU a numba kernel draws ~1.5 ns a number (torch's mt19937 normal:
~4 ns); :func:`normal_torch` is the same arithmetic in torch ops, for GPUs and for a machine
without numba.
"""

from __future__ import annotations

import warnings

import torch

from compo.zo.philox_spec import ANGLE, COS, LN2, LOG, M0, M1, ROUNDS, SIN, SQRT2, W0, W1

_SLICE = 1 << 22  # numbers per torch-ops pass (~200 MB of temporaries)
_MASK = 0xFFFFFFFF
_SIGN = -(1 << 31)  # the float32 sign bit, as an int32


def keys(seed: int) -> tuple[int, int]:
    """The Philox key (k0, k1) of a 64-bit seed."""
    return seed & _MASK, (seed >> 32) & _MASK


# ----- torch ops (any device) -------------------------------------------------------------

def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m for 32-bit values a held in int64, without overflow."""
    lo_part, hi_part = a * (m & 0xFFFF), a * (m >> 16)  # each < 2^48
    t = lo_part + ((hi_part & 0xFFFF) << 16)
    return (hi_part >> 16) + (t >> 32), t & _MASK


def philox_torch(ctr: tuple[torch.Tensor, ...], k0: int, k1: int) -> tuple[torch.Tensor, ...]:
    """The four 32-bit output words (int64 tensors) of Philox4x32-10 for counters ``ctr``."""
    x0, x1, x2, x3 = ctr
    for _ in range(ROUNDS):
        h0, l0 = _mulhilo(x0, M0)
        h1, l1 = _mulhilo(x2, M1)
        x0, x1, x2, x3 = h1 ^ x1 ^ k0, l1, h0 ^ x3 ^ k1, l0
        k0, k1 = (k0 + W0) & _MASK, (k1 + W1) & _MASK
    return x0, x1, x2, x3


def _horner(x: torch.Tensor, coefs) -> torch.Tensor:
    """(((c0 x + c1) x + c2) ...) x + c_n, one multiply and one add a term."""
    acc = x * float(coefs[0])
    for c in coefs[1:-1]:
        acc = (acc + float(c)) * x
    return acc + float(coefs[-1])


def _box_muller_torch(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two normals from 32-bit words ``a`` (radius) and ``b`` (angle), int64 tensors."""
    y = ((a >> 8) + 1).to(torch.float32)  # 1 .. 2^24, exact
    bits = y.view(torch.int32)
    mb = (bits & 0x7FFFFF) | 0x3F800000
    big = (mb.view(torch.float32) > float(SQRT2)).to(torch.int32)
    m = (mb - (big << 23)).view(torch.float32)  # in [sqrt(1/2), sqrt(2)]
    e = ((bits >> 23) - 151 + big).to(torch.float32)
    s = (m - 1.0) / (m + 1.0)
    ln = e * float(LN2) + s * _horner(s * s, LOG)
    # torch's float32 sqrt is not always correctly rounded (SLEEF, 0.5001 ulp); float64, then float32, is
    r = torch.sqrt((ln * -2.0).double()).float()
    q = (b >> 30).to(torch.int32)
    phi = ((b >> 6) & 0xFFFFFF).to(torch.float32) * float(ANGLE)
    p2 = phi * phi
    sn = _horner(p2, SIN) * p2 * phi + phi
    cs = _horner(p2, COS)
    swap = (q & 1).bool()
    cc, ss = torch.where(swap, sn, cs), torch.where(swap, cs, sn)
    cbit = ((q ^ (q >> 1)) & 1) * _SIGN  # cos < 0 in quadrants 1, 2
    sbit = (q >> 1) * _SIGN  # sin < 0 in quadrants 2, 3
    cos_signed = (cc.view(torch.int32) ^ cbit).view(torch.float32)
    sin_signed = (ss.view(torch.int32) ^ sbit).view(torch.float32)
    return r * cos_signed, r * sin_signed


def normal_torch(n: int, k0: int, k1: int, start: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Numbers start .. start+n of stream (k0, k1), float32, with torch ops on ``device``."""
    c_lo, c_hi = start // 4, (start + n + 3) // 4
    c = torch.arange(c_lo, c_hi, dtype=torch.int64, device=device)
    zero = torch.zeros_like(c)
    x0, x1, x2, x3 = philox_torch((c & _MASK, c >> 32, zero, zero), k0, k1)
    z0, z1 = _box_muller_torch(x0, x1)
    z2, z3 = _box_muller_torch(x2, x3)
    out = torch.stack((z0, z1, z2, z3), 1).view(-1)
    a = start - 4 * c_lo
    return out[a : a + n]


_KERNEL = None


def _kernel():
    """The compiled CPU kernel, or None (with one warning) where numba cannot be imported."""
    global _KERNEL
    if _KERNEL is None:
        try:
            from compo.zo.philox_kernel import fill  # imports numba: only when a CPU draw first needs it

            _KERNEL = fill
        except Exception as e:  # not installed, or no writable cache, or a numba/numpy mismatch
            warnings.warn(f"zo.rng=philox: the numba kernel is unavailable ({type(e).__name__}: {e}), so CPU draws "
                          "use torch ops (the same numbers, ~75x slower); pip install numba", stacklevel=3)
            _KERNEL = False
    return _KERNEL or None


def fill_normal(out: torch.Tensor, k0: int, k1: int, start: int = 0) -> torch.Tensor:
    """``out`` (contiguous, float32) = numbers start .. start+numel of stream (k0, k1)."""
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"philox draws fill contiguous float32 tensors, not {out.dtype} "
                         f"{'contiguous' if out.is_contiguous() else 'strided'}")
    flat = out.view(-1)
    kernel = _kernel() if out.device.type == "cpu" else None
    if kernel is not None:
        kernel(flat.numpy(), start, k0, k1)
        return out
    for a in range(0, flat.numel(), _SLICE):  # torch ops hold ~50 bytes of temporaries a number
        b = min(flat.numel(), a + _SLICE)
        flat[a:b] = normal_torch(b - a, k0, k1, start + a, out.device)
    return out


class PhiloxStream:
    """A position in one Philox stream: :meth:`fill` writes its next numbers, as a generator
    would (so a draw filled block by block equals one filled whole)."""

    def __init__(self, seed: int):
        self.k0, self.k1 = keys(seed)
        self.pos = 0

    def fill(self, rows: torch.Tensor) -> None:
        fill_normal(rows, self.k0, self.k1, self.pos)
        self.pos += rows.numel()
