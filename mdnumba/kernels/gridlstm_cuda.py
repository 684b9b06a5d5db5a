"""CUDA twins of the 2D Grid LSTM sweeps (:mod:`mdnumba.kernels.gridlstm`), same arguments.

One CUDA thread owns one row (block, batch item) of a diagonal and runs the very
same per-row functions as the CPU kernels (:func:`mdnumba.kernels.gridlstm.build_rows`
compiled with ``cuda.jit(device=True)``). The diagonals are swept by the paths of
:mod:`mdnumba.kernels.wavefront_cuda` (cooperative with a grid sync per diagonal,
or one launch per diagonal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numba import cuda

from .gridlstm import build_rows
from .launch import launch
from .wavefront_cuda import (
    _JIT,
    CUDA_MATH,
    _Args,
    _blocks,
    _divmod,
    _fill_parents,
    _host_offsets,
    _record,
    _sweep,
    _tpb,
)

if TYPE_CHECKING:
    from ..backend_cuda import HostOrDevice

_ROWS = build_rows(cuda.jit(device=True), **CUDA_MATH)
_block_forward = _ROWS["block_forward"]
_block_backward = _ROWS["block_backward"]


@cuda.jit(device=True)
def _forward_plane(h, c, act, x, U_time, U_depth, diag_off, parent, perm, L, B, D, k, start, stride):
    s0 = diag_off[k]
    for t in range(start, (diag_off[k + 1] - s0) * B, stride):
        s = s0 + t // B
        _block_forward(h, c, act, x, U_time, U_depth, parent[s, 0], parent[s, 1], perm[s], L, s, t % B, B, D)


@cuda.jit(device=True)
def _backward_plane(dact, dc, dx, dtop, act, c, U_time, U_depth, diag_off, parent, child, perm, L, B, D,
                    k, start, stride):
    s0 = diag_off[k]
    for t in range(start, (diag_off[k + 1] - s0) * B, stride):
        _block_backward(dact, dc, dx, dtop, act, c, U_time, U_depth, parent, child, perm, L,
                        s0 + t // B, t % B, B, D)


@cuda.jit(**_JIT)
def _forward_coop(h, c, act, x, U_time, U_depth, diag_off, parent, perm, L, B, D):
    grid = cuda.cg.this_grid()
    for k in range(diag_off.shape[0] - 1):
        _forward_plane(h, c, act, x, U_time, U_depth, diag_off, parent, perm, L, B, D, k,
                       cuda.grid(1), cuda.gridsize(1))
        grid.sync()


@cuda.jit(**_JIT)
def _forward_diag(h, c, act, x, U_time, U_depth, diag_off, parent, perm, L, B, D, k):
    _forward_plane(h, c, act, x, U_time, U_depth, diag_off, parent, perm, L, B, D, k,
                   cuda.grid(1), cuda.gridsize(1))


@cuda.jit(device=True)
def _fill_plane(lp, lperm, parent, perm, diag_off, k, last, start, stride):
    """Grid-stride: plane k's parent slots (:func:`~mdnumba.kernels.wavefront_cuda._fill_parents`)
    and its blocks' ``perm`` into ``lperm`` (CPU: ``_rolling_cells``); nothing for ``k >= last``."""
    _fill_parents(lp, parent, diag_off, k, last, start, stride)
    if k < last:
        cur = _divmod(k, 2)[1] * _divmod(lp.shape[0], 2)[0]
        s0 = diag_off[k]
        for i in range(start, diag_off[k + 1] - s0, stride):
            lperm[cur + i] = perm[s0 + i]


