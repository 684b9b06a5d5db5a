"""CUDA twins of the wavefront kernels (numba-cuda), plus the bulk kernels around them.

Same layout as :mod:`mdnumba.kernels.wavefront`: per-cell arrays are 2-D with row
``r = s*B + b`` (skewed cell s, batch item b), gate pre-activations have
``G = (N+3)*D`` columns in N+3 blocks (per cell, :mod:`mdnumba.kernels.cell`), ``U`` is
``(S, D, N*G)`` (the backward launcher transposes it into ``UT`` ``(S, G, N*D)``,
``UT[.., g, d*D + j] = U[.., j, d*G + g]``)
for S independent scans (directions) on consecutive slabs of M*B rows. The cell
math is the same source as the CPU kernels' (:func:`mdnumba.kernels.cell.build`).

One CUDA thread owns one *work item* ``(scan, cell, group of rows, hidden unit j)`` of a
hyperplane: unit j of up to :data:`ROWS_PER_THREAD` batch rows ``r_i`` of one cell.

- forward: it computes the N+3 gate pre-activations of unit j for its rows,
  ``a_g = act[r_i, g*D+j] + Σ_d Σ_k h[parent_d(r_i), k] U[k, d*G + g*D + j]``, in registers
  (each loaded weight serves every row, each loaded h every gate: ~0.5 loads per FMA in 2D
  instead of 2), then the cell (``c``, ``h`` of unit j). Threads with consecutive j read
  consecutive columns of U (coalesced); ``h[parent]`` is a broadcast.
- backward (pull form): it completes ``dh[r_i, j] += Σ_d Σ_g da_child_d(r_i)[g] UT[g, d*D+j]``
  from the children on the finished hyperplane, then writes ``dc[r_i, j]`` and
  ``dact[r_i, g*D + j]`` for its own j only: no two threads write the same place.

The layouts share out a hyperplane's items (``layout``, ``MDNUMBA_CUDA_LAYOUT``; the default
``auto`` takes the tensor layout for float32 layers of 2 or more dimensions and
:data:`AUTO_TENSOR_MIN_UNITS` units or more where it can run, else :data:`AUTO_LAYOUT`'s per sweep):

- ``flat``: over the whole grid (grid-stride), so every block reads all of U (from shared
  memory when all of it fits, else through L1/L2).
- ``sliced``: block ``(q*nJ + slice)*nO + o`` owns the :data:`SLICE` units ``slice*SLICE ..``
  of scan q for the (cell, row group) pairs ``o, o + nO, ..`` of every hyperplane
  (:func:`_block_slice`); it stages just those units' weights in shared memory once per sweep
  (:func:`_stage_slice`), laid out so that the hot loops step by the constant SLICE (shared
  loads at constant offsets). Its own kernels (``*_sliced``): the weights array they read is
  the shared one alone, so the compiler emits shared-memory loads. :func:`_plan_slices` falls
  back to flat when the slices cannot all be co-resident or a slice does not fit.
- ``staged``: sliced, and the rows a thread sums over (h of the parents, forward; the gate
  gradients of the children, backward) come from a shared tile its block loads for each round
  of items, :data:`STAGE_K` steps at a time (:func:`_stage_rows`; kernels ``*_staged``).
- ``item``: block ``q*B + b`` owns batch item b of scan q for the whole sweep, with all of the
  scan's U (UT) and one hyperplane's rows in (opt-in) shared memory and block barriers between
  hyperplanes: one plain launch per sweep, no grid sync (:func:`_forward_item`,
  :func:`_backward_item`; :func:`_plan_items` falls back to flat where it does not fit).
- ``tensor``: the sliced layout's split in 16-row x 8-unit tiles, a warp's sums on tensor cores
  (3xTF32 ``mma.sync``, :mod:`mdnumba.kernels.tensor_cuda`; :func:`_tensor_sweep`, sliced or
  flat where it cannot run).

Two ways to sweep the K hyperplanes:

- ``cooperative``: one persistent kernel, a 1-D grid no larger than
  ``max_cooperative_grid_blocks``, a grid-stride loop over each hyperplane's
  ``scans * cells * ceil(B / ROWS_PER_THREAD) * D`` items and ``this_grid().sync()``
  between hyperplanes (every block runs the same K syncs).
- ``per-diagonal``: one launch per hyperplane (the kernel boundary is the sync).

The sweep kernels also move the data around them (fewer launches): the forward one writes
the output in grid order after its last sync (:func:`_unskew`), the backward one first
transposes U, skews the upstream dh and builds the weight-gradient operands
(:func:`_backward_prologue`); the per-diagonal path runs those as launches of their own.

``U``/``UT`` are staged into dynamic shared memory when they fit in
:data:`SHARED_BYTES_LIMIT` (the default per-block limit without opt-in), else read
from global memory (L1/L2-cached). Everything that needs no sweep (input
projection, weight gradients, dx) is a GEMM: :func:`gemm` picks a thread-per-
output kernel for thin shapes and a register-blocked shared-memory tiled kernel
with a deterministic split over K (fixed-order reduction) otherwise.

Host launchers accept NumPy arrays (copied to the device and back, for tests and
one-off use) or numba device arrays (no copies).
"""

from __future__ import annotations

import math
import sys
import threading
import warnings
from typing import TYPE_CHECKING

import numba
import numpy as np
import numpy.typing as npt
from numba import cuda

from .. import config
from .cell import build
from .launch import launch

if TYPE_CHECKING:
    from ..backend_cuda import DeviceArray, HostOrDevice

#: True when numba runs CUDA kernels in its CPU simulator (NUMBA_ENABLE_CUDASIM=1)
SIMULATOR: bool = bool(numba.config.ENABLE_CUDASIM)


