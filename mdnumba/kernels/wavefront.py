"""CPU wavefront kernels of the N-dimensional LSTM (1D LSTM = N=1, MD-LSTM = N>=2).

Layout (see :mod:`mdnumba.grid`): every per-cell array is 2-D with row
``r = s*B + b`` for skewed cell ``s`` and batch item ``b``. Gate pre-activations
have ``G = (N+3)*D`` columns in blocks of D: ``[i | f_1 .. f_N | o | g]``.
Recurrent weights ``U`` have shape ``(D, N*G)``: block d (columns ``d*G:(d+1)*G``)
is ``U_d``, applied to the parent along dimension d.

Layers, stumpy style: ``_recurrent_*`` and ``_cell_*`` (serial, one cell and
batch item) ← ``wavefront_forward`` / ``wavefront_backward`` (parallel drivers:
hyperplanes in order, a ``prange`` over each hyperplane's cells × batch).
The recurrent products are hand-written row-times-matrix loops rather than a
BLAS call per hyperplane: calling multi-threaded BLAS inside Numba's parallel
sweep made the two thread pools fight (30x slower on 2 cores), and single-
threaded BLAS was no faster. Everything that needs no sweep (input projection,
weight gradients) is done with big GEMMs by the caller.
"""

from __future__ import annotations

import math

from numba import njit, prange

from ..config import NJIT_OPTS, NJIT_PARALLEL_OPTS


@njit(**NJIT_OPTS)
def _sigmoid(x):
    """σ(x) = 1 / (1 + e^{-x}); overflow of e^{-x} gives 0, never NaN."""
    return 1.0 / (1.0 + math.exp(-x))


@njit(**NJIT_OPTS)
def _cell_forward(h, c, act, parent, s, r, B, D):
    """One cell, one batch item (row r of skewed cell s), in place.

    On entry ``act[r]`` holds the full pre-activation ``a``; on exit the gate
    activations. ``i = σ(a_i)``, ``f_d = σ(a_fd)``, ``o = σ(a_o)``, ``g = tanh(a_g)``,
    ``c = i·g + Σ_d f_d·c_parent_d`` (absent parents contribute 0),
    ``h = o·tanh(c)``.
    """
    N = parent.shape[1]
    b = r - s * B
    o_off = (N + 1) * D
    g_off = (N + 2) * D
    for j in range(D):
        gi = _sigmoid(act[r, j])
        go = _sigmoid(act[r, o_off + j])
        gg = math.tanh(act[r, g_off + j])
        cc = gi * gg
        for d in range(N):
            gf = _sigmoid(act[r, (1 + d) * D + j])
            act[r, (1 + d) * D + j] = gf
            p = parent[s, d]
            if p >= 0:
                cc += gf * c[p * B + b, j]
        act[r, j] = gi
        act[r, o_off + j] = go
        act[r, g_off + j] = gg
        c[r, j] = cc
        h[r, j] = go * math.tanh(cc)


@njit(**NJIT_OPTS)
def _recurrent_forward(act, h, U, parent, s, r, B, D):
    """``act[r] += Σ_d h[parent_d] @ U_d`` (one row of the hyperplane's GEMM)."""
    N = parent.shape[1]
    G = (N + 3) * D
    b = r - s * B
    for d in range(N):
        p = parent[s, d]
        if p >= 0:
            pr = p * B + b
            for j in range(D):
                hv = h[pr, j]
                for g in range(G):
                    act[r, g] += hv * U[j, d * G + g]


@njit(**NJIT_PARALLEL_OPTS)
def wavefront_forward(h, c, act, U, diag_off, parent, B, D):
    """Forward sweep over all hyperplanes (outputs h, c, act; inputs; weights; sizes).

    ``act`` (M*B, G) enters holding the input projection ``W x + b`` and leaves
    holding the gate activations; ``h``, ``c`` (M*B, D) are written. Hyperplanes
    run in order; inside one, every (cell, batch item) adds ``Σ_d h_parent_d U_d``
    to its pre-activation and applies the cell, all in parallel.
    """
    for k in range(diag_off.shape[0] - 1):
        s0 = diag_off[k]
        for t in prange((diag_off[k + 1] - s0) * B):
            s = s0 + t // B
            r = s * B + t % B
            _recurrent_forward(act, h, U, parent, s, r, B, D)
            _cell_forward(h, c, act, parent, s, r, B, D)


