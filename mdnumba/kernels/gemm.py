"""Hand-written parallel GEMMs for the work outside the wavefront sweep.

Everything runs on Numba's one thread pool: mixing NumPy's multi-threaded BLAS
with Numba's parallel sweeps made the two pools fight on small machines
(4x slower train steps on 2 cores). Results do not depend on the thread count:
reductions use a fixed split into blocks, summed in a fixed order.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..config import NJIT_OPTS, NJIT_PARALLEL_OPTS, NJIT_SUM_OPTS

#: rows per partial sum in :func:`matmul_at_b`; fixed so results never depend on threads
REDUCE_BLOCK = 1024


@njit(**NJIT_OPTS)
def row_product(out, r, a, ra, bmat):
    """``out[r] += a[ra] @ bmat`` (serial; one row of :func:`matmul_rows`, also the input
    projection of the saving-free forward sweep, which thus computes the same numbers; both
    pass ``r``, ``ra`` as int64, so that they share its compiled code). Eight rows of ``bmat`` per
    pass over ``out[r]`` (an eighth of its loads and stores): each pass adds ``((a0·b0 + a1·b1)
    + (a2·b2 + a3·b3)) + ((a4·b4 + a5·b5) + (a6·b6 + a7·b7))``, in k order; the last K % 8 one at
    a time."""
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
    for kk in range(k, K):
        v, bk = x[kk], bmat[kk]
        for n in range(N):
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

    ``a`` (R, K), ``bmat`` (K, N), ``bias`` (N,) (ignored when accumulating).
    """
    if rows is None:  # (one prange over a selection that may be None does not parallelise)
        for i in prange(a.shape[0]):
            _bias_and_product(out, np.int64(i), a, bmat, bias, accumulate)
    else:
        for i in prange(rows.shape[0]):
            _bias_and_product(out, np.int64(rows[i]), a, bmat, bias, accumulate)


@njit(**NJIT_OPTS)
def _bias_and_product(out, r, a, bmat, bias, accumulate):
    """Row r of :func:`matmul_rows`."""
    if not accumulate:
        out[r, :] = bias
    row_product(out, r, a, r, bmat)


@njit(**NJIT_SUM_OPTS)
def _at_b_block(part, a, bmat, rows, r0, r1):
    """``part = a[sel]ᵀ @ bmat[sel]`` (serial) for the rows ``sel`` = entries r0..r1-1 of ``rows``
    (None: rows r0..r1-1): four rows of ``bmat`` per pass over ``part``, two rows of ``part`` at
    a time, so each loaded ``bmat`` value serves 8 multiply-adds (the vectorised n loop runs
    over contiguous rows). Every ``part[k, n]`` adds ``(a0·b0 + a1·b1) + (a2·b2 + a3·b3)`` per
    four rows, in row order (up to the fused multiply-adds and reassociation of
    :data:`~mdnumba.config.NJIT_SUM_OPTS`)."""
    part[...] = 0.0
    K, N = a.shape[1], bmat.shape[1]
    i = r0
    while i + 4 <= r1:
        r, s = selected_row(rows, i), selected_row(rows, i + 1)
        t, u = selected_row(rows, i + 2), selected_row(rows, i + 3)
        b0, b1, b2, b3 = bmat[r], bmat[s], bmat[t], bmat[u]
        for k in range(0, K - 1, 2):
            a0, a1, a2, a3 = a[r, k], a[s, k], a[t, k], a[u, k]
            c0, c1, c2, c3 = a[r, k + 1], a[s, k + 1], a[t, k + 1], a[u, k + 1]
            p0, p1 = part[k], part[k + 1]
            for n in range(N):
                x0, x1, x2, x3 = b0[n], b1[n], b2[n], b3[n]
                p0[n] += (a0 * x0 + a1 * x1) + (a2 * x2 + a3 * x3)
                p1[n] += (c0 * x0 + c1 * x1) + (c2 * x2 + c3 * x3)
        if K % 2:
            k = K - 1
            a0, a1, a2, a3 = a[r, k], a[s, k], a[t, k], a[u, k]
            p0 = part[k]
            for n in range(N):
                p0[n] += (a0 * b0[n] + a1 * b1[n]) + (a2 * b2[n] + a3 * b3[n])
        i += 4
    for ii in range(i, r1):
        rr = selected_row(rows, ii)
        for k in range(K):
            v = a[rr, k]
            for n in range(N):
                part[k, n] += v * bmat[rr, n]


@njit(**NJIT_PARALLEL_OPTS)
def matmul_at_b(out, a, bmat, rows):
    """``out += aᵀ @ bmat`` with ``a`` (R, K), ``bmat`` (R, N), ``out`` (K, N); over every row
    (``rows`` None) or those in ``rows`` (ints; e.g. a padded batch's items, where the padding's
    rows add zeros). ``rows`` has no default: an omitted argument and None would be two
    specialisations, each compiled.

    Rows are cut into blocks of :data:`REDUCE_BLOCK`; blocks run in parallel
    into private partials which are then added in block order.
    """
    R = a.shape[0] if rows is None else rows.shape[0]
    nblk = (R + REDUCE_BLOCK - 1) // REDUCE_BLOCK
    parts = np.empty((nblk, a.shape[1], bmat.shape[1]), dtype=out.dtype)
    for q in prange(nblk):
        _at_b_block(parts[q], a, bmat, rows, q * REDUCE_BLOCK, min(R, (q + 1) * REDUCE_BLOCK))
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
