"""Cell math of one hidden unit, shared by the CPU and the CUDA kernels.

The functions are written once, as plain Python inside :func:`build`, and
compiled twice: ``build(njit(...))`` for :mod:`mdnumba.kernels.wavefront` and
``build(cuda.jit(device=True))`` for :mod:`mdnumba.kernels.wavefront_cuda`. They
use only scalar arithmetic, :mod:`math` and array indexing, which both targets
compile, so CPU and GPU cannot drift apart.

Rows follow :mod:`mdnumba.grid`: row ``r = base + s*B + b`` of skewed cell s, batch
item b, in the slab of rows starting at ``base`` (one slab per scan direction); the
parent along dimension d is row ``base + parent[s, d]*B + b`` (absent: h = c = 0).
``act`` holds N+3 gate blocks of D columns; unit j uses column ``blk*D + j``.
The ``cell`` argument is an int code (:data:`CELLS`):

- ``GRAVES`` (Graves 2007), blocks ``[i | f_1..f_N | o | g]``:
  ``c = σ(a_i)·tanh(a_g) + Σ_d σ(a_fd)·c_d``, ``h = σ(a_o)·tanh(c)``.
- ``STABLE`` (Leifert et al. 2016), blocks ``[i | f | l_1..l_{N-1} | o | g]``:
  ``w = softmax(l_1, .., l_{N-1}, 0)``, ``c = σ(a_i)·tanh(a_g) + σ(a_f)·Σ_d w_d·c_d``,
  ``h = σ(a_o)·tanh(c)``. For N = 2, ``w = (λ, 1−λ)`` with ``λ = σ(l_1)`` (λ weighs
  the neighbour along the first axis, "up"); for N = 1 it is the plain LSTM. The
  state is a convex mix of the neighbours' states, so it cannot grow along a diagonal.
- ``SPATIAL`` (Theis & Bethge 2015): graves gates, ``h = tanh(c·σ(a_o))``.

In every cell ``c = i·g + Σ_d F_d·c_d`` with a *forget factor* ``F_d``
(:func:`forget_factor`), which is all the pull-form backward needs from a child.
"""

from __future__ import annotations

import math

GRAVES, STABLE, SPATIAL = 0, 1, 2
#: cell name -> int code passed to the kernels
CELLS = {"graves": GRAVES, "stable": STABLE, "spatial": SPATIAL}


def cell_code(name: str) -> int:
    """The kernel code of cell ``name``; ValueError listing the choices otherwise."""
    if name not in CELLS:
        raise ValueError(f"unknown cell {name!r}; choose one of {sorted(CELLS)}")
    return CELLS[name]


