"""CPU wavefront kernels of the 2D Grid LSTM (Kalchbrenner et al. 2015): time x depth.

Blocks (t, l) of a T x L grid in the skewed layout of :mod:`mdnumba.grid` (dimension
0 = time, 1 = depth), row ``r = s*B + b``. Per row: ``h = [h_T' | h_L']`` and
``c = [m_T' | m_L']`` (2D columns), ``act = [a_T | a_L]`` (8D columns, gates
``[i | f | o | g]`` each). ``U_time`` and ``U_depth`` are (S, 2D, 4D) and act on
``[h_T; h_L]`` resp. ``[h_T'; h_L]`` (depth prioritised: the depth transform sees
the block's new time output); block (t, l) uses ``U[l % S]``: S = 1 ties the weights
along depth, S = L gives every level its own. The bottom blocks' depth
input is ``(x_t, 0)``; elsewhere an absent neighbour gives zeros.

Same layering as :mod:`mdnumba.kernels.wavefront`: serial per-row functions (:func:`build_rows`,
one source for CPU and GPU) ← on the CPU, blocks for a group of up to :data:`ITEM_ROWS`
batch items, whose products run as register tiles over packed halves of U
(:func:`pack_halves`; :func:`_block_forward`, :func:`_block_backward`) ← parallel drivers
(anti-diagonals in order, ``prange`` over blocks x groups). Weight gradients are GEMMs outside
the sweep (:func:`gather_operands`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit, prange

from ..config import NJIT_OPTS
from ..grid import ROWS
from . import vexp
from .cell import build
from .gemm import assign
from .parallel import parallel_njit
from .simd import TALL_ROWS, TALL_TILES, group_tiles
from .wavefront import _rolling_parents, _tiled, pack_recurrent


def build_rows(jit: Callable[[Callable[..., Any]], Callable[..., Any]], exp: Callable[..., Any] = math.exp,
               sigmoid: Callable[..., Any] | None = None,
               tanh: Callable[..., Any] | None = None) -> dict[str, Callable[..., Any]]:
    """Compile the per-row functions with ``jit`` (``njit`` here, ``cuda.jit(device=True)`` in
    :mod:`mdnumba.kernels.gridlstm_cuda`: one source for CPU and GPU); return them in a dict.
    The CPU takes the two LSTM steps (its blocks group the products of several rows:
    :func:`_block_forward`, :func:`_block_backward`), the GPU the blocks of one row.

    ``exp``, ``sigmoid``, ``tanh`` as in :func:`mdnumba.kernels.cell.build`. Column offsets are
    clamped with ``max(.., 0)`` so the CPU loops carry no wrap-around check (see cell.py).
    """
    _cell = build(jit, exp, sigmoid, tanh)
    _sigmoid, _tanh, one_minus = _cell["sigmoid"], _cell["tanh"], _cell["one_minus"]

    @jit
    def _gate_columns(off, D):
        """First columns of the i, f, o, g blocks of the transform at ``off`` (clamped at 0)."""
        return max(off, 0), max(off + D, 0), max(off + 2 * D, 0), max(off + 3 * D, 0)

    @jit
    def _lstm_forward(act, h, c, r, off, m_prev_row, m_col, D):
        """LSTM transform on ``act[r, off:off+4D]`` (pre-activations in, activations out):
        ``m = f·m_prev + i·g`` → ``c[r, off/4 + j]``, ``h = o·tanh m`` (m_prev row < 0: 0)."""
        i0, f0, o0, g0, m_col = _gate_columns(off, D) + (max(m_col, 0),)
        o_c = i0 // 4
        for j in range(D):
            gi = _sigmoid(act[r, i0 + j])
            gf = _sigmoid(act[r, f0 + j])
            go = _sigmoid(act[r, o0 + j])
            gg = _tanh(act[r, g0 + j])
            act[r, i0 + j], act[r, f0 + j], act[r, o0 + j], act[r, g0 + j] = gi, gf, go, gg
            c[r, o_c + j] = gi * gg
        if m_prev_row >= 0:
            for j in range(D):
                c[r, o_c + j] += act[r, f0 + j] * c[m_prev_row, m_col + j]
        for j in range(D):
            h[r, o_c + j] = act[r, o0 + j] * _tanh(c[r, o_c + j])

    @jit
    def _matvec_add(act, r, off, src, srow, scol, U, urow, D):
        """``act[r, off:off+4D] += src[srow, scol:scol+D] @ U[urow:urow+D]`` (srow < 0: nothing);
        four rows of U per pass over the gate row."""
        if srow < 0:
            return
        off, scol, urow = max(off, 0), max(scol, 0), max(urow, 0)
        j = 0
        while j + 4 <= D:
            v0, v1, v2, v3 = src[srow, scol + j], src[srow, scol + j + 1], src[srow, scol + j + 2], \
                src[srow, scol + j + 3]
            q = urow + j
            for g in range(4 * D):
                act[r, off + g] += (v0 * U[q, g] + v1 * U[q + 1, g]) + (v2 * U[q + 2, g] + v3 * U[q + 3, g])
            j += 4
        for jj in range(j, D):
            v = src[srow, scol + jj]
            for g in range(4 * D):
                act[r, off + g] += v * U[urow + jj, g]

    @jit
    def _block_forward(h, c, act, x, U_time, U_depth, tp, dp, cell, L, s, b, B, D):
        """Block s (grid cell ``cell = t*L + l``, its parents' blocks ``tp``, ``dp``; -1: none),
        batch item b: time transform, then (depth prioritised) the depth transform. The drivers
        pass the table entries, not the tables, so that the saving sweep (read-only tables) and
        the saving-free one (its own scratch tables) call one compiled function."""
        r = s * B + b
        lv = (cell % L) % U_time.shape[0]
        Ut, Ud = U_time[lv], U_depth[lv]
        tr = tp * B + b if tp >= 0 else -1
        dr = dp * B + b if dp >= 0 else -1
        xr = (cell // L) * B + b if dp < 0 else -1  # bottom block: depth input x_t
        _matvec_add(act, r, 0, h, tr, 0, Ut, 0, D)
        _matvec_add(act, r, 0, h, dr, D, Ut, D, D)
        _matvec_add(act, r, 0, x, xr, 0, Ut, D, D)
        _lstm_forward(act, h, c, r, 0, tr, 0, D)
        _matvec_add(act, r, 4 * D, h, r, 0, Ud, 0, D)
        _matvec_add(act, r, 4 * D, h, dr, D, Ud, D, D)
        _matvec_add(act, r, 4 * D, x, xr, 0, Ud, D, D)
        _lstm_forward(act, h, c, r, 4 * D, dr, D, D)

    @jit
    def _lstm_backward(dact, dc, act, c, r, off, m_prev_row, m_col, dh, dm_in, D):
        """Backward of :func:`_lstm_forward` given ``dh`` (D,) and ``dm_in`` (D,) on its outputs:
        ``dm = dm_in + dh·o·(1−tanh²m)`` → ``dc[r, off/4 + j]``; gate gradients → ``dact[r, off:]``."""
        i0, f0, o0, g0, m_col = _gate_columns(off, D) + (max(m_col, 0),)
        o_c = i0 // 4
        for j in range(D):
            gi, go, gg = act[r, i0 + j], act[r, o0 + j], act[r, g0 + j]
            tm = _tanh(c[r, o_c + j])
            dm = dm_in[j] + dh[j] * go * one_minus(tm * tm)
            dc[r, o_c + j] = dm
            dact[r, i0 + j] = dm * gg * gi * one_minus(gi)
            dact[r, o0 + j] = dh[j] * tm * go * one_minus(go)
            dact[r, g0 + j] = dm * gi * one_minus(gg * gg)
        if m_prev_row >= 0:  # forget gate: dm · m_prev · f(1−f)
            for j in range(D):
                gf = act[r, f0 + j]
                dact[r, f0 + j] = dc[r, o_c + j] * c[m_prev_row, m_col + j] * gf * one_minus(gf)
        else:
            for j in range(D):
                dact[r, f0 + j] = 0.0

    @jit
    def _vec_mat_t(out, dact, r, off, U, urow, D):
        """``out += dact[r, off:off+4D] @ U[urow:urow+D]ᵀ`` (r < 0: nothing): per j a dot product
        over the 4D contiguous gate columns of U's row."""
        if r < 0:
            return
        off, urow = max(off, 0), max(urow, 0)
        for j in range(D):
            acc = out[j]
            for g in range(4 * D):
                acc += dact[r, off + g] * U[urow + j, g]
            out[j] = acc

    @jit
    def _block_backward(dact, dc, dx, dtop, act, c, U_time, U_depth, parent, child, perm, L, s, b, B, D):
        """Pull-form backward of block s, batch item b (children on the finished diagonal)."""
        r = s * B + b
        tc, dch = child[s, 0], child[s, 1]
        tcr = tc * B + b if tc >= 0 else -1
        dcr = dch * B + b if dch >= 0 else -1
        tp, dp = parent[s, 0], parent[s, 1]
        row_t = (perm[s] // L) * B + b
        S = U_time.shape[0]
        lv, lv_up = (perm[s] % L) % S, (perm[s] % L + 1) % S  # own level, the depth child's
        dh, dm = dact[r, 8 * D:9 * D], dact[r, 9 * D:10 * D]  # per-row scratch columns
        for j in range(D):  # if statements: in `a if p else 0.0` a float32 a becomes a float64
            dh[j], dm[j] = 0.0, 0.0
            if dch < 0:
                dh[j] = dtop[row_t, j]
            if dcr >= 0:
                dm[j] = dc[dcr, D + j] * act[dcr, 5 * D + j]
        _vec_mat_t(dh, dact, dcr, 0, U_time[lv_up], D, D)  # child above used h_L' in both transforms
        _vec_mat_t(dh, dact, dcr, 4 * D, U_depth[lv_up], D, D)
        _lstm_backward(dact, dc, act, c, r, 4 * D, dp * B + b if dp >= 0 else -1, D, dh, dm, D)
        for j in range(D):
            dh[j], dm[j] = 0.0, 0.0
            if tcr >= 0:
                dm[j] = dc[tcr, j] * act[tcr, D + j]
        _vec_mat_t(dh, dact, r, 4 * D, U_depth[lv], 0, D)  # own depth transform used h_T'
        _vec_mat_t(dh, dact, tcr, 0, U_time[lv], 0, D)     # next time step used h_T'
        _lstm_backward(dact, dc, act, c, r, 0, tp * B + b if tp >= 0 else -1, 0, dh, dm, D)
        if dp < 0:  # bottom block: gradient of the depth input x_t
            for j in range(D):
                dx[row_t, j] = 0.0
            _vec_mat_t(dx[row_t], dact, r, 0, U_time[lv], D, D)
            _vec_mat_t(dx[row_t], dact, r, 4 * D, U_depth[lv], D, D)

    return dict(block_forward=_block_forward, block_backward=_block_backward, lstm_forward=_lstm_forward,
                lstm_backward=_lstm_backward)


# the LSTM steps are inlined into the blocks (Numba IR), the drivers call the blocks (blocks
# inlined into the three sweeps too made a first forward, backward and saving-free forward
# compile for 18, 19 and 19 s instead of 11, 17 and 6 s; float64, 2-core Xeon)
#: batch rows per work item: a tall register tile's (:data:`~mdnumba.kernels.simd.TALL_ROWS` where
#: :data:`~mdnumba.kernels.simd.TALL_TILES`: T50 B32 D78 depth 3 train step and forward 1.13x)
ITEM_ROWS = TALL_ROWS if TALL_TILES else ROWS


@njit(inline="always", **NJIT_OPTS)
def _groups(B):
    """Work items per block: ``ceil(B / ITEM_ROWS)``."""
    return (B + ITEM_ROWS - 1) // ITEM_ROWS


_ROWS = build_rows(njit(inline="always", **NJIT_OPTS), **vexp.CPU_MATH)
_lstm_forward, _lstm_backward = _ROWS["lstm_forward"], _ROWS["lstm_backward"]


@njit(inline="always", **NJIT_OPTS)
def _matvec_rows(act, r, off, src, srow, scol, D, nb, panels):
    """``act[r+i, off:off+4D] += src[srow+i, scol:scol+D] @ U`` for the ``nb`` (1 .. 8) consecutive
    rows i (srow < 0: nothing), U's D rows packed in ``panels`` (:func:`pack_halves`): register
    tiles (:func:`~mdnumba.kernels.simd.group_tiles`; each element a chain of fused multiply-adds
    over the D rows). Inlined, the column offsets passed on as ``np.int64``: no literal 0 from the
    caller reaches :func:`~mdnumba.kernels.simd.group_tiles` (see :mod:`mdnumba.kernels`)."""
    if srow >= 0:
        group_tiles(act, r, src, srow, nb, panels, np.int64(off), np.int64(scol), 4 * D)


@njit(**NJIT_OPTS)
def _block_forward(h, c, act, x, U_time, U_depth, Pt, Pd, tp, dp, cell, L, s, b, nb, B, D):
    """The ``_block_forward`` of :func:`build_rows` (the CUDA twin's, one row) for the ``nb``
    batch items b .. b+nb-1 of block s: each transform's products for the group
    (:func:`_matvec_rows`; ``Pt``, ``Pd``: :func:`pack_halves` of ``U_time``, ``U_depth``), then
    its LSTM step row by row; every row gets the same numbers."""
    r = s * B + b
    lv = (cell % L) % U_time.shape[0]
    tr = tp * B + b if tp >= 0 else -1
    dr = dp * B + b if dp >= 0 else -1
    xr = (cell // L) * B + b if dp < 0 else -1  # bottom block: depth input x_t
    _matvec_rows(act, r, 0, h, tr, 0, D, nb, Pt[2 * lv])
    _matvec_rows(act, r, 0, h, dr, D, D, nb, Pt[2 * lv + 1])
    _matvec_rows(act, r, 0, x, xr, 0, D, nb, Pt[2 * lv + 1])
    for i in range(nb):
        _lstm_forward(act, h, c, r + i, 0, tr + i if tr >= 0 else -1, 0, D)
    _matvec_rows(act, r, 4 * D, h, r, 0, D, nb, Pd[2 * lv])
    _matvec_rows(act, r, 4 * D, h, dr, D, D, nb, Pd[2 * lv + 1])
    _matvec_rows(act, r, 4 * D, x, xr, 0, D, nb, Pd[2 * lv + 1])
    for i in range(nb):
        _lstm_forward(act, h, c, r + i, 4 * D, dr + i if dr >= 0 else -1, D, D)


@njit(inline="always", **NJIT_OPTS)
def _vec_mat_t_rows(out, orow, ocol, dact, srow, off, D, nb, panels):
    """``out[orow+i, ocol:ocol+D] += dact[srow+i, off:off+4D] @ Uᵀ`` for the ``nb`` (1 .. 8)
    consecutive rows i (srow < 0: nothing), U's D rows transposed in ``panels``
    (:func:`pack_halves`): register tiles over the 4D gate columns (each element a chain of fused
    multiply-adds); the column offsets as ``np.int64``, as in :func:`_matvec_rows`."""
    if srow >= 0:
        group_tiles(out, orow, dact, srow, nb, panels, np.int64(ocol), np.int64(off), D)


@njit(**NJIT_OPTS)
def _block_backward(dact, dc, dx, dtop, act, c, U_time, U_depth, Qt, Qd, parent, child, perm, L, s, b, nb,
                    B, D):
    """The ``_block_backward`` of :func:`build_rows` (the CUDA twin's, one row) for the ``nb``
    batch items b .. b+nb-1 of block s: each pull of gate gradients for the group
    (:func:`_vec_mat_t_rows`; ``Qt``, ``Qd``: :func:`pack_halves` of ``U_time``, ``U_depth``
    transposed), each LSTM step's backward row by row."""
    r, S = s * B + b, U_time.shape[0]
    tc, dch, tp, dp = child[s, 0], child[s, 1], parent[s, 0], parent[s, 1]
    tcr = tc * B + b if tc >= 0 else -1
    dcr = dch * B + b if dch >= 0 else -1
    row_t = (perm[s] // L) * B + b
    lv, lv_up = (perm[s] % L) % S, (perm[s] % L + 1) % S  # own level, the depth child's
    H, M = 8 * D, 9 * D  # per-row scratch columns: dh, dm
    for i in range(nb):
        for j in range(D):  # if statements: in `a if p else 0.0` a float32 a becomes a float64
            dact[r + i, H + j], dact[r + i, M + j] = 0.0, 0.0
            if dch < 0:
                dact[r + i, H + j] = dtop[row_t + i, j]
            if dcr >= 0:
                dact[r + i, M + j] = dc[dcr + i, D + j] * act[dcr + i, 5 * D + j]
    # the child above used h_L' in both transforms
    _vec_mat_t_rows(dact, r, H, dact, dcr, 0, D, nb, Qt[2 * lv_up + 1])
    _vec_mat_t_rows(dact, r, H, dact, dcr, 4 * D, D, nb, Qd[2 * lv_up + 1])
    for i in range(nb):
        _lstm_backward(dact, dc, act, c, r + i, 4 * D, dp * B + b + i if dp >= 0 else -1, D,
                       dact[r + i, H:M], dact[r + i, M:], D)
        for j in range(D):
            dact[r + i, H + j], dact[r + i, M + j] = 0.0, 0.0
            if tcr >= 0:
                dact[r + i, M + j] = dc[tcr + i, j] * act[tcr + i, D + j]
    # the own depth transform and the next time step used h_T'
    _vec_mat_t_rows(dact, r, H, dact, r, 4 * D, D, nb, Qd[2 * lv])
    _vec_mat_t_rows(dact, r, H, dact, tcr, 0, D, nb, Qt[2 * lv])
    for i in range(nb):
        _lstm_backward(dact, dc, act, c, r + i, 0, tp * B + b + i if tp >= 0 else -1, 0,
                       dact[r + i, H:M], dact[r + i, M:], D)
    if dp < 0:  # bottom block: gradient of the depth input x_t
        dx[row_t:row_t + nb] = 0.0
        _vec_mat_t_rows(dx, row_t, 0, dact, r, 0, D, nb, Qt[2 * lv + 1])
        _vec_mat_t_rows(dx, row_t, 0, dact, r, 4 * D, D, nb, Qd[2 * lv + 1])


def pack_halves(U: np.ndarray, transposed: bool = False) -> np.ndarray:
    """``U`` (levels, 2D, 4D) as the register-tile panels of its two halves of D rows (the weights
    of ``h_T`` and of ``h_L``; :func:`mdnumba.kernels.wavefront.pack_recurrent`): (2·levels, P,
    D, W) for the forward products, ``transposed`` (2·levels, P, 4D, W) for the backward pulls;
    entry ``2·level + half``."""
    S, D2, G = U.shape
    return pack_recurrent(U.reshape(2 * S, D2 // 2, G), 1, transposed)[:, 0]


def grid_forward(h: np.ndarray, c: np.ndarray, act: np.ndarray, x: np.ndarray, U_time: np.ndarray,
                 U_depth: np.ndarray, diag_off: np.ndarray, parent: np.ndarray, perm: np.ndarray, L: int,
                 B: int, D: int) -> None:
    """Forward sweep (outputs h, c, act; inputs x; weights; tables; sizes).

    ``act`` (M*B, 8D) enters holding ``[b_time | b_depth]`` per row and leaves
    holding the gate activations; ``x`` is (T*B, D), row ``t*B + b``.
    """
    _tiled(h, act, x)
    _grid_forward(h, c, act, x, U_time, U_depth, pack_halves(U_time), pack_halves(U_depth), diag_off, parent,
                  perm, L, B, D)


@parallel_njit
def _grid_forward(h, c, act, x, U_time, U_depth, Pt, Pd, diag_off, parent, perm, L, B, D):
    """:func:`grid_forward`: diagonals in order, a ``prange`` over (block, group of up to ITEM_ROWS batch
    items) in each."""
    P = _groups(B)
    for k in range(diag_off.shape[0] - 1):
        s0 = diag_off[k]
        for t in prange((diag_off[k + 1] - s0) * P):
            s, b = s0 + t // P, ITEM_ROWS * (t % P)
            _block_forward(h, c, act, x, U_time, U_depth, Pt, Pd, parent[s, 0], parent[s, 1], perm[s], L,
                           s, b, min(ITEM_ROWS, B - b), B, D)


@njit(**NJIT_OPTS)
def _rolling_cells(lperm, perm, diag_off, k, cur):
    """``lperm[cur + i] = perm[s0 + i]`` for the cells of plane k (their blocks' (t, l))."""
    s0 = diag_off[k]
    for i in range(diag_off[k + 1] - s0):
        lperm[cur + i] = perm[s0 + i]


def grid_infer(out: np.ndarray, h: np.ndarray, c: np.ndarray, act: np.ndarray, lp: np.ndarray,
               lperm: np.ndarray, x: np.ndarray, U_time: np.ndarray, U_depth: np.ndarray,
               b_time: np.ndarray, b_depth: np.ndarray, diag_off: np.ndarray, parent: np.ndarray,
               perm: np.ndarray, L: int, B: int, D: int) -> None:
    """Forward sweep that keeps no activations (outputs out, h, c, act; scratch lp, lperm; inputs;
    weights; tables; sizes).

    The blocks of :func:`grid_forward` (the same per-row functions, so the same numbers) in
    buffers of two anti-diagonals: ``h``, ``c``, ``act`` (2*M*B, ·), M the most blocks of a
    diagonal, slots as in :func:`mdnumba.kernels.wavefront._rolling_parents`; ``lp`` (2*M, 2)
    holds the parents' slots, ``lperm`` (2*M,) the blocks' ``perm``. Each row's ``act`` starts
    as ``[b_time | b_depth]`` of its level (``b_*`` (levels, 4D)); the top blocks' ``h_L'`` go
    to ``out`` (T*B, D), row ``t*B + b``.
    """
    _tiled(h, act, x)
    _grid_infer(out, h, c, act, lp, lperm, x, U_time, U_depth, pack_halves(U_time), pack_halves(U_depth),
                b_time, b_depth, diag_off, parent, perm, L, B, D)


@parallel_njit
def _grid_infer(out, h, c, act, lp, lperm, x, U_time, U_depth, Pt, Pd, b_time, b_depth, diag_off, parent,
                perm, L, B, D):
    """:func:`grid_infer`."""
    P = _groups(B)
    for k in range(diag_off.shape[0] - 1):
        cur = _rolling_parents(lp, parent, diag_off, k)
        _rolling_cells(lperm, perm, diag_off, k, cur)
        for t in prange((diag_off[k + 1] - diag_off[k]) * P):
            slot, b = cur + t // P, ITEM_ROWS * (t % P)
            nb, lv = min(ITEM_ROWS, B - b), (lperm[slot] % L) % U_time.shape[0]
            for r in range(slot * B + b, slot * B + b + nb):
                assign(act[r, :4 * D], b_time[lv])
                assign(act[r, 4 * D:], b_depth[lv])
            _block_forward(h, c, act, x, U_time, U_depth, Pt, Pd, lp[slot, 0], lp[slot, 1], lperm[slot], L,
                           slot, b, nb, B, D)
            if lperm[slot] % L == L - 1:
                for i in range(nb):
                    assign(out[(lperm[slot] // L) * B + b + i], h[slot * B + b + i, D:])


def grid_backward(dact: np.ndarray, dc: np.ndarray, dx: np.ndarray, dtop: np.ndarray, act: np.ndarray,
                  c: np.ndarray, U_time: np.ndarray, U_depth: np.ndarray, diag_off: np.ndarray,
                  parent: np.ndarray, child: np.ndarray, perm: np.ndarray, L: int, B: int,
                  D: int) -> None:
    """Backward sweep, diagonals in reverse (outputs dact, dc, dx; inputs; weights; tables; sizes).

    ``dtop`` (T*B, D) is dL/d(top blocks' h_L'); ``dact`` is (M*B, 10D): gate
    gradients in its first 8D columns, the last 2D are per-row scratch.
    """
    _tiled(dact, dx)
    _grid_backward(dact, dc, dx, dtop, act, c, U_time, U_depth, pack_halves(U_time, True),
                   pack_halves(U_depth, True), diag_off, parent, child, perm, L, B, D)


@parallel_njit
def _grid_backward(dact, dc, dx, dtop, act, c, U_time, U_depth, Qt, Qd, diag_off, parent, child, perm, L, B,
                   D):
    """:func:`grid_backward`."""
    P = _groups(B)  # work items as in grid_forward
    for k in range(diag_off.shape[0] - 2, -1, -1):
        s0 = diag_off[k]
        for t in prange((diag_off[k + 1] - s0) * P):
            b = ITEM_ROWS * (t % P)
            _block_backward(dact, dc, dx, dtop, act, c, U_time, U_depth, Qt, Qd, parent, child, perm, L,
                            s0 + t // P, b, min(ITEM_ROWS, B - b), B, D)


@parallel_njit
def gather_operands(zt, zd, h, x, parent, perm, L, B, D):
    """Per row: ``zt = [h_T in | h_L in]`` and ``zd = [h_T' | h_L in]`` (the GEMM operands of
    ``dU_time = ztᵀ da_T`` and ``dU_depth = zdᵀ da_L``)."""
    for r in prange(zt.shape[0]):
        s, b = r // B, r % B
        tp, dp = parent[s, 0], parent[s, 1]
        for j in range(D):
            zt[r, j] = 0.0  # an if statement: in `a if p else 0.0` a float32 a becomes a float64
            if tp >= 0:
                zt[r, j] = h[tp * B + b, j]
            hl = h[dp * B + b, D + j] if dp >= 0 else x[(perm[s] // L) * B + b, j]
            zt[r, D + j] = hl
            zd[r, j] = h[r, j]
            zd[r, D + j] = hl
