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

from ..config import NJIT_OPTS, NJIT_PARALLEL_OPTS, NJIT_SUM_OPTS

#: rows per partial sum in :func:`matmul_at_b`; fixed so results never depend on threads
REDUCE_BLOCK = 1024


@njit(**NJIT_OPTS)
def row_product(out, r, a, ra, bmat):
    """``out[r] += a[ra] @ bmat`` (serial): one row of :func:`matmul_rows` and of the input
    projection of the saving-free forward sweep; :func:`row_pair_product` computes the same
    numbers for two rows. Eight rows of ``bmat`` per pass over ``out[r]`` (an eighth of its loads
    and stores): each pass adds ``((a0·b0 + a1·b1) + (a2·b2 + a3·b3)) + ((a4·b4 + a5·b5) +
    (a6·b6 + a7·b7))``, in k order; the last K % 8 one at a time. Callers pass ``r``, ``ra`` as
    int64, so that they share its compiled code."""
    o, x = out[r], a[ra]
    K, N = x.shape[0], bmat.shape[1]
    k = 0
    while k + 8 <= K:
        x0, x1, x2, x3 = x[k], x[k + 1], x[k + 2], x[k + 3]
        x4, x5, x6, x7 = x[k + 4], x[k + 5], x[k + 6], x[k + 7]
        b0, b1, b2, b3 = bmat[k], bmat[k + 1], bmat[k + 2], bmat[k + 3]
        b4, b5, b6, b7 = bmat[k + 4], bmat[k + 5], bmat[k + 6], bmat[k + 7]
        for n in range(N):
            o[n] += (((x0 * b0[n] + x1 * b1[n]) + (x2 * b2[n] + x3 * b3[n]))
                     + ((x4 * b4[n] + x5 * b5[n]) + (x6 * b6[n] + x7 * b7[n])))
        k += 8
    _tail_product(o, x, bmat, k)


@njit(**NJIT_OPTS)
def row_pair_product(out, r, s, a, ra, sa, bmat):
    """``out[r] += a[ra] @ bmat`` and ``out[s] += a[sa] @ bmat`` (serial; rows r != s): the sums of
    :func:`row_product`, operation for operation (the same numbers), with every load of ``bmat``
    serving both rows (half the loads of the GEMM's largest operand: 1.35-1.6x on one core, K =
    16..256, N = 80..1024). int64 indices, as for :func:`row_product`."""
    o, p, x, y = out[r], out[s], a[ra], a[sa]
    K, N = x.shape[0], bmat.shape[1]
    k = 0
    while k + 8 <= K:
        x0, x1, x2, x3 = x[k], x[k + 1], x[k + 2], x[k + 3]
        x4, x5, x6, x7 = x[k + 4], x[k + 5], x[k + 6], x[k + 7]
        y0, y1, y2, y3 = y[k], y[k + 1], y[k + 2], y[k + 3]
        y4, y5, y6, y7 = y[k + 4], y[k + 5], y[k + 6], y[k + 7]
        b0, b1, b2, b3 = bmat[k], bmat[k + 1], bmat[k + 2], bmat[k + 3]
        b4, b5, b6, b7 = bmat[k + 4], bmat[k + 5], bmat[k + 6], bmat[k + 7]
        for n in range(N):
            c0, c1, c2, c3 = b0[n], b1[n], b2[n], b3[n]
            c4, c5, c6, c7 = b4[n], b5[n], b6[n], b7[n]
            o[n] += (((x0 * c0 + x1 * c1) + (x2 * c2 + x3 * c3))
                     + ((x4 * c4 + x5 * c5) + (x6 * c6 + x7 * c7)))
            p[n] += (((y0 * c0 + y1 * c1) + (y2 * c2 + y3 * c3))
                     + ((y4 * c4 + y5 * c5) + (y6 * c6 + y7 * c7)))
        k += 8
    _tail_product(o, x, bmat, k)
    _tail_product(p, y, bmat, k)


@njit(**NJIT_OPTS)
def _tail_product(o, x, bmat, k):
    """``o += x[k:] @ bmat[k:]``, one row of ``bmat`` at a time (the K % 8 rows left over)."""
    for kk in range(k, x.shape[0]):
        v, bk = x[kk], bmat[kk]
        for n in range(bmat.shape[1]):
            o[n] += v * bk[n]


@njit(**NJIT_OPTS)
def selected_row(rows, i):
    """Row i of a selection: ``rows[i]``, or i itself for ``rows=None`` (every row)."""
    if rows is None:
        return i
    return rows[i]


