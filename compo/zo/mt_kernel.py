"""The numba kernel of compo/zo/mt19937.py: torch's CPU ``randn`` (``zo.rng: torch``), bit for bit.

torch fills a float32 tensor of 16 or more numbers in two passes: uniforms ``(x & 0xFFFFFF) 2^-24``
from its mt19937 engine, one per number; then Box-Muller on each block of 16 (numbers 0-7 give
the radii, 8-15 the angles), with the Cephes-style single-precision ln and sincos polynomials of
its AVX2 kernels, compiled with their multiply-adds fused. When the size is not a multiple of 16,
16 more uniforms replace the last 16 numbers and are transformed again. This kernel does the
same operations in the same order, a few thousand numbers at a time so that both passes stay in
cache; compo/zo/mt19937.py checks it against torch.randn before using it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.core.extending import intrinsic

from compo.zo.philox_kernel import _bits, _float

_u32, _u64, _i32, _f32 = np.uint32, np.uint64, np.int32, np.float32
N, M = 624, 397  # mt19937 state words, twist offset
_UPPER, _LOWER, _MATRIX = _u64(0x80000000), _u64(0x7FFFFFFF), _u64(0x9908B0DF)
_T1, _T2, _LOW = _u32(0x9D2C5680), _u32(0xEFC60000), _u64(0xFFFFFFFF)
_UNIT = _f32(2.0**-24)
_ONE, _ZERO, _HALF, _MINUS2 = _f32(1), _f32(0), _f32(0.5), _f32(-2)
_TWO_PI = _f32(2.0 * math.pi)
_SQRTHF = _f32(0.707106781186547524)
_LOGP = tuple(_f32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                                1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                                3.3333331174e-1))
_LQ1, _LQ2 = _f32(-2.12194440e-4), _f32(0.693359375)
_FOPI = _f32(1.27323954473516)  # 4 / pi
_DP1, _DP2, _DP3 = _f32(-0.78515625), _f32(-2.4187564849853515625e-4), _f32(-3.77489497744594108e-8)
_SINP = tuple(_f32(c) for c in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1))
_COSP = tuple(_f32(c) for c in (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2))
_MANT, _HALF_BITS, _SIGN = _u32(0x807FFFFF), _u32(0x3F000000), _u32(0x80000000)
_MIN_NORM = _f32(1.1754943508222875e-38)
CHUNK = 4096  # numbers per pass pair (16 KB): uniforms then their Box-Muller while in L1
_OPTS = dict(nogil=True, boundscheck=False, error_model="numpy", cache=True)


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (float32), as the fused multiply-adds of torch's kernels."""
    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(**_OPTS)
def seed(state, s):
    """mt19937's state for the 32-bit seed ``s`` (torch keeps a seed's low 32 bits)."""
    state[0] = _u32(s)
    for j in range(1, N):
        x = _u64(state[j - 1])
        state[j] = _u32((_u64(1812433253) * (x ^ (x >> _u64(30))) + _u64(j)) & _LOW)


@njit(**_OPTS)
def _mix(hi, lo, far):
    y = (hi & _UPPER) | (lo & _LOWER)
    return _u32(far ^ (y >> _u64(1)) ^ (_MATRIX * (y & _u64(1))))


@njit(**_OPTS)
def _twist(st):
    """mt19937's next state, in three runs without index wrap-around (so they vectorise)."""
    for i in range(N - M):
        st[i] = _mix(_u64(st[i]), _u64(st[i + 1]), _u64(st[i + M]))
    for i in range(N - M, N - 1):
        st[i] = _mix(_u64(st[i]), _u64(st[i + 1]), _u64(st[i + M - N]))
    st[N - 1] = _mix(_u64(st[N - 1]), _u64(st[0]), _u64(st[M - 1]))


@njit(**_OPTS)
def _temper(out, o, st, p, run):
    """out[o : o + run] = the uniforms of state words st[p : p + run]."""
    src, dst = st[p : p + run], out[o : o + run]  # views: indices from 0, which LLVM vectorises
    for t in range(run):
        y = src[t]
        y = _u32(y ^ (y >> _u32(11)))
        y = _u32(y ^ (_u32(y << _u32(7)) & _T1))
        y = _u32(y ^ (_u32(y << _u32(15)) & _T2))
        y = _u32(y ^ (y >> _u32(18)))
        dst[t] = _f32(_i32(y & _u32(0xFFFFFF))) * _UNIT


