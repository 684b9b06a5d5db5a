"""Cell math of a row's hidden units, shared by the CPU and the CUDA kernels.

The functions are written once, as plain Python inside :func:`build`, and
compiled twice: ``build(njit(...))`` for :mod:`mdnumba.kernels.wavefront` and
``build(cuda.jit(device=True))`` for :mod:`mdnumba.kernels.wavefront_cuda`. They
use only scalar arithmetic, :mod:`math` and array indexing, which both targets
compile, so CPU and GPU cannot drift apart. They take a range of units ``j0 <= j < j1``
and run every stage as a loop over it: the CPU passes the whole row (LLVM vectorises each
loop), a CUDA thread its own unit.

Rows follow :mod:`mdnumba.grid`: row ``r = base + s*B + b`` of skewed cell s, batch
item b, in the slab of rows starting at ``base`` (one slab per scan direction); the
parent along dimension d is row ``base + parent[s, d]*B + b`` (absent: h = c = 0).
``act`` holds N+3 gate blocks of D columns; unit j uses column ``blk*D + j``.
The ``cell`` argument is an int code (:data:`CELLS`):

- ``GRAVES`` (Graves 2007, without its peephole weights from c), blocks ``[i | f_1..f_N | o | g]``:
  ``c = σ(a_i)·tanh(a_g) + Σ_d σ(a_fd)·c_d``, ``h = σ(a_o)·tanh(c)``.
- ``STABLE`` (Leifert et al. 2016), blocks ``[i | f | l_1..l_{N-1} | o | g]``:
  ``w = softmax(l_1, .., l_{N-1}, 0)``, ``c = σ(a_i)·tanh(a_g) + σ(a_f)·Σ_d w_d·c_d``,
  ``h = σ(a_o)·tanh(c)``. For N = 2, ``w = (λ, 1−λ)`` with ``λ = σ(l_1)`` (λ weighs
  the neighbour along the first axis, "up"); for N = 1 it is the plain LSTM. The
  state is a convex mix of the neighbours' states, so it cannot grow along a diagonal.
- ``SPATIAL`` (Theis & Bethge 2015): graves gates, ``h = tanh(c·σ(a_o))``.

In every cell ``c = i·g + Σ_d F_d·c_d`` with a *forget factor* ``F_d`` (``f_d``, or
``f·w_d``), which is all the pull-form backward needs from a child (``child_state_grad``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import types
from numba.extending import overload

GRAVES, STABLE, SPATIAL = 0, 1, 2
# Taylor coefficients of tanh x = x + T3 x³ + T5 x⁵ + ... (the tanh of :func:`build`)
_T3, _T5, _T7, _T9, _T11, _T13 = -1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075
# float32 tanh x = x·P(x²)/Q(x²) on |x| <= 9, P = 1 + P1 t + .. + P4 t⁴, Q likewise (t = x²): fitted
# here to tanh by a Lawson-weighted Loeb iteration (least squares, reweighted towards the minimax),
# relative error 2.1e-8 in exact arithmetic
_P1, _P2 = 0.13383992045790516, 0.0034990098537004714
_P3, _P4 = 2.0661478647114285e-05, 1.3420097913260685e-08
_Q1, _Q2 = 0.467173135317204, 0.025890259352204504
_Q3, _Q4 = 0.00032910604732608653, 7.804847418425369e-07
#: cell name -> int code passed to the kernels
CELLS = {"graves": GRAVES, "stable": STABLE, "spatial": SPATIAL}


def like(x: float | np.floating, value: float) -> float | np.floating:
    """``value`` as a constant of ``x``'s float type. Plain Python here (NumPy scalars, as in
    the CUDA simulator); compiled code, CPU and CUDA, gets the overload below, so float32
    arithmetic stays float32 (a Python float literal would promote it to float64)."""
    return type(x)(value)


@overload(like)
def _like(x, value):
    if isinstance(x, types.Float):
        as_type = np.float32 if x.bitwidth == 32 else np.float64
        return lambda x, value: as_type(value)
    return lambda x, value: value


def single(x: float | np.floating) -> bool:
    """Whether x is a float32 (NumPy scalar here, as in the CUDA simulator); a constant in compiled
    code, so the branch it selects is the only one left after inlining."""
    return isinstance(x, np.float32)


@overload(single)
def _single(x):
    is_single = isinstance(x, types.Float) and x.bitwidth == 32
    return lambda x: is_single


def cell_code(name: str) -> int:
    """The kernel code of cell ``name``; ValueError listing the choices otherwise."""
    if not isinstance(name, str) or name not in CELLS:  # a list: unhashable
        raise ValueError(f"unknown cell {name!r}; choose one of {sorted(CELLS)}")
    return CELLS[name]


def build(jit: Callable[[Callable[..., Any]], Callable[..., Any]], exp: Callable[..., Any] = math.exp,
          sigmoid: Callable[..., Any] | None = None,
          tanh: Callable[..., Any] | None = None) -> dict[str, Callable[..., Any]]:
    """Compile the row functions with decorator ``jit`` and ``exp``, ``sigmoid``, ``tanh``
    (default: σ and tanh from ``exp`` as below; the CPU passes the vectorisable, dtype-typed
    ``exp`` and ``sigmoid`` of :mod:`mdnumba.kernels.vexp`); return them in a namespace dict.
    """

    if sigmoid is None:
        @jit
        def sigmoid(x):
            """σ(x) = 1 / (1 + e^{-x}); overflow of e^{-x} gives 0, never NaN."""
            one = like(x, 1.0)
            return one / (one + exp(-x))

    if tanh is None:
        @jit
        def tanh_single(x):
            """float32 tanh: ``x·P(x²)/Q(x²)`` (``_P*``, ``_Q*``) for |x| < 9, ±1 from there on
            (float32 tanh rounds to ±1 above 9.01); within 5.9 ulp of tanh, odd, exact for tiny x
            (P(0) = Q(0) = 1), NaN stays NaN. Half the time of ``2σ(2x) − 1`` with a series."""
            one, lim = like(x, 1.0), like(x, 9.0)
            x = -lim if x < -lim else x
            x = lim if x > lim else x
            t = x * x
            p = (((like(x, _P4) * t + like(x, _P3)) * t + like(x, _P2)) * t + like(x, _P1)) * t + one
            q = (((like(x, _Q4) * t + like(x, _Q3)) * t + like(x, _Q2)) * t + like(x, _Q1)) * t + one
            y = x * p / q
            y = one if x >= lim or y > one else y
            return -one if x <= -lim or y < -one else y

        @jit
        def tanh(x):
            """tanh(x) = 2σ(2x) − 1: one ``exp`` (libm ``tanh`` took 3x as long on the CPU),
            exact limits ±1. Near 0 that loses relative precision (1 − 1 cancels: float32
            tanh(1e-6) was 19% off), so for |x| < 0.1 the Taylor series to x¹³ (truncation
            < 2e-17 relative) is taken instead; both are computed and one selected, which
            vectorises. float32 takes :func:`tanh_single`."""
            if single(x):
                return tanh_single(x)
            one, x2 = like(x, 1.0), x * x
            series = like(x, _T13) * x2 + like(x, _T11)
            series = (series * x2 + like(x, _T9)) * x2 + like(x, _T7)
            series = ((series * x2 + like(x, _T5)) * x2 + like(x, _T3)) * x2 * x + x
            wide = (one + one) / (one + exp(-(x + x))) - one
            return series if abs(x) < like(x, 0.1) else wide

    @jit
    def one_minus(x):
        """``1 − x`` in x's float type (σ' = σ·(1 − σ), tanh' = 1 − tanh²)."""
        return like(x, 1.0) - x

    @jit
    def blk(block, D):
        """First column of gate block ``block``: ``block·D``, clamped at 0 so LLVM knows the
        column index is not negative, drops Numba's wrap-around check and vectorises the loop."""
        return max(block * D, 0)

    @jit
    def sigmoid_blocks(act, r, first, count, D, j0, j1):
        """In place on row r: σ of gate blocks ``first .. first+count-1``, units j0..j1. For the
        whole row (j0 = 0, j1 = D) the blocks are one contiguous run of columns, taken as one loop
        (a loop per block: the CPU's forward cell 6.05 instead of 5.13 ns per unit at D = 16, the
        same at D = 32)."""
        if j0 == 0 and j1 == D:
            for q in range(blk(first, D), blk(first + count, D)):
                act[r, q] = sigmoid(act[r, q])
            return
        for k in range(first, first + count):
            for j in range(j0, j1):
                act[r, blk(k, D) + j] = sigmoid(act[r, blk(k, D) + j])

    @jit
    def softmax_pair(act, r, D, j0, j1):
        """3D stable cell, in place on row r: ``(w_1, w_2) = softmax(l_1, l_2, 0)[:2]`` in one
        loop, the same operations in the same order as :func:`activate_gates`' N-D passes
        (bit-identical; on the CPU 1.5 instead of 2.0x a graves forward cell's time at D = 16,
        1.7 instead of 2.5x at D = 32)."""
        a0, b0 = blk(2, D), blk(3, D)
        for j in range(j0, j1):
            m = max(max(like(act[r, a0 + j], 0.0), act[r, a0 + j]), act[r, b0 + j])
            ea, eb = exp(act[r, a0 + j] - m), exp(act[r, b0 + j] - m)
            total = exp(-m) + ea + eb
            act[r, a0 + j] = ea / total
            act[r, b0 + j] = eb / total

    @jit
    def activate_gates(act, tmp, r, N, D, cell, j0, j1):
        """In place on row r: ``σ`` of the input, forget and output gates, ``tanh`` of g; the
        stable cell's ``w = softmax(l_1..l_{N-1}, 0)`` (max subtracted, no overflow; ``tmp[r]``
        is scratch, its values are overwritten later). In 2D that is ``w_1 = σ(l_1)`` (Leifert's
        λ), so the blocks ``[i | f | l_1 | o]`` take one σ loop as graves' ``[i | f_1 f_2 | o]``
        (half the stable cell's σ/softmax time)."""
        g0 = blk(N + 2, D)
        mix = cell == STABLE and N > 2
        if not mix:
            sigmoid_blocks(act, r, 0, N + 2, D, j0, j1)   # [i | f_1..f_N | o], stable [i | f | (l_1) | o]
        else:
            sigmoid_blocks(act, r, 0, 2, D, j0, j1)       # [i | f]
            sigmoid_blocks(act, r, N + 1, 1, D, j0, j1)   # o
        for j in range(j0, j1):
            act[r, g0 + j] = tanh(act[r, g0 + j])
        if not mix:
            return
        if N == 3:
            softmax_pair(act, r, D, j0, j1)
            return
        for j in range(j0, j1):
            tmp[r, j] = 0.0
        for k in range(N - 1):
            for j in range(j0, j1):
                tmp[r, j] = max(tmp[r, j], act[r, blk(2 + k, D) + j])
        for k in range(N - 1):
            for j in range(j0, j1):
                act[r, blk(2 + k, D) + j] = exp(act[r, blk(2 + k, D) + j] - tmp[r, j])
        for j in range(j0, j1):
            tmp[r, j] = exp(-tmp[r, j])
        for k in range(N - 1):
            for j in range(j0, j1):
                tmp[r, j] += act[r, blk(2 + k, D) + j]
        for k in range(N - 1):
            for j in range(j0, j1):
                act[r, blk(2 + k, D) + j] /= tmp[r, j]

    @jit
    def stable_mix(out, oblk, act, c, parent, base, s, b, r, B, D, j0, j1):
        """Stable cell: ``out[r, oc + j] = Σ_d w_d·c_d`` (``oc = oblk·D``), written as
        ``c_N + Σ_k w_k (c_k − c_N)`` (``w_N = 1 − Σ_k w_k``) so every loop runs over j; absent
        neighbours have c = 0."""
        N = parent.shape[1]
        oc = blk(oblk, D)
        pl = parent[s, N - 1]
        plr = base + pl * B + b
        if pl >= 0:
            for j in range(j0, j1):
                out[r, oc + j] = c[plr, j]
        else:
            for j in range(j0, j1):
                out[r, oc + j] = 0.0
        for k in range(N - 1):
            p = parent[s, k]
            pr = base + p * B + b
            w0 = blk(2 + k, D)
            if p >= 0 and pl >= 0:
                for j in range(j0, j1):
                    out[r, oc + j] += act[r, w0 + j] * (c[pr, j] - c[plr, j])
            elif p >= 0:
                for j in range(j0, j1):
                    out[r, oc + j] += act[r, w0 + j] * c[pr, j]
            elif pl >= 0:
                for j in range(j0, j1):
                    out[r, oc + j] -= act[r, w0 + j] * c[plr, j]

    @jit
    def row_forward(h, c, act, parent, base, s, b, B, D, cell, j0, j1):
        """Units j0..j1 of row ``r = base + s*B + b``: ``act[r]`` holds pre-activations on
        entry and activations on exit; writes ``c = i·g + Σ_d F_d·c_d`` and h (module doc)."""
        N = parent.shape[1]
        r = base + s * B + b
        o0 = blk(N + 1, D)
        g0 = blk(N + 2, D)
        activate_gates(act, c, r, N, D, cell, j0, j1)
        for j in range(j0, j1):
            c[r, j] = act[r, j] * act[r, g0 + j]
        if cell != STABLE:
            for d in range(N):
                p = parent[s, d]
                if p >= 0:
                    pr = base + p * B + b
                    for j in range(j0, j1):
                        c[r, j] += act[r, blk(1 + d, D) + j] * c[pr, j]
        else:  # c += f · Σ_d w_d c_d, the mix staged in h[r] (written last)
            stable_mix(h, 0, act, c, parent, base, s, b, r, B, D, j0, j1)
            for j in range(j0, j1):
                c[r, j] += act[r, blk(1, D) + j] * h[r, j]
        if cell == SPATIAL:
            for j in range(j0, j1):
                h[r, j] = tanh(c[r, j] * act[r, o0 + j])
        else:
            for j in range(j0, j1):
                h[r, j] = act[r, o0 + j] * tanh(c[r, j])

    @jit
    def forget_backward(dact, act, c, dc, parent, base, s, b, r, B, D, cell, j0, j1):
        """Gradients of the forget blocks of row r given its complete ``dc``.

        graves/spatial: ``da_fd = dc·c_d·f_d(1−f_d)``. stable, with ``m = Σ_d w_d c_d``
        (staged in ``dact[r, D:2D]``): ``da_f = dc·m·f(1−f)``, ``da_lk = dc·f·w_k·(c_k − m)``
        (softmax Jacobian).
        """
        N = parent.shape[1]
        if cell != STABLE:
            for d in range(N):
                p = parent[s, d]
                pr = base + p * B + b
                f0 = blk(1 + d, D)
                if p >= 0:
                    for j in range(j0, j1):
                        dact[r, f0 + j] = dc[r, j] * c[pr, j] * act[r, f0 + j] * one_minus(act[r, f0 + j])
                else:
                    for j in range(j0, j1):
                        dact[r, f0 + j] = 0.0
            return
        stable_mix(dact, 1, act, c, parent, base, s, b, r, B, D, j0, j1)
        f0 = blk(1, D)
        for k in range(N - 1):
            p = parent[s, k]
            pr = base + p * B + b
            w0 = blk(2 + k, D)
            if p >= 0:
                for j in range(j0, j1):
                    m = dact[r, f0 + j]
                    dact[r, w0 + j] = dc[r, j] * act[r, f0 + j] * act[r, w0 + j] * (c[pr, j] - m)
            else:
                for j in range(j0, j1):
                    dact[r, w0 + j] = -dc[r, j] * act[r, f0 + j] * act[r, w0 + j] * dact[r, f0 + j]
        for j in range(j0, j1):
            dact[r, f0 + j] = dc[r, j] * dact[r, f0 + j] * act[r, f0 + j] * one_minus(act[r, f0 + j])

    @jit
    def child_state_grad(dc, act, child, base, s, b, r, B, D, cell, j0, j1):
        """``dc[r] = Σ_d dc_child_d·F_d(child_d)``: each child's forget factor for this parent
        (``f_d``, or stable ``f·w_d`` with ``w_N = 1 − Σ_k w_k``)."""
        N = child.shape[1]
        for j in range(j0, j1):
            dc[r, j] = 0.0
        for d in range(N):
            ch = child[s, d]
            if ch < 0:
                continue
            cr = base + ch * B + b
            if cell != STABLE:
                for j in range(j0, j1):
                    dc[r, j] += dc[cr, j] * act[cr, blk(1 + d, D) + j]
            elif d < N - 1:
                for j in range(j0, j1):
                    dc[r, j] += dc[cr, j] * act[cr, blk(1, D) + j] * act[cr, blk(2 + d, D) + j]
            else:
                for j in range(j0, j1):
                    dc[r, j] += dc[cr, j] * act[cr, blk(1, D) + j]
                for k in range(N - 1):
                    for j in range(j0, j1):
                        dc[r, j] -= dc[cr, j] * act[cr, blk(1, D) + j] * act[cr, blk(2 + k, D) + j]

    @jit
    def row_backward(dact, dc, dh, act, c, parent, child, base, s, b, B, D, cell, j0, j1):
        """Pull-form backward of units j0..j1 of row ``r = base + s*B + b`` given complete ``dh[r]``.

        ``dc = Σ_d dc_child_d·F_d(child_d) + dh·∂h/∂c``; ``da_o = dh·∂h/∂o·o(1−o)``;
        ``da_i = dc·g·i(1−i)``, ``da_g = dc·i·(1−g²)``; forget blocks by :func:`forget_backward`.
        ``h = o·tanh c``: ∂h/∂c = o(1−tanh²c), ∂h/∂o = tanh c; spatial ``h = tanh(c·o)``:
        ∂h/∂c = o(1−h²), ∂h/∂o = c(1−h²).
        """
        N = parent.shape[1]
        r = base + s * B + b
        o0 = blk(N + 1, D)
        g0 = blk(N + 2, D)
        child_state_grad(dc, act, child, base, s, b, r, B, D, cell, j0, j1)
        if cell == SPATIAL:
            for j in range(j0, j1):
                go = act[r, o0 + j]
                t = tanh(c[r, j] * go)
                dt = dh[r, j] * one_minus(t * t)
                dc[r, j] += dt * go
                dact[r, o0 + j] = dt * c[r, j] * go * one_minus(go)
        else:
            for j in range(j0, j1):
                go = act[r, o0 + j]
                t = tanh(c[r, j])
                dc[r, j] += dh[r, j] * go * one_minus(t * t)
                dact[r, o0 + j] = dh[r, j] * t * go * one_minus(go)
        for j in range(j0, j1):
            gi = act[r, j]
            gg = act[r, g0 + j]
            dact[r, j] = dc[r, j] * gg * gi * one_minus(gi)
            dact[r, g0 + j] = dc[r, j] * gi * one_minus(gg * gg)
        forget_backward(dact, act, c, dc, parent, base, s, b, r, B, D, cell, j0, j1)

    return dict(sigmoid=sigmoid, tanh=tanh, one_minus=one_minus, row_forward=row_forward,
                row_backward=row_backward)
