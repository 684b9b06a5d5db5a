"""An explicit SIMD micro-kernel for the CPU GEMMs: a 4- or 8-row tile of the output held in
vector registers while the reduction runs.

LLVM does not keep a tile of ``out`` in registers across the k loop by itself (the output
rows may alias the operands, so each pass loads and stores them: :func:`gemm.quad_product`).
:func:`fma_tile` writes that loop in LLVM IR through a Numba intrinsic: 4 rows x 2 vectors of
accumulators (8 registers), per step ``t`` two vector loads of a packed panel of ``b``, four
broadcasts of ``a`` and eight fused multiply-adds (``llvm.fma``), no load or store of the
output. Every element is the chain ``c + a_0·b_0 + a_1·b_1 + …`` in t order, one fused
multiply-add per term: the numbers of :func:`gemm.quad_product`, bit for bit.

Vectors are :data:`VECTOR_BYTES` wide: 64 with AVX-512 (16 float32), else 32, so that the
8 accumulators, 2 operands and a broadcast fit in the 16 registers of AVX2
(``MDNUMBA_VECTOR_BYTES`` chooses; LLVM splits wider vectors than the CPU has). A tile is
:func:`tile_width` columns; :func:`pack_panels` lays ``b`` out as such column panels,
contiguous along t. With 64-byte vectors the kernels also take tall tiles of 8 rows
(:data:`TALL_TILES`: 16 accumulators of AVX-512's 32 registers, each load of ``b`` serving 16
fused multiply-adds instead of 8) wherever 8 rows share the step's operands.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import config as numba_config
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import config
from ..config import NJIT_OPTS

#: bytes per vector register of :func:`fma_tile` (:data:`mdnumba.config.VECTOR_BYTES`)
VECTOR_BYTES = config.VECTOR_BYTES
#: rows of a tile
TILE_ROWS = 4
#: rows of a tall tile (:func:`tall_offsets`, :func:`tall_panel`)
TALL_ROWS = 8
#: whether the kernels take tall tiles where they can: with 64-byte vectors, whose 32 registers
#: (AVX-512) hold their 16 accumulators (each panel load then serves 16 fused multiply-adds:
#: 1.1x the rate of 4 rows in L1, one core of a Xeon); AVX2's 16 registers would spill
TALL_TILES = VECTOR_BYTES == 64
#: fewest steps (K) for which a tile pays: below, its loads and stores of the output outweigh
#: the few multiply-adds between them
TILE_MIN_STEPS = 4
#: bytes of a panel's steps that a pass over several groups of rows reads from L1 (:func:`chunk_steps`)
PANEL_CHUNK_BYTES = 32768


@njit(inline="always", **NJIT_OPTS)
def tile_width(x):
    """Columns of a tile for arrays of ``x``'s dtype: two vectors (32 float32 with AVX-512)."""
    return 2 * VECTOR_BYTES // x.itemsize


