"""The constants of compo's Philox4x32-10 normals (``zo.rng: philox``), shared by the torch-ops
draw (compo/zo/philox.py) and the numba CPU kernel (compo/zo/philox_kernel.py): the round
multipliers and key schedule of Philox, and the float32 series coefficients of Box-Muller."""

from __future__ import annotations

import math

import numpy as np

M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # key schedule (Weyl) increments
ROUNDS = 10
_F = np.float32
LN2, SQRT2, ANGLE = _F(math.log(2)), _F(math.sqrt(2)), _F(2.0**-24 * math.pi / 2)
# ln m = 2 atanh(s), s = (m - 1)/(m + 1), |s| <= 0.172: s (2 + 2s^2/3 + 2s^4/5 + 2s^6/7 + 2s^8/9), error < 1e-9
LOG = tuple(_F(2 / n) for n in (9, 7, 5, 3, 1))
# sin and cos on [0, pi/2): Taylor terms to phi^13 and phi^14, error < 1e-9
SIN = tuple(_F((-1) ** (n // 2) / math.factorial(n)) for n in (13, 11, 9, 7, 5, 3))
COS = tuple(_F((-1) ** (n // 2) / math.factorial(n)) for n in (14, 12, 10, 8, 6, 4, 2, 0))
