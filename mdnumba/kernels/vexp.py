"""A vectorisable ``exp`` for the CPU kernels.

libm's ``exp`` is an opaque call, so a loop that applies it cannot be vectorised
(Numba's pip build has no SVML). This one is plain arithmetic: ``x = n·ln2 + r``
with ``|r| <= ln2/2`` (Cody–Waite split of ln 2), ``e^r`` by its degree-13 Taylor
polynomial (truncation error < 2e-17 relative on that range) and ``2^n`` built
directly as the bits of a float64. Relative error ~3e-16 (measured against
``np.exp`` on [-708, 709]); the input is clamped to [-708, 709], so the result is
never inf or subnormal (``σ``/``tanh`` built on it saturate exactly as before); NaN
stays NaN.
In a loop compiled with ``error_model="numpy"`` LLVM turns it into SIMD code:
1.3 ns per sigmoid (AVX-512, float64) against 5.8 ns with libm, measured.
"""

from __future__ import annotations

import math

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ..config import NJIT_OPTS

LOG2E = 1.4426950408889634
LN2_HI = 0.6931471803691238      # ln 2 rounded to 33 bits: n·LN2_HI is exact for |n| < 2^20
LN2_LO = 1.9082149292705877e-10  # ln 2 − LN2_HI


@intrinsic
def _pow2i(typingctx, n):
    """``2.0**n`` for an int64 n in [-1022, 1023]: the float64 with exponent field n + 1023."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        bits = builder.shl(builder.add(args[0], ir.Constant(i64, 1023)), ir.Constant(i64, 52))
        return builder.bitcast(bits, ir.DoubleType())

    return sig, codegen


@njit(inline="always", **NJIT_OPTS)
def exp(x):
    """``e^x`` in float64 by range reduction and a polynomial (see the module doc)."""
    x = float(x)
    x = -708.0 if x < -708.0 else x  # written so that NaN passes through
    x = 709.0 if x > 709.0 else x
    t = math.floor(x * LOG2E + 0.5)
    r = (x - t * LN2_HI) - t * LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return p * _pow2i(int(t))
