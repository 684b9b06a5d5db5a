"""The CPU GEMM helpers (mdnumba/kernels/gemm.py) against float64 NumPy, on shapes that hit
every branch: rows not a multiple of a chunk or of the reduction block, K not a multiple of 4
or 8, K = 1, N below, at and past the register tile's width."""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from numba import njit

from mdnumba.kernels.gemm import (
    PACK_ROWS,
    REDUCE_BLOCK,
    _matmul_at_b,
    _matmul_at_b_wide,
    column_sums,
    count_nonfinite,
    matmul_at_b,
    matmul_rows,
    rows_product,
)
from mdnumba.kernels.simd import TALL_ROWS, fma_tile, four_rows, pack_panels, tile_width

SHAPES = [(1, 1, 1), (3, 1, 5), (4, 2, 3), (7, 3, 4), (6, 19, 7), (5, 15, 6), (REDUCE_BLOCK + 5, 5, 6),
          (2 * REDUCE_BLOCK, 4, 9), (37, 9, 45), (REDUCE_BLOCK + 3, 8, 70),
          (2 * PACK_ROWS + 3, 6, 517), (37, 9, 1024)]  # wide rows of bmat: packed, a partial panel or none


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("R,K,N", SHAPES)
def test_matmul_at_b_and_column_sums(R, K, N, dtype, tol, rng):
    a = rng.standard_normal((R, K)).astype(dtype)
    b = rng.standard_normal((R, N)).astype(dtype)
    out0 = rng.standard_normal((K, N)).astype(dtype)
    out = out0.copy()
    matmul_at_b(out, a, b, None)
    want = out0.astype(float) + a.astype(float).T @ b.astype(float)
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol * np.sqrt(R))
    s0 = rng.standard_normal(N).astype(dtype)
    s = s0.copy()
    column_sums(s, b, None)
    np.testing.assert_allclose(s, s0 + b.astype(float).sum(0), rtol=tol, atol=tol * np.sqrt(R))


@pytest.mark.parametrize("R,K,N", SHAPES)
def test_matmul_at_b_and_column_sums_over_selected_rows(R, K, N, rng):
    """``rows``: those rows only (a padded batch's items), in any order, or none."""
    a, b = rng.standard_normal((R, K)), rng.standard_normal((R, N))
    for rows in (np.flatnonzero(rng.random(R) < 0.6), np.arange(R)[::-1].copy(), np.empty(0, np.int64)):
        out, s = np.ones((K, N)), np.ones(N)
        matmul_at_b(out, a, b, rows)
        column_sums(s, b, rows)
        np.testing.assert_allclose(out, 1 + a[rows].T @ b[rows], rtol=1e-12, atol=1e-12 * np.sqrt(R))
        np.testing.assert_allclose(s, 1 + b[rows].sum(0), rtol=1e-12, atol=1e-12 * np.sqrt(R))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("R,K,N", [(REDUCE_BLOCK + 70, 9, 45), (130, 33, 80), (5, 3, 17),
                                   (2 * REDUCE_BLOCK + 9, 6, 5)])
def test_weight_gradient_gathered_rows_give_the_numbers_in_place(R, K, N, dtype, rng):
    """Rows read where they are (C-contiguous, every row) and rows copied first (a selection,
    arrays of another layout) go through the same tiles in the same order: a selection gives
    bit for bit the in-place numbers of its rows taken out, and Fortran-ordered ``a`` or
    ``bmat`` those of the C-ordered ones."""
    a, b = rng.standard_normal((R, K)).astype(dtype), rng.standard_normal((R, N)).astype(dtype)
    rows = np.flatnonzero(rng.random(R) < 0.6)
    for x, y, sel, like in ((a, b, rows, (a[rows], b[rows])), (np.asfortranarray(a), b, None, (a, b)),
                            (a, np.asfortranarray(b), None, (a, b))):
        want, got = np.ones((K, N), dtype), np.ones((K, N), dtype)
        matmul_at_b(want, *like, None)
        matmul_at_b(got, x, y, sel)
        assert np.array_equal(got, want)
    np.testing.assert_allclose(got, 1 + a.astype(float).T @ b, rtol=1e-4, atol=1e-4 * np.sqrt(R))