@cuda.jit(device=True)
def _infer_plane(out, h, c, act, lp, lperm, x, U_time, U_depth, b_time, b_depth, diag_off, L, B, D, k,
                 start, stride):
    """Grid-stride over plane k's rows in the two-plane buffers: ``act`` = the level's biases,
    the block, and a top block's ``h_L'`` into ``out`` (CPU: ``grid_infer``'s loop body)."""
    cur = _divmod(k, 2)[1] * _divmod(lp.shape[0], 2)[0]
    for t in range(start, (diag_off[k + 1] - diag_off[k]) * B, stride):
        i, b = _divmod(t, B)
        slot = cur + i
        r = slot * B + b
        lv = (lperm[slot] % L) % U_time.shape[0]
        for g in range(4 * D):
            act[r, g] = b_time[lv, g]
            act[r, 4 * D + g] = b_depth[lv, g]
        _block_forward(h, c, act, x, U_time, U_depth, lp[slot, 0], lp[slot, 1], lperm[slot], L, slot, b, B, D)
        if lperm[slot] % L == L - 1:
            for j in range(D):
                out[(lperm[slot] // L) * B + b, j] = h[r, D + j]


@cuda.jit(**_JIT)
def _infer_coop(out, h, c, act, lp, lperm, x, U_time, U_depth, b_time, b_depth, diag_off, parent, perm,
                L, B, D):
    """The saving-free sweep in one cooperative launch: each step fills the next plane's slots
    (the half the current plane does not read) and computes the current plane, grid sync in between."""
    grid = cuda.cg.this_grid()
    start, stride, K = cuda.grid(1), cuda.gridsize(1), diag_off.shape[0] - 1
    _fill_plane(lp, lperm, parent, perm, diag_off, 0, K, start, stride)
    grid.sync()
    for k in range(K):
        _fill_plane(lp, lperm, parent, perm, diag_off, k + 1, K, start, stride)
        _infer_plane(out, h, c, act, lp, lperm, x, U_time, U_depth, b_time, b_depth, diag_off, L, B, D, k,
                     start, stride)
        grid.sync()


@cuda.jit(**_JIT)
def _infer_pre(out, h, c, act, lp, lperm, x, U_time, U_depth, b_time, b_depth, diag_off, parent, perm,
               L, B, D):
    """The first plane's slots (per-diagonal path of :func:`_infer_coop`)."""
    _fill_plane(lp, lperm, parent, perm, diag_off, 0, diag_off.shape[0] - 1, cuda.grid(1), cuda.gridsize(1))


@cuda.jit(**_JIT)
def _infer_diag(out, h, c, act, lp, lperm, x, U_time, U_depth, b_time, b_depth, diag_off, parent, perm,
                L, B, D, k):
    """Plane k only, and the next plane's slots (one launch per plane)."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    _fill_plane(lp, lperm, parent, perm, diag_off, k + 1, diag_off.shape[0] - 1, start, stride)
    _infer_plane(out, h, c, act, lp, lperm, x, U_time, U_depth, b_time, b_depth, diag_off, L, B, D, k,
                 start, stride)


@cuda.jit(**_JIT)
def _backward_coop(dact, dc, dx, dtop, act, c, U_time, U_depth, diag_off, parent, child, perm, L, B, D):
    grid = cuda.cg.this_grid()
    for k in range(diag_off.shape[0] - 2, -1, -1):
        _backward_plane(dact, dc, dx, dtop, act, c, U_time, U_depth, diag_off, parent, child, perm, L,
                        B, D, k, cuda.grid(1), cuda.gridsize(1))
        grid.sync()


@cuda.jit(**_JIT)
def _backward_diag(dact, dc, dx, dtop, act, c, U_time, U_depth, diag_off, parent, child, perm, L, B, D,
                   k):
    _backward_plane(dact, dc, dx, dtop, act, c, U_time, U_depth, diag_off, parent, child, perm, L, B, D,
                    k, cuda.grid(1), cuda.gridsize(1))


def grid_forward(h: HostOrDevice, c: HostOrDevice, act: HostOrDevice, x: HostOrDevice,
                 U_time: HostOrDevice, U_depth: HostOrDevice, diag_off: HostOrDevice,
                 parent: HostOrDevice, perm: HostOrDevice, L: int, B: int, D: int, *,
                 path: str | None = None, tpb: int | None = None,
                 diag_off_host: np.ndarray | None = None) -> None:
    """CUDA twin of :func:`mdnumba.kernels.gridlstm.grid_forward` (NumPy or device arrays;
    ``diag_off_host`` as in :func:`~mdnumba.kernels.wavefront_cuda.wavefront_forward`: a device
    ``diag_off`` is otherwise copied back, which waits for the GPU)."""
    a = _Args(h, c, act, x, U_time, U_depth, diag_off, parent, perm)
    host_off = _host_offsets(diag_off, diag_off_host)
    desc = _sweep(_forward_coop, _forward_diag, (*a.dev, int(L), int(B), int(D)), host_off,
                  B, 1, 0, path, _tpb(tpb), reverse=False)
    _record(desc, False)
    a.finish(0, 1, 2)


def grid_backward(dact: HostOrDevice, dc: HostOrDevice, dx: HostOrDevice, dtop: HostOrDevice,
                  act: HostOrDevice, c: HostOrDevice, U_time: HostOrDevice, U_depth: HostOrDevice,
                  diag_off: HostOrDevice, parent: HostOrDevice, child: HostOrDevice, perm: HostOrDevice,
                  L: int, B: int, D: int, *, path: str | None = None, tpb: int | None = None,
                  diag_off_host: np.ndarray | None = None) -> None:
    """CUDA twin of :func:`mdnumba.kernels.gridlstm.grid_backward` (as :func:`grid_forward`)."""
    a = _Args(dact, dc, dx, dtop, act, c, U_time, U_depth, diag_off, parent, child, perm)
    host_off = _host_offsets(diag_off, diag_off_host)
    desc = _sweep(_backward_coop, _backward_diag, (*a.dev, int(L), int(B), int(D)), host_off, B, 1, 0, path,
                  _tpb(tpb), reverse=True)
    _record(desc, False)
    a.finish(0, 1, 2)



def grid_infer(out: HostOrDevice, h: HostOrDevice, c: HostOrDevice, act: HostOrDevice, lp: HostOrDevice,
               lperm: HostOrDevice, x: HostOrDevice, U_time: HostOrDevice, U_depth: HostOrDevice,
               b_time: HostOrDevice, b_depth: HostOrDevice, diag_off: HostOrDevice, parent: HostOrDevice,
               perm: HostOrDevice, L: int, B: int, D: int, *, path: str | None = None,
               tpb: int | None = None, diag_off_host: np.ndarray | None = None) -> None:
    """CUDA twin of :func:`mdnumba.kernels.gridlstm.grid_infer` (as :func:`grid_forward`)."""
    a = _Args(out, h, c, act, lp, lperm, x, U_time, U_depth, b_time, b_depth, diag_off, parent, perm)
    host_off = _host_offsets(diag_off, diag_off_host)
    desc = _sweep(_infer_coop, _infer_diag, (*a.dev, int(L), int(B), int(D)), host_off,
                  B, 1, 0, path, _tpb(tpb), reverse=False, pre=_infer_pre, extra_items=a.dev[4].size)
    _record(desc, False)
    a.finish(0, 1, 2, 3, 4, 5)


# ---------------------------------------------------------------- the device layer's glue
@cuda.jit
def _gather_operands(zt, zd, h, x, parent, perm, L, B, D):
    """CUDA twin of :func:`mdnumba.kernels.gridlstm.gather_operands`, a thread per (row, j)."""
    for k in range(cuda.grid(1), zt.shape[0] * D, cuda.gridsize(1)):
        r = k // D
        j = k - r * D
        s = r // B
        b = r - s * B
        tp, dp = parent[s, 0], parent[s, 1]
        zt[r, j] = 0.0  # an if statement: in `a if p else 0.0` a float32 a becomes a float64
        if tp >= 0:
            zt[r, j] = h[tp * B + b, j]
        hl = h[dp * B + b, D + j] if dp >= 0 else x[(perm[s] // L) * B + b, j]
        zt[r, D + j] = hl
        zd[r, j] = h[r, j]
        zd[r, D + j] = hl


def gather_operands(zt, zd, h, x, parent, perm, L: int, B: int, D: int) -> None:
    """The weight-gradient GEMMs' operands (see :func:`mdnumba.kernels.gridlstm.gather_operands`)."""
    tpb = _tpb(None)
    launch(_gather_operands, _blocks(zt.shape[0] * int(D), tpb), tpb, 0, zt, zd, h, x, parent, perm, int(L),
           int(B), int(D))