def _thread_safe_simulator_shared() -> None:
    """Make numba-cuda's simulator give every thread of a block the same static shared array.

    Its ``cuda.shared.array`` keeps a block's arrays by the allocating source line, but looks
    the line's array up and stores a new one without a lock: threads that reach the line at
    once (after a barrier, as the staged backward's tile) can each make their own, and a thread
    that fills its own tile feeds the others stale data. Measured (numba-cuda 0.30.4): 10 of 50
    launches of 32 threads split an array allocated after a barrier with Python's thread switch
    interval at 1 µs, and one clean-clone CI's GPU smoke run gave the staged layout's gradients
    a relative error of 2.9. The replacement keys by the caller's file and line, as numba's
    does, under a lock (tests/simgrid.py's shared memory, per block, does the same)."""
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    lock = threading.Lock()
    dynamic = FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # one buffer for all; numba's error
            return dynamic(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            if key not in self._allocations:
                self._allocations[key] = np.empty(shape, numpy_support.as_dtype(dtype)
                                                  if isinstance(dtype, numba.types.Type) else dtype)
            return self._allocations[key]

    FakeCUDAShared.array = array


if SIMULATOR:
    _thread_safe_simulator_shared()

#: bytes of dynamic shared memory a block may use without an opt-in attribute
SHARED_BYTES_LIMIT = 48 * 1024
#: upper bound on the cooperative grid (the device's co-residency limit is applied too)
COOP_MAX_BLOCKS = 4096
#: grid cap for grid-stride bulk kernels (the simulator runs a CUDA thread as a Python thread: keep it tiny)
BULK_MAX_BLOCKS = 2 if SIMULATOR else 8192

# Register-blocked GEMM tile: a block computes BM x BN outputs, each thread TM x TN of them
# (rows tr + i*(BM/TM), columns tc + q*(BN/TN): conflict-free shared reads, coalesced writes).
if SIMULATOR:
    BM, BN, BK, TM, TN = 4, 4, 2, 2, 2
else:
    BM, BN, BK, TM, TN = 64, 64, 16, 4, 4
GEMM_THREADS = (BM // TM) * (BN // TN)
#: extra column of the shared tiles: a load walking a tile column (its fast index kk) stores
#: with a stride of BM + 1 words instead of BM (with BM = 64 the 16 threads of a column hit one
#: bank: a 16-way conflict; padded, a warp's two columns leave a 2-way one in float32, none in float64)
TILE_PAD = 1
_AS_COLS, _BS_COLS = BM + TILE_PAD, BN + TILE_PAD  # globals: a shared array's shape must be constants
#: steps of the tiled GEMM's k loop per trip (an inner loop of constant length, unrolled: NVVM unrolled
#: the k loop only twice, 75 sm_90 instructions per 32 FMAs, 27 of them loop control and addresses)
_KU = min(4, BK)
assert BK % _KU == 0
_RM, _RN = BM // TM, BN // TN
# _load_tile walks a tile in fixed per-thread steps: the block must tile it evenly
assert GEMM_THREADS % BM == 0 and GEMM_THREADS % BN == 0 and GEMM_THREADS % BK == 0
assert (BK * BM) % GEMM_THREADS == 0 and (BK * BN) % GEMM_THREADS == 0

#: arrays passed to the kernels hold fewer elements than this (32-bit index arithmetic, :func:`_divmod`)
MAX_ELEMENTS = 2 ** 32

#: sweep path used when none is given: auto (cooperative, falling back), cooperative, per-diagonal
DEFAULT_PATH: str = config.CUDA_PATH
PATHS = config.CUDA_PATHS
#: sweep layout used when none is given (MDNUMBA_CUDA_LAYOUT): config.CUDA_LAYOUTS
DEFAULT_LAYOUT: str = config.CUDA_LAYOUT
LAYOUTS = config.CUDA_LAYOUTS

_JIT = dict(fastmath=config.FASTMATH)
#: the tiled GEMM's options: 3 blocks of GEMM_THREADS per SM (ptxas caps the registers at 85: sm_90
#: float32 80, float64 80 with 8 bytes spilled outside the k loop; uncapped, the unrolled k loop
#: took 96, leaving room for 2 blocks)
_GEMM_JIT = _JIT if SIMULATOR else dict(_JIT, launch_bounds=(GEMM_THREADS, 3))
#: the sweep kernels' options: with MDNUMBA_CUDA_MIN_BLOCKS, launch bounds (THREADS_PER_BLOCK threads,
#: that many blocks per SM: ptxas caps the registers to fit them; the simulator takes no bounds)
_SWEEP_JIT = dict(_JIT, launch_bounds=(config.THREADS_PER_BLOCK, config.CUDA_MIN_BLOCKS)) \
    if config.CUDA_MIN_BLOCKS and not SIMULATOR else _JIT
#: batch rows per sweep thread (compile-time: sizes its register arrays)
ROWS_PER_THREAD: int = max(1, config.CUDA_ROWS_PER_THREAD)
#: steps of a sweep thread's inner sum whose loads are issued together (compile-time: sizes the
#: register arrays); a thread's sum is a chain of memory round trips, this many per trip
UNROLL: int = max(1, config.CUDA_UNROLL)
#: hidden units per block of the sliced layout (compile-time: the hot loops' steps; :func:`_stage_slice`)
SLICE: int = max(1, config.CUDA_SLICE_UNITS)
#: steps (forward: of k, over D; backward: of the gate columns, over (N+3)*D) of the tile the
#: staged layout's block loads from global memory at once (compile-time; the simulator's small
#: enough that its cases take several tiles and a partial one)
STAGE_K: int = 4 if SIMULATOR else 32
#: (cell, row group) pairs a staged round touches at most: a round is one item per thread of a
#: block of at most THREADS_PER_BLOCK threads, SLICE items per pair, starting anywhere in a pair
STAGE_PAIRS: int = (config.THREADS_PER_BLOCK - 1) // SLICE + 2
#: steps per load of the staged layout's hot loops: its slice's weights and tile rows come in
#: 16-byte aligned runs of VEC (:func:`_stage_slice`, :func:`_stage_rows`), each read with one
#: vector load (:func:`_load4`, :func:`_load4_row`)
VEC = 4
#: byte alignment of the staged layout's shared arrays (the simulator takes none)
SHARED_ALIGN = None if SIMULATOR else 16
#: the staged layout's tile (static shared memory): a row per (pair, batch row) of a round, its
#: STAGE_K steps padded by VEC words (rows stay aligned, and a warp's reads of different rows
#: fall on different banks)
STAGE_SHAPE = (STAGE_PAIRS * ROWS_PER_THREAD, STAGE_K + VEC)
#: runs of VEC steps the staged layout's hot loops load before their FMAs (UNROLL steps' worth)
RUNS: int = max(1, UNROLL // VEC)
assert STAGE_K % VEC == 0
#: gate blocks a forward thread accumulates at once (N + 3 <= 6, i.e. N <= 3: one pass)
GATE_CHUNK = 6
#: the layout "auto" takes per sweep, the faster on an H200 (bench/results/gpu.md, 2026-12-04):
#: the backward sweep sliced (7-9% less time per anti-diagonal than flat at 32x32 B64 D64,
#: 128x128 B16 D64 and 256x256 B8 D128), the forward and the saving-free forward flat (sliced
#: 12% slower per anti-diagonal and 10% per saving-free call at 32x32, within 1-7% either way at
#: the larger sizes)
AUTO_LAYOUT = {"forward": "flat", "infer": "flat", "backward": "sliced"}
#: "auto" runs the forward and backward sweeps of float32 layers of 2 or more dimensions and at least
#: this many hidden units in the tensor layout where it can (else AUTO_LAYOUT's, the path says why):
#: on an H100 (bench/results/gpu.md, 2026-12-06) its train step took 59 ms against 111 ms at 256x256
#: B8 D128 (forward sweep 22.2 against 54.9 µs per anti-diagonal, backward 46.9 against 118.3) and
#: 4.32 ms against 4.94 ms at 32x32 B64 D64; smaller layers (the 4-direction and 3-D ones of
#: bench/results/family_cuda.md have 32 and 16 units) and 1-D ones (a hyperplane of B rows: a tile
#: or two for a block's 8 warps) are not yet timed in it
AUTO_TENSOR_MIN_UNITS = 64
#: cells of an anti-diagonal per thread of the item layout (compile-time: sizes its register arrays),
#: MDNUMBA_CUDA_ITEM_ROWS: each weight it loads from shared memory serves that many cells
ITEM_ROWS: int = max(1, config.CUDA_ITEM_ROWS)
#: threads per block of the item layout (a block per batch item, :func:`_forward_item`; compile-time:
#: its kernels' launch bounds, one block per SM), MDNUMBA_CUDA_ITEM_THREADS (the simulator's 8)
ITEM_THREADS: int = 8 if SIMULATOR else config.CUDA_ITEM_THREADS
_ITEM_JIT = _JIT if SIMULATOR else dict(_JIT, launch_bounds=(ITEM_THREADS, 1))
#: tiles of hyperplane rows of the item layout, (forward, backward): forward h and c of two hyperplanes
#: (the cell math reads the parents' c from one and writes h and c into the next hyperplane's, no
#: global round trip; :func:`_item_forward_sweep` lays them out), backward one of dact (a second would
#: not fit beside UT at D = 64 float32)
ITEM_TILES = (4, 1)
#: elements of the item layout's tile a thread loads before storing them (:func:`_item_refill`)
REFILL_LOADS = 8
#: dynamic shared memory a block may opt in to when the device is not asked (the simulator):
#: an H100's or H200's 227 KiB
ITEM_SHARED_LIMIT = 227 * 1024
#: diagnostic (MDNUMBA_CUDA_SKIP, compile-time): the sweeps compute the recurrent sums of
#: :func:`_rows_preact` and :func:`_rows_pull` (else as if U = 0), and the cells' gate math of
#: :func:`_unit_forward` and :func:`_unit_backward` (else h, c and the gradients stay as they were)
RECURRENT_SUM: bool = "sum" not in config.CUDA_SKIP
CELL_MATH: bool = "cell" not in config.CUDA_SKIP
#: the largest N whose sweeps run the cell math on the thread's registers (:func:`_register_cells`;
#: larger ones on global memory, :func:`_unit_forward`); 0 with MDNUMBA_CUDA_CELL_REGISTERS=0
REGISTER_CELL_MAX_N: int = 3 if config.CUDA_CELL_REGISTERS else 0
if config.CUDA_SKIP:
    warnings.warn(f"MDNUMBA_CUDA_SKIP={','.join(config.CUDA_SKIP)}: the CUDA sweeps skip these stages, so "
                  "their results are wrong (a diagnostic for timing them; unset it)", stacklevel=2)

#: "coop_error": why a cooperative launch failed on the 'auto' path, per sweep kernel, block
#: shape, shared memory and argument types (:func:`_launch_key`; one that cannot be resident,
#: e.g. float64 with more registers, leaves the others cooperative); "coop_limit": the
#: co-residency limit per the same and device (:func:`_coop_limit`); "opt_in": the kernels, argument
#: types, shared sizes and devices whose opt-in to more shared memory is set (:func:`_opt_in_shared`)
_state: dict = {"last_path": None, "coop_error": {}, "coop_limit": {}, "scratch": {}, "opt_in": set()}


# ---------------------------------------------------------------- device functions
def _simulated_exp(x):
    """``exp`` under the simulator: in x's float type, inf past its range (``ln`` of its largest
    value), as the GPU's ``expf`` / ``exp``. The simulator's own is Python's ``math.exp``: it
    computes a float32 in float64 (an overflow of float32, e.g. an unshifted softmax's, went
    unseen) and raises on overflow. (NumPy's ``exp`` of a scalar under ``errstate`` took 7x the
    simulated layers' time.)"""
    kind = type(x)
    if x > (_LN_MAX32 if kind is np.float32 else _LN_MAX64):
        return kind(math.inf)
    return kind(math.exp(x))


_LN_MAX32, _LN_MAX64 = math.log(float(np.finfo(np.float32).max)), math.log(float(np.finfo(np.float64).max))


#: how the CUDA cell math is built (:func:`mdnumba.kernels.cell.build`): the GPU's own ``exp``,
#: or under the simulator one as faithful to float32 as it
CUDA_MATH = {"exp": _simulated_exp} if SIMULATOR else {}
_CELL = build(cuda.jit(device=True), **CUDA_MATH)
_cell_row_forward = _CELL["row_forward"]
_cell_row_backward = _CELL["row_backward"]


def _register_cells(N: int) -> tuple:
    """``(forward, backward)``: the cell math of unit j of one row on the thread's registers for
    N-D (N a constant here: local arrays of constant shape, indexed by constants once the calls
    are inlined, become registers). They run the shared row functions of
    :mod:`mdnumba.kernels.cell` with D = 1 on local arrays whose rows are the row itself (0), its
    children (1..N) and its parents (N+1..2N): the global loads (parents' c; in the backward the
    row's act and c, the children's dc and act) are issued together up front, and each result
    is stored once. On global memory the row functions are a chain of ~10 dependent round trips
    per row (each load waits for the store before it: the arrays may alias).

    Every neighbour is passed as present, an absent one with zeros (c, dc, act): a data-dependent
    row index would put the arrays in local memory. The cell math then adds ``F·0`` or ``w·(0 −
    c)`` where it skipped a term or subtracted ``w·c``: the same numbers, up to the sign of a zero."""
    G, N1, R = N + 3, N + 1, 2 * N + 1

    @cuda.jit(device=True)
    def neighbours(lp, lc, c, parent, base, s, b, B, j):
        """Parent d of the row at local row N+1+d: its c (0 if absent) into ``lc``."""
        for d in range(N):
            p = parent[s, d]
            lp[0, d] = N1 + d
            lc[N1 + d, 0] = 0  # not a conditional expression: 0 and a float32 make a float64
            if p >= 0:
                lc[N1 + d, 0] = c[base + p * B + b, j]

    @cuda.jit(device=True)
    def row_forward(h, c, act, acc, lp, lc, r, D, j, cell):
        """Row r's unit j from its pre-activations ``acc[0, 0..N+2]`` and its parents' c in ``lc``:
        act (the gates), c and h stored as :func:`mdnumba.kernels.cell.build`'s ``row_forward``
        computes them; returns ``(h, c)``."""
        la = cuda.local.array((1, G), act.dtype)
        lh = cuda.local.array((1, 1), act.dtype)
        for g in range(G):
            la[0, g] = acc[0, g]
        _cell_row_forward(lh, lc, la, lp, 0, 0, 0, 1, 1, cell, 0, 1)
        for g in range(G):
            act[r, g * D + j] = la[0, g]
        c[r, j] = lc[0, 0]
        h[r, j] = lh[0, 0]
        return lh[0, 0], lc[0, 0]

    @cuda.jit(device=True)
    def forward(h, c, act, parent, acc, r, base, s, b, B, D, j, cell):
        """:func:`row_forward` with the parents' c read from ``c``."""
        lc = cuda.local.array((R, 1), act.dtype)
        lp = cuda.local.array((1, N), numba.int64)
        neighbours(lp, lc, c, parent, base, s, b, B, j)
        return row_forward(h, c, act, acc, lp, lc, r, D, j, cell)

    @cuda.jit(device=True)
    def forward_tile(h, c, act, parent, acc, r, s, Tc, prev, tw, D, j, cell):
        """:func:`row_forward` with the parents' c read from the item layout's tile ``Tc`` of the
        previous hyperplane's c (rows of ``tw``, its first cell ``prev``; shared memory: no global
        round trip in the cell math)."""
        lc = cuda.local.array((R, 1), act.dtype)
        lp = cuda.local.array((1, N), numba.int64)
        for d in range(N):
            p = parent[s, d]
            lp[0, d] = N1 + d
            lc[N1 + d, 0] = 0
            if p >= 0:
                lc[N1 + d, 0] = Tc[(p - prev) * tw + j]
        return row_forward(h, c, act, acc, lp, lc, r, D, j, cell)

    @cuda.jit(device=True)
    def backward(dact, dc, act, c, parent, child, dhv, r, base, s, b, B, D, j, cell, lda):
        """Row r's unit j given its complete ``dh`` value ``dhv``: dc and dact stored as
        ``row_backward`` computes them (child d at local row 1+d: its dc and act, 0 if absent);
        its dact also left in ``lda[0, :G]`` (the caller's local array, at least G wide)."""
        la = cuda.local.array((N1, G), act.dtype)
        ldc = cuda.local.array((N1, 1), act.dtype)
        ldh = cuda.local.array((1, 1), act.dtype)
        lc = cuda.local.array((R, 1), act.dtype)
        lp = cuda.local.array((1, N), numba.int64)
        lch = cuda.local.array((1, N), numba.int64)
        for g in range(G):
            la[0, g] = act[r, g * D + j]
        lc[0, 0] = c[r, j]
        ldh[0, 0] = dhv
        for d in range(N):
            ch = child[s, d]
            lch[0, d] = 1 + d
            cr = base + ch * B + b
            ldc[1 + d, 0] = 0
            for g in range(G):
                la[1 + d, g] = 0
            if ch >= 0:
                ldc[1 + d, 0] = dc[cr, j]
                for g in range(G):
                    la[1 + d, g] = act[cr, g * D + j]
        neighbours(lp, lc, c, parent, base, s, b, B, j)
        _cell_row_backward(lda, ldc, ldh, la, lc, lp, lch, 0, 0, 0, 1, 1, cell, 0, 1)
        for g in range(G):
            dact[r, g * D + j] = lda[0, g]
        dc[r, j] = ldc[0, 0]

    return forward, forward_tile, backward


((_cell1_forward, _cell1_forward_tile, _cell1_backward),
 (_cell2_forward, _cell2_forward_tile, _cell2_backward),
 (_cell3_forward, _cell3_forward_tile, _cell3_backward)) = (_register_cells(n) for n in (1, 2, 3))


@cuda.jit(device=True)
def _register_forward(h, c, act, parent, acc, r, base, s, b, B, D, j, cell, width):
    """Row r's unit j from ``acc[0]`` on registers (:func:`_register_cells`), for N = width - 3
    (``width``, the gates' count, a constant at each call site); returns its ``(h, c)``."""
    if width == 4:
        return _cell1_forward(h, c, act, parent, acc, r, base, s, b, B, D, j, cell)
    if width == 5:
        return _cell2_forward(h, c, act, parent, acc, r, base, s, b, B, D, j, cell)
    return _cell3_forward(h, c, act, parent, acc, r, base, s, b, B, D, j, cell)


@cuda.jit(device=True)
def _register_forward_tile(h, c, act, parent, acc, r, s, Tc, prev, tw, D, j, cell, width):
    """:func:`_register_forward` with the parents' c from the item layout's tile ``Tc``."""
    if width == 4:
        return _cell1_forward_tile(h, c, act, parent, acc, r, s, Tc, prev, tw, D, j, cell)
    if width == 5:
        return _cell2_forward_tile(h, c, act, parent, acc, r, s, Tc, prev, tw, D, j, cell)
    return _cell3_forward_tile(h, c, act, parent, acc, r, s, Tc, prev, tw, D, j, cell)


@cuda.jit(device=True)
def _at(index):
    """``index`` (known >= 0) as an unsigned array index: numba then skips the negative-index
    wraparound it adds to every signed index (a compare and add per load in hot loops)."""
    return numba.uint64(index)


@cuda.jit(device=True)
def _divmod(a, b):
    """``(a // b, a % b)`` for ``0 <= a, b < 2**32`` (the launchers refuse arrays of
    :data:`MAX_ELEMENTS` or more) in 32-bit unsigned arithmetic: a 64-bit division is a
    ~70-instruction subroutine call on the GPU, a 32-bit one a few instructions inline."""
    q = numba.int64(numba.uint32(a) // numba.uint32(b))
    return q, a - q * b


if SIMULATOR:
    @cuda.jit(device=True)
    def _opaque(x):
        """``x`` itself (the simulator compiles nothing; on a GPU, an opaque copy)."""
        return x

    def _address(a, *index) -> int:
        """The byte offset of ``a[index]`` in the memory ``a`` views (a simulator array, or a view
        of one: shared memory and device arrays start 16-byte aligned, as a GPU's do)."""
        ary = getattr(getattr(a, "_item", a), "_ary", a)
        root = ary
        while isinstance(root.base, np.ndarray):
            root = root.base
        return ary.ctypes.data - root.ctypes.data + sum(i * st for i, st in zip(index, ary.strides))

    @cuda.jit(device=True)
    def _load4(a, i):
        """``a[i .. i+3]`` of the 1-D array ``a`` (checked: i a multiple of 4 and the address a
        multiple of 16 bytes, as a GPU's vector load needs)."""
        assert i % VEC == 0 and _address(a, i) % 16 == 0, "misaligned vector load"
        return a[i], a[i + 1], a[i + 2], a[i + 3]

    @cuda.jit(device=True)
    def _load4_row(a, r, k):
        """``a[r, k .. k+3]`` of the 2-D array ``a`` (checked aligned, as :func:`_load4`)."""
        assert (r * a.shape[1] + k) % VEC == 0 and _address(a, r, k) % 16 == 0, "misaligned vector load"
        return a[r, k], a[r, k + 1], a[r, k + 2], a[r, k + 3]
else:
    from llvmlite import ir as llvm_ir
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    @intrinsic
    def _opaque(typingctx, x):
        """The integer ``x`` through an inline-assembly ``mov`` with a side effect: the same
        number, but LLVM can neither see what it is nor hoist it out of a loop."""
        if not isinstance(x, numba.types.Integer):
            return None

        def codegen(context, builder, signature, args):
            kind = args[0].type
            reg = "l" if kind.width == 64 else "r"
            move = llvm_ir.InlineAsm(llvm_ir.FunctionType(kind, [kind]), f"mov.b{kind.width} $0, $1;",
                                     f"={reg},{reg}", side_effect=True)
            return builder.call(move, [args[0]])

        return x(x), codegen

    def _vector_load(context, builder, aryty, ary, indices):
        """The 4 elements from ``indices`` on of the C-contiguous array ``ary`` as one load of a
        4-vector, 16-byte aligned (one ``LDS.128`` from shared memory in float32, two in float64)."""
        arr = context.make_array(aryty)(context, builder, ary)
        ptr = cgutils.get_item_pointer(context, builder, aryty, arr, indices, wraparound=False)
        vec = llvm_ir.VectorType(context.get_data_type(aryty.dtype), VEC)
        value = builder.load(builder.bitcast(ptr, vec.as_pointer(ptr.type.addrspace)), align=16)
        return [builder.extract_element(value, llvm_ir.Constant(llvm_ir.IntType(32), e)) for e in range(VEC)]

    @intrinsic
    def _load4(typingctx, a, i):
        """``(a[i], .., a[i+3])`` of the 1-D shared array ``a``, i a multiple of 4 and ``a`` 16-byte
        aligned (else the GPU faults), in one vector load."""
        ret = numba.types.UniTuple(a.dtype, VEC)

        def codegen(context, builder, signature, args):
            vals = _vector_load(context, builder, a, args[0], [args[1]])
            return context.make_tuple(builder, ret, vals)

        return ret(a, i), codegen

    @intrinsic
    def _load4_row(typingctx, a, r, k):
        """``(a[r, k], .., a[r, k+3])`` of the 2-D shared array ``a`` in one vector load, as
        :func:`_load4` (its rows a multiple of 4 long, k a multiple of 4)."""
        ret = numba.types.UniTuple(a.dtype, VEC)

        def codegen(context, builder, signature, args):
            vals = _vector_load(context, builder, a, args[0], [args[1], args[2]])
            return context.make_tuple(builder, ret, vals)

        return ret(a, r, k), codegen


@cuda.jit(device=True)
def _per_plane(x, sliced):
    """The size ``x`` as the sweeps' hyperplane loops pass it on: opaque (:func:`_opaque`) in the
    sliced and staged layouts (``sliced``, a constant at each call site), so that what a plane
    works out from the sizes (offsets, counts, their clamps) is worked out per plane instead of
    hoisted out of the loop by LLVM and held in registers through the whole sweep. Compiled for
    sm_90 in float32, the sliced forward and saving-free kernels went from 255 registers and
    112-180 spilled bytes to 232 and 238 and none, the backward from 135 to 130 (the staged ones
    likewise, from 255 and 164-192 bytes to 222-231 and none, before their vector loads took them
    back to 255 and 32-48 bytes, none in a hot loop); their hot loops are unchanged. Not in the
    flat layout: there it spared no register (its unrolled global loads hold 255) and its hot
    loops issued 20% more instructions."""
    if sliced:
        return _opaque(x)
    return x


@cuda.jit(device=True)
def _stage(Ws, Wf, use_shared):
    """Copy flat weights ``Wf`` into the shared array ``Ws`` when ``use_shared`` (whole block calls it)."""
    if use_shared:
        for q in range(cuda.threadIdx.x, Wf.shape[0], cuda.blockDim.x):
            Ws[q] = Wf[q]
        cuda.syncthreads()


@cuda.jit(device=True)
def _stage_slice(Ws, Wf, nO, N, D, transposed, V):
    """Fill the shared array ``Ws`` with this block's unit slice (:func:`_block_slice`) of the flat
    weights ``Wf`` (the whole block calls it), in :func:`_slice_weights`' layout: runs of V (1, or
    :data:`VEC` in the staged layout; a constant at each call site) steps of each unit, the steps
    of each block padded with zeros to a multiple of V,
    ``Ws[((b*P/V + kq)*SLICE + jj)*V + kk] = U[q, V*kq + kk, d*G + g*D + j0 + jj]`` with
    ``b = d*(N+3) + g`` and P = D rounded up to V, or when ``transposed``
    ``= UT[q, V*kq + kk, d*D + j0 + jj]`` with ``b = d`` and P = G rounded up; zeros past unit D-1
    and in a block past the last scan. With V = 1: ``Ws[((d*(N+3) + g)*D + k)*SLICE + jj]``."""
    q, j0, _ = _block_slice(nO, D)
    _fill_slice(Ws, Wf, q, j0, N, D, transposed, V)
    cuda.syncthreads()


@cuda.jit(device=True)
def _slice_size(N, D, transposed, V):
    """Elements of a unit slice of :func:`_fill_slice`'s layout."""
    steps = (N + 3) * D if transposed else D
    return (N if transposed else N * (N + 3)) * ((steps + V - 1) // V) * V * SLICE


@cuda.jit(device=True)
def _fill_slice(Ws, Wf, q, j0, N, D, transposed, V, from_u=False):
    """:func:`_stage_slice`'s work for the slice of units ``j0 ..`` of scan q (no barrier); with
    ``from_u`` (and ``transposed``) UT's elements are read from U itself, ``U[q, j, d*G + g]``."""
    G = (N + 3) * D
    DNG = N * G * D
    steps = G if transposed else D
    Q = (steps + V - 1) // V
    for e in range(cuda.threadIdx.x, _slice_size(N, D, transposed, V), cuda.blockDim.x):
        rest, kk = _divmod(e, V)
        rest, jj = _divmod(rest, SLICE)
        b, kq = _divmod(rest, Q)
        k = kq * V + kk
        src = q * DNG + k * (N * D if transposed else N * G) + b * D + j0 + jj
        if from_u:
            src = q * DNG + (j0 + jj) * N * G + b * G + k
        if k < steps and j0 + jj < D and q * DNG < Wf.shape[0]:
            Ws[e] = Wf[src]
        else:
            Ws[e] = 0


@cuda.jit(device=True)
def _block_slice(nO, D):
    """This block's (scan q, first unit j0, share o) in the sliced layout: block
    ``(q*nJ + slice)*nO + o`` owns units ``j0 = slice*SLICE .. j0+SLICE-1`` of scan q and the
    (cell, row group) pairs ``o, o + nO, ..`` of every hyperplane (``nJ = ceil(D / SLICE)``)."""
    qs, o = _divmod(cuda.blockIdx.x, nO)
    q, sl = _divmod(qs, (D + SLICE - 1) // SLICE)
    return q, sl * SLICE, o


@cuda.jit(device=True)
def _flat_weights(uo, j, N, D, transposed):
    """Where unit j's weights are in the flat U (UT when ``transposed``) of the scan at ``uo``:
    ``(uo, k step, d step, gate step, unit column)``; U's element (k, d, g) of unit j is at
    ``uo + k*ks + d*ds + g*gs + uc``, UT's (g, d) at ``uo + d*ds + g*gs + uc``."""
    G = (N + 3) * D
    if transposed:
        return (uo, 0, D, N * D, j)
    return (uo, N * G, G, D, j)


@cuda.jit(device=True)
def _slice_weights(jj, N, D, transposed, V):
    """As :func:`_flat_weights` for unit jj of a staged slice (:func:`_stage_slice`, runs of V
    steps): the steps of the hot loops (k, or g when ``transposed``) are the constant SLICE, so
    each unrolled load's address is a base plus a constant; a step k that is a multiple of V is at
    ``k*SLICE`` from its block, its run's V weights of unit jj at ``jj*V`` from there."""
    P = ((N + 3) * D if transposed else D) + V - 1
    P -= P % V
    if transposed:
        return (0, 0, P * SLICE, SLICE, jj * V)
    return (0, SLICE, (N + 3) * P * SLICE, P * SLICE, jj * V)


@cuda.jit(device=True)
def _preact_steps(acc, src, hrow, Uf, u, ks, ucol, n, width):
    """``acc[i, g] += Σ_{k<n} src[hrow[i], k] · Uf[u + k*ks + ucol[g]]`` for the gates g < ``width``
    (the hot loop of :func:`_rows_preact`): :data:`UNROLL` steps' loads issued before their FMAs
    (memory latency, not arithmetic, bounds a sweep thread), unsigned indices (:func:`_at`) and a
    ``while`` loop (numba's ``range`` iterator adds a count and sign checks to each iteration)."""
    hv = cuda.local.array((UNROLL, ROWS_PER_THREAD), acc.dtype)
    uv = cuda.local.array((UNROLL, GATE_CHUNK), acc.dtype)
    k = 0
    while k + UNROLL <= n:  # UNROLL steps' loads first, then their FMAs
        for q in range(UNROLL):
            for i in range(ROWS_PER_THREAD):
                hv[q, i] = src[_at(hrow[i]), _at(k + q)]
            for g in range(width):
                uv[q, g] = Uf[_at(u + q * ks + ucol[g])]
        for q in range(UNROLL):
            for i in range(ROWS_PER_THREAD):
                for g in range(width):
                    acc[i, g] += hv[q, i] * uv[q, g]
        u += UNROLL * ks
        k += UNROLL
    while k < n:  # the last n % UNROLL steps
        for i in range(ROWS_PER_THREAD):
            hv[0, i] = src[_at(hrow[i]), _at(k)]
        for g in range(width):
            uv[0, g] = Uf[_at(u + ucol[g])]
        u += ks
        k += 1
        for i in range(ROWS_PER_THREAD):
            for g in range(width):
                acc[i, g] += hv[0, i] * uv[0, g]


def _row_loops(R: int, flat: bool) -> tuple:
    """``(next_row, run_steps)`` for threads of R rows (a constant here: their loops unroll and
    their local arrays become registers): the sweeps' with :data:`ROWS_PER_THREAD` batch rows and
    a 2-D tile, the item layout's with :data:`ITEM_ROWS` cells and a ``flat`` one (the rows' ``Hs``
    indices are then element offsets)."""

    @cuda.jit(device=True)
    def next_row(acc):
        """Shift the rows of the accumulators ``acc`` (R, width) up by one: a loop over rows that
        is not unrolled (its body, the cell math, is large) reads row 0 each time, a constant
        index (a local array indexed at run time lives in local memory, not in registers)."""
        for q in range(R - 1):
            for g in range(acc.shape[1]):
                acc[q, g] = acc[q + 1, g]

    @cuda.jit(device=True)
    def load_run(hv, wv, q, Hs, rows, Ws, w, k, wcol, width):
        """Run q of a staged hot loop's loads: ``hv[q, e, i] = Hs[rows[i], k + e]`` and ``wv[q, e, g] =
        Ws[w + wcol[g] + e]`` for e < :data:`VEC`, one vector load per row and per column."""
        for i in range(R):
            if flat:
                x0, x1, x2, x3 = _load4(Hs, _at(rows[i] + k))
            else:
                x0, x1, x2, x3 = _load4_row(Hs, _at(rows[i]), _at(k))
            hv[q, 0, i], hv[q, 1, i], hv[q, 2, i], hv[q, 3, i] = x0, x1, x2, x3
        for g in range(width):
            x0, x1, x2, x3 = _load4(Ws, _at(w + wcol[g]))
            wv[q, 0, g], wv[q, 1, g], wv[q, 2, g], wv[q, 3, g] = x0, x1, x2, x3

    @cuda.jit(device=True)
    def fma_run(acc, hv, wv, q, width):
        """``acc[i, g] += Σ_e hv[q, e, i] · wv[q, e, g]``, e in order (the scalar loop's order)."""
        for e in range(VEC):
            for i in range(R):
                for g in range(width):
                    acc[i, g] += hv[q, e, i] * wv[q, e, g]

    @cuda.jit(device=True)
    def run_steps(acc, Hs, rows, Ws, w, ks, wcol, n, width):
        """The staged and item layouts' hot loop, for the forward's sums and the backward's pull
        alike: ``acc[i, g] += Σ_{k<n} Hs[rows[i], k] · Ws[w + (k - k%VEC)*ks + wcol[g] + k%VEC]``
        over the block's tile and weights (:func:`_stage_rows`, :func:`_stage_slice` with runs of
        :data:`VEC`); n a multiple of VEC. :data:`RUNS` runs' vector loads (``load_run``) before
        their FMAs; the sum's order is the scalar loops'."""
        hv = cuda.local.array((RUNS, VEC, R), acc.dtype)
        wv = cuda.local.array((RUNS, VEC, GATE_CHUNK), acc.dtype)
        k = 0
        while k + RUNS * VEC <= n:
            for q in range(RUNS):
                load_run(hv, wv, q, Hs, rows, Ws, w + q * VEC * ks, k + q * VEC, wcol, width)
            for q in range(RUNS):
                fma_run(acc, hv, wv, q, width)
            w += RUNS * VEC * ks
            k += RUNS * VEC
        while k < n:  # the last runs, one at a time
            load_run(hv, wv, 0, Hs, rows, Ws, w, k, wcol, width)
            fma_run(acc, hv, wv, 0, width)
            w += VEC * ks
            k += VEC

    return next_row, run_steps


_next_row, _run_steps = _row_loops(ROWS_PER_THREAD, False)
_item_next_row, _item_run_steps = _row_loops(ITEM_ROWS, True)


@cuda.jit(device=True)
def _stage_rows(src, nbr, d, k0, kc, base, B, st):
    """The block's staged tile (staged layout; the whole block calls it): for the (cell, row
    group) pairs ``pair0 + pp < npairs`` of its share of the hyperplane (:func:`_block_slice`),
    ``Hs[pp*R + i, kk] = src[base + nbr[s, d]*B + b0 + i, k0 + kk]`` for kk < kc and 0 past it
    (the hot loops read whole runs of :data:`VEC`), R = :data:`ROWS_PER_THREAD` (nothing where the
    neighbour or the row is absent). Coalesced loads, all of a thread's in flight at once: one
    memory round trip per tile instead of one per :data:`UNROLL` steps of every thread. The
    tile's source rows are worked out once per round and neighbour d (k0 = 0) into the shared
    ``rows`` (-1: none), not per element; a thread loads the same columns of every row it loads (the
    block's threads divide :data:`STAGE_K` or are a multiple of it, :func:`_plan_slices`). ``st``:
    :func:`_staged_item`. A barrier on each side
    (the tile's last readers are done; the tile is complete)."""
    Hs, _, _, s0, o, nO, nbg, pair0, npairs, rows = st
    cuda.syncthreads()
    if k0 == 0:
        for slot in range(cuda.threadIdx.x, STAGE_SHAPE[0], cuda.blockDim.x):
            pp, i = _divmod(slot, ROWS_PER_THREAD)
            rows[slot] = -1
            if pair0 + pp < npairs:
                cell, g = _divmod(o + (pair0 + pp) * nO, nbg)
                b = g * ROWS_PER_THREAD + i
                p = nbr[s0 + cell, d]
                if p >= 0 and b < B:
                    rows[slot] = base + p * B + b
        cuda.syncthreads()
    cols = min(cuda.blockDim.x, STAGE_K)  # one divides the other (_plan_slices)
    first, kk0 = _divmod(cuda.threadIdx.x, cols)  # a thread's columns: the same in every row
    for kk in range(kk0, STAGE_K, cols):  # once, unless the block has fewer threads than columns
        for slot in range(first, STAGE_SHAPE[0], max(1, _divmod(cuda.blockDim.x, STAGE_K)[0])):
            row = rows[slot]
            if row >= 0:
                if kk < kc:
                    Hs[slot, kk] = src[_at(row), _at(k0 + kk)]
                else:
                    Hs[slot, kk] = 0
    cuda.syncthreads()


@cuda.jit(device=True)
def _unstaged(tile):
    """The staging context of a thread that reads global memory (``live``, nothing staged;
    ``tile``: the kernel's stand-in, of the staged one's types)."""
    return tile[0], True, 0, 0, 0, 0, 0, 0, 0, tile[1]


@cuda.jit(device=True)
def _rows_preact(act, h, c, Uf, wl, parent, base, s, b0, nb, j, B, D, g0, width, cell, staged, st):
    """Gate blocks ``g0 .. g0+width-1`` (those < N+3) of unit j for the ``nb`` rows
    ``r_i = base + s*B + b0 + i``: ``act[r_i, col] += Σ_d Σ_k h[base + parent_d(s)*B + b0 + i, k] ·
    U[k, d*G + col]``, ``col = g*D + j`` (U's elements where ``wl`` says, :func:`_flat_weights`,
    :func:`_slice_weights`). Each weight loaded is used for
    ROWS_PER_THREAD rows and each h value for every gate: accumulators stay in registers.
    For N <= :data:`REGISTER_CELL_MAX_N` (all gates in this one call) the cell math follows on
    them (:func:`_register_cells`): act, c and h of unit j are stored, not the pre-activations.
    ``staged`` (a constant at each call site): the parents' rows of h are read from the block's
    shared tile, :data:`STAGE_K` steps at a time (:func:`_stage_rows`, ``st``:
    :func:`_staged_item`; a thread not ``live`` stages and stores nothing), else from global memory
    (``st``: :func:`_unstaged`).

    The k loop (:func:`_preact_steps`) is the hot loop and kept lean (compiled for sm_90 it went
    from ~9 to ~3.2 instructions per FMA in 2D): offsets hoisted out of it and no per-gate branch
    (gates past ``ng`` and rows past ``nb`` repeat the last real one and are not stored).
    ``width`` (<= GATE_CHUNK) is a constant at each call site, so the loops over gates unroll
    to exactly that many accumulators."""
    N = parent.shape[1]
    uo, ks, ds, gs, uc = wl
    ng = min(N + 3 - g0, GATE_CHUNK)
    r = base + s * B + b0
    live = st[1]
    acc = cuda.local.array((ROWS_PER_THREAD, GATE_CHUNK), act.dtype)
    col = cuda.local.array(GATE_CHUNK, numba.int64)
    ucol = cuda.local.array(GATE_CHUNK, numba.int64)
    hrow = cuda.local.array(ROWS_PER_THREAD, numba.int64)
    for g in range(width):
        col[g] = (g0 + min(g, ng - 1)) * D + j
        ucol[g] = (g0 + min(g, ng - 1)) * gs + uc
    for i in range(ROWS_PER_THREAD):  # not live: the row's owner writes it (no barrier between, without sums)
        for g in range(width):
            acc[i, g] = 0
            if live:
                acc[i, g] = act[r + min(i, nb - 1), col[g]]
    for d in range(N if RECURRENT_SUM else 0):
        p = parent[s, d]
        if not staged:
            if p >= 0:
                for i in range(ROWS_PER_THREAD):
                    hrow[i] = base + p * B + b0 + min(i, nb - 1)
                _preact_steps(acc, h, hrow, Uf, uo + d * ds, ks, ucol, D, width)
            continue
        for i in range(ROWS_PER_THREAD):
            hrow[i] = st[2] + min(i, nb - 1)
        for k0 in range(0, D, STAGE_K):
            kc = min(STAGE_K, D - k0)
            _stage_rows(h, parent, d, k0, kc, base, B, st)
            if live and p >= 0:
                _run_steps(acc, st[0], hrow, Uf, uo + d * ds + k0 * ks, ks, ucol, kc + (-kc) % VEC, width)
    fused = CELL_MATH and N <= REGISTER_CELL_MAX_N
    for i in range(ROWS_PER_THREAD):  # row i in acc[0] (_next_row): acc can live in registers
        if live and i < nb:
            if not fused:
                for g in range(width):
                    if g < ng:
                        act[r + i, col[g]] = acc[0, g]
            else:
                _register_forward(h, c, act, parent, acc, r + i, base, s, b0 + i, B, D, j, cell, width)
        _next_row(acc)


@cuda.jit(device=True)
def _unit_forward(h, c, act, Uf, wl, parent, base, s, b0, nb, j, B, D, cell, staged, st):
    """Unit j of the ``nb`` rows ``base + s*B + b0 + i``: the N+3 pre-activations from
    :func:`_rows_preact` (``staged``, ``st`` as there), then the shared cell math
    (:mod:`mdnumba.kernels.cell`), there on registers for N <= :data:`REGISTER_CELL_MAX_N`, else
    here on ``act``."""
    N = parent.shape[1]
    for g0 in range(0, N + 3, GATE_CHUNK):
        ng = min(N + 3 - g0, GATE_CHUNK)
        if ng == 5:  # 2D; a constant width lets the compiler drop unused accumulators (3D: 6)
            _rows_preact(act, h, c, Uf, wl, parent, base, s, b0, nb, j, B, D, g0, 5, cell, staged, st)
        elif ng == 4:  # 1D
            _rows_preact(act, h, c, Uf, wl, parent, base, s, b0, nb, j, B, D, g0, 4, cell, staged, st)
        else:
            _rows_preact(act, h, c, Uf, wl, parent, base, s, b0, nb, j, B, D, g0, GATE_CHUNK, cell, staged,
                         st)
    for i in range(nb if CELL_MATH and N > REGISTER_CELL_MAX_N and st[1] else 0):
        _cell_row_forward(h, c, act, parent, base, s, b0 + i, B, D, cell, j, j + 1)


@cuda.jit(device=True)
def _work_item(t, n, s0, nbg, B, D, MB, DNG):
    """Item t of a hyperplane whose first cell is s0, n items per scan: (row offset, weight
    offset, cell, first batch item, rows, unit); ``nbg`` groups of ROWS_PER_THREAD batch items
    per cell. Scan g owns rows ``g*MB ..`` and weights ``g*DNG ..``."""
    grp, tt = _divmod(t, n)
    q, j = _divmod(tt, D)
    cell, g = _divmod(q, nbg)
    b0 = g * ROWS_PER_THREAD
    return grp * MB, grp * DNG, s0 + cell, b0, min(ROWS_PER_THREAD, B - b0), j


@cuda.jit(device=True)
def _plane(diag_off, parent, k, B, D):
    """Hyperplane k's first cell s0, items per scan n, row groups per cell, rows per scan slab MB
    and weights per scan DNG (the sizes :func:`_work_item` splits an item index with)."""
    s0 = diag_off[k]
    nbg = (B + ROWS_PER_THREAD - 1) // ROWS_PER_THREAD
    N = parent.shape[1]
    return s0, (diag_off[k + 1] - s0) * nbg * D, nbg, parent.shape[0] * B, N * (N + 3) * D * D


@cuda.jit(device=True)
def _plane_items(n, D, S, nO, start, stride, sliced):
    """``(first, end, step)`` of this thread's items of a hyperplane with ``n`` items per scan
    (cells * row groups * D) in each of S scans (:func:`_item` decodes them). Flat layout:
    grid-stride over all of them. ``sliced`` (a constant at each call site): block-stride over
    its share of the plane's (cell, row group) pairs times SLICE units."""
    if not sliced:
        return start, n * S, stride
    q, _, o = _block_slice(nO, D)
    pairs = _divmod(n, D)[0]
    m = 0
    if pairs > o and q < S:
        m = _divmod(pairs - o + nO - 1, nO)[0]
    return cuda.threadIdx.x, m * SLICE, cuda.blockDim.x


@cuda.jit(device=True)
def _item(t, n, s0, nbg, B, D, MB, DNG, N, nO, transposed, sliced, V):
    """Item t of :func:`_plane_items` (sizes as :func:`_work_item`'s): (whether the unit exists,
    the scan's row offset, cell, first batch item, rows, unit j, where its weights are:
    :func:`_flat_weights` / :func:`_slice_weights` with runs of V)."""
    if not sliced:
        lo, uo, s, b0, nb, j = _work_item(t, n, s0, nbg, B, D, MB, DNG)
        return True, lo, s, b0, nb, j, _flat_weights(uo, j, N, D, transposed)
    q, j0, o = _block_slice(nO, D)
    m, jj = _divmod(t, SLICE)
    cell, g = _divmod(o + m * nO, nbg)
    b0 = g * ROWS_PER_THREAD
    j = j0 + jj
    return (j < D, q * MB, s0 + cell, b0, min(ROWS_PER_THREAD, B - b0), j,
            _slice_weights(jj, N, D, transposed, V))


@cuda.jit(device=True)
def _staged_item(tile, t0, first, end, n, s0, nbg, B, D, MB, DNG, N, nO, transposed):
    """Item ``t0 + first`` of the staged round that starts at item ``t0`` (sliced layout's items,
    :func:`_plane_items`), clamped to the last one (a thread past it, or on a unit past D, takes
    part in the staging only): :func:`_item`'s row offset, cell, first batch item, rows, unit j
    (within D) and weights, and what :func:`_stage_rows` and its reader need: ``(the tile, live,
    the item's first tile row, s0, o, nO, nbg, the round's first pair, the block's pairs on the
    hyperplane, the tile rows' sources)``; ``tile``: the block's ``(Hs, rows)``."""
    t = min(t0 + first, end - 1)
    ok, lo, s, b0, nb, j, wl = _item(t, n, s0, nbg, B, D, MB, DNG, N, nO, transposed, True, VEC)
    pair0 = _divmod(t0, SLICE)[0]
    slot0 = (_divmod(t, SLICE)[0] - pair0) * ROWS_PER_THREAD
    live = ok and t0 + first < end
    st = (tile[0], live, slot0, s0, _block_slice(nO, D)[2], nO, nbg, pair0, _divmod(end, SLICE)[0], tile[1])
    return lo, s, b0, nb, min(j, D - 1), wl, st


@cuda.jit(device=True)
def _forward_plane(h, c, act, Uf, tile, diag_off, parent, B, D, cell, k, start, stride, nO, sliced, staged):
    """This thread's items of hyperplane k (:func:`_plane_items`); ``staged`` (sliced layout, the
    parents' h through the block's ``tile``): in rounds of one item per thread of the block, every
    thread in each (:func:`_staged_item`)."""
    s0, n, nbg, MB, DNG = _plane(diag_off, parent, k, B, D)
    first, end, step = _plane_items(n, D, _divmod(act.shape[0], MB)[0], nO, start, stride, sliced)
    N = parent.shape[1]
    if staged:
        for t0 in range(0, end, step):
            lo, s, b0, nb, j, wl, st = _staged_item(tile, t0, first, end, n, s0, nbg, B, D, MB, DNG, N, nO,
                                                    False)
            _unit_forward(h, c, act, Uf, wl, parent, lo, s, b0, nb, j, B, D, cell, True, st)
        return
    for t in range(first, end, step):
        ok, lo, s, b0, nb, j, wl = _item(t, n, s0, nbg, B, D, MB, DNG, N, nO, False, sliced, 1)
        if ok:
            _unit_forward(h, c, act, Uf, wl, parent, lo, s, b0, nb, j, B, D, cell, False, _unstaged(tile))


@cuda.jit(device=True)
def _fill_parents(lp, parent, diag_off, k, last, start, stride):
    """Grid-stride: the slots of hyperplane k's parents into ``lp`` (CPU: ``_rolling_parents`` of
    :mod:`mdnumba.kernels.wavefront`: plane k's cells take slots ``(k % 2)*M + i``, M =
    ``lp.shape[0] / 2``); nothing for ``k >= last``."""
    if k >= last:
        return
    N = parent.shape[1]
    M = _divmod(lp.shape[0], 2)[0]
    cur = _divmod(k, 2)[1] * M
    s0 = diag_off[k]
    p0 = s0
    if k > 0:
        p0 = diag_off[k - 1]
    for t in range(start, (diag_off[k + 1] - s0) * N, stride):
        i, d = _divmod(t, N)
        p = parent[s0 + i, d]
        if p >= 0:
            lp[cur + i, d] = M - cur + p - p0
        else:
            lp[cur + i, d] = -1


@cuda.jit(device=True)
def _rows_project(act, x, src, W, bias, q, r, row0, nb, j, D, ng):
    """The input projection of unit j for the ``nb`` rows ``r + i``: ``act[r + i, g*D + j] =
    bias[q, g*D + j] + Σ_c x[src[q, row0 + i], c] · W[q, c, g*D + j]`` for the gates g < ng
    (src -1, a state cell: the bias alone), summed over c in order. Each weight loaded serves
    every row (it was loaded once per row). Rows past nb repeat the last one and are not stored
    (constant trip counts: the accumulators stay in registers)."""
    acc = cuda.local.array(ROWS_PER_THREAD, act.dtype)
    xrow = cuda.local.array(ROWS_PER_THREAD, numba.int64)
    for i in range(ROWS_PER_THREAD):
        xrow[i] = max(src[q, row0 + min(i, nb - 1)], 0)  # any real row for a state cell's
    C = W.shape[1]
    for g in range(ng):
        col = g * D + j
        bv = bias[q, col]
        for i in range(ROWS_PER_THREAD):
            acc[i] = bv
        cc = 0
        while cc < C:
            w = W[q, _at(cc), _at(col)]
            for i in range(ROWS_PER_THREAD):
                acc[i] += x[_at(xrow[i]), _at(cc)] * w
            cc += 1
        for i in range(ROWS_PER_THREAD):
            if i < nb:
                if src[q, row0 + i] >= 0:
                    act[r + i, col] = acc[i]
                else:
                    act[r + i, col] = bv


@cuda.jit(device=True)
def _infer_plane(out, h, c, act, Uf, tile, lp, x, src, W, bias, diag_off, B, D, cell, k, start, stride, nO,
                 sliced, staged):
    """This thread's items (:func:`_plane_items`) of hyperplane k in the two-plane buffers (slots of
    :func:`_fill_parents`): per (scan q, cell, row group, unit j) the input projection
    ``act[r, g*D + j] = bias_q + x[src[q, ·]] @ W_q`` (src -1: bias only), then
    :func:`_unit_forward` (parents by ``lp``), then h into ``out[src, q, j]``; ``staged`` as in
    :func:`_forward_plane`."""
    M = _divmod(lp.shape[0], 2)[0]
    cur = _divmod(k, 2)[1] * M
    s0 = diag_off[k]
    N = lp.shape[1]
    nbg = (B + ROWS_PER_THREAD - 1) // ROWS_PER_THREAD
    n = (diag_off[k + 1] - s0) * nbg * D
    MB = lp.shape[0] * B
    DNG = N * (N + 3) * D * D
    first, end, step = _plane_items(n, D, W.shape[0], nO, start, stride, sliced)
    for t in range(first if not staged else 0, end, step):
        if staged:  # rounds of the block (t is the round's first item), every thread in each
            lo, s, b0, nb, j, wl, st = _staged_item(tile, t, first, end, n, cur, nbg, B, D, MB, DNG, N, nO,
                                                    False)
        else:
            ok, lo, s, b0, nb, j, wl = _item(t, n, cur, nbg, B, D, MB, DNG, N, nO, False, sliced, 1)
            if not ok:
                continue
            st = _unstaged(tile)
        q = _divmod(lo, MB)[0]
        row0 = (s0 + s - cur) * B + b0  # the cell's first row in src
        if st[1]:
            _rows_project(act, x, src, W, bias, q, lo + s * B + b0, row0, nb, j, D, N + 3)
        _unit_forward(h, c, act, Uf, wl, lp, lo, s, b0, nb, j, B, D, cell, staged, st)
        for i in range(nb if st[1] else 0):
            sr = src[q, row0 + i]
            if sr >= 0:
                out[sr, q, j] = h[lo + s * B + b0 + i, j]


@cuda.jit(device=True)
def _pull_steps(acc, src, crow, UTf, q, gs, n):
    """``acc[i, 0] += Σ_{g<n} src[crow[i], g] · UTf[q + g*gs]`` (the hot loop of :func:`_rows_pull`),
    :data:`UNROLL` steps' loads before their FMAs, as :func:`_preact_steps`."""
    uv = cuda.local.array(UNROLL, acc.dtype)
    dv = cuda.local.array((UNROLL, ROWS_PER_THREAD), acc.dtype)
    g = 0
    while g + UNROLL <= n:  # UNROLL steps' loads first, then their FMAs
        for p in range(UNROLL):
            uv[p] = UTf[_at(q + p * gs)]
            for i in range(ROWS_PER_THREAD):
                dv[p, i] = src[_at(crow[i]), _at(g + p)]
        for p in range(UNROLL):
            for i in range(ROWS_PER_THREAD):
                acc[i, 0] += dv[p, i] * uv[p]
        q += UNROLL * gs
        g += UNROLL
    while g < n:  # the last n % UNROLL steps
        u = UTf[_at(q)]
        for i in range(ROWS_PER_THREAD):
            acc[i, 0] += src[_at(crow[i]), _at(g)] * u
        q += gs
        g += 1


@cuda.jit(device=True)
def _rows_pull(dh, dact, dc, act, c, UTf, wl, parent, child, base, s, b0, nb, j, B, D, cell, staged, st):
    """``dh[r_i, j] += Σ_d Σ_g dact[base + child_d(s)*B + b0 + i, g] · UT[g, d*D + j]`` for the
    ``nb`` rows ``r_i = base + s*B + b0 + i`` (UT's elements where ``wl`` says, :func:`_flat_weights`;
    each weight serves every row); for N <= :data:`REGISTER_CELL_MAX_N` then the cell math on
    registers (:func:`_register_cells`: dc, dact of unit j). ``staged``, ``st``: the children's
    rows of dact through the block's tile, as in :func:`_rows_preact`.
    The g loop (:func:`_pull_steps`) is kept lean as in :func:`_rows_preact` (~17 -> ~5
    instructions per FMA)."""
    N = parent.shape[1]
    G = (N + 3) * D
    uo, _, ds, gs, uc = wl
    r = base + s * B + b0
    live = st[1]
    acc = cuda.local.array((ROWS_PER_THREAD, 1), dh.dtype)
    for i in range(ROWS_PER_THREAD):  # rows past nb repeat the last one and are not stored
        acc[i, 0] = 0
        if live:
            acc[i, 0] = dh[r + min(i, nb - 1), j]
    crow = cuda.local.array(ROWS_PER_THREAD, numba.int64)
    wcol = cuda.local.array(1, numba.int64)  # the staged loop's one column (:func:`_run_steps`)
    wcol[0] = uc
    for d in range(N if RECURRENT_SUM else 0):
        ch = child[s, d]
        if not staged:
            if ch >= 0:
                for i in range(ROWS_PER_THREAD):
                    crow[i] = base + ch * B + b0 + min(i, nb - 1)
                _pull_steps(acc, dact, crow, UTf, uo + d * ds + uc, gs, G)
            continue
        for i in range(ROWS_PER_THREAD):
            crow[i] = st[2] + min(i, nb - 1)
        for g0 in range(0, G, STAGE_K):
            kc = min(STAGE_K, G - g0)
            _stage_rows(dact, child, d, g0, kc, base, B, st)
            if live and ch >= 0:
                _run_steps(acc, st[0], crow, UTf, uo + d * ds + g0 * gs, gs, wcol, kc + (-kc) % VEC, 1)
    fused = CELL_MATH and N <= REGISTER_CELL_MAX_N
    lda = cuda.local.array((1, GATE_CHUNK), dh.dtype)
    for i in range(ROWS_PER_THREAD):  # row i in acc[0] (_next_row): acc can live in registers
        dhv = acc[0, 0]
        _next_row(acc)
        if i >= nb or not live:
            continue
        dh[r + i, j] = dhv
        if not fused:
            continue
        if N == 1:
            _cell1_backward(dact, dc, act, c, parent, child, dhv, r + i, base, s, b0 + i, B, D, j, cell, lda)
        elif N == 2:
            _cell2_backward(dact, dc, act, c, parent, child, dhv, r + i, base, s, b0 + i, B, D, j, cell, lda)
        else:
            _cell3_backward(dact, dc, act, c, parent, child, dhv, r + i, base, s, b0 + i, B, D, j, cell, lda)


@cuda.jit(device=True)
def _unit_backward(dact, dc, dh, act, c, UTf, wl, parent, child, base, s, b0, nb, j, B, D, cell, staged, st):
    """Pull-form backward of unit j of the ``nb`` rows ``base + s*B + b0 + i``:
    ``dh += Σ_d U_dᵀ da_child_d`` (:func:`_rows_pull`; ``staged``, ``st`` as there), then the shared
    cell math (``dc``, ``dact`` of unit j only), there on registers for N <= :data:`REGISTER_CELL_MAX_N`."""
    _rows_pull(dh, dact, dc, act, c, UTf, wl, parent, child, base, s, b0, nb, j, B, D, cell, staged, st)
    for i in range(nb if CELL_MATH and parent.shape[1] > REGISTER_CELL_MAX_N and st[1] else 0):
        _cell_row_backward(dact, dc, dh, act, c, parent, child, base, s, b0 + i, B, D, cell, j, j + 1)


@cuda.jit(device=True)
def _backward_plane(dact, dc, dh, act, c, UTf, tile, diag_off, parent, child, B, D, cell, k, start, stride,
                    nO, sliced, staged):
    """This thread's items of hyperplane k (:func:`_plane_items`; ``staged`` as in :func:`_forward_plane`)."""
    s0, n, nbg, MB, DNG = _plane(diag_off, parent, k, B, D)
    first, end, step = _plane_items(n, D, _divmod(act.shape[0], MB)[0], nO, start, stride, sliced)
    N = parent.shape[1]
    if staged:
        for t0 in range(0, end, step):
            lo, s, b0, nb, j, wl, st = _staged_item(tile, t0, first, end, n, s0, nbg, B, D, MB, DNG, N, nO,
                                                    True)
            _unit_backward(dact, dc, dh, act, c, UTf, wl, parent, child, lo, s, b0, nb, j, B, D, cell, True,
                           st)
        return
    for t in range(first, end, step):
        ok, lo, s, b0, nb, j, wl = _item(t, n, s0, nbg, B, D, MB, DNG, N, nO, True, sliced, 1)
        if ok:
            _unit_backward(dact, dc, dh, act, c, UTf, wl, parent, child, lo, s, b0, nb, j, B, D, cell, False,
                           _unstaged(tile))


# ---------------------------------------------------------------- item layout
@cuda.jit(device=True)
def _item_shared(sh, Wf, diag_off, q, N, D, transposed):
    """The item layout's block ``q*B + b``: its dynamic shared memory ``sh``
    as ``(Ws, T)``. ``Ws``: all of scan q's weights (U flat ``Wf``, read as UT when ``transposed``),
    slice after slice of :data:`SLICE` units in :func:`_fill_slice`'s layout (runs of :data:`VEC`);
    ``T``: the tile of one hyperplane's rows (h forward, dact backward), flat, rows of
    :func:`_item_width` steps, a row per cell of the largest hyperplane and a last row of zeros
    (an absent neighbour's); forward four such tiles, one after the other (:func:`_item_tiles`).
    The whole block calls it; T starts all zeros. (Flat, not reshaped: numba's reshape takes a
    local-memory frame.)"""
    size = _slice_size(N, D, transposed, VEC)
    nW = _divmod(D + SLICE - 1, SLICE)[0] * size
    for sl in range(_divmod(nW, size)[0]):
        _fill_slice(sh[sl * size:(sl + 1) * size], Wf, q, sl * SLICE, N, D, transposed, VEC, transposed)
    rows = 0
    for k in range(diag_off.shape[0] - 1):
        rows = max(rows, diag_off[k + 1] - diag_off[k])
    T = sh[nW:nW + _item_tiles(transposed) * (rows + 1) * _item_width(N, D, transposed)]
    for e in range(cuda.threadIdx.x, T.size, cuda.blockDim.x):
        T[e] = 0
    cuda.syncthreads()
    return sh[:nW], T


@cuda.jit(device=True)
def _item_tiles(transposed):
    """Tiles of the item layout (:data:`ITEM_TILES`, also for the host's :func:`_plan_items`)."""
    return ITEM_TILES[1] if transposed else ITEM_TILES[0]


@cuda.jit(device=True)
def _item_width(N, D, transposed):
    """Steps of a row of the item layout's tile: D (h) or (N+3)*D (dact, ``transposed``), rounded
    up to a multiple of :data:`VEC`."""
    steps = (N + 3) * D if transposed else D
    return steps + (-steps) % VEC


@cuda.jit(device=True)
def _item_refill(T, src, s0, n, base, b, B, width):
    """The rows of ``src`` of the n cells ``s0 ..`` (a hyperplane's) for the block's batch item b
    into the tile (rows of ``width`` steps), ``T[(s - s0)*width + kk] = src[base + s*B + b, kk]``
    (0 past src's columns), a barrier on each side."""
    cuda.syncthreads()
    steps = src.shape[1]
    total = n * width
    vals = cuda.local.array(REFILL_LOADS, T.dtype)
    step = cuda.blockDim.x
    for e0 in range(cuda.threadIdx.x, total, step * REFILL_LOADS):
        for u in range(REFILL_LOADS):  # the loads first: one memory round trip per REFILL_LOADS
            slot, kk = _divmod(e0 + u * step, width)
            vals[u] = 0
            if e0 + u * step < total and kk < steps:
                vals[u] = src[_at(base + (s0 + slot) * B + b), _at(kk)]
        for u in range(REFILL_LOADS):
            if e0 + u * step < total:
                T[e0 + u * step] = vals[u]
    cuda.syncthreads()


@cuda.jit(device=True)
def _item_edge(T, src, diag_off, nbr, k, base, b, B, width):
    """Before the first hyperplane k of a sweep: the neighbours (``nbr``: parents forward, k = 0;
    children backward, k = K-1) of its cells that lie outside the swept hyperplanes (a layer's
    state cells, seeded before the sweep: one per scan and item, as few as any hyperplane's cells,
    so they fit in the tile) into the tile (:func:`_item_refill`); returns the first cell of the
    tile's rows (the first cell after k's when there are none)."""
    s0 = diag_off[k]
    lo, hi = s0, diag_off[k + 1]
    for s in range(s0, diag_off[k + 1]):
        for d in range(nbr.shape[1]):
            p = nbr[s, d]
            if p >= 0:
                lo, hi = min(lo, p), max(hi, p + 1)
    first = lo if lo < s0 else diag_off[k + 1]
    n = s0 - lo if lo < s0 else hi - diag_off[k + 1]
    if n > 0:
        _item_refill(T, src, first, n, base, b, B, width)
    return first


@cuda.jit(device=True)
def _item_rows(rows, nbr, d, s, nb, first, T, width):
    """``rows[i]``: where the flat tile ``T`` (rows of ``width``) holds neighbour d of cell
    ``s + min(i, nb - 1)``, ``(its skewed index - first)*width`` (``first``: the first cell of its
    hyperplane), or the last row, of zeros."""
    for i in range(ITEM_ROWS):
        p = nbr[s + min(i, nb - 1), d]
        rows[i] = (p - first) * width if p >= 0 else T.size - width


@cuda.jit(device=True)
def _item_unit_forward(h, c, act, Ws, T, Tn, Tc, Tcn, parent, base, s, nb, b, B, D, j, prev, s0, cell, width):
    """Unit j of the ``nb`` cells ``s + i`` of batch item b (item layout): ``a_g = act[r_i, g*D + j]
    + Σ_d Σ_k T[parent_d(s+i) - prev, k] · U[k, d*G + g*D + j]`` (T: h of the previous
    hyperplane, whose first cell is ``prev``; :func:`_run_steps` on the slices of Ws), then the
    cell math as in :func:`_rows_preact`, row by row, the parents' c from ``Tc`` (laid out as T), h
    and c also into ``Tn[s + i - s0, j]`` and ``Tcn`` (the next tiles; ``s0``: the first cell of
    this hyperplane)."""
    N = parent.shape[1]
    tw = _item_width(N, D, False)
    sl, jj = _divmod(j, SLICE)
    _, ks, ds, gs, uc = _slice_weights(jj, N, D, False, VEC)
    w0 = sl * _slice_size(N, D, False, VEC)
    acc = cuda.local.array((ITEM_ROWS, GATE_CHUNK), act.dtype)
    ucol = cuda.local.array(GATE_CHUNK, numba.int64)
    hrow = cuda.local.array(ITEM_ROWS, numba.int64)
    for g in range(width):
        ucol[g] = g * gs + uc
    for i in range(ITEM_ROWS):
        for g in range(width):
            acc[i, g] = act[base + (s + min(i, nb - 1)) * B + b, g * D + j]
    for d in range(N if RECURRENT_SUM else 0):
        _item_rows(hrow, parent, d, s, nb, prev, T, tw)
        _item_run_steps(acc, T, hrow, Ws, w0 + d * ds, ks, ucol, tw, width)
    for i in range(ITEM_ROWS):  # row i in acc[0] (_next_row)
        r = base + (s + i) * B + b
        if i < nb:
            if not (CELL_MATH and N <= REGISTER_CELL_MAX_N):
                for g in range(width):
                    act[r, g * D + j] = acc[0, g]
                if CELL_MATH:
                    _cell_row_forward(h, c, act, parent, base, s + i, b, B, D, cell, j, j + 1)
                hv, cv = h[r, j], c[r, j]
            else:
                hv, cv = _register_forward_tile(h, c, act, parent, acc, r, s + i, Tc, prev, tw, D, j, cell,
                                                width)
            Tn[(s + i - s0) * tw + j] = hv
            Tcn[(s + i - s0) * tw + j] = cv
        _item_next_row(acc)


@cuda.jit(device=True)
def _item_pull(acc, dh, Ws, T, child, base, s, nb, b, B, D, j, nxt):
    """Unit j of the ``nb`` cells ``s + i`` of batch item b (item layout, pull form): ``acc[i, 0] =
    dh[r_i, j] + Σ_d Σ_g T[child_d(s+i) - nxt, g] · UT[g, d*D + j]`` (T: dact of the next
    hyperplane, whose first cell is ``nxt``; :func:`_run_steps` on the slices of Ws)."""
    N = child.shape[1]
    tw = _item_width(N, D, True)
    sl, jj = _divmod(j, SLICE)
    _, _, ds, gs, uc = _slice_weights(jj, N, D, True, VEC)
    w0 = sl * _slice_size(N, D, True, VEC)
    crow = cuda.local.array(ITEM_ROWS, numba.int64)
    wcol = cuda.local.array(1, numba.int64)
    wcol[0] = uc
    for i in range(ITEM_ROWS):
        acc[i, 0] = dh[base + (s + min(i, nb - 1)) * B + b, j]
    for d in range(N if RECURRENT_SUM else 0):
        _item_rows(crow, child, d, s, nb, nxt, T, tw)
        _item_run_steps(acc, T, crow, Ws, w0 + d * ds, gs, wcol, tw, 1)


@cuda.jit(device=True)
def _item_cells_backward(acc, dact, dc, dh, act, c, T, parent, child, base, s, nb, b, B, D, j, s0, cell,
                         direct, width):
    """The cell math of unit j of the ``nb`` cells ``s + i`` (item layout) from their dh in ``acc``
    (:func:`_item_pull`), row by row as in :func:`_rows_pull`; when ``direct``, each row's dact of
    unit j also into its row of the tile, ``T[(s + i - s0)*tw + g*D + j]`` (``s0``: the first cell of
    this hyperplane; ``width`` = N + 3, the gates' count, a constant at each call site)."""
    N = parent.shape[1]
    tw = _item_width(N, D, True)
    lda = cuda.local.array((1, GATE_CHUNK), dh.dtype)
    for i in range(ITEM_ROWS):
        dhv = acc[0, 0]
        _item_next_row(acc)
        r = base + (s + i) * B + b
        if i >= nb:
            continue
        dh[r, j] = dhv
        if not (CELL_MATH and N <= REGISTER_CELL_MAX_N):
            if CELL_MATH:
                _cell_row_backward(dact, dc, dh, act, c, parent, child, base, s + i, b, B, D, cell, j, j + 1)
            if direct:  # (the loops' trip counts constants: lda stays in registers)
                for g in range(width):
                    lda[0, g] = dact[r, g * D + j]
        elif width == 4:
            _cell1_backward(dact, dc, act, c, parent, child, dhv, r, base, s + i, b, B, D, j, cell, lda)
        elif width == 5:
            _cell2_backward(dact, dc, act, c, parent, child, dhv, r, base, s + i, b, B, D, j, cell, lda)
        else:
            _cell3_backward(dact, dc, act, c, parent, child, dhv, r, base, s + i, b, B, D, j, cell, lda)
        if direct:
            for g in range(width):
                T[(s + i - s0) * tw + g * D + j] = lda[0, g]


@cuda.jit(device=True)
def _item_prologue(dh, dh_in, dh_src, z, xs, h, parent, B):
    """:func:`_backward_prologue` on the block's own rows ``base + s*B + b`` (item layout), without
    UT (the item kernels stage it from U): the skewed upstream dh (:func:`_skew_at`) and the
    operands z (:func:`_operand_at`); a barrier."""
    base, b = _item_block(parent, B)
    M = parent.shape[0]
    F, W = dh.shape[1], z.shape[1]
    for t in range(cuda.threadIdx.x, M * F if dh_src.shape[0] > 0 else 0, cuda.blockDim.x):
        s, f = _divmod(t, F)
        _skew_at(dh, dh_in, dh_src, base + s * B + b, f)
    for t in range(cuda.threadIdx.x, M * W if z.shape[0] > 0 else 0, cuda.blockDim.x):
        s, col = _divmod(t, W)
        _operand_at(z, xs, h, parent, B, base + s * B + b, col)
    cuda.syncthreads()


@cuda.jit(device=True)
def _item_unskew(out, h, out_src, parent, B):
    """:func:`_unskew` with P = S (``out`` (R, S, F)) for the block's own rows, after its sweep: the
    dense rows ``b*M + m`` are batch item b's (:func:`mdnumba.grid.direction_tables`), so
    ``out[b*M + m, q, f] = h[base + out_src[q, b*M + m], f]`` (0 where it is -1, padding)."""
    base, b = _item_block(parent, B)
    q = _divmod(cuda.blockIdx.x, B)[0]
    M = _divmod(out.shape[0], B)[0]
    F = out.shape[2]
    for t in range(cuda.threadIdx.x, M * F, cuda.blockDim.x):
        m, f = _divmod(t, F)
        i = out_src[q, b * M + m]
        if i >= 0:
            out[b * M + m, q, f] = h[base + i, f]
        else:
            out[b * M + m, q, f] = 0


@cuda.jit(device=True)
def _item_block(parent, B):
    """The item layout's block: (row offset of its scan's slab, its batch item b)."""
    q, b = _divmod(cuda.blockIdx.x, B)
    return q * parent.shape[0] * B, b


@cuda.jit(device=True)
def _item_forward_sweep(h, c, act, Ws, T, diag_off, parent, B, D, cell):
    """The forward sweep of the block's batch item (item layout): hyperplanes k = 0..K-1, the
    items (group of ITEM_ROWS cells, unit j) block-stride, j fastest, reading h and c of
    hyperplane k-1 from one of T's pairs of tiles (h, h, c, c: :func:`_item_tiles`) and writing h
    and c of k into the other (so one barrier between hyperplanes)."""
    N = parent.shape[1]
    base, b = _item_block(parent, B)
    tw = _item_width(N, D, False)
    q = _divmod(T.size, _item_tiles(False))[0]
    prev = _item_edge(T[:q], h, diag_off, parent, 0, base, b, B, tw)
    _item_edge(T[2 * q:3 * q], c, diag_off, parent, 0, base, b, B, tw)
    for k in range(diag_off.shape[0] - 1):
        s0 = diag_off[k]
        n = diag_off[k + 1] - s0
        if k > 0:
            prev = diag_off[k - 1]
        rd = (k & 1) * q
        Tr, Tw = T[rd:rd + q], T[q - rd:2 * q - rd]
        Tc, Tcn = T[2 * q + rd:3 * q + rd], T[3 * q - rd:4 * q - rd]
        for t in range(cuda.threadIdx.x, _divmod(n + ITEM_ROWS - 1, ITEM_ROWS)[0] * D,
                       cuda.blockDim.x):
            grp, j = _divmod(t, D)
            s = s0 + grp * ITEM_ROWS
            nb = min(ITEM_ROWS, s0 + n - s)
            if N == 1:  # the gates' count a constant: the accumulators stay in registers
                _item_unit_forward(h, c, act, Ws, Tr, Tw, Tc, Tcn, parent, base, s, nb, b, B, D, j, prev, s0,
                                   cell, 4)
            elif N == 2:
                _item_unit_forward(h, c, act, Ws, Tr, Tw, Tc, Tcn, parent, base, s, nb, b, B, D, j, prev, s0,
                                   cell, 5)
            else:
                _item_unit_forward(h, c, act, Ws, Tr, Tw, Tc, Tcn, parent, base, s, nb, b, B, D, j, prev, s0,
                                   cell, GATE_CHUNK)
        cuda.syncthreads()


@cuda.jit(device=True)
def _item_backward_sweep(dact, dc, dh, act, c, Ws, T, diag_off, parent, child, B, D, cell):
    """The backward sweep of the block's batch item (item layout): hyperplanes k = K-1..0 as
    :func:`_item_forward_sweep`, the tile holding the dact rows of hyperplane k+1. *Direct* where
    one pass of the block's threads takes every item of the largest hyperplane: a block barrier
    after the pulls (:func:`_item_pull`), then the cell math writes each new dact row into the tile
    too (:func:`_item_cells_backward`), a barrier; else the items block-stride and the tile refilled
    from dact (:func:`_item_refill`). Every thread runs the same passes (barriers in uniform code)."""
    N = parent.shape[1]
    base, b = _item_block(parent, B)
    K = diag_off.shape[0] - 1
    tw = _item_width(N, D, True)
    direct = _divmod(_divmod(T.size, tw)[0] - 1 + ITEM_ROWS - 1, ITEM_ROWS)[0] * D <= cuda.blockDim.x
    _item_edge(T, dact, diag_off, child, K - 1, base, b, B, tw)
    acc = cuda.local.array((ITEM_ROWS, 1), dh.dtype)
    for k in range(K - 1, -1, -1):
        s0 = diag_off[k]
        n = diag_off[k + 1] - s0
        items = _divmod(n + ITEM_ROWS - 1, ITEM_ROWS)[0] * D
        for t0 in range(0, items, cuda.blockDim.x):
            grp, j = _divmod(t0 + cuda.threadIdx.x, D)
            s = s0 + grp * ITEM_ROWS
            nb = min(ITEM_ROWS, s0 + n - s)
            if t0 + cuda.threadIdx.x < items:
                _item_pull(acc, dh, Ws, T, child, base, s, nb, b, B, D, j, s0 + n)
            if direct:
                cuda.syncthreads()  # every pull has read the tile
            if t0 + cuda.threadIdx.x >= items:
                continue
            if N == 1:  # the gates' count a constant: lda stays in registers
                _item_cells_backward(acc, dact, dc, dh, act, c, T, parent, child, base, s, nb, b, B, D, j, s0,
                                     cell, direct, 4)
            elif N == 2:
                _item_cells_backward(acc, dact, dc, dh, act, c, T, parent, child, base, s, nb, b, B, D, j, s0,
                                     cell, direct, 5)
            else:
                _item_cells_backward(acc, dact, dc, dh, act, c, T, parent, child, base, s, nb, b, B, D, j, s0,
                                     cell, direct, GATE_CHUNK)
        if direct:
            cuda.syncthreads()
        else:
            _item_refill(T, dact, s0, n, base, b, B, tw)


# ---------------------------------------------------------------- around the sweeps
@cuda.jit(device=True)
def _skew(out, inp, src, start, stride):
    """``out[q*R + r, f] = inp[src[q, r], q % inp.shape[1], f]`` (``R = src.shape[1]``): rows of
    every direction q into skewed order; ``inp`` is (rows, S, F), or (rows, 1, F) when all
    directions read the same rows (the layer input); ``src = -1`` writes zeros (state cells)."""
    S, R = src.shape
    F = inp.shape[2]
    for t in range(start, S * R * F, stride):
        qr, f = _divmod(t, F)
        _skew_at(out, inp, src, qr, f)


@cuda.jit(device=True)
def _skew_at(out, inp, src, qr, f):
    """Element ``(qr, f)`` of :func:`_skew`."""
    q, r = _divmod(qr, src.shape[1])
    i = src[q, r]
    if i >= 0:
        out[qr, f] = inp[i, _divmod(q, inp.shape[1])[1], f]
    else:
        out[qr, f] = 0


@cuda.jit(device=True)
def _unskew(out, inp, src, start, stride):
    """``out[r, p, f] = Σ_{q ≡ p mod P} inp[q*M + src[q, r], f]`` for ``out`` (R, P, F), ``M =
    inp.shape[0] / S`` rows per direction (R, or R + 2B with state cells): P = S puts direction
    q's rows back in grid order at channel block q, P = 1 sums the directions (in the order
    q = 0, 1, ..); ``src = -1`` adds nothing (padding: zeros)."""
    S = src.shape[0]
    R, P, F = out.shape
    slab = _divmod(inp.shape[0], S)[0]
    for t in range(start, R * P * F, stride):
        rp, f = _divmod(t, F)
        r, p = _divmod(rp, P)
        acc = inp[0, f]  # of inp's dtype; replaced by the first term
        first = True
        for q in range(p, S, P):
            if src[q, r] >= 0:
                if first:
                    acc = inp[q * slab + src[q, r], f]
                else:
                    acc += inp[q * slab + src[q, r], f]
                first = False
        if first:
            out[r, p, f] = 0
        else:
            out[r, p, f] = acc


@cuda.jit(device=True)
def _operands(z, xs, h, parent, B, D, start, stride):
    """``z[r] = [xs[r] | hpar[r] | 1]`` with ``hpar[r, j*N + d] = h[parent_d(s)*B + b, j]`` (0 without
    parent; within r's scan slab of M*B rows), so that ``zᵀ @ dact`` is ``[dW; dU; db]`` in the
    flat parameter order."""
    W = z.shape[1]
    for t in range(start, z.shape[0] * W, stride):
        r, col = _divmod(t, W)
        _operand_at(z, xs, h, parent, B, r, col)


@cuda.jit(device=True)
def _operand_at(z, xs, h, parent, B, r, col):
    """Element ``(r, col)`` of :func:`_operands`."""
    C = xs.shape[1]
    _, rr = _divmod(r, parent.shape[0] * B)  # row within its scan slab
    if col < C:
        z[r, col] = xs[r, col]
    elif col == z.shape[1] - 1:
        z[r, col] = 1
    else:
        j, d = _divmod(col - C, parent.shape[1])
        s, b = _divmod(rr, B)
        p = parent[s, d]
        if p >= 0:
            z[r, col] = h[r - rr + p * B + b, j]
        else:
            z[r, col] = 0


@cuda.jit(device=True)
def _backward_prologue(UTf, U, dh, dh_in, dh_src, z, xs, h, parent, B, D, start, stride):
    """What the backward sweep needs and does not depend on: ``UT_q[g, d*D + j] = U_q[j, d*G + g]``
    (into ``UTf``, flat), the skewed upstream gradient ``dh`` from ``dh_in`` (:func:`_skew`; skipped
    when ``dh_src`` is empty) and the weight-gradient operands ``z`` (:func:`_operands`; skipped
    when ``z`` is empty)."""
    S, _, NG = U.shape
    N = parent.shape[1]
    G = NG // N
    for t in range(start, U.size, stride):
        q, e = _divmod(t, D * NG)
        j, dg = _divmod(e, NG)
        d, g = _divmod(dg, G)
        UTf[q * D * NG + g * N * D + d * D + j] = U[q, j, dg]
    if dh_src.shape[0] > 0:
        _skew(dh, dh_in, dh_src, start, stride)
    if z.shape[0] > 0:
        _operands(z, xs, h, parent, B, D, start, stride)


# ---------------------------------------------------------------- sweep kernels
@cuda.jit(device=True)
def _forward_sweep(h, c, act, Uf, tile, diag_off, parent, B, D, cell, nO, out, out_src, sliced, staged):
    """All hyperplanes k = 0..K-1, grid sync in between; then ``out`` = h in grid order
    (:func:`_unskew`) unless ``out_src`` is empty (``tile``, ``staged``: :func:`_forward_plane`)."""
    grid = cuda.cg.this_grid()
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for k in range(diag_off.shape[0] - 1):
        _forward_plane(h, c, act, Uf, tile, diag_off, parent, _per_plane(B, sliced), _per_plane(D, sliced),
                       cell, k, start, stride, _per_plane(nO, sliced), sliced, staged)
        grid.sync()
    if out_src.shape[0] > 0:
        _unskew(out, h, out_src, start, stride)


@cuda.jit(**_SWEEP_JIT)
def _forward_coop(h, c, act, Uf, diag_off, parent, B, D, cell, use_shared, nO, out, out_src):
    """:func:`_forward_sweep` in one cooperative launch (``Uf`` = U flat). ``nO``: the sliced
    twin's (:func:`_forward_coop_sliced`; its launch arguments are the same)."""
    shared = cuda.shared.array(0, Uf.dtype)
    _stage(shared, Uf, use_shared)
    if use_shared:
        Uf = shared
    _forward_sweep(h, c, act, Uf, (h, diag_off), diag_off, parent, B, D, cell, nO, out, out_src, False, False)


@cuda.jit(**_SWEEP_JIT)
def _forward_coop_sliced(h, c, act, Uf, diag_off, parent, B, D, cell, use_shared, nO, out, out_src):
    """:func:`_forward_coop` in the sliced layout: the block's unit slice of U staged in shared
    memory once (:func:`_stage_slice`), its items per hyperplane (:func:`_plane_items`)."""
    Ws = cuda.shared.array(0, Uf.dtype)
    _stage_slice(Ws, Uf, nO, parent.shape[1], D, False, 1)
    _forward_sweep(h, c, act, Ws, (h, diag_off), diag_off, parent, B, D, cell, nO, out, out_src, True, False)


@cuda.jit(**_SWEEP_JIT)
def _forward_coop_staged(h, c, act, Uf, diag_off, parent, B, D, cell, use_shared, nO, out, out_src):
    """:func:`_forward_coop_sliced` with the parents' rows of h staged in the block's tile."""
    Ws = cuda.shared.array(0, Uf.dtype, alignment=SHARED_ALIGN)
    tile = (cuda.shared.array(STAGE_SHAPE, Uf.dtype, alignment=SHARED_ALIGN),
            cuda.shared.array(STAGE_SHAPE[0], numba.int32))
    _stage_slice(Ws, Uf, nO, parent.shape[1], D, False, VEC)
    _forward_sweep(h, c, act, Ws, tile, diag_off, parent, B, D, cell, nO, out, out_src, True, True)


@cuda.jit(**_SWEEP_JIT)
def _forward_diag(h, c, act, Uf, diag_off, parent, B, D, cell, use_shared, nO, out, out_src, k):
    """Hyperplane k only (one launch per hyperplane)."""
    shared = cuda.shared.array(0, Uf.dtype)
    _stage(shared, Uf, use_shared)
    if use_shared:
        Uf = shared
    _forward_plane(h, c, act, Uf, (h, diag_off), diag_off, parent, B, D, cell, k, cuda.grid(1),
                   cuda.gridsize(1), nO, False, False)


@cuda.jit(**_SWEEP_JIT)
def _forward_diag_sliced(h, c, act, Uf, diag_off, parent, B, D, cell, use_shared, nO, out, out_src, k):
    """Hyperplane k only in the sliced layout (the slice staged at each launch)."""
    Ws = cuda.shared.array(0, Uf.dtype)
    _stage_slice(Ws, Uf, nO, parent.shape[1], D, False, 1)
    _forward_plane(h, c, act, Ws, (h, diag_off), diag_off, parent, B, D, cell, k, cuda.grid(1),
                   cuda.gridsize(1), nO, True, False)


@cuda.jit(**_SWEEP_JIT)
def _forward_diag_staged(h, c, act, Uf, diag_off, parent, B, D, cell, use_shared, nO, out, out_src, k):
    """Hyperplane k only in the staged layout."""
    Ws = cuda.shared.array(0, Uf.dtype, alignment=SHARED_ALIGN)
    tile = (cuda.shared.array(STAGE_SHAPE, Uf.dtype, alignment=SHARED_ALIGN),
            cuda.shared.array(STAGE_SHAPE[0], numba.int32))
    _stage_slice(Ws, Uf, nO, parent.shape[1], D, False, VEC)
    _forward_plane(h, c, act, Ws, tile, diag_off, parent, B, D, cell, k, cuda.grid(1), cuda.gridsize(1), nO,
                   True, True)


@cuda.jit(device=True)
def _backward_prologue_synced(UTf, U, dh, dh_in, dh_src, z, xs, h, parent, B, D):
    """:func:`_backward_prologue` over the grid, then a grid sync."""
    _backward_prologue(UTf, U, dh, dh_in, dh_src, z, xs, h, parent, B, D, cuda.grid(1), cuda.gridsize(1))
    cuda.cg.this_grid().sync()


@cuda.jit(device=True)
def _backward_sweep(dact, dc, dh, act, c, UTf, tile, diag_off, parent, child, B, D, cell, nO, sliced, staged):
    """All hyperplanes k = K-1..0, grid sync in between (``tile``, ``staged``: :func:`_backward_plane`)."""
    grid = cuda.cg.this_grid()
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for k in range(diag_off.shape[0] - 2, -1, -1):
        _backward_plane(dact, dc, dh, act, c, UTf, tile, diag_off, parent, child, _per_plane(B, sliced),
                        _per_plane(D, sliced), cell, k, start, stride, _per_plane(nO, sliced), sliced, staged)
        grid.sync()


@cuda.jit(**_SWEEP_JIT)
def _backward_coop(dact, dc, dh, act, c, UTf, diag_off, parent, child, B, D, cell, use_shared, nO,
                   U, dh_in, dh_src, z, xs, h):
    """:func:`_backward_prologue` and :func:`_backward_sweep` in one cooperative launch (``UTf`` =
    UT flat; ``nO`` as in :func:`_forward_coop`)."""
    _backward_prologue_synced(UTf, U, dh, dh_in, dh_src, z, xs, h, parent, B, D)
    shared = cuda.shared.array(0, UTf.dtype)
    _stage(shared, UTf, use_shared)
    if use_shared:
        UTf = shared
    _backward_sweep(dact, dc, dh, act, c, UTf, (dact, diag_off), diag_off, parent, child, B, D, cell, nO,
                    False, False)


@cuda.jit(**_SWEEP_JIT)
def _backward_coop_sliced(dact, dc, dh, act, c, UTf, diag_off, parent, child, B, D, cell, use_shared, nO,
                          U, dh_in, dh_src, z, xs, h):
    """:func:`_backward_coop` in the sliced layout (the block's unit slice of UT in shared memory)."""
    _backward_prologue_synced(UTf, U, dh, dh_in, dh_src, z, xs, h, parent, B, D)
    Ws = cuda.shared.array(0, UTf.dtype)
    _stage_slice(Ws, UTf, nO, parent.shape[1], D, True, 1)
    _backward_sweep(dact, dc, dh, act, c, Ws, (dact, diag_off), diag_off, parent, child, B, D, cell, nO,
                    True, False)


@cuda.jit(**_SWEEP_JIT)
def _backward_coop_staged(dact, dc, dh, act, c, UTf, diag_off, parent, child, B, D, cell, use_shared, nO,
                          U, dh_in, dh_src, z, xs, h):
    """:func:`_backward_coop_sliced` with the children's rows of dact staged in the block's tile."""
    _backward_prologue_synced(UTf, U, dh, dh_in, dh_src, z, xs, h, parent, B, D)
    Ws = cuda.shared.array(0, UTf.dtype, alignment=SHARED_ALIGN)
    tile = (cuda.shared.array(STAGE_SHAPE, UTf.dtype, alignment=SHARED_ALIGN),
            cuda.shared.array(STAGE_SHAPE[0], numba.int32))
    _stage_slice(Ws, UTf, nO, parent.shape[1], D, True, VEC)
    _backward_sweep(dact, dc, dh, act, c, Ws, tile, diag_off, parent, child, B, D, cell, nO, True, True)


@cuda.jit(**_SWEEP_JIT)
def _backward_diag(dact, dc, dh, act, c, UTf, diag_off, parent, child, B, D, cell, use_shared, nO,
                   U, dh_in, dh_src, z, xs, h, k):
    """Hyperplane k only (one launch per hyperplane; :func:`_backward_pre` ran before)."""
    shared = cuda.shared.array(0, UTf.dtype)
    _stage(shared, UTf, use_shared)
    if use_shared:
        UTf = shared
    _backward_plane(dact, dc, dh, act, c, UTf, (dact, diag_off), diag_off, parent, child, B, D, cell, k,
                    cuda.grid(1), cuda.gridsize(1), nO, False, False)


@cuda.jit(**_SWEEP_JIT)
def _backward_diag_sliced(dact, dc, dh, act, c, UTf, diag_off, parent, child, B, D, cell, use_shared, nO,
                          U, dh_in, dh_src, z, xs, h, k):
    """Hyperplane k only in the sliced layout (the slice staged at each launch)."""
    Ws = cuda.shared.array(0, UTf.dtype)
    _stage_slice(Ws, UTf, nO, parent.shape[1], D, True, 1)
    _backward_plane(dact, dc, dh, act, c, Ws, (dact, diag_off), diag_off, parent, child, B, D, cell, k,
                    cuda.grid(1), cuda.gridsize(1), nO, True, False)


@cuda.jit(**_SWEEP_JIT)
def _backward_diag_staged(dact, dc, dh, act, c, UTf, diag_off, parent, child, B, D, cell, use_shared, nO,
                          U, dh_in, dh_src, z, xs, h, k):
    """Hyperplane k only in the staged layout."""
    Ws = cuda.shared.array(0, UTf.dtype, alignment=SHARED_ALIGN)
    tile = (cuda.shared.array(STAGE_SHAPE, UTf.dtype, alignment=SHARED_ALIGN),
            cuda.shared.array(STAGE_SHAPE[0], numba.int32))
    _stage_slice(Ws, UTf, nO, parent.shape[1], D, True, VEC)
    _backward_plane(dact, dc, dh, act, c, Ws, tile, diag_off, parent, child, B, D, cell, k,
                    cuda.grid(1), cuda.gridsize(1), nO, True, True)


@cuda.jit(device=True)
def _infer_sweep(out, h, c, act, Uf, tile, lp, x, src, W, bias, diag_off, parent, first, last, B, D, cell, nO,
                 sliced, staged):
    """Hyperplanes ``first .. last-1`` of the saving-free forward, grid sync in between: each step
    fills the next plane's parent slots (the half the current plane does not read) and computes
    the current plane (``tile``, ``staged``: :func:`_infer_plane`)."""
    grid = cuda.cg.this_grid()
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    _fill_parents(lp, parent, diag_off, first, last, start, stride)
    grid.sync()
    for k in range(first, last):
        _fill_parents(lp, parent, diag_off, k + 1, last, start, stride)
        _infer_plane(out, h, c, act, Uf, tile, lp, x, src, W, bias, diag_off, _per_plane(B, sliced),
                     _per_plane(D, sliced), cell, k, start, stride, _per_plane(nO, sliced), sliced, staged)
        grid.sync()


@cuda.jit(**_SWEEP_JIT)
def _infer_coop(out, h, c, act, Uf, lp, x, src, W, bias, diag_off, parent, first, last, B, D, cell,
                use_shared, nO):
    """:func:`_infer_sweep` in one cooperative launch (flat layout)."""
    shared = cuda.shared.array(0, Uf.dtype)
    _stage(shared, Uf, use_shared)
    if use_shared:
        Uf = shared
    _infer_sweep(out, h, c, act, Uf, (h, diag_off), lp, x, src, W, bias, diag_off, parent, first, last, B, D,
                 cell, nO, False, False)


@cuda.jit(**_SWEEP_JIT)
def _infer_coop_sliced(out, h, c, act, Uf, lp, x, src, W, bias, diag_off, parent, first, last, B, D, cell,
                       use_shared, nO):
    """:func:`_infer_sweep` in one cooperative launch, sliced layout."""
    Ws = cuda.shared.array(0, Uf.dtype)
    _stage_slice(Ws, Uf, nO, lp.shape[1], D, False, 1)
    _infer_sweep(out, h, c, act, Ws, (h, diag_off), lp, x, src, W, bias, diag_off, parent, first, last, B, D,
                 cell, nO, True, False)


@cuda.jit(**_SWEEP_JIT)
def _infer_coop_staged(out, h, c, act, Uf, lp, x, src, W, bias, diag_off, parent, first, last, B, D, cell,
                       use_shared, nO):
    """:func:`_infer_coop_sliced` with the parents' rows of h staged in the block's tile."""
    Ws = cuda.shared.array(0, Uf.dtype, alignment=SHARED_ALIGN)
    tile = (cuda.shared.array(STAGE_SHAPE, Uf.dtype, alignment=SHARED_ALIGN),
            cuda.shared.array(STAGE_SHAPE[0], numba.int32))
    _stage_slice(Ws, Uf, nO, lp.shape[1], D, False, VEC)
    _infer_sweep(out, h, c, act, Ws, tile, lp, x, src, W, bias, diag_off, parent, first, last, B, D, cell, nO,
                 True, True)


@cuda.jit(**_JIT)
def _infer_pre(out, h, c, act, Uf, lp, x, src, W, bias, diag_off, parent, first, last, B, D, cell,
               use_shared, nO):
    """The first plane's parent slots (per-diagonal path of :func:`_infer_coop`)."""
    _fill_parents(lp, parent, diag_off, first, last, cuda.grid(1), cuda.gridsize(1))


@cuda.jit(**_SWEEP_JIT)
def _infer_diag(out, h, c, act, Uf, lp, x, src, W, bias, diag_off, parent, first, last, B, D, cell,
                use_shared, nO, k):
    """Hyperplane ``first + k`` only, and the next plane's parent slots (one launch per plane)."""
    shared = cuda.shared.array(0, Uf.dtype)
    _stage(shared, Uf, use_shared)
    if use_shared:
        Uf = shared
    start, stride = cuda.grid(1), cuda.gridsize(1)
    _fill_parents(lp, parent, diag_off, first + k + 1, last, start, stride)
    _infer_plane(out, h, c, act, Uf, (h, diag_off), lp, x, src, W, bias, diag_off, B, D, cell, first + k,
                 start, stride, nO, False, False)


@cuda.jit(**_SWEEP_JIT)
def _infer_diag_sliced(out, h, c, act, Uf, lp, x, src, W, bias, diag_off, parent, first, last, B, D, cell,
                       use_shared, nO, k):
    """:func:`_infer_diag` in the sliced layout (the slice staged at each launch)."""
    Ws = cuda.shared.array(0, Uf.dtype)
    _stage_slice(Ws, Uf, nO, lp.shape[1], D, False, 1)
    start, stride = cuda.grid(1), cuda.gridsize(1)
    _fill_parents(lp, parent, diag_off, first + k + 1, last, start, stride)
    _infer_plane(out, h, c, act, Ws, (h, diag_off), lp, x, src, W, bias, diag_off, B, D, cell, first + k,
                 start, stride, nO, True, False)


@cuda.jit(**_SWEEP_JIT)
def _infer_diag_staged(out, h, c, act, Uf, lp, x, src, W, bias, diag_off, parent, first, last, B, D, cell,
                       use_shared, nO, k):
    """:func:`_infer_diag` in the staged layout."""
    Ws = cuda.shared.array(0, Uf.dtype, alignment=SHARED_ALIGN)
    tile = (cuda.shared.array(STAGE_SHAPE, Uf.dtype, alignment=SHARED_ALIGN),
            cuda.shared.array(STAGE_SHAPE[0], numba.int32))
    _stage_slice(Ws, Uf, nO, lp.shape[1], D, False, VEC)
    start, stride = cuda.grid(1), cuda.gridsize(1)
    _fill_parents(lp, parent, diag_off, first + k + 1, last, start, stride)
    _infer_plane(out, h, c, act, Ws, tile, lp, x, src, W, bias, diag_off, B, D, cell, first + k, start,
                 stride, nO, True, True)


@cuda.jit(**_JIT)
def _forward_post(h, c, act, Uf, diag_off, parent, B, D, cell, use_shared, nO, out, out_src):
    """The epilogue of :func:`_forward_coop` as its own launch (per-diagonal path)."""
    _unskew(out, h, out_src, cuda.grid(1), cuda.gridsize(1))


@cuda.jit(**_JIT)
def _backward_pre(dact, dc, dh, act, c, UTf, diag_off, parent, child, B, D, cell, use_shared, nO,
                  U, dh_in, dh_src, z, xs, h):
    """:func:`_backward_prologue` as its own launch (per-diagonal path)."""
    _backward_prologue(UTf, U, dh, dh_in, dh_src, z, xs, h, parent, B, D, cuda.grid(1), cuda.gridsize(1))


@cuda.jit(**_ITEM_JIT)
def _forward_item(h, c, act, Uf, diag_off, parent, B, D, cell, use_shared, nO, out, out_src):
    """The forward sweep in the item layout (one plain launch of S*B blocks, block ``q*B + b`` on
    batch item b of scan q: :func:`_item_shared`, :func:`_item_forward_sweep`), then the block's
    rows of the output in grid order (:func:`_item_unskew`). Arguments as :func:`_forward_coop`'s."""
    Ws, T = _item_shared(cuda.shared.array(0, Uf.dtype, alignment=SHARED_ALIGN), Uf, diag_off,
                         _divmod(cuda.blockIdx.x, B)[0], parent.shape[1], D, False)
    _item_forward_sweep(h, c, act, Ws, T, diag_off, parent, B, D, cell)
    if out_src.shape[0] > 0:
        _item_unskew(out, h, out_src, parent, B)


@cuda.jit(**_ITEM_JIT)
def _backward_item(dact, dc, dh, act, c, UTf, diag_off, parent, child, B, D, cell, use_shared, nO,
                   U, dh_in, dh_src, z, xs, h):
    """The backward sweep in the item layout (as :func:`_forward_item`), its prologue on the block's
    own rows (:func:`_item_prologue`) and UT staged from U itself: ``UTf`` is U flat here (the
    launcher's ``item_weights``), not UT. Arguments otherwise as :func:`_backward_coop`'s."""
    Ws, T = _item_shared(cuda.shared.array(0, UTf.dtype, alignment=SHARED_ALIGN), UTf, diag_off,
                         _divmod(cuda.blockIdx.x, B)[0], parent.shape[1], D, True)
    _item_prologue(dh, dh_in, dh_src, z, xs, h, parent, B)
    _item_backward_sweep(dact, dc, dh, act, c, Ws, T, diag_off, parent, child, B, D, cell)


# ---------------------------------------------------------------- bulk kernels
@cuda.jit(**_JIT)
def _gemm_small(out, a, bm, bias, M, N, K, ta, tb, mode, Ma):
    """One thread per output: ``out[m, n] = init + Σ_k A[m, k] B[k, n]`` (K >= 1).

    ``A = aᵀ`` if ta else ``a``, with ones in rows ``m >= Ma`` (the row that turns ``xᵀ dy``
    into ``[xᵀ dy; Σ dy]``); ``B = bmᵀ`` if tb else ``bm``; init is ``bias[n]`` (mode 0),
    ``out[m, n]`` (mode 1) or 0 (mode 2).
    """
    for t in range(cuda.grid(1), M * N, cuda.gridsize(1)):
        m, n = _divmod(t, N)
        acc = _op_at(bm, 0, n, tb)
        k = 1  # unsigned indices, while loops: see _rows_preact
        if m < Ma:
            acc *= _op_at(a, m, 0, ta)
            while k < K:
                acc += _op_at(a, m, k, ta) * _op_at(bm, k, n, tb)
                k += 1
        else:  # the ones row: column sums of B
            while k < K:
                acc += _op_at(bm, k, n, tb)
                k += 1
        _store(out, bias, mode, m, n, acc)


@cuda.jit(device=True)
def _op_at(x, i, j, trans):
    """Element ``(i, j)`` of ``op(x)``: ``x[j, i]`` if trans else ``x[i, j]`` (unsigned indices)."""
    return x[_at(j), _at(i)] if trans else x[_at(i), _at(j)]


@cuda.jit(device=True)
def _load_tile(T, src, r0, k0, R, R1, k_end, trans, width, depth, threads):
    """``T[kk, rr] = S[r0+rr, k0+kk]`` for ``kk < depth``, ``rr < width`` (1 in rows ``R <= r <
    R1``, 0 outside ``R1`` rows / ``k_end``) with ``S = srcᵀ`` if ``trans`` else ``src``, by the
    block's ``threads`` threads (a multiple of width and depth); the fast-varying index follows
    src's last axis (coalesced).

    A tile: ``_load_tile(As, a, m0, k0, Ma, M, .., ta, BM, BK, GEMM_THREADS)``; B tile (``op(B)[k,
    n]``, i.e. ``op(B)ᵀ`` by rows n): ``_load_tile(Bs, bm, n0, k0, N, N, .., not tb, BN, ..)``.
    """
    t = cuda.threadIdx.x  # each thread: fixed steps through the tile (no divisions per element)
    if trans:  # fast index rr
        kk, rr = t // width, t % width
        while kk < depth:
            _tile_store(T, kk, rr, src, k0 + kk, r0 + rr, R, R1, k_end, True)
            kk += threads // width
    else:  # fast index kk
        kk, rr = t % depth, t // depth
        while rr < width:
            _tile_store(T, kk, rr, src, k0 + kk, r0 + rr, R, R1, k_end, False)
            rr += threads // depth


@cuda.jit(device=True)
def _tile_store(T, kk, rr, src, k, r, R, R1, k_end, trans):
    """``T[kk, rr] = S[r, k]`` (``S = srcᵀ`` if trans), 1 in rows ``R <= r < R1``, 0 past them
    or past ``k_end`` (unsigned indices, as in :func:`_rows_preact`)."""
    if k < k_end and r < R:
        T[_at(kk), _at(rr)] = _op_at(src, r, k, trans)
    elif k < k_end and r < R1:
        T[_at(kk), _at(rr)] = 1
    else:
        T[_at(kk), _at(rr)] = 0


@cuda.jit(**_GEMM_JIT)
def _gemm_tiled(out, parts, counters, a, bm, bias, M, N, K, ta, tb, mode, kchunk, Ma):
    """Block (x, y, z) computes the BM x BN tile (x, y) of ``Σ_{k ∈ chunk z} A[m, k] B[k, n]``.

    With one chunk (gridDim.z == 1) it writes ``out = init + tile`` (init as in
    :func:`_gemm_small`); otherwise ``parts[z] = tile`` and the block that finishes a tile
    last (:func:`_last_block`) writes ``out = init + Σ_z parts[z]``, z in increasing order
    (deterministic, and no second launch).
    """
    As = cuda.shared.array((BK, _AS_COLS), dtype=a.dtype)
    Bs = cuda.shared.array((BK, _BS_COLS), dtype=a.dtype)
    acc = cuda.local.array((TM, TN), dtype=a.dtype)
    ra = cuda.local.array(TM, dtype=a.dtype)
    rb = cuda.local.array(TN, dtype=a.dtype)
    tr = cuda.threadIdx.x // _RN
    tc = cuda.threadIdx.x % _RN
    m0 = cuda.blockIdx.x * BM  # row tiles on x: a grid's y extent stops at 65535 (tall GEMMs)
    n0 = cuda.blockIdx.y * BN
    k_begin = cuda.blockIdx.z * kchunk
    k_end = min(K, k_begin + kchunk)
    for i in range(TM):
        for q in range(TN):
            acc[i, q] = 0
    # a thread whose outputs all lie past M or N (a ragged edge tile: the weight gradient's 2 rows
    # of x and ones past 128 of h) skips the multiply-adds; whole warps do (tr, tc: rows, columns)
    live = m0 + tr < M and n0 + tc < N
    for k0 in range(k_begin, k_end, BK):
        _load_tile(As, a, m0, k0, Ma, M, k_end, ta, BM, BK, GEMM_THREADS)
        _load_tile(Bs, bm, n0, k0, N, N, k_end, not tb, BN, BK, GEMM_THREADS)
        cuda.syncthreads()
        if live:
            for k1 in range(0, BK, _KU):  # _KU steps per trip: one loop counter per _KU*TM*TN FMAs
                for k2 in range(_KU):
                    kk = k1 + k2
                    for i in range(TM):
                        ra[i] = As[_at(kk), _at(tr + i * _RM)]
                    for q in range(TN):
                        rb[q] = Bs[_at(kk), _at(tc + q * _RN)]
                    for i in range(TM):
                        for q in range(TN):
                            acc[i, q] += ra[i] * rb[q]
        cuda.syncthreads()
    split = cuda.gridDim.z > 1
    for i in range(TM):
        m = m0 + tr + i * _RM
        for q in range(TN):
            n = n0 + tc + q * _RN
            if m < M and n < N:
                _store_part(out, parts, bias, mode, m, n, acc[i, q], split)
    if split and _last_block(counters):
        for i in range(TM):
            m = m0 + tr + i * _RM
            for q in range(TN):
                n = n0 + tc + q * _RN
                if m < M and n < N:
                    _store_parts_sum(out, parts, bias, mode, m, n)


@cuda.jit(device=True)
def _store_part(out, parts, bias, mode, m, n, value, split):
    """Output (m, n)'s sum over this block's K chunk: ``parts[z, m, n] = value`` where the K sum is
    ``split`` over the grid's z, else into ``out`` (:func:`_store`)."""
    if split:
        parts[cuda.blockIdx.z, m, n] = value
    else:
        _store(out, bias, mode, m, n, value)


@cuda.jit(device=True)
def _store_parts_sum(out, parts, bias, mode, m, n):
    """``out[m, n] = init + Σ_z parts[z, m, n]``, z in increasing order (deterministic; :func:`_store`)."""
    total = parts[0, m, n]
    for z in range(1, cuda.gridDim.z):
        total += parts[z, m, n]
    _store(out, bias, mode, m, n, total)


@cuda.jit(device=True)
def _store(out, bias, mode, m, n, value):
    """``out[m, n] = bias[n] + value`` (mode 0), ``+= value`` (mode 1) or ``= value`` (mode 2)."""
    if mode == 0:
        out[m, n] = bias[n] + value
    elif mode == 1:
        out[m, n] += value
    else:
        out[m, n] = value


@cuda.jit(device=True)
def _last_block(counters):
    """Called by every thread of a block after it wrote its part of tile (x, y): True in the
    block of the tile's gridDim.z that arrives last (it then resets the tile's counter).

    Fences on both sides of the count (release, then acquire): without the second one the
    last block's loads of the other parts could be served from a stale L1 line (L1 is not
    coherent between SMs; a GPU-scope fence invalidates it for the loads that follow).
    """
    flag = cuda.shared.array(1, numba.int32)
    cuda.threadfence()  # this thread's parts are visible to every block before the count
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        tile = cuda.blockIdx.y * cuda.gridDim.x + cuda.blockIdx.x
        last = cuda.atomic.add(counters, tile, 1) == cuda.gridDim.z - 1
        flag[0] = 1 if last else 0
        if last:
            counters[tile] = 0
    cuda.syncthreads()
    if flag[0] == 1:
        cuda.threadfence()  # every part written before the count is visible to this thread
        return True
    return False


@cuda.jit(**_JIT)
def _gather_rows(out, inp, src):
    """``out[r, f] = inp[src[r], f]`` for ``f < inp.shape[1]`` (skew / unskew permutations)."""
    F = inp.shape[1]
    for t in range(cuda.grid(1), out.shape[0] * F, cuda.gridsize(1)):
        r, f = _divmod(t, F)
        out[r, f] = inp[src[r], f]


@cuda.jit(**_JIT)
def _skew_rows(out, inp, src):
    """:func:`_skew` as a kernel."""
    _skew(out, inp, src, cuda.grid(1), cuda.gridsize(1))


@cuda.jit(**_JIT)
def _unskew_rows(out, inp, src):
    """:func:`_unskew` as a kernel."""
    _unskew(out, inp, src, cuda.grid(1), cuda.gridsize(1))


@cuda.jit(**_JIT)
def _zero_padding(h, c, src):
    """CUDA twin of :func:`mdnumba.kernels.wavefront.zero_padding`, one thread per value."""
    S, R = src.shape
    D = h.shape[1]
    for t in range(cuda.grid(1), S * R * D, cuda.gridsize(1)):
        row, j = _divmod(t, D)
        q, r = _divmod(row, R)
        if src[q, r] < 0:
            h[row, j] = 0
            c[row, j] = 0


@cuda.jit(**_JIT)
def _axpby(out, x, alpha, y, beta):
    """``out = alpha·x + beta·y`` elementwise (flat arrays; y may be x)."""
    for k in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[k] = alpha * x[k] + beta * y[k]


@cuda.jit(**_JIT)
def _add_direction_grads(grads, parts, C, ND):
    """``grads += parts`` block by block: ``parts[q]`` (C + ND + 1, G) is direction q's
    ``[dW; dU; db]``, ``grads`` the flat ``W (S, C, G) | U (S, ND, G) | b (S, G)``."""
    S, Z, G = parts.shape
    nW, nU = S * C * G, S * ND * G
    for t in range(cuda.grid(1), S * Z * G, cuda.gridsize(1)):
        q, e = _divmod(t, Z * G)
        row, g = _divmod(e, G)
        if row < C:
            i = q * C * G + row * G + g
        elif row < C + ND:
            i = nW + (q * ND + row - C) * G + g
        else:
            i = nW + nU + q * G + g
        grads[i] += parts[q, row, g]


@cuda.jit(**_JIT)
def _fill(out, value):
    """``out[:] = value`` (flat array)."""
    for k in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[k] = value


@cuda.jit(device=True)
def _state_items(state, D, G):
    """Items of a state kernel: one per (scan q, batch item b, column g < G) of a state array
    ``(B, S*D)``."""
    return _divmod(state.size, D)[0] * G


@cuda.jit(device=True)
def _state_item(t, state, rows, D, G):
    """Item t of :func:`_state_items`: ``(q, b, g, R)``, R the rows of a scan's slab of an array
    of ``rows`` rows."""
    qb, g = _divmod(t, G)
    q, b = _divmod(qb, state.shape[0])
    return q, b, g, _divmod(rows, _divmod(state.shape[1], D)[0])[0]


@cuda.jit(**_JIT)
def _seed_state(h, c, act, h0, c0, B):
    """CUDA twin of :func:`mdnumba.kernels.wavefront.seed_state` (a thread per q, b, gate column)."""
    D, G = h.shape[1], act.shape[1]
    for t in range(cuda.grid(1), _state_items(h0, D, G), cuda.gridsize(1)):
        q, b, g, R = _state_item(t, h0, h.shape[0], D, G)
        first, pad = q * R + b, (q + 1) * R - B + b
        act[first, g] = 0
        if g >= D and g < 2 * D:
            act[pad, g] = 1
        else:
            act[pad, g] = 0
        if g < D:
            h[first, g], c[first, g] = h0[b, q * D + g], c0[b, q * D + g]
            h[pad, g], c[pad, g] = 0, 0


@cuda.jit(**_JIT)
def _state_of_cell(hs, cs, h, c, cell, B):
    """CUDA twin of :func:`mdnumba.kernels.wavefront.state_of_cell`."""
    D = h.shape[1]
    for t in range(cuda.grid(1), _state_items(hs, D, D), cuda.gridsize(1)):
        q, b, j, R = _state_item(t, hs, h.shape[0], D, D)
        r = q * R + cell * B + b
        hs[b, q * D + j], cs[b, q * D + j] = h[r, j], c[r, j]


@cuda.jit(**_JIT)
def _seed_state_grad(dh, dc, dact, dhT, dcT, B):
    """CUDA twin of :func:`mdnumba.kernels.wavefront.seed_state_grad`."""
    D, G = dh.shape[1], dact.shape[1]
    for t in range(cuda.grid(1), _state_items(dhT, D, G), cuda.gridsize(1)):
        q, b, g, R = _state_item(t, dhT, dh.shape[0], D, G)
        pad = (q + 1) * R - B + b
        dact[pad, g] = 0
        if g < D:
            dh[pad - B, g] += dhT[b, q * D + g]
            dc[pad, g] = dcT[b, q * D + g]


@cuda.jit(**_JIT)
def _take_state_grad(dh0, dc0, dh, dc, dact, B):
    """CUDA twin of :func:`mdnumba.kernels.wavefront.take_state_grad`."""
    D, G = dh.shape[1], dact.shape[1]
    for t in range(cuda.grid(1), _state_items(dh0, D, G), cuda.gridsize(1)):
        q, b, g, R = _state_item(t, dh0, dh.shape[0], D, G)
        r = q * R + b
        if g < D:
            dh0[b, q * D + g], dc0[b, q * D + g] = dh[r, g], dc[r, g]
        dact[r, g] = 0


# ---------------------------------------------------------------- host helpers
def shares_memory(a: DeviceArray, b: DeviceArray) -> bool:
    """Whether the contiguous device arrays ``a`` and ``b`` overlap (the simulator's arrays: their
    host buffers)."""
    if SIMULATOR:
        return bool(np.shares_memory(a._ary, b._ary))
    lo_a, lo_b = (int(v.__cuda_array_interface__["data"][0]) for v in (a, b))
    return lo_a < lo_b + b.nbytes and lo_b < lo_a + a.nbytes


def rows_aligned(a: DeviceArray, nbytes: int = 16) -> bool:
    """Whether every row of the 2-D device array ``a`` starts on an ``nbytes`` boundary (its data
    pointer and row pitch; the simulator's arrays: their host buffers)."""
    data = a._ary.ctypes.data if SIMULATOR else int(a.__cuda_array_interface__["data"][0])
    return data % nbytes == 0 and a.strides[0] % nbytes == 0


def c_order(x: npt.ArrayLike) -> np.ndarray:
    """``x`` as a NumPy array with the strides of a fresh C-order array (copied only if needed).
    NumPy calls ``x[..., None]`` C-contiguous whatever the stride of its length-1 axis (0 there);
    numba-cuda's device copy keeps that stride, calls the array non-contiguous and cannot reshape
    it (NotImplementedError on a GPU)."""
    x = np.ascontiguousarray(x)
    want, step = [], x.itemsize
    for n in reversed(x.shape):
        want.append(step)
        step *= n
    return x if x.strides == tuple(reversed(want)) else np.array(x, order="C")


def as_device(x: HostOrDevice) -> DeviceArray:
    """A numba device array viewing ``x`` (no copy) if it is one; NumPy arrays are copied over
    (:func:`c_order`)."""
    if hasattr(x, "copy_to_host"):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        return cuda.as_cuda_array(x)
    return cuda.to_device(c_order(x))


class _Args:
    """Device views of launcher arguments (None stays None); NumPy outputs are copied back by
    :meth:`finish`."""

    def __init__(self, *arrays):
        self.host = arrays
        self.dev = [None if a is None else as_device(a) for a in arrays]
        for a in self.dev:
            if a is not None and a.size >= MAX_ELEMENTS:
                raise ValueError(f"an array of shape {tuple(a.shape)} has {a.size} elements; the CUDA "
                                 f"kernels index with 32-bit arithmetic and take fewer than {MAX_ELEMENTS} "
                                 "(2**32) per array: split the batch")

    def finish(self, *out_index: int) -> None:
        for i in out_index:
            if isinstance(self.host[i], np.ndarray):
                self.dev[i].copy_to_host(self.host[i])


def _host_offsets(diag_off, diag_off_host: np.ndarray | None) -> np.ndarray:
    """The hyperplane offsets on the host: ``diag_off_host`` when given, else ``diag_off`` (a
    device one copied back, which waits for the GPU)."""
    arr = diag_off if diag_off_host is None else diag_off_host
    return arr.copy_to_host() if hasattr(arr, "copy_to_host") else np.asarray(arr)


def _blocks(n: int, tpb: int, cap: int = BULK_MAX_BLOCKS) -> int:
    return max(1, min(cap, -(-int(n) // tpb)))


def _row_groups(B: int) -> int:
    """Sweep threads per (cell, unit): groups of :data:`ROWS_PER_THREAD` batch rows."""
    return -(-int(B) // ROWS_PER_THREAD)


def _tpb(tpb: int | None) -> int:
    """Threads per block: ``tpb``, or MDNUMBA_THREADS_PER_BLOCK for None; ValueError unless an
    integer from 1 to 1024 (a CUDA block's most; past it the launch fails deep inside)."""
    if tpb is None:
        return config.THREADS_PER_BLOCK
    if isinstance(tpb, bool) or not isinstance(tpb, (int, np.integer)) or not 1 <= tpb <= 1024:
        raise ValueError(f"threads per block must be an integer from 1 to 1024 (a CUDA block's most), "
                         f"got {tpb!r}")
    return int(tpb)


def _sm_count() -> int:
    return int(getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 1) or 1)


def _use_shared(W, use_shared: bool | None) -> bool:
    nbytes = W.size * W.dtype.itemsize
    if use_shared is None:
        return nbytes <= SHARED_BYTES_LIMIT
    if use_shared and nbytes > SHARED_BYTES_LIMIT:
        raise ValueError(f"weights of {nbytes} bytes do not fit in {SHARED_BYTES_LIMIT} bytes of shared "
                         "memory; use use_shared=None or False")
    return bool(use_shared)


def _arg_key(a) -> object:
    """What of an argument selects the compiled kernel: a numba device array's dtype, rank and
    contiguity (numba-cuda types it by them; reading its numba type builds one: ~2 µs an array, at
    every sweep), a NumPy array's dtype, rank and layout, a foreign device array's numba type,
    else its type."""
    if getattr(a, "gpu_data", None) is not None:
        return type(a), a.dtype.str, a.ndim, a.is_c_contiguous(), a.is_f_contiguous()
    numba_type = getattr(a, "_numba_type_", None)
    if numba_type is not None:
        return numba_type
    if isinstance(a, np.ndarray):
        return a.dtype.str, a.ndim, a.flags.c_contiguous
    return type(a)


def _launch_key(kernel, args, tpb: int, shmem: int) -> tuple:
    """A kernel launch's kernel, block shape, shared memory and argument types (:func:`_arg_key`):
    what the cooperative grid's limit and a failed cooperative launch are remembered by."""
    return (id(kernel), tpb, shmem, *map(_arg_key, args))


def _coop_limit(kernel, args, tpb: int, shmem: int) -> int:
    """Blocks of ``tpb`` threads and ``shmem`` B that can be resident at once, for the kernel
    compiled for ``args``; on a GPU remembered per kernel, argument types, block and device
    (typing a dozen arguments and asking the driver costs tens of µs, paid once, not per sweep)."""
    if SIMULATOR:  # cheap, and tests/simgrid.py changes it between cases
        return kernel.overloads[None].max_cooperative_grid_blocks(tpb)
    key = (*_launch_key(kernel, args, tpb, shmem), cuda.get_current_device().id)
    limit = _state["coop_limit"].get(key)
    if limit is None:
        compiled = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
        limit = _state["coop_limit"][key] = compiled.max_cooperative_grid_blocks(tpb, shmem)
    return limit


def _coop_cap(kernel, args, tpb: int, shmem: int) -> int:
    """The most blocks a cooperative launch of ``kernel`` may have: co-residency limit ∧
    :data:`COOP_MAX_BLOCKS` (what a layout that splits its work among blocks plans with)."""
    return min(_coop_limit(kernel, args, tpb, shmem), COOP_MAX_BLOCKS)


def _coop_grid(kernel, args, tpb: int, shmem: int, needed_blocks: int) -> int:
    """Blocks for a cooperative launch: :func:`_coop_cap` ∧ work."""
    limit = _coop_cap(kernel, args, tpb, shmem)
    if limit < 1:
        raise RuntimeError(f"cooperative kernel cannot be resident with {tpb} threads and {shmem} B "
                           "of shared memory per block")
    return max(1, min(limit, needed_blocks))


def _sweep(coop, diag, args, diag_off_host, rows_per_cell: int, D: int, shmem: int, path: str | None,
           tpb: int, reverse: bool, pre=None, post=None, extra_items: int = 0, blocks: int = 0) -> str:
    """Run a sweep on the requested path; return a description of the path taken.

    A hyperplane of n cells has ``n * rows_per_cell * D`` work items (rows per cell: scans x
    batch, or scans x row groups). ``pre`` / ``post``: kernels taking ``args`` that do what the
    cooperative kernel does before / after its sweep (``extra_items`` grid-stride items),
    launched around the per-diagonal launches. ``blocks``: the grid of every sweep launch (the
    sliced layout's, :func:`_plan_slices`), else sized to the work.
    """
    path = path or DEFAULT_PATH
    if path not in PATHS:
        raise ValueError(f"path (or MDNUMBA_CUDA_PATH) must be one of {PATHS}, got {path!r}")
    bounds = getattr(coop, "targetoptions", {}).get("launch_bounds")  # none in the simulator
    if bounds and tpb > bounds[0]:
        raise ValueError(f"{tpb} threads per block: with MDNUMBA_CUDA_MIN_BLOCKS set the sweep kernels are "
                         f"compiled for at most MDNUMBA_THREADS_PER_BLOCK={bounds[0]}")
    items = np.diff(diag_off_host) * rows_per_cell * D
    K = len(items)
    # the key only where a cooperative launch has failed before (typing a dozen arguments costs µs)
    failed = _state["coop_error"] and _state["coop_error"].get(_launch_key(coop, args, tpb, shmem))
    if path != "per-diagonal" and not (path == "auto" and failed):
        try:
            need = blocks or _blocks(max(items.max(), extra_items), tpb, 1 << 30)
            grid = _coop_grid(coop, args, tpb, shmem, need)
            if grid < blocks:  # the layout gave each of its blocks a share: fewer would skip rows
                raise RuntimeError(f"the layout's {blocks} blocks cannot all be co-resident ({grid} can)")
            launch(coop, grid, tpb, shmem, *args)
            return f"cooperative ({grid} blocks x {tpb} threads, {K} hyperplanes)"
        except Exception as exc:  # missing cudadevrt, no cooperative launch, ...
            if path == "cooperative":
                raise
            cuda.synchronize()  # an error left by earlier work raises here, under its own name
            failed = f"{type(exc).__name__}: {exc}"
            _state["coop_error"][_launch_key(coop, args, tpb, shmem)] = failed
    if pre is not None:
        launch(pre, _blocks(extra_items, tpb), tpb, 0, *args)
    order = range(K - 1, -1, -1) if reverse else range(K)
    for k in order:
        launch(diag, blocks or _blocks(items[k], tpb), tpb, shmem, *args, k)
    if post is not None:
        launch(post, _blocks(extra_items, tpb), tpb, 0, *args)
    why = f"; cooperative failed: {failed}" if path == "auto" else ""
    return f"per-diagonal ({K} launches{why})"


def _scratch(kind: str, shape: tuple, dtype):
    """A device buffer kept per (kind, shape, dtype): the same shapes recur every step, and
    kernels run in stream order, so reusing it between calls is safe (no allocation per call)."""
    key = (kind, tuple(int(n) for n in shape), np.dtype(dtype).str)
    buf = _state["scratch"].get(key)
    if buf is None:
        if len(_state["scratch"]) >= 64:
            _state["scratch"].clear()
        buf = _state["scratch"][key] = cuda.device_array(key[1], dtype=dtype)
    return buf


def _record(desc: str, shared: bool | str) -> None:
    """Remember the path taken; ``shared``: whether the weights were in shared memory, or how."""
    if not isinstance(shared, str):
        shared = "weights in shared memory" if shared else "weights in global memory"
    _state["last_path"] = f"{desc}, {shared}"


def _resolve_layout(layout: str | None, sweep: str) -> str:
    """``layout`` (None: :data:`DEFAULT_LAYOUT`) of a ``sweep`` (a key of :data:`AUTO_LAYOUT`),
    "auto" resolved; ValueError for an unknown one."""
    layout = layout or DEFAULT_LAYOUT
    if layout not in LAYOUTS:
        raise ValueError(f"layout (or MDNUMBA_CUDA_LAYOUT) must be one of {LAYOUTS}, got {layout!r}")
    return AUTO_LAYOUT[sweep] if layout == "auto" else layout


def _plan_slices(coop, args, S: int, N: int, D: int, B: int, diag_off_host: np.ndarray, itemsize: int,
                 layout: str, path: str | None, tpb: int) -> tuple[int, int, int, str]:
    """The sliced layout of a sweep (``coop``: its cooperative kernel, for ``args``), or why not:
    ``(nO, blocks, shared bytes, note)``; nO blocks per slice of SLICE units (as many as the
    cooperative grid holds, at most the largest hyperplane's (cell, row group) pairs per scan),
    blocks = S * nJ * nO with nJ = ceil(D / SLICE). nO = 0 (flat layout) when the
    layout is flat, the slice (and in the staged layout its tile, :data:`STAGE_SHAPE`) does not fit
    in :data:`SHARED_BYTES_LIMIT`, the sweep has more rows than the staged tile's int32 row table
    indexes, the staged tile is too small for ``tpb`` threads or they neither
    divide its :data:`STAGE_K` columns nor are a multiple of them or, off the
    per-diagonal path, the S * nJ slices cannot all be co-resident; ``note`` then says why."""
    if layout == "flat":
        return 0, 0, 0, ""
    run = VEC if layout == "staged" else 1  # the slice's steps in runs of VEC (_stage_slice)
    shmem = N * (N + 3) * -(-D // run) * run * SLICE * itemsize
    # the staged tile, and its rows' sources (int32), 16-byte aligned like the slice after them
    tile = math.prod(STAGE_SHAPE) * itemsize + -(-STAGE_SHAPE[0] * 4 // 16) * 16 if layout == "staged" else 0
    if shmem + tile > SHARED_BYTES_LIMIT:
        what = "weights and staged tile take" if tile else "weights take"
        return 0, 0, 0, f"flat layout: a slice's {what} {shmem + tile} B, over {SHARED_BYTES_LIMIT} B"
    rows = S * int(diag_off_host[-1]) * int(B)
    if tile and rows > np.iinfo(np.int32).max:
        return 0, 0, 0, f"flat layout: {rows} rows, past what the staged tile's int32 row table indexes"
    if tile and tpb > config.THREADS_PER_BLOCK:
        return 0, 0, 0, (f"flat layout: {tpb} threads per block, the staged tile holds the rows of "
                         f"MDNUMBA_THREADS_PER_BLOCK={config.THREADS_PER_BLOCK}")
    if tile and tpb % STAGE_K and STAGE_K % tpb:
        return 0, 0, 0, (f"flat layout: {tpb} threads per block, neither a multiple nor a divisor of the "
                         f"staged tile's {STAGE_K} columns")
    nJ = -(-D // SLICE)
    if (path or DEFAULT_PATH) == "per-diagonal":
        cap = 4 * _sm_count()
    else:
        cap = _coop_cap(coop, args, tpb, shmem)
        if S * nJ > cap:
            return 0, 0, 0, f"flat layout: {S * nJ} unit slices, {cap} co-resident blocks"
    pairs = int(np.diff(diag_off_host).max()) * _row_groups(B)
    nO = max(1, min(pairs, cap // (S * nJ)))
    staged = f", rows staged in {tile} B tiles" if tile else ""
    return nO, S * nJ * nO, shmem, (f"weights in shared memory, {S * nJ} slices of {SLICE} units x {nO} "
                                     f"blocks{staged}")


def _layout_sweep(sweep: str, flat: tuple, sliced: tuple, head: tuple, tail: tuple, W, S: int, N: int, D: int,
                  B: int, diag_off_host: np.ndarray, layout: str | None, use_shared: bool | None,
                  path: str | None, tpb: int, staged: tuple, item_weights=None, **sweep_kw) -> None:
    """Run a ``sweep`` ("forward", "infer", "backward") in its layout (:func:`_resolve_layout`):
    the ``sliced`` (coop, diag) kernels, or in the staged layout the ``staged`` ones, where
    :func:`_plan_slices` allows, else the ``flat`` ones
    with the weights ``W`` in shared memory when :func:`_use_shared` says so; their arguments
    are ``(*head, use_shared, nO, *tail)``; the backward sweeps the hyperplanes in reverse. In the
    item layout (:func:`_item_sweep`) ``item_weights()``, if given, takes W's place in them (made
    only there: a reshape costs µs of host time).
    Records the path taken (:func:`last_path`). The tensor layout (:func:`_tensor_sweep`) and the item
    layout run their own kernels where they can; where not, what they fall back to says why."""
    auto = (layout or DEFAULT_LAYOUT) == "auto"
    layout = _resolve_layout(layout, sweep)
    why_not = ""
    if layout == "tensor" or (auto and _auto_takes_tensor(sweep, W.dtype, N, D)):
        why_not = _tensor_sweep(sweep, head, tail, W, S, N, D, B, diag_off_host, path, **sweep_kw)
        if not why_not:
            return
        if layout == "tensor":  # asked for; "auto" runs AUTO_LAYOUT's instead
            from .tensor_cuda import FALLBACK  # it imports this module
            layout = FALLBACK[sweep]
        why_not = f"{layout} layout: {why_not}"
    if layout == "item":
        shmem, why_not = _plan_items(sweep, S, N, D, diag_off_host, W.dtype.itemsize)
        if not why_not:
            args = (*head, False, 0, *tail)
            if item_weights is not None:
                weights = item_weights()
                args = tuple(weights if a is W else a for a in args)
            desc = _item_sweep(_forward_item if sweep == "forward" else _backward_item, args, S * B, shmem,
                               len(diag_off_host) - 1)
            _record(desc, f"weights and a hyperplane's rows in {shmem} B of shared memory per block")
            return
        layout = "flat"
    sliced = staged if layout == "staged" else sliced
    nO, blocks, shmem, note = _plan_slices(sliced[0], (*head, False, 1, *tail), S, N, D, B, diag_off_host,
                                           W.dtype.itemsize, layout, path, tpb)
    shared = not nO and _use_shared(W, use_shared)
    if not nO:
        shmem = W.nbytes if shared else 0
    desc = _sweep(*(sliced if nO else flat), (*head, shared, nO, *tail), diag_off_host, S * _row_groups(B),
                  D, shmem, path, tpb, sweep == "backward", blocks=blocks, **sweep_kw)
    _record(desc, f"{why_not}; {note}" if why_not and note else why_not or note or shared)


def _auto_takes_tensor(sweep: str, dtype, N: int, D: int) -> bool:
    """Whether the layout "auto" tries the tensor layout for a ``sweep`` of an ``N``-D layer of ``D``
    units in ``dtype`` (:data:`AUTO_TENSOR_MIN_UNITS`)."""
    return sweep != "infer" and np.dtype(dtype) == np.float32 and N >= 2 and D >= AUTO_TENSOR_MIN_UNITS


def _tensor_sweep(sweep: str, head: tuple, tail: tuple, W, S: int, N: int, D: int, B: int,
                  diag_off_host: np.ndarray, path: str | None, **sweep_kw) -> str:
    """Run a ``sweep`` in the tensor layout (:mod:`mdnumba.kernels.tensor_cuda`): "" when it ran, else
    why not (the caller runs another layout)."""
    from . import tensor_cuda as tc  # it imports this module
    why = f"the tensor layout has no {sweep} sweep"
    if sweep in tc.KERNELS:
        args = (*head, False, 1, *tail)
        nO, blocks, shmem, why = tc.plan(sweep, args, S, N, D, B, diag_off_host, W.dtype,
                                         path or DEFAULT_PATH)
        if nO:  # the kernels' use_shared: whether the rows they sum over (h, dact) allow vector loads
            aligned = rows_aligned(head[0])
            desc = _sweep(*tc.KERNELS[sweep], (*head, aligned, nO, *tail), diag_off_host, S * B, D, shmem,
                          path, tc.TENSOR_THREADS, sweep == "backward", blocks=blocks, **sweep_kw)
            weights = "UT" if sweep == "backward" else "U"
            _record(desc, f"tensor cores (3xTF32), {blocks // nO} slices of {tc.slice_units(sweep)} units x "
                          f"{nO} blocks, {weights} in {shmem} B of shared memory per block")
            return ""
    return why


def _plan_items(sweep: str, S: int, N: int, D: int, diag_off_host: np.ndarray,
                itemsize: int) -> tuple[int, str]:
    """The item layout of a ``sweep``: ``(shared bytes per block, "")``, or ``(0, why not)`` (the flat
    layout then runs): all of a scan's U (UT backward) in :func:`_fill_slice`'s runs of VEC, and the
    tile of :func:`_item_shared`, must fit in the shared memory a block can opt in to
    (:func:`_item_shared_limit`); the threads' accumulators hold at most 3-D cells' gates; the
    saving-free forward has no item twin."""
    if sweep == "infer":
        return 0, "flat layout: the item layout has no saving-free sweep"
    if N + 3 > GATE_CHUNK:
        return 0, f"flat layout: the item layout sweeps at most {GATE_CHUNK - 3}-D layers, this one is {N}-D"
    backward = sweep == "backward"
    steps = (N + 3) * D if backward else D
    weights = (N if backward else N * (N + 3)) * -(-steps // VEC) * VEC * -(-D // SLICE) * SLICE
    tile = ITEM_TILES[backward] * (int(np.diff(diag_off_host).max()) + 1) * -(-steps // VEC) * VEC
    shmem = (weights + tile) * itemsize
    limit = _item_shared_limit()
    if shmem > limit:
        return 0, (f"flat layout: all weights and the tiles of hyperplane rows take {shmem} B, over the "
                   f"{limit} B of shared memory a block can have")
    return shmem, ""


def _item_shared_limit() -> int:
    """Bytes of dynamic shared memory a block can opt in to on this device (the simulator:
    :data:`ITEM_SHARED_LIMIT`)."""
    if SIMULATOR:
        return ITEM_SHARED_LIMIT
    return int(cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)


def _opt_in_shared(kernel, args, shmem: int) -> None:
    """Let ``kernel`` (compiled for ``args``) take ``shmem`` bytes of dynamic shared memory: past
    :data:`SHARED_BYTES_LIMIT` a launch needs the function's opt-in attribute, set once per kernel,
    argument types, size and device."""
    if SIMULATOR or shmem <= SHARED_BYTES_LIMIT:
        return
    key = ("opt_in", *_launch_key(kernel, args, 0, shmem), cuda.get_current_device().id)
    if key in _state["opt_in"]:
        return
    from numba.cuda.cudadrv.driver import binding, driver
    compiled = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
    cufunc = compiled._codelibrary.get_cufunc()
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, shmem, cufunc.handle, cufunc.device.id)
    _state["opt_in"].add(key)


def _item_sweep(kernel, args, blocks: int, shmem: int, K: int) -> str:
    """A sweep in the item layout: one plain launch of ``kernel`` (``blocks`` blocks of
    :data:`ITEM_THREADS`; what the other layouts' sweeps do before or after, the kernel does on
    each block's own rows); a description of the path taken."""
    _opt_in_shared(kernel, args, shmem)
    launch(kernel, blocks, ITEM_THREADS, shmem, *args)
    return f"item ({blocks} blocks x {ITEM_THREADS} threads, {K} hyperplanes, block barriers)"


def last_path() -> str | None:
    """Which sweep path the last forward/backward took (and why), or None before any."""
    return _state["last_path"]


# ---------------------------------------------------------------- host launchers
def _none(dtype, ndim: int):
    """An empty device array standing in for an unused optional kernel argument."""
    return _scratch("none", (0,) * ndim, dtype)


def wavefront_forward(h: HostOrDevice, c: HostOrDevice, act: HostOrDevice, U: HostOrDevice,
                      diag_off: HostOrDevice, parent: HostOrDevice, B: int, D: int, cell: int, *,
                      path: str | None = None, use_shared: bool | None = None, tpb: int | None = None,
                      diag_off_host: np.ndarray | None = None, out: HostOrDevice | None = None,
                      out_src: HostOrDevice | None = None, layout: str | None = None) -> None:
    """CUDA twin of :func:`mdnumba.kernels.wavefront.wavefront_forward` (same arguments but ``items``:
    the CUDA sweeps run a padded batch's padding rows too).

    ``act`` enters holding ``W x + b`` and leaves holding the gate activations;
    ``h``, ``c`` are written. ``path``: "auto" (cooperative, else per-diagonal),
    "cooperative" or "per-diagonal"; ``use_shared``: stage U in shared memory
    (None: when it fits). With ``out`` (R, S, D) and ``out_src`` (S, R) the same launch
    then writes ``out[r, q] = h[q*R + out_src[q, r]]`` (the output in grid order).
    ``layout``: "auto" (:data:`AUTO_LAYOUT`), "flat", "sliced", "staged", "item" or "tensor" (None:
    :data:`DEFAULT_LAYOUT`; all but flat ignore ``use_shared``, item also ``path`` and ``tpb`` for
    its sweep, tensor ``tpb``; :func:`_plan_slices`, :func:`_plan_items` and
    :func:`_tensor_sweep` say when they fall back).
    """
    tpb = _tpb(tpb)
    a = _Args(h, c, act, U, diag_off, parent, out, out_src)
    host_off = _host_offsets(diag_off, diag_off_host)
    h_, c_, act_, U_, off_, par_, out_, src_ = a.dev
    if out_ is None:
        out_, src_ = _none(h_.dtype, 3), _none(par_.dtype, 2)  # tables share a dtype
    head, tail = (h_, c_, act_, U_.reshape(U_.size), off_, par_, int(B), int(D), int(cell)), (out_, src_)
    _layout_sweep("forward", (_forward_coop, _forward_diag), (_forward_coop_sliced, _forward_diag_sliced),
                  head, tail, U_, U_.shape[0], par_.shape[1], D, B, host_off, layout, use_shared, path, tpb,
                  staged=(_forward_coop_staged, _forward_diag_staged),
                  post=_forward_post if src_.size else None, extra_items=out_.size)
    a.finish(0, 1, 2, 6)


def wavefront_infer(out: HostOrDevice, h: HostOrDevice, c: HostOrDevice, act: HostOrDevice,
                    lp: HostOrDevice, x: HostOrDevice, src: HostOrDevice, W: HostOrDevice,
                    bias: HostOrDevice, U: HostOrDevice, diag_off: HostOrDevice, parent: HostOrDevice,
                    first: int, last: int, B: int, D: int, cell: int, *, path: str | None = None,
                    use_shared: bool | None = None, tpb: int | None = None,
                    diag_off_host: np.ndarray | None = None, layout: str | None = None) -> None:
    """CUDA twin of :func:`mdnumba.kernels.wavefront.wavefront_infer` (same arguments but
    ``items``; keywords as in :func:`wavefront_forward`)."""
    tpb = _tpb(tpb)
    a = _Args(out, h, c, act, lp, x, src, W, bias, U, diag_off, parent)
    out_, h_, c_, act_, lp_, x_, src_, W_, b_, U_, off_, par_ = a.dev
    host_off = _host_offsets(diag_off, diag_off_host)[first:last + 1]
    head = (out_, h_, c_, act_, U_.reshape(U_.size), lp_, x_, src_, W_, b_, off_, par_, int(first),
            int(last), int(B), int(D), int(cell))
    _layout_sweep("infer", (_infer_coop, _infer_diag), (_infer_coop_sliced, _infer_diag_sliced), head, (), U_,
                  U_.shape[0], par_.shape[1], D, B, host_off, layout, use_shared, path, tpb,
                  staged=(_infer_coop_staged, _infer_diag_staged), pre=_infer_pre, extra_items=lp_.size)
    a.finish(0, 1, 2, 3, 4)


def wavefront_backward(dact: HostOrDevice, dc: HostOrDevice, dh: HostOrDevice, act: HostOrDevice,
                       c: HostOrDevice, U: HostOrDevice, diag_off: HostOrDevice, parent: HostOrDevice,
                       child: HostOrDevice, B: int, D: int, cell: int, *,
                       path: str | None = None, use_shared: bool | None = None, tpb: int | None = None,
                       diag_off_host: np.ndarray | None = None, dh_in: HostOrDevice | None = None,
                       dh_src: HostOrDevice | None = None,
                       operands: tuple[HostOrDevice, HostOrDevice, HostOrDevice] | None = None,
                       layout: str | None = None) -> None:
    """CUDA twin of :func:`mdnumba.kernels.wavefront.wavefront_backward` (same arguments but ``items``:
    the CUDA sweeps run a padded batch's padding rows too).

    ``dh`` enters holding dL/dh from above and is completed in place; ``dact`` and ``dc`` are
    written (``layout`` as in :func:`wavefront_forward`). ``U`` (S, D, N*G) is
    transposed first into ``UT`` (S, G, N*D),
    ``UT[.., g, d*D + j] = U[.., j, d*G + g]``, so that the threads of consecutive units read
    consecutive weights. Keywords as in :func:`wavefront_forward`. Done first in the same
    launch: with ``dh_in`` (R, S, D) and ``dh_src`` (S, R), ``dh[q*R + r] = dh_in[dh_src[q, r], q]``
    (so ``dh`` need not hold anything yet); with ``operands=(z, xs, h)``,
    ``z = [xs | h_parents | 1]`` (:func:`_operands`).
    """
    tpb = _tpb(tpb)
    z, xs, h = operands if operands is not None else (None, None, None)
    a = _Args(dact, dc, dh, act, c, U, diag_off, parent, child, dh_in, dh_src, z, xs, h)
    dev = a.dev
    U_, dt = dev[5], dev[0].dtype
    for i, ndim in ((9, 3), (10, 2), (11, 2), (12, 2), (13, 2)):
        if dev[i] is None:
            dev[i] = _none(dev[7].dtype if i == 10 else dt, ndim)  # 7: parent
    UT = _scratch("UT", (U_.size,), dt)
    host_off = _host_offsets(diag_off, diag_off_host)
    head, tail = (*dev[:5], UT, *dev[6:9], int(B), int(D), int(cell)), (U_, *dev[9:])
    kernels = (_backward_coop, _backward_diag), (_backward_coop_sliced, _backward_diag_sliced)
    _layout_sweep("backward", *kernels, head, tail, UT, U_.shape[0], dev[7].shape[1], D, B, host_off, layout,
                  use_shared, path, tpb, staged=(_backward_coop_staged, _backward_diag_staged),
                  item_weights=lambda: U_.reshape(U_.size), pre=_backward_pre,
                  extra_items=max(U_.size, dev[2].size, dev[11].size))
    a.finish(0, 1, 2, 11)


def gemm(out: HostOrDevice, a: HostOrDevice, bm: HostOrDevice, bias: HostOrDevice | None = None, *,
         ta: bool = False, tb: bool = False, accumulate: bool = False, method: str = "auto",
         nsplit: int | None = None, ones_row: bool = False) -> None:
    """``out = init + op(a) @ op(bm)``, ``op(a) = aᵀ`` if ta, ``op(bm) = bmᵀ`` if tb; with
    ``ones_row`` op(a) gets a last row of ones (``[xᵀ; 1ᵀ] dy = [dW; db]`` in one launch).

    init is ``bias`` (broadcast over rows) if given, ``out`` if ``accumulate``,
    else 0. ``method``: "small" (thread per output; best when K is small),
    "tiled" (shared-memory tiles, K split into ``nsplit`` chunks reduced in a
    fixed order), "tensor" (the same on tensor cores in 3xTF32, float32 on sm_80+:
    :mod:`mdnumba.kernels.tensor_cuda`) or "auto" (tensor where tiled would run and it can).
    """
    if bias is not None and accumulate:
        raise ValueError("give either bias or accumulate=True, not both")
    x = _Args(out, a, bm)
    dout, da, dbm = x.dev
    dbias = as_device(bias) if bias is not None else _none(dout.dtype, 1)  # not read without a bias
    M, N = dout.shape
    K = da.shape[0] if ta else da.shape[1]
    Ma = M - 1 if ones_row else M
    if K < 1:
        raise ValueError("gemm needs an inner dimension K >= 1")
    if (da.shape[1] if ta else da.shape[0]) != Ma or (dbm.shape[1] if tb else dbm.shape[0]) != K \
            or (dbm.shape[0] if tb else dbm.shape[1]) != N:
        raise ValueError(f"gemm shapes do not match: out {dout.shape}, a {da.shape} (ta={ta}), "
                         f"b {dbm.shape} (tb={tb})")
    if bias is not None and dbias.dtype != dout.dtype:
        raise TypeError("bias must have the dtype of out")
    if M == 0 or N == 0:  # nothing to write (a grid of zero blocks would not launch)
        x.finish(0)
        return
    mode = 0 if bias is not None else (1 if accumulate else 2)
    if method == "auto":
        # thread per output for a short K, or few columns with a K one thread can walk; long
        # reductions into few outputs (bias / readout gradients) want the tiled K split
        method = "small" if (K <= 32 or (N <= 16 and K <= 1024)) else "tiled"
        if method == "tiled" and not _tensor_gemm_why_not(dout, da, dbm):
            method = "tensor"
    if method == "small":
        tpb = _tpb(None)
        launch(_gemm_small, _blocks(M * N, tpb), tpb, 0, dout, da, dbm, dbias, M, N, K, ta, tb, mode, Ma)
    elif method == "tiled":
        _gemm_tiled_launch(dout, da, dbm, dbias, M, N, K, ta, tb, mode, nsplit, Ma,
                           (_gemm_tiled, (BM, BN, BK), GEMM_THREADS))
    elif method == "tensor":
        why = _tensor_gemm_why_not(dout, da, dbm)
        if why:
            raise ValueError(f"gemm's method 'tensor' cannot run: {why}")
        from .tensor_cuda import GEMM  # it imports this module
        _gemm_tiled_launch(dout, da, dbm, dbias, M, N, K, ta, tb, mode, nsplit, Ma, GEMM)
    else:
        raise ValueError(f"method must be auto, small, tiled or tensor, got {method!r}")
    x.finish(0)


def _tensor_gemm_why_not(out, a, bm) -> str:
    """Why ``gemm``'s "tensor" method cannot take these arrays ("" where it can): operands and
    output not all float32, or no TF32 tensor cores."""
    if not a.dtype == bm.dtype == out.dtype:
        return f"it takes operands of out's dtype, {out.dtype}, got {a.dtype} and {bm.dtype}"
    from .tensor_cuda import why_not_tf32  # it imports this module
    return why_not_tf32(out.dtype)


def _gemm_tiled_launch(out, a, bm, bias, M, N, K, ta, tb, mode, nsplit, Ma, kernel) -> None:
    """Pick the K split (enough blocks to fill the GPU) and launch tiles (+ reduction); ``kernel``:
    ``(kernel, (tile rows, tile columns, k per shared tile), threads per block)``."""
    kernel, (bm_, bn_, bk_), threads = kernel
    tiles = (-(-N // bn_)) * (-(-M // bm_))
    ksteps = -(-K // bk_)
    if nsplit is None:
        nsplit = max(1, min(ksteps, (8 * _sm_count()) // tiles, 64))
    nsplit = max(1, min(int(nsplit), ksteps))
    kchunk = -(-ksteps // nsplit) * bk_
    nsplit = -(-K // kchunk)
    grid = (-(-M // bm_), -(-N // bn_), nsplit)
    parts = _scratch("gemm parts", (nsplit, M, N), out.dtype) if nsplit > 1 else out.reshape((1,) + out.shape)
    launch(kernel, grid, threads, 0, out, parts, _tile_counters(grid[0] * grid[1]), a, bm, bias,
           M, N, K, ta, tb, mode, kchunk, Ma)


def _tile_counters(n: int):
    """int32 zeros, one per GEMM tile (each split-K launch leaves its counters at zero again)."""
    c = _state.get("tile counters")
    if c is None or c.shape[0] < n:
        c = _state["tile counters"] = cuda.to_device(np.zeros(max(n, 1024), np.int32))
    return c


def skew_rows(out: HostOrDevice, inp: HostOrDevice, src: HostOrDevice) -> None:
    """``out[q*R + r] = inp[src[q, r], q % inp.shape[1]]`` for ``inp`` (rows, S or 1, F) and
    ``src`` (S, R): every direction's rows in skewed order, one launch."""
    x = _Args(out, inp, src)
    tpb = _tpb(None)
    launch(_skew_rows, _blocks(x.dev[0].size, tpb), tpb, 0, *x.dev)
    x.finish(0)


def unskew_rows(out: HostOrDevice, inp: HostOrDevice, src: HostOrDevice) -> None:
    """``out[r, p] = Σ_{q ≡ p mod P} inp[q*M + src[q, r]]`` for ``out`` (R, P, F), ``src`` (S, R),
    M = inp.shape[0] / S: P = S restores each direction's grid order, P = 1 also sums the
    directions; one launch."""
    x = _Args(out, inp, src)
    tpb = _tpb(None)
    launch(_unskew_rows, _blocks(x.dev[0].size, tpb), tpb, 0, *x.dev)
    x.finish(0)


def gather_rows(out: HostOrDevice, inp: HostOrDevice, src: HostOrDevice) -> None:
    """``out[r, :F] = inp[src[r]]`` for every row r (``F = inp.shape[1]``)."""
    x = _Args(out, inp, src)
    tpb = _tpb(None)
    launch(_gather_rows, _blocks(x.dev[0].shape[0] * x.dev[1].shape[1], tpb), tpb, 0, *x.dev)
    x.finish(0)


def axpby(out: HostOrDevice, x: HostOrDevice, alpha: float, y: HostOrDevice, beta: float) -> None:
    """``out = alpha·x + beta·y`` on flat arrays of one dtype."""
    a = _Args(out, x, y)
    tpb = _tpb(None)
    launch(_axpby, _blocks(a.dev[0].shape[0], tpb), tpb, 0, a.dev[0], a.dev[1], alpha, a.dev[2], beta)
    a.finish(0)


def zero_padding(h: HostOrDevice, c: HostOrDevice, src: HostOrDevice) -> None:
    """CUDA twin of :func:`mdnumba.kernels.wavefront.zero_padding` (NumPy or device arrays)."""
    a = _Args(h, c, src)
    tpb = _tpb(None)
    launch(_zero_padding, _blocks(a.dev[0].size, tpb), tpb, 0, *a.dev)
    a.finish(0, 1)


def add_direction_grads(grads: HostOrDevice, parts: HostOrDevice, C: int, ND: int) -> None:
    """Add each direction's ``[dW; dU; db]`` (``parts`` (S, C + ND + 1, G), one GEMM's output per
    direction) into the flat gradients ``W (S, C, G) | U (S, ND, G) | b (S, G)``, one launch.
    (Three GEMMs per direction into column blocks of the operands cost more: numba-cuda builds a
    strided device view in Python row by row, 12 ms for 16k rows on an H200.)"""
    a = _Args(grads, parts)
    tpb = _tpb(None)
    launch(_add_direction_grads, _blocks(a.dev[1].size, tpb), tpb, 0, a.dev[0], a.dev[1], int(C), int(ND))
    a.finish(0)


def fill(out: HostOrDevice, value: float) -> None:
    """``out[:] = value`` on a flat array."""
    a = _Args(out)
    tpb = _tpb(None)
    launch(_fill, _blocks(a.dev[0].shape[0], tpb), tpb, 0, a.dev[0], value)
    a.finish(0)


def _state_launch(kernel, items: int, out_index: tuple, arrays: tuple, *ints: int) -> None:
    """Launch a state kernel on ``arrays`` and ``ints`` over ``items`` grid-stride items; copy
    NumPy outputs back."""
    a = _Args(*arrays)
    tpb = _tpb(None)
    launch(kernel, _blocks(items, tpb), tpb, 0, *a.dev, *(int(n) for n in ints))
    a.finish(*out_index)


def seed_state(h: HostOrDevice, c: HostOrDevice, act: HostOrDevice, h0: HostOrDevice, c0: HostOrDevice,
               B: int) -> None:
    """CUDA twin of :func:`mdnumba.kernels.wavefront.seed_state` (same arguments)."""
    _state_launch(_seed_state, h0.size // h.shape[1] * act.shape[1], (0, 1, 2), (h, c, act, h0, c0), B)


def state_of_cell(hs: HostOrDevice, cs: HostOrDevice, h: HostOrDevice, c: HostOrDevice, cell: int,
                  B: int) -> None:
    """CUDA twin of :func:`mdnumba.kernels.wavefront.state_of_cell` (same arguments)."""
    _state_launch(_state_of_cell, hs.size, (0, 1), (hs, cs, h, c), cell, B)


def seed_state_grad(dh: HostOrDevice, dc: HostOrDevice, dact: HostOrDevice, dhT: HostOrDevice,
                    dcT: HostOrDevice, B: int) -> None:
    """CUDA twin of :func:`mdnumba.kernels.wavefront.seed_state_grad` (same arguments)."""
    _state_launch(_seed_state_grad, dhT.size // dh.shape[1] * dact.shape[1], (0, 1, 2),
                  (dh, dc, dact, dhT, dcT), B)


def take_state_grad(dh0: HostOrDevice, dc0: HostOrDevice, dh: HostOrDevice, dc: HostOrDevice,
                    dact: HostOrDevice, B: int) -> None:
    """CUDA twin of :func:`mdnumba.kernels.wavefront.take_state_grad` (same arguments)."""
    _state_launch(_take_state_grad, dh0.size // dh.shape[1] * dact.shape[1], (0, 1, 4),
                  (dh0, dc0, dh, dc, dact), B)
