"""Hand-written parallel GEMMs for the work outside the wavefront sweep.

Everything runs on Numba's one thread pool: mixing NumPy's multi-threaded BLAS
with Numba's parallel sweeps made the two pools fight on small machines
(4x slower train steps on 2 cores). Results do not depend on the thread count:
reductions use a fixed split into blocks, summed in a fixed order.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ..config import NJIT_CHAIN_OPTS, NJIT_OPTS
from .parallel import parallel_njit
from .simd import (
    TALL_ROWS,
    TALL_TILES,
    TILE_MIN_STEPS,
    fma_tile,
    four_rows,
    pack_panels,
    panel_cols,
    quad_tile,
    row_offsets,
    tall_offsets,
    tile_width,
)

#: rows per partial sum in :func:`matmul_at_b`; fixed so results never depend on threads
REDUCE_BLOCK = 1024
#: :func:`_at_b_block`'s register tiles read the rows of ``bmat`` where they are, which pays
#: while they are less than AT_B_TILE_BYTES apart (N = 160 float32: 1.3-1.5x); at N = 1024 the
#: tiles, 4 KB per step apart, ran at half the rate of the untiled loops then: wider rows take
#: :func:`_matmul_at_b_wide`, which packs them
AT_B_TILE_BYTES = 2048
#: rows of ``a`` and ``bmat`` that :func:`_at_b_panels` packs per pass (a panel of them: 16 KB
#: float32 with AVX-512, read by K/4 tiles from L1)
PACK_ROWS = 128
#: rows of a block that :func:`_at_b_tiles` (:func:`_at_b_gathered`: copies of them) passes over
#: all its tiles at a time: their slices of ``a`` and of a panel of ``bmat`` stay in L1 for every
#: tile (a whole block of 1024 rows at once streamed both from L2 once per tile)
AT_B_CHUNK = 64
#: rows per work item of :func:`matmul_rows` (each panel of the weights passes over them all)
MATMUL_BLOCK = 16


@njit(**NJIT_CHAIN_OPTS)
def quad_product(out, r, a, s, m, bmat, n0):
    """``out[r[i], n0:] += a[s[i]] @ bmat[:, n0:]`` for the first ``m`` (1, 2 or 4) entries of
    the 4-tuples ``r``, ``s`` of int64 row indices (serial; distinct output rows; the unused
    entries must be valid rows, e.g. repeats).

    Every element is the chain ``o + a_0·b_0 + a_1·b_1 + … + a_{K-1}·b_{K-1}`` in k order, one
    fused multiply-add per term (:data:`~mdnumba.config.NJIT_CHAIN_OPTS`), so a row gets the
    same numbers in any group, at any position and from :func:`~mdnumba.kernels.simd.fma_tile`.
    Four rows of ``bmat`` per pass over the output rows, the m rows sharing every load of
    ``bmat`` (four rows: 1.26-1.85x the rate of the pairs of rows with separate multiplies and
    adds this replaced, K = 32..256, N = 160..1024, 2 threads of a Zen 5; 1.0-1.1x on narrow
    products, N = 80)."""
    o0, o1, o2, o3 = out[r[0]], out[r[1]], out[r[2]], out[r[3]]
    x, y, z, w = a[s[0]], a[s[1]], a[s[2]], a[s[3]]
    K, n0 = bmat.shape[0], max(n0, 0)  # provably >= 0: no wrap-around check, the loops vectorise
    N = bmat.shape[1] - n0
    k = 0
    while k + 4 <= K:
        b0, b1, b2, b3 = bmat[k], bmat[k + 1], bmat[k + 2], bmat[k + 3]
        x0, x1, x2, x3 = x[k], x[k + 1], x[k + 2], x[k + 3]
        y0, y1, y2, y3 = y[k], y[k + 1], y[k + 2], y[k + 3]
        if m == 4:
            z0, z1, z2, z3 = z[k], z[k + 1], z[k + 2], z[k + 3]
            w0, w1, w2, w3 = w[k], w[k + 1], w[k + 2], w[k + 3]
            for g in range(N):
                n = n0 + g
                c0, c1, c2, c3 = b0[n], b1[n], b2[n], b3[n]
                o0[n] = o0[n] + x0 * c0 + x1 * c1 + x2 * c2 + x3 * c3
                o1[n] = o1[n] + y0 * c0 + y1 * c1 + y2 * c2 + y3 * c3
                o2[n] = o2[n] + z0 * c0 + z1 * c1 + z2 * c2 + z3 * c3
                o3[n] = o3[n] + w0 * c0 + w1 * c1 + w2 * c2 + w3 * c3
        elif m == 2:
            for g in range(N):
                n = n0 + g
                c0, c1, c2, c3 = b0[n], b1[n], b2[n], b3[n]
                o0[n] = o0[n] + x0 * c0 + x1 * c1 + x2 * c2 + x3 * c3
                o1[n] = o1[n] + y0 * c0 + y1 * c1 + y2 * c2 + y3 * c3
        else:
            for g in range(N):
                n = n0 + g
                o0[n] = o0[n] + x0 * b0[n] + x1 * b1[n] + x2 * b2[n] + x3 * b3[n]
        k += 4
    for kk in range(k, K):  # the last K % 4 rows of bmat one at a time
        bk = bmat[kk]
        for i in range(m):
            o, v = out[r[i]], a[s[i], kk]
            for g in range(N):
                o[n0 + g] = o[n0 + g] + v * bk[n0 + g]


@njit(**NJIT_OPTS)
def rows_product(out, r, a, s, n, bmat, n0):
    """``out[r[i], n0:] += a[s[i]] @ bmat[:, n0:]`` for the first ``n`` (1 .. 4) entries of the
    4-tuples ``r``, ``s``: :func:`quad_product` on all of them, or on two and then one (n = 3),
    with no literal row count (``n - 1`` for 2: see :mod:`mdnumba.kernels`)."""
    if n == 3:
        quad_product(out, r, a, s, n - 1, bmat, n0)
        quad_product(out, (r[2], r[2], r[2], r[2]), a, (s[2], s[2], s[2], s[2]), n - 2, bmat, n0)
    else:
        quad_product(out, r, a, s, n, bmat, n0)


@njit(inline="always", **NJIT_OPTS)
def assign(dst, src):
    """``dst[:] = src`` for 1-D arrays of one length (the caller's check: none here), as a plain
    (vectorised) loop: Numba's slice assignment of an array goes element by element through its
    broadcasting, 3.5-10x slower per row of 16..1024 float32 (a 3D ``save=False`` forward with
    C = 1 spent 0.5 ms of 4.2 in it)."""
    for n in range(src.shape[0]):
        dst[n] = src[n]


@njit(**NJIT_OPTS)
def selected_row(rows, i):
    """Row i of a selection: ``rows[i]``, or i itself for ``rows=None`` (every row)."""
    if rows is None:
        return i
    return rows[i]


def matmul_rows(out: np.ndarray, a: np.ndarray, bmat: np.ndarray, bias: np.ndarray, accumulate: bool,
                rows: np.ndarray | None) -> None:
    """``out[r] = (out[r] if accumulate else bias) + a[r] @ bmat`` for every row r (``rows`` None) or
    the rows r in ``rows`` only (a padded batch's items; the others keep what they held).

    ``a`` (R, K), ``bmat`` (K, N), ``bias`` (N,) (ignored when accumulating). ``bmat`` is packed
    into column panels (:func:`~mdnumba.kernels.simd.pack_panels`) for
    :func:`~mdnumba.kernels.simd.fma_tile` (the last one partial where W does not divide N);
    everything when ``out`` or ``a`` is not C-contiguous or K <
    :data:`~mdnumba.kernels.simd.TILE_MIN_STEPS` goes through :func:`rows_product`. The numbers
    are the same.
    """
    tiled = out.flags.c_contiguous and a.flags.c_contiguous and a.shape[1] >= TILE_MIN_STEPS
    panels = pack_panels(bmat) if tiled else np.empty((0, bmat.shape[0], 1), bmat.dtype)
    _matmul_rows(out, a, bmat, panels, bias, accumulate, rows)


@parallel_njit
def _matmul_rows(out, a, bmat, panels, bias, accumulate, rows):
    """:func:`matmul_rows`; a work item is :data:`MATMUL_BLOCK` rows, in tiles of four (fewer
    at the end: repeated rows), each panel of ``bmat`` passing over the whole block."""
    n, K, N = (a.shape[0] if rows is None else rows.shape[0]), a.shape[1], out.shape[1]
    P, W = panels.shape[0], panels.shape[2]
    for blk in prange((n + MATMUL_BLOCK - 1) // MATMUL_BLOCK):
        first, last = blk * MATMUL_BLOCK, min(n, (blk + 1) * MATMUL_BLOCK)
        if not accumulate:
            for i in range(first, last):
                assign(out[selected_row(rows, i)], bias)
        tall = first  # the rows before ``tall`` in tall tiles: consecutive rows, not a selection
        if TALL_TILES and rows is None:
            tall = last - (last - first) % TALL_ROWS
        for p in range(P):
            for i in range(first, tall, TALL_ROWS):
                fma_tile(out, tall_offsets(i, N, p * W), a, tall_offsets(i, K, 0), 1, panels, p * K * W, W, K,
                         panel_cols(out, 0, N, p, W))
            for i in range(tall, last, 4):
                r = selected_four(rows, i, min(4, last - i))
                fma_tile(out, row_offsets(r, N, p * W), a, row_offsets(r, K, 0), 1, panels, p * K * W, W, K,
                         panel_cols(out, 0, N, p, W))
        if P == 0:  # untiled (the panels cover every column)
            for i in range(first, last, 4):
                c = min(4, last - i)
                r = selected_four(rows, i, c)
                rows_product(out, r, a, r, c, bmat, P * W)


@njit(inline="always", **NJIT_OPTS)
def selected_four(rows, i, c):
    """Rows i .. i+c-1 of a selection (:func:`selected_row`) as a 4-tuple of int64 (:func:`four_rows`)."""
    q = four_rows(i, c)
    return (np.int64(selected_row(rows, q[0])), np.int64(selected_row(rows, q[1])),
            np.int64(selected_row(rows, q[2])), np.int64(selected_row(rows, q[3])))


@njit(**NJIT_OPTS)
def _at_b_block(part, a, bmat, rows, r0, r1, k0, k1, tiled):
    """``part[k0:k1] = (a[sel]ᵀ @ bmat[sel])[k0:k1]`` (serial) for the rows ``sel`` = entries
    r0..r1-1 of ``rows`` (None: rows r0..r1-1).

    Every element by register tiles, a chain of fused multiply-adds over the rows in order:
    with ``tiled`` (every row, C-contiguous ``a`` and ``bmat``) over the rows where they are
    (:func:`_at_b_tiles`), else over copies of :data:`AT_B_CHUNK` of them at a time
    (:func:`_at_b_gathered`). The same numbers either way, whatever the slicing."""
    part[k0:k1] = 0.0
    if tiled and rows is None:
        _at_b_tiles(part, a, bmat, r0, r1, k0, k1)
    else:
        _at_b_gathered(part, a, bmat, rows, r0, r1, k0, k1)


@njit(**NJIT_OPTS)
def _at_b_gathered(part, a, bmat, rows, r0, r1, k0, k1):
    """:func:`_at_b_block` over copies of :data:`AT_B_CHUNK` rows of the selection at a time
    (:func:`selected_row`): ``a``'s columns k0 .. k1-1, and ``bmat``'s rows padded with zeros to
    whole panels of W = :func:`~mdnumba.kernels.simd.tile_width` columns, through the tiles of
    :func:`_at_b_panel` (a padded batch's live rows, or arrays that are not C-contiguous).
    Against the untiled loops it replaced, 55% of 16k rows: K = 97, N = 80 1.12x, K = 34 1.19x,
    K = 129, N = 256 1.25x, K = 33, N = 256 0.9x, K = 3 0.94x (2 threads of an AMD EPYC)."""
    N, W = bmat.shape[1], tile_width(part)
    P = (N + W - 1) // W
    ga = np.empty((AT_B_CHUNK, k1 - k0), part.dtype)
    gb = np.zeros((AT_B_CHUNK, P * W), part.dtype)
    for c0 in range(r0, r1, AT_B_CHUNK):
        steps = min(r1, c0 + AT_B_CHUNK) - c0
        for t in range(steps):
            r = selected_row(rows, c0 + t)
            for k in range(k0, k1):
                ga[t, k - k0] = a[r, k]
            for j in range(N):
                gb[t, j] = bmat[r, j]
        for p in range(P):  # ga's column k - k0 holds a's column k: offset -k0
            _at_b_panel(part, p * W, min(W, N - p * W), ga, -k0, k0, k1, gb, p * W, P * W, steps)


@njit(inline="always", **NJIT_OPTS)
def tail_rows(N, W):
    """How many last rows of a C-contiguous array of rows of N would have a read of W columns
    from the start of their partial last panel (N % W columns, :func:`_at_b_tiles`) pass the
    array's end: ``ceil((W − N % W) / N)`` (< W), 0 where W divides N."""
    rest = N % W
    return (W - rest + N - 1) // N if rest else 0


@njit(**NJIT_OPTS)
def _at_b_tiles(part, a, bmat, r0, r1, k0, k1):
    """``part[k0:k1] += a[r0:r1, k0:k1]ᵀ @ bmat[r0:r1]`` as register tiles, :data:`AT_B_CHUNK`
    rows at a time, over panels of W = :func:`~mdnumba.kernels.simd.tile_width` columns of
    ``bmat`` read in place. A partial last panel's tile reads W columns of each step (the next
    rows' first ones, ignored) and writes only its own; the last rows of ``bmat``, where that
    would read past the array (:func:`tail_rows`), have their last N % W columns copied into
    ``tail`` (zeros past them), and their steps come last, as in place."""
    K, N, W = a.shape[1], bmat.shape[1], tile_width(part)
    P, rest = N // W, N % W
    tail = np.zeros((tail_rows(N, W), W), part.dtype)
    safe = bmat.shape[0] - tail.shape[0]  # rows before it read in place
    for r in range(r0, r1, AT_B_CHUNK):
        steps = min(r1, r + AT_B_CHUNK) - r
        for p in range(P):
            _at_b_panel(part, p * W, W, a, r * K, k0, k1, bmat, r * N + p * W, N, steps)
        inplace = max(0, min(steps, safe - r))  # of them, read in place in the last panel
        if rest and inplace:
            _at_b_panel(part, P * W, rest, a, r * K, k0, k1, bmat, r * N + P * W, N, inplace)
        if rest and inplace < steps:
            for t in range(inplace, steps):
                for j in range(rest):
                    tail[t - inplace, j] = bmat[r + t, P * W + j]
            _at_b_panel(part, P * W, rest, a, (r + inplace) * K, k0, k1, tail, np.int64(0), W,
                        steps - inplace)  # np.int64(0): no literal (see mdnumba.kernels)


@njit(**NJIT_OPTS)
def _at_b_panel(part, col, cols, a, a0, k0, k1, b, b0, b_rs, T):
    """``part[k, col : col + cols] += Σ_{t<T} a_flat[a0 + t·K + k] · b_flat[b0 + t·b_rs : …]``
    for the rows k0 <= k < k1 of ``part`` (K = ``a``'s columns; W columns of every step of ``b``
    readable, W = :func:`~mdnumba.kernels.simd.tile_width`): tall tiles where
    :data:`~mdnumba.kernels.simd.TALL_TILES`, then fours, the last 1 .. 3 rows a tile of their own
    (:func:`~mdnumba.kernels.simd.quad_tile`)."""
    K, N = a.shape[1], part.shape[1]
    k = k0
    if TALL_TILES:
        while k + TALL_ROWS <= k1:
            fma_tile(part, tall_offsets(k, N, col), a, tall_offsets(a0 + k, 1, 0), K, b, b0, b_rs, T, cols)
            k += TALL_ROWS
    while k < k1:
        nb = min(4, k1 - k)
        quad_tile(part, row_offsets(four_rows(k, nb), N, col), a, four_rows(a0 + k, nb), K, nb, b, b0, b_rs,
                  T, cols)
        k += 4


@njit(**NJIT_OPTS)
def _k_slice(j, nk, K):
    """Slice j of ``nk`` of the K rows of a weight gradient: bounds at multiples of 4 (whole
    register tiles for :func:`_at_b_block`), the last one up to K."""
    quads = K // 4
    return 4 * (j * quads // nk), (K if j == nk - 1 else 4 * ((j + 1) * quads // nk))


def matmul_at_b(out: np.ndarray, a: np.ndarray, bmat: np.ndarray, rows: np.ndarray | None) -> None:
    """``out += aᵀ @ bmat`` with ``a`` (R, K), ``bmat`` (R, N), ``out`` (K, N); over every row
    (``rows`` None) or those in ``rows`` (ints; e.g. a padded batch's items, where the padding's
    rows add zeros). ``rows`` has no default: an omitted argument and None would be two
    specialisations, each compiled.

    Rows are cut into blocks of :data:`REDUCE_BLOCK`, each summed into a private partial, and the
    partials are added in block order. Rows of ``bmat`` of :data:`AT_B_TILE_BYTES` or more: the
    threads split ``out``'s columns and go through the blocks in turn (:func:`_matmul_at_b_wide`).
    Else the blocks run in parallel, and fewer blocks than two per thread are also cut along K
    (:func:`_k_slice`: an 8x8 B16 D16 layer's dU has 1024 rows, one block: 0.068 ms on one
    thread, 0.047 cut in two), as are blocks that the threads cannot share to within 5% (5 blocks
    on 2 threads: 10 tasks, 1.14-1.21x for 5 or 7 blocks). Each sum is the same either way, so
    the numbers do not depend on the thread count.
    """
    if a.shape[0] != bmat.shape[0] or out.shape != (a.shape[1], bmat.shape[1]):  # (tiles check no bounds)
        raise ValueError(f"matmul_at_b: out {out.shape} += aᵀ @ bmat needs out (K, N), a (R, K), "
                         f"bmat (R, N); got a {a.shape}, bmat {bmat.shape}")
    if bmat.shape[1] * bmat.itemsize >= AT_B_TILE_BYTES:
        _matmul_at_b_wide(out, a, bmat, rows, numba.get_num_threads())
        return
    nblk = -(-(a.shape[0] if rows is None else rows.shape[0]) // REDUCE_BLOCK)
    threads, most = numba.get_num_threads(), max(1, a.shape[1] // 4)
    nk = min(most, -(-2 * threads // max(nblk, 1)))
    while nk < most and -(-nblk * nk // threads) * threads > 1.05 * nblk * nk:  # the threads' shares
        nk += 1  # within 5% of each other
    _matmul_at_b(out, a, bmat, rows, nk, a.flags.c_contiguous and bmat.flags.c_contiguous)


@parallel_njit
def _matmul_at_b(out, a, bmat, rows, nk, tiled):
    """:func:`matmul_at_b` with its row blocks cut into ``nk`` slices along K each."""
    R, K = (a.shape[0] if rows is None else rows.shape[0]), a.shape[1]
    nblk = (R + REDUCE_BLOCK - 1) // REDUCE_BLOCK
    parts = np.empty((nblk, K, bmat.shape[1]), dtype=out.dtype)
    for t in prange(nblk * nk):
        q = t // nk
        k0, k1 = _k_slice(t % nk, nk, K)
        _at_b_block(parts[q], a, bmat, rows, q * REDUCE_BLOCK, min(R, (q + 1) * REDUCE_BLOCK), k0, k1, tiled)
    for q in range(nblk):
        out += parts[q]


@parallel_njit
def _matmul_at_b_wide(out, a, bmat, rows, ntask):
    """:func:`matmul_at_b` for wide rows of ``bmat``: ``ntask`` tasks (at most one per panel),
    each owning a run of the column panels of ``out`` (W = :func:`~mdnumba.kernels.simd.tile_width`
    columns; the last one partial if W does not divide N) and every row of it. Per block of
    :data:`REDUCE_BLOCK` rows a task's tiles sum into its zeroed partial (:func:`_at_b_panels`),
    which is then added to ``out``: the blocks and the order of their sums of
    :func:`_matmul_at_b`, whatever the tasks (one chain over all rows was 20x less precise at
    524288 rows). Rows of ``bmat`` 4 KB apart: 1.5-1.6x the untiled loops then, K = 128..256, N =
    512..1024, 2 threads of a Xeon."""
    R = a.shape[0] if rows is None else rows.shape[0]
    K, N = out.shape
    W = tile_width(out)
    P = (N + W - 1) // W
    ntask = min(ntask, P)
    for j in prange(ntask):
        p0, p1 = j * P // ntask, (j + 1) * P // ntask
        n0, n1 = p0 * W, min(N, p1 * W)
        ap = np.empty(((K + 3) // 4, PACK_ROWS, 4), out.dtype)
        bp = np.zeros((p1 - p0, PACK_ROWS, W), out.dtype)  # zeros: a partial panel's columns past N
        part = np.empty((K, (p1 - p0) * W), out.dtype)
        for r0 in range(0, R, REDUCE_BLOCK):
            part[:] = 0.0
            _at_b_panels(part, a, bmat, rows, r0, min(R, r0 + REDUCE_BLOCK), p0, ap, bp)
            for k in range(K):  # (as a slice operation 1.7x as long)
                for n in range(n1 - n0):
                    out[k, n0 + n] += part[k, n]


@njit(**NJIT_OPTS)
def _at_b_panels(part, a, bmat, rows, r0, r1, p0, ap, bp):
    """``part += (a[sel]ᵀ @ bmat[sel])[:, p0·W : p0·W + part's columns]`` over the entries r0 ..
    r1-1 of the selection (:func:`selected_row`): per :data:`PACK_ROWS` rows, ``a``'s packed as
    ``ap[q, t, i]`` (k = 4q + i, the last quad repeating row K-1) and ``bmat``'s panels as ``bp``
    (:func:`_pack_at_b`), then a register tile (:func:`~mdnumba.kernels.simd.fma_tile`) per quad
    of rows and panel, each element a chain of fused multiply-adds in row order."""
    K, C = part.shape
    Q, RC, W = ap.shape[0], ap.shape[1], bp.shape[2]
    qt = Q - Q % 2 if TALL_TILES else 0  # quads before qt in pairs
    for c0 in range(r0, r1, RC):
        T = min(r1, c0 + RC) - c0
        _pack_at_b(ap, bp, a, bmat, rows, c0, T, p0)
        for p in range(bp.shape[0]):
            for q in range(0, qt, 2):  # two quads in one tall tile
                fma_tile(part, row_offsets(four_rows(4 * q, K - 4 * q), C, p * W) +
                         row_offsets(four_rows(4 * q + 4, K - 4 * q - 4), C, p * W), ap,
                         four_rows(q * RC * 4, 4) + four_rows((q + 1) * RC * 4, 4), 4, bp, p * RC * W, W, T,
                         W)
            for q in range(qt, Q):
                fma_tile(part, row_offsets(four_rows(4 * q, K - 4 * q), C, p * W), ap,
                         four_rows(q * RC * 4, 4), 4, bp, p * RC * W, W, T, W)


@njit(**NJIT_OPTS)
def _pack_at_b(ap, bp, a, bmat, rows, c0, T, p0):
    """Rows ``c0 .. c0+T-1`` of the selection (:func:`selected_row`) packed for :func:`_at_b_panels`:
    ``ap[q, t, i] = a[r_t, min(4q + i, K-1)]``, ``bp[p, t, n] = bmat[r_t, (p0 + p)·W + n]`` for the
    columns below N (the others keep their zeros)."""
    K, N = a.shape[1], bmat.shape[1]
    W = bp.shape[2]
    for t in range(T):
        r = selected_row(rows, c0 + t)
        for q in range(ap.shape[0]):
            for i in range(4):
                ap[q, t, i] = a[r, min(4 * q + i, K - 1)]
        for p in range(bp.shape[0]):
            n0 = (p0 + p) * W
            for n in range(min(W, N - n0)):
                bp[p, t, n] = bmat[r, n0 + n]


@parallel_njit
def column_sums(out, a, rows):
    """``out += Σ_r a[r]`` (over ``rows`` unless None) with the same fixed blocking as :func:`matmul_at_b`."""
    R = a.shape[0] if rows is None else rows.shape[0]
    nblk = (R + REDUCE_BLOCK - 1) // REDUCE_BLOCK
    parts = np.zeros((nblk, a.shape[1]), dtype=out.dtype)
    for q in prange(nblk):
        for i in range(q * REDUCE_BLOCK, min(R, (q + 1) * REDUCE_BLOCK)):
            r = selected_row(rows, i)
            for n in range(a.shape[1]):
                parts[q, n] += a[r, n]
    for q in range(nblk):
        out += parts[q]


@njit(**NJIT_OPTS)
def scatter_add_rows(out, ids, rows):
    """``out[ids[i]] += rows[i]`` for every i in order (repeated ids add up: ``np.add.at``, whose
    rows took 65x as long, 0.79 ms of a char-LM step at B32 T50 D78; the same sums)."""
    for i in range(ids.shape[0]):
        k = ids[i]
        for d in range(rows.shape[1]):
            out[k, d] += rows[i, d]


def count_nonfinite(a: np.ndarray) -> int:
    """How many elements of ``a`` are NaN or ±inf: one pass over a C-contiguous float32/float64
    array, NumPy otherwise. ``np.isfinite(c.min()) and np.isfinite(c.max())``, the state check of
    every forward and backward, took two (1.08 vs 0.61 ms over 16 MiB on a Xeon; ``np.isfinite``
    makes a temporary). Serial: the pass is memory-bound, and on 2 threads it took 1.03 ms."""
    if a.dtype not in (np.float32, np.float64) or not a.flags.c_contiguous:
        return int(a.size - np.count_nonzero(np.isfinite(a)))
    return int(_count_nonfinite(a.reshape(-1)))


@njit(**NJIT_OPTS)
def _count_nonfinite(a):
    """:func:`count_nonfinite` of a 1D array."""
    bad = 0
    for i in range(a.shape[0]):
        bad += not np.isfinite(a[i])
    return bad