@njit(**NJIT_PARALLEL_OPTS)
def matmul_rows(out, a, bmat, bias, accumulate, rows):
    """``out[r] = (out[r] if accumulate else bias) + a[r] @ bmat`` for every row r (``rows`` None) or
    the rows r in ``rows`` only (a padded batch's items; the others keep what they held).

    ``a`` (R, K), ``bmat`` (K, N), ``bias`` (N,) (ignored when accumulating). A work item is a
    pair of rows (:func:`row_pair_product`), the last one alone when their number is odd; each
    row gets the same numbers as alone.
    """
    n = a.shape[0] if rows is None else rows.shape[0]
    for i in prange((n + 1) // 2):
        r = np.int64(selected_row(rows, 2 * i))
        s = np.int64(selected_row(rows, min(2 * i + 1, n - 1)))  # = r: an odd count's last row
        if not accumulate:
            out[r, :] = bias
            out[s, :] = bias
        if s == r:
            row_product(out, r, a, r, bmat)
        else:
            row_pair_product(out, r, s, a, r, s, bmat)


@njit(**NJIT_SUM_OPTS)
def _at_b_block(part, a, bmat, rows, r0, r1, k0, k1):
    """``part[k0:k1] = (a[sel]ᵀ @ bmat[sel])[k0:k1]`` (serial) for the rows ``sel`` = entries
    r0..r1-1 of ``rows`` (None: rows r0..r1-1); k0 even, k1 even or K: four rows of ``bmat`` per
    pass over ``part``, two rows of ``part`` at a time, so each loaded ``bmat`` value serves 8
    multiply-adds (the vectorised n loop runs over contiguous rows). Every ``part[k, n]`` adds
    ``(a0·b0 + a1·b1) + (a2·b2 + a3·b3)`` per four rows, in row order (up to the fused
    multiply-adds and reassociation of :data:`~mdnumba.config.NJIT_SUM_OPTS`), whatever k0, k1."""
    part[k0:k1] = 0.0
    N = bmat.shape[1]
    i = r0
    while i + 4 <= r1:
        r, s = selected_row(rows, i), selected_row(rows, i + 1)
        t, u = selected_row(rows, i + 2), selected_row(rows, i + 3)
        b0, b1, b2, b3 = bmat[r], bmat[s], bmat[t], bmat[u]
        for k in range(k0, k1 - 1, 2):
            a0, a1, a2, a3 = a[r, k], a[s, k], a[t, k], a[u, k]
            c0, c1, c2, c3 = a[r, k + 1], a[s, k + 1], a[t, k + 1], a[u, k + 1]
            p0, p1 = part[k], part[k + 1]
            for n in range(N):
                x0, x1, x2, x3 = b0[n], b1[n], b2[n], b3[n]
                p0[n] += (a0 * x0 + a1 * x1) + (a2 * x2 + a3 * x3)
                p1[n] += (c0 * x0 + c1 * x1) + (c2 * x2 + c3 * x3)
        if (k1 - k0) % 2:  # K odd and k1 = K
            k = k1 - 1
            a0, a1, a2, a3 = a[r, k], a[s, k], a[t, k], a[u, k]
            p0 = part[k]
            for n in range(N):
                p0[n] += (a0 * b0[n] + a1 * b1[n]) + (a2 * b2[n] + a3 * b3[n])
        i += 4
    for ii in range(i, r1):
        rr = selected_row(rows, ii)
        for k in range(k0, k1):
            v = a[rr, k]
            for n in range(N):
                part[k, n] += v * bmat[rr, n]


@njit(**NJIT_OPTS)
def _k_slice(j, nk, K):
    """Slice j of ``nk`` of the K rows of a weight gradient: even bounds (whole pairs of rows
    for :func:`_at_b_block`), the last one up to K."""
    pairs = K // 2
    return 2 * (j * pairs // nk), (K if j == nk - 1 else 2 * ((j + 1) * pairs // nk))


def matmul_at_b(out, a, bmat, rows) -> None:
    """``out += aᵀ @ bmat`` with ``a`` (R, K), ``bmat`` (R, N), ``out`` (K, N); over every row
    (``rows`` None) or those in ``rows`` (ints; e.g. a padded batch's items, where the padding's
    rows add zeros). ``rows`` has no default: an omitted argument and None would be two
    specialisations, each compiled.

    Rows are cut into blocks of :data:`REDUCE_BLOCK`; blocks run in parallel
    into private partials which are then added in block order. Fewer blocks than two per
    thread are also cut along K (:func:`_k_slice`: an 8x8 B16 D16 layer's dU has 1024 rows,
    one block: 0.068 ms on one thread, 0.047 cut in two); each sum is the same either way, so
    the numbers do not depend on the thread count.
    """
    nblk = -(-(a.shape[0] if rows is None else rows.shape[0]) // REDUCE_BLOCK)
    nk = max(1, min(a.shape[1] // 2, -(-2 * numba.get_num_threads() // max(nblk, 1))))
    _matmul_at_b(out, a, bmat, rows, nk)


@njit(**NJIT_PARALLEL_OPTS)
def _matmul_at_b(out, a, bmat, rows, nk):
    """:func:`matmul_at_b` with its row blocks cut into ``nk`` slices along K each."""
    R, K = (a.shape[0] if rows is None else rows.shape[0]), a.shape[1]
    nblk = (R + REDUCE_BLOCK - 1) // REDUCE_BLOCK
    parts = np.empty((nblk, K, bmat.shape[1]), dtype=out.dtype)
    for t in prange(nblk * nk):
        q = t // nk
        k0, k1 = _k_slice(t % nk, nk, K)
        _at_b_block(parts[q], a, bmat, rows, q * REDUCE_BLOCK, min(R, (q + 1) * REDUCE_BLOCK), k0, k1)
    for q in range(nblk):
        out += parts[q]


@njit(**NJIT_PARALLEL_OPTS)
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
