"""The ``tensor`` layout of the CUDA sweeps: their recurrent sums on tensor cores, in 3xTF32.

What bounds the other layouts is their instructions per multiply-add: 1.3 to 3.5 in their hot
loops (bench/results/cuda_kernels.md), so a float32 sweep reaches a fraction of the GPU's FP32
peak, and issue 5's targets ask for about half of it (docs/gpu.md, "How far from the targets"). One warp-wide
``mma.sync.aligned.m16n8k8`` does 1024 multiply-adds in one instruction, on operands in TF32
(float32 with a 10-bit mantissa). A product in TF32 alone is off by up to ~1e-3 relative;
here each one is made of three (the 3xTF32 split, as CUTLASS's "fast accurate" float32 GEMMs
do): ``a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi`` with ``x_hi = tf32(x)``, ``x_lo = tf32(x − x_hi)``
(:func:`tf32`: rounded to nearest), leaving out ``a_lo·b_lo`` (~2⁻²² relative): about as
accurate as float32 arithmetic itself.

Work split (the sliced layout's, :mod:`mdnumba.kernels.wavefront_cuda`, with mma tiles):
block ``(q*nJ + slice)*nO + o`` owns a slice of hidden units of scan q (forward :data:`UNITS` = 8,
the n of one mma; backward :data:`BACKWARD_TILES` such tiles) and the 16-row tiles ``o, o + nO,
..`` of each hyperplane's rows of that scan (consecutive rows ``r = s*B + b``); its warps take
those tiles in turn. For a tile, a warp computes 16x8 products over the rows' neighbours
(:func:`_tile_sums`): forward, every gate block g, ``a[r, g*D + j] = act[r, g*D + j] + Σ_d Σ_k
h[parent_d(r), k] · U[q, k, d*G + g*D + j]`` (:func:`_tile_forward`); backward, the pull ``dh[r,
j] += Σ_d Σ_g dact[child_d(r), g] · UT[q, g, d*D + j]`` (:func:`_tile_backward`). Each lane then
holds what the cell math of its 2 rows x 2 units (per tile) needs and runs it on registers (the
register cells of :mod:`mdnumba.kernels.wavefront_cuda`). The block's slice of U (UT) sits in
shared memory for the whole sweep, already split and in fragment order
(:func:`_stage_fragments`): one 16-byte load per lane gives both halves of its B fragment.

Fragments of ``mma.m16n8k8.row.col`` with TF32 operands (PTX ISA), lane = 4*group + t:
A (16x8) ``a0 = A[group, t]``, ``a1 = A[group+8, t]``, ``a2 = A[group, t+4]``,
``a3 = A[group+8, t+4]``; B (8x8) ``b0 = B[t, group]``, ``b1 = B[t+4, group]``; C and D
``c0 = C[group, 2t]``, ``c1 = C[group, 2t+1]``, ``c2 = C[group+8, 2t]``, ``c3 = C[group+8, 2t+1]``.

Under numba's CUDA simulator :func:`mma` is played by the warp's 32 threads meeting at a
barrier and each computing its 4 outputs from all lanes' fragments, by that definition, in
float32: it checks that the kernels put each value in the lane and register the instruction
expects; the instruction's own rounding and summation order is the GPU's. Float32 layers of
1 to 3 dimensions only; the others, and the saving-free sweep, run in :data:`FALLBACK`'s layouts
(said in the path description).
"""

from __future__ import annotations

import os
import sys
import threading

import numba
import numpy as np
from numba import cuda

from .. import config
from .wavefront_cuda import (
    _JIT,
    CELL_MATH,
    GATE_CHUNK,
    RECURRENT_SUM,
    SIMULATOR,
    _at,
    _backward_prologue_synced,
    _cell1_backward,
    _cell2_backward,
    _cell3_backward,
    _coop_cap,
    _divmod,
    _item_shared_limit,
    _last_block,
    _load4,
    _load4_row,
    _load_tile,
    _opt_in_shared,
    _register_forward,
    _sm_count,
    _store_part,
    _store_parts_sum,
    _unskew,
)

#: columns of an mma's product (n of mma.m16n8k8: hidden units), rows per tile (m), steps of k per mma
UNITS, TILE_ROWS, KSTEP, WARP = 8, 16, 8, 32
#: n-tiles of UNITS units a warp computes per tile of rows in the backward sweep (its slice of hidden
#: units: 8x that many; each row operand loaded and split serves that many mma), MDNUMBA_CUDA_TENSOR_TILES
#: (default 2); the forward's are its gate blocks
BACKWARD_TILES: int = config.CUDA_TENSOR_TILES
_PAIRS = 4 * BACKWARD_TILES  # (row, unit) pairs of a lane in a backward tile (a local array's shape)
#: warps per block (the simulator's 2: it runs a thread as a Python thread). 8: at 248 registers
#: (the forward) one block of 256 threads fills an SM's registers, and its warps share its slice
TENSOR_WARPS: int = 2 if SIMULATOR else 8
TENSOR_THREADS: int = TENSOR_WARPS * WARP
#: the layouts the sweeps take where the tensor layout cannot run them (and the saving-free sweep,
#: which has no tensor kernels)
FALLBACK = {"forward": "sliced", "backward": "sliced", "infer": "flat"}
#: shared floats per (neighbour, gate block, k step) of a slice: 32 lanes x (b0, b1) x (hi, lo)
_FRAGMENT = WARP * 4
_TENSOR_JIT = _JIT if SIMULATOR else dict(_JIT, launch_bounds=(TENSOR_THREADS, 1))
#: the tensor GEMM (:func:`_gemm_tensor`): warps along M and N of a block, mma tiles of 16 rows and
#: of 8 columns per warp, k steps per shared tile; a block computes GEMM_BM x GEMM_BN outputs (the
#: simulator's one warp a 16 x 8 tile: it runs a thread as a Python thread)
GEMM_WM, GEMM_WN, GEMM_TM, GEMM_TN, GEMM_BK = (1, 1, 1, 1, KSTEP) if SIMULATOR else (2, 2, 2, 4, 2 * KSTEP)
GEMM_BM, GEMM_BN = GEMM_WM * GEMM_TM * TILE_ROWS, GEMM_WN * GEMM_TN * UNITS
GEMM_THREADS = GEMM_WM * GEMM_WN * WARP
#: words past a shared tile's row: a row stride of 8 (mod 32) words puts a fragment's 4 k x 8 rows
#: (columns) on 32 different banks
GEMM_PAD = 8
_GA_COLS, _GB_COLS = GEMM_BM + GEMM_PAD, GEMM_BN + GEMM_PAD
_GEMM_JIT = _JIT if SIMULATOR else dict(_JIT, launch_bounds=(GEMM_THREADS, 2))