def build(jit):
    """Compile the unit functions with decorator ``jit``; return them in a namespace dict."""

    @jit
    def sigmoid(x):
        """σ(x) = 1 / (1 + e^{-x}); overflow of e^{-x} gives 0, never NaN."""
        return 1.0 / (1.0 + math.exp(-x))

    @jit
    def tanh(x):
        """tanh(x) = 2σ(2x) − 1: one ``exp`` (libm ``tanh`` took 3x as long on the CPU).
        Exact limits ±1 for large |x|; absolute (not relative) error ~1 ulp near 0."""
        return 2.0 / (1.0 + math.exp(-(x + x))) - 1.0

    @jit
    def mix_weight(act, row, j, d, N, D):
        """Stable cell: ``w_d`` (stored for d < N-1; ``w_N = 1 − Σ_{k<N} w_k``)."""
        if d < N - 1:
            return act[row, (2 + d) * D + j]
        w = 1.0
        for k in range(N - 1):
            w -= act[row, (2 + k) * D + j]
        return w

    @jit
    def forget_factor(act, row, j, d, N, D, cell):
        """``F_d``, the weight of parent d's state in ``c``: ``f_d``, or ``f·w_d`` (stable)."""
        if cell != STABLE:
            return act[row, (1 + d) * D + j]
        return act[row, D + j] * mix_weight(act, row, j, d, N, D)

    @jit
    def activate_forget(act, r, j, N, D, cell):
        """In place on row r: ``f_d = σ(a_fd)`` (graves, spatial) or ``f = σ(a_f)``,
        ``w = softmax(l_1..l_{N-1}, 0)`` (stable; max subtracted, no overflow)."""
        if cell != STABLE:
            for d in range(N):
                act[r, (1 + d) * D + j] = sigmoid(act[r, (1 + d) * D + j])
            return
        act[r, D + j] = sigmoid(act[r, D + j])
        m = 0.0
        for k in range(N - 1):
            m = max(m, act[r, (2 + k) * D + j])
        z = math.exp(-m)
        for k in range(N - 1):
            e = math.exp(act[r, (2 + k) * D + j] - m)
            act[r, (2 + k) * D + j] = e
            z += e
        for k in range(N - 1):
            act[r, (2 + k) * D + j] /= z

    @jit
    def unit_forward(h, c, act, parent, base, s, b, j, B, D, cell):
        """Unit j of row ``r = base + s*B + b``: ``act[r]`` holds pre-activations on entry and
        activations on exit; writes ``c = i·g + Σ_d F_d·c_d`` and h (see module doc)."""
        N = parent.shape[1]
        r = base + s * B + b
        o_col = (N + 1) * D + j
        g_col = (N + 2) * D + j
        gi = sigmoid(act[r, j])
        go = sigmoid(act[r, o_col])
        gg = tanh(act[r, g_col])
        act[r, j] = gi
        act[r, o_col] = go
        act[r, g_col] = gg
        activate_forget(act, r, j, N, D, cell)
        cc = gi * gg
        for d in range(N):
            p = parent[s, d]
            if p >= 0:
                cc += forget_factor(act, r, j, d, N, D, cell) * c[base + p * B + b, j]
        c[r, j] = cc
        if cell == SPATIAL:
            h[r, j] = tanh(cc * go)
        else:
            h[r, j] = go * tanh(cc)

    @jit
    def forget_backward(dact, act, c, parent, base, s, b, j, B, D, dcj, cell):
        """Gradients of the forget blocks of unit j, given its complete ``dc``.

        graves/spatial: ``da_fd = dc·c_d·f_d(1−f_d)``. stable, with ``m = Σ_d w_d c_d``:
        ``da_f = dc·m·f(1−f)``, ``da_lk = dc·f·w_k·(c_k − m)`` (softmax Jacobian).
        """
        N = parent.shape[1]
        r = base + s * B + b
        if cell != STABLE:
            for d in range(N):
                p = parent[s, d]
                gf = act[r, (1 + d) * D + j]
                cp = c[base + p * B + b, j] if p >= 0 else 0.0
                dact[r, (1 + d) * D + j] = dcj * cp * gf * (1.0 - gf)
            return
        m = 0.0
        for d in range(N):
            p = parent[s, d]
            if p >= 0:
                m += mix_weight(act, r, j, d, N, D) * c[base + p * B + b, j]
        gf = act[r, D + j]
        dact[r, D + j] = dcj * m * gf * (1.0 - gf)
        for k in range(N - 1):
            p = parent[s, k]
            cp = c[base + p * B + b, j] if p >= 0 else 0.0
            dact[r, (2 + k) * D + j] = dcj * gf * act[r, (2 + k) * D + j] * (cp - m)

    @jit
    def unit_backward(dact, dc, act, c, parent, child, base, s, b, j, B, D, dhj, cell):
        """Pull-form backward of unit j of row ``r = base + s*B + b`` given its complete ``dh = dhj``.

        ``dc = Σ_d dc_child_d·F_d(child_d) + dh·∂h/∂c``; ``da_o = dh·∂h/∂o·o(1−o)``;
        ``da_i = dc·g·i(1−i)``, ``da_g = dc·i·(1−g²)``; forget blocks by :func:`forget_backward`.
        ``h = o·tanh c``: ∂h/∂c = o(1−tanh²c), ∂h/∂o = tanh c; spatial ``h = tanh(c·o)``:
        ∂h/∂c = o(1−h²), ∂h/∂o = c(1−h²).
        """
        N = parent.shape[1]
        r = base + s * B + b
        dcj = 0.0
        for d in range(N):
            ch = child[s, d]
            if ch >= 0:
                cr = base + ch * B + b
                dcj += dc[cr, j] * forget_factor(act, cr, j, d, N, D, cell)
        o_col = (N + 1) * D + j
        g_col = (N + 2) * D + j
        gi = act[r, j]
        go = act[r, o_col]
        gg = act[r, g_col]
        cj = c[r, j]
        if cell == SPATIAL:
            t = tanh(cj * go)
            dt = dhj * (1.0 - t * t)
            dcj += dt * go
            dact[r, o_col] = dt * cj * go * (1.0 - go)
        else:
            t = tanh(cj)
            dcj += dhj * go * (1.0 - t * t)
            dact[r, o_col] = dhj * t * go * (1.0 - go)
        dc[r, j] = dcj
        dact[r, j] = dcj * gg * gi * (1.0 - gi)
        dact[r, g_col] = dcj * gi * (1.0 - gg * gg)
        forget_backward(dact, act, c, parent, base, s, b, j, B, D, dcj, cell)

    return dict(sigmoid=sigmoid, tanh=tanh, unit_forward=unit_forward, unit_backward=unit_backward)