@intrinsic
def prefetch_row(typingctx, a, start, stop):
    """Ask for the cache lines of elements ``start`` and ``stop - 1`` of ``a``'s data (a row
    that may straddle two lines) for writing (``llvm.prefetch``: a hint, nothing is read or
    written; no bounds check, the caller's)."""
    if not isinstance(a, types.Array):
        return None
    sig = types.void(a, start, stop)

    def codegen(context, builder, sig, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        data = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=args[0]).data
        one = ir.Constant(args[2].type, 1)
        for index in (args[1], builder.sub(args[2], one)):  # rw = 1 (write), locality 3, data cache
            ptr = builder.bitcast(builder.gep(data, [index]), i8p)
            builder.call(fn, [ptr, ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def fma_tile(typingctx, c, crow, a, arow, a_cs, b, b0, b_rs, T, cols):
    """``c[crow[i] + n] += Σ_{t<T} a[arow[i] + t·a_cs] · b[b0 + t·b_rs + n]`` for the rows i (1, 2,
    4 or :data:`TALL_ROWS`: the tuples' length) and the columns ``n < min(cols, W)``, W =
    :func:`tile_width`: element offsets into the arrays' data (no bounds checks: the caller's),
    ``b`` e.g. a packed panel (``b_rs`` = W, :func:`pack_panels`). ``c`` is read and written
    through a mask of those columns (``llvm.masked.load``/``store``: a panel's last columns past
    the end of a row are not touched, so another thread may own them), ``b`` in full: W columns
    of every step must be readable (a packed panel's padding). A repeated row gets the same
    numbers each time (all loads happen before the stores)."""
    if not all(isinstance(x, types.Array) for x in (c, a, b)) or not (c.dtype == a.dtype == b.dtype):
        return None
    if not all(isinstance(x, types.BaseTuple) for x in (crow, arow)) or not \
            len(crow) == len(arow) in (1, 2, TILE_ROWS, TALL_ROWS):  # (8: compiled also where not taken)
        return None
    R = len(crow)
    dtype = c.dtype
    sig = types.void(c, crow, a, arow, a_cs, b, b0, b_rs, T, cols)

    def codegen(context, builder, sig, args):
        ft = context.get_value_type(dtype)
        size = dtype.bitwidth // 8
        lanes = VECTOR_BYTES // size
        vt, i64, i32 = ir.VectorType(ft, lanes), ir.IntType(64), ir.IntType(32)
        mt = ir.VectorType(ir.IntType(1), lanes)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt] * 3),
                                             f"llvm.fma.v{lanes}f{dtype.bitwidth}")
        cp, ap, bp = (cgutils.create_struct_proxy(sig.args[i])(context, builder, value=args[i]).data
                      for i in (0, 2, 5))
        vp = vt.as_pointer()
        suffix = f"v{lanes}f{dtype.bitwidth}"
        mload = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vp, i32, mt, vt]),
                                               f"llvm.masked.load.{suffix}")
        void = ir.VoidType()
        mstore = cgutils.get_or_insert_function(builder.module, ir.FunctionType(void, [vt, vp, i32, mt]),
                                                f"llvm.masked.store.{suffix}")

        def int64(j, i):  # entry i of tuple argument j
            return context.cast(builder, builder.extract_value(args[j], i), sig.args[j].types[i], types.int64)

        crows, arows = ([int64(j, i) for i in range(R)] for j in (1, 3))
        acs, b0_, brs, steps, ncols = (context.cast(builder, args[i], sig.args[i], types.int64)
                                       for i in (4, 6, 7, 8, 9))

        def vec(base, off):
            return builder.bitcast(builder.gep(base, [off]), vp)

        undef, zeros = ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(i32, lanes), None)
        lane = ir.Constant(ir.VectorType(i64, lanes), list(range(lanes)))
        masks = []  # lane n of vector v: column v·lanes + n < cols
        for v in range(2):
            left = builder.insert_element(ir.Constant(ir.VectorType(i64, lanes), ir.Undefined),
                                          builder.sub(ncols, i64(v * lanes)), i32(0))
            left = builder.shuffle_vector(left, left, zeros)
            masks.append(builder.icmp_signed("<", lane, left))
        full = builder.icmp_signed(">=", ncols, i64(2 * lanes))
        acc = [cgutils.alloca_once(builder, vt) for _ in range(2 * R)]  # promoted to registers by LLVM

        def each_vector(body):
            """body(masked, i, v, pointer) for each output vector: plain loads and stores for a
            whole tile (always masked, 1D D32 T200 B16 inference took 1.08x, one A/B across
            processes), masked ones for a partial tile."""
            with builder.if_else(full, likely=True) as (whole, part):
                for masked, block in ((False, whole), (True, part)):
                    with block:
                        for i in range(R):
                            for v in range(2):
                                body(masked, i, v, vec(cp, builder.add(crows[i], i64(v * lanes))))

        each_vector(lambda masked, i, v, ptr: builder.store(
            builder.call(mload, [ptr, i32(size), masks[v], undef]) if masked
            else builder.load(ptr, align=size), acc[2 * i + v]))
        with cgutils.for_range(builder, steps) as loop:
            t = loop.index
            brow = builder.add(b0_, builder.mul(t, brs))
            bv = [builder.load(vec(bp, builder.add(brow, i64(v * lanes))), align=size) for v in range(2)]
            at = builder.mul(t, acs)
            for i in range(R):
                s = builder.load(builder.gep(ap, [builder.add(arows[i], at)]))
                s = builder.insert_element(undef, s, i32(0))
                splat = builder.shuffle_vector(s, undef, zeros)
                for v in range(2):
                    slot = acc[2 * i + v]
                    builder.store(builder.call(fma, [splat, bv[v], builder.load(slot)]), slot)
        each_vector(lambda masked, i, v, ptr: builder.call(
            mstore, [builder.load(acc[2 * i + v]), ptr, i32(size), masks[v]]) if masked
            else builder.store(builder.load(acc[2 * i + v]), ptr, align=size))
        return context.get_dummy_value()

    return sig, codegen