@njit(**NJIT_OPTS)
def _recurrent_backward(dh, dact, UT, child, s, r, B, D):
    """``dh[r] += Σ_d U_dᵀ da_child_d`` (the cell pulls from its children)."""
    N = child.shape[1]
    G = (N + 3) * D
    b = r - s * B
    for d in range(N):
        ch = child[s, d]
        if ch >= 0:
            cr = ch * B + b
            for g in range(G):
                dv = dact[cr, g]
                for j in range(D):
                    dh[r, j] += dv * UT[g, d * D + j]


@njit(**NJIT_OPTS)
def _cell_backward(dact, dc, dh, act, c, parent, child, s, r, B, D):
    """Pull-form backward of one cell, one batch item (row r of cell s).

    ``dh[r]`` holds the complete dL/dh of this cell. Then
    ``dc = dh·o·(1−tanh²c) + Σ_d dc_child_d · f_d(child_d)``,
    ``da_o = dh·tanh(c)·o(1−o)``, ``da_i = dc·g·i(1−i)``, ``da_g = dc·i·(1−g²)``,
    ``da_fd = dc·c_parent_d·f_d(1−f_d)``.
    """
    N = parent.shape[1]
    b = r - s * B
    o_off = (N + 1) * D
    g_off = (N + 2) * D
    for j in range(D):
        dhj = dh[r, j]
        dcj = 0.0
        for d in range(N):
            ch = child[s, d]
            if ch >= 0:
                cr = ch * B + b
                dcj += dc[cr, j] * act[cr, (1 + d) * D + j]
        gi = act[r, j]
        go = act[r, o_off + j]
        gg = act[r, g_off + j]
        tc = math.tanh(c[r, j])
        dcj += dhj * go * (1.0 - tc * tc)
        dc[r, j] = dcj
        dact[r, o_off + j] = dhj * tc * go * (1.0 - go)
        dact[r, j] = dcj * gg * gi * (1.0 - gi)
        dact[r, g_off + j] = dcj * gi * (1.0 - gg * gg)
        for d in range(N):
            p = parent[s, d]
            gf = act[r, (1 + d) * D + j]
            cp = c[p * B + b, j] if p >= 0 else 0.0
            dact[r, (1 + d) * D + j] = dcj * cp * gf * (1.0 - gf)


@njit(**NJIT_PARALLEL_OPTS)
def wavefront_backward(dact, dc, dh, act, c, UT, diag_off, parent, child, B, D):
    """Backward sweep, hyperplanes in reverse (outputs dact, dc; inputs; weights; sizes).

    ``dh`` (M*B, D) enters holding dL/dh from above and is completed in place
    with the recurrent terms. ``UT`` (G, N*D) holds ``[U_1ᵀ | … | U_Nᵀ]``. Each
    cell *pulls* ``U_dᵀ da_child`` and ``dc_child·f_child`` from its children on
    the finished hyperplane k+1, so no two cells write the same row.
    """
    for k in range(diag_off.shape[0] - 2, -1, -1):
        s0 = diag_off[k]
        for t in prange((diag_off[k + 1] - s0) * B):
            s = s0 + t // B
            r = s * B + t % B
            _recurrent_backward(dh, dact, UT, child, s, r, B, D)
            _cell_backward(dact, dc, dh, act, c, parent, child, s, r, B, D)


@njit(**NJIT_PARALLEL_OPTS)
def gather_parents(hpar, h, parent, B, D):
    """``hpar[r, j*N + d] = h[parent_d(s)*B + b, j]`` (0 without parent).

    With this column order ``hparᵀ @ dact`` is directly dU in the (D, N, G) layout.
    """
    N = parent.shape[1]
    for t in prange(hpar.shape[0]):
        s = t // B
        b = t % B
        for d in range(N):
            p = parent[s, d]
            for j in range(D):
                hpar[t, j * N + d] = h[p * B + b, j] if p >= 0 else 0.0
