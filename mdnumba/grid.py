"""Wavefront index tables for an N-dimensional grid.

Cells of a grid with shape ``dims = (n_1, ..., n_N)`` are renumbered so that the
cells of each anti-diagonal hyperplane ``i_1 + ... + i_N = k`` are contiguous
("skewed layout"); inside a hyperplane they keep row-major order. Every parent
of a cell on hyperplane ``k`` (the neighbour one step back along dimension d)
lies on hyperplane ``k - 1``, every child on ``k + 1``. Kernels therefore sweep
``k = 0 .. K-1`` with ``K = sum(n_d - 1) + 1`` and treat all cells of one
hyperplane in parallel.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from typing import TypeVar

    _T = TypeVar("_T")

#: bytes the tables cached by each :func:`table_cache` function may hold; the most recent entry
#: is kept even when larger (a 2048x2048 grid's :func:`wavefront` tables alone take 96 MiB)
TABLE_CACHE_BYTES = 512 * 2**20
#: of which the tables of padded batches (a call with ``sizes``) may hold at most this much: their
#: items' sizes seldom repeat (random pages padded to one shape added ~3 MiB of tables per batch)
PADDED_TABLE_CACHE_BYTES = 64 * 2**20
#: batch rows per work item of the CPU sweeps (consecutive items of one cell, whose recurrent
#: products share every load of U: :mod:`mdnumba.kernels.wavefront`); :func:`live_items` groups
#: a padded batch's live rows alike. A constant, not a setting: the kernels compile it in (and
#: unroll their loops for groups of 4, 2 and 1 rows)
ROWS = 4


def index_dtype(bound: int) -> type:
    """The dtype of index tables whose entries lie in ``[-1, bound)``: int32 (half the memory
    of int64, and on the GPU half the loads and registers) unless ``bound`` passes 2**31 - 1.
    The kernels widen every index to int64 before doing arithmetic with it."""
    return np.int32 if int(bound) < 2**31 else np.int64


def _nbytes(value: object) -> int:
    """Bytes of the arrays in a table result: an array, or tuples and dataclasses of them."""
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    if isinstance(value, tuple):
        return sum(_nbytes(v) for v in value)
    if dataclasses.is_dataclass(value):
        return sum(_nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


def table_cache(fn: Callable[..., _T]) -> Callable[..., _T]:
    """``functools.lru_cache`` bounded by the bytes of what it holds, not by a count: images of
    many sizes (e.g. inference on pages of different widths) must not pile up GiBs of tables.
    Least recently used entries go first once the total passes :data:`TABLE_CACHE_BYTES`, or
    that of the calls with ``sizes`` (padded batches) :data:`PADDED_TABLE_CACHE_BYTES`;
    ``cache_clear()`` and ``cache_bytes()`` as the names say. A call is keyed on its arguments
    with the defaults filled in, however passed: ``direction_tables(dims, B, S)`` and
    ``direction_tables(dims, B, S, None)`` share one entry (as two, a layer's first call built
    tables the caller had built already, and both stayed in the cache)."""
    entries: OrderedDict = OrderedDict()  # key -> (value, bytes, padded)
    lock = threading.Lock()
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def cached(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        key = tuple(bound.arguments.values())
        with lock:
            if key in entries:
                entries.move_to_end(key)
                return entries[key][0]
        value = fn(*args, **kwargs)
        with lock:
            entries[key] = (value, _nbytes(value), bound.arguments.get("sizes") is not None)
            _evict(entries, TABLE_CACHE_BYTES)
            _evict(entries, PADDED_TABLE_CACHE_BYTES, padded_only=True)
        return value

    cached.cache_clear = entries.clear
    cached.cache_bytes = lambda: sum(size for _, size, _ in entries.values())
    return cached


def _evict(entries: OrderedDict, budget: int, padded_only: bool = False) -> None:
    """Drop the least recently used entries (``padded_only``: of padded batches' tables) until
    they hold at most ``budget`` bytes, keeping the newest entry however large."""
    chosen = [key for key, (_, _, padded) in entries.items() if padded or not padded_only]
    total = sum(entries[key][1] for key in chosen)
    for key in chosen:
        if total <= budget or key == next(reversed(entries)):
            break
        total -= entries.pop(key)[1]


@dataclass(frozen=True)
class Wavefront:
    """Index tables of one grid shape (all arrays of :func:`index_dtype` ``(n_cells + 1)``:
    int32 below 2**31 cells; read-only).

    Attributes:
        dims: grid shape.
        perm: ``perm[s]`` = row-major flat index of skewed cell ``s``.
        inv_perm: inverse of ``perm``.
        diag_off: ``diag_off[k]:diag_off[k+1]`` are the skewed cells of hyperplane k.
        parent: ``parent[s, d]`` = skewed index of the neighbour at ``i_d - 1``, or -1.
        child: ``child[s, d]`` = skewed index of the neighbour at ``i_d + 1``, or -1.
    """

    dims: tuple
    perm: np.ndarray
    inv_perm: np.ndarray
    diag_off: np.ndarray
    parent: np.ndarray
    child: np.ndarray

    @property
    def n_cells(self) -> int:
        """Cells of the grid (``prod(dims)``)."""
        return int(self.perm.shape[0])

    @property
    def n_diagonals(self) -> int:
        """Anti-diagonal hyperplanes K (``sum(n_d - 1) + 1``)."""
        return int(self.diag_off.shape[0] - 1)

    @property
    def max_diag_cells(self) -> int:
        """Cells of the largest hyperplane."""
        return int(np.diff(self.diag_off).max())


@table_cache
def wavefront(dims: tuple) -> Wavefront:
    """Build (and cache) the :class:`Wavefront` tables for grid shape ``dims``."""
    dims = tuple(int(n) for n in dims)
    if not dims or min(dims) < 1:
        raise ValueError(f"grid dimensions must all be >= 1, got {dims}")
    it = index_dtype(int(np.prod(dims)) + 1)  # also for the temporaries: half the peak in int32
    coords = np.indices(dims, dtype=it).reshape(len(dims), -1)  # (N, M), row-major
    level = coords.sum(axis=0, dtype=it)
    perm = np.argsort(level, kind="stable").astype(it)
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(perm.size, dtype=it)
    n_diag = int(sum(n - 1 for n in dims)) + 1
    diag_off = np.zeros(n_diag + 1, dtype=np.int64)
    diag_off[1:] = np.cumsum(np.bincount(level, minlength=n_diag))
    strides = _strides(dims, it)
    parent = np.full((perm.size, len(dims)), -1, dtype=it)
    child = np.full((perm.size, len(dims)), -1, dtype=it)
    skew_coords = coords[:, perm]
    for d in range(len(dims)):
        has_parent = skew_coords[d] > 0
        parent[has_parent, d] = inv_perm[perm[has_parent] - strides[d]]
        has_child = skew_coords[d] < dims[d] - 1
        child[has_child, d] = inv_perm[perm[has_child] + strides[d]]
    return Wavefront(dims, *_index_tables(perm.size + 1, perm, inv_perm, diag_off, parent, child))


def _strides(dims: tuple, dtype: type) -> np.ndarray:
    """Row-major strides of a grid ``dims``, in cells."""
    return np.array([int(np.prod(dims[d + 1:])) for d in range(len(dims))], dtype=dtype)


def _index_tables(bound: int, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """``arrays`` (entries in ``[-1, bound)``) as read-only contiguous :func:`index_dtype` copies."""
    out = tuple(np.ascontiguousarray(a, dtype=index_dtype(bound)) for a in arrays)
    for arr in out:
        arr.setflags(write=False)
    return out


@table_cache  # 8 B per row and direction (the 2D float32 activations: 28·D B)
def direction_tables(dims: tuple, batch: int, directions: int = 1,
                     sizes: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row tables between dense ``(B, *dims)`` rows (``b*M + m``, M cells) and the skewed rows
    ``s*B + b`` of each scan direction q (q mirrors the axes of its set bits), read-only, of
    :func:`index_dtype` ``(M*B)``:

    - ``skew_src[q, s*B + b] = b*M + flip_q(perm[s])``: the dense row skewed row ``s*B + b`` of
      direction q reads;
    - ``unskew_src[q, b*M + m] = inv_perm[flip_q(m)]*B + b``: the skewed row (in q's slab) that
      dense row ``b*M + m`` comes from.

    ``flip_q`` is an involution on the cells, so the two are inverse permutations per q. Used by
    the skew/unskew kernels of both backends (``kernels.wavefront``, ``kernels.wavefront_cuda``).

    ``sizes`` (B tuples of N extents, ``1 <= sizes[b][d] <= dims[d]``; None: every item fills
    the grid): item b occupies the box ``[0, sizes[b])`` and the rest is padding. ``flip_q``
    then mirrors item b's axes within its box (``i -> sizes[b][d] - 1 - i``), so that each scan
    starts at a corner of the item and meets the padding only after the item's cells (whose
    parents all lie in the item): rows outside the box are -1 both ways (zero input, zero output).
    """
    wf = wavefront(tuple(dims))
    M, B, N = wf.n_cells, int(batch), len(wf.dims)
    it = index_dtype(M * B)  # also for the temporaries, one box's at a time
    strides, rows = _strides(wf.dims, it), np.arange(B, dtype=it)
    grid_c = np.indices(wf.dims, dtype=it).reshape(N, -1)  # row-major cell m -> its N coordinates
    skew, unskew = np.empty((directions, M, B), it), np.empty((directions, B, M), it)  # [q, s, b], [q, b, m]
    ext = np.broadcast_to(np.asarray(wf.dims if sizes is None else sizes, dtype=it).reshape(-1, N), (B, N))
    boxes, which = np.unique(ext, axis=0, return_inverse=True)  # items of one box share its rows
    for q in range(directions):
        flip = np.array([(q >> d) & 1 for d in range(N)], dtype=bool)[:, None]
        for u, box in enumerate(boxes):
            items = rows[which.reshape(-1) == u]
            inside, mirror = _mirrored(grid_c, box, flip, strides)  # of row-major cell m
            block = mirror[wf.perm][:, None] + items * it(M)  # skewed rows (s, the items) <- dense rows
            block[~inside[wf.perm]] = -1
            skew[q][:, items] = block
            block = wf.inv_perm[np.where(inside, mirror, 0)] * it(B) + items[:, None]
            block[:, ~inside] = -1
            unskew[q][items] = block
    return _index_tables(M * B, skew.reshape(directions, -1), unskew.reshape(directions, -1))


def _mirrored(coords: np.ndarray, box: tuple | np.ndarray, flip: np.ndarray,
              strides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For cells at ``coords`` (N, M): whether each lies in the item's box ``[0, box)``, and the
    row-major cell of its mirror within that box along the ``flip`` axes (outside the box: any)."""
    box = np.asarray(box, dtype=coords.dtype)[:, None]
    inside = (coords < box).all(axis=0)
    return inside, strides @ np.where(flip, box - 1 - coords, coords)


@table_cache  # 4 B per live (cell, group of batch items)
def live_items(dims: tuple, batch: int, sizes: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The work of a padded batch's CPU sweeps without its padding: ``(offsets, items)``, read-only,
    of :func:`index_dtype`. ``items[offsets[k]:offsets[k+1]]`` are hyperplane k's live rows as
    work items ``ROWS*(s*B + b) + (nb - 1)``: skewed cell s for batch items ``b .. b+nb-1`` (1 <= nb
    <= :data:`ROWS` consecutive items that all have cell s: the kernels share each weight load
    within a group, taken from each run of such items' start), every live row exactly once, in
    row order.

    A cell is live for item b when its coordinates lie in the item's box ``[0, sizes[b])``: in
    every scan direction alike, since :func:`direction_tables` mirrors the item within that box.
    The kernels leave the other rows alone (no item's cell reads them)."""
    wf = wavefront(tuple(dims))
    M, B, N = wf.n_cells, int(batch), len(wf.dims)
    ext = np.array(sizes, dtype=np.int64).reshape(B, N)
    coords = np.indices(wf.dims).reshape(N, -1)[:, wf.perm]  # skewed cell -> coordinates
    live = (coords[:, :, None] < ext.T[:, None, :]).all(axis=0)  # (M, B)
    b = np.arange(B)
    run_start = np.maximum.accumulate(np.where(live, 0, b + 1), axis=1)  # of each run of live items
    run_end = np.minimum.accumulate(np.where(live, B, b)[:, ::-1], axis=1)[:, ::-1]  # first not live
    head = live & ((b - run_start) % ROWS == 0)  # groups from each run's start; the last may be short
    s, first = np.nonzero(head)
    items = ROWS * (s * B + first) + np.minimum(ROWS, run_end[s, first] - first) - 1
    offsets = np.concatenate([[0], np.cumsum(head.sum(axis=1))])[wf.diag_off]
    return _index_tables(ROWS * M * B, offsets, items)


@table_cache  # 4 B per padding row next to an item
def padding_edge(dims: tuple, batch: int, sizes: tuple) -> np.ndarray:
    """The padding's rows that the backward sweep of a padded batch reads: rows ``s*B + b``
    (ascending, read-only, :func:`index_dtype`) of the cells s outside item b's box
    ``[0, sizes[b])`` with a parent inside it, i.e. one coordinate equal to the item's size
    along that axis and the others inside. In every scan direction alike (:func:`live_items`);
    their ``dact`` and ``dc`` must hold zeros, the rest of the padding is never read."""
    wf = wavefront(tuple(dims))
    M, B, N = wf.n_cells, int(batch), len(wf.dims)
    ext = np.array(sizes, dtype=np.int64).reshape(B, N).T[:, None, :]  # (N, 1, B)
    coords = np.indices(wf.dims).reshape(N, -1)[:, wf.perm][:, :, None]  # (N, M, 1), skewed cells
    inside, on_edge = coords < ext, coords == ext
    edge = (on_edge & (inside.sum(axis=0) == N - 1)).any(axis=0)  # (M, B)
    return _index_tables(M * B, np.flatnonzero(edge))[0]


@table_cache
def state_tables(steps: int, batch: int, directions: int = 1) -> tuple[Wavefront, np.ndarray, np.ndarray]:
    """Tables of a 1D layer whose scans start from a given state: ``(wf, skew_src, unskew_src)``.

    Every scan slab holds ``steps + 2`` skewed cells: cell 0 carries the initial state (h0, c0),
    cells 1..steps are the sequence's steps in scan order, and cell ``steps + 1`` is a pad that
    carries the gradient of the final state into the backward sweep (its forget gate is 1). ``wf``
    is the grid of ``steps + 2`` cells; ``skew_src`` (S, (steps+2)*B) and ``unskew_src``
    (S, steps*B) are :func:`direction_tables` for dense ``(B, steps)`` rows, with -1 (a row of
    zeros) for the two state cells, which have no dense row.
    """
    wf = wavefront((int(steps) + 2,))
    skew, unskew = direction_tables(wf.dims, batch, directions)
    b, m = np.divmod(skew, steps + 2)
    skew = np.where((m >= 1) & (m <= steps), b * steps + m - 1, -1)
    unskew = unskew.reshape(directions, batch, steps + 2)[:, :, 1:-1].reshape(directions, -1)
    return (wf,) + _index_tables((steps + 2) * batch, skew, unskew)