# ---------------------------------------------------------------- primitives
if SIMULATOR:
    class _Warp:
        """A warp's meeting place under the simulator: two sets of its lanes' operands (a call
        writes one, the next the other: a lane that reaches the next call before the others
        have read this one's leaves them alone) and a barrier."""

        def __init__(self):
            self.slots: list = [[None] * WARP, [None] * WARP]
            self.calls = [0] * WARP
            self.barrier = threading.Barrier(WARP, timeout=120)

    _warps: dict = {}
    _warps_lock = threading.Lock()
    _SIMULATOR_DIR = os.path.dirname(cuda.simulator.kernelapi.__file__)

    def _call_site() -> tuple:
        """``(file, line)`` of the calls that led to the caller's call, innermost first, the
        simulator's own left out."""
        frame, site = sys._getframe(2), []
        while frame is not None:
            if not frame.f_code.co_filename.startswith(_SIMULATOR_DIR):
                site.append((frame.f_code.co_filename, frame.f_lineno))
            frame = frame.f_back
        return tuple(site)

    def _warp(key) -> _Warp:
        """The warp ``key`` (block, warp in the block); a fresh one after a broken barrier."""
        with _warps_lock:
            w = _warps.get(key)
            if w is None or w.barrier.broken:
                w = _warps[key] = _Warp()
            return w

    @cuda.jit(device=True)
    def tf32(x):
        """``x`` (float32) rounded to the nearest TF32 value, ties away from zero, as a float32
        whose low 13 mantissa bits are zero: ``cvt.rna.tf32.f32`` and an ``and``, as ptxas
        builds them for sm_90 (no rounding carry for ±inf and NaN: a NaN stays a NaN)."""
        bits = int(np.float32(x).view(np.uint32))
        if bits & 0x7FFFFFFF >= 0x7F800000:
            return np.uint32(bits & 0xFFFFE000).view(np.float32)
        return tf32_finite(x)

    @cuda.jit(device=True)
    def tf32_finite(x):
        """:func:`tf32` of a number, ``(bits + 0x1000) & ~0x1fff`` (one instruction fewer): a NaN
        may come out as anything (a GPU's, 0x7fffffff, as -0.0)."""
        return np.uint32((int(np.float32(x).view(np.uint32)) + 0x1000) & 0xFFFFE000).view(np.float32)

    @cuda.jit(device=True)
    def mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """``D = A·B + C`` of the warp (module docstring: the fragments), every lane calling it:
        the lanes meet, then each computes its 4 outputs from all lanes' operands in float32."""
        if cuda.blockDim.x % WARP:
            raise AssertionError("mma needs whole warps: blocks of a multiple of 32 threads")
        lane = cuda.threadIdx.x % WARP
        w = _warp((tuple(cuda.blockIdx), cuda.threadIdx.x // WARP))
        slots = w.slots[w.calls[lane] % 2]
        w.calls[lane] += 1
        slots[lane] = (a0, a1, a2, a3, b0, b1, _call_site())
        w.barrier.wait()
        if any(slot[6] != slots[0][6] for slot in slots):  # mma.sync.aligned: one instruction for all
            raise AssertionError(f"the lanes of a warp call mma at different places: {slots[0][6][:2]} "
                                 f"and {next(s[6] for s in slots if s[6] != slots[0][6])[:2]}")
        group, t = lane >> 2, lane & 3
        out = []
        for i, acc in enumerate((c0, c1, c2, c3)):
            row, col = group + 8 * (i >> 1), 2 * t + (i & 1)
            acc = np.float32(acc)
            for k in range(KSTEP):
                a = slots[(row % 8) * 4 + k % 4][(row >= 8) + 2 * (k >= 4)]
                b = slots[col * 4 + k % 4][4 + (k >= 4)]
                acc = np.float32(acc + np.float32(a) * np.float32(b))
            out.append(acc)
        return out[0], out[1], out[2], out[3]
else:
    from llvmlite import ir as llvm_ir
    from numba.cuda.extending import intrinsic

    def _tf32_codegen(keep_nan: bool):
        """The code of :func:`tf32` (``keep_nan``) or :func:`tf32_finite`."""
        def codegen(context, builder, signature, args):
            i32 = llvm_ir.IntType(32)
            if keep_nan:
                cvt = llvm_ir.InlineAsm(llvm_ir.FunctionType(i32, [llvm_ir.FloatType()]),
                                        "cvt.rna.tf32.f32 $0, $1;", "=r,f")
                rounded = builder.call(cvt, [args[0]])
            else:
                rounded = builder.add(builder.bitcast(args[0], i32), llvm_ir.Constant(i32, 0x1000))
            rounded = builder.and_(rounded, llvm_ir.Constant(i32, 0xFFFFE000))
            return builder.bitcast(rounded, llvm_ir.FloatType())
        return codegen

    @intrinsic
    def tf32(typingctx, x):
        """``x`` (float32) rounded to the nearest TF32 value, ties away from zero, as a float32
        whose low 13 mantissa bits are zero: ``cvt.rna.tf32.f32`` (ptxas: ``bits + 0x1000`` but
        for ±inf and NaN) and an ``and``. A NaN stays a NaN: ``(bits + 0x1000) & ~0x1fff`` alone
        turns the GPU's NaN, 0x7fffffff, into -0.0, and the sums would lose it."""
        if x != numba.types.float32:
            return None
        return numba.types.float32(numba.types.float32), _tf32_codegen(True)

    @intrinsic
    def tf32_finite(typingctx, x):
        """:func:`tf32` of a number, ``(bits + 0x1000) & ~0x1fff`` (one instruction fewer): a NaN
        may come out as anything (a GPU's, 0x7fffffff, as -0.0)."""
        if x != numba.types.float32:
            return None
        return numba.types.float32(numba.types.float32), _tf32_codegen(False)

    @intrinsic
    def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """``D = A·B + C``: ``mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32`` on this lane's
        fragments (module docstring), float32 values in TF32 (:func:`tf32`); returns d0..d3."""
        f32 = numba.types.float32
        if any(a != f32 for a in (a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)):
            return None

        def codegen(context, builder, signature, args):
            i32, f = llvm_ir.IntType(32), llvm_ir.FloatType()
            kind = llvm_ir.FunctionType(llvm_ir.LiteralStructType([f] * 4), [i32] * 6 + [f] * 4)
            asm = llvm_ir.InlineAsm(kind, "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                                    "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};",
                                    "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", side_effect=True)
            ops = [builder.bitcast(a, i32) for a in args[:6]] + list(args[6:])
            res = builder.call(asm, ops, attrs=("convergent",))  # never duplicated into divergent paths
            return context.make_tuple(builder, signature.return_type,
                                      [builder.extract_value(res, i) for i in range(4)])
        return numba.types.UniTuple(f32, 4)(*([f32] * 10)), codegen


@cuda.jit(device=True)
def _split(x):
    """``(x_hi, x_lo)``: ``x_hi = tf32(x)``, ``x_lo = tf32(x − x_hi)`` (the difference is exact).
    A NaN or ±inf x is carried by x_hi; x − x_hi is then NaN, which x_lo need not keep, so it is
    rounded by :func:`tf32_finite` (compiled for sm_90, keeping NaN in x_hi costs the hot loops
    9–12% more instructions, in both halves ~35%)."""
    hi = tf32(x)
    return hi, tf32_finite(x - hi)


# ---------------------------------------------------------------- device functions
@cuda.jit(device=True)
def _block_units(nO, D, units):
    """This block's (scan q, first unit j0, share o): block ``(q*nJ + slice)*nO + o`` of slices of
    ``units`` units, nJ = ceil(D / units)."""
    qs, o = _divmod(cuda.blockIdx.x, nO)
    q, sl = _divmod(qs, (D + units - 1) // units)
    return q, sl * units, o


@cuda.jit(device=True)
def _ksteps(K):
    """The mma k steps of a sum over K: 8 steps of k each, in pairs (16 steps of k per pair)."""
    return 2 * ((K + 2 * KSTEP - 1) // (2 * KSTEP))


@cuda.jit(device=True)
def _step_k(ks, t):
    """The k of the operands lane 4*group + t gives the mma of step ks as its first k (a0, a1 and
    b0; its second, a2, a3 and b1, is k + 1): ``16*(ks // 2) + 4t + 2*(ks % 2)``. The products of a
    step may pair any 8 k of the sum as long as A and B agree; this order gives a lane 4
    consecutive k per pair of steps, one 16-byte load per row (:func:`_a_run`)."""
    return 2 * KSTEP * (ks >> 1) + 4 * t + 2 * (ks & 1)


@cuda.jit(device=True)
def _stage_fragments(Ws, Wf, q, j0, N, D, transposed):
    """Fill ``Ws`` with the block's slice of the flat weights ``Wf`` in B-fragment order, split (the
    whole block calls it): ``Ws[((blk*KS + ks)*32 + lane)*4 + e] = (w0_hi, w1_hi, w0_lo, w1_lo)[e]``,
    lane = 4*group + t, with (forward) ``w_i = U[q, k_i, d*G + g*D + j0 + group]`` for the block
    ``blk = d*(N+3) + g`` and K = D steps, or (``transposed``, backward) ``w_i = UT[q, k_i, d*D + j0
    + 8*m + group]`` for ``blk = d*BACKWARD_TILES + m`` and K = G steps; ``k_i = _step_k(ks, t) + i``,
    0 past K or D, G = (N+3)*D, KS = :func:`_ksteps` (K)."""
    G = (N + 3) * D
    K, kstride, blocks = (G, N * D, N * BACKWARD_TILES) if transposed else (D, N * G, N * (N + 3))
    KS = _ksteps(K)
    for e in range(cuda.threadIdx.x, blocks * KS * _FRAGMENT, cuda.blockDim.x):
        rest, part = _divmod(e, 4)
        rest, lane = _divmod(rest, WARP)
        blk, ks = _divmod(rest, KS)
        d, g = _divmod(blk, BACKWARD_TILES if transposed else N + 3)
        k = _step_k(ks, lane & 3) + (part & 1)
        j = j0 + (lane >> 2)
        offset = d * G + g * D
        if transposed:  # g: the n-tile of the slice
            j += g * UNITS
            offset = d * D
        w = numba.float32(0)
        if k < K and j < D:
            w = Wf[q * D * N * G + k * kstride + offset + j]
        hi, lo = _split(w)
        Ws[e] = lo if part >= 2 else hi
    cuda.syncthreads()


@cuda.jit(device=True)
def _a_run(src, row, k, K, vec):
    """``src[row, k .. k+3]``, zeros where there is no row (-1) or step (past K): one 16-byte load
    when ``vec`` (K a multiple of 16: every row and k aligned)."""
    x0, x1, x2, x3 = numba.float32(0), numba.float32(0), numba.float32(0), numba.float32(0)
    if row >= 0 and vec:
        x0, x1, x2, x3 = _load4_row(src, _at(row), _at(k))
    elif row >= 0:
        if k < K:
            x0 = src[_at(row), _at(k)]
        if k + 1 < K:
            x1 = src[_at(row), _at(k + 1)]
        if k + 2 < K:
            x2 = src[_at(row), _at(k + 2)]
        if k + 3 < K:
            x3 = src[_at(row), _at(k + 3)]
    return x0, x1, x2, x3


@cuda.jit(device=True)
def _mma_step(acc, acs, Ws, w, stride, x0, x1, x2, x3, width):
    """One k step of :func:`_tile_sums`: the A fragment ``(x0, x1, x2, x3)`` split, times the B
    fragments of each of the ``width`` blocks g at ``Ws[w + g*stride]``, 3xTF32."""
    hi0, lo0 = _split(x0)
    hi1, lo1 = _split(x1)
    hi2, lo2 = _split(x2)
    hi3, lo3 = _split(x3)
    for g in range(width):
        bh0, bh1, bl0, bl1 = _load4(Ws, w + g * stride)
        acs[g, 0], acs[g, 1], acs[g, 2], acs[g, 3] = mma(
            lo0, lo1, lo2, lo3, bh0, bh1, acs[g, 0], acs[g, 1], acs[g, 2], acs[g, 3])
        acs[g, 0], acs[g, 1], acs[g, 2], acs[g, 3] = mma(
            hi0, hi1, hi2, hi3, bl0, bl1, acs[g, 0], acs[g, 1], acs[g, 2], acs[g, 3])
        acc[g, 0], acc[g, 1], acc[g, 2], acc[g, 3] = mma(
            hi0, hi1, hi2, hi3, bh0, bh1, acc[g, 0], acc[g, 1], acc[g, 2], acc[g, 3])


@cuda.jit(device=True)
def _neighbour_row(nbr, base, s0, l, n, B, d):
    """The row of neighbour d (``nbr``: the parent or child table) of the hyperplane's local row l
    (cell s0 + l // B), or -1 (absent neighbour, or l >= n: past the hyperplane)."""
    s, b = _divmod(min(l, n - 1), B)
    p = nbr[s0 + s, d]
    if l < n and p >= 0:
        return base + p * B + b
    return -1


@cuda.jit(device=True)
def _tile_sums(acc, acs, src, nbr, Ws, base, s0, n, ti, B, K, width, aligned):
    """``acc[g] + acs[g] += Σ_d Σ_{k<K} src[nbr_d(r), k] · W_{d,g}[k, unit]`` for the 16x8 tile ti
    (local rows ``16*ti ..`` of a hyperplane of ``n`` rows starting at cell s0 of the scan at row
    ``base``; units of the block's slice) and the ``width`` blocks g of :func:`_stage_fragments`'
    ``Ws`` per neighbour d, by the calling warp, 3xTF32: ``acc`` += the hi·hi products, ``acs`` +=
    hi·lo and lo·hi (C fragments: lane 4*group + t holds rows group, group+8 and units 2t, 2t+1).
    ``width`` is a constant at each call site (the block loops unroll: accumulators in registers).
    ``src``'s rows (K long) are read 4 k at a time, in one vector load where they allow it: K a
    multiple of 16 and ``aligned`` (its rows start 16-byte aligned)."""
    lane = cuda.threadIdx.x % WARP
    group, t = lane >> 2, lane & 3
    KS = _ksteps(K)
    vec = aligned and K % (2 * KSTEP) == 0
    l0 = ti * TILE_ROWS + group
    for d in range(nbr.shape[1] if RECURRENT_SUM else 0):
        p0 = _neighbour_row(nbr, base, s0, l0, n, B, d)
        p1 = _neighbour_row(nbr, base, s0, l0 + 8, n, B, d)
        w = (d * width * KS * WARP + lane) * 4
        if vec:  # two loops, each with its own loads (a branch in the loop would hold both's registers)
            _steps(acc, acs, Ws, w, KS, src, p0, p1, t, K, width, True)
        else:
            _steps(acc, acs, Ws, w, KS, src, p0, p1, t, K, width, False)


@cuda.jit(device=True)
def _steps(acc, acs, Ws, w, KS, src, p0, p1, t, K, width, vec):
    """The KS mma steps of :func:`_tile_sums` for the rows ``p0`` and ``p1`` of ``src``, in pairs: 4
    consecutive k per lane and row (:func:`_step_k`), one vector load each when ``vec`` (a constant
    at each call site)."""
    for ks in range(0, KS, 2):
        k = _step_k(ks, t)
        x0, x1, x2, x3 = _a_run(src, p0, k, K, vec)
        y0, y1, y2, y3 = _a_run(src, p1, k, K, vec)
        _mma_step(acc, acs, Ws, w + ks * _FRAGMENT, KS * _FRAGMENT, x0, y0, x1, y1, width)
        _mma_step(acc, acs, Ws, w + (ks + 1) * _FRAGMENT, KS * _FRAGMENT, x2, y2, x3, y3, width)


@cuda.jit(device=True)
def _lane_pair(i, ti, j0):
    """The (local row, unit) of this lane's C-fragment element i in tile ti of the slice at j0."""
    lane = cuda.threadIdx.x % WARP
    return ti * TILE_ROWS + (lane >> 2) + 8 * (i >> 1), j0 + 2 * (lane & 3) + (i & 1)


@cuda.jit(device=True)
def _tile_forward(h, c, act, Ws, parent, base, s0, n, ti, B, D, j0, cell, width, aligned):
    """Tile ti of the forward sweep (rows and units as :func:`_tile_sums`): the pre-activations of its
    ``width`` = N+3 gate blocks, ``act`` (the input projection) plus the recurrent sums over the
    parents' h, then the cell math of each (row, unit) of the lane on registers
    (``_register_forward``: act, c, h). With the diagnostic ``MDNUMBA_CUDA_SKIP=cell`` the
    pre-activations are stored in ``act`` instead (``=sum`` leaves the sums out), as the other
    layouts do."""
    acc = cuda.local.array((GATE_CHUNK, 4), numba.float32)
    acs = cuda.local.array((GATE_CHUNK, 4), numba.float32)
    for i in range(4):
        l_i, u_i = _lane_pair(i, ti, j0)
        for g in range(width):
            acc[g, i] = 0
            acs[g, i] = 0
            if l_i < n and u_i < D:
                acc[g, i] = act[base + s0 * B + l_i, g * D + u_i]
    _tile_sums(acc, acs, h, parent, Ws, base, s0, n, ti, B, D, width, aligned)
    la = cuda.local.array((1, GATE_CHUNK), numba.float32)
    for i in range(4):
        l_i, u_i = _lane_pair(i, ti, j0)
        for g in range(width):
            la[0, g] = acc[g, i] + acs[g, i]
        if l_i < n and u_i < D and not CELL_MATH:
            for g in range(width):
                act[base + s0 * B + l_i, g * D + u_i] = la[0, g]
        elif l_i < n and u_i < D:
            s, b = _divmod(l_i, B)
            _register_forward(h, c, act, parent, la, base + s0 * B + l_i, base, s0 + s, b, B, D, u_i, cell,
                              width)


@cuda.jit(device=True)
def _tile_backward(dact, dc, dh, act, c, Ws, parent, child, base, s0, n, ti, B, D, j0, cell, gates, aligned):
    """Tile ti of the backward sweep (pull form, rows as :func:`_tile_sums`, the :data:`BACKWARD_TILES`
    n-tiles of 8 units of the slice at j0): ``dh`` (the upstream gradient) plus ``Σ_d Σ_g
    dact[child_d(r), g] · UT[g, d*D + j]`` over the children's gate gradients, stored, then the cell
    math of each (row, unit) of the lane on registers (dc, dact; ``gates`` = N+3, a constant at
    each call site)."""
    acc = cuda.local.array((BACKWARD_TILES, 4), numba.float32)
    acs = cuda.local.array((BACKWARD_TILES, 4), numba.float32)
    for m in range(BACKWARD_TILES):
        for i in range(4):
            l_i, u_i = _lane_pair(i, ti, j0 + m * UNITS)
            acc[m, i] = 0
            acs[m, i] = 0
            if l_i < n and u_i < D:
                acc[m, i] = dh[base + s0 * B + l_i, u_i]
    _tile_sums(acc, acs, dact, child, Ws, base, s0, n, ti, B, gates * D, BACKWARD_TILES, aligned)
    sums = cuda.local.array(_PAIRS, numba.float32)
    for m in range(BACKWARD_TILES):
        for i in range(4):
            sums[4 * m + i] = acc[m, i] + acs[m, i]
    lda = cuda.local.array((1, GATE_CHUNK), numba.float32)
    for p in range(_PAIRS):  # not unrolled (the cell math is large): pair p's sum moves to index 0
        dhv = sums[0]  # (a local array indexed at run time would live in local memory)
        for e in range(_PAIRS - 1):
            sums[e] = sums[e + 1]
        l_i, u_i = _lane_pair(p & 3, ti, j0 + (p >> 2) * UNITS)
        if l_i < n and u_i < D:
            r = base + s0 * B + l_i
            dh[r, u_i] = dhv
            s, b = _divmod(l_i, B)
            s += s0
            if CELL_MATH and gates == 4:
                _cell1_backward(dact, dc, act, c, parent, child, dhv, r, base, s, b, B, D, u_i, cell, lda)
            elif CELL_MATH and gates == 5:
                _cell2_backward(dact, dc, act, c, parent, child, dhv, r, base, s, b, B, D, u_i, cell, lda)
            elif CELL_MATH:
                _cell3_backward(dact, dc, act, c, parent, child, dhv, r, base, s, b, B, D, u_i, cell, lda)


@cuda.jit(device=True)
def _plane_tiles(diag_off, k, B, D, nO, rows_per_scan, units):
    """This warp's share of hyperplane k: ``(scan's first row, first unit j0, first cell s0, rows n,
    first tile, end, step)``, tiles ``o + nO*w, o + nO*(w + W), ..`` for warp w of W (a trip count
    per warp, the same for its lanes, as mma needs)."""
    q, j0, o = _block_units(nO, D, units)
    s0 = diag_off[k]
    n = (diag_off[k + 1] - s0) * B
    warps = cuda.blockDim.x // WARP
    first = o + nO * (cuda.threadIdx.x // WARP)
    return q * rows_per_scan, j0, s0, n, first, (n + TILE_ROWS - 1) // TILE_ROWS, nO * warps


@cuda.jit(device=True)
def _forward_plane(h, c, act, Ws, diag_off, parent, B, D, cell, nO, k, width, aligned):
    """This block's tiles of hyperplane k in the forward sweep (:func:`_tile_forward`)."""
    base, j0, s0, n, first, end, step = _plane_tiles(diag_off, k, B, D, nO, parent.shape[0] * B, UNITS)
    for ti in range(first, end, step):
        _tile_forward(h, c, act, Ws, parent, base, s0, n, ti, B, D, j0, cell, width, aligned)


@cuda.jit(device=True)
def _backward_plane(dact, dc, dh, act, c, Ws, diag_off, parent, child, B, D, cell, nO, k, width, aligned):
    """This block's tiles of hyperplane k in the backward sweep (:func:`_tile_backward`)."""
    base, j0, s0, n, first, end, step = _plane_tiles(diag_off, k, B, D, nO, parent.shape[0] * B,
                                                     UNITS * BACKWARD_TILES)
    for ti in range(first, end, step):
        _tile_backward(dact, dc, dh, act, c, Ws, parent, child, base, s0, n, ti, B, D, j0, cell, width,
                       aligned)


@cuda.jit(device=True)
def _forward_plane_n(h, c, act, Ws, diag_off, parent, B, D, cell, nO, k, aligned):
    """:func:`_forward_plane` with the gate count of N = 1, 2 or 3 as a constant."""
    N = parent.shape[1]
    if N == 1:
        _forward_plane(h, c, act, Ws, diag_off, parent, B, D, cell, nO, k, 4, aligned)
    elif N == 2:
        _forward_plane(h, c, act, Ws, diag_off, parent, B, D, cell, nO, k, 5, aligned)
    else:
        _forward_plane(h, c, act, Ws, diag_off, parent, B, D, cell, nO, k, 6, aligned)


@cuda.jit(device=True)
def _backward_plane_n(dact, dc, dh, act, c, Ws, diag_off, parent, child, B, D, cell, nO, k, aligned):
    """:func:`_backward_plane` with the gate count of N = 1, 2 or 3 as a constant."""
    N = parent.shape[1]
    if N == 1:
        _backward_plane(dact, dc, dh, act, c, Ws, diag_off, parent, child, B, D, cell, nO, k, 4, aligned)
    elif N == 2:
        _backward_plane(dact, dc, dh, act, c, Ws, diag_off, parent, child, B, D, cell, nO, k, 5, aligned)
    else:
        _backward_plane(dact, dc, dh, act, c, Ws, diag_off, parent, child, B, D, cell, nO, k, 6, aligned)


@cuda.jit(device=True)
def _stage(Ws, Wf, parent, D, nO, transposed):
    """The block's slice of U (UT when ``transposed``) into shared memory (:func:`_stage_fragments`)."""
    q, j0, _ = _block_units(nO, D, UNITS * BACKWARD_TILES if transposed else UNITS)
    _stage_fragments(Ws, Wf, q, j0, parent.shape[1], D, transposed)


@cuda.jit(**_TENSOR_JIT)
def _forward_coop_tensor(h, c, act, Uf, diag_off, parent, B, D, cell, aligned, nO, out, out_src):
    """The forward sweep in one cooperative launch (the sliced kernels' arguments, ``aligned`` in
    ``use_shared``'s place: whether h's rows start 16-byte aligned, :func:`_tile_sums`): every
    hyperplane's tiles, grid sync in between, then the output in grid order."""
    Ws = cuda.shared.array(0, numba.float32, alignment=None if SIMULATOR else 16)
    _stage(Ws, Uf, parent, D, nO, False)
    grid = cuda.cg.this_grid()
    for k in range(diag_off.shape[0] - 1):
        _forward_plane_n(h, c, act, Ws, diag_off, parent, B, D, cell, nO, k, aligned)
        grid.sync()
    if out_src.shape[0] > 0:
        _unskew(out, h, out_src, cuda.grid(1), cuda.gridsize(1))


@cuda.jit(**_TENSOR_JIT)
def _forward_diag_tensor(h, c, act, Uf, diag_off, parent, B, D, cell, aligned, nO, out, out_src, k):
    """Hyperplane k only (one launch per hyperplane; the output's unskew is a launch of its own)."""
    Ws = cuda.shared.array(0, numba.float32, alignment=None if SIMULATOR else 16)
    _stage(Ws, Uf, parent, D, nO, False)
    _forward_plane_n(h, c, act, Ws, diag_off, parent, B, D, cell, nO, k, aligned)


@cuda.jit(**_TENSOR_JIT)
def _backward_coop_tensor(dact, dc, dh, act, c, UTf, diag_off, parent, child, B, D, cell, aligned, nO,
                          U, dh_in, dh_src, z, xs, h):
    """The backward sweep in one cooperative launch (the sliced kernels' arguments, ``aligned`` as in
    :func:`_forward_coop_tensor`, of dact's rows): the prologue
    (``wavefront_cuda._backward_prologue``: UT, the skewed upstream dh, the weight-gradient
    operands), then every hyperplane's tiles from the last, grid sync in between."""
    _backward_prologue_synced(UTf, U, dh, dh_in, dh_src, z, xs, h, parent, B, D)
    Ws = cuda.shared.array(0, numba.float32, alignment=None if SIMULATOR else 16)
    _stage(Ws, UTf, parent, D, nO, True)
    grid = cuda.cg.this_grid()
    for k in range(diag_off.shape[0] - 2, -1, -1):
        _backward_plane_n(dact, dc, dh, act, c, Ws, diag_off, parent, child, B, D, cell, nO, k, aligned)
        grid.sync()


@cuda.jit(**_TENSOR_JIT)
def _backward_diag_tensor(dact, dc, dh, act, c, UTf, diag_off, parent, child, B, D, cell, aligned, nO,
                          U, dh_in, dh_src, z, xs, h, k):
    """Hyperplane k only (one launch per hyperplane, after the prologue's own launch)."""
    Ws = cuda.shared.array(0, numba.float32, alignment=None if SIMULATOR else 16)
    _stage(Ws, UTf, parent, D, nO, True)
    _backward_plane_n(dact, dc, dh, act, c, Ws, diag_off, parent, child, B, D, cell, nO, k, aligned)


@cuda.jit(**_GEMM_JIT)
def _gemm_tensor(out, parts, counters, a, bm, bias, M, N, K, ta, tb, mode, kchunk, Ma):
    """The tiled GEMM of :mod:`mdnumba.kernels.wavefront_cuda` (``_gemm_tiled``: the same arguments,
    K split, ones row and init modes) on tensor cores, float32 in 3xTF32: block (x, y, z) computes
    the GEMM_BM x GEMM_BN tile (x, y) of ``Σ_{k ∈ chunk z} A[m, k] B[k, n]``, each warp its
    GEMM_TM x GEMM_TN mma tiles of it (:func:`_gemm_tensor_step`) from shared tiles of GEMM_BK k;
    the sums go through a shared tile to the output (:func:`_gemm_tensor_out`)."""
    As = cuda.shared.array((GEMM_BK, _GA_COLS), numba.float32)
    Bs = cuda.shared.array((GEMM_BK, _GB_COLS), numba.float32)
    acc = cuda.local.array((GEMM_TM, GEMM_TN, 4), numba.float32)
    acs = cuda.local.array((GEMM_TM, GEMM_TN, 4), numba.float32)  # the small products, kept apart
    for i in range(GEMM_TM):
        for j in range(GEMM_TN):
            for e in range(4):
                acc[i, j, e] = 0
                acs[i, j, e] = 0
    m0, n0 = cuda.blockIdx.x * GEMM_BM, cuda.blockIdx.y * GEMM_BN
    k_begin = cuda.blockIdx.z * kchunk
    k_end = min(K, k_begin + kchunk)
    for k0 in range(k_begin, k_end, GEMM_BK):
        _load_tile(As, a, m0, k0, Ma, M, k_end, ta, GEMM_BM, GEMM_BK, GEMM_THREADS)
        _load_tile(Bs, bm, n0, k0, N, N, k_end, not tb, GEMM_BN, GEMM_BK, GEMM_THREADS)
        cuda.syncthreads()
        for ks in range(0, GEMM_BK, KSTEP):
            _gemm_tensor_step(acc, acs, As, Bs, ks)
        cuda.syncthreads()
    _gemm_tensor_out(out, parts, counters, bias, acc, acs, m0, n0, M, N, mode)


@cuda.jit(device=True)
def _gemm_tensor_out(out, parts, counters, bias, acc, acs, m0, n0, M, N, mode):
    """Write the block's tile: each lane's sums (``acc + acs``, C fragments) into a shared tile
    (every index a constant: the accumulators stay in registers), then, by the block's threads in
    row order (coalesced), into ``out`` (init mode ``mode``, one chunk) or ``parts[z]``, whose last
    block of the tile writes ``out = init + Σ_z parts[z]`` as ``_gemm_tiled`` does."""
    Cs = cuda.shared.array((GEMM_BM, _GB_COLS), numba.float32)
    lane, warp = cuda.threadIdx.x % WARP, cuda.threadIdx.x // WARP
    wm, wn = _divmod(warp, GEMM_WN)
    for i in range(GEMM_TM):
        for j in range(GEMM_TN):
            for e in range(4):
                r = (wm * GEMM_TM + i) * TILE_ROWS + (lane >> 2) + 8 * (e >> 1)
                Cs[r, (wn * GEMM_TN + j) * UNITS + 2 * (lane & 3) + (e & 1)] = acc[i, j, e] + acs[i, j, e]
    cuda.syncthreads()
    split = cuda.gridDim.z > 1
    for f in range(cuda.threadIdx.x, GEMM_BM * GEMM_BN, GEMM_THREADS):
        r, c = _divmod(f, GEMM_BN)
        if m0 + r < M and n0 + c < N:
            _store_part(out, parts, bias, mode, m0 + r, n0 + c, Cs[r, c], split)
    if split and _last_block(counters):
        for f in range(cuda.threadIdx.x, GEMM_BM * GEMM_BN, GEMM_THREADS):
            r, c = _divmod(f, GEMM_BN)
            if m0 + r < M and n0 + c < N:
                _store_parts_sum(out, parts, bias, mode, m0 + r, n0 + c)


@cuda.jit(device=True)
def _gemm_tensor_step(acc, acs, As, Bs, ks):
    """One mma k step (KSTEP k from ``ks``) of the warp's tiles, 3xTF32 (:func:`_mma_step`'s
    products): A fragments from ``As[k, m]``, B fragments from ``Bs[k, n]``, each split once."""
    lane, warp = cuda.threadIdx.x % WARP, cuda.threadIdx.x // WARP
    wm, wn = _divmod(warp, GEMM_WN)
    group, t = lane >> 2, lane & 3
    bh = cuda.local.array((GEMM_TN, 2), numba.float32)
    bl = cuda.local.array((GEMM_TN, 2), numba.float32)
    for j in range(GEMM_TN):
        n = (wn * GEMM_TN + j) * UNITS + group
        bh[j, 0], bl[j, 0] = _split(Bs[ks + t, n])
        bh[j, 1], bl[j, 1] = _split(Bs[ks + t + 4, n])
    for i in range(GEMM_TM):
        m = (wm * GEMM_TM + i) * TILE_ROWS + group
        hi0, lo0 = _split(As[ks + t, m])
        hi1, lo1 = _split(As[ks + t, m + 8])
        hi2, lo2 = _split(As[ks + t + 4, m])
        hi3, lo3 = _split(As[ks + t + 4, m + 8])
        for j in range(GEMM_TN):
            b0, b1, c0, c1 = bh[j, 0], bh[j, 1], bl[j, 0], bl[j, 1]
            acs[i, j, 0], acs[i, j, 1], acs[i, j, 2], acs[i, j, 3] = mma(
                lo0, lo1, lo2, lo3, b0, b1, acs[i, j, 0], acs[i, j, 1], acs[i, j, 2], acs[i, j, 3])
            acs[i, j, 0], acs[i, j, 1], acs[i, j, 2], acs[i, j, 3] = mma(
                hi0, hi1, hi2, hi3, c0, c1, acs[i, j, 0], acs[i, j, 1], acs[i, j, 2], acs[i, j, 3])
            acc[i, j, 0], acc[i, j, 1], acc[i, j, 2], acc[i, j, 3] = mma(
                hi0, hi1, hi2, hi3, b0, b1, acc[i, j, 0], acc[i, j, 1], acc[i, j, 2], acc[i, j, 3])


#: the tensor GEMM for ``wavefront_cuda.gemm(method="tensor")``: (kernel, (BM, BN, BK), threads)
GEMM = (_gemm_tensor, (GEMM_BM, GEMM_BN, GEMM_BK), GEMM_THREADS)


#: (cooperative, per-diagonal) kernels per sweep
KERNELS = {"forward": (_forward_coop_tensor, _forward_diag_tensor),
           "backward": (_backward_coop_tensor, _backward_diag_tensor)}


# ---------------------------------------------------------------- host side
def slice_units(sweep: str) -> int:
    """Hidden units per block of a ``sweep`` ("forward", "backward")."""
    return UNITS * (BACKWARD_TILES if sweep == "backward" else 1)


def shared_bytes(N: int, D: int, sweep: str) -> int:
    """Bytes of a block's slice of U (UT backward) in fragment order (:func:`_stage_fragments`)."""
    blocks, K = (N * BACKWARD_TILES, (N + 3) * D) if sweep == "backward" else (N * (N + 3), D)
    return blocks * 2 * -(-K // (2 * KSTEP)) * _FRAGMENT * 4


#: the GPUs whose tensor cores take TF32 (``mma.sync ... tf32``, ``cvt.rna.tf32.f32``): Ampere on
MIN_COMPUTE_CAPABILITY = (8, 0)


def _compute_capability() -> tuple[int, int]:
    """The current GPU's compute capability; the simulator's stands for one with TF32 tensor
    cores (it runs :func:`mma` and :func:`tf32` as Python)."""
    return MIN_COMPUTE_CAPABILITY if SIMULATOR else tuple(cuda.get_current_device().compute_capability)


def why_not_tf32(dtype) -> str:
    """Why the tensor cores cannot take ``dtype``'s sums here: not float32, or a GPU before sm_80;
    "" where they can."""
    if np.dtype(dtype) != np.float32:
        return f"{np.dtype(dtype)}: tensor cores take float32 (as TF32)"
    cc = _compute_capability()
    if cc < MIN_COMPUTE_CAPABILITY:
        return (f"TF32 mma needs compute capability {'.'.join(map(str, MIN_COMPUTE_CAPABILITY))}+, "
                f"this GPU has {'.'.join(map(str, cc))}")
    return ""


def plan(sweep: str, args: tuple, S: int, N: int, D: int, B: int, diag_off_host: np.ndarray, dtype,
         path: str) -> tuple[int, int, int, str]:
    """The tensor layout of a ``sweep`` ("forward", "backward") with the kernels' ``args``: ``(nO,
    blocks, shared bytes, "")``, nO blocks per slice of :func:`slice_units` units (as many as the
    cooperative grid holds, at most the largest hyperplane's tiles per warp); or ``(0, 0, 0, why
    not)``: float64, a GPU before sm_80, more than 3-D, a slice over the shared memory a block can
    opt in to, or (off the per-diagonal path) S x nJ slices that cannot all be co-resident. Opts
    the kernels in to the shared memory they need."""
    why = why_not_tf32(dtype)
    if why:
        return 0, 0, 0, why
    if N + 3 > GATE_CHUNK:
        return 0, 0, 0, f"the tensor layout sweeps at most {GATE_CHUNK - 3}-D layers, this one is {N}-D"
    shmem = shared_bytes(N, D, sweep)
    if shmem > _item_shared_limit():
        return 0, 0, 0, f"a slice of U takes {shmem} B, over the {_item_shared_limit()} B a block can have"
    coop, diag = KERNELS[sweep]
    _opt_in_shared(coop, args, shmem)
    _opt_in_shared(diag, (*args, 0), shmem)
    nJ = -(-D // slice_units(sweep))
    if path == "per-diagonal":
        cap = 4 * _sm_count()
    else:
        cap = _coop_cap(coop, args, TENSOR_THREADS, shmem)
        if S * nJ > cap:
            return 0, 0, 0, f"{S * nJ} unit slices, {cap} co-resident blocks"
    tiles = -(-int(np.diff(diag_off_host).max()) * int(B) // TILE_ROWS)
    nO = max(1, min(-(-tiles // TENSOR_WARPS), cap // (S * nJ)))
    return nO, S * nJ * nO, shmem, ""