@pytest.mark.parametrize("R,K,N", SHAPES)
def test_matmul_rows(R, K, N, rng):
    a, w, bias = rng.standard_normal((R, K)), rng.standard_normal((K, N)), rng.standard_normal(N)
    out = np.full((R, N), np.nan)
    matmul_rows(out, a, w, bias, False, None)
    np.testing.assert_allclose(out, bias + a @ w, rtol=1e-12, atol=1e-12)
    old = out.copy()
    matmul_rows(out, a, w, bias, True, None)
    np.testing.assert_allclose(out, old + a @ w, rtol=1e-12, atol=1e-12)
    rows = np.flatnonzero(rng.random(R) < 0.6)  # those rows only; the others keep what they held
    for accumulate, want in ((False, bias + a @ w), (True, 1 + a @ w)):
        out = np.ones((R, N))
        matmul_rows(out, a, w, bias, accumulate, rows)
        np.testing.assert_allclose(out[rows], want[rows], rtol=1e-12, atol=1e-12)
        assert (np.delete(out, rows, axis=0) == 1).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K", [1, 3, 4, 7, 8, 19, 64])
def test_rows_product_gives_each_row_what_it_gets_alone(K, dtype, rng):
    """Groups of 4, 3, 2 rows sharing the loads of ``bmat``: bit for bit the single-row sums
    (the saving-free sweep projects an item's rows, matmul_rows four rows at a time, the last
    group shorter), whichever rows of ``a`` and ``out`` they are; the other rows untouched."""
    a = rng.standard_normal((6, K)).astype(dtype)
    w = rng.standard_normal((K, 21)).astype(dtype)
    start = rng.standard_normal((7, 21)).astype(dtype)
    pick_out, pick_a = (5, 0, 3, 6), (4, 1, 1, 0)
    alone = start.copy()
    for r, s in zip(pick_out, pick_a):
        rows_product(alone, four_rows(r, 1), a, four_rows(s, 1), 1, w, 0)
    rows, srcs = list(pick_out), list(pick_a)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(alone[rows], start[rows] + a[srcs].astype(float) @ w, rtol=tol, atol=1e-4)
    for n in (2, 3, 4):
        group = start.copy()
        r = tuple(np.int64(pick_out[min(i, n - 1)]) for i in range(4))
        s = tuple(np.int64(pick_a[min(i, n - 1)]) for i in range(4))
        rows_product(group, r, a, s, n, w, 0)
        done = list(pick_out[:n])
        assert np.array_equal(group[done], alone[done])
        assert np.array_equal(np.delete(group, done, axis=0), np.delete(start, done, axis=0))


@njit
def _last_panel_tile(c, a, panels, rows, cols):
    """fma_tile of ``rows`` (1, 2, 4 or TALL_ROWS) rows of ``a`` onto the last ``cols`` columns
    of the last rows of ``c`` (so that the W - cols columns it may not write lie past the end of
    ``c``'s data), the last panel of ``panels``."""
    P, K, W = panels.shape
    n = c.shape[1]
    o = c.shape[0] * n - cols - (rows - 1) * n  # the first row's first column
    b0 = (P - 1) * K * W
    if rows == 1:
        fma_tile(c, (o,), a, (0,), 1, panels, b0, W, K, cols)
    elif rows == 2:
        fma_tile(c, (o, o + n), a, (0, K), 1, panels, b0, W, K, cols)
    elif rows == 4:
        fma_tile(c, (o, o + n, o + 2 * n, o + 3 * n), a, (0, K, 2 * K, 3 * K), 1, panels, b0, W, K, cols)
    else:
        fma_tile(c, (o, o + n, o + 2 * n, o + 3 * n, o + 4 * n, o + 5 * n, o + 6 * n, o + 7 * n), a,
                 (0, K, 2 * K, 3 * K, 4 * K, 5 * K, 6 * K, 7 * K), 1, panels, b0, W, K, cols)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 2, 4, TALL_ROWS])
