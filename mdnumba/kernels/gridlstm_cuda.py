"""CUDA twins of the 2D Grid LSTM sweeps (:mod:`mdnumba.kernels.gridlstm`), same arguments.

One CUDA thread owns one row (block, batch item) of a diagonal and runs the very
same per-row functions as the CPU kernels (:func:`mdnumba.kernels.gridlstm.build_rows`
compiled with ``cuda.jit(device=True)``). The diagonals are swept by the paths of
:mod:`mdnumba.kernels.wavefront_cuda` (cooperative with a grid sync per diagonal,
or one launch per diagonal).
"""

from __future__ import annotations

from numba import cuda

from .gridlstm import build_rows
from .wavefront_cuda import _JIT, _Args, _host_ints, _record, _sweep, _tpb

_ROWS = build_rows(cuda.jit(device=True))
_block_forward = _ROWS["block_forward"]
_block_backward = _ROWS["block_backward"]


@cuda.jit(device=True)
def _forward_plane(h, c, act, x, U_time, U_depth, diag_off, parent, perm, L, B, D, k, start, stride):
    s0 = diag_off[k]
    for t in range(start, (diag_off[k + 1] - s0) * B, stride):
        _block_forward(h, c, act, x, U_time, U_depth, parent, perm, L, s0 + t // B, t % B, B, D)


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


def grid_forward(h, c, act, x, U_time, U_depth, diag_off, parent, perm, L: int, B: int, D: int, *,
                 path: str | None = None, tpb: int | None = None) -> None:
    """CUDA twin of :func:`mdnumba.kernels.gridlstm.grid_forward` (NumPy or device arrays)."""
    a = _Args(h, c, act, x, U_time, U_depth, diag_off, parent, perm)
    desc = _sweep(_forward_coop, _forward_diag, (*a.dev, int(L), int(B), int(D)), _host_ints(diag_off),
                  B, 1, 0, path, _tpb(tpb), reverse=False)
    _record(desc, False)
    a.finish(0, 1, 2)


def grid_backward(dact, dc, dx, dtop, act, c, U_time, U_depth, diag_off, parent, child, perm, L: int,
                  B: int, D: int, *, path: str | None = None, tpb: int | None = None) -> None:
    """CUDA twin of :func:`mdnumba.kernels.gridlstm.grid_backward` (NumPy or device arrays)."""
    a = _Args(dact, dc, dx, dtop, act, c, U_time, U_depth, diag_off, parent, child, perm)
    desc = _sweep(_backward_coop, _backward_diag, (*a.dev, int(L), int(B), int(D)),
                  _host_ints(diag_off), B, 1, 0, path, _tpb(tpb), reverse=True)
    _record(desc, False)
    a.finish(0, 1, 2)

