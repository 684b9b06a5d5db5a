"""CPU wavefront kernels of the N-dimensional LSTM (1D LSTM = N=1, MD-LSTM = N>=2).

Layout (see :mod:`mdnumba.grid`): every per-cell array is 2-D with row
``r = s*B + b`` for skewed cell ``s`` and batch item ``b``. Gate pre-activations
have ``G = (N+3)*D`` columns in blocks of D (``[i | f_1 .. f_N | o | g]`` for the
graves cell; see :mod:`mdnumba.kernels.cell` for the others). Recurrent weights
``U`` have shape ``(S, D, N*G)``: block d (columns ``d*G:(d+1)*G``) is ``U_d``,
applied to the parent along dimension d, and S independent scans with their own
weights (a layer's directions) occupy consecutive slabs of M*B rows and are
swept together.

Layers, stumpy style: the unit math of :mod:`mdnumba.kernels.cell` ←
``_recurrent_*`` and ``_cell_*`` (serial, one cell and a group of up to
:data:`mdnumba.grid.ROWS` batch items; ``_infer_item`` adds the input projection) ← ``_sweep_*``
(parallel drivers: hyperplanes in order, a ``prange`` over each hyperplane's scans × cells ×
batch, or over a padded batch's live rows) and ``_sweep_*_batched`` (one ``prange`` over blocks
of scans × batch, each sweeping every hyperplane: small hyperplanes, :func:`batch_blocks`) ←
``wavefront_forward`` / ``wavefront_backward`` / ``wavefront_infer`` (public wrappers, the
signatures of their CUDA twins).
The recurrent products are hand-written row-times-matrix loops rather than a
BLAS call per hyperplane: calling multi-threaded BLAS inside Numba's parallel
sweep made the two thread pools fight (30x slower on 2 cores), and single-
threaded BLAS was no faster. Everything that needs no sweep (input projection,
weight gradients) is done with big GEMMs by the caller.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import numba
import numpy as np
from numba import njit, prange

from ..config import NJIT_CHAIN_OPTS, NJIT_OPTS
from ..grid import ROWS
from . import simd, vexp
from .cell import build
from .gemm import assign, rows_product, selected_row
from .parallel import parallel_njit
from .simd import (
    TALL_ROWS,
    TALL_TILES,
    TILE_MIN_STEPS,
    chunk_steps,
    fma_tile,
    four_rows,
    group_panel,
    panel_cols,
    prefetch_row,
    row_offsets,
    tall_offsets,
    tall_panel,
    tall_rows,
    tile_panel,
    tile_quad,
    tile_rows,
)

_CELL = build(njit(inline="always", **NJIT_OPTS), **vexp.CPU_MATH)
_row_forward = _CELL["row_forward"]
_row_backward = _CELL["row_backward"]

#: :func:`batch_blocks`' "auto": a sweep in blocks of batch items needs hyperplanes of at most this
#: many cells on average and (but in 1D) this many work streams per thread (measured on 2 cores, a
#: sweep: 1D 0.5-0.9x the time of one fork and join per hyperplane, B=1 0.35x, 8x8 B16 0.9x; 16x16
#: to 32x32 B16 1.0-1.08x)
BATCH_STREAMS_PER_THREAD = 2
BATCH_MAX_CELLS = 8
#: most work items (groups of ROWS rows) per block of a per-hyperplane backward sweep whose
#: tiles go chunk by chunk (:func:`_sweep_backward`)
BLOCK_ITEMS = 8
#: work items per task of the other per-hyperplane sweeps: two where their rows can make one
#: tall tile (:func:`_tall_item`; 32x32 B64 D64 ``save=False`` forward 1.15x, 64x64 B8 D128
#: 1.24x); :func:`task_items`
TASK_ITEMS = TALL_ROWS // ROWS if TALL_TILES else 1
#: work items ahead whose output row the saving-free per-hyperplane sweep asks the cache for
#: (:func:`_prefetch_output`; 2 to 16 measured alike)
PREFETCH_ITEMS = 4
#: the batch "auto" plans for inside :func:`schedule_as_batch` (else the batch at hand)
_PLANNED_BATCH: contextvars.ContextVar = contextvars.ContextVar("planned_batch")


@njit(inline="always", **NJIT_OPTS)
def shared_tiles(B):
    """Whether the per-hyperplane sweeps put the rows of several cells in one register tile
    (:func:`_cell_tiles`): where a cell has at most half a tile's rows, B <= ROWS / 2 (each
    lone row's tile loaded the whole panel for 2 fused multiply-adds per step: 256x256 B1
    ``save=False`` forward D64 1.8x, D128 2.0x, train step 1.5x, 1.6x; B2 D64 train 1.07x)."""
    return 2 * B <= ROWS


@njit(inline="always", **NJIT_OPTS)
def task_items(B, m, threads):
    """Work items per task of a per-hyperplane sweep over m items of a batch of B on ``threads``
    threads: :data:`TASK_ITEMS` where a cell has two full groups of rows (B >= 2·ROWS, two items
    can make a tall tile), the cells of one tile where they share tiles (:func:`shared_tiles`)
    but no fewer tasks than threads (a padded bidirectional LSTM1D at batch 1 has 2 items per
    step), else 1."""
    if B >= 2 * ROWS:
        return TASK_ITEMS
    return max(1, min(ROWS // B, m // threads)) if shared_tiles(B) else 1


@njit(**NJIT_OPTS)
def groups(B):
    """Work items per cell and scan: ``ceil(B / ROWS)``."""
    return (B + ROWS - 1) // ROWS


@njit(**NJIT_OPTS)
def _cell_forward(h, c, act, parent, base, s, b, B, D, cell):
    """Row ``r = base + s*B + b``: all D units through :mod:`mdnumba.kernels.cell`'s ``row_forward``
    (loops over the units, vectorised)."""
    _row_forward(h, c, act, parent, base, s, b, B, D, cell, 0, D)


@njit(**NJIT_OPTS)
def _plane(k, diag_off, items_off, B):
    """Hyperplane k's work items per scan: ``(first, n)``. Without a live-items table (``items_off``
    empty) every row: its cells from ``first = diag_off[k]`` on, ``n = cells * groups(B)``; with
    one (:func:`mdnumba.grid.live_items`, one offset per entry of ``diag_off``) its entries
    ``first .. first + n - 1``. Both int64 whatever the tables' type, as the batched sweeps'
    cells, so that the callees are compiled once (see :mod:`mdnumba.kernels`)."""
    if items_off.shape[0] == 0:
        return np.int64(diag_off[k]), (diag_off[k + 1] - diag_off[k]) * groups(B)
    return np.int64(items_off[k]), np.int64(items_off[k + 1] - items_off[k])


@njit(**NJIT_OPTS)
def _work_item(t, first, n, items, B):
    """Item t of a hyperplane's ``(first, n)`` (:func:`_plane`): (scan, cell, first batch item b,
    rows nb). Without a table, the batch items ``b = ROWS*i .. b + nb - 1`` (nb = ROWS, fewer at
    the end of the batch); with one, entry ``ROWS*(s*B + b) + nb - 1``."""
    q = t % n
    if items.shape[0] == 0:
        P = groups(B)
        b = ROWS * (q % P)
        return t // n, first + q // P, b, min(ROWS, B - b)
    e = items[first + q]
    return t // n, (e // ROWS) // B, (e // ROWS) % B, e % ROWS + 1


@njit(**NJIT_OPTS)
def _recurrent_forward(act, h, Up, parent, base, s, b, nb, B):
    """``act[r] += Σ_d h[parent_d] @ U_d`` for the ``nb`` (1 .. 4, or a pair of groups: 8) rows
    ``r = base + s*B + b + i`` (rows of the plane's GEMM): the panels of ``Up[d]``
    (:func:`pack_recurrent`) as register tiles (:func:`~mdnumba.kernels.simd.tile_rows` or
    ``tall_rows``: every element a chain of fused multiply-adds over the D units)."""
    r = base + s * B + b
    for d in range(parent.shape[1]):
        p = parent[s, d]
        if p >= 0 and nb == TALL_ROWS:
            tall_rows(act, r, h, base + p * B + b, Up[d])
        elif p >= 0:
            tile_rows(act, r, h, base + p * B + b, nb, Up[d])


def pack_recurrent(U: np.ndarray, N: int, transposed: bool = False) -> np.ndarray:
    """``U`` (S, D, N*G) as the register-tile panels (:func:`~mdnumba.kernels.simd.tile_rows`) of
    each scan and parent: (S, N, ceil(G / W), D, W) of ``U_d`` for the forward products, or
    ``transposed`` (S, N, ceil(D / W), G, W) of ``U_dᵀ`` for the backward pulls (panel p: units
    ``p*W .. p*W + W - 1``); the last panel's columns past G (D) are zeros, and the tiles write
    only the columns below (:func:`~mdnumba.kernels.simd.fma_tile`'s mask). Partial panels, not
    the old per-row loops past the whole ones: Grid LSTM T32 L3 B16 D31 inference 1.5-1.6x,
    train step 1.3x; 1D and 3D D15..D31 1.1-1.4x; whole panels as before (one process, interleaved,
    2 threads of a Xeon). The sweeps need C-contiguous ``act`` and ``h`` for them."""
    S, D = U.shape[:2]
    W = simd.tile_width(U)
    cols, steps = (D, U.shape[2] // N) if transposed else (U.shape[2] // N, D)
    panels = np.zeros((S, N, -(-cols // W), steps, W), U.dtype)
    _pack_recurrent(panels, U, transposed)
    return panels


@njit(**NJIT_OPTS)
def _pack_recurrent(panels, U, transposed):
    """:func:`pack_recurrent` (serial: a copy of the weights)."""
    N, P, T, W = panels.shape[1:]
    G = U.shape[2] // N
    cols = U.shape[1] if transposed else G
    for q in range(panels.shape[0]):
        for d in range(N):
            for p in range(P):
                for t in range(T):
                    for n in range(min(W, cols - p * W)):
                        panels[q, d, p, t, n] = (U[q, p * W + n, d * G + t] if transposed
                                                 else U[q, t, d * G + p * W + n])


def _tiled(*arrays) -> None:
    """ValueError unless every array is C-contiguous (the register tiles index them flat)."""
    if not all(a.flags.c_contiguous for a in arrays):
        raise ValueError("the sweep buffers must be C-contiguous")


def wavefront_forward(h: np.ndarray, c: np.ndarray, act: np.ndarray, U: np.ndarray, diag_off: np.ndarray,
                      parent: np.ndarray, B: int, D: int, cell: int, *,
                      items: tuple[np.ndarray, np.ndarray] | None = None, schedule: str = "auto",
                      inputs: tuple | None = None) -> None:
    """Forward sweep over all hyperplanes (outputs h, c, act; inputs; weights; sizes; cell code).

    ``act`` (S*M*B, G) enters holding the input projection ``W x + b`` and leaves
    holding the gate activations; ``h``, ``c`` (S*M*B, D) are written. ``U`` is
    (S, D, N*G): S independent scans (e.g. the directions of a layer) with their
    own weights, each on its own slab of M*B rows, swept together. Hyperplanes run
    in order; inside one, every (scan, cell, group of batch items) adds ``Σ_d h_parent_d U_d``
    to its pre-activations and applies the cell, all in parallel. ``items`` (a padded batch's
    :func:`mdnumba.grid.live_items`): those rows only; the others are left as they are.
    ``schedule`` (:func:`batch_blocks`): how the work is split over the threads; the numbers are
    the same either way. ``inputs = (xs, W, bias)``: ``act`` need not hold the input projection,
    each swept row gets ``act = bias_q + xs @ W_q`` (``xs`` (S*M*B, C) in act's rows, ``W``
    (S, C, G), ``bias`` (S, G)) just before its recurrent products, the numbers of
    :func:`~mdnumba.kernels.gemm.matmul_rows`: one pass over ``act`` instead of two. Row by row,
    no register tiles: for a few input channels (C < :data:`~mdnumba.kernels.simd.TILE_MIN_STEPS`,
    an image's 1 to 3), where the projection is all memory traffic.
    """
    _tiled(h, act)
    diag_off, parent = _read_only(diag_off, parent)
    Up = pack_recurrent(U, parent.shape[1])
    xs, W, bias = _no_inputs(act) if inputs is None else inputs
    nblk = batch_blocks(U.shape[0], B, diag_off, items, schedule)
    if nblk:
        _sweep_forward_batched(h, c, act, xs, W, bias, U, Up, diag_off, parent, B, D, cell, nblk)
    else:
        _sweep_forward(h, c, act, xs, W, bias, U, Up, diag_off, *_items_or_all(items, diag_off), parent,
                       B, D, cell, numba.get_num_threads())


def _no_inputs(act) -> tuple:
    """Empty ``(xs, W, bias)`` for a sweep whose ``act`` holds the input projection already."""
    return np.empty((0, 0), act.dtype), np.empty((0, 0, 0), act.dtype), np.empty((0, 0), act.dtype)


@njit(**NJIT_OPTS)
def _project_rows(act, xs, W, bias, grp, r, nb):
    """``act[r+i] = bias_grp + xs[r+i] @ W_grp`` for the nb rows i (:func:`_few_inputs`); nothing
    where ``xs`` is empty (:func:`_no_inputs`)."""
    if xs.shape[0] > 0:
        for i in range(nb):
            _few_inputs(act, r + i, xs, r + i, W[grp], bias[grp])


#: :func:`batch_blocks`' choices
SCHEDULES = ("auto", "planes", "batch")


def batch_blocks(S: int, B: int, diag_off: np.ndarray, items: tuple[np.ndarray, np.ndarray] | None,
                 schedule: str = "auto") -> int:
    """How a sweep over the hyperplanes of ``diag_off`` splits its work over the threads:

    - 0: a ``prange`` per hyperplane over its (scan, cell, group of batch items) work items: a fork
      and join of the threads per hyperplane;
    - n > 0: one ``prange`` over n blocks of the S*groups(B) (scan, group) work streams, each block
      sweeping every hyperplane for its own streams (streams never read each other's rows): one
      fork and join per sweep.

    Both compute every row with the same operations in the same order: the results are
    identical. ``"auto"`` takes blocks where the hyperplanes are small (at most
    :data:`BATCH_MAX_CELLS` cells on average: 1D, small grids), the fork and join costing more
    than a hyperplane's work, and, unless each hyperplane is one cell (1D: then a hyperplane
    has no more work items than there are streams), there are at least
    :data:`BATCH_STREAMS_PER_THREAD` streams per thread. A padded batch (``items``: its live
    cells differ per item) always runs a ``prange`` per hyperplane, whatever ``schedule`` says."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if schedule == "planes" or items is not None:
        return 0
    streams, threads = S * groups(B), numba.get_num_threads()
    cells = (diag_off[-1] - diag_off[0]) / max(len(diag_off) - 1, 1)
    planned = S * groups(_PLANNED_BATCH.get(B))
    enough = cells == 1 or planned >= BATCH_STREAMS_PER_THREAD * threads
    if schedule == "auto" and not (enough and cells <= BATCH_MAX_CELLS):
        return 0
    return min(streams, threads)


@contextlib.contextmanager
def schedule_as_batch(batch: int) -> Iterator[None]:
    """Inside, ``"auto"`` (:func:`batch_blocks`) chooses as for batches of ``batch`` items,
    whatever the batch: a probe step at a small batch (:func:`mdnumba.train.step_memory`) then
    compiles and runs the sweeps the full batch will, not the other schedule's."""
    token = _PLANNED_BATCH.set(int(batch))
    try:
        yield
    finally:
        _PLANNED_BATCH.reset(token)


def _read_only(*tables: np.ndarray) -> tuple[np.ndarray, ...]:
    """Read-only views of index tables, as :mod:`mdnumba.grid` makes its own: Numba compiles a
    sweep apart for writable arrays (20-30 s), so a caller's own tables share the layers' one."""
    views = tuple(t.view() for t in tables)
    for v in views:
        v.setflags(write=False)
    return views


def _items_or_all(items, diag_off) -> tuple:
    """``items`` as the sweeps take it: ``(offsets, entries)``, empty for every row; read-only as
    :func:`mdnumba.grid.live_items`' tables, so that both calls share one compiled sweep."""
    if items is None:
        return _read_only(np.empty(0, diag_off.dtype), np.empty(0, diag_off.dtype))
    return _read_only(*items)


@parallel_njit
def _sweep_forward(h, c, act, xs, W, bias, U, Up, diag_off, items_off, items, parent, B, D, cell, threads):
    """:func:`wavefront_forward`, a ``prange`` per hyperplane over tasks of :func:`task_items`
    work items."""
    MB = parent.shape[0] * B
    for k in range(diag_off.shape[0] - 1):
        first, n = _plane(k, diag_off, items_off, B)
        m = U.shape[0] * n
        per = task_items(B, m, threads)
        for task in prange((m + per - 1) // per):
            t, t1 = task * per, min(m, (task + 1) * per)
            if shared_tiles(B):  # the rows of the task's cells in shared tiles
                for tt in range(t, t1):
                    grp, s, b, nb = _work_item(tt, first, n, items, B)
                    _project_rows(act, xs, W, bias, grp, grp * MB + s * B + b, nb)
                _cell_tiles(act, h, Up, parent, MB, np.int64(0), first, n, items, B, t, t1)
            while t < t1:
                grp, s, b, nb, taken = _tall_item(t, t1, first, n, items, B)
                if not shared_tiles(B):
                    _project_rows(act, xs, W, bias, grp, grp * MB + s * B + b, nb)
                    _recurrent_forward(act, h, Up[grp], parent, grp * MB, s, b, nb, B)
                for bb in range(b, b + nb):
                    _cell_forward(h, c, act, parent, grp * MB, s, bb, B, D, cell)
                t += taken


@njit(**NJIT_OPTS)
def _stream(t, B):
    """(scan, first batch item b, rows nb) of (scan, group of rows) work stream t
    (:func:`batch_blocks`)."""
    P = groups(B)
    b = ROWS * (t % P)
    return t // P, b, min(ROWS, B - b)


@parallel_njit
def _sweep_forward_batched(h, c, act, xs, W, bias, U, Up, diag_off, parent, B, D, cell, nblk):
    """:func:`wavefront_forward` in ``nblk`` blocks of work streams (:func:`batch_blocks`), each
    sweeping the cells in hyperplane order (the skewed order) for its streams."""
    MB = parent.shape[0] * B
    n = U.shape[0] * groups(B)
    for blk in prange(nblk):
        t0, t1 = blk * n // nblk, (blk + 1) * n // nblk
        for s in range(np.int64(diag_off[0]), diag_off[diag_off.shape[0] - 1]):  # int64, as _sweep_forward
            for t in range(t0, t1):
                grp, b, nb = _stream(t, B)
                _project_rows(act, xs, W, bias, grp, grp * MB + s * B + b, nb)
            _tiles_items(act, h, Up, parent, MB, s, groups(B), diag_off[:0], B, t0, t1)
            for t in range(t0, t1):
                grp, b, nb = _stream(t, B)
                for bb in range(b, b + nb):
                    _cell_forward(h, c, act, parent, grp * MB, s, bb, B, D, cell)


@njit(**NJIT_OPTS)
def _tiles_items(out, src, panels, links, MB, first, n, items, B, t0, t1):
    """The register tiles of :func:`_recurrent_forward` (``out, src, panels, links`` = act, h,
    Up, parent) or of :func:`_recurrent_backward` (dh, dact, Ut, child) for the work items
    t0 .. t1-1 of a hyperplane's ``(first, n)`` (:func:`_work_item`; slabs of MB rows; the batch
    schedule's streams at cell s are the items of ``(s, groups(B))``), chunk by chunk: each
    :func:`~mdnumba.kernels.simd.chunk_steps` steps of a panel pass over every item's rows while
    in L1 (item after item re-read all of U, 1 MB at D256, from L2 per group of rows: ``LSTM1D``
    T200 B64 D256 train step 1.22x, ``save=False`` forward 1.17x on 2 threads of a Xeon); two
    items whose rows continue each other in one tall tile (:func:`_tall_item`). Each element's
    chain is the same."""
    P, T = panels.shape[2], panels.shape[3]
    step = chunk_steps(panels)
    for d in range(links.shape[1]):
        for q in range(P):
            for k0 in range(0, T, step):
                k1 = min(T, k0 + step)
                t = t0
                while t < t1:
                    grp, s, b, nb, taken = _tall_item(t, t1, first, n, items, B)
                    link, r = links[s, d], grp * MB + b
                    if link >= 0 and nb == TALL_ROWS:
                        tall_panel(out, r + s * B, src, r + link * B, panels[grp, d], q, k0, k1)
                    elif link >= 0:
                        group_panel(out, r + s * B, src, r + link * B, nb, panels[grp, d], q, k0, k1)
                    t += taken


@njit(inline="always", **NJIT_OPTS)
def _tall_item(t, t1, first, n, items, B):
    """Work item t of a hyperplane's ``(first, n)`` (:func:`_work_item`) as ``(scan, cell, b, nb,
    items taken)``: with item t+1 (below t1) when that continues its rows, 2·ROWS = 8 consecutive
    rows of one scan and cell (one tall tile for both: :data:`~mdnumba.kernels.simd.TALL_ROWS`)."""
    grp, s, b, nb = _work_item(t, first, n, items, B)
    if TALL_TILES and nb == ROWS and t + 1 < t1:
        g2, s2, b2, nb2 = _work_item(t + 1, first, n, items, B)
        if nb2 == ROWS and g2 == grp and s2 == s and b2 == b + ROWS:
            return grp, s, b, 2 * ROWS, 2
    return grp, s, b, nb, 1


@njit(inline="always", **NJIT_OPTS)
def _linked_rows(t, t1, first, n, items, B, links, d, shift):
    """The rows of work items t, t+1, … (below t1) whose link d exists (``links[s + shift, d]``
    >= 0, s the item's cell; d < 0: every item), up to :data:`ROWS` of them, whole items of one
    scan: ``(scan, rows, their links' rows, count, next t)``, rows as 4-tuples of slab rows
    (``(s + shift)·B + b + i`` and ``link·B + b + i``, for d < 0 the items' own ``s·B + b + i``;
    the unused entries repeat the last one). The rows and the count start as ``np.int64``: with
    literal 0s, Numba typed the callers' calls with them first and compiled the callees for them
    too (see :mod:`mdnumba.kernels`)."""
    o0 = o1 = o2 = o3 = a0 = a1 = a2 = a3 = np.int64(0)
    scan, count = -1, np.int64(0)
    while t < t1:
        grp, s, b, nb = _work_item(t, first, n, items, B)
        link = links[s + shift, d] if d >= 0 else s
        if link >= 0 and (count + nb > ROWS or (count > 0 and grp != scan)):
            break
        if link >= 0:
            scan = grp
            for i in range(nb):
                ro, ra = (s + shift) * B + b + i, link * B + b + i
                if count == 0:
                    o0, a0 = ro, ra
                elif count == 1:
                    o1, a1 = ro, ra
                elif count == 2:
                    o2, a2 = ro, ra
                else:
                    o3, a3 = ro, ra
                count += 1
        t += 1
    if count < 2:
        o1, a1 = o0, a0
    if count < 3:
        o2, a2 = o1, a1
    if count < 4:
        o3, a3 = o2, a2
    return scan, (o0, o1, o2, o3), (a0, a1, a2, a3), count, t


@njit(inline="always", **NJIT_OPTS)
def _add4(rows, base):
    """A 4-tuple of rows shifted by ``base``."""
    return rows[0] + base, rows[1] + base, rows[2] + base, rows[3] + base


@njit(**NJIT_OPTS)
def _cell_tiles(out, src, panels, links, MB, shift, first, n, items, B, t0, t1):
    """The register tiles of :func:`_recurrent_forward` (``out, src, panels, links`` = act, h,
    Up, parent) or of :func:`_recurrent_backward` (dh, dact, Ut, child) for the work items t0 ..
    t1-1 of a hyperplane's ``(first, n)`` (:func:`_work_item`; slabs of MB rows; cell s at row
    ``s + shift`` of ``links`` and of its slab) where cells share tiles (:func:`shared_tiles`):
    several cells' rows in one tile (:func:`_linked_rows`), not a tile per cell. Each element's
    chain is the same."""
    for d in range(links.shape[1]):
        t = t0
        while t < t1:
            grp, o, a, count, t = _linked_rows(t, t1, first, n, items, B, links, d, shift)
            if count == 0:
                continue
            o, a = _add4(o, grp * MB), _add4(a, grp * MB)
            tile_quad(out, o, src, a, count, panels[grp, d])


@njit(**NJIT_OPTS)
def _rolling_parents(lp, parent, diag_off, k):
    """Rows of hyperplane k in the two-plane buffers of :func:`wavefront_infer`: its cells take
    slots ``(k % 2)*M + i`` (M = ``lp.shape[0] // 2``, i-th cell of the plane), and ``lp`` gets
    their parents' slots on plane k-1 (-1: none). Returns the plane's first slot."""
    M = lp.shape[0] // 2
    s0, cur, prev = diag_off[k], (k % 2) * M, ((k + 1) % 2) * M
    p0 = diag_off[k - 1] if k > 0 else 0
    for i in range(diag_off[k + 1] - s0):
        for d in range(parent.shape[1]):
            p = parent[s0 + i, d]
            lp[cur + i, d] = prev + p - p0 if p >= 0 else -1
    return cur


def wavefront_infer(out: np.ndarray, h: np.ndarray, c: np.ndarray, act: np.ndarray, lp: np.ndarray,
                    x: np.ndarray, src: np.ndarray, W: np.ndarray, bias: np.ndarray, U: np.ndarray,
                    diag_off: np.ndarray, parent: np.ndarray, first: int, last: int, B: int, D: int,
                    cell: int, *, items: tuple[np.ndarray, np.ndarray] | None = None,
                    schedule: str = "auto") -> None:
    """Forward sweep that keeps no activations (outputs out, h, c, act; inputs; weights; sizes).

    The same rows, products and cell as :func:`matmul_rows` + :func:`wavefront_forward` (so the
    same numbers), but only two hyperplanes are held at a time: ``h``, ``c``, ``act``
    (S*2*M*B, ·) with M the most cells of a plane, slots as in :func:`_rolling_parents`, ``lp``
    (2*M, N) scratch. Per (scan q, cell, group of batch items) of planes ``first .. last-1``: the
    input projection ``act = bias_q + x[src] @ W_q`` (``src`` of :func:`mdnumba.grid.direction_tables`,
    -1: a zero input), the recurrent products, the cell, and h into ``out[src, q]`` (dense rows
    (R, S, D)). ``first = 1`` after :func:`seed_state` filled slot 0 (a 1D initial state).
    ``items`` and ``schedule`` as in :func:`wavefront_forward` (``out``'s other rows are not
    written; split into blocks, each block keeps its own parents' slots, ``lp`` is not used).

    The sweeps write the parents' slots through ``lp`` and read them through a read-only view of
    it, ``lpr``: the functions they share with the saving sweeps, which take the grid's read-only
    tables (the cell, the recurrent tiles), share their compiled code then, also from the cache
    (an ``evaluate`` after a ``train`` compiled the cell again, for a writable table: 6 s).
    """
    _tiled(h, act)
    src, diag_off, parent = _read_only(src, diag_off, parent)
    Up = pack_recurrent(U, parent.shape[1])
    Wp = pack_recurrent(W, 1)[:, 0]  # the input weights' panels, where matmul_rows takes them
    if W.shape[1] < simd.TILE_MIN_STEPS or not x.flags.c_contiguous:
        Wp = Wp[:, :0]
    nblk = batch_blocks(U.shape[0], B, diag_off, items, schedule)
    if nblk:
        lps = np.empty((nblk,) + lp.shape, lp.dtype)
        _sweep_infer_batched(out, h, c, act, lps, *_read_only(lps), x, src, W, Wp, bias, U, Up, diag_off,
                             parent, first, last, B, D, cell)
    else:
        items_off, entries = _items_or_all(items, diag_off)
        _sweep_infer(out, h, c, act, lp, *_read_only(lp), x, src, W, Wp, bias, U, Up, diag_off, items_off,
                     entries, parent, first, last, B, D, cell, numba.get_num_threads())


@njit(**NJIT_OPTS)
def _infer_item(out, h, c, act, lp, x, src, W, Wp, bias, Up, grp, base, slot, row, b, nb, B, D, cell,
                tiles):
    """Work item (cell in two-plane ``slot``, batch rows b .. b+nb-1; ``row`` = cell*B + b in
    ``src``) of scan ``grp``, whose slab starts at row ``base``: input projection
    (:func:`_infer_inputs`), recurrent products, cell, h into ``out[:, grp]``. ``tiles=False``:
    the projection and the recurrent products are done already (the batch schedule's
    :func:`_infer_inputs` with ``tiles=False``, :func:`_input_tiles`, :func:`_tiles_items`; cells
    that share tiles: :func:`_cell_inputs`, :func:`_cell_tiles`)."""
    if tiles:
        r = base + slot * B + b
        _infer_inputs(act, x, src, W, Wp, bias, r, row, min(ROWS, nb), np.bool_(True))
        if nb > ROWS:  # a pair of groups (:func:`_tall_item`)
            _infer_inputs(act, x, src, W, Wp, bias, r + ROWS, row + ROWS, nb - ROWS, np.bool_(True))
        _recurrent_forward(act, h, Up, lp, base, slot, b, nb, B)
    for i in range(nb):
        _cell_forward(h, c, act, lp, base, slot, b + i, B, D, cell)
        j = src[row + i]
        if j >= 0:
            assign(out[j, grp], h[base + slot * B + b + i])


@njit(**NJIT_OPTS)
def _infer_inputs(act, x, src, W, Wp, bias, r, row, nb, tiles):
    """``act[r+i] = bias + x[src[row+i]] @ W`` for the nb (1 .. 4) rows i: :func:`_input_rows`.
    ``tiles``: ``np.bool_(True)`` or ``np.bool_(False)``, no literal (see :mod:`mdnumba.kernels`)."""
    _input_rows(act, x, src, W, Wp, bias, four_rows(r, nb), four_rows(row, nb), nb, tiles)


@njit(**NJIT_OPTS)
def _input_rows(act, x, src, W, Wp, bias, rr, rows, nb, tiles):
    """``act[rr[i]] = bias + x[src[rows[i]]] @ W`` for the first nb (1 .. 4) entries i of the
    4-tuples (the others repeat the last; a row of ``src`` -1: bias only). ``tiles=False``: where
    every row has an input, the columns of the panels ``Wp`` are left to :func:`_input_tiles`."""
    if W.shape[0] < TILE_MIN_STEPS:  # a few input channels (an image's 1 to 3): one pass per row
        for i in range(nb):
            _few_inputs(act, rr[i], x, np.int64(src[rows[i]]), W, bias)
        return
    for i in range(nb):
        assign(act[rr[i]], bias)
    live, ss = _sources(src, rows)
    if live:  # the input projection of all nb rows at once: tiles (none: x not C-contiguous)
        if Wp.shape[0] == 0:
            rows_product(act, rr, x, ss, nb, W, np.int64(0))
        elif tiles:
            tile_quad(act, rr, x, ss, nb, Wp)
    else:  # rows of zero input (src -1) among them: the others one at a time, the same numbers
        for i in range(nb):
            j = ss[i]
            if j >= 0:
                rows_product(act, (rr[i], rr[i], rr[i], rr[i]), x, (j, j, j, j), np.int64(1), W, np.int64(0))


@njit(**NJIT_CHAIN_OPTS)
def _few_inputs(act, r, x, j, W, bias):
    """``act[r] = bias + x[j] @ W`` for fewer than 4 input channels (j < 0: bias only) in one pass
    over the row instead of a copy of the bias and a product: every element the chain ``bias +
    x_0·w_0 + …`` of fused multiply-adds that :func:`~mdnumba.kernels.gemm.quad_product` makes
    of the rows past its fours, so the saving forward's numbers (3D 64^3 B1 ``save=False``
    forward 75 -> 70 ms)."""
    G, K = act.shape[1], W.shape[0]
    if j < 0 or K == 0:
        for g in range(G):
            act[r, g] = bias[g]
        return
    v = x[j, 0]
    for g in range(G):
        act[r, g] = bias[g] + v * W[0, g]
    for k in range(1, K):
        v = x[j, k]
        for g in range(G):
            act[r, g] = act[r, g] + v * W[k, g]


@njit(**NJIT_OPTS)
def _cell_inputs(act, x, src, W, Wp, bias, lp, L, shift, first, n, items, B, t0, t1):
    """The input projections (:func:`_input_rows`) of the work items t0 .. t1-1 of a hyperplane
    of the saving-free sweep (cell s in slot ``s + shift``, scan slabs of L rows) where cells
    share tiles (:func:`shared_tiles`): the rows of several cells in one tile (batch 1: a lone
    row's tile repeated it 4 times)."""
    t = t0
    while t < t1:
        grp, rr, rows, count, t = _linked_rows(t, t1, first, n, items, B, lp, -1, shift)
        _input_rows(act, x, src[grp], W[grp], Wp[grp], bias[grp], _add4(rr, grp * L), rows, count,
                    np.bool_(True))


@njit(inline="always", **NJIT_OPTS)
def _sources(src, rows):
    """Whether the rows ``rows`` (a 4-tuple) of ``src`` all have an input (not -1), and their
    input rows as a 4-tuple."""
    ss = (np.int64(src[rows[0]]), np.int64(src[rows[1]]), np.int64(src[rows[2]]), np.int64(src[rows[3]]))
    return min(min(ss[0], ss[1]), min(ss[2], ss[3])) >= 0, ss


@njit(**NJIT_OPTS)
def _input_tiles(act, x, src, Wp, L, slot, cell_k, B, t0, t1):
    """The register tiles of :func:`_infer_inputs` (``tiles=False``) for the work streams t0 ..
    t1-1 (:func:`_stream`) at cell ``cell_k`` in ``slot`` (scan slabs of L rows): each panel of
    ``Wp`` passes over every stream's rows while in L1 (per stream, item after item read all of
    ``W`` from L2: 1D D256 projection 1.14x); two streams' 8 consecutive rows, all with an
    input, in one tall tile. Each element's chain is the same."""
    K, W = Wp.shape[2], Wp.shape[3]
    for p in range(Wp.shape[1]):
        t = t0
        while t < t1:
            grp, b, nb = _stream(t, B)
            live, ss = _sources(src[grp], four_rows(cell_k * B + b, nb))
            r = grp * L + slot * B + b
            if TALL_TILES and nb == ROWS and t + 1 < t1 and _stream(t + 1, B) == (grp, b + ROWS, ROWS):
                live2, ss2 = _sources(src[grp], four_rows(cell_k * B + b + ROWS, ROWS))
                if live and live2:  # both streams' 8 rows in one tall tile
                    fma_tile(act, tall_offsets(r, act.shape[1], p * W), x,
                             row_offsets(ss, x.shape[1], 0) + row_offsets(ss2, x.shape[1], 0), 1,
                             Wp[grp], p * K * W, W, K, panel_cols(act, 0, -1, p, W))
                    t += 2
                    continue
            if live:
                tile_panel(act, four_rows(r, nb), x, ss, Wp[grp], p, 0, K)
            t += 1


@parallel_njit
def _sweep_infer(out, h, c, act, lp, lpr, x, src, W, Wp, bias, U, Up, diag_off, items_off, items, parent,
                 first, last, B, D, cell, threads):
    """:func:`wavefront_infer`, a ``prange`` per hyperplane over tasks of :func:`task_items` work
    items (their input projections in fours of rows, :func:`_infer_inputs`; where cells share
    tiles, a task's projections and recurrent tiles first: :func:`_cell_inputs`,
    :func:`_cell_tiles`)."""
    L = lp.shape[0] * B  # rows of a scan's slab
    for k in range(first, last):
        cur = _rolling_parents(lp, parent, diag_off, k)
        s0 = diag_off[k]
        start, n = _plane(k, diag_off, items_off, B)
        m = U.shape[0] * n
        per = task_items(B, m, threads)
        for task in prange((m + per - 1) // per):
            t, t1 = task * per, min(m, (task + 1) * per)
            if shared_tiles(B):  # the rows of the task's cells in shared tiles, input projections too
                _cell_inputs(act, x, src, W, Wp, bias, lpr, L, cur - s0, start, n, items, B, t, t1)
                _cell_tiles(act, h, Up, lpr, L, cur - s0, start, n, items, B, t, t1)
            while t < t1:
                grp, cell_k, b, nb, taken = _tall_item(t, t1, start, n, items, B)
                _prefetch_output(out, src, t + PREFETCH_ITEMS, m, start, n, items, B)
                _infer_item(out, h, c, act, lpr, x, src[grp], W[grp], Wp[grp], bias[grp], Up[grp],
                            grp, grp * L, cur + cell_k - s0, cell_k * B + b, b, nb, B, D, cell,
                            not shared_tiles(B))
                t += taken


@njit(inline="always", **NJIT_OPTS)
def _prefetch_output(out, src, t, m, first, n, items, B):
    """Ask for the ``out`` row of work item t of a hyperplane's m (:func:`_plane`), if there is
    one, for writing. A sweep writes its output rows in grid order, not its own, so at small
    batches they lie scattered over ``out``, a cache miss each (one or two lines a row): asked
    for :data:`PREFETCH_ITEMS` items ahead, they arrive in time (3D 64^3 B1 D16 ``save=False``
    sweep 1.1x on 1 and 2 threads)."""
    if t < m:
        grp, s, b, nb = _work_item(t, first, n, items, B)
        j = src[grp, s * B + b]
        if j >= 0:
            row = (j * out.shape[1] + grp) * out.shape[2]
            prefetch_row(out, row, row + out.shape[2])


@parallel_njit
def _sweep_infer_batched(out, h, c, act, lps, lpsr, x, src, W, Wp, bias, U, Up, diag_off, parent, first,
                         last, B, D, cell):
    """:func:`wavefront_infer` in ``lps.shape[0]`` blocks of work streams, each with its own
    parents' slots ``lps[blk]`` (read through ``lpsr``, a read-only view of ``lps``), sweeping
    planes ``first .. last-1`` for its streams."""
    nblk = lps.shape[0]
    L = lps.shape[1] * B
    n = U.shape[0] * groups(B)
    for blk in prange(nblk):
        lp, lpr = lps[blk], lpsr[blk]
        t0, t1 = blk * n // nblk, (blk + 1) * n // nblk
        for k in range(first, last):
            cur = _rolling_parents(lp, parent, diag_off, k)
            for cell_k in range(diag_off[k], diag_off[k + 1]):
                slot = cur + cell_k - diag_off[k]
                for t in range(t0, t1):
                    grp, b, nb = _stream(t, B)
                    _infer_inputs(act, x, src[grp], W[grp], Wp[grp], bias[grp], grp * L + slot * B + b,
                                  cell_k * B + b, nb, np.bool_(False))
                _input_tiles(act, x, src, Wp, L, slot, cell_k, B, t0, t1)
                _tiles_items(act, h, Up, lpr, L, slot, groups(B), diag_off[:0], B, t0, t1)
                for t in range(t0, t1):
                    grp, b, nb = _stream(t, B)
                    _infer_item(out, h, c, act, lpr, x, src[grp], W[grp], Wp[grp], bias[grp], Up[grp],
                                grp, grp * L, slot, cell_k * B + b, b, nb, B, D, cell, np.bool_(False))


@njit(**NJIT_OPTS)
def _recurrent_backward(dh, dact, Ut, child, base, s, b, nb, B):
    """``dh[r] += Σ_d U_dᵀ da_child_d`` for the ``nb`` rows ``r = base + s*B + b + i``, pulled from
    the children on the finished hyperplane: the panels of ``Ut[d]`` (:func:`pack_recurrent`) as
    register tiles (every element a chain of fused multiply-adds over the G gate columns)."""
    r = base + s * B + b
    for d in range(child.shape[1]):
        ch = child[s, d]
        if ch >= 0 and nb == TALL_ROWS:
            tall_rows(dh, r, dact, base + ch * B + b, Ut[d])
        elif ch >= 0:
            tile_rows(dh, r, dact, base + ch * B + b, nb, Ut[d])


@njit(**NJIT_OPTS)
def _cell_backward(dact, dc, dh, act, c, parent, child, base, s, b, B, D, cell):
    """Row ``r = base + s*B + b``, ``dh[r]`` complete: all D units through ``row_backward``."""
    _row_backward(dact, dc, dh, act, c, parent, child, base, s, b, B, D, cell, 0, D)


def wavefront_backward(dact: np.ndarray, dc: np.ndarray, dh: np.ndarray, act: np.ndarray, c: np.ndarray,
                       U: np.ndarray, diag_off: np.ndarray, parent: np.ndarray, child: np.ndarray, B: int,
                       D: int, cell: int, *, items: tuple[np.ndarray, np.ndarray] | None = None,
                       schedule: str = "auto") -> None:
    """Backward sweep, hyperplanes in reverse (outputs dact, dc; inputs; weights; sizes; cell).

    ``dh`` (S*M*B, D) enters holding dL/dh from above and is completed in place
    with the recurrent terms. ``U`` (S, D, N*G) as in :func:`wavefront_forward`.
    Each cell *pulls* ``U_dᵀ da_child`` and ``dc_child·F_child`` from its
    children on the finished hyperplane k+1, so no two cells write the same row.
    ``items`` as in :func:`wavefront_forward`: the ``dact`` and ``dc`` of the padding's rows next
    to an item must hold zeros, since its edge cells pull from children there (:func:`zero_rows`
    on :func:`mdnumba.grid.padding_edge`).
    ``schedule`` as in :func:`wavefront_forward`.
    """
    _tiled(dh, dact)
    diag_off, parent, child = _read_only(diag_off, parent, child)
    Ut = pack_recurrent(U, parent.shape[1], transposed=True)
    nblk = batch_blocks(U.shape[0], B, diag_off, items, schedule)
    if nblk:
        _sweep_backward_batched(dact, dc, dh, act, c, U, Ut, diag_off, parent, child, B, D, cell, nblk)
    else:
        _sweep_backward(dact, dc, dh, act, c, U, Ut, diag_off, *_items_or_all(items, diag_off),
                        parent, child, B, D, cell, numba.get_num_threads())


@parallel_njit
def _sweep_backward(dact, dc, dh, act, c, U, Ut, diag_off, items_off, items, parent, child, B, D, cell,
                    threads):
    """:func:`wavefront_backward`, a ``prange`` per hyperplane; where a panel of ``Ut`` holds more
    than a chunk of steps, over blocks of up to :data:`BLOCK_ITEMS` work items (at least
    ``threads`` blocks where there are as many items), whose tiles go chunk by chunk
    (:func:`_tiles_items`: 64x64 B8 D128 train step 1.05-1.06x; the forward's panels, D steps,
    gained nothing this way, 0.82-1.03x), else over tasks of :func:`task_items` work items; where
    cells share tiles (:func:`shared_tiles`), a task's tiles go through :func:`_cell_tiles`,
    not chunked."""
    MB = parent.shape[0] * B
    chunked = Ut.shape[3] > chunk_steps(Ut)
    for k in range(diag_off.shape[0] - 2, -1, -1):
        first, n = _plane(k, diag_off, items_off, B)
        m = U.shape[0] * n
        per = max(1, min(BLOCK_ITEMS, m // threads)) if chunked else task_items(B, m, threads)
        for blk in prange((m + per - 1) // per):
            t, t1 = blk * per, min(m, (blk + 1) * per)
            if chunked and not shared_tiles(B):
                _tiles_items(dh, dact, Ut, child, MB, first, n, items, B, t, t1)
            if shared_tiles(B):
                _cell_tiles(dh, dact, Ut, child, MB, np.int64(0), first, n, items, B, t, t1)
            while t < t1:
                grp, s, b, nb, taken = _tall_item(t, t1, first, n, items, B)
                if not chunked and not shared_tiles(B):
                    _recurrent_backward(dh, dact, Ut[grp], child, grp * MB, s, b, nb, B)
                for bb in range(b, b + nb):
                    _cell_backward(dact, dc, dh, act, c, parent, child, grp * MB, s, bb, B, D, cell)
                t += taken


@parallel_njit
def _sweep_backward_batched(dact, dc, dh, act, c, U, Ut, diag_off, parent, child, B, D, cell, nblk):
    """:func:`wavefront_backward` in ``nblk`` blocks of work streams, cells in reverse order."""
    MB = parent.shape[0] * B
    n = U.shape[0] * groups(B)
    for blk in prange(nblk):
        t0, t1 = blk * n // nblk, (blk + 1) * n // nblk
        for s in range(diag_off[diag_off.shape[0] - 1] - 1, diag_off[0] - 1, -1):
            _tiles_items(dh, dact, Ut, child, MB, s, groups(B), diag_off[:0], B, t0, t1)
            for t in range(t0, t1):
                grp, b, nb = _stream(t, B)
                for bb in range(b, b + nb):
                    _cell_backward(dact, dc, dh, act, c, parent, child, grp * MB, s, bb, B, D, cell)


@parallel_njit
def weight_operands(z, xs, h, parent, B, D, rows=None):
    """``z[r] = [xs[r] | hpar[r] | 1]`` with ``hpar[r, j*N + d] = h[parent_d(s)*B + b, j]`` (0
    without parent), per scan slab: the operand of the one weight-gradient GEMM ``zᵀ @ dact =
    [dW; dU; db]`` (the CUDA twin's, :func:`mdnumba.kernels.wavefront_cuda.wavefront_backward`'s
    ``operands``; ``dact`` is read once, not once each for dW, dU and db), in the layers' (C,
    D, N, G) order. For every row r of a slab, or the rows in ``rows`` only (a padded batch's
    items: their parents are items' rows too; the padding's rows of ``z`` keep what they held).
    """
    N, C = parent.shape[1], xs.shape[1]
    MB = parent.shape[0] * B
    n = MB if rows is None else rows.size
    for i in prange(z.shape[0] // MB * n):
        lo = i // n * MB
        t = lo + selected_row(rows, i % n)
        s = (t - lo) // B
        b = t % B
        assign(z[t, :C], xs[t])
        for d in range(N):
            p = parent[s, d]
            for j in range(D):
                z[t, C + j * N + d] = h[lo + p * B + b, j] if p >= 0 else 0.0
        z[t, C + N * D] = 1.0


@parallel_njit
def skew_rows(out, inp, skew_src, unskew_src, B):
    """``out[q*R + r, f] = inp[skew_src[q, r], q % P, f]``, zeros where ``skew_src = -1``: dense
    rows ``b*M + m`` of ``inp`` (B*M, P, F) into the skewed order of every direction q, with the
    tables (S, R) and (S, B*M) of :func:`mdnumba.grid.direction_tables` (or ``state_tables``,
    whose state cells have -1); P = S (one slab per direction, e.g. dL/dh) or P = 1 (all
    directions read the same rows: the layer input).

    Done as a scatter: cell m's B rows are read once, in order, and written to rows
    ``q*R + unskew_src[q, b*M + m]``, adjacent for consecutive b (a gather reads rows spread over
    ``inp`` instead: 1.2-2x slower for one direction, 3.5x for 8, measured on 2 cores). Iteration t
    also zeroes the rows t of every slab with ``skew_src = -1`` (R >= B*M: every t has one).
    The CUDA twin (``kernels.wavefront_cuda``) gathers, a thread per output element: there the
    writes are what must be contiguous, so it takes ``skew_src`` only."""
    S, R = skew_src.shape
    n, P, F = inp.shape
    M = n // B
    for t in prange(R):
        for q in range(S):
            if skew_src[q, t] < 0:
                out[q * R + t, :] = 0
        if t < n:
            i = (t % B) * M + t // B
            for q in range(S):
                d = unskew_src[q, i]
                if d >= 0:
                    o, p = q * R + d, q % P
                    for f in range(F):
                        out[o, f] = inp[i, p, f]


@parallel_njit
def zero_padding(h, c, src):
    """``h[q*R + r] = c[q*R + r] = 0`` where ``src[q, r] = -1`` (``src`` (S, R): a padded batch's
    ``skew_src``, :func:`mdnumba.grid.direction_tables`; ``h``, ``c`` any two arrays of rows).
    The sweeps skip the padding's rows, so they hold what the buffers held before: after a
    saving forward this zeroes their h and c (backward's overflow check reads every row).
    Before the backward sweep only the rows next to the items need zeros: :func:`zero_rows`."""
    S, R = src.shape
    for t in prange(S * R):
        if src[t // R, t % R] < 0:
            h[t, :] = 0
            c[t, :] = 0


@parallel_njit
def zero_rows(a, c, rows, R):
    """``a[q*R + r] = c[q*R + r] = 0`` for the rows r in ``rows`` of every slab q of R rows (a
    padded batch's :func:`mdnumba.grid.padding_edge`, before the backward sweep: its
    ``dact`` and ``dc``)."""
    n = rows.shape[0]
    for t in prange(a.shape[0] // R * n):
        i = (t // n) * R + rows[t % n]
        a[i, :] = 0
        c[i, :] = 0


@parallel_njit
def unskew_rows(out, inp, skew_src, unskew_src):
    """``out[r, p, f] = Σ_{q ≡ p mod P} inp[q*M + unskew_src[q, r], f]`` for ``out`` (R, P, F),
    the tables (S, M) and (S, R) of :func:`mdnumba.grid.direction_tables` (M = R, or R + 2B with
    the state cells of :func:`mdnumba.grid.state_tables`): P = S puts direction q's rows back in
    grid order at channel block q (the layer output), P = 1 sums the directions in the order
    q = 0, 1, .. (dL/dx). ``unskew_src = -1`` adds nothing (padding of a padded batch: zeros).

    P = S is a scatter: skewed rows are read in order and written to ``out[skew_src[q, t], q]``
    (a gather, which reads them spread over ``inp``, took 1-2x as long for one direction, 4x for
    4 and 6x for 8, measured on 2 cores). P = 1 gathers, to add the directions in a fixed order."""
    S, M = skew_src.shape
    R, P, F = out.shape
    if P == S:
        for t in prange(M):
            for q in range(S):
                d = skew_src[q, t]
                if d >= 0:
                    for f in range(F):
                        out[d, q, f] = inp[q * M + t, f]
                if t < R and unskew_src[q, t] < 0:
                    out[t, q, :] = 0
        return
    for r in prange(R):
        out[r, 0, :] = 0
        for q in range(S):
            if unskew_src[q, r] >= 0:
                i = q * M + unskew_src[q, r]
                for f in range(F):
                    out[r, 0, f] += inp[i, f]


# ------------------------------------------------------------ 1D initial / final state
# Layout of :func:`mdnumba.grid.state_tables`: scan slab q holds rows q*R .. (q+1)*R - 1,
# R = (T+2)*B; skewed cell 0 carries the initial state, cells 1..T the steps, cell T+1 is a pad.
# State arrays are (B, S*D), direction q in columns q*D:(q+1)*D (as the layer output).
@parallel_njit
def seed_state(h, c, act, h0, c0, B):
    """Before a forward sweep of cells 1..T: cell 0 gets ``h, c = h0, c0`` and gates 0 (so its
    backward passes dL/dh, dL/dc through and adds nothing to the weight gradients); the pad
    T+1 gets h = c = 0 and gates 0 except its forget gate, 1 (the path of dL/dc_T)."""
    D = h.shape[1]
    S = h0.shape[1] // D
    R = h.shape[0] // S
    for t in prange(S * B):
        q, b = t // B, t % B
        first, pad = q * R + b, q * R + R - B + b
        for j in range(D):
            h[first, j], c[first, j] = h0[b, q * D + j], c0[b, q * D + j]
            h[pad, j], c[pad, j] = 0.0, 0.0
        for g in range(act.shape[1]):
            act[first, g] = 0.0
            act[pad, g] = 1.0 if D <= g < 2 * D else 0.0


@parallel_njit
def state_of_cell(hs, cs, h, c, cell, B):
    """``hs, cs`` = h, c of skewed cell ``cell`` of every scan (the final state: the last step's
    cell; time 0 for a reversed scan)."""
    D = h.shape[1]
    S = hs.shape[1] // D
    R = h.shape[0] // S
    for t in prange(S * B):
        q, b = t // B, t % B
        r = q * R + cell * B + b
        for j in range(D):
            hs[b, q * D + j], cs[b, q * D + j] = h[r, j], c[r, j]


@parallel_njit
def seed_state_grad(dh, dc, dact, dhT, dcT, B):
    """Before a backward sweep of cells T..0: ``dh`` of cell T += dL/dh_T; the pad T+1 gets
    ``dc = dL/dc_T`` and ``dact = 0`` (so cell T pulls exactly dL/dc_T through its forget gate 1)."""
    D = dh.shape[1]
    S = dhT.shape[1] // D
    R = dh.shape[0] // S
    for t in prange(S * B):
        q, b = t // B, t % B
        last, pad = q * R + R - 2 * B + b, q * R + R - B + b
        for j in range(D):
            dh[last, j] += dhT[b, q * D + j]
            dc[pad, j] = dcT[b, q * D + j]
        for g in range(dact.shape[1]):
            dact[pad, g] = 0.0


@parallel_njit
def take_state_grad(dh0, dc0, dh, dc, dact, B):
    """After the backward sweep: ``dh0, dc0`` = the completed dh, dc of cell 0; its ``dact`` is
    zeroed (it has no gates: its row must add nothing to the weight gradients)."""
    D = dh.shape[1]
    S = dh0.shape[1] // D
    R = dh.shape[0] // S
    for t in prange(S * B):
        q, b = t // B, t % B
        r = q * R + b
        for j in range(D):
            dh0[b, q * D + j], dc0[b, q * D + j] = dh[r, j], dc[r, j]
        for g in range(dact.shape[1]):
            dact[r, g] = 0.0