if numba_config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1: intrinsics do not run as Python; these do
    def prefetch_row(a, start, stop):  # noqa: F811 (a hint: nothing to do)
        """:func:`prefetch_row` in Python: nothing."""

    def fma_tile(c, crow, a, arow, a_cs, b, b0, b_rs, T, cols):  # noqa: F811
        """:func:`fma_tile` in Python, on flat views of the C-contiguous arrays: the same chain
        ``c + a_0·b_0 + a_1·b_1 + …`` in t order (not fused), all loads before the stores."""
        cf, af, bf = c.reshape(-1), a.reshape(-1), b.reshape(-1)
        n = min(cols, 2 * VECTOR_BYTES // c.itemsize)
        sums = [cf[o:o + n].copy() for o in crow]
        for t in range(T):
            for acc, q in zip(sums, arow):
                acc += af[q + t * a_cs] * bf[b0 + t * b_rs:b0 + t * b_rs + n]
        for o, v in zip(crow, sums):
            cf[o:o + n] = v


@njit(**NJIT_OPTS)
def pack_panels(b):
    """``b`` (K, N) as panels (ceil(N / W), K, W) of W = :func:`tile_width` columns, each
    contiguous along K; the last one's columns past N are zeros. Serial: a copy of the weights,
    no fork."""
    W = tile_width(b)
    out = np.zeros(((b.shape[1] + W - 1) // W, b.shape[0], W), b.dtype)
    for p in range(out.shape[0]):
        for k in range(out.shape[1]):
            for n in range(min(W, b.shape[1] - p * W)):
                out[p, k, n] = b[k, p * W + n]
    return out


@njit(inline="always", **NJIT_OPTS)
def panel_cols(out, ocol, ncol, p, W):
    """Columns of panel p (width W) that :func:`fma_tile` writes in a product whose columns are
    ``ocol .. ocol + ncol - 1`` of ``out`` (``ncol`` < 0: to the end of its rows)."""
    end = out.shape[1] if ncol < 0 else ocol + ncol
    return min(W, end - ocol - p * W)


@njit(inline="always", **NJIT_OPTS)
def four_rows(first, n):
    """The 4-tuple ``first, first+1, …`` of int64 for a group of ``n`` (1 .. 4) rows, the last
    one repeated to fill it (the unused entries of a tile or of :func:`gemm.quad_product`)."""
    return (np.int64(first), np.int64(first + min(1, n - 1)), np.int64(first + min(2, n - 1)),
            np.int64(first + min(3, n - 1)))


@njit(inline="always", **NJIT_OPTS)
def row_offsets(rows, stride, col):
    """Element offsets ``rows[i]·stride + col`` of a 4-tuple of rows (the row starts of
    :func:`fma_tile`'s arguments)."""
    return (rows[0] * stride + col, rows[1] * stride + col, rows[2] * stride + col, rows[3] * stride + col)


@njit(inline="always", **NJIT_OPTS)
def tall_offsets(first, stride, col):
    """Element offsets ``(first + i)·stride + col`` of the :data:`TALL_ROWS` consecutive rows of
    a tall tile (:func:`fma_tile`'s row starts)."""
    o = first * stride + col
    return (o, o + stride, o + 2 * stride, o + 3 * stride, o + 4 * stride, o + 5 * stride,
            o + 6 * stride, o + 7 * stride)


@njit(**NJIT_OPTS)
def tile_rows(out, r, a, s, nb, panels, ocol=0, acol=0, ncol=-1):
    """``out[r+i, ocol : ocol + N] += a[s+i, acol : acol + K] @ B`` for the ``nb`` (1 .. 4)
    consecutive rows i, B's N columns packed in the panels (P, K, W) (:func:`pack_panels`; N =
    ``ncol``, < 0: to the end of ``out``'s rows): one :func:`group_panel` per panel."""
    for p in range(panels.shape[0]):
        group_panel(out, r, a, s, nb, panels, p, 0, panels.shape[1], ocol, acol, ncol)


@njit(inline="always", **NJIT_OPTS)
def group_panel(out, r, a, s, nb, panels, p, k0, k1, ocol=0, acol=0, ncol=-1):
    """:func:`quad_panel` for the ``nb`` (1 .. 4) consecutive rows ``r ..`` of ``out`` and ``s ..``
    of ``a``."""
    quad_panel(out, four_rows(r, nb), a, four_rows(s, nb), nb, panels, p, k0, k1, ocol, acol, ncol)


@njit(inline="always", **NJIT_OPTS)
def quad_panel(out, ro, a, ra, nb, panels, p, k0, k1, ocol=0, acol=0, ncol=-1):
    """:func:`tile_panel`'s product for the first ``nb`` (1 .. 4) rows of the 4-tuples ``ro`` (of
    ``out``) and ``ra`` (of ``a``): one :func:`quad_tile`."""
    T, W = panels.shape[1], panels.shape[2]
    quad_tile(out, row_offsets(ro, out.shape[1], ocol + p * W), a, row_offsets(ra, a.shape[1], acol + k0), 1,
              nb, panels, (p * T + k0) * W, W, k1 - k0, panel_cols(out, ocol, ncol, p, W))


@njit(inline="always", **NJIT_OPTS)
def quad_tile(c, co, a, ao, a_cs, nb, b, b0, b_rs, T, cols):
    """:func:`fma_tile` for the first ``nb`` (1 .. 4) entries of the 4-tuples of element offsets
    ``co`` (rows of ``c``) and ``ao`` (of ``a``): a tile of 1, 2 or 4 rows (3: the last
    repeated), so that a lone row or a pair does its own multiply-adds, not a whole tile's
    (batch 1, a 512x512 image: each row took 4 rows' work). Every element's chain is the same
    in each."""
    if nb == 1:
        fma_tile(c, (co[0],), a, (ao[0],), a_cs, b, b0, b_rs, T, cols)
    elif nb == 2:
        fma_tile(c, (co[0], co[1]), a, (ao[0], ao[1]), a_cs, b, b0, b_rs, T, cols)
    else:
        fma_tile(c, co, a, ao, a_cs, b, b0, b_rs, T, cols)


@njit(**NJIT_OPTS)
def tall_rows(out, r, a, s, panels, ocol=0, acol=0, ncol=-1):
    """:func:`tile_rows` for the :data:`TALL_ROWS` consecutive rows ``r ..`` of ``out`` and
    ``s ..`` of ``a``: one tall tile per panel (:func:`tall_panel`)."""
    for p in range(panels.shape[0]):
        tall_panel(out, r, a, s, panels, p, 0, panels.shape[1], ocol, acol, ncol)


@njit(**NJIT_OPTS)
def group_tiles(out, r, a, s, nb, panels, ocol=0, acol=0, ncol=-1):
    """:func:`tile_rows` for ``nb`` (1 .. :data:`TALL_ROWS`) consecutive rows: :func:`tall_rows`
    for TALL_ROWS rows where :data:`TALL_TILES`, else fours and the rest (the Grid LSTM's work
    items; the wavefront sweeps, whose groups are 4 rows or a pair of them, branch themselves)."""
    if nb <= 4:
        tile_rows(out, r, a, s, nb, panels, ocol, acol, ncol)
    elif TALL_TILES and nb == TALL_ROWS:
        tall_rows(out, r, a, s, panels, ocol, acol, ncol)
    else:
        tile_rows(out, r, a, s, np.int64(4), panels, ocol, acol, ncol)  # no literal: see mdnumba.kernels
        tile_rows(out, r + 4, a, s + 4, nb - 4, panels, ocol, acol, ncol)


@njit(**NJIT_OPTS)
def tile_quad(out, ro, a, ra, nb, panels, ocol=0, acol=0, ncol=-1):
    """``out[ro[i], ocol : ocol + N] += a[ra[i], acol : acol + K] @ B`` for the first ``nb`` (1 ..
    4) entries of the 4-tuples of rows ``ro``, ``ra`` (the others repeat the last), B the panels
    (P, K, W) (:func:`pack_panels`; N as in :func:`tile_rows`), ``out`` and ``a`` C-contiguous:
    one :func:`quad_panel` per panel."""
    for p in range(panels.shape[0]):
        quad_panel(out, ro, a, ra, nb, panels, p, 0, panels.shape[1], ocol, acol, ncol)


@njit(inline="always", **NJIT_OPTS)
def tile_panel(out, ro, a, ra, panels, p, k0, k1, ocol=0, acol=0, ncol=-1):
    """``out[ro[i], ocol + p·W : ocol + p·W + w] += a[ra[i], acol + k0 : acol + k1] @ panels[p,
    k0:k1, :w]`` (panel p of a product over ``ncol`` columns, its steps k0 .. k1-1; w =
    :func:`panel_cols`, less than W in a partial last panel): one :func:`fma_tile`."""
    T, W = panels.shape[1], panels.shape[2]
    fma_tile(out, row_offsets(ro, out.shape[1], ocol + p * W), a, row_offsets(ra, a.shape[1], acol + k0), 1,
             panels, (p * T + k0) * W, W, k1 - k0, panel_cols(out, ocol, ncol, p, W))


@njit(inline="always", **NJIT_OPTS)
def tall_panel(out, ro, a, ra, panels, p, k0, k1, ocol=0, acol=0, ncol=-1):
    """:func:`tile_panel` for the :data:`TALL_ROWS` consecutive rows ``ro ..`` of ``out`` and
    ``ra ..`` of ``a``: one tall :func:`fma_tile`."""
    T, W = panels.shape[1], panels.shape[2]
    fma_tile(out, tall_offsets(ro, out.shape[1], ocol + p * W), a, tall_offsets(ra, a.shape[1], acol + k0), 1,
             panels, (p * T + k0) * W, W, k1 - k0, panel_cols(out, ocol, ncol, p, W))


@njit(inline="always", **NJIT_OPTS)
def chunk_steps(panels):
    """Steps of a panel of ``panels`` in :data:`PANEL_CHUNK_BYTES` (256 float32 with AVX-512)."""
    return PANEL_CHUNK_BYTES // (panels.shape[-1] * panels.itemsize)