def test_fma_tile_writes_only_the_columns_of_a_partial_panel(rows, dtype, rng):
    """A partial last panel (pack_panels pads it with zeros) adds a @ B to its ``cols`` columns
    and leaves every other element as it was: the columns past them in the same row (another
    thread's, or the next row's), and the memory past the end of the array."""
    W = tile_width(np.empty(0, dtype))
    for cols in sorted({1, W // 2 - 1, W // 2, W // 2 + 1, W - 1, W}):
        N, K = W + cols, 5  # two panels, the last one holding cols columns
        b = rng.standard_normal((K, N)).astype(dtype)
        panels = pack_panels(b)
        assert panels.shape == (2, K, W) and (panels[1, :, cols:] == 0).all()
        a = rng.standard_normal((rows, K)).astype(dtype)
        store = rng.standard_normal((rows + 1) * N + W).astype(dtype)  # W canaries past c's end
        before = store.copy()
        c = store[:(rows + 1) * N].reshape(rows + 1, N)
        _last_panel_tile(c, a, panels, rows, cols)
        want = before[:(rows + 1) * N].reshape(rows + 1, N).astype(float)
        want[1:, W:] += a.astype(float) @ b[:, W:].astype(float)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(c, want, rtol=tol, atol=tol)
        untouched = np.ones(store.shape, bool)
        untouched[:(rows + 1) * N].reshape(rows + 1, N)[1:, W:] = False
        assert np.array_equal(store[untouched], before[untouched]), cols


_GUARDED_AT_B = """
import ctypes, mmap, sys
import numpy as np
from mdnumba.kernels.gemm import matmul_at_b
dtype = np.dtype(sys.argv[1])
rng = np.random.default_rng(0)
for R, K, N in eval(sys.argv[2]):
    page = mmap.PAGESIZE
    data = -(-R * N * dtype.itemsize // page) * page
    buf = mmap.mmap(-1, data + page)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(start + data), page, 0) == 0  # PROT_NONE
    b = np.frombuffer(buf, dtype, R * N, data - R * N * dtype.itemsize).reshape(R, N)
    b[:] = rng.standard_normal((R, N))
    a = rng.standard_normal((R, K)).astype(dtype)
    out = np.zeros((K, N), dtype)
    matmul_at_b(out, a, b, None)
    np.testing.assert_allclose(out, a.astype(float).T @ b, rtol=1e-4, atol=1e-4)
print("ok")
"""


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weight_gradient_tiles_read_nothing_past_the_array(dtype):
    """The weight gradient's partial last panel reads W columns of each row of ``bmat`` in
    place (the next rows' first ones, ignored) but not past the array: ``bmat`` ends at a page
    that may not be read (``mprotect``), in a process of its own (a read there kills it), for
    rows of N < W, just under W and past it, one row to several blocks, the rows read from a
    copy spread over two chunks of rows or two blocks."""
    W = tile_width(np.empty(0, dtype))
    shapes = [(1, 3, 5), (3, 4, 1), (70, 9, W - 1), (REDUCE_BLOCK + 3, 8, W + 5), (30, 5, 3 * W + 2),
              (70, 3, 2), (REDUCE_BLOCK + 4, 3, 1)]
    run = subprocess.run([sys.executable, "-c", _GUARDED_AT_B, dtype, repr(shapes)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("R,K,N", [(37, 13, 77), (16, 4, 64), (5, 1, 33), (70, 40, 200)])
def test_matmul_rows_tiles_give_the_numbers_of_single_rows(R, K, N, dtype, rng):
    """The register tiles of fma_tile (panels of columns, the last one partial; rows in fours,
    repeated at a block's end) and quad_product (untiled: not C-contiguous, or K < 4): bit for
    bit the chains of a row alone, over every row or a selection, C-contiguous or not; close to
    float64 NumPy."""
    a, w = rng.standard_normal((R, K)).astype(dtype), rng.standard_normal((K, N)).astype(dtype)
    bias = rng.standard_normal(N).astype(dtype)
    alone = np.empty((R, N), dtype)
    for r in range(R):
        alone[r] = bias
        rows_product(alone, four_rows(r, 1), a, four_rows(r, 1), 1, w, 0)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(alone, bias + a.astype(float) @ w, rtol=tol, atol=tol * np.sqrt(K))
    out = np.full((R, N), np.nan, dtype)
    matmul_rows(out, a, w, bias, False, None)
    assert np.array_equal(out, alone)
    rows = np.flatnonzero(rng.random(R) < 0.6)
    out = np.ones((R, N), dtype)
    matmul_rows(out, a, w, bias, False, rows)
    assert np.array_equal(out[rows], alone[rows]) and (np.delete(out, rows, axis=0) == 1).all()
    wide = np.zeros((R, 2 * N), dtype)
    matmul_rows(wide[:, ::2], a, w, bias, False, None)  # not C-contiguous: rows_product only
    assert np.array_equal(wide[:, ::2], alone)
    out = alone.copy()
    matmul_rows(out, a, w, bias, True, None)
    np.testing.assert_allclose(out, alone + a.astype(float) @ w, rtol=tol, atol=tol * np.sqrt(K))


def test_python_twin_of_fma_tile_gives_the_numbers_of_single_rows():
    """Under NUMBA_DISABLE_JIT=1 the intrinsics' pure-Python twins run: matmul_rows' tiles (a
    partial last panel too) give rows_product's numbers bit for bit there as well (the same
    chain in t order, neither fused)."""
    code = """if True:
        import numpy as np
        from mdnumba.kernels.gemm import matmul_rows, rows_product
        from mdnumba.kernels.simd import four_rows
        rng = np.random.default_rng(0)
        a, w, b = rng.standard_normal((9, 13)), rng.standard_normal((13, 21)), rng.standard_normal(21)
        out, alone = np.empty((9, 21)), np.empty((9, 21))
        matmul_rows(out, a, w, b, False, None)
        for r in range(9):
            alone[r] = b
            rows_product(alone, four_rows(r, 1), a, four_rows(r, 1), 1, w, 0)
        assert np.array_equal(out, alone) and np.allclose(out, b + a @ w)
        print("ok")"""
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, NUMBA_DISABLE_JIT="1"),
                         capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "ok", run.stderr[-2000:]


@pytest.mark.parametrize("R,K,N", [(3 * REDUCE_BLOCK + 7, 5, 6), (REDUCE_BLOCK - 3, 9, 6),
                                   (4 * REDUCE_BLOCK + 7, 12, 64)])
def test_reductions_do_not_depend_on_thread_count(R, K, N, rng):
    """Fixed blocks summed in a fixed order: bit-identical on 1 thread and on all of them (one
    block: cut along K on several threads, not on one; five blocks, in register tiles (N = 64)
    and chunks of rows: cut so that every thread gets as many tasks on 2 to 4 threads)."""
    a = rng.standard_normal((R, K)).astype(np.float32)
    b = rng.standard_normal((a.shape[0], N)).astype(np.float32)
    results = []
    n = numba.get_num_threads()
    try:
        for threads in sorted({1, n}):
            numba.set_num_threads(threads)
            out, s = np.zeros((K, N), np.float32), np.zeros(N, np.float32)
            matmul_at_b(out, a, b, None)
            column_sums(s, b, None)
            results.append((out, s))
    finally:
        numba.set_num_threads(n)
    for out, s in results[1:]:
        assert np.array_equal(out, results[0][0]) and np.array_equal(s, results[0][1])


@pytest.mark.parametrize("K,N", [(1, 5), (2, 5), (7, 5), (10, 5), (13, 70), (8, 40)])
def test_weight_gradient_slices_along_k_change_no_sum(K, N, rng):
    """Any number of K slices (bounds at multiples of 4, the last to K) gives every element the
    same sum, over the rows in place or copied (selected rows, or ``tiled`` False)."""
    R = 2 * REDUCE_BLOCK + 6  # a last block of 6 rows
    a = rng.standard_normal((R, K)).astype(np.float32)
    b = rng.standard_normal((R, N)).astype(np.float32)
    for rows, tiled in ((None, True), (None, False), (np.flatnonzero(rng.random(R) < 0.7), True)):
        want = np.zeros((K, N), np.float32)
        _matmul_at_b(want, a, b, rows, 1, tiled)
        np.testing.assert_allclose(want, a[rows if rows is not None else slice(None)].astype(float).T
                                   @ b[rows if rows is not None else slice(None)], rtol=1e-4, atol=1e-3)
        for nk in range(2, max(K // 4, 1) + 1):
            got = np.zeros((K, N), np.float32)
            _matmul_at_b(got, a, b, rows, nk, tiled)
            assert np.array_equal(got, want), nk


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_wide_weight_gradient_does_not_depend_on_the_tasks(dtype, rng):
    """Wide rows of ``bmat`` (packed panels): per block of rows one chain per element, the blocks'
    sums added in order, bit-identical whichever tasks own which panels (a partial last panel,
    a last quad of K repeating its row, selected rows gathered while packing)."""
    R, K, N = REDUCE_BLOCK + PACK_ROWS + 9, 7, 600
    a, b = rng.standard_normal((R, K)).astype(dtype), rng.standard_normal((R, N)).astype(dtype)
    panels = -(-N // tile_width(b))
    for rows in (None, np.flatnonzero(rng.random(R) < 0.5)):
        got = []
        for ntask in (1, 2, 3, panels):
            out = np.ones((K, N), dtype)
            _matmul_at_b_wide(out, a, b, rows, ntask)
            got.append(out)
        sel = slice(None) if rows is None else rows
        np.testing.assert_allclose(got[0], 1 + a[sel].astype(float).T @ b[sel], rtol=1e-4, atol=1e-4)
        assert all(np.array_equal(g, got[0]) for g in got[1:])


def _other_width_env() -> dict:
    """This process's environment with ``MDNUMBA_VECTOR_BYTES`` the width the host does not take."""
    from mdnumba import config
    return dict(os.environ, MDNUMBA_VECTOR_BYTES="32" if config.VECTOR_BYTES == 64 else "64")


def _other_width_run(folder):
    """The tile tests in a ``python -m pytest`` subprocess at the other vector width."""
    here = os.path.dirname(__file__)
    tests = ["test_matmul_rows_tiles_give_the_numbers_of_single_rows",
             "test_weight_gradient_slices_along_k_change_no_sum",
             "test_wide_weight_gradient_does_not_depend_on_the_tasks",
             "test_weight_gradient_tiles_read_nothing_past_the_array",
             "test_weight_gradient_gathered_rows_give_the_numbers_in_place"]
    return ([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
             *(f"{here}/test_gemm.py::{t}" for t in tests)],
            _other_width_env())


@pytest.mark.slow
@pytest.mark.background(command=_other_width_run)
def test_register_tiles_of_the_other_vector_width(background_run):
    """``MDNUMBA_VECTOR_BYTES`` 32 or 64, whichever the host does not choose (AVX2's width runs
    on a CPU without AVX-512; 64 on one without is split by LLVM): the tile tests, in a fresh
    process started with the session (it compiles for 1-2 minutes), against single rows and
    float64 NumPy (the sweeps call the same tiles, with the same width from ``tile_width``; a
    whole layer here would add a minute of compiling to CI)."""
    env = _other_width_env()
    other = env["MDNUMBA_VECTOR_BYTES"]
    check = f"import mdnumba.kernels.simd as s; assert s.VECTOR_BYTES == {other}, s.VECTOR_BYTES"
    assert subprocess.run([sys.executable, "-c", check], env=env).returncode == 0
    rc = background_run.wait()
    out = background_run.output()
    assert rc == 0, out[-6000:]
    assert " passed" in out and " failed" not in out, out[-6000:]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("n", [1, REDUCE_BLOCK - 1, 3 * REDUCE_BLOCK + 7])
def test_count_nonfinite(dtype, n, rng):
    """NaN, +inf and -inf each counted once, anywhere (first and last element too), in a
    C-contiguous array, a strided view and float16 (both through NumPy); none in a finite array,
    however large its values."""
    a = rng.standard_normal((n, 3)).astype(dtype) * (np.finfo(dtype).max / 16)
    assert count_nonfinite(a) == 0
    bad = np.unique(np.concatenate([[0, a.size - 1], rng.integers(0, a.size, 5)]))
    a.reshape(-1)[bad] = np.resize(np.array([np.nan, np.inf, -np.inf], dtype), bad.size)
    assert count_nonfinite(a) == bad.size == a.size - np.isfinite(a).sum()
    assert count_nonfinite(a[:, 1:]) == np.count_nonzero(~np.isfinite(a[:, 1:]))
