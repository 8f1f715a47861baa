"""The CPU kernel of compo/zo/philox.py in numba: :func:`fill` gives the numbers of
:func:`compo.zo.philox.normal_torch`, bit for bit, at ~1.5 ns a number on one core.

Three passes over blocks of 512 counters (8 KB of normals, in L1): the Philox rounds, then
Box-Muller on lanes (0, 1) and on lanes (2, 3), then the interleaved store; LLVM vectorises
each pass. No fast-math: no multiply-add is fused, so each operation rounds as in torch.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.core.extending import intrinsic

from compo.zo.philox_spec import ANGLE, COS, LN2, LOG, M0, M1, ROUNDS, SIN, SQRT2, W0, W1

_u32, _u64, _i32, _f32 = np.uint32, np.uint64, np.int32, np.float32
_M0, _M1, _W0, _W1 = _u64(M0), _u64(M1), _u32(W0), _u32(W1)
_L9, _L7, _L5, _L3, _L1 = LOG
_S13, _S11, _S9, _S7, _S5, _S3 = SIN
_C14, _C12, _C10, _C8, _C6, _C4, _C2, _C0 = COS
_ONE, _MINUS2, _SIGN, _LOW = _f32(1), _f32(-2), _u32(1 << 31), _u64(0xFFFFFFFF)
BLOCK = 512
_OPTS = dict(nogil=True, boundscheck=False, error_model="numpy", cache=True)


@intrinsic
def _bits(typingctx, x):
    """A float32's bits as a uint32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))
    return types.uint32(types.float32), codegen


@intrinsic
def _float(typingctx, x):
    """The float32 with these bits."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.uint32), codegen


@njit(**_OPTS)
def _philox(c0, n, k0, k1, x0, x1, x2, x3):
    """Blocks for counters (c, 0) .. (c0 + n - 1, 0) into the four word arrays."""
    for i in range(n):
        c = c0 + _u64(i)
        a0, a1, a2, a3 = _u32(c & _LOW), _u32(c >> _u64(32)), _u32(0), _u32(0)
        ka, kb = k0, k1
        for _ in range(ROUNDS):
            p0, p1 = _u64(a0) * _M0, _u64(a2) * _M1
            n0 = _u32(p1 >> _u64(32)) ^ a1 ^ ka
            n2 = _u32(p0 >> _u64(32)) ^ a3 ^ kb
            a0, a1, a2, a3 = n0, _u32(p1), n2, _u32(p0)
            ka, kb = _u32(ka + _W0), _u32(kb + _W1)
        x0[i], x1[i], x2[i], x3[i] = a0, a1, a2, a3


@njit(**_OPTS)
def _box_muller(n, ua, ub, za, zb):
    """Two normals from each (radius word, angle word): philox._box_muller_torch's operations."""
    for i in range(n):
        bits = _bits(_f32((ua[i] >> _u32(8)) + _u32(1)))
        mb = (bits & _u32(0x7FFFFF)) | _u32(0x3F800000)
        big = _u32(_float(mb) > SQRT2)
        m = _float(mb - (big << _u32(23)))
        e = _f32(_i32(bits >> _u32(23)) - _i32(151) + _i32(big))
        s = (m - _ONE) / (m + _ONE)
        s2 = s * s
        ln = e * LN2 + s * ((((s2 * _L9 + _L7) * s2 + _L5) * s2 + _L3) * s2 + _L1)
        r = math.sqrt(ln * _MINUS2)
        b = ub[i]
        q = b >> _u32(30)
        phi = _f32((b >> _u32(6)) & _u32(0xFFFFFF)) * ANGLE
        p2 = phi * phi
        sn = ((((((p2 * _S13 + _S11) * p2 + _S9) * p2 + _S7) * p2 + _S5) * p2 + _S3) * p2) * phi + phi
        cs = (((((((p2 * _C14 + _C12) * p2 + _C10) * p2 + _C8) * p2 + _C6) * p2 + _C4) * p2 + _C2) * p2 + _C0)
        swap = (q & _u32(1)) != _u32(0)
        cc = sn if swap else cs
        ss = cs if swap else sn
        za[i] = r * _float(_bits(cc) ^ (((q ^ (q >> _u32(1))) & _u32(1)) * _SIGN))
        zb[i] = r * _float(_bits(ss) ^ ((q >> _u32(1)) * _SIGN))


@njit(**_OPTS)
def fill(out, start, k0, k1):
    """``out`` (1-D float32) = numbers start .. start + len(out) of stream (k0, k1)."""
    x = np.empty((4, BLOCK), np.uint32)
    z = np.empty((4, BLOCK), np.float32)
    n = out.shape[0]
    c = start // 4
    c_hi = (start + n + 3) // 4
    while c < c_hi:
        nb = min(BLOCK, c_hi - c)
        _philox(_u64(c), nb, _u32(k0), _u32(k1), x[0], x[1], x[2], x[3])
        _box_muller(nb, x[0], x[1], z[0], z[1])
        _box_muller(nb, x[2], x[3], z[2], z[3])
        j0 = 4 * c - start  # where this block's first number goes in out
        if j0 >= 0 and j0 + 4 * nb <= n:
            for i in range(nb):
                for lane in range(4):
                    out[j0 + 4 * i + lane] = z[lane, i]
        else:
            for i in range(nb):
                for lane in range(4):
                    j = j0 + 4 * i + lane
                    if 0 <= j < n:
                        out[j] = z[lane, i]
        c += nb