@njit(**_OPTS)
def _uniforms(out, a, n, st, p):
    """out[a : a + n] = the next n uniforms of state ``st`` at word ``p``; returns the new ``p``."""
    k = 0
    while k < n:
        if p == N:
            _twist(st)
            p = 0
        run = min(n - k, N - p)
        _temper(out, a + k, st, p, run)
        p += run
        k += run
    return p


@njit(**_OPTS)
def _box_muller(d, a, n, buf):
    """Box-Muller in place on each block of 16 in d[a : a + n] (radii from numbers 0-7, angles
    from 8-15), with the ln and sincos of torch's AVX2 kernel written out inline, their
    multiply-adds fused where its compiler fused them. The pairs are gathered into ``buf``
    (2, >= n/2) first, so that LLVM vectorises one flat loop over them."""
    m = n // 2
    u, w, da = buf[0], buf[1], d[a : a + n]
    for t in range(m):
        i = _u64(t >> 3) * _u64(16) + _u64(t & 7)  # unsigned: no negative-index wrap to check
        u[t], w[t] = da[i], da[i + _u64(8)]
    for t in range(m):
        # ln u, u = 1 - uniform in (0, 1]
        x = max(_ONE - u[t], _MIN_NORM)
        b = _bits(x)
        e = _f32(_i32(b >> _u32(23)) - _i32(127)) + _ONE
        x = _float((b & _MANT) | _HALF_BITS)
        low = x < _SQRTHF
        tmp = x if low else _ZERO
        x = x - _ONE
        e = e - (_ONE if low else _ZERO)
        x = x + tmp
        z = x * x
        y = _LOGP[0]
        y = _fma(y, x, _LOGP[1])
        y = _fma(y, x, _LOGP[2])
        y = _fma(y, x, _LOGP[3])
        y = _fma(y, x, _LOGP[4])
        y = _fma(y, x, _LOGP[5])
        y = _fma(y, x, _LOGP[6])
        y = _fma(y, x, _LOGP[7])
        y = _fma(y, x, _LOGP[8])
        y = _fma(y * x, z, e * _LQ1)
        y = _fma(z, -_HALF, y)
        r = _f32(math.sqrt(_MINUS2 * _fma(e, _LQ2, x + y)))
        # sin and cos of the angle 2 pi u2
        x = _TWO_PI * w[t]
        bx = _bits(x)
        sign_sin = bx & _SIGN
        x = _float(bx & ~_SIGN)
        q = (_i32(x * _FOPI) + _i32(1)) & _i32(-2)
        y = _f32(q)
        sign_sin ^= _u32(q & _i32(4)) << _u32(29)
        poly = (q & _i32(2)) == _i32(0)
        x = _fma(y, _DP1, x)
        x = _fma(y, _DP2, x)
        x = _fma(y, _DP3, x)
        sign_cos = _u32(~(q - _i32(2)) & _i32(4)) << _u32(29)
        z = x * x
        c = _fma(_fma(_COSP[0], z, _COSP[1]), z, _COSP[2]) * z
        c = _fma(c, z, -(z * _HALF)) + _ONE
        s = _fma(_fma(_SINP[0], z, _SINP[1]), z, _SINP[2]) * z
        s = _fma(s, x, x)
        s_sin = s if poly else _ZERO  # the polynomial each result takes
        c_sin = _ZERO if poly else c
        sn = c_sin + s_sin
        cs = (c - c_sin) + (s - s_sin)
        u[t] = r * _float(_bits(cs) ^ sign_cos) + _ZERO
        w[t] = r * _float(_bits(sn) ^ sign_sin) + _ZERO
    for t in range(m):
        i = _u64(t >> 3) * _u64(16) + _u64(t & 7)
        da[i], da[i + _u64(8)] = u[t], w[t]


@njit(**_OPTS)
def fill(out, st, pos):
    """``out`` (1-D float32, >= 16 numbers) = torch.randn's numbers from state ``st`` at word
    ``pos[0]``, which is advanced as torch's engine would be."""
    n = out.shape[0]
    p = pos[0]
    buf = np.empty((2, CHUNK // 2), np.float32)
    full = n - n % 16
    a = 0
    while a < full:
        b = min(CHUNK, full - a)
        p = _uniforms(out, a, b, st, p)
        _box_muller(out, a, b, buf)
        a += b
    if n % 16:
        p = _uniforms(out, full, n - full, st, p)  # drawn, then replaced as torch does
        p = _uniforms(out, n - 16, 16, st, p)
        _box_muller(out, n - 16, 16, buf)
    pos[0] = p
