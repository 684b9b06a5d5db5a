"""CUDA backend tests.

The ``sim_*`` cases need CUDA kernels. ``NUMBA_ENABLE_CUDASIM`` must be set before
``numba.cuda`` is first imported, so :func:`test_simulator` reads them from ``python -m
pytest`` subprocesses under the simulator (tests/simruns.py: SHARDS concurrent shards, started
with the session, read at its end; one outer test per case, the rest of the suite stays on
the CPU path). When a real GPU is present they also run
in further subprocesses (:func:`test_gpu`). Shapes are tiny: the simulator runs every CUDA
thread as a Python thread (and, as tests/simgrid.py makes it, checks every array access).
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import ptxcheck
import pytest
from gradcheck import check_layer_gradients, large_input_weights
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import cuda
from refcheck import (
    check_against_reference,
    check_drawn_layer,
    check_state_against_reference,
    layers_and_inputs,
    reference_weights,
)
from simruns import (
    GPU_SHARDS,
    OTHER_ROWS,
    OTHER_ROWS_LEAVE_OUT,
    SHARDS,
    SKIP_RUNS,
    TIMEOUT,
    CaseRun,
    in_simulator,
    merged_report,
    reported,
    restarted_report,
)

from mdnumba import LSTM1D, MDLSTM2D, NonFiniteError, WavefrontLSTM, unpad_batch
from mdnumba import reference as ref
from mdnumba._validate import is_device_array
from mdnumba.backend_cuda import CudaUnavailableError, cuda_unavailable_reason

IN_SIMULATOR = in_simulator()


@pytest.fixture(scope="module", autouse=True)
def _concurrent_blocks():
    """Under the simulator, the stricter one of tests/simgrid.py: a launch's blocks run at once,
    cooperative grids on up to 3 blocks, a sync some threads skip and a data race are errors,
    memory a GPU leaves uninitialised is NaN."""
    if not IN_SIMULATOR:
        yield
        return
    import simgrid
    with simgrid.install(coop_blocks=3):
        yield


@pytest.fixture(scope="module", autouse=True)
def _record_launches():
    """Under the simulator, with MDNUMBA_PTX_RECORD=path: save every launch's argument types."""
    path = os.environ.get("MDNUMBA_PTX_RECORD")
    if IN_SIMULATOR and path:
        ptxcheck.install_recorder()
    yield
    if IN_SIMULATOR and path:
        ptxcheck.save(Path(path))


# ----------------------------------------------------------------- helpers for the cases
def _layer(ndim, C, D, dtype, device, seed=7, **kw):
    if ndim == 2:
        return MDLSTM2D(C, D, seed=seed, dtype=dtype, device=device, **kw)
    if ndim == 1:
        return LSTM1D(C, D, seed=seed, dtype=dtype, device=device, **kw)
    return WavefrontLSTM(ndim, C, D, seed=seed, dtype=dtype, device=device, **kw)


def _cpu_sweep_inputs(dims, B, D, scans, rng):
    from mdnumba.grid import wavefront
    wf = wavefront(dims)
    N = len(dims)
    G = (N + 3) * D
    U = rng.uniform(-0.5, 0.5, (scans, D, N * G))
    act = rng.standard_normal((scans * wf.n_cells * B, G))
    return wf, U, act


def _run_sweeps(mod, wf, U, act0, B, D, cell, **kw):
    R = act0.shape[0]
    h, c, act = np.zeros((R, D), act0.dtype), np.zeros((R, D), act0.dtype), act0.copy()
    mod.wavefront_forward(h, c, act, U, wf.diag_off, wf.parent, B, D, cell, **kw)
    dh = np.cos(3 * h)
    dact, dc = np.zeros_like(act), np.zeros_like(c)
    mod.wavefront_backward(dact, dc, dh, act, c, U, wf.diag_off, wf.parent, wf.child, B, D, cell, **kw)
    return h, c, act, dact, dc, dh


#: the CUDA sweeps' tolerance against the CPU's in float64, by the CUDA sweeps' dtype
SWEEP_TOL = {np.dtype(np.float64): dict(rtol=1e-12, atol=1e-14),
             np.dtype(np.float32): dict(rtol=2e-5, atol=2e-6)}


def _assert_sweeps_close(got, want, tol):
    """Each of :func:`_run_sweeps`' outputs ``got`` close to ``want``'s."""
    for name, a, b in zip(("h", "c", "act", "dact", "dc", "dh"), got, want):
        np.testing.assert_allclose(a, b, **tol, err_msg=name)


def _sweeps_match_cpu(wf, U, act0, B, D, cell, **kw):
    """The CUDA sweeps (``kw``: path, layout, ..) on ``U`` and ``act0`` in their dtype vs the CPU
    sweeps in float64 on the same values, at :data:`SWEEP_TOL`."""
    from mdnumba.kernels import wavefront as cpu
    from mdnumba.kernels import wavefront_cuda as gpu
    want = _run_sweeps(cpu, wf, U.astype(np.float64), act0.astype(np.float64), B, D, cell)
    got = _run_sweeps(gpu, wf, U, act0, B, D, cell, **kw)
    assert all(a.dtype == act0.dtype for a in got), [a.dtype for a in got]
    _assert_sweeps_close(got, want, SWEEP_TOL[act0.dtype])


# ----------------------------------------------------------------- simulator / GPU cases
@pytest.mark.parametrize("path", ["cooperative", "per-diagonal"])
@pytest.mark.parametrize("dims,shared,cell,scans,B,D", [
    ((3, 4), True, "graves", 1, 2, 3), ((3, 4), False, "stable", 2, 2, 3), ((3, 4), None, "spatial", 1, 2, 9),
    ((5,), None, "graves", 2, 2, 3), ((2, 2, 3), None, "stable", 1, 2, 3), ((2, 3), None, "graves", 1, 5, 9),
    ((2, 1, 2, 2), None, "spatial", 1, 1, 3)])
def sim_sweep_kernels_match_cpu(dims, shared, cell, scans, B, D, path, rng):
    """Kernel twins (flat layout) vs the CPU kernels in float64, both paths, U shared or global, every cell,
    one or several scans (directions) per sweep; B=5 leaves a remainder of ROWS_PER_THREAD rows
    (2 by default, 1 and 3 in the other settings' runs), D=9 one of UNROLL (8) steps in the
    forward's sums as (N+3)*D in the backward's, 4-D needs two passes over the gate blocks and
    runs the cell math on global memory (1- to 3-D on registers, unless MDNUMBA_CUDA_CELL_REGISTERS=0,
    as in one of test_simulator_other_rows_per_thread's runs)."""
    from mdnumba.kernels import wavefront_cuda as gpu
    from mdnumba.kernels.cell import cell_code
    code = cell_code(cell)
    assert gpu.GATE_CHUNK < 4 + 3  # the 4-D case covers a second pass
    assert gpu.REGISTER_CELL_MAX_N == (0 if os.environ.get("MDNUMBA_CUDA_CELL_REGISTERS") == "0" else 3)
    wf, U, act0 = _cpu_sweep_inputs(dims, B, D, scans, rng)
    _sweeps_match_cpu(wf, U, act0, B, D, code, path=path, use_shared=shared, tpb=8, layout="flat")
    assert gpu.last_path().startswith(path)


@pytest.mark.parametrize("layout", ["sliced", "staged"])
@pytest.mark.parametrize("path", ["cooperative", "per-diagonal"])
@pytest.mark.parametrize("dims,cell,scans,B,D", [
    ((3, 4), "graves", 1, 2, 9), ((3, 4), "stable", 1, 5, 3), ((5,), "graves", 2, 2, 3),
    ((2, 2, 3), "stable", 1, 2, 9), ((2, 1, 2, 2), "spatial", 1, 1, 3), ((2, 3), "graves", 2, 2, 9)])
def sim_sliced_sweeps_match_cpu(dims, cell, scans, B, D, path, layout, rng):
    """The sliced layout (a block per slice of SLICE units, their weights in shared memory) and
    the staged one (sliced, the neighbours' rows of h and dact read through shared tiles of
    STAGE_K steps: the simulator's 4 leave a partial tile at D = 9 and (N+3)*D = 45) vs
    the CPU kernels in float64: slices with units past D, several blocks sharing a slice's cells
    (the simulator's cooperative grid holds 3 blocks), 1-D to 4-D, several scans. With 8 units
    per slice, the last case's 4 slices exceed that grid: in the simulator the flat layout on
    the cooperative path (said in the path), sliced per diagonal."""
    from mdnumba.kernels import wavefront_cuda as gpu
    from mdnumba.kernels.cell import cell_code
    code = cell_code(cell)
    wf, U, act0 = _cpu_sweep_inputs(dims, B, D, scans, rng)
    _sweeps_match_cpu(wf, U, act0, B, D, code, path=path, tpb=8, layout=layout)
    slices = scans * -(-D // gpu.SLICE)
    want_path = f"{slices} slices of {gpu.SLICE} units x "
    sliced = not (path == "cooperative" and IN_SIMULATOR and slices > 3)
    if path == "cooperative" and IN_SIMULATOR:  # a GPU holds more blocks
        pairs = int(np.diff(wf.diag_off).max()) * gpu._row_groups(B)
        want_path = f"{want_path}{min(pairs, 3 // slices)} blocks" if sliced else \
            f"flat layout: {slices} unit slices, 3 co-resident"
    desc = gpu.last_path()
    assert desc.startswith(path) and want_path in desc, desc
    assert ("rows staged in" in desc) == (layout == "staged" and sliced), desc


@pytest.mark.skipif(not IN_SIMULATOR, reason="widens the simulator's cooperative grid")
@pytest.mark.parametrize("layout", ["sliced", "staged"])
def sim_sliced_sweeps_with_several_blocks_per_slice(layout, rng, monkeypatch):
    """The cooperative sliced and staged sweeps with several slices and several blocks sharing
    each slice's cells at once: the simulator's grid of 3 blocks gave 2 slices one block each
    (a GPU's gives them dozens), so this case, and any race between a slice's blocks, never ran."""
    from numba.cuda.simulator import kernel as simkernel

    from mdnumba.kernels import wavefront_cuda as gpu
    from mdnumba.kernels.cell import cell_code
    monkeypatch.setattr(simkernel.BlockManager, "coop_blocks", 6)
    monkeypatch.setattr(simkernel.FakeOverload, "max_cooperative_grid_blocks", lambda self, blockdim: 6)
    monkeypatch.setitem(gpu._state, "coop_limit", {})  # the limits cached at 3 blocks
    D = gpu.SLICE + 1  # two slices, the second one part full (SLICE: 8, or 2 in a run of other settings)
    wf, U, act0 = _cpu_sweep_inputs((3, 4), 2, D, 1, rng)
    _sweeps_match_cpu(wf, U, act0, 2, D, cell_code("graves"), path="cooperative", tpb=8, layout=layout)
    assert "cooperative (6 blocks x 8 threads" in gpu.last_path(), gpu.last_path()
    assert f"2 slices of {gpu.SLICE} units x 3 blocks" in gpu.last_path(), gpu.last_path()


@pytest.mark.parametrize("path,layout", [("per-diagonal", "flat"), ("per-diagonal", "sliced"),
                                         ("cooperative", "staged")])
def sim_float32_sweeps_match_cpu(path, layout, rng):
    """float32 sweeps in the path and layout pairs no other float32 case reaches, vs the CPU
    kernels in float64 on the same inputs at float32's tolerance: the other float32 cases reach
    per-diagonal sweeps only through the auto layout (forward flat, backward sliced), and staged
    ones only per diagonal (the GPU benchmark runs flat per diagonal and staged cooperative in
    float32). Without them test_kernels_compile_for_gpu would not compile these kernels for
    float32 (test_every_kernel_is_launched_in_both_dtypes says so)."""
    from mdnumba.kernels import wavefront_cuda as gpu
    from mdnumba.kernels.cell import cell_code
    code, B, D = cell_code("graves"), 2, 9
    wf, U, act0 = _cpu_sweep_inputs((3, 4), B, D, 1, rng)
    _sweeps_match_cpu(wf, U.astype(np.float32), act0.astype(np.float32), B, D, code, path=path, tpb=8,
                      layout=layout)
    desc = gpu.last_path()
    assert desc.startswith(path), desc
    assert ("slices of" in desc) == (layout != "flat"), desc
    assert ("rows staged in" in desc) == (layout == "staged"), desc


@pytest.mark.parametrize("dims,cell,scans,B,D", [
    ((3, 4), "graves", 1, 3, 9), ((5,), "graves", 2, 2, 3), ((2, 2, 3), "stable", 1, 2, 9),
    ((2, 1, 2, 2), "spatial", 1, 1, 3)])
def sim_item_sweeps_match_cpu(dims, cell, scans, B, D, rng):
    """The item layout (a block per scan and batch item, all of U and a hyperplane's rows in its
    shared memory, block barriers between hyperplanes, one plain launch) vs the CPU kernels in
    float64: 1-D to 3-D, several scans and items, D = 9 (a partial slice of units and runs of
    VEC padded with zeros), cells per hyperplane not a multiple of the rows per thread; a 4-D
    layer runs flat, said (sim_item_layer_matches_reference adds 2-D with 4 scans and 1-D from a
    state). At D = 9 the 2-D and 3-D backward refill the tile (8 threads take no hyperplane in one
    pass), the 1-D one writes it directly, as the layer test's D = 3 2-D and 3-D sweeps."""
    from mdnumba.kernels import wavefront_cuda as gpu
    from mdnumba.kernels.cell import cell_code
    code = cell_code(cell)
    wf, U, act0 = _cpu_sweep_inputs(dims, B, D, scans, rng)
    _sweeps_match_cpu(wf, U, act0, B, D, code, path="cooperative", tpb=8, layout="item")
    desc = gpu.last_path()
    if len(dims) > 3:
        assert desc.startswith("cooperative") and "the item layout sweeps at most 3-D layers" in desc, desc
    else:
        K = len(wf.diag_off) - 1
        want = f"item ({scans * B} blocks x {gpu.ITEM_THREADS} threads, {K} hyperplanes"
        assert desc.startswith(want), desc


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # _split(±inf) under the simulator
def sim_mma_is_the_warp_product(rng):
    """tensor_cuda.mma, each lane's fragments placed as the PTX ISA lays out mma.m16n8k8 with TF32
    operands (tensor_cuda's docstring), is D = A·B + C of the warp's 16x8 and 8x8 matrices; tf32
    rounds to nearest, ties away from zero, and clears the low 13 bits. On a GPU this checks the
    layout against the tensor cores themselves."""
    from mdnumba.kernels import tensor_cuda as tc

    @cuda.jit
    def product(A, Bm, C, Dm, R):
        lane = cuda.threadIdx.x
        g, t = lane >> 2, lane & 3
        d = tc.mma(tc.tf32(A[g, t]), tc.tf32(A[g + 8, t]), tc.tf32(A[g, t + 4]), tc.tf32(A[g + 8, t + 4]),
                   tc.tf32(Bm[t, g]), tc.tf32(Bm[t + 4, g]), C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t],
                   C[g + 8, 2 * t + 1])
        Dm[g, 2 * t], Dm[g, 2 * t + 1], Dm[g + 8, 2 * t], Dm[g + 8, 2 * t + 1] = d
        for i in range(lane, R.shape[0], 32):
            R[i, 1] = tc.tf32(R[i, 0])
            R[i, 2], R[i, 3] = tc._split(R[i, 0])

    A, Bm, C = (rng.standard_normal(s).astype(np.float32) for s in ((16, 8), (8, 8), (16, 8)))
    ties = np.array([0x3F801000, 0xBF801000, 0x3F800FFF, 0x3F801001, 0x3F802FFF, 0x7F7FEFFF], np.uint32)
    # a GPU's NaN (0x7fffffff: + 0x1000 would carry into the sign, -0.0), others, ±inf, the largest float32
    odd = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800000, 0xFF800000, 0x7F7FFFFF], np.uint32)
    ties = np.concatenate([ties, odd])
    R = np.zeros((len(ties) + 32, 4), np.float32)
    R[:len(ties), 0] = ties.view(np.float32)
    R[len(ties):, 0] = rng.standard_normal(32) * 10.0 ** rng.integers(-30, 30, 32)
    Dm = np.zeros((16, 8), np.float32)
    product[1, 32](A, Bm, C, Dm, R)

    def tf32(x):  # round half away from zero to 10 mantissa bits; NaN stays NaN
        bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        return np.where(np.isnan(x), np.float32(np.nan),
                        ((bits + 0x1000) & 0xFFFFE000).astype(np.uint32).view(np.float32))
    want = tf32(A).astype(np.float64) @ tf32(Bm).astype(np.float64) + C
    # a value in a wrong lane is off by O(1); tensor cores may round their sums differently
    np.testing.assert_allclose(Dm, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(R[:, 1], tf32(R[:, 0]))
    assert list(R[:6, 1].view(np.uint32)) == [0x3F802000, 0xBF802000, 0x3F800000, 0x3F802000, 0x3F802000,
                                              0x7F7FE000]
    assert list(R[6:len(ties), 1].view(np.uint32)) == [0x7FFFE000, 0xFFFFE000, 0x7FC00000, 0x7F800000,
                                                        0xFF800000, 0x7F800000]
    # _split: hi = tf32(x), lo = tf32(x - hi) (x = hi + lo to 21 bits); hi carries NaN and ±inf
    np.testing.assert_array_equal(R[:, 2], R[:, 1])
    finite = np.isfinite(R[:, 0])
    np.testing.assert_array_equal(R[finite, 3], tf32(R[finite, 0] - R[finite, 1]))


def sim_simulator_checks_that_a_warp_meets_at_one_mma():
    """Under the simulator the lanes of a warp calling tensor_cuda.mma at different places (its
    mma.sync.aligned is one instruction every lane must execute) is an error, not a product of
    what each lane passed."""
    if not IN_SIMULATOR:
        pytest.skip("checks the simulator; on a GPU the failing launch is undefined")
    from mdnumba.kernels import tensor_cuda as tc

    @cuda.jit
    def split(out):
        x = np.float32(1.0)
        if cuda.threadIdx.x % 2:
            d = tc.mma(x, x, x, x, x, x, x, x, x, x)
        else:
            d = tc.mma(x, x, x, x, x, x, x, x, x, x)
        out[cuda.threadIdx.x] = d[0]
    with pytest.raises(AssertionError, match="the lanes of a warp call mma at different places"):
        split[1, 32](np.zeros(32, np.float32))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def sim_tensor_sweeps_keep_a_gpu_nan(rng):
    """A NaN with every mantissa bit set, as a GPU's arithmetic makes them (0x7fffffff), in one
    cell's gate inputs: the tensor layout's sweeps carry it to every cell that depends on it, as
    the CPU's do (TF32 rounding by ``(bits + 0x1000) & ~0x1fff`` made it -0.0 in the sums, and
    the cells after it finite). dact may be NaN in more gates of a NaN cell than the CPU's (a
    missing parent's forget gate: the CPU skips it, the GPU multiplies by its zero state)."""
    from mdnumba.kernels import wavefront as cpu
    from mdnumba.kernels import wavefront_cuda as gpu
    from mdnumba.kernels.cell import cell_code
    wf, U, act0 = _cpu_sweep_inputs((3, 4), 2, 9, 1, rng)
    act0 = act0.astype(np.float32)
    act0.view(np.uint32)[1, 3] = 0x7FFFFFFF  # batch item 1 of the first cell
    code, U = cell_code("graves"), U.astype(np.float32)
    want = _run_sweeps(cpu, wf, U.astype(np.float64), act0.astype(np.float64), 2, 9, code)
    got = _run_sweeps(gpu, wf, U, act0, 2, 9, code, path="cooperative", layout="tensor")
    assert 1 < np.isnan(want[0]).any(axis=1).sum() < len(want[0])  # some rows, not all
    for name, a, b in zip(("h", "c", "act", "dact", "dc", "dh"), got, want):
        if name == "dact":
            assert np.isnan(a[np.isnan(b)]).all()
            a, b = np.where(np.isnan(a) & ~np.isnan(b), b, a), b
        np.testing.assert_allclose(a, b, **SWEEP_TOL[act0.dtype], err_msg=name)


@pytest.mark.parametrize("dims,cell,scans,B,D,path", [
    ((3, 4), "graves", 1, 3, 9, "cooperative"), ((5,), "stable", 2, 2, 3, "per-diagonal"),
    ((2, 2, 2), "spatial", 1, 2, 3, "cooperative"), ((2, 2), "graves", 1, 9, 16, "per-diagonal"),
    ((2, 1, 2, 2), "graves", 1, 1, 3, "cooperative")])
def sim_tensor_sweeps_match_cpu(dims, cell, scans, B, D, path, rng, monkeypatch):
    """The tensor layout's sweeps (their recurrent sums by warps of 3xTF32 mma, tensor_cuda) vs the
    CPU kernels in float64 on the same float32 inputs, at float32's tolerance: 1-D to 3-D, several
    scans, D = 3 and 9 (a part of the 8 units of a slice, and of the 16 steps of k of a pair of mma
    steps: the rows' operands loaded one by one) and 16 (rows of D and 5D loaded 4 at a time),
    16-row tiles across cells (B = 3: a cell's rows in two tiles) and a hyperplane of two tiles, one
    per warp of the block (B = 9, 18 rows), both paths; 4-D layers (and, checked in 1-D, float64
    ones) run sliced, said. (A warp's mma under the simulator is 32 Python threads meeting at a
    barrier: seconds a case.)"""
    from mdnumba.kernels import tensor_cuda as tc
    from mdnumba.kernels import wavefront_cuda as gpu
    from mdnumba.kernels.cell import cell_code
    code = cell_code(cell)
    wf, U, act0 = _cpu_sweep_inputs(dims, B, D, scans, rng)
    record, paths = gpu._record, []
    monkeypatch.setattr(gpu, "_record", lambda desc, how: (record(desc, how), paths.append(gpu.last_path())))
    _sweeps_match_cpu(wf, U.astype(np.float32), act0.astype(np.float32), B, D, code, path=path,
                      layout="tensor")
    for desc, sweep in zip(paths, ("forward", "backward")):
        if len(dims) > 3:
            assert "sliced layout: the tensor layout sweeps at most 3-D layers" in desc, desc
            continue
        units, weights = tc.slice_units(sweep), "UT" if sweep == "backward" else "U"
        shmem, nJ = tc.shared_bytes(len(dims), D, sweep), -(-D // units)
        assert desc.startswith(path), desc
        assert f"tensor cores (3xTF32), {scans * nJ} slices of {units} units" in desc, desc
        assert f"{weights} in {shmem} B of shared memory" in desc, desc
        if path == "cooperative":
            assert f"x {tc.TENSOR_THREADS} threads, {len(wf.diag_off) - 1} hyperplanes" in desc, desc
    if len(dims) == 1:  # (the cheapest case)
        _run_sweeps(gpu, wf, U, act0, B, D, code, path=path, layout="tensor")
        assert all("sliced layout: float64: tensor cores take float32" in p for p in paths[2:]), paths


def sim_tensor_layout_plans_only_blocks_that_can_run(rng, monkeypatch):
    """Found by reading: the tensor layout split each hyperplane's rows among as many blocks as
    could be co-resident, but a cooperative launch has at most COOP_MAX_BLOCKS, and the blocks past
    it never ran (rows left unswept, the path still said cooperative). It now plans with that cap;
    a grid smaller than the blocks a layout planned is refused (auto: the per-diagonal path runs
    instead; cooperative: an error); and a GPU without TF32 tensor cores (before sm_80, where the
    mma would not compile) runs the sliced layout, said. Threads per block past a block's 1024
    are refused when the layer is built (they failed at the launch)."""
    from mdnumba.kernels import tensor_cuda as tc
    from mdnumba.kernels import wavefront_cuda as gpu
    from mdnumba.kernels.cell import cell_code
    # rows a cell: 2 tiles per warp and one more, 3 blocks wanted (66 rows in the simulator's 2 warps,
    # 258 in a GPU's 8: a GPU's block planned for 66 takes all 5 tiles)
    B = (2 * tc.TENSOR_WARPS) * tc.TILE_ROWS + 2
    wf, U, act0 = _cpu_sweep_inputs((2,), B, 3, 1, rng)
    U, act0, code = U.astype(np.float32), act0.astype(np.float32), cell_code("graves")
    monkeypatch.setattr(gpu, "COOP_MAX_BLOCKS", 2)
    _sweeps_match_cpu(wf, U, act0, B, 3, code, path="cooperative", layout="tensor")
    assert gpu.last_path().startswith(f"cooperative (2 blocks x {tc.TENSOR_THREADS} threads"), gpu.last_path()
    monkeypatch.setattr(gpu, "_coop_grid", lambda *args: 1)  # fewer than the 2 planned
    with pytest.raises(RuntimeError, match="the layout's 2 blocks cannot all be co-resident"):
        _run_sweeps(gpu, wf, U, act0, B, 3, code, path="cooperative", layout="tensor")
    _sweeps_match_cpu(wf, U, act0, B, 3, code, path="auto", layout="tensor")
    assert gpu.last_path().startswith("per-diagonal"), gpu.last_path()
    monkeypatch.setattr(tc, "_compute_capability", lambda: (7, 5))
    _sweeps_match_cpu(wf, U, act0, B, 3, code, path="per-diagonal", layout="tensor")
    assert "sliced layout: TF32 mma needs compute capability 8.0+, this GPU has 7.5" in gpu.last_path()
    from mdnumba.backend_cuda import CudaLSTM
    for tpb in (0, 2048, 64.0):  # a CUDA block holds 1 to 1024 threads: refused when built
        with pytest.raises(ValueError, match=f"^threads per block must be an integer from 1 to 1024 .*{tpb}"):
            CudaLSTM.from_layer(MDLSTM2D(1, 2), threads_per_block=tpb)


@pytest.mark.parametrize("path", ["cooperative", "per-diagonal"])
def sim_staged_tile_loaded_by_fewer_threads_than_its_columns(path, rng):
    """A block with fewer threads than the staged tile's STAGE_K columns (on a GPU: 8 threads and
    32 columns) loads several columns of each row per thread: the sweeps are the CPU kernels'
    (float64; D = 9 and (N+3)*D = 45: partial tiles and zero-padded runs of VEC)."""
    from mdnumba.kernels import wavefront_cuda as gpu
    from mdnumba.kernels.cell import cell_code
    code, B, D = cell_code("graves"), 3, 9
    wf, U, act0 = _cpu_sweep_inputs((3, 4), B, D, 1, rng)
    _sweeps_match_cpu(wf, U, act0, B, D, code, path=path, tpb=gpu.STAGE_K // 2, layout="staged")
    assert "rows staged in" in gpu.last_path(), gpu.last_path()


@pytest.mark.parametrize("path", ["cooperative", "per-diagonal"])
def sim_auto_layout_sweeps_forward_flat_and_backward_sliced(path, rng, monkeypatch):
    """The layout "auto" (the default) of a float64 layer (wavefront_cuda.AUTO_LAYOUT: the faster
    per sweep on an H200): its saving and saving-free forward sweeps run flat, its backward sweep
    sliced; h, dx and the gradients are the CPU layer's."""
    from mdnumba import config
    from mdnumba.kernels import wavefront_cuda as gpu
    assert config.CUDA_LAYOUTS[0] == "auto" and gpu.AUTO_LAYOUT == dict(forward="flat", infer="flat",
                                                                         backward="sliced")
    monkeypatch.setattr(gpu, "DEFAULT_PATH", path)
    monkeypatch.setattr(gpu, "DEFAULT_LAYOUT", "auto")
    dev, host = (_layer(2, 2, 3, np.float64, device) for device in ("cuda", "cpu"))
    x = rng.standard_normal((2, 3, 4, 2))
    dh = rng.standard_normal((2, 3, 4, 3))
    paths, results = [], []
    for layer in (dev, host):
        results.append((layer.forward(x), layer.backward(dh), layer.grads.data.copy()))
        paths.append(gpu.last_path())  # the backward's (the host layer's leaves it)
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    dev.forward(x)
    assert "slices of" not in gpu.last_path() and "slices of" in paths[0], (gpu.last_path(), paths[0])
    dev.forward(x, save=False)
    assert gpu.last_path().startswith(path) and "slices of" not in gpu.last_path(), gpu.last_path()


def sim_auto_layout_takes_tensor_cores_for_wide_float32_layers(rng, monkeypatch):
    """From AUTO_TENSOR_MIN_UNITS hidden units (64: where an H100 measured it faster; 3 here) the
    layout "auto" sweeps a float32 layer's forward and backward in the tensor layout, its
    saving-free forward flat: h, dx and the gradients are the CPU layer's to float32 accuracy.
    Below that, in 1-D and float64 layers (sim_auto_layout_sweeps_forward_flat_and_backward_sliced)
    and where the tensor layout cannot run (a GPU before sm_80) AUTO_LAYOUT's layouts run, and the
    path says why."""
    from mdnumba.kernels import tensor_cuda as tc
    from mdnumba.kernels import wavefront_cuda as gpu
    assert gpu.AUTO_TENSOR_MIN_UNITS == 64
    monkeypatch.setattr(gpu, "DEFAULT_LAYOUT", "auto")
    monkeypatch.setattr(gpu, "DEFAULT_PATH", "per-diagonal")  # the choice is the path's; 10x faster here
    x = rng.standard_normal((1, 2, 3, 2)).astype(np.float32)
    dh = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    host = _layer(2, 2, 3, np.float32, "cpu")
    want = (host.forward(x), host.backward(dh), host.grads.data.copy())
    for units, cc, forward, backward in ((4, (9, 0), "flat", "sliced"),  # too narrow: as before
                                         (3, (9, 0), "tensor", "tensor"),
                                         (3, (7, 5), "flat layout: TF32", "sliced layout: TF32")):
        monkeypatch.setattr(gpu, "AUTO_TENSOR_MIN_UNITS", units)
        monkeypatch.setattr(tc, "_compute_capability", lambda cc=cc: cc)
        dev = _layer(2, 2, 3, np.float32, "cuda")
        h = dev.forward(x)
        paths = [gpu.last_path()]
        dx = dev.backward(dh)
        paths.append(gpu.last_path())
        got = (h, dx, dev.grads.data.copy())
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for sweep, desc in zip((forward, backward), paths):
            if sweep == "tensor":
                assert "tensor cores (3xTF32)" in desc, desc
            else:
                assert "tensor cores" not in desc, desc
                assert ("slices of" in desc) == sweep.startswith("sliced"), desc
                assert cc >= (8, 0) or f"{sweep} mma needs compute capability 8.0+, this GPU" in desc, desc
        dev.forward(x, save=False)
        assert "tensor cores" not in gpu.last_path() and "slices of" not in gpu.last_path(), gpu.last_path()
    _layer(1, 2, 3, np.float32, "cuda").forward(x[0])  # 1-D: B rows a hyperplane, a tile or two
    assert "tensor cores" not in gpu.last_path() and "slices of" not in gpu.last_path(), gpu.last_path()


@pytest.mark.parametrize("layout", ["flat", "sliced", "staged", "item", "tensor"])
def sim_sweep_stages_as_configured(layout, rng):
    """The sweeps' stages as this process's MDNUMBA_CUDA_SKIP (the timing diagnostic, run with
    each stage skipped by test_simulator_skipping_a_sweep_stage) says, graves cell, 2-D, every
    layout, cooperative path: every stage (the default), the CPU kernels' numbers; without the
    recurrent sums those of U = 0 (U itself is not 0); without the cells' math h, c, dact and dc
    stay 0, act the pre-activations given and dh the upstream gradient. (The tensor layout's in
    float32, the precision of its tensor-core products.)"""
    from mdnumba import config
    from mdnumba.kernels import wavefront as cpu
    from mdnumba.kernels import wavefront_cuda as gpu
    from mdnumba.kernels.cell import cell_code
    skipped = config.CUDA_SKIP
    asked = os.environ.get("MDNUMBA_CUDA_SKIP", "").split(",")
    assert skipped == tuple(st for st in ("sum", "cell") if st in asked)
    assert (gpu.RECURRENT_SUM, gpu.CELL_MATH) == ("sum" not in skipped, "cell" not in skipped)
    code, B, D = cell_code("graves"), 2, 3
    wf, U, act0 = _cpu_sweep_inputs((3, 4), B, D, 1, rng)
    dtype = np.dtype(np.float32 if layout == "tensor" else np.float64)
    U, act0 = U.astype(dtype), act0.astype(dtype)
    got = _run_sweeps(gpu, wf, U, act0, B, D, code, path="cooperative", tpb=8, layout=layout)
    if layout == "tensor":
        assert "tensor cores" in gpu.last_path(), gpu.last_path()
    if gpu.CELL_MATH:
        want = _run_sweeps(cpu, wf, U if gpu.RECURRENT_SUM else np.zeros_like(U), act0, B, D, code)
    else:
        zero = np.zeros((act0.shape[0], D))
        want = (zero, zero, act0, np.zeros_like(act0), zero, np.ones_like(zero))
    _assert_sweeps_close(got, want, SWEEP_TOL[dtype])
    with_u = _run_sweeps(cpu, wf, U, act0, B, D, code)
    assert not np.allclose(with_u[0], _run_sweeps(cpu, wf, 0 * U, act0, B, D, code)[0])  # U matters


@pytest.mark.parametrize("path,dtype", [("cooperative", np.float64), ("per-diagonal", np.float64),
                                        ("per-diagonal", np.float32)])
def sim_grid_lstm_kernels_match_cpu(path, dtype, rng):
    """Grid LSTM sweep twins in ``dtype`` vs the CPU kernels in float64 on the same inputs (T=4,
    depth 3, B=2, D=2), at float32's tolerance in float32 (the per-diagonal sweeps are reached
    in float32 nowhere else, so that the compile check has them)."""
    from mdnumba.grid import wavefront
    from mdnumba.kernels import gridlstm as cpu
    from mdnumba.kernels import gridlstm_cuda as gpu
    T, L, B, D = 4, 3, 2, 2
    wf = wavefront((T, L))
    R = wf.n_cells * B
    U_t, U_d = rng.uniform(-0.7, 0.7, (2, L, 2 * D, 4 * D)).astype(dtype)  # a weight set per level
    x, dtop = rng.standard_normal((2, T * B, D)).astype(dtype)
    act0 = rng.standard_normal((R, 8 * D)).astype(dtype)
    results = []
    for mod, kw, dt in ((cpu, {}, np.float64), (gpu, dict(path=path, tpb=8), dtype)):
        h, c, act = np.zeros((R, 2 * D), dt), np.zeros((R, 2 * D), dt), act0.astype(dt)
        Ut, Ud, xt, dtopt = (a.astype(dt) for a in (U_t, U_d, x, dtop))
        mod.grid_forward(h, c, act, xt, Ut, Ud, wf.diag_off, wf.parent, wf.perm, L, B, D, **kw)
        dact, dc, dx = np.zeros((R, 10 * D), dt), np.zeros((R, 2 * D), dt), np.zeros((T * B, D), dt)
        mod.grid_backward(dact, dc, dx, dtopt, act, c, Ut, Ud, wf.diag_off, wf.parent, wf.child,
                          wf.perm, L, B, D, **kw)
        results.append((h, c, act, dact[:, :8 * D], dc, dx))
    for name, a, b in zip(("h", "c", "act", "dact", "dc", "dx"), *results):
        assert b.dtype == dtype, name
        np.testing.assert_allclose(b, a, **SWEEP_TOL[np.dtype(dtype)], err_msg=name)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=layers_and_inputs(max_side=3, max_hidden=5, max_rows=48),
       path=st.sampled_from(["cooperative", "per-diagonal"]),
       layout=st.sampled_from(["flat", "sliced", "staged", "item"]),
       dtype_rtol=st.sampled_from([(np.float64, 1e-12), (np.float32, 1e-5)]))
def sim_any_shape_matches_reference(case, path, layout, dtype_rtol, monkeypatch):
    """Drawn device='cuda' layers (tests/test_properties.py's draws, smaller: a 3D batch of 3 in
    8 scans took 20 s of the simulator) vs the reference, on each path and layout (the item
    layout's sweeps take no path)."""
    from mdnumba import backend_cuda
    from mdnumba.kernels import wavefront_cuda
    monkeypatch.setattr(wavefront_cuda, "DEFAULT_PATH", path)
    monkeypatch.setattr(wavefront_cuda, "DEFAULT_LAYOUT", layout)
    check_drawn_layer(case, *dtype_rtol, device="cuda")
    desc = backend_cuda.last_path()
    assert desc.startswith("item (" if layout == "item" else path), desc


@pytest.mark.parametrize("tied,path", [(True, "cooperative"), (False, "per-diagonal")])
def sim_grid_lstm_layer_matches_reference(tied, path, rng, monkeypatch):
    """GridLSTM2D(device='cuda') vs the float64 reference: output, dx and every gradient, on
    each sweep path."""
    from mdnumba.kernels import wavefront_cuda
    from mdnumba.layers import GridLSTM2D
    monkeypatch.setattr(wavefront_cuda, "DEFAULT_PATH", path)
    layer = GridLSTM2D(2, 3, seed=1, dtype=np.float64, tied=tied, device="cuda")
    x, dh = rng.standard_normal((2, 2, 4, 2))
    y = layer.forward(x)
    p = {k: np.asarray(v) for k, v in layer.params.items()}
    yr, cache = ref.gridlstm_forward(x, p["U_time"], p["U_depth"], p["b_time"], p["b_depth"], 3)
    np.testing.assert_allclose(y, yr, rtol=1e-12, atol=1e-12)
    dx = layer.backward(dh)
    rdx, *grads = ref.gridlstm_backward(dh, cache)
    np.testing.assert_allclose(dx, rdx, rtol=1e-10, atol=1e-12)
    for name, want in zip(("U_time", "U_depth", "b_time", "b_depth"), grads):
        np.testing.assert_allclose(layer.grads[name], want, rtol=1e-10, atol=1e-12, err_msg=name)
    assert wavefront_cuda.last_path().startswith(path)


@pytest.mark.parametrize("path", ["cooperative", "per-diagonal", "item"])
@pytest.mark.parametrize("ndim,dims,sizes,kw", [
    (1, (5,), [(5,), (2,), (3,)], {"directions": 2}),
    (2, (3, 4), [(2, 4), (3, 1)], {"directions": 4, "cell": "stable"})])
def sim_padded_batches(path, ndim, dims, sizes, kw, rng, monkeypatch):
    """``forward(x, sizes=...)`` on a device layer (the padded batch's tables; the unskew and the
    saving-free sweep leave zeros in the padding) equals the CPU layer: outputs with and without
    saving, dx and the gradients; on each path, and in the item layout ("item": its sweeps write
    the output and read the upstream gradient on each block's own rows)."""
    from mdnumba.kernels import wavefront_cuda
    if path == "item":
        monkeypatch.setattr(wavefront_cuda, "DEFAULT_LAYOUT", "item")
    else:
        monkeypatch.setattr(wavefront_cuda, "DEFAULT_PATH", path)
    gpu, cpu = (_layer(ndim, 2, 3, np.float64, d, **kw) for d in ("cuda", "cpu"))
    x = rng.standard_normal((len(sizes),) + dims + (2,))
    y = cpu.forward(x, sizes=sizes)
    tol = dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(gpu.forward(x, save=False, sizes=sizes), y, **tol)
    np.testing.assert_allclose(gpu.forward(x, sizes=sizes), y, **tol)
    assert wavefront_cuda.last_path().startswith(path)
    dh = rng.standard_normal(y.shape)
    np.testing.assert_allclose(gpu.backward(dh), cpu.backward(dh), **tol)
    np.testing.assert_allclose(gpu.grads.data, cpu.grads.data, **tol)
    if ndim == 1:
        with pytest.raises(RuntimeError, match="not defined after forward.x, sizes"):
            gpu.final_state()
        with pytest.raises(ValueError, match="sizes= cannot be combined with state="):
            gpu.forward(x, state=gpu.zero_state(len(sizes)), sizes=sizes)


def sim_zero_padding_twins(rng):
    """``zero_padding`` (after a sized saving forward) zeroes h and c in exactly the padding's
    rows, on both backends, in float64 and float32."""
    from mdnumba.grid import direction_tables
    from mdnumba.kernels import wavefront, wavefront_cuda
    skew, _ = direction_tables((3, 4), 2, 4, ((2, 3), (3, 1)))
    pad = skew.reshape(-1) < 0
    for dtype in (np.float64, np.float32):
        h0, c0 = rng.standard_normal((2, skew.size, 3)).astype(dtype)
        for twin in (wavefront, wavefront_cuda):
            h, c = h0.copy(), c0.copy()
            twin.zero_padding(h, c, skew)
            for got, was in ((h, h0), (c, c0)):
                assert not got[pad].any(), twin
                np.testing.assert_array_equal(got[~pad], was[~pad])


def sim_padded_batches_through_a_device_stack(rng):
    """A Sequential of device stages (CudaLSTM, CudaBlockSubsample, CudaLSTM) passes ``sizes``
    on and divides them at the blocks as the host stack does."""
    from mdnumba.backend_cuda import CudaBlockSubsample, CudaLSTM
    from mdnumba.stack import BlockSubsample, Sequential, mdlstm_stack
    host = mdlstm_stack(2, 2, 2, layers=2, directions=4, subsample=2, seed=3, dtype=np.float64)
    dev = Sequential(*(CudaBlockSubsample(2) if isinstance(s, BlockSubsample) else CudaLSTM.from_layer(s)
                       for s in host.stages))
    assert dev.n_params == host.n_params  # flat device arrays counted as the host's buffers
    sizes = [(4, 6), (2, 4)]
    x = rng.standard_normal((2, 4, 6, 2))
    want = host.forward(x, sizes=sizes)
    got = dev.forward(x, sizes=sizes)
    np.testing.assert_allclose(got if isinstance(got, np.ndarray) else got.copy_to_host(), want,
                               rtol=1e-12, atol=1e-13)
    out_sizes = dev.out_sizes(sizes)  # unpad_batch cuts device arrays too (device views)
    for part, whole in zip(unpad_batch(got, out_sizes), unpad_batch(want, out_sizes)):
        np.testing.assert_allclose(part if isinstance(part, np.ndarray) else part.copy_to_host(), whole,
                                   rtol=1e-12, atol=1e-13)


def sim_a_cuda_stack_keeps_cuda_arrays_on_the_device(rng):
    """``mdlstm_stack(..., subsample=2, device="cuda")``: CUDA arrays in, device arrays out of
    forward and backward (its BlockSubsample ran the host op, so the stack gave NumPy), the CPU
    stack's values and gradients; NumPy in still gives NumPy."""
    from numba import cuda

    from mdnumba.stack import mdlstm_stack
    kw = dict(layers=2, subsample=2, seed=3, dtype=np.float64)
    host, dev = mdlstm_stack(2, 2, 2, **kw), mdlstm_stack(2, 2, 2, device="cuda", **kw)
    x = rng.standard_normal((2, 4, 2, 2))
    want = host.forward(x)
    dy = rng.standard_normal(want.shape)
    want_dx = host.backward(dy)
    got = dev.forward(cuda.to_device(x))
    dx = dev.backward(cuda.to_device(dy))
    assert is_device_array(got) and is_device_array(dx), (type(got), type(dx))
    np.testing.assert_allclose(got.copy_to_host(), want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dx.copy_to_host(), want_dx, rtol=1e-12, atol=1e-13)
    for a, b in zip(dev.layers, host.layers):
        np.testing.assert_allclose(a.grads.data, b.grads.data, rtol=1e-12, atol=1e-13)
    copy = pickle.loads(pickle.dumps(dev))  # the copy leaves the device twin behind, makes its own
    assert copy[1]._twin is None and dev[1]._twin is not None
    assert is_device_array(copy.forward(cuda.to_device(x)))
    assert isinstance(dev.forward(x), np.ndarray)
    np.testing.assert_allclose(dev.backward(dy), want_dx, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match=r"divisible by 2, got shape \(1, 5, 4, 3\)"):  # the array's own
        dev[1].forward(cuda.to_device(np.zeros((1, 5, 4, 3))))
    sub = dev[1]  # after a forward of a CUDA array: a NumPy dy gives NumPy, a masked one is refused
    h = sub.forward(cuda.to_device(rng.standard_normal((1, 4, 2, 4))))
    dy = rng.standard_normal(h.shape)
    dx = sub.backward(dy)
    assert isinstance(dx, np.ndarray) and dx.shape == (1, 4, 2, 4)
    np.testing.assert_array_equal(dx, sub.backward(cuda.to_device(dy)).copy_to_host())
    masked = np.ma.masked_array(dy, mask=False)
    masked[0, 0, 0, 0] = np.ma.masked
    with pytest.raises(ValueError, match="^dy is a masked array with 1 masked value"):
        sub.backward(masked)
    with pytest.raises(ValueError, match="^x on the device must be C-contiguous"):  # a GPU's reshape
        sub.forward(cuda.to_device(rng.standard_normal((1, 4, 4, 4)))[:, :, ::2])  # would raise
    sub.forward(rng.standard_normal((1, 4, 2, 4)))  # the host op; a CUDA dy still gives a CUDA dx,
    back = sub.backward(cuda.to_device(dy))  # as a layer's dx comes as its dh (it gave NumPy)
    assert is_device_array(back) and np.array_equal(back.copy_to_host(), dx)


@pytest.mark.parametrize("kind", ["grid", "stacked"])
def sim_char_lm_on_the_device_matches_the_cpu(kind, rng):
    """``CharLM(device='cuda')`` (the char-LM of ``mdnumba train --device cuda``): logits with
    and without saving, and every gradient, equal the CPU model's."""
    from mdnumba.charlm import CharLM
    gpu, cpu = (CharLM(kind, vocab=6, hidden=3, layers=2, seed=4, dtype=np.float64, device=d)
                for d in ("cuda", "cpu"))
    ids = rng.integers(0, 6, (2, 5))
    tol = dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(gpu.forward(ids, save=False), cpu.forward(ids, save=False), **tol)
    dlogits = rng.standard_normal((2, 5, 6))
    for model in (gpu, cpu):
        model.forward(ids)
        model.backward(dlogits)
    for a, b in zip(gpu.layers, cpu.layers):
        np.testing.assert_allclose(a.grads.data, b.grads.data, **tol, err_msg=repr(b))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def sim_char_lm_kernels_match_numpy(dtype, rng):
    """The device char-LM's pieces against the host ones: CudaEmbedding forward and its gradient
    (repeated ids, the CPU's order: equal), dropout from the host mask's seed (equal, forward and
    backward), softmax cross-entropy (loss and dL/dlogits)."""
    from mdnumba.backend_cuda import CudaEmbedding
    from mdnumba.charlm import Dropout, Embedding, softmax_xent
    from mdnumba.kernels import charlm_cuda, optim_cuda
    from mdnumba.kernels.dropout import draw_seed
    host = Embedding(5, 3, seed=2, dtype=dtype)
    dev = CudaEmbedding.from_layer(host)
    ids = np.array([[0, 4, 4, 1], [4, 2, 0, 4]])
    np.testing.assert_array_equal(dev.forward(ids), host.forward(ids))
    dy = rng.standard_normal((2, 4, 3)).astype(dtype)
    for _ in range(2):  # accumulates
        host.backward(dy)
        dev.backward(cuda.to_device(dy))
    np.testing.assert_array_equal(dev.grads_to_host(), host.grads.data)
    assert is_device_array(dev.forward(cuda.to_device(ids.astype(np.int32))))
    drop, x = Dropout(0.3), rng.standard_normal((2, 4, 3)).astype(dtype)
    want, dy = drop.forward(x, np.random.default_rng(5)), rng.standard_normal(x.shape).astype(dtype)
    seed = draw_seed(np.random.default_rng(5))  # the mask's seed, as the host drew it
    out = cuda.device_array_like(x)
    for a, b in ((x, want), (dy, drop.backward(dy))):  # the host's mask, forward and backward
        charlm_cuda.dropout(out, cuda.to_device(a), seed, 0.3)
        np.testing.assert_array_equal(out.copy_to_host(), b)
    z = (rng.standard_normal((2, 3, 7)) * 30).astype(dtype)  # far apart: exp would overflow unshifted
    z[0, 0] = [0, 1, -3, 2, 0, 5, 800]  # the largest last: a max over all but it overflowed
    t = rng.integers(0, 7, (2, 3)).astype(np.int32)
    loss, grad, _ = softmax_xent(z, t)
    dz, sums = cuda.device_array_like(z), optim_cuda.scratch(optim_cuda.REDUCE_BLOCKS)
    charlm_cuda.softmax_xent(dz, sums, cuda.to_device(z), cuda.to_device(t))
    assert optim_cuda.mean_loss(sums.copy_to_host(), t.size) == pytest.approx(loss, rel=1e-12)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(dz.copy_to_host(), grad, rtol=tol, atol=tol * 1e-3)


@pytest.mark.parametrize("T,L,tied,dtype", [(4, 3, True, np.float64), (2, 4, True, np.float64),
                                            (3, 3, False, np.float64), (3, 2, True, np.float32)])
def sim_grid_lstm_device_layer_matches_cpu(T, L, tied, dtype, rng):
    """CudaGridLSTM (the device char-LM's grid) == GridLSTM2D on the CPU, weights tied or one set
    per depth level: forward with and without saving, dL/dx and every weight gradient
    (accumulated over two backwards), NumPy and device arrays in."""
    from mdnumba.backend_cuda import CudaGridLSTM
    from mdnumba.layers import GridLSTM2D
    cpu = GridLSTM2D(3, L, seed=2, dtype=dtype, tied=tied)
    cpu.params.data[...] += 0.1 * rng.standard_normal(cpu.params.data.shape)  # biases too
    dev = CudaGridLSTM.from_layer(cpu)
    x, dh = (rng.standard_normal((2, T, 3)).astype(dtype) for _ in range(2))
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dev.forward(x, save=False), cpu.forward(x, save=False), **tol)
    with pytest.raises(RuntimeError, match="save=False"):
        dev.backward(dh)
    want = cpu.forward(x)
    np.testing.assert_allclose(dev.forward(cuda.to_device(x)).copy_to_host(), want, **tol)
    for _ in range(2):
        want_dx = cpu.backward(dh)
        got_dx = dev.backward(dh)
    np.testing.assert_allclose(got_dx, want_dx, **tol)
    np.testing.assert_allclose(dev.grads_to_host(), cpu.grads.data, **tol)
    assert dev.backward(cuda.to_device(dh), input_grad=False) is None
    with pytest.raises(ValueError, match="dh must have shape"):
        dev.backward(np.zeros((1, T, 3)))


@pytest.mark.parametrize("path", ["cooperative", "per-diagonal"])
@pytest.mark.parametrize("tied", [True, False])
def sim_grid_lstm_without_saving(path, tied, rng, monkeypatch):
    """GridLSTM2D(device='cuda').forward(x, save=False) (``grid_infer``'s CUDA twin: two
    anti-diagonals of buffers) equals the CPU layer's forward(x), with time longer and shorter
    than the depth, float64 and float32."""
    from mdnumba.kernels import wavefront_cuda
    from mdnumba.layers import GridLSTM2D
    monkeypatch.setattr(wavefront_cuda, "DEFAULT_PATH", path)
    for (B, T, L), dtype, tol in (((2, 4, 3), np.float64, 1e-12), ((3, 2, 4), np.float64, 1e-12),
                                  ((2, 3, 2), np.float32, 1e-5)):
        gpu, cpu = (GridLSTM2D(2, L, seed=1, dtype=dtype, tied=tied, device=d) for d in ("cuda", "cpu"))
        for name in ("b_time", "b_depth"):
            cpu.params[name] = gpu.params[name] = rng.standard_normal(cpu.params[name].shape)
        x = rng.standard_normal((B, T, 2)).astype(dtype)
        np.testing.assert_allclose(gpu.forward(x, save=False), cpu.forward(x), rtol=tol, atol=tol / 10)
        assert wavefront_cuda.last_path().startswith(path)
        with pytest.raises(RuntimeError, match="save=False"):
            gpu.backward(np.ones((B, T, 2)))


@pytest.mark.parametrize("path", ["cooperative", "per-diagonal"])
@pytest.mark.parametrize("ndim,shape,kw", [
    (2, (2, 3, 4, 2), {}), (1, (2, 5, 2), {"directions": 2}),
    (2, (1, 3, 2, 2), {"cell": "stable", "directions": 4}), (3, (1, 2, 2, 3, 1), {"cell": "spatial"}),
    (3, (1, 2, 2, 3, 1), {"cell": "stable", "directions": 8})])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def sim_layer_matches_reference(ndim, shape, kw, dtype, rtol, path, rng, monkeypatch):
    """device='cuda' layers vs the float64 reference: h, dx and every gradient (cells, directions:
    3D with all 8, whose directions 4 and up go through the same unskew and dx sums as the first
    four)."""
    _check_layer_against_reference(ndim, shape, kw, dtype, rtol, path, rng, monkeypatch)


@pytest.mark.parametrize("path,dtype,rtol", [("cooperative", np.float64, 1e-12),
                                             ("per-diagonal", np.float32, 1e-5)])
def sim_four_dimensional_layer_with_every_direction_matches_reference(path, dtype, rtol, rng, monkeypatch):
    """As :func:`sim_layer_matches_reference` for a 4D layer with all 16 directions on a 2x2x2x2
    grid, whose last cell has all four parents (each path once: ~8 s a case here)."""
    shape = (1, 2, 2, 2, 2, 1)
    _check_layer_against_reference(4, shape, {"directions": 16}, dtype, rtol, path, rng, monkeypatch)


def _check_layer_against_reference(ndim, shape, kw, dtype, rtol, path, rng, monkeypatch):
    from mdnumba import backend_cuda
    from mdnumba.kernels import wavefront_cuda
    monkeypatch.setattr(wavefront_cuda, "DEFAULT_PATH", path)
    layer = _layer(ndim, shape[-1], 3, dtype, "cuda", **kw)
    x = rng.standard_normal(shape).astype(dtype)
    dh = rng.standard_normal(shape[:-1] + (layer.out_channels,))
    check_against_reference(layer, x, dh, rtol)
    assert backend_cuda.last_path().startswith(path)


@pytest.mark.parametrize("ndim,shape,kw,dtype,rtol", [
    (2, (2, 3, 4, 2), {"directions": 4, "cell": "stable"}, np.float64, 1e-12),
    (3, (1, 2, 2, 3, 1), {}, np.float32, 1e-5)])
def sim_item_layer_matches_reference(ndim, shape, kw, dtype, rtol, rng, monkeypatch):
    """device='cuda' layers in the item layout vs the float64 reference (output, dx, every gradient),
    the backward sweep's prologue (the skewed upstream gradient, the weight-gradient operands) on
    each block's own rows; the saving-free forward (no item twin) flat, said; and a 1-D layer from
    an initial state (its final state, the state's gradient)."""
    from mdnumba.kernels import wavefront_cuda
    monkeypatch.setattr(wavefront_cuda, "DEFAULT_LAYOUT", "item")
    layer = _layer(ndim, shape[-1], 3, dtype, "cuda", **kw)
    x = rng.standard_normal(shape).astype(dtype)
    check_against_reference(layer, x, rng.standard_normal(shape[:-1] + (layer.out_channels,)), rtol)
    assert wavefront_cuda.last_path().startswith("item ("), wavefront_cuda.last_path()
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    free = layer.forward(x, save=False)
    assert "flat layout: the item layout has no saving-free sweep" in wavefront_cuda.last_path()
    np.testing.assert_allclose(free, layer.forward(x), **tol)
    layer = _layer(1, 2, 3, dtype, "cuda", directions=2)
    pair = [(rng.standard_normal((2, 6)), rng.standard_normal((2, 6))) for _ in range(2)]
    x, dh = rng.standard_normal((2, 4, 2)), rng.standard_normal((2, 4, 6))
    check_state_against_reference(layer, x, pair[0], dh, pair[1], rtol)
    assert wavefront_cuda.last_path().startswith("item ("), wavefront_cuda.last_path()


def sim_tensor_sweeps_load_misaligned_rows_one_by_one(rng):
    """Rows of h (forward) and dact (backward) that do not start 16-byte aligned (views one element
    into a buffer) are read one value at a time (rows_aligned is False): the same numbers as from
    aligned copies, at D = 16 where aligned rows are read 4 values per load."""
    from mdnumba.grid import wavefront
    from mdnumba.kernels import wavefront_cuda as gpu
    wf, B, D = wavefront((2, 2)), 1, 16
    R, G = wf.n_cells * B, 5 * D
    U = cuda.to_device(rng.uniform(-0.5, 0.5, (1, D, 2 * G)).astype(np.float32))
    act0 = rng.standard_normal((R, G)).astype(np.float32)
    results = []
    for offset in (0, 1):
        def dev(rows, cols, off=offset):
            return cuda.to_device(np.zeros(rows * cols + off, np.float32))[off:].reshape(rows, cols)
        h, c, act, dact, dc = dev(R, D), dev(R, D), dev(R, G), dev(R, G), dev(R, D)
        assert gpu.rows_aligned(h) == gpu.rows_aligned(dact) == (offset == 0)
        act.copy_to_device(act0)
        gpu.wavefront_forward(h, c, act, U, wf.diag_off, wf.parent, B, D, 0, layout="tensor")
        dh = cuda.to_device(np.cos(3 * h.copy_to_host()))
        gpu.wavefront_backward(dact, dc, dh, act, c, U, wf.diag_off, wf.parent, wf.child, B, D, 0,
                               layout="tensor")
        assert "tensor cores" in gpu.last_path(), gpu.last_path()
        results.append([a.copy_to_host() for a in (h, c, act, dact, dc, dh)])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def sim_tensor_layer_matches_reference(rng, monkeypatch):
    """A float32 device='cuda' layer (1-D, both directions) in the tensor layout vs the float64
    reference (output, dx, every gradient): its forward sweep on tensor cores writes the output in
    grid order after its last sync, its backward sweep's prologue skews the upstream gradient and
    builds the weight-gradient operands; the saving-free forward runs flat, said."""
    from mdnumba.kernels import tensor_cuda, wavefront_cuda
    monkeypatch.setattr(wavefront_cuda, "DEFAULT_LAYOUT", "tensor")
    layer = _layer(1, 2, 3, np.float32, "cuda", directions=2)
    x = rng.standard_normal((3, 5, 2)).astype(np.float32)
    layer.forward(x)
    desc = wavefront_cuda.last_path()
    assert "tensor cores (3xTF32), 2 slices of 8 units" in desc, desc
    check_against_reference(layer, x, rng.standard_normal((3, 5, layer.out_channels)), 1e-5)
    desc = wavefront_cuda.last_path()
    units = tensor_cuda.slice_units("backward")  # 8 x MDNUMBA_CUDA_TENSOR_TILES
    assert f"tensor cores (3xTF32), 2 slices of {units} units" in desc and "UT in" in desc, desc
    free = layer.forward(x, save=False)
    assert "flat layout: the tensor layout has no infer sweep" in wavefront_cuda.last_path()
    np.testing.assert_allclose(free, layer.forward(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["cooperative", "per-diagonal"])
@pytest.mark.parametrize("directions,cell,dtype,rtol", [(1, "graves", np.float64, 1e-12),
                                                        (2, "spatial", np.float32, 1e-5)])
def sim_state_matches_reference(path, directions, cell, dtype, rtol, rng, monkeypatch):
    """LSTM1D(device='cuda') from an initial state vs the float64 reference: h, the final state,
    dx, every gradient and the initial state's gradient (with a final-state gradient)."""
    from mdnumba.kernels import wavefront_cuda
    monkeypatch.setattr(wavefront_cuda, "DEFAULT_PATH", path)
    layer = _layer(1, 2, 3, dtype, "cuda", directions=directions, cell=cell)
    B, T, W = 2, 4, directions * 3
    pair = [(rng.standard_normal((B, W)), rng.standard_normal((B, W))) for _ in range(2)]
    check_state_against_reference(layer, rng.standard_normal((B, T, 2)), pair[0],
                                  rng.standard_normal((B, T, W)), pair[1], rtol)


def sim_state_on_device_arrays(rng):
    """Chunks chained on the device (CUDA arrays in, CUDA states out) equal the CPU layer's
    chain; a state for a 2D layer and a final-state gradient without a state are refused."""
    from numba import cuda

    from mdnumba.backend_cuda import CudaLSTM
    x, dh = rng.standard_normal((2, 5, 2)), rng.standard_normal((2, 5, 6))
    runs = {}
    for device in ("cpu", "cuda"):
        a, b = (_layer(1, 2, 3, np.float64, device, directions=2) for _ in range(2))
        def put(arr, device=device):
            return cuda.to_device(np.ascontiguousarray(arr)) if device == "cuda" else arr
        y1 = a.forward(put(x[:, :2]), state=tuple(put(s) for s in a.zero_state(2)))
        y2 = b.forward(put(x[:, 2:]), state=a.final_state())
        dx2 = b.backward(put(dh[:, 2:]))
        dx1 = a.backward(put(dh[:, :2]), final_state_grad=b.initial_state_grad())
        got = [y1, y2, dx1, dx2, *b.final_state(), *a.initial_state_grad()]
        if device == "cuda":
            assert all(hasattr(v, "copy_to_host") for v in got)
            got = [v.copy_to_host() for v in got]
        runs[device] = got + [a.grads.data + b.grads.data]
    for i, (want, have) in enumerate(zip(runs["cpu"], runs["cuda"])):
        np.testing.assert_allclose(have, want, rtol=1e-11, atol=1e-12, err_msg=str(i))
    dev = CudaLSTM.from_layer(MDLSTM2D(1, 2, dtype=np.float64))
    with pytest.raises(ValueError, match="state is for 1D layers"):
        dev.forward(np.ones((1, 2, 2, 1)), state=(np.zeros((1, 2)), np.zeros((1, 2))))
    dev.forward(np.ones((1, 2, 2, 1)))
    for call in (dev.final_state, lambda: dev.zero_state(1)):
        with pytest.raises(ValueError, match=r"is for 1D layers \(LSTM1D\), this layer has 2 grid axes"):
            call()
    layer = _layer(1, 2, 3, np.float64, "cuda")
    y = layer.forward(x)
    with pytest.raises(ValueError, match="final_state_grad needs a forward from a state"):
        layer.backward(np.ones_like(y), final_state_grad=layer.zero_state(2))
    with pytest.raises(ValueError, match=r"state\[1\] is for a batch of 3"):
        layer.forward(x, state=(np.zeros((2, 3)), np.zeros((3, 3))))


def sim_failed_forward_keeps_the_last_one_and_free_buffers(rng):
    """A forward refused for its state leaves the last forward's activations and the weights it
    uploaded intact (its backward equals the CPU layer's; the refused forward uploaded the
    weights changed since); free_buffers() drops a device layer's device copy and activations."""
    layers = [_layer(1, 1, 2, np.float64, device, directions=2) for device in ("cuda", "cpu")]
    x, dh = rng.standard_normal((3, 2, 1)), rng.standard_normal((3, 2, 4))
    state = (rng.standard_normal((3, 4)), rng.standard_normal((3, 4)))
    for layer in layers:
        layer.forward(x, state=state)
        if layer.device == "cuda":  # its backward takes the weights of its forward, not these
            layer.params.data[...] *= 2
        with pytest.raises(ValueError, match="is for a batch of 1"):
            layer.forward(2 * x + 1, state=(state[0][:1], state[1][:1]))
        layer.zero_grad()
    gpu, cpu = layers
    tol = dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(gpu.backward(dh), cpu.backward(dh), **tol)
    np.testing.assert_allclose(gpu.grads.data, cpu.grads.data, **tol)
    np.testing.assert_allclose(gpu.initial_state_grad()[0], cpu.initial_state_grad()[0], **tol)
    assert 0 < gpu.saved_bytes() < gpu.workspace_bytes()
    gpu.free_buffers()
    assert gpu.saved_bytes() == gpu.workspace_bytes() == 0
    for call in (gpu.final_state, lambda: gpu.backward(dh)):
        with pytest.raises(RuntimeError, match="no saved activations; run forward"):
            call()


@pytest.mark.parametrize("layout", ["flat", "sliced", "staged"])
@pytest.mark.parametrize("path", ["cooperative", "per-diagonal"])
@pytest.mark.parametrize("ndim,shape,kw,dtype", [
    (2, (3, 3, 4, 2), {}, np.float64), (2, (2, 2, 3, 1), {"cell": "stable", "directions": 4}, np.float32),
    (3, (1, 2, 3, 2, 1), {"cell": "spatial", "directions": 8}, np.float64),
    (1, (2, 5, 2), {"directions": 2}, np.float32), (2, (1, 1, 1, 1), {}, np.float64)])
def sim_forward_without_saving(ndim, shape, kw, dtype, path, layout, rng, monkeypatch):
    """``forward(x, save=False)`` on a device layer (its two-plane sweep, :func:`wavefront_infer`'s
    CUDA twin) equals the CPU layer's and the float64 reference, 1D from a state with its final
    state, in each layout; backward is then refused with nothing added to the gradients."""
    from mdnumba.kernels import wavefront_cuda
    monkeypatch.setattr(wavefront_cuda, "DEFAULT_PATH", path)
    monkeypatch.setattr(wavefront_cuda, "DEFAULT_LAYOUT", layout)
    gpu, cpu = (_layer(ndim, shape[-1], 3, dtype, device, **kw) for device in ("cuda", "cpu"))
    x = rng.standard_normal(shape).astype(dtype)
    yr, _ = ref.directions_forward(x.astype(np.float64), reference_weights(cpu), cpu.cell)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gpu.forward(x, save=False), yr, **tol)
    desc = wavefront_cuda.last_path()
    sliced = "slices of" in desc or "flat layout: " in desc  # too many slices for the grid: flat, said
    assert desc.startswith(path) and sliced == (layout != "flat"), desc
    assert ("rows staged in" in desc) == (layout == "staged" and "slices of" in desc), desc
    assert gpu.saved_bytes() == 0 < gpu.workspace_bytes()
    if ndim == 1:
        state = tuple(rng.standard_normal((shape[0], gpu.out_channels)).astype(dtype) for _ in range(2))
        y = gpu.forward(x, state=state, save=False)
        np.testing.assert_allclose(y, cpu.forward(x, state=state), **tol)
        for a, b in zip(gpu.final_state(), cpu.final_state()):
            np.testing.assert_allclose(a, b, **tol)
    with pytest.raises(RuntimeError, match="save=False"):
        gpu.backward(np.ones(yr.shape))
    assert not gpu.grads.data.any()


def sim_saving_free_sweep_reads_src_minus_one_as_a_zero_input(rng):
    """``wavefront_infer`` (CPU and CUDA twin) swept over the whole 1D state layout, whose first
    and last cells have src -1, equals LSTM1D on x with a zero step before and after: -1 is a
    zero input (the layers sweep only the real cells)."""
    from mdnumba.grid import state_tables
    from mdnumba.kernels import wavefront, wavefront_cuda
    B, T, C, D, S = 3, 4, 2, 3, 2
    layer = LSTM1D(C, D, directions=S, dtype=np.float64, seed=2)
    layer.params.b = rng.standard_normal(layer.params.b.shape)  # a zero input's cell: h != 0
    x = rng.standard_normal((B, T, C))
    padded = np.zeros((B, T + 2, C))
    padded[:, 1:-1] = x
    want = layer.forward(padded)[:, 1:-1]
    wf, skew_src, _ = state_tables(T, B, S)
    for twin in (wavefront, wavefront_cuda):
        h, c = np.zeros((S * 2 * B, D)), np.zeros((S * 2 * B, D))
        act, lp = np.zeros((S * 2 * B, 4 * D)), np.zeros((2, 1), wf.parent.dtype)
        out = np.full((B * T, S, D), np.nan)
        twin.wavefront_infer(out, h, c, act, lp, x.reshape(-1, C), skew_src, layer._per_direction("W"),
                             layer._per_direction("b"), layer.params["U"].reshape(S, D, -1), wf.diag_off,
                             wf.parent, 0, wf.n_diagonals, B, D, layer.cell_code)
        np.testing.assert_allclose(out.reshape(B, T, S * D), want, rtol=1e-12, atol=1e-13, err_msg=str(twin))


def sim_forward_without_saving_in_models_and_overflow(rng, monkeypatch):
    """A device model's ``forward(save=False)`` equals the host model's; an output with NaN/inf
    is refused in both modes (the counting kernel patched: an overflowing grid is too big to
    simulate)."""
    from mdnumba.backend_cuda import CudaLSTM
    from mdnumba.models import build_model
    from mdnumba.train_device import DeviceModel
    model = build_model("md", hidden=3, dtype=np.float64, seed=1, layers=2, directions=4)
    dev = DeviceModel(model)
    img = rng.random((2, 3, 4, 1))
    tol = dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dev.forward(img, save=False), model.forward(img, save=False), **tol)
    assert all(st._saved["inference"] for st in dev.stages)  # the two-plane sweep ran
    with pytest.raises(RuntimeError, match="save=False"):
        dev.backward(np.ones((2, 3, 4, 1)))
    from numba import cuda
    host = MDLSTM2D(2, 2, dtype=np.float64, seed=3)  # C = S*D: it can read its own output
    own = CudaLSTM.from_layer(host)
    own.reuse_outputs = True  # as in a device model: the output buffer is kept between calls
    x0 = rng.random((1, 3, 3, 2))
    y1 = own.forward(cuda.to_device(x0), save=False)
    y2 = own.forward(y1, save=False)  # its kept output buffer as the input: not written while read
    want = host.forward(host.forward(x0, save=False), save=False)
    np.testing.assert_allclose(y2.copy_to_host(), want, **tol)
    gpu = _layer(2, 1, 2, np.float64, "cuda")
    gpu.forward(img)  # a good forward first: the refused one drops it
    monkeypatch.setattr(CudaLSTM, "_nonfinite", lambda self, a: 3 if self.checked else 0)
    for save in (True, False):
        with pytest.raises(ValueError, match="state overflowed in forward: 3 values of its output h"):
            gpu.forward(img, save=save)
        with pytest.raises(RuntimeError, match="backward"):  # nothing kept to differentiate (as on the CPU)
            gpu.backward(np.ones((2, 3, 4, 2)))


@pytest.mark.parametrize("ndim", [2, 3, 4])
def sim_stable_mix_subtracts_the_largest_logit(ndim, rng):
    """The stable cell's softmax over its neighbour logits subtracts the largest: with the last
    logit at 100 (e^100 overflows float32; CUDA's exp, unlike the CPU's, does not clamp its
    input) h, dx and the gradients stay finite and equal the reference, on CPU and CUDA (the
    simulator's exp overflows as the GPU's: ``wavefront_cuda._simulated_exp``). 2D takes λ = σ(l_1),
    3D the fused pair (``softmax_pair``), 4D the general softmax."""
    shape = (1, 3, 2, 1) if ndim == 2 else (1,) + (2,) * ndim + (1,)
    x = rng.standard_normal(shape).astype(np.float32)
    for device in ("cpu", "cuda"):
        layer = _layer(ndim, 1, 2, np.float32, device, cell="stable")
        layer.params.b[2 * 2:ndim * 2] = 0.0
        layer.params.b[ndim * 2:(ndim + 1) * 2] = 100.0  # [i | f | l_1 .. l_{N-1} | o | g], D = 2
        check_against_reference(layer, x, rng.standard_normal(shape[:-1] + (2,)), 1e-5)


@pytest.mark.parametrize("cell", ["graves", "stable"])
def sim_cooperative_sweeps_across_many_blocks(cell, rng, monkeypatch):
    """A 4-direction float64 layer whose cooperative sweeps span several blocks equals the CPU
    layer: h, dx and every gradient. On a GPU 40x40 B8 D32 (~40 blocks); under the simulator
    (blocks run at once, tests/simgrid.py) 4x5 B2 D3 on 3 blocks, of which some have no work
    on the first and last anti-diagonals but still take part in every grid sync."""
    from mdnumba import backend_cuda
    from mdnumba.kernels import wavefront_cuda
    monkeypatch.setattr(wavefront_cuda, "DEFAULT_PATH", "cooperative")
    B, H, W, D = (2, 4, 5, 3) if IN_SIMULATOR else (8, 40, 40, 32)
    x, dh = rng.standard_normal((B, H, W, 2)), rng.standard_normal((B, H, W, 4 * D))
    runs = []
    for device in ("cpu", "cuda"):
        layer = _layer(2, 2, D, np.float64, device, cell=cell, directions=4)
        runs.append((layer.forward(x), layer.backward(dh), np.array(layer.grads.data)))
    for name, a, b in zip(("h", "dx", "grads"), *runs):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12, err_msg=name)
    blocks = re.match(r"cooperative \((\d+) blocks", backend_cuda.last_path())
    assert blocks and int(blocks.group(1)) > 1, backend_cuda.last_path()


@pytest.mark.parametrize("ndim,shape,zeros,kw", [
    (2, (1, 2, 3, 1), False, {}), (1, (2, 3, 1), True, {}), (2, (1, 2, 2, 1), True, {"cell": "stable"}),
    (2, (1, 2, 2, 1), False, {"cell": "stable"}), (3, (1, 2, 2, 2, 1), False, {"cell": "spatial"})])
def sim_gradients_finite_differences(ndim, shape, zeros, kw, rng):
    """float64 central differences through the CUDA path: every cell, 3D, and all-zero inputs
    (where the seed's TensorFlow MD-LSTM gave NaN gradients; there dW is 0 = 0). Directions are
    compared with the reference (:func:`sim_layer_matches_reference`): a 4-direction case took
    30 s here."""
    layer = _layer(ndim, shape[-1], 2, np.float64, "cuda", seed=3, **kw)
    layer.params.b[...] = rng.standard_normal(layer.params.b.shape) * 0.5
    x = np.zeros(shape) if zeros else rng.standard_normal(shape)
    check_layer_gradients(layer, x, rng)


@pytest.mark.parametrize("method", ["small", "tiled"])
def sim_gemm_matches_numpy(method, rng):
    """``out = init + op(a) @ op(b)`` for every transpose flag and init mode, with K splits, and
    with the ones row appended to op(a)."""
    from mdnumba.kernels import wavefront_cuda as gpu
    M, N, K = 5, 6, 7
    for ta in (False, True):
        for tb in (False, True):
            a = rng.standard_normal((K, M) if ta else (M, K))
            b = rng.standard_normal((N, K) if tb else (K, N))
            prod = (a.T if ta else a) @ (b.T if tb else b)
            bias = rng.standard_normal(N)
            for nsplit in ((1, 3) if method == "tiled" else (None,)):
                kw = dict(ta=ta, tb=tb, method=method, nsplit=nsplit)
                out = rng.standard_normal((M, N))
                gpu.gemm(out, a, b, bias, **kw)
                np.testing.assert_allclose(out, bias + prod, rtol=1e-12, atol=1e-12)
                old = out.copy()
                gpu.gemm(out, a, b, accumulate=True, **kw)
                np.testing.assert_allclose(out, old + prod, rtol=1e-12, atol=1e-12)
                gpu.gemm(out, a, b, **kw)
                np.testing.assert_allclose(out, prod, rtol=1e-12, atol=1e-12)
                ones = np.vstack([prod, (b.T if tb else b).sum(axis=0)])  # op(a) with a row of ones
                out = rng.standard_normal((M + 1, N))
                want = out + ones
                gpu.gemm(out, a, b, accumulate=True, ones_row=True, **kw)
                np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    a32, b32 = (rng.standard_normal(sh).astype(np.float32) for sh in ((M, K), (K, N)))
    out = np.zeros((M, N), np.float32)
    gpu.gemm(out, a32, b32, method=method)  # the training dtype (and its compiled kernel)
    np.testing.assert_allclose(out, a32.astype(float) @ b32, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shapes"):
        gpu.gemm(np.zeros((2, 2)), np.zeros((2, 3)), np.zeros((2, 2)))
    for m, n in ((0, N), (M, 0)):  # an empty product: nothing to launch (was a grid of 0 blocks)
        gpu.gemm(np.zeros((m, n)), np.ones((m, K)), np.ones((K, n)), method=method)


def sim_gemm_k_split_over_many_tiles(rng):
    """The tiled GEMM with its K split over a grid of several row and column tiles, every tile
    reducing its own chunks (blocks run at once and in any order, on a GPU and under
    tests/simgrid.py: a counter shared between tiles races and fails here; at the GPU's 64x64
    tiles this needs the larger shape)."""
    from mdnumba.kernels import wavefront_cuda as gpu
    M, N, K = (9, 10, 7) if gpu.SIMULATOR else (130, 200, 300)
    for ta, tb in ((False, False), (True, True)):
        a = rng.standard_normal((K, M) if ta else (M, K))
        b = rng.standard_normal((N, K) if tb else (K, N))
        out = np.zeros((M, N))
        gpu.gemm(out, a, b, ta=ta, tb=tb, method="tiled", nsplit=4)
        np.testing.assert_allclose(out, (a.T if ta else a) @ (b.T if tb else b), rtol=1e-12, atol=1e-12)


def sim_gemm_at_the_gpu_tile_sizes(rng, monkeypatch):
    """The tiled GEMM with a GPU's tile constants (64x64 tiles, 16 k steps in trips of 4, 256
    threads; the simulator's own are 4x4, 2 and 4): ragged row, column and k tiles, a transpose
    each, a K split. Under the simulator the kernel is Python and reads them at each call."""
    from mdnumba.kernels import wavefront_cuda as gpu
    BM, BN, BK, TM, TN = 64, 64, 16, 4, 4
    for name, value in dict(BM=BM, BN=BN, BK=BK, TM=TM, TN=TN, GEMM_THREADS=(BM // TM) * (BN // TN),
                            _AS_COLS=BM + gpu.TILE_PAD, _BS_COLS=BN + gpu.TILE_PAD, _RM=BM // TM,
                            _RN=BN // TN, _KU=4).items():
        assert gpu.SIMULATOR or getattr(gpu, name) == value, name  # a GPU build has them already
        monkeypatch.setattr(gpu, name, value)
    for M, N, K, ta, tb, nsplit in ((66, 65, 37, True, False, 2), (3, 70, 20, False, True, 1)):
        a = rng.standard_normal((K, M) if ta else (M, K))
        b = rng.standard_normal((N, K) if tb else (K, N))
        out = np.zeros((M, N))
        gpu.gemm(out, a, b, ta=ta, tb=tb, method="tiled", nsplit=nsplit)
        np.testing.assert_allclose(out, (a.T if ta else a) @ (b.T if tb else b), rtol=1e-12, atol=1e-12)


def _tensor_gemm_cases(gpu, rng, shapes, every_mode=True):
    """gemm(method="tensor") against NumPy in float64 for each ``(M, N, K, ta, tb, nsplit)``:
    bias, accumulate (``every_mode``) and accumulating with the ones row, float32 accuracy."""
    for M, N, K, ta, tb, nsplit in shapes:
        a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
        b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
        prod = (a.T if ta else a).astype(float) @ (b.T if tb else b)
        bias = rng.standard_normal(N).astype(np.float32)
        kw = dict(ta=ta, tb=tb, method="tensor", nsplit=nsplit)
        if every_mode:
            out = np.zeros((M, N), np.float32)
            gpu.gemm(out, a, b, bias, **kw)
            np.testing.assert_allclose(out, bias + prod, rtol=2e-5, atol=2e-5 * np.sqrt(K))
            old = out.astype(float)
            gpu.gemm(out, a, b, accumulate=True, **kw)
            np.testing.assert_allclose(out, old + prod, rtol=2e-5, atol=2e-5 * np.sqrt(K))
        out = np.full((M + 1, N), 0.5, np.float32)
        gpu.gemm(out, a, b, accumulate=True, ones_row=True, **kw)
        want = 0.5 + np.vstack([prod, (b.T if tb else b).sum(axis=0)])
        np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5 * np.sqrt(K))


def sim_tensor_gemm_matches_numpy(rng, monkeypatch):
    """The GEMM on tensor cores (3xTF32, float32 accuracy) for every transpose flag, init mode and
    the ones row, with ragged row, column and k tiles and K splits over several tiles; "auto" takes
    it for a float32 GEMM the tiled one would run (the weight gradients), not in float64 or mixed
    dtypes, nor on a GPU before sm_80, where asking for it is an error."""
    from mdnumba.kernels import tensor_cuda as tc
    from mdnumba.kernels import wavefront_cuda as gpu
    shapes = [(2 * tc.GEMM_BM + 3, tc.GEMM_BN + 5, 2 * tc.GEMM_BK + 5, ta, tb, nsplit)
              for (ta, tb), nsplit in zip(((True, False), (False, True), (False, False), (True, True)),
                                          (1, 3, 2, 1))]
    _tensor_gemm_cases(gpu, rng, shapes)
    launched, real = [], gpu.launch
    monkeypatch.setattr(gpu, "launch", lambda kernel, *args: launched.append(kernel) or real(kernel, *args))
    a, b = rng.standard_normal((40, 3)).astype(np.float32), rng.standard_normal((40, 17)).astype(np.float32)
    for dtype in (np.float32, np.float64):  # K = 40, N = 17: the tiled GEMM's shape
        gpu.gemm(np.zeros((3, 17), dtype), a.astype(dtype), b.astype(dtype), ta=True)
    gpu.gemm(np.zeros((3, 17), np.float32), a, b.astype(np.float64), ta=True)
    assert launched == [tc._gemm_tensor, gpu._gemm_tiled, gpu._gemm_tiled], launched
    with pytest.raises(ValueError, match="method 'tensor' cannot run: float64: tensor cores take float32"):
        gpu.gemm(np.zeros((3, 17)), a.astype(float), b.astype(float), ta=True, method="tensor")
    monkeypatch.setattr(tc, "_compute_capability", lambda: (7, 5))
    gpu.gemm(np.zeros((3, 17), np.float32), a, b, ta=True)
    assert launched[-1] is gpu._gemm_tiled
    with pytest.raises(ValueError, match="TF32 mma needs compute capability 8.0"):
        gpu.gemm(np.zeros((3, 17), np.float32), a, b, ta=True, method="tensor")


def sim_tensor_gemm_at_the_gpu_tile_sizes(rng, monkeypatch):
    """The tensor GEMM with a GPU's constants (4 warps, each 2 x 4 mma tiles, 16 k a shared tile:
    64 x 64 tiles; the simulator's own are one warp, one mma tile, 8 k), where the warps' and
    tiles' index arithmetic is not all zeros: ragged tiles, a K split. Under the simulator the
    kernel is Python and reads them at each call."""
    from mdnumba.kernels import tensor_cuda as tc
    from mdnumba.kernels import wavefront_cuda as gpu
    WM, WN, TM, TN, BK = 2, 2, 2, 4, 16
    BM, BN = WM * TM * 16, WN * TN * 8
    gpu_values = dict(GEMM_WM=WM, GEMM_WN=WN, GEMM_TM=TM, GEMM_TN=TN, GEMM_BK=BK, GEMM_BM=BM, GEMM_BN=BN,
                      GEMM_THREADS=WM * WN * 32, _GA_COLS=BM + tc.GEMM_PAD, _GB_COLS=BN + tc.GEMM_PAD)
    for name, value in gpu_values.items():
        assert gpu.SIMULATOR or getattr(tc, name) == value, name  # a GPU build has them already
        monkeypatch.setattr(tc, name, value)
    monkeypatch.setattr(tc, "GEMM", (tc._gemm_tensor, (BM, BN, BK), WM * WN * 32))
    _tensor_gemm_cases(gpu, rng, [(BM + 3, 40, BK + 5, True, False, 2)], every_mode=False)


@pytest.mark.parametrize("kw,clip,clipped,layout", [({}, 0.5, False, None),
                                                     ({"cell": "stable", "directions": 4}, 1e-3, True, None),
                                                     ({"directions": 4}, 0.5, False, "item")])
def sim_device_training_matches_cpu(kw, clip, clipped, layout, rng):
    """CudaLSTM + CudaAdam (device arrays in and out) == CPU layer + Adam, three steps (the
    second case with every step's gradient clipped, the third in the item layout)."""
    from numba import cuda

    from mdnumba import Adam
    from mdnumba.backend_cuda import CudaAdam, CudaLSTM, last_path
    cpu = MDLSTM2D(2, 3, seed=5, dtype=np.float64, **kw)
    dev = CudaLSTM.from_layer(cpu, layout=layout)
    opt_c = Adam(cpu, lr=1e-2, clip_norm=clip)
    opt_d = CudaAdam([dev], lr=1e-2, clip_norm=clip)
    x = rng.standard_normal((2, 3, 4, 2))
    xd = cuda.to_device(x)
    for _ in range(3):
        h = cpu.forward(x)
        hd = dev.forward(xd)
        assert is_device_array(hd) and tuple(hd.shape) == h.shape
        np.testing.assert_allclose(hd.copy_to_host(), h, rtol=1e-12, atol=1e-12)
        cpu.zero_grad()
        dev.zero_grad()
        dx = cpu.backward(h / h.size)
        dxd = dev.backward(cuda.to_device(h / h.size))
        np.testing.assert_allclose(dxd.copy_to_host(), dx, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(dev.grads_to_host(), cpu.grads.data, rtol=1e-10, atol=1e-13)
        norm = opt_c.step()
        assert opt_d.step() == pytest.approx(norm, rel=1e-10) and (norm > clip) == clipped
        np.testing.assert_allclose(dev.params_to_host(), cpu.params.data, rtol=1e-10, atol=1e-13)
    assert last_path().startswith("item (8 blocks") == (layout == "item"), last_path()


def _exchange(out, a, skip_block):
    """A kernel for :func:`sim_simulator_runs_blocks_at_once_and_checks_syncs`: each thread
    reads, after a grid sync, what the next block wrote before it (``skip_block`` skips it)."""
    grid = cuda.cg.this_grid()
    i = cuda.grid(1)
    a[i] = i + 1
    if cuda.blockIdx.x == skip_block:
        return
    grid.sync()
    out[i] = a[(i + cuda.blockDim.x) % a.shape[0]]


def _block_ids(out):
    """Thread 0 puts its block's index in shared memory; every thread copies it out."""
    s = cuda.shared.array(1, np.int64)
    if cuda.threadIdx.x == 0:
        s[0] = cuda.blockIdx.x
    cuda.syncthreads()
    out[cuda.grid(1)] = s[0]


def _count(out, data, mode):
    """Every thread writes ``data[i]`` and counts itself in ``out[0]``: plainly (mode 0, a
    race), atomically (1) or atomically between fences (2); with atomics the thread counted
    last sums ``data`` into ``out[1]``, a race without the fences (a GPU's atomics are relaxed)."""
    i = cuda.grid(1)
    data[i] = i
    if mode == 0:
        out[0] += 1
        return
    if mode == 2:
        cuda.threadfence()  # publishes data[i] before the count
    if cuda.atomic.add(out, 0, 1) == data.shape[0] - 1:
        if mode == 2:
            cuda.threadfence()  # the others' data[k] are visible after the count
        total = 0
        for k in range(data.shape[0]):
            total += data[k]
        out[1] = total


@cuda.jit(device=True)
def _barrier():
    cuda.syncthreads()


def _split_syncs(out, mode):
    """Even and odd threads reach a block barrier apart: at two syncthreads() lines (mode 0), at
    one line of a device function called from two lines (1), or together (2)."""
    i = cuda.threadIdx.x
    if mode == 0:
        if i % 2:
            cuda.syncthreads()
        else:
            cuda.syncthreads()
    elif mode == 1:
        if i % 2:
            _barrier()
        else:
            _barrier()
    else:
        _barrier()
    out[i] = i


def _load_after(a, out, start):
    """out[:4] = a[start .. start+3] by a vector load of a view starting there."""
    from mdnumba.kernels.wavefront_cuda import _load4
    out[0], out[1], out[2], out[3] = _load4(a[start:], 0)


def sim_simulator_runs_blocks_at_once_and_checks_syncs():
    """tests/simgrid.py, which every simulator case runs under: a block reads what another
    wrote before a grid sync, shared memory is per block, a grid sync that a block skips or a
    cooperative grid over the limit is an error instead of a hang or a pass, as are threads of
    a block at different syncthreads() calls, a vector load from an address not 16-byte
    aligned, and an
    access to an element another thread writes with no barrier, or atomic between fences, in
    between; fresh device memory is NaN or a huge integer."""
    if not IN_SIMULATOR:
        pytest.skip("checks the simulator; on a GPU the failing launches would hang")
    import simgrid
    exchange, block_ids = cuda.jit(_exchange), cuda.jit(_block_ids)
    assert exchange.overloads[None].max_cooperative_grid_blocks(8) == 3
    a, out = np.zeros(24, np.int64), np.zeros(24, np.int64)
    exchange[3, 8](out, a, -1)
    np.testing.assert_array_equal(out, np.roll(np.arange(1, 25), -8))
    with pytest.raises(simgrid.DivergentSync, match="returned"):
        exchange[3, 8](out, a, 1)
    a, out = np.zeros(3 * 256, np.int64), np.zeros(3 * 256, np.int64)
    exchange[3, 256](out, a, -1)  # a grid that may sync, over a wave's threads: one wave all the same
    np.testing.assert_array_equal(out, np.roll(np.arange(1, 3 * 256 + 1), -256))
    with pytest.raises(simgrid.DivergentSync, match="max_cooperative_grid_blocks"):
        exchange[4, 8](np.zeros(32, np.int64), np.zeros(32, np.int64), -1)
    split = cuda.jit(_split_syncs)
    for mode in (0, 1):  # a GPU's bar.sync is one instruction: threads at two of them are undefined
        with pytest.raises(simgrid.DivergentSync, match=r"waits at syncthreads\(\) test_cuda.py:\d+"):
            split[1, 8](np.zeros(8, np.int64), mode)
    split[1, 8](np.zeros(8, np.int64), 2)
    load, out = cuda.jit(_load_after), np.zeros(4, np.float32)
    load[1, 1](np.arange(12, dtype=np.float32), out, 4)  # 16 bytes in: aligned
    np.testing.assert_array_equal(out, [4, 5, 6, 7])
    with pytest.raises(AssertionError, match="misaligned vector load"):  # index 0 of a view 8 bytes in
        load[1, 1](np.arange(12, dtype=np.float32), out, 2)
    ids = np.zeros(8 * 100, np.int64)  # more threads than a wave (WAVE_THREADS)
    block_ids[100, 8](ids)
    np.testing.assert_array_equal(ids, np.repeat(np.arange(100), 8))
    assert np.isnan(cuda.device_array(3).copy_to_host()).all()  # what a GPU leaves unset
    assert (cuda.device_array_like(np.zeros(2, np.int32)).copy_to_host() == 2**30).all()
    count, counted = cuda.jit(_count), np.zeros(2, np.int64)
    count[3, 8](counted, np.zeros(24, np.int64), 2)  # ordered through the fenced atomic counter
    np.testing.assert_array_equal(counted, [24, sum(range(24))])
    for mode in (0, 1):  # a plain counter; an atomic one without fences
        with pytest.raises(simgrid.DataRace, match="no barrier, or atomic between fences"):
            count[3, 8](np.zeros(2, np.int64), np.zeros(24, np.int64), mode)


def sim_errors_say_what_to_fix():
    """Bad inputs and settings of a device layer say what to fix."""
    from numba import cuda

    from mdnumba.backend_cuda import CudaLSTM
    dev = CudaLSTM.from_layer(MDLSTM2D(2, 3, dtype=np.float32))
    with pytest.raises(RuntimeError, match="no saved activations; run forward"):
        dev.backward(np.zeros((1, 2, 2, 3), np.float32))
    with pytest.raises(TypeError, match="x on the device has dtype float64, the layer uses float32; convert"):
        dev.forward(cuda.to_device(np.zeros((1, 2, 2, 2))))
    for x in (np.zeros((1, 2, 2, 5), np.float32), cuda.to_device(np.zeros((1, 2, 2, 5), np.float32))):
        with pytest.raises(ValueError, match="x has 5 channels in its last axis, the layer expects 2"):
            dev.forward(x)  # a CUDA array too (it said "must have 4 dimensions" of a 4-D array)
    with pytest.raises(ValueError, match=r"x has an empty axis, shape \(1, 0, 2, 2\); every axis"):
        dev.forward(cuda.to_device(np.zeros((1, 0, 2, 2), np.float32)))
    with pytest.raises(ValueError, match="C-contiguous"):
        dev.forward(cuda.to_device(np.zeros((1, 2, 4, 2), np.float32))[:, :, ::2])
    big = CudaLSTM.from_layer(MDLSTM2D(1, 32, dtype=np.float64), use_shared=True)  # U: 80 KiB
    with pytest.raises(ValueError, match="do not fit in 49152 bytes of shared memory"):
        big.forward(np.ones((1, 2, 2, 1)))
    dev.forward(np.ones((1, 2, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"dh must have shape .* \(the forward output.s\)"):
        dev.backward(np.zeros((1, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="path"):
        CudaLSTM.from_layer(MDLSTM2D(2, 3), path="diagonal").forward(np.ones((1, 2, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"'item', 'tensor'\), got 'tiled'"):
        CudaLSTM.from_layer(MDLSTM2D(2, 3), layout="tiled").forward(np.ones((1, 2, 2, 2), np.float32))


def sim_layouts_that_do_not_fit_run_flat(monkeypatch):
    """A layout whose shared memory or block size does not fit runs flat, with the same output, and
    the path says why; arrays past 32-bit index arithmetic are refused."""
    from mdnumba.backend_cuda import CudaLSTM, last_path
    from mdnumba.kernels import wavefront_cuda as gpu
    dev = CudaLSTM.from_layer(MDLSTM2D(2, 3, dtype=np.float32))
    y = dev.forward(np.ones((1, 2, 2, 2), np.float32))
    with monkeypatch.context() as m:  # a slice over the shared-memory limit: the flat layout, said
        m.setattr(gpu, "SHARED_BYTES_LIMIT", 100)
        sliced = CudaLSTM.from_layer(MDLSTM2D(2, 3, dtype=np.float32), layout="sliced")
        np.testing.assert_array_equal(sliced.forward(np.ones((1, 2, 2, 2), np.float32)), y)
        assert f"flat layout: a slice's weights take {2 * 5 * 3 * gpu.SLICE * 4} B, over 100 B" in last_path()
        # the staged layout's tile counts too, and its slice's D = 3 steps are padded to a run of 4
        weights = 2 * 5 * 4 * gpu.SLICE * 4  # the tile, and a 16-byte aligned int32 per tile row
        tile = math.prod(gpu.STAGE_SHAPE) * 4 + -(-gpu.STAGE_SHAPE[0] // 4) * 16
        m.setattr(gpu, "SHARED_BYTES_LIMIT", weights + tile - 1)
        staged = CudaLSTM.from_layer(MDLSTM2D(2, 3, dtype=np.float32), layout="staged")
        np.testing.assert_array_equal(staged.forward(np.ones((1, 2, 2, 2), np.float32)), y)
        assert (f"flat layout: a slice's weights and staged tile take {weights + tile} B, over "
                f"{weights + tile - 1} B") in last_path()
        # the item layout: D = 3 steps padded to 4, 2 * 5 gate blocks of a slice of SLICE units, and the
        # forward's 4 tiles (h and c of two hyperplanes): a row per cell of the largest hyperplane (2)
        # and a zero row
        item = (2 * 5 * 4 * gpu.SLICE + 4 * 3 * 4) * 4
        m.setattr(gpu, "ITEM_SHARED_LIMIT", item - 1)
        per_item = CudaLSTM.from_layer(MDLSTM2D(2, 3, dtype=np.float32), layout="item")
        np.testing.assert_array_equal(per_item.forward(np.ones((1, 2, 2, 2), np.float32)), y)
        assert (f"flat layout: all weights and the tiles of hyperplane rows take {item} B, over the "
                f"{item - 1} B of shared memory a block can have") in last_path()
    from mdnumba import config  # the tile holds the rows of MDNUMBA_THREADS_PER_BLOCK threads' items
    staged = CudaLSTM.from_layer(MDLSTM2D(2, 3, dtype=np.float32), layout="staged",
                                 threads_per_block=2 * config.THREADS_PER_BLOCK)
    np.testing.assert_array_equal(staged.forward(np.ones((1, 2, 2, 2), np.float32)), y)
    assert (f"flat layout: {2 * config.THREADS_PER_BLOCK} threads per block, the staged tile holds the rows "
            f"of MDNUMBA_THREADS_PER_BLOCK={config.THREADS_PER_BLOCK}") in last_path()
    tpb = gpu.STAGE_K + 2  # each thread stages the same columns of every row: whole rows per block
    staged = CudaLSTM.from_layer(MDLSTM2D(2, 3, dtype=np.float32), layout="staged", threads_per_block=tpb)
    np.testing.assert_array_equal(staged.forward(np.ones((1, 2, 2, 2), np.float32)), y)
    assert (f"flat layout: {tpb} threads per block, neither a multiple nor a divisor of the staged tile's "
            f"{gpu.STAGE_K} columns") in last_path()
    with monkeypatch.context() as m:  # 32-bit index arithmetic: arrays of 2**32 elements are refused
        m.setattr(gpu, "MAX_ELEMENTS", 90)  # U (1, 3, 30), the largest array here, has 90
        with pytest.raises(ValueError, match="has 90 elements.*32-bit arithmetic.*split the batch"):
            dev.forward(np.ones((1, 2, 2, 2), np.float32))
        m.setattr(gpu, "MAX_ELEMENTS", 91)
        dev.forward(np.ones((1, 2, 2, 2), np.float32))


def sim_auto_falls_back_to_per_diagonal(monkeypatch):
    """'auto' falls back to per-diagonal launches when a cooperative launch fails, once per kernel;
    'cooperative' raises."""
    from mdnumba.backend_cuda import CudaLSTM, last_path
    from mdnumba.kernels import wavefront_cuda as gpu
    dev = CudaLSTM.from_layer(MDLSTM2D(2, 3, dtype=np.float32))
    y = dev.forward(np.ones((1, 2, 2, 2), np.float32))
    tries = []

    def broken(*args, **kw):
        tries.append(1)
        raise RuntimeError("no cooperative launch here")
    monkeypatch.setattr(gpu, "_coop_grid", broken)
    monkeypatch.setitem(gpu._state, "coop_error", {})
    for _ in range(2):  # 'auto' tries a kernel's cooperative launch once per process, then remembers
        np.testing.assert_array_equal(dev.forward(np.ones((1, 2, 2, 2), np.float32)), y)
        assert last_path().startswith("per-diagonal") and "no cooperative launch here" in last_path()
    assert len(tries) == 1
    dev.backward(np.ones_like(y))  # another kernel: tried on its own
    assert len(tries) == 2 and last_path().startswith("per-diagonal")
    dev.path = "cooperative"
    with pytest.raises(RuntimeError, match="no cooperative launch"):
        dev.forward(np.ones((1, 2, 2, 2), np.float32))


def sim_cuda_context_alive_until_a_call_fails(monkeypatch):
    """``cuda_context_alive`` (the GPU benchmark and test shards go on in a fresh process where it
    is False after a failure): True while CUDA works, False once a call fails, as every call does
    after a sticky error on a GPU."""
    from numba import cuda

    from mdnumba.backend_cuda import cuda_context_alive
    assert cuda_context_alive() is True

    def sticky():
        raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS")

    monkeypatch.setattr(cuda, "synchronize", sticky)
    assert cuda_context_alive() is False


def sim_layer_accepts_device_arrays(rng):
    """MDLSTM2D(device='cuda') takes a CUDA array and returns one, equal to the NumPy path."""
    from numba import cuda
    layer = MDLSTM2D(2, 3, seed=2, dtype=np.float64, device="cuda")
    x, dh = rng.standard_normal((2, 2, 3, 2)), rng.standard_normal((2, 2, 3, 3))
    h, dx = layer.forward(x), layer.backward(dh)
    hd = layer.forward(cuda.to_device(x))
    assert hasattr(hd, "copy_to_host")
    np.testing.assert_array_equal(hd.copy_to_host(), h)
    np.testing.assert_array_equal(layer.backward(cuda.to_device(dh)).copy_to_host(), dx)


def sim_numpy_api_checks_device_inputs_and_the_cell_state(rng):
    """As on the CPU: the NumPy-API layer refuses NaN/inf in CUDA-array inputs, and a cell state
    that overflowed in forward (h stays finite) makes backward raise NonFiniteError, counting
    the bad values, before any gradient is touched; a finite state again trains on. The device
    layers themselves skip these checks (they would wait for the GPU)."""
    from numba import cuda

    from mdnumba._validate import NonFiniteError
    from mdnumba.backend_cuda import _LAYER_STATE, CudaLSTM
    layer = MDLSTM2D(1, 2, seed=0, device="cuda")
    x = np.ones((2, 3, 3, 1), np.float32)
    bad_x = x.copy()
    bad_x[1, 2, 0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="x contains 1 NaN or infinite values; clean the input"):
        layer.forward(cuda.to_device(bad_x))
    h = layer.forward(x)
    bad_dh = np.ones_like(h)
    bad_dh[0, 0, 1] = [np.nan, -np.inf]
    with pytest.raises(NonFiniteError, match="dh contains 2 NaN or infinite values; the loss"):
        layer.backward(cuda.to_device(bad_dh))
    assert np.isnan(CudaLSTM.from_layer(layer).forward(cuda.to_device(bad_x)).copy_to_host()).any()
    c = _LAYER_STATE[layer]._work["c"]
    c[c.shape[0] - 1, 0] = np.inf  # as a 128x128 graves state at lr 1e-2 does
    c[3, 1] = np.nan
    with pytest.raises(NonFiniteError, match=r"overflowed to inf in forward \(2 values\).*use cell='stable'"):
        layer.backward(np.ones_like(h))
    assert not layer.grads.data.any()
    c.copy_to_device(np.full(c.shape, np.inf, c.dtype))  # several per thread of the count's grid
    with pytest.raises(NonFiniteError, match=rf"\({c.size} values\)"):
        layer.backward(np.ones_like(h))
    layer.forward(x)
    layer.backward(np.ones_like(h))
    assert np.isfinite(layer.grads.data).all() and layer.grads.data.any()


def sim_device_twins_keep_and_refuse_what_the_host_layers_do():
    """Found by a walkthrough: CudaLinear and CudaEmbedding kept a view of the caller's device
    input (changed before backward: wrong weight gradients; the host layers keep a copy);
    CudaBlockSubsample took integer and NaN gradients; a Sequential of twins was not checked for
    channels; a checked twin with infinite weights (an overflowing device update) ran; an
    overflowing float32 set_params was called NaN; params_to_vector did not say that twins keep
    their weights on the GPU; a scalar id gave a (1, D) row; a DeviceModel's saved_bytes was 0;
    a device optimiser's state of too few layers did not say how many."""
    from mdnumba import Linear, params_to_vector
    from mdnumba.backend_cuda import CudaBlockSubsample, CudaEmbedding, CudaLinear, CudaLSTM
    from mdnumba.charlm import Embedding
    from mdnumba.stack import Sequential
    lin = Linear(2, 1, dtype=np.float64)
    for copy_input, want in ((True, [3.0, 3.0]), (False, [0.0, 0.0])):  # False: the caller's promise
        dev = CudaLinear.from_layer(lin)
        xd = cuda.to_device(np.ones((3, 2)))
        dev.forward(xd, copy_input=copy_input)
        xd.copy_to_device(np.zeros((3, 2)))
        dev.backward(np.ones((3, 1)))
        np.testing.assert_array_equal(dev.grads_to_host()[:2], want)
    emb = CudaEmbedding.from_layer(Embedding(4, 1, dtype=np.float64))
    ids = cuda.to_device(np.array([1, 2, 3]))
    emb.forward(ids)
    ids.copy_to_device(np.zeros(3, np.int64))
    emb.backward(np.ones((3, 1)))
    np.testing.assert_array_equal(emb.grads_to_host(), [0, 1, 1, 1])
    assert emb.forward(2).shape == Embedding(4, 1).forward(2).shape == (1,)
    assert emb.saved_bytes() == 8  # the kept id
    with pytest.raises(TypeError, match="^copy_input must be True or False"):
        emb.forward(2, copy_input="no")
    sub = CudaBlockSubsample(2)
    with pytest.raises(TypeError, match="^x must hold floating-point values"):
        sub.forward(cuda.to_device(np.ones((1, 2, 2, 1), np.int64)))
    sub.forward(np.ones((1, 2, 2, 1)))
    with pytest.raises(TypeError, match="^dy must hold floating-point values"):
        sub.backward(np.ones((1, 1, 1, 4), np.int64))
    with pytest.raises(NonFiniteError, match="^dy contains 1 NaN or infinite values"):
        sub.backward(np.array([[[[0.0, np.nan, 0.0, 0.0]]]]))
    a, b = (CudaLSTM.from_layer(MDLSTM2D(c, 2)) for c in (1, 3))
    with pytest.raises(ValueError, match=r"^stage 1 \(CudaLSTM\) takes 3 channels, but stage 0 \(CudaLSTM\) "
                                         "gives 2"):
        Sequential(a, b)
    with pytest.raises(ValueError, match=r"^stage 2 \(CudaLinear\) takes 3 channels, but stage 1 "):
        Sequential(a, CudaBlockSubsample(2), CudaLinear.from_layer(Linear(3, 1)))
    a.checked = True
    a.forward(np.ones((1, 2, 2, 1), np.float32))
    a.params.copy_to_device(np.full(a.size, np.inf, np.float32))
    with pytest.raises(NonFiniteError, match=rf"^the layer's weights hold {a.size} NaN or infinite values"):
        a.forward(np.ones((1, 2, 2, 1), np.float32))
    assert a.saved_bytes() > 0  # a refused forward keeps the last one's activations
    with pytest.raises(ValueError, match="^params hold values up to 1e[+]300, beyond float32"):
        a.set_params(np.full(a.size, 1e300))
    with pytest.raises(NonFiniteError, match=f"^params hold {a.size} NaN or infinite values"):
        a.set_params(np.full(a.size, 10**40, dtype=object))  # NumPy cannot test objects for finiteness
    with pytest.raises(TypeError, match="^CudaLSTM keeps its parameters on the GPU: give it to a device"):
        params_to_vector([b])
    from mdnumba.models import MDModel
    from mdnumba.train_device import DeviceModel
    model, x = DeviceModel(MDModel(1, 2, seed=3)), np.ones((1, 3, 4, 1), np.float32)
    assert model.saved_bytes() == 0  # was 0 after a forward too: the twins had no saved_bytes
    model.forward(x)
    lstm, readout = model.layers
    assert model.saved_bytes() == lstm.saved_bytes() + readout.saved_bytes() > lstm.saved_bytes() > 0
    assert readout.saved_bytes() == 4 * 12 * 2  # its input h, as the host Linear counts it
    model.forward(x, save=False)
    assert lstm.saved_bytes() == 0
    from mdnumba.backend_cuda import CudaAdam
    opt = CudaAdam(model)
    state = opt.state_dict()
    state["m"], state["v"] = state["m"][:1], state["v"][:1]
    with pytest.raises(ValueError, match=r"^optimizer state has 1 m and 1 v buffers, this optimizer 2 of "):
        opt.load_state_dict(state)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the simulator's NumPy scalars
def sim_a_backward_whose_gradients_overflow_says_so():
    """As on the CPU (test_errors.py): a finite dh too large for float32 once backward has summed
    it. The NumPy-API layer refuses it before adding to its host gradients; checked twins refuse
    it, unchecked ones (the device trainers') leave the NaN/inf for the optimiser's norm."""
    from mdnumba import GridLSTM2D, Linear
    from mdnumba.backend_cuda import CudaEmbedding, CudaGridLSTM, CudaLinear, CudaLSTM
    from mdnumba.charlm import Embedding
    from mdnumba.optim import NonFiniteGradientError
    big, said = np.finfo(np.float32).max, "^backward overflowed: the layer's gradients hold [0-9]+ NaN"
    layer = MDLSTM2D(1, 2, seed=0, device="cuda")
    h = layer.forward(np.ones((1, 3, 3, 1), np.float32))
    with pytest.raises(NonFiniteGradientError, match=said):
        layer.backward(np.full_like(h, big))
    assert not layer.grads.data.any()
    layer.backward(np.ones_like(h))
    assert np.isfinite(layer.grads.data).all() and layer.grads.data.any()
    for dev, x in ((CudaLSTM.from_layer(MDLSTM2D(1, 2)), np.ones((1, 3, 3, 1), np.float32)),
                   (CudaLinear.from_layer(Linear(2, 3)), np.full((3, 2), 4, np.float32)),
                   (CudaGridLSTM.from_layer(GridLSTM2D(2, 2)), np.ones((1, 3, 2), np.float32)),
                   (CudaEmbedding.from_layer(Embedding(3, 2)), np.array([[1, 1, 1]]))):
        for checked in (False, True):
            dev.checked = checked
            dev.zero_grad()
            dh = np.full(dev.forward(x).shape, big, np.float32)
            if checked:
                with pytest.raises(NonFiniteGradientError, match=said):
                    dev.backward(dh)
            else:
                dev.backward(dh)
            assert not np.isfinite(dev.grads_to_host()).all(), (type(dev).__name__, checked)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the simulator's NumPy scalars
def sim_a_backward_whose_input_gradient_overflows_says_so():
    """As on the CPU (test_errors.py): dx = dact·Wᵀ overflowing while the gradients stay finite.
    The NumPy-API layer refuses it before adding to its host gradients; checked twins refuse it."""
    from mdnumba import GridLSTM2D, Linear
    from mdnumba.backend_cuda import CudaGridLSTM, CudaLinear
    from mdnumba.optim import NonFiniteGradientError
    said = "^backward overflowed: the input's gradient dx holds [0-9]+ NaN"
    layer = MDLSTM2D(1, 2, device="cuda")
    large_input_weights(layer)
    h = layer.forward(np.full((1, 2, 3, 1), 1e-3, np.float32))
    dh = np.full_like(h, np.finfo(np.float32).max / 30)
    with pytest.raises(NonFiniteGradientError, match=said):
        layer.backward(dh)
    assert not layer.grads.data.any()
    assert layer.backward(dh, input_grad=False) is None and np.isfinite(layer.grads.data).all()
    for host, x in ((Linear(2, 3), np.full((3, 2), 1e-3, np.float32)),
                    (GridLSTM2D(2, 2), np.full((1, 3, 2), 1e-3, np.float32))):
        large_input_weights(host)
        dev = (CudaLinear if isinstance(host, Linear) else CudaGridLSTM).from_layer(host)
        dev.checked = True
        dh = np.full(dev.forward(x).shape, np.finfo(np.float32).max / 30, np.float32)
        with pytest.raises(NonFiniteGradientError, match=said):
            dev.backward(dh)
        assert np.isfinite(dev.grads_to_host()).all()


def sim_device_trainers_copy_none_of_their_own_arrays(tmp_path, monkeypatch):
    """The device trainers hand their layers arrays they keep until backward (copy_input=False):
    the char-LM trainer's embedding copied its staged ids at every step and validation batch."""
    from mdnumba.backend_cuda import DeviceLayer
    from mdnumba.train import TrainConfig, make_trainer
    copies, real = [], DeviceLayer._kept_copy
    monkeypatch.setattr(DeviceLayer, "_kept_copy",
                        lambda self, name, a: copies.append(name) or real(self, name, a))
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 8)
    for cfg in (TrainConfig(steps=2, size=4, batch=2, hidden=2, device="cuda"),
                TrainConfig(task="char-lm", model="stacked", data=str(tmp_path / "t.txt"), hidden=2,
                            seq_len=4, batch=2, steps=2, device="cuda")):
        make_trainer(cfg, tmp_path / cfg.task).run()
    assert copies == []


def sim_device_layers_match_host(rng):
    """CudaLinear and CudaBlockSubsample == their host layers; DeviceModel of a 2-layer stable
    4-direction model == the host model (float64: logits, dx, every gradient)."""
    from mdnumba.backend_cuda import CudaBlockSubsample, CudaLinear
    from mdnumba.layers import Linear
    from mdnumba.models import MDModel
    from mdnumba.stack import BlockSubsample
    from mdnumba.train_device import DeviceModel
    lin = Linear(3, 2, seed=1, dtype=np.float64)
    dev = CudaLinear.from_layer(lin)
    x, dy = rng.standard_normal((2, 3, 3)), rng.standard_normal((2, 3, 2))
    np.testing.assert_allclose(dev.forward(x), lin.forward(x), rtol=1e-13)
    np.testing.assert_allclose(dev.backward(dy), lin.backward(dy), rtol=1e-13)
    np.testing.assert_allclose(dev.grads_to_host(), lin.grads.data, rtol=1e-13)
    sub, dsub = BlockSubsample(2), CudaBlockSubsample(2)
    x = rng.standard_normal((2, 4, 6, 3))
    y = sub.forward(x)
    np.testing.assert_array_equal(dsub.forward(x).copy_to_host(), y)
    np.testing.assert_array_equal(dsub.backward(y).copy_to_host(), sub.backward(y))
    for bad in ((2, 3, 2, 12), (2, 2, 3, 6)):  # refused as on the host (the gather read past the
        with pytest.raises(ValueError, match=r"dy must have shape \(2, 2, 3, 12\)"):  # end of the
            dsub.backward(np.zeros(bad))                                            # smaller one)
    dsub.forward(x)
    with pytest.raises(ValueError, match="divisible"):
        dsub.forward(np.zeros((1, 3, 4, 1)))
    # a refused x changes nothing: backward inverts the last good forward (it kept the refused
    # shape and raised its divisibility error again)
    np.testing.assert_array_equal(dsub.backward(y).copy_to_host(), sub.backward(y))
    host = MDModel(1, 2, dtype=np.float64, seed=3, cell="stable", directions=4, layers=2)
    model = DeviceModel(host)
    x = rng.standard_normal((1, 3, 4, 1))
    z = host.forward(x)
    np.testing.assert_allclose(model.forward(x), z, rtol=1e-11)
    host.zero_grad()
    model.zero_grad()
    np.testing.assert_allclose(model.backward(np.cos(z)), host.backward(np.cos(z)), rtol=1e-10, atol=1e-14)
    for a, b in zip(model.layers, host.layers):
        np.testing.assert_allclose(a.grads_to_host(), b.grads.data, rtol=1e-10, atol=1e-14)
    model.zero_grad()  # the trainer's backward: no dL/dx, the same gradients
    assert model.backward(np.cos(z), input_grad=False) is None
    for a, b in zip(model.layers, host.layers):
        np.testing.assert_allclose(a.grads_to_host(), b.grads.data, rtol=1e-10, atol=1e-14)
    for bad, error in ((np.full(z.shape, np.nan), NonFiniteError), (np.ones(z.shape, int), TypeError)):
        with pytest.raises(error, match="dlogits"):  # NumPy dlogits checked as the host model does
            model.backward(bad)


def sim_device_model_results_stay_the_callers(rng):
    """A DeviceModel given CUDA arrays returns new arrays: a second call leaves the first call's
    logits and dx as they were (the trainer's model, ``reuse_outputs=True``, writes them into
    kept buffers instead)."""
    from numba import cuda

    from mdnumba.models import MDModel
    from mdnumba.train_device import DeviceModel
    model = DeviceModel(MDModel(1, 2, dtype=np.float64, seed=3))
    xa, xb = (cuda.to_device(rng.standard_normal((1, 3, 3, 1))) for _ in range(2))
    ya = model.forward(xa)
    dxa = model.backward(cuda.to_device(np.ones((1, 3, 3, 1))))
    keep = ya.copy_to_host(), dxa.copy_to_host()
    model.forward(xb)
    model.backward(cuda.to_device(np.full((1, 3, 3, 1), 2.0)))
    np.testing.assert_array_equal(ya.copy_to_host(), keep[0])
    np.testing.assert_array_equal(dxa.copy_to_host(), keep[1])
    with pytest.raises(TypeError, match="reuse_outputs must be True or False"):
        DeviceModel(MDModel(1, 2), reuse_outputs="yes")


@pytest.mark.parametrize("kind", ["horizontal", "snake"])
def sim_device_image_models_name_the_image(kind):
    """A DeviceModel of the row models given x of the wrong rank ('not enough values to unpack'),
    a strided CUDA x or dlogits, or one with a stride of 0 (NotImplementedError on a GPU: its
    reshape would copy), and a NumPy x[..., None] (that stride of 0 went up with it)."""
    from numba import cuda

    from mdnumba.models import build_model
    from mdnumba.train_device import DeviceModel
    model = DeviceModel(build_model(kind, hidden=2))
    for x in (np.ones((2, 3, 1), np.float32), cuda.to_device(np.ones((1, 2, 3, 4, 1), np.float32))):
        with pytest.raises(ValueError, match=rf"^x must have 4 dimensions \(batch, height, width, C\) "
                                             rf"of the {kind} model, got shape"):
            model.forward(x)
    strided = cuda.to_device(np.ones((1, 2, 6, 1), np.float32))[:, :, ::2]  # numba-cuda cannot reshape it
    zero_stride = cuda.to_device(np.ones((1, 2, 3), np.float32)[..., None])  # nor this one
    for x in (strided, zero_stride):
        with pytest.raises(ValueError, match="^x on the device must be C-contiguous"):
            model.forward(x)
    y = model.forward(np.ones((1, 2, 3), np.float32)[..., None])  # stride 0 on its last axis
    with pytest.raises(ValueError, match="^dlogits on the device must be C-contiguous"):
        every_other = (slice(None),) * (len(y.shape) - 1) + (slice(None, None, 2),)  # no `...` on a GPU
        model.backward(cuda.to_device(np.ones(y.shape[:-1] + (2 * y.shape[-1],), np.float32))[every_other])


def sim_device_model_refuses_backward_after_a_forward_failed_partway(rng, monkeypatch):
    """With its layers' checks on, a device model whose second layer refuses a forward (NaN/inf
    in its input, the first layer's output) holds that input's activations in the first layer:
    backward is refused, before any gradient is added, until a forward runs through (as the host
    models)."""
    from mdnumba.backend_cuda import CudaLSTM
    from mdnumba.models import MDModel
    from mdnumba.train_device import DeviceModel
    model = DeviceModel(MDModel(1, 2, dtype=np.float64, seed=3, layers=2))
    x = rng.standard_normal((1, 3, 3, 1))
    dz = np.ones((1, 3, 3, 1))
    model.forward(x)
    model.stages[1].checked = True
    monkeypatch.setattr(CudaLSTM, "_nonfinite", lambda self, a: 3 if self.checked else 0)
    with pytest.raises(NonFiniteError, match="x contains 3 NaN"):
        model.forward(x)
    grads = model.grads.copy_to_host()
    with pytest.raises(RuntimeError, match=r"failed partway \(at stage 1\)"):
        model.backward(dz)
    np.testing.assert_array_equal(model.grads.copy_to_host(), grads)
    model.stages[1].checked = False
    model.forward(x)  # a forward that ran through
    model.backward(dz)
    assert not np.array_equal(model.grads.copy_to_host(), grads)


def sim_device_layer_contracts(rng):
    """Across repeated calls: a returned h or dx is never overwritten by a later call; NumPy in
    gives NumPy out (CudaLSTM, CudaLinear); the NumPy-API layer's gradients after zero_grad are
    those of the last backward alone (the device buffers start from zero every time)."""
    from numba import cuda

    from mdnumba.backend_cuda import CudaLinear, CudaLSTM
    from mdnumba.layers import Linear
    x, dh = rng.standard_normal((2, 3, 4, 2)), rng.standard_normal((2, 3, 4, 3))
    dev = CudaLSTM.from_layer(MDLSTM2D(2, 3, seed=1, dtype=np.float64))
    h1 = dev.forward(cuda.to_device(x))
    dx1 = dev.backward(cuda.to_device(dh))
    kept = h1.copy_to_host(), dx1.copy_to_host()
    dev.forward(cuda.to_device(2 * x))
    dev.backward(cuda.to_device(2 * dh))
    np.testing.assert_array_equal(h1.copy_to_host(), kept[0])
    np.testing.assert_array_equal(dx1.copy_to_host(), kept[1])
    lin = CudaLinear.from_layer(Linear(3, 2, seed=1, dtype=np.float64))
    for out in (dev.forward(x), dev.backward(dh), lin.forward(dh), lin.backward(np.ones((2, 3, 4, 2)))):
        assert isinstance(out, np.ndarray) and not is_device_array(out)
    layer = MDLSTM2D(2, 3, seed=1, dtype=np.float64, device="cuda")
    grads = []
    for _ in range(2):
        layer.zero_grad()
        layer.forward(x)
        layer.backward(dh)
        grads.append(layer.grads.data.copy())
    np.testing.assert_array_equal(grads[1], grads[0])


def sim_host_array_launchers_copy_results_back(rng):
    """The launchers take NumPy arrays too (copied to the device and back): ``axpby``, ``fill``,
    the forward sweep's output in grid order (``out``) and the backward sweep's weight-gradient
    operands (``operands=(z, xs, h)``, checked against the CPU's weight_operands)."""
    from mdnumba.grid import direction_tables
    from mdnumba.kernels import wavefront as cpu
    from mdnumba.kernels import wavefront_cuda as gpu
    x, y, out = rng.standard_normal(7), rng.standard_normal(7), np.zeros(7)
    gpu.axpby(out, x, 2.0, y, -3.0)
    np.testing.assert_allclose(out, 2 * x - 3 * y, rtol=1e-15)
    x32, out32 = x.astype(np.float32), np.zeros(7, np.float32)  # the GPU benchmark's scaling of dh
    gpu.axpby(out32, x32, np.float32(0.5), x32, np.float32(0.0))
    np.testing.assert_array_equal(out32, x32 / 2)
    gpu.fill(out, 1.5)
    assert (out == 1.5).all()
    dims, B, D, C = (3, 4), 2, 3, 2
    wf, U, act = _cpu_sweep_inputs(dims, B, D, 1, rng)
    R = wf.n_cells * B
    h, c, grid_out = np.zeros((R, D)), np.zeros((R, D)), np.zeros((R, 1, D))
    _, unskew = direction_tables(dims, B, 1)
    gpu.wavefront_forward(h, c, act, U, wf.diag_off, wf.parent, B, D, 0, out=grid_out, out_src=unskew)
    assert np.abs(h).max() > 0.05
    np.testing.assert_array_equal(grid_out[:, 0], h[unskew[0]])
    xs, z, want = rng.standard_normal((R, C)), np.zeros((R, C + 2 * D + 1)), np.zeros((R, C + 2 * D + 1))
    cpu.weight_operands(want, xs, h, wf.parent, B, D)
    gpu.wavefront_backward(np.zeros_like(act), np.zeros_like(c), np.cos(h), act, c, U, wf.diag_off,
                           wf.parent, wf.child, B, D, 0, operands=(z, xs, h))
    np.testing.assert_array_equal(z, want)
    assert (want[:, :C] == xs).all() and (want[:, -1] == 1).all() and want[:, C:-1].any()


def sim_backward_accumulates_gradients(rng):
    """A second backward without zero_grad adds the same gradients again (device layers with one
    and with four directions, CudaLinear, and the NumPy-API layer's host grads)."""
    from numba import cuda

    from mdnumba.backend_cuda import CudaLinear, CudaLSTM
    from mdnumba.layers import Linear
    x = rng.standard_normal((2, 2, 3, 2))
    for dev in (CudaLSTM.from_layer(MDLSTM2D(2, 3, seed=1, dtype=np.float64)),
                CudaLSTM.from_layer(MDLSTM2D(2, 2, seed=1, dtype=np.float64, directions=4)),
                CudaLinear.from_layer(Linear(2, 3, seed=1, dtype=np.float64))):
        h = dev.forward(cuda.to_device(x))
        dh = cuda.to_device(np.cos(h.copy_to_host()))
        dev.zero_grad()
        dev.backward(dh)
        once = dev.grads_to_host()
        dev.backward(dh)
        np.testing.assert_allclose(dev.grads_to_host(), 2 * once, rtol=1e-12, err_msg=repr(dev))
    layer = MDLSTM2D(2, 3, seed=1, dtype=np.float64, device="cuda")
    h = layer.forward(x)
    layer.grads.data[...] = 1.0
    layer.backward(np.cos(h))
    once = layer.grads.data - 1.0
    assert np.abs(once).max() > 1e-3
    layer.backward(np.cos(h))
    np.testing.assert_allclose(layer.grads.data, 1.0 + 2 * once, rtol=1e-12)


def sim_device_adam_norm_and_a_skipped_step(rng):
    """CudaAdam.grad_norm() is the current gradients' L2 norm; a step refused for a non-finite
    gradient leaves t (Adam's bias correction) and the parameters as they were. A layer given
    twice is refused."""
    from mdnumba.backend_cuda import CudaAdam, CudaLSTM
    dev = CudaLSTM.from_layer(MDLSTM2D(2, 3, seed=1, dtype=np.float64))
    with pytest.raises(ValueError, match="the same parameters appear twice"):
        CudaAdam([dev, dev])
    other = CudaLSTM.from_layer(MDLSTM2D(2, 3, seed=1, dtype=np.float64))
    g1, g2 = rng.standard_normal(dev.grads.shape), rng.standard_normal(other.grads.shape)
    dev.grads.copy_to_device(g1)
    other.grads.copy_to_device(g2)  # two layers, two buffers: one norm over both
    assert CudaAdam([dev, other]).grad_norm() == pytest.approx(np.sqrt(g1 @ g1 + g2 @ g2), rel=1e-12)
    opt = CudaAdam([dev], lr=0.1)
    for _ in range(2):
        g = rng.standard_normal(dev.grads.shape)
        dev.grads.copy_to_device(g)
        assert opt.grad_norm() == pytest.approx(np.linalg.norm(g), rel=1e-12)
        opt.step()
    before = dev.params_to_host()
    g[3] = np.nan
    dev.grads.copy_to_device(g)
    with pytest.raises(FloatingPointError, match="gradient norm is not finite; lower the learning rate"):
        opt.step()
    assert opt.t == 2
    np.testing.assert_array_equal(dev.params_to_host(), before)


@pytest.mark.parametrize("kind", ["adam", "rmsprop"])
def sim_device_clipping_norm_squares_in_float64(kind, rng):
    """A float32 gradient entry of 2e19 squares past float32's range (4e38): the device norm sums its
    squares in float64, as the host's does, so the step is clipped like the host's (squared in
    float32 the norm was inf and the step refused as non-finite)."""
    from mdnumba import Adam, RMSprop
    from mdnumba.backend_cuda import CudaAdam, CudaLinear, CudaRMSprop
    from mdnumba.layers import Linear
    host = Linear(3, 2, seed=1, dtype=np.float32)
    dev = CudaLinear.from_layer(host)
    g = rng.standard_normal(host.grads.data.shape).astype(np.float32)
    g[0] = 2e19
    host.grads.data[...] = g
    dev.grads.copy_to_device(g)
    mine, theirs = {"adam": (Adam, CudaAdam), "rmsprop": (RMSprop, CudaRMSprop)}[kind]
    opt_h, opt_d = mine(host, lr=0.1, clip_norm=1.0), theirs([dev], lr=0.1, clip_norm=1.0)
    assert opt_d.grad_norm() == pytest.approx(opt_h.grad_norm(), rel=1e-6) == pytest.approx(2e19, rel=1e-6)
    opt_h.step()
    opt_d.step()
    np.testing.assert_allclose(dev.params_to_host(), host.params.data, rtol=1e-6, atol=1e-7)


def sim_device_step_count_follows_the_host(rng):
    """The update kernels count Adam's steps on the device (so a step's launch arguments repeat):
    through steps, a refused one and a state loaded into a fresh optimiser, every update equals
    the CPU Adam's at the same t (lr 0.1: a bias correction one step off changes the update)."""
    from mdnumba import Adam
    from mdnumba.backend_cuda import CudaAdam, CudaLSTM
    cpu = MDLSTM2D(2, 3, seed=1, dtype=np.float64)
    dev = CudaLSTM.from_layer(cpu)
    opt_c, opt_d = Adam(cpu, lr=0.1), CudaAdam([dev], lr=0.1)

    def step(opt, g):
        cpu.grads.data[...] = g
        dev.grads.copy_to_device(g)
        opt_c.step()
        opt.step()
        np.testing.assert_allclose(dev.params_to_host(), cpu.params.data, rtol=1e-12, atol=1e-14)
    for _ in range(3):
        step(opt_d, rng.standard_normal(cpu.grads.data.shape))
    dev.grads.copy_to_device(np.full(cpu.grads.data.shape, np.nan))
    with pytest.raises(FloatingPointError):
        opt_d.step()
    step(opt_d, rng.standard_normal(cpu.grads.data.shape))
    fresh = CudaAdam([dev], lr=0.1)
    fresh.load_state_dict(opt_d.state_dict())
    step(fresh, rng.standard_normal(cpu.grads.data.shape))
    assert opt_c.t == fresh.t == 5 and opt_d.t == 4
    fresh.zero_grad()  # the layer's gradients, on the device
    assert not dev.grads.copy_to_host().any()


def sim_prepared_launches_give_numba_cudas_results(rng, monkeypatch):
    """Train steps of a device layer (forward, backward, Adam) with prepared launches on give what
    they give with them off; on a GPU, launches were prepared and none failed (a prepared driver
    call that raised would fall back to numba-cuda unseen); under the simulator every launch goes
    through numba-cuda."""
    from mdnumba.backend_cuda import CudaAdam, CudaLSTM
    from mdnumba.kernels import launch as L
    cpu = MDLSTM2D(2, 4, seed=1, dtype=np.float32)
    x = cuda.to_device(rng.standard_normal((2, 3, 4, 2)).astype(np.float32))
    dh = cuda.to_device(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))

    def train(prepared):
        monkeypatch.setattr(L.config, "CUDA_PREPARED_LAUNCH", prepared)
        monkeypatch.setattr(L, "_state", {"prepared": {}, "seen": set(), "failed": None})
        dev = CudaLSTM.from_layer(cpu)
        opt, got = CudaAdam([dev], lr=0.01), []
        for _ in range(4):
            dev.zero_grad()
            got.append(dev.forward(x).copy_to_host())
            dev.backward(dh)
            opt.step()
        return got + [dev.params_to_host()], L._state
    on, state = train(True)
    off, _ = train(False)
    for a, b in zip(on, off):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert state["failed"] is None and bool(state["prepared"]) == (not IN_SIMULATOR), state


def sim_device_divergence_and_ctrl_c_across_a_curriculum_switch(tmp_path, monkeypatch):
    """A device run whose gradients turn NaN stops with the CPU trainer's message; Ctrl-C in a
    block that crosses a curriculum switch rewinds the RNG over batches of both sizes."""
    from mdnumba.train import TrainConfig, Trainer, make_trainer
    from mdnumba.train_device import DeviceTrainer
    kw = dict(size=5, batch=2, hidden=2, dtype="float64", curriculum=(4,))
    tr = make_trainer(TrainConfig(steps=2, device="cuda", **kw))
    layer = tr.model.layers[0]
    layer.params.copy_to_device(np.full(layer.params.shape, np.nan))  # past set_params, which refuses NaN
    with pytest.raises(FloatingPointError, match="the gradients became NaN or infinite at step 1"):
        tr.run()
    calls, real = {"n": 0}, DeviceTrainer._device_step

    def interrupted(self, *args):  # block of 5 = sizes 4, 4, 4, 5, 5: Ctrl-C in step 4
        calls["n"] += 1
        if calls["n"] == 4:
            signal.raise_signal(signal.SIGINT)
        return real(self, *args)
    monkeypatch.setattr(DeviceTrainer, "_device_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(TrainConfig(steps=6, sync_every=5, checkpoint_every=6, device="cuda", **kw),
                     tmp_path).run()
    cpu = make_trainer(TrainConfig(steps=4, curriculum_steps=6, **kw))
    cpu.run()
    back = Trainer.load(tmp_path)
    assert back.step == 4 and back.rng.bit_generator.state == cpu.rng.bit_generator.state


def sim_device_save_keeps_the_last_checkpoint_when_the_weights_overflow(tmp_path):
    """The device optimiser's update is not refused as the CPU one's is: the save's own check
    keeps the last good checkpoint (one of infinite weights would load as damaged)."""
    from mdnumba.train import TrainConfig, Trainer, make_trainer
    tr = make_trainer(TrainConfig(steps=1, size=4, batch=2, hidden=2, dtype="float64", device="cuda"),
                      tmp_path)
    tr.run()
    good = (tmp_path / "checkpoint.npz").read_bytes()
    layer = tr.model.layers[0]
    layer.params.copy_to_device(np.full(layer.params.shape, np.inf))  # what an overflowing update leaves
    with pytest.raises(FloatingPointError, match=r"^the weights became NaN or infinite at step 1 "
                                                 r"\(the checkpoint of step 1 is kept\)"):
        tr.save()
    assert (tmp_path / "checkpoint.npz").read_bytes() == good and Trainer.load(tmp_path).step == 1


@pytest.mark.parametrize("loss,dtype,rtol", [("bce", np.float64, 1e-12), ("mse", np.float32, 1e-5)])
def sim_optim_kernels_match_cpu(loss, dtype, rtol, rng):
    """Device loss == mdnumba.losses; CudaRMSprop == RMSprop on a ``dtype`` layer (float32 in the
    second case, so that the compile check has the float32 update kernel); a non-finite gradient
    changes nothing (sync: FloatingPointError; no sync: NaN recorded)."""
    from numba import cuda

    from mdnumba import RMSprop
    from mdnumba.backend_cuda import CudaLinear, CudaRMSprop
    from mdnumba.kernels import optim_cuda as k
    from mdnumba.layers import Linear
    from mdnumba.losses import LOSSES
    z = rng.standard_normal((2, 3, 1)) * 30
    y = (rng.random((2, 3, 1)) > 0.5).astype(float)
    want, dz, p = LOSSES[loss](z, y)
    prob, gz, rec = cuda.device_array_like(z), cuda.device_array_like(z), k.scratch(3)
    sums, probe, idx = k.scratch(k.REDUCE_BLOCKS), cuda.device_array(2), np.array([5, 1])
    k.sigmoid_loss(prob, gz, cuda.to_device(z), cuda.to_device(y), loss, sums, (probe, cuda.to_device(idx)))
    assert k.mean_loss(sums.copy_to_host(), z.size) == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(gz.copy_to_host(), dz, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(prob.copy_to_host(), p, rtol=1e-12)
    np.testing.assert_array_equal(probe.copy_to_host(), prob.copy_to_host().reshape(-1)[idx])
    lin = Linear(3, 2, seed=1, dtype=dtype)
    dev = CudaLinear.from_layer(lin)
    opt_c, opt_d = RMSprop(lin, lr=1e-2, clip_norm=0.3), CudaRMSprop([dev], lr=1e-2, clip_norm=0.3)
    for _ in range(2):
        g = rng.standard_normal(lin.grads.data.shape).astype(dtype)
        lin.grads.data[...] = g
        dev.grads.copy_to_device(g)
        assert opt_d.step() == pytest.approx(opt_c.step(), rel=rtol)
        assert dev.params.dtype == dtype
        np.testing.assert_allclose(dev.params_to_host(), lin.params.data, rtol=rtol)
    before = dev.params_to_host()
    dev.grads.copy_to_device(np.full(g.shape, np.nan, dtype))
    with pytest.raises(FloatingPointError, match="not finite"):
        opt_d.step()
    assert opt_d.step(sync=False, record=(rec, 0)) is None and np.isnan(rec.copy_to_host()[0])
    np.testing.assert_array_equal(dev.params_to_host(), before)
    opt_d.clear_grads = True  # the device trainer's mode: the update zeroes the gradients ...
    opt_d.step(sync=False)
    np.testing.assert_array_equal(dev.params_to_host(), before)  # ... even when it skips the update
    np.testing.assert_array_equal(dev.grads_to_host(), 0.0)


def _train_both(cfg_kw, steps, sync_every):
    from mdnumba.train import TrainConfig, Trainer, make_trainer
    from mdnumba.train_device import DeviceTrainer
    runs = []
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(steps=steps, dtype="float64", device=device, sync_every=sync_every, **cfg_kw)
        tr = make_trainer(cfg)
        assert isinstance(tr, DeviceTrainer) == (device == "cuda") and isinstance(tr, Trainer)
        hist = []
        tr.run(lambda s, m, hist=hist: hist.append((s, m)))
        runs.append((tr, hist))
    return runs


@pytest.mark.parametrize("cfg_kw", [
    dict(size=4, batch=2, hidden=2),
    dict(size=5, batch=2, hidden=2, cell="stable", directions=4, layers=2, loss="bce", clip_norm=0.05,
         curriculum=(4,)),
    dict(model="horizontal", size=4, batch=2, hidden=2, optimizer="rmsprop"),
    dict(model="lstm", task="binary-addition", size=3, batch=2, hidden=2, loss="bce")])
def sim_device_trainer_matches_cpu(cfg_kw):
    """DeviceTrainer (blocks of 2 steps) == the CPU Trainer: every step's metrics, the final
    parameters and optimiser moments (float64)."""
    (cpu, hc), (dev, hd) = _train_both(cfg_kw, steps=5, sync_every=2)
    assert [s for s, _ in hd] == [s for s, _ in hc] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(hc, hd):
        assert set(a) == set(b)
        for key in a:
            if key != "time":
                assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key
    for a, b in zip(cpu._host_params(), dev._host_params()):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
    sa, sb = cpu.opt.state_dict(), dev.opt.state_dict()
    assert sa["t"] == sb["t"] == 5
    for a, b in zip(sa["m"] + sa["v"], sb["m"] + sb["v"]):
        np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-14)
    flat = dev.opt.state_dict(flat=True)  # a moment per key, per layer, as the host optimiser's
    assert sorted(flat) == sorted(["kind", "t", *(f"{k}_{i}" for k in "mv" for i in range(len(sb["m"])))])
    dev.opt.load_state_dict(flat)
    for a, b in zip(sb["m"] + sb["v"], dev.opt.state_dict()["m"] + dev.opt.state_dict()["v"]):
        np.testing.assert_array_equal(b, a)
    ev_c, ev_d = cpu.evaluate(batches=2), dev.evaluate(batches=2)
    assert ev_d == pytest.approx(ev_c, rel=1e-9)


def sim_device_trainer_checkpoints(tmp_path, monkeypatch):
    """A device run resumed from its checkpoint (on the device or on the CPU) == an unbroken run;
    Ctrl-C inside a block saves exactly the steps done (RNG rewound, log rows kept)."""
    from mdnumba.train import TrainConfig, Trainer, make_trainer
    from mdnumba.train_device import DeviceTrainer
    kw = dict(size=4, batch=2, hidden=2, dtype="float64", device="cuda", sync_every=3)
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
    full = make_trainer(TrainConfig(steps=4, **kw))
    full.run()
    make_trainer(TrainConfig(steps=2, **kw), tmp_path / "a").run()
    shutil.copytree(tmp_path / "a", tmp_path / "cpu")
    for device, run in (("cuda", "a"), ("cpu", "cpu")):
        tr = Trainer.load(tmp_path / run, steps=4, device=device)
        assert isinstance(tr, DeviceTrainer) == (device == "cuda") and tr.step == 2
        tr.run()
        for a, b in zip(full._host_params(), tr._host_params()):
            np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-13)
    calls = {"n": 0}
    real = DeviceTrainer._device_step

    def interrupted(self, *args):  # Ctrl-C during step 3: the step finishes, the block ends
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
        return real(self, *args)
    monkeypatch.setattr(DeviceTrainer, "_device_step", interrupted)
    tr = make_trainer(TrainConfig(steps=6, checkpoint_every=6, **kw), tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    cpu = make_trainer(TrainConfig(steps=3, **{**kw, "device": "cpu"}))
    cpu.run()
    back = Trainer.load(tmp_path / "b")
    assert back.step == 3 and back.rng.bit_generator.state == cpu.rng.bit_generator.state
    assert len((tmp_path / "b" / "log.tsv").read_text().splitlines()) == 4
    for a, b in zip(cpu._host_params(), back._host_params()):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-13)


def sim_device_optimizer_checks_each_layers_moments():
    """A state whose per-layer moments are reshaped, or shifted between layers with the same total
    length, is refused as the host optimiser refuses it (it was joined into one buffer and loaded);
    so are a state that is no dict and a negative step count."""
    from mdnumba.train import TrainConfig, make_trainer
    opt = make_trainer(TrainConfig(size=4, batch=2, hidden=2, dtype="float64", device="cuda")).opt
    state = opt.state_dict()
    m0, m1 = state["m"][0], state["m"][1]
    for m in ([m0.reshape(1, -1), m1], [m0[:-1], np.concatenate([m0[-1:], m1])]):
        with pytest.raises(ValueError, match="optimizer state shape .* does not match"):
            opt.load_state_dict(dict(state, m=m))
    with pytest.raises(TypeError, match="^optimizer state must be a dict like state_dict"):
        opt.load_state_dict(None)  # was: 'NoneType' object is not subscriptable
    with pytest.raises(ValueError, match=r"^t must be an integer in \[0, 2\*\*63\), got -1"):
        opt.t = -1
    opt.load_state_dict(state)
    assert opt.t == state["t"]


def sim_device_twins_refuse_what_their_host_twins_refuse(rng):
    """A device optimiser of one device layer (was 'not iterable') or of host layers (was
    AttributeError); settings the host layer refuses; pickles and copies (were "cannot pickle
    'module' object"); a 0-d input (IndexError); a state gradient before any forward; the
    audit's cases below."""
    from mdnumba.backend_cuda import CudaAdam, CudaLinear, CudaLSTM, CudaRMSprop
    from mdnumba.layers import Linear
    from mdnumba.models import build_model
    from mdnumba.train_device import DeviceModel
    dev = CudaLSTM.from_layer(MDLSTM2D(1, 2, dtype=np.float64))
    assert len(CudaAdam(dev).buffers) == len(CudaRMSprop([dev]).buffers) == 1
    for host in (MDLSTM2D(1, 2), [MDLSTM2D(1, 2, device="cuda")], 3, []):
        with pytest.raises(TypeError, match="takes device layers .* use mdnumba.Adam or mdnumba.RMSprop"):
            CudaAdam(host)
    for kw, match in ((dict(directions=3), "directions must be 1 or 4"), (dict(hidden=0), "hidden")):
        args = dict(dict(ndim=2, in_channels=1, hidden=2, params=np.zeros(60)), **kw)
        with pytest.raises(ValueError, match=match):
            CudaLSTM(**args)
    model = DeviceModel(build_model("md", hidden=2))
    for twin in (dev, CudaAdam(dev), model, CudaLinear.from_layer(Linear(2, 3))):
        for copy_it in (copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match=f"^a {type(twin).__name__} holds GPU memory and is not "
                                                "pickled or copied: copy the host layer"):
                copy_it(twin)
    for scalar in (np.float32(1), 1.0, cuda.to_device(np.zeros((), np.float32))):  # "1 dimensions"
        with pytest.raises(ValueError, match=r"^x must have at least 1 dimension \(\.\.\., in_features\), "
                                             r"got the scalar"):
            CudaLinear.from_layer(Linear(2, 3)).forward(scalar)
        with pytest.raises(ValueError, match=r"^x must have at least 1 dimension"):
            Linear(2, 3).forward(scalar)
    for host, x, dh in ((MDLSTM2D(2, 2), np.ones((1, 2, 2, 1)), np.ones((1, 2, 2))),  # were "2 grid axes"
                        (LSTM1D(2, 2), np.ones((1, 2, 1)), np.ones((1, 2)))):
        said = []
        for layer in (host, CudaLSTM.from_layer(host)):
            with pytest.raises(ValueError) as err:
                layer.forward(x)
            said.append(str(err.value))
            layer.forward(np.ones(x.shape[:-1] + (2,)))
            with pytest.raises(ValueError) as err:
                layer.backward(dh)
            said.append(str(err.value))
        axes = "time" if host.ndim == 1 else "height, width"
        assert said[:2] == said[2:] and f"(batch, {axes}, C)" in said[0], said
        assert ", D)" in said[1], said
    with pytest.raises(RuntimeError, match="^no initial-state gradient: run forward"):
        LSTM1D(1, 2, device="cuda").initial_state_grad()
    # found by an audit of the device API: a layer of another kind (AttributeError), sizes the twin
    # took as given, wrong-sized or NaN parameters (numba's message; NaN output), 0 channels
    # (ZeroDivisionError), a record slot past its array (a write out of bounds on a GPU)
    from mdnumba.backend_cuda import CudaBlockSubsample, CudaEmbedding, CudaGridLSTM
    from mdnumba.layers import GridLSTM2D
    for twin, layer, match in ((CudaLSTM, GridLSTM2D(2, 2), "takes a WavefrontLSTM .*, got GridLSTM2D; a "
                                "GridLSTM2D: CudaGridLSTM.from_layer"),
                               (CudaLSTM, None, "takes a .*, got NoneType"),
                               (CudaLinear, MDLSTM2D(1, 2), "takes a mdnumba.layers.Linear, got MDLSTM2D"),
                               (CudaGridLSTM, MDLSTM2D(1, 2), "takes a GridLSTM2D, got MDLSTM2D"),
                               (CudaEmbedding, Linear(2, 3), "takes a mdnumba.charlm.Embedding, got Linear")):
        with pytest.raises(TypeError, match=f"^{twin.__name__}.from_layer {match}"):
            twin.from_layer(layer)
    with pytest.raises(TypeError, match="^DeviceModel takes an mdnumba.models model .*, got MDLSTM2D"):
        DeviceModel(MDLSTM2D(1, 2))
    logits = model.forward(cuda.to_device(np.ones((1, 3, 3, 1), np.float32)))
    with pytest.raises(TypeError, match="^dlogits on the device has dtype float64, the model uses float32"):
        model.backward(cuda.to_device(np.ones(logits.shape)))  # was named dy, the readout's
    for args, match in (((2.5, 3, np.zeros(9)), "in_features must be an integer"),
                        ((-1, 3, np.zeros(0)), "in_features must be"), ((2, 0, np.zeros(2)), "out_features")):
        with pytest.raises((TypeError, ValueError), match=match):
            CudaLinear(*args)
    with pytest.raises(ValueError, match=r"^params must have 60 entries for ndim=2, in=1, hidden=2, "
                                         r"directions=1, got 5$"):
        dev.set_params(np.zeros(5))
    good = dev.params_to_host()
    with pytest.raises(NonFiniteError, match="^params hold 60 NaN or infinite values"):
        dev.set_params(np.full(60, np.nan))
    with pytest.raises(NonFiniteError, match="^params hold 1 NaN or infinite values"):
        CudaLSTM(2, 1, 2, np.r_[np.zeros(59), np.inf])
    np.testing.assert_array_equal(dev.params_to_host(), good)  # a refused upload changes nothing
    with pytest.raises(ValueError, match=r"BlockSubsample\(2\) got an empty axis, shape \(1, 4, 4, 0\)"):
        CudaBlockSubsample(2).forward(np.ones((1, 4, 4, 0)))
    opt, rec = CudaAdam(dev), cuda.to_device(np.zeros(3))
    for record in ((rec, 3), (rec, -1), (rec, True), (cuda.to_device(np.zeros((3, 1))), 0), (np.zeros(3), 0),
                   5, (rec,)):
        with pytest.raises(ValueError, match=r"^record must be \(a 1-D device array, a slot in \[0, its "):
            opt.step(record=record)
    assert opt.t == 0
    dev.grads.copy_to_device(np.ones(60))
    opt.step(sync=False, record=(rec, np.int64(2)))
    assert opt.t == 1 and rec.copy_to_host()[2] == pytest.approx(60**0.5)


def sim_device_trainer_prefetches_next_block(monkeypatch):
    """In ``run`` the next block's batches are drawn right after this block's launches, before
    the host waits for the GPU and logs; each batch is drawn once, and the run equals one with
    ``prefetch = False``. A prefetched block that is not the one asked for next is dropped."""
    from mdnumba.train import TrainConfig, make_trainer
    from mdnumba.train_device import DeviceTrainer
    events, drawn, real_step, real_draw = [], [], DeviceTrainer._device_step, DeviceTrainer.sample_batch

    def step(self, *args):
        events.append("step")
        return real_step(self, *args)

    def draw(self, rng, size):
        events.append("draw")
        drawn.append(real_draw(self, rng, size))
        return drawn[-1]
    monkeypatch.setattr(DeviceTrainer, "_device_step", step)
    monkeypatch.setattr(DeviceTrainer, "sample_batch", draw)
    cfg = TrainConfig(steps=5, size=4, batch=2, hidden=2, dtype="float64", device="cuda", sync_every=2)
    runs = {}
    for prefetch in (True, False):
        monkeypatch.setattr(DeviceTrainer, "prefetch", prefetch)
        events.clear()
        tr = make_trainer(cfg)
        tr.run(lambda s, m: events.append("log"))
        runs[prefetch] = tr, "".join(e[0] for e in events)
    assert runs[True][1] == "ddssddllssdllsl"  # blocks of 2, 2, 1; d=draw, s=step, l=log
    assert runs[False][1] == "ddssllddsslldsl"
    (a, _), (b, _) = runs[True], runs[False]
    assert a.rng.bit_generator.state == b.rng.bit_generator.state
    for pa, pb in zip(a._host_params(), b._host_params()):
        np.testing.assert_array_equal(pa, pb)
    monkeypatch.setattr(DeviceTrainer, "prefetch", True)
    tr = make_trainer(cfg)
    s0 = tr.rng.bit_generator.state
    tr._train_block(2, ahead=2)  # draws steps 1-2, then 3-4 ahead
    tr.train_step()  # a block of 1: the prefetched block of 2 is dropped, step 3 drawn anew
    assert len(drawn) - 10 == 5 and tr.step == 3
    assert tr.rng.bit_generator.state == tr._draw(0, 3, s0).states[3]
    tr._train_block(1, ahead=1)
    tr.rng.bit_generator.state = s0  # the RNG moved: the block drawn ahead no longer applies
    tr._train_block(1)
    assert tr.rng.bit_generator.state == tr._draw(0, 1, s0).states[1]


def sim_cli_trains_on_device(tmp_path):
    """``mdnumba train --device cuda`` runs the device-resident trainer end to end and resumes."""
    from click.testing import CliRunner
    from mdnumba.cli.main import main
    run = ["train", "--size", "4", "--batch", "2", "--hidden", "2", "--device", "cuda",
           "--sync-every", "2", "--out", str(tmp_path)]
    res = CliRunner().invoke(main, run + ["--steps", "3"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["train", "--resume", str(tmp_path), "--steps", "5"])
    assert res.exit_code == 0 and "resuming" in res.output, res.output
    assert len((tmp_path / "log.tsv").read_text().splitlines()) == 6
    res = CliRunner().invoke(main, ["train", "--resume", str(tmp_path), "--steps", "6", "--sync-every", "1"])
    assert res.exit_code == 0, res.output  # --sync-every may change on resume (train --help)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((3, 4, 5, 1)))
    probs = {}
    for device in ("cuda", "cpu"):  # predict on the device, and the same run on the CPU
        out = tmp_path / f"p_{device}.npy"
        res = CliRunner().invoke(main, ["predict", str(tmp_path), str(tmp_path / "x.npy"), "--out",
                                        str(out), "--device", device, "--batch", "2"])
        assert res.exit_code == 0, res.output
        probs[device] = np.load(out)
    np.testing.assert_allclose(probs["cuda"], probs["cpu"], rtol=1e-5, atol=1e-6)


@pytest.fixture
def small_text(tmp_path, monkeypatch):
    """A short text file, and the char-LM trainers validating every 2nd step."""
    from mdnumba.train_charlm import CharLMTrainer
    monkeypatch.setattr(CharLMTrainer, "EVAL_EVERY", 2)
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    return path


def _char_lm_config(text, device, **kw):
    from mdnumba.train import TrainConfig
    base = dict(task="char-lm", model="stacked", data=str(text), batch=2, hidden=3, layers=2, seq_len=5,
                steps=5, dtype="float64", sync_every=2)
    return TrainConfig(**dict(base, device=device, **kw))


def _assert_same_run(cpu, dev, rtol=1e-10):
    """Final parameters and optimiser moments of two trainers agree."""
    for a, b in zip(cpu._host_params(), dev._host_params()):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=1e-13)
    sa, sb = cpu.opt.state_dict(), dev.opt.state_dict()
    assert sa["t"] == sb["t"]
    for a, b in zip(sa["m"] + sa["v"], sb["m"] + sb["v"]):
        np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("kw", [dict(dropout=0.3), dict(dropout=0.0, optimizer="rmsprop", clip_norm=0.05,
                                                        layers=1, steps=4),
                                dict(model="grid", dropout=0.2, layers=3),
                                dict(model="grid", tie_depth=False, steps=3)])
def sim_device_char_lm_trainer_matches_cpu(kw, small_text):
    """``--task char-lm --device cuda`` (stacked, or grid) trains device-resident
    (DeviceCharLMTrainer, blocks of 2 steps) exactly as the CPU trainer: the same windows and
    dropout masks, every step's loss and validation, final parameters and moments; evaluate
    and sample agree too."""
    from mdnumba.train import make_trainer
    from mdnumba.train_charlm_device import DeviceCharLMTrainer
    runs = []
    for device in ("cpu", "cuda"):
        tr = make_trainer(_char_lm_config(small_text, device, **kw))
        assert isinstance(tr, DeviceCharLMTrainer) == (device == "cuda")
        hist = []
        tr.run(lambda s, m, hist=hist: hist.append((s, m)))
        runs.append((tr, hist))
    (cpu, hc), (dev, hd) = runs
    assert [s for s, _ in hd] == [s for s, _ in hc] == list(range(1, cpu.cfg.steps + 1))
    for (_, a), (_, b) in zip(hc, hd):
        assert set(a) == set(b) == {"loss", "bpc", "val_loss", "val_bpc", "time", "chars_per_s"}
        for key in ("loss", "bpc", "val_loss", "val_bpc"):
            assert b[key] == pytest.approx(a[key], rel=1e-12), key
    _assert_same_run(cpu, dev)
    assert dev.evaluate(batches=2) == pytest.approx(cpu.evaluate(batches=2), rel=1e-12)
    assert dev.generate(12, 0.8, prime="the") == cpu.generate(12, 0.8, prime="the")


def sim_device_char_lm_trainer_checkpoints(small_text, tmp_path, monkeypatch):
    """A device char-LM run resumed from its checkpoint (on the device or the CPU) equals an unbroken
    run; Ctrl-C inside a block saves exactly the steps done."""
    from mdnumba.train import Trainer, make_trainer
    from mdnumba.train_charlm_device import DeviceCharLMTrainer
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
    full = make_trainer(_char_lm_config(small_text, "cuda", steps=4, dropout=0.2))
    full.run()
    make_trainer(_char_lm_config(small_text, "cuda", steps=2, dropout=0.2), tmp_path / "a").run()
    shutil.copytree(tmp_path / "a", tmp_path / "cpu")
    for device, run in (("cuda", "a"), ("cpu", "cpu")):
        tr = Trainer.load(tmp_path / run, steps=4, device=device)
        assert isinstance(tr, DeviceCharLMTrainer) == (device == "cuda") and tr.step == 2
        tr.run()
        _assert_same_run(full, tr)
    calls = {"n": 0}
    real = DeviceCharLMTrainer._device_eval

    def interrupted(self, *args):  # Ctrl-C during step 2's validation: the block ends after it
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGINT)
        return real(self, *args)
    monkeypatch.setattr(DeviceCharLMTrainer, "_device_eval", interrupted)
    tr = make_trainer(_char_lm_config(small_text, "cuda", steps=6, checkpoint_every=6, sync_every=4),
                      tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    cpu = make_trainer(_char_lm_config(small_text, "cpu", steps=2))
    cpu.run()
    back = Trainer.load(tmp_path / "b")
    assert back.step == 2 and back.rng.bit_generator.state == cpu.rng.bit_generator.state
    assert len((tmp_path / "b" / "log.tsv").read_text().splitlines()) == 3
    _assert_same_run(cpu, back)


def sim_device_char_lm_run_extended_by_resume_logs_what_one_run_would(small_text, tmp_path, monkeypatch):
    """As test_charlm.py's CPU case, on the device trainer: the last step's fresh validation is
    neither carried on nor saved. 4 steps in one run validate at 1 and 4; 2 steps resumed to 4
    log the same validation columns but for the row of step 2, where the first run ended (row 3
    carries step 1's validation, not step 2's)."""
    from mdnumba.train import Trainer, make_trainer
    from mdnumba.train_charlm import CharLMTrainer
    monkeypatch.setattr(CharLMTrainer, "EVAL_EVERY", 4)

    def val_columns(run):
        rows = [line.split("\t") for line in (run / "log.tsv").read_text().splitlines()]
        return [[r[0]] + [v for name, v in zip(rows[0], r) if name.startswith("val")] for r in rows]
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    make_trainer(_char_lm_config(small_text, "cuda", steps=4), tmp_path / "one").run()
    make_trainer(_char_lm_config(small_text, "cuda", steps=2), tmp_path / "two").run()
    Trainer.load(tmp_path / "two", steps=4).run()
    one, two = val_columns(tmp_path / "one"), val_columns(tmp_path / "two")
    assert [r[0] for r in two] == [r[0] for r in one] and two[2] != one[2]
    assert two[:2] + two[3:] == one[:2] + one[3:]


def sim_device_char_lm_stops_when_the_gradients_overflow(small_text):
    """A device char-LM step whose gradient norm is not finite (the loss finite) stops the run
    with the CPU trainer's message; the device optimiser skips such an update silently, so
    without the check the run went on with its steps lost."""
    from mdnumba.train import make_trainer
    tr = make_trainer(_char_lm_config(small_text, "cuda", steps=2))
    tr.model.grads.copy_to_device(np.full(tr.model.grads.shape, np.inf))  # backward adds to them
    with pytest.raises(FloatingPointError, match="the gradients became NaN or infinite at step 1"):
        tr.run()


def sim_device_models_refuse_backward_after_save_false_before_any_gradient(rng):
    """DeviceModel and DeviceCharLM refuse backward after a forward with save=False before any
    layer adds a gradient (the readout / head ran its backward before a recurrent layer
    refused: their gradients took a step's worth from the refused call)."""
    from mdnumba.charlm import CharLM
    from mdnumba.models import build_model
    from mdnumba.train_charlm_device import DeviceCharLM
    from mdnumba.train_device import DeviceModel
    model = DeviceModel(build_model("md", hidden=2, dtype=np.float64, seed=1))
    x = rng.random((1, 3, 3, 1))
    model.forward(x, save=False)
    before = model.grads.copy_to_host()
    with pytest.raises(RuntimeError, match="save=False"):
        model.backward(np.ones((1, 3, 3, 1)))
    np.testing.assert_array_equal(model.grads.copy_to_host(), before)
    lm = DeviceCharLM(CharLM("stacked", vocab=5, hidden=2, layers=1, dtype=np.float64))
    lm.forward(np.array([[1, 2, 3]]), save=False)
    before = lm.grads.copy_to_host()
    with pytest.raises(RuntimeError, match="save=False"):
        lm.backward(rng.standard_normal((1, 3, 5)))
    np.testing.assert_array_equal(lm.grads.copy_to_host(), before)


def sim_grid_lstm_device_layer_takes_a_larger_batch_after_a_smaller(rng):
    """CudaGridLSTM's bias gradients sum over a column of ones kept between calls: a backward of
    more rows than the one before (a larger batch or a longer window) equals the CPU layer's
    (a kept column of the old size failed with 'gemm shapes do not match')."""
    from mdnumba.backend_cuda import CudaGridLSTM
    from mdnumba.layers import GridLSTM2D
    for tied in (True, False):
        cpu = GridLSTM2D(2, 2, seed=2, dtype=np.float64, tied=tied)
        dev = CudaGridLSTM.from_layer(cpu)
        for B, T in ((1, 2), (2, 3), (1, 2)):
            x, dh = rng.standard_normal((B, T, 2)), rng.standard_normal((B, T, 2))
            cpu.zero_grad()
            dev.zero_grad()
            cpu.forward(x)
            dev.forward(x)
            np.testing.assert_allclose(dev.backward(dh), cpu.backward(dh), rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(dev.grads_to_host(), cpu.grads.data, rtol=1e-12, atol=1e-13)


def sim_device_char_lm_refuses_what_the_host_model_refuses(rng):
    """DeviceCharLM: backward before a forward or after one with save=False, ids out of the
    vocabulary or of another shape, seeds that are not one per dropout, dlogits of another
    shape, a copy, backward after a forward that failed partway."""
    from mdnumba.charlm import CharLM
    from mdnumba.train_charlm_device import DeviceCharLM
    model = DeviceCharLM(CharLM("stacked", vocab=5, hidden=2, layers=1, dtype=np.float64))
    with pytest.raises(RuntimeError, match=r"no saved activations; run forward\(ids\) first"):
        model.backward(np.zeros((1, 3, 5)))
    model.forward(np.array([[1, 2, 3]]), save=False)
    with pytest.raises(RuntimeError, match="the last forward.x, save=False. kept none"):
        model.backward(np.zeros((1, 3, 5)))
    with pytest.raises(ValueError, match=r"integer ids in \[0, 5\), got ids from 1 to 5"):
        model.forward(np.array([[1, 5]]))
    model.forward(np.array([[1, 2, 3]]))
    with pytest.raises(ValueError, match="dlogits must have 3 dimensions"):
        model.backward(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"^dlogits must have shape \(1, 3, 5\)"):  # was "dy must ..."
        model.backward(np.zeros((1, 4, 5)))
    with pytest.raises(TypeError, match="holds GPU memory and is not pickled"):
        copy.deepcopy(model)
    # ids of another shape (were refused past the embedding, naming its output, and the next backward
    # then added part of its gradients) and bad seeds change nothing: backward is the last forward's
    dlogits = rng.standard_normal((1, 3, 5))
    model.zero_grad()
    model.backward(dlogits)
    want = model.grads.copy_to_host()
    for ids in (np.array([1, 2]), np.zeros((1, 0), int), np.zeros((1, 1, 3), int),
                cuda.to_device(np.zeros((1, 1, 3), np.int32))):
        with pytest.raises(ValueError, match=r"^ids must have shape \(batch, time\), no axis empty, got "):
            model.forward(ids)
    for seeds in ([1], 7, [1, -1], [1, "2"], [1, True], [1, 2**64]):
        with pytest.raises(ValueError, match=r"^seeds must be None or 2 integers in \[0, 2\*\*64\), one "):
            model.forward(np.array([[1, 2, 3]]), seeds)
    model.zero_grad()
    model.backward(dlogits)
    np.testing.assert_array_equal(model.grads.copy_to_host(), want)
    model.cores[0].forward = lambda *a, **k: 1 / 0  # a forward that fails past the embedding
    with pytest.raises(ZeroDivisionError):
        model.forward(np.array([[3, 2, 1]]))
    with pytest.raises(RuntimeError, match="after a forward that failed partway"):
        model.backward(dlogits)


def sim_cli_trains_char_lm_on_device(small_text, tmp_path):
    """``mdnumba train --task char-lm --model stacked --device cuda --sync-every N`` runs the
    device-resident char-LM trainer, resumes, and samples on the device as on the CPU."""
    from click.testing import CliRunner
    from mdnumba.cli.main import main
    out = tmp_path / "run"
    run = ["train", "--task", "char-lm", "--model", "stacked", "--data", str(small_text), "--batch", "2",
           "--hidden", "3", "--seq-len", "5", "--dropout", "0.2", "--device", "cuda", "--sync-every", "2",
           "--out", str(out)]
    res = CliRunner().invoke(main, run + ["--steps", "3"])
    assert res.exit_code == 0 and "leave out" not in res.output, res.output
    res = CliRunner().invoke(main, ["train", "--resume", str(out), "--steps", "4", "--sync-every", "3"])
    assert res.exit_code == 0 and "resuming" in res.output, res.output
    assert len((out / "log.tsv").read_text().splitlines()) == 5
    texts = {}
    for device in ("cuda", "cpu"):
        res = CliRunner().invoke(main, ["sample", str(out), "--length", "8", "--device", device])
        assert res.exit_code == 0, res.output
        texts[device] = res.output
    assert texts["cuda"] == texts["cpu"]


def sim_cli_bench_on_device():
    """``mdnumba bench --device cuda`` times the device-resident layer and names the sweep path,
    the forward's and the backward's where they differ (the default layout runs them differently)."""
    from click.testing import CliRunner
    from mdnumba.cli.main import main
    res = CliRunner().invoke(main, ["bench", "--device", "cuda", "--size", "3", "--batch", "2",
                                    "--hidden", "2", "--directions", "4", "--repeats", "1"])
    assert res.exit_code == 0, res.output
    assert "(cuda)" in res.output.splitlines()[0]
    path = r"(cooperative|per-diagonal) \("
    line = rf"^  sweep path  ({path}|forward {path}.*; backward {path})"
    assert re.search(line, res.output, re.M), res.output


def sim_readme_gpu_example_runs():
    """The README's device-resident NumPy example runs as written."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## GPU (CUDA)", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md (GPU example)", "exec"), {})


def sim_device_step_launches(monkeypatch):
    """A device training step of the md model issues 11 kernel launches (docs/gpu.md, "Launches
    and host time"); counted by wrapping the simulator's kernel objects, so only under the simulator."""
    from numba import config as numba_config
    if not numba_config.ENABLE_CUDASIM:
        pytest.skip("counts launches through the simulator's kernel class")
    from numba.cuda.simulator import kernel as sim

    from mdnumba.train import TrainConfig
    from mdnumba.train_device import DeviceTrainer
    tr = DeviceTrainer(TrainConfig(size=4, batch=2, hidden=3, device="cuda", sync_every=1))
    tr.train_step()  # compile and allocate
    launches = []
    call = sim.FakeCUDAKernel.__call__

    def counting(self, *args, **kw):
        if not self._device:
            launches.append(self.fn.__name__)
        return call(self, *args, **kw)

    monkeypatch.setattr(sim.FakeCUDAKernel, "__call__", counting)
    tr.train_step()
    assert len(launches) == 11, launches


def sim_a_sized_saving_forward_zeroes_the_paddings_state(rng):
    """``forward(x, sizes=...)`` (saving) leaves h and c zero in the padding's rows of the device
    workspaces (``zero_padding``), as the CPU layer's: the device sweeps compute the padding's cells
    too, and a long stretch of padding can overflow there (tests/test_sizes.py's
    test_an_overflow_in_the_padding_does_not_stop_backward), which backward would refuse as an
    overflowed state. Too few cells here to overflow, and no output or gradient reads the padding,
    so only the workspaces show whether it was cleared; the real cells' state is left alone."""
    from mdnumba.backend_cuda import CudaLSTM
    dev = CudaLSTM.from_layer(MDLSTM2D(2, 3, seed=1, dtype=np.float64, directions=4))
    dev.forward(rng.standard_normal((2, 3, 4, 2)), sizes=[(3, 4), (2, 2)])
    pad = dev._saved["tables"].skew_src.copy_to_host().reshape(-1) < 0
    h, c = dev._work["h"].copy_to_host(), dev._work["c"].copy_to_host()
    assert pad.any() and np.abs(c[~pad]).min() > 0 and np.abs(h[~pad]).min() > 0
    assert not h[pad].any() and not c[pad].any()


def sim_state_cell_backward_reads_cleared_gates_whatever_the_biases(rng):
    """A 1-D device layer from an initial state with random biases: ``seed_state`` must clear the
    state cell's gate row (the input projection left the biases there), since the backward sweep
    runs the state cell's cell math on it (zero gates: no gate gradient, dc0 from its child alone).
    The default biases (0, forget 1) give no gate gradient either, so sim_state_matches_reference
    passes with the row left as the biases."""
    layer = _layer(1, 2, 3, np.float64, "cuda")
    layer.params["b"] = rng.standard_normal(layer.params["b"].shape)
    B, T = 2, 4
    pair = [(rng.standard_normal((B, 3)), rng.standard_normal((B, 3))) for _ in range(2)]
    check_state_against_reference(layer, rng.standard_normal((B, T, 2)), pair[0],
                                  rng.standard_normal((B, T, 3)), pair[1], 1e-12)


SIM_CASES = sorted(name for name in list(globals()) if name.startswith("sim_"))


# ----------------------------------------------------------------- outer tests (plain pytest)
#: cases that check the simulator itself and skip on a GPU
SIMULATOR_ONLY = frozenset({"sim_simulator_runs_blocks_at_once_and_checks_syncs", "sim_device_step_launches",
                            "sim_simulator_checks_that_a_warp_meets_at_one_mma"})


def _assert_passed(results: dict, may_skip: frozenset = frozenset()) -> None:
    """No case failed, and none skipped but those in ``may_skip`` (a skip checks nothing: a case
    that began to skip in the subprocess would otherwise leave its outer test green)."""
    failed = {k: msg for k, (state, msg) in results.items() if state == "failed"}
    assert not failed, "\n\n".join(f"{k}:\n{msg}" for k, msg in failed.items())
    skipped = {k: msg for k, (state, msg) in results.items()
               if state == "skipped" and k.split("[")[0] not in may_skip}
    assert not skipped, f"skipped, so nothing was checked: {skipped}"


def _check_case(case: str, report: dict, may_skip: frozenset = frozenset()) -> None:
    results = {k: v for k, v in report.items() if k == case or k.startswith(case + "[")}
    assert results, f"{case} did not run in the subprocess"
    _assert_passed(results, may_skip)


@pytest.fixture(scope="module")
def simulator_report(simulator_runs):
    return merged_report(simulator_runs["all"])


def _gpu_shards() -> int:
    """GPU_SHARDS, or 1 where a GPU admits one process at a time (compute mode not Default, as
    ``nvidia-smi`` says; without ``nvidia-smi``: GPU_SHARDS)."""
    try:
        modes = subprocess.run(["nvidia-smi", "--query-gpu=compute_mode", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return GPU_SHARDS
    return GPU_SHARDS if all(m == "Default" for m in modes) else 1


@pytest.fixture(scope="module")
def gpu_report(tmp_path_factory):
    """The cases on the GPU in concurrent processes (:func:`_gpu_shards`: their kernels, CUDA and
    the CPU oracle's, compile in parallel; the GPU time-slices between them), the CPU cores
    shared out between them. No tests/warmup.py first: on the lent 16-core machines the shards
    compile side by side anyway, and there the warm-up ran past its 120 s twice (cause not
    found; 68 s a part on one core here), leaving the shards 150 s of a 270 s part: they reached
    107 of the 150 cases. A shard whose case loses the CUDA context (a sticky error, e.g. an
    illegal address in a layout never run on a GPU before) goes on in a fresh process, instead of
    failing every case after it (:func:`simruns.restarted_report`)."""
    shards = _gpu_shards()
    threads = str(max(1, (os.cpu_count() or 1) // shards))
    runs = [CaseRun(tmp_path_factory.mktemp("cudagpu"), simulator=False, watch=True,
                     env_extra={"MDNUMBA_TEST_SHARD": f"{i}/{shards}", "NUMBA_NUM_THREADS": threads})
            for i in range(shards)]
    def stop():  # the shards get 10 s in all to write their reports (run_gpu.sh kills 20 s after its SIGINT)
        end = time.monotonic() + 10
        for run in runs:
            run.stop(grace=max(0.0, end - time.monotonic()))

    try:
        return restarted_report(runs, lambda: tmp_path_factory.mktemp("cudagpu"))
    except KeyboardInterrupt:  # cut by run_gpu.sh's SIGINT: the cases the shards ended still count
        stop()
        return reported(runs)
    finally:
        stop()


@pytest.mark.skipif(IN_SIMULATOR, reason="this process already runs the simulator")
@pytest.mark.parametrize("case", SIM_CASES)
def test_simulator(case, simulator_report):
    """Every sim_* case under NUMBA_ENABLE_CUDASIM=1 (SHARDS concurrent subprocesses for all)."""
    _check_case(case, simulator_report)


@pytest.mark.skipif(IN_SIMULATOR or cuda_unavailable_reason() is not None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", SIM_CASES)
def test_gpu(case, gpu_report):
    """The same cases on a real GPU (GPU_SHARDS concurrent subprocesses)."""
    _check_case(case, gpu_report, SIMULATOR_ONLY)


@pytest.mark.slow
@pytest.mark.skipif(IN_SIMULATOR, reason="this process already runs the simulator")
@pytest.mark.parametrize("rows", sorted(OTHER_ROWS))
def test_simulator_other_rows_per_thread(rows, simulator_runs):
    """The sweep cases with another MDNUMBA_CUDA_ROWS_PER_THREAD and MDNUMBA_CUDA_UNROLL
    (compile-time; the GPU tuning script tries others): one row per thread without unrolling,
    that one with the cell math on global memory (MDNUMBA_CUDA_CELL_REGISTERS=0), and 3 rows,
    3 steps (B=2 and B=5 leave remainders, as D and (N+3)*D do), that one with every layer in
    the staged layout at 2 units per slice; the tensor layout's backward at 1 and 3 n-tiles per
    warp (slices of 8 and 24 units; tests/simruns.py OTHER_ROWS); the cases that take
    both launch paths take one in each run (OTHER_ROWS_LEAVE_OUT)."""
    report = simulator_runs[rows].report()
    assert len(report) >= 20, report
    assert not any(OTHER_ROWS_LEAVE_OUT[rows] in name for name in report), report
    assert any("tensor_sweeps_match_cpu" in name for name in report), report  # the other n-tiles
    _assert_passed(report)


@pytest.mark.skipif(IN_SIMULATOR, reason="this process already runs the simulator")
@pytest.mark.parametrize("stage", sorted(SKIP_RUNS))
def test_simulator_skipping_a_sweep_stage(stage, simulator_runs):
    """The timing diagnostic MDNUMBA_CUDA_SKIP=sum and =cell (bench/tune_gpu.py --variants):
    sim_sweep_stages_as_configured in a simulator run with it set (tests/simruns.py SKIP_RUNS)."""
    report = simulator_runs[f"skip {stage}"].report()
    assert len(report) == 5, report  # flat, sliced, staged, item, tensor
    _assert_passed(report)


@pytest.mark.skipif(IN_SIMULATOR, reason="this process runs the simulator")
def test_every_kernel_is_launched_in_both_dtypes(simulator_report, simulator_runs):
    """test_kernels_compile_for_gpu compiles what the simulator cases launched: every kernel of
    the package is among it, in float32 and in float64 (but those of ptxcheck.ONE_DTYPE), so a
    kernel or a dtype that no case launches any more is not silently left unchecked."""
    records = ptxcheck.load(run.launches for run in simulator_runs["all"] if run.launches.exists())
    assert len(ptxcheck.package_kernels()) > 50
    assert not ptxcheck.unlaunched(records), ptxcheck.unlaunched(records)


def test_ptxcheck_parts_keep_every_kernel_in_the_default_run():
    """``ptxcheck --part main`` (the default run) keeps every kernel, in float32 where it was
    launched with a float32 array; ``float64-twins`` (a slow test) takes the rest, so the two
    parts are the records split in two."""
    from numba import types
    f32, f64, i64 = types.float32[:], types.float64[:], types.int64[:]
    records = [("m", "both", (f32, i64)), ("m", "both", (f64, i64)), ("m", "mixed", (f32, f64)),
               ("m", "mixed", (f64,)), ("m", "only64", (f64,)), ("m", "ints", (i64,))]
    main, twins = (ptxcheck.select_part(records, part) for part in ("main", "float64-twins"))
    assert twins == [records[1], records[3]]
    assert main == [records[0], records[2], records[4], records[5]]
    assert ptxcheck.select_part(records, "all") == records


@pytest.mark.skipif(IN_SIMULATOR, reason="this process runs the simulator")
@pytest.mark.parametrize("part", ["main", pytest.param("float64-twins", marks=pytest.mark.slow)])
def test_kernels_compile_for_gpu(part, simulator_report, simulator_runs):
    """Every kernel signature the simulator cases launched compiles for an H100 (NVVM to PTX,
    sm_90, the GPU's tile sizes) and needs no local-memory frame (tests/ptxcheck.py; SHARDS
    concurrent processes). The float64 twins of kernels launched in float32 too (the same code at
    another float type, 45% of the ~4 minutes of compiling) are slow tests."""
    missing = ptxcheck.missing_toolchain()
    if missing:
        pytest.skip(missing)
    records = [str(run.launches) for run in simulator_runs["all"] if run.launches.exists()]
    assert records, "the simulator run recorded no launches"
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_ENABLE_CUDASIM", "MDNUMBA_THREADS_PER_BLOCK")}
    procs = [subprocess.Popen([sys.executable, ptxcheck.__file__, *records, "--part", part,
                               "--shard", f"{i}/{SHARDS}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(SHARDS)]
    for proc in procs:
        out, _ = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, out[-6000:]


_SHARED_SPLIT = """
import sys
sys.setswitchinterval(1e-6)  # switch threads often: the race's window is a few bytecodes
import numpy as np
from numba import cuda

def splits(launches, stop_at_first):
    @cuda.jit
    def kernel(out):
        cuda.syncthreads()  # the threads reach the allocation at once
        a = cuda.shared.array(32, np.int64)
        a[cuda.threadIdx.x] = cuda.threadIdx.x
        cuda.syncthreads()
        seen = 0
        for i in range(32):
            seen += a[i] == i
        out[cuda.threadIdx.x] = seen
    n = 0
    for _ in range(launches):
        out = np.zeros(32, np.int64)
        kernel[1, 32](out)
        n += int((out != 32).any())  # every thread saw the others' writes
        if n and stop_at_first:
            break
    return n

print("numba", splits(300, True))
import mdnumba.kernels.wavefront_cuda  # noqa: E402,F401 (replaces the simulator's shared arrays)
print("mdnumba", splits(40, False))
"""


def test_plain_simulator_gives_a_block_one_static_shared_array():
    """Under numba-cuda's own simulator (the GPU benchmark's smoke run, a user's
    NUMBA_ENABLE_CUDASIM=1; the sim_* cases run under tests/simgrid.py's), threads that allocate a
    static shared array at once get the same one once mdnumba's kernels are imported
    (``_thread_safe_simulator_shared``): numba's lookup has no lock, and the staged layout's tile,
    allocated after a grid sync, gave one smoke run wrong gradients."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", _SHARED_SPLIT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = dict(line.split() for line in proc.stdout.splitlines())
    if counts["numba"] == "0":
        pytest.skip("numba-cuda's simulator split no shared array in 300 launches: the race may be fixed "
                    "there (then _thread_safe_simulator_shared can go)")
    assert counts["mdnumba"] == "0", f"{counts['mdnumba']} of 40 launches split a block's shared array"


@pytest.mark.skipif(cuda_unavailable_reason() is None, reason="CUDA is available here")
def test_cuda_unavailable_error_says_what_to_do(monkeypatch):
    """Where numba-cuda is missing or does not import: install the extra; where it imports but
    finds no GPU (this machine, with the test extra): a GPU, not the extra again."""
    from mdnumba import backend_cuda
    from mdnumba.info import cuda_status
    for reason, fix in (("numba.cuda cannot be imported (ImportError: x)", "pip install 'mdnumba[cuda]'"),
                        ("numba-cuda is not installed (x)", "pip install 'mdnumba[cuda]'"),
                        ("no CUDA GPU or driver was found", "need an NVIDIA GPU and its driver")):
        monkeypatch.setattr(backend_cuda, "cuda_unavailable_reason", lambda r=reason: r)
        with pytest.raises(CudaUnavailableError) as err:
            MDLSTM2D(2, 3, device="cuda")
        msg = str(err.value)
        assert msg.startswith(f"device='cuda' is not available: {reason}; ") and fix in msg, msg
        assert "device='cpu'" in msg and ("numpy<2.5" in msg) == ("GPU" not in reason), msg
        with pytest.raises(CudaUnavailableError):
            LSTM1D(2, 3, device="cuda")
        line = cuda_status()  # `mdnumba info` says the same (it once had a gate of its own)
        assert line == f"unavailable: {reason}; {backend_cuda.cuda_hint(reason)}" and fix in line, line


def test_numba_cuda_missing_is_told_from_numbas_own_numba_cuda(monkeypatch):
    """Numba still ships a numba.cuda that imports without numba-cuda (there it said "no CUDA GPU
    or driver was found" and named nothing to install)."""
    import importlib.util

    from mdnumba import backend_cuda
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba_cuda"
                        else real(name, *a))
    reason = backend_cuda.cuda_unavailable_reason()
    assert reason.startswith("numba-cuda is not installed"), reason
    assert "pip install 'mdnumba[cuda]'" in backend_cuda.cuda_hint(reason)


def test_bad_device_name():
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        MDLSTM2D(2, 3, device="gpu")
    assert MDLSTM2D(2, 3).device == "cpu"


def test_gpu_shards_follow_the_compute_mode(tmp_path, monkeypatch):
    """One GPU test process where the GPU admits one process (Exclusive_Process), GPU_SHARDS where
    it is shared (Default) or nvidia-smi is missing."""
    smi = tmp_path / "nvidia-smi"
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _gpu_shards() == GPU_SHARDS >= SHARDS  # no nvidia-smi
    for modes, want in (("Default", GPU_SHARDS), ("Exclusive_Process", 1), ("Default\nProhibited", 1)):
        smi.write_text(f"#!/bin/sh\nprintf '{modes}\\n'\n")
        smi.chmod(0o755)
        assert _gpu_shards() == want, modes


def test_case_runs_cut_short_get_time_to_write_their_reports(tmp_path):
    """A shard cut by run_gpu.sh's SIGINT was killed at once, before it wrote its report: the
    cases it had run were lost. ``stop(grace)`` lets a run end by itself first; GPU runs list
    each case as it ends (-v)."""
    from simruns import Background
    done = tmp_path / "done"
    cmd = [sys.executable, "-c", f"import time; time.sleep(0.5); open({str(done)!r}, 'w').close()"]
    for grace, ends in ((0.0, False), (30.0, True)):
        Background(cmd, dict(os.environ), tmp_path / "out.txt").stop(grace)
        assert done.exists() == ends
    run = CaseRun(tmp_path, simulator=False, select="nothing")
    run.stop()
    assert "-v" in run.run.cmd


def test_a_gpu_case_run_killed_before_its_report_gives_what_it_listed(tmp_path):
    """A GPU shard killed at the tests' cut while a kernel never ends writes no report: what its
    output (-v) listed still counts, its last case started fails as killed, and the other shards'
    cases are not failed with it (a missing report failed the whole GPU case fixture)."""
    run = CaseRun(tmp_path, simulator=False, select="nothing")
    run.stop()
    run.xml.unlink(missing_ok=True)
    run.run.out.write_text("tests/test_cuda.py::sim_a PASSED [ 33%]\n"
                           "tests/test_cuda.py::sim_b[x-1] FAILED [ 66%]\n"
                           "tests/test_cuda.py::sim_c[cooperative] ")
    report = run.report()
    assert report["sim_a"] == ("passed", "") and report["sim_b[x-1]"][0] == "failed"
    assert report["sim_c[cooperative]"] == ("failed", "killed while it ran (a kernel that never ended?)")
    assert len(report) == 3
    (tmp_path / "empty").mkdir()
    empty = CaseRun(tmp_path / "empty", simulator=False, select="nothing")
    empty.stop()
    empty.xml.unlink(missing_ok=True)
    empty.run.out.write_text("")
    assert reported([run, empty]) == report  # after the tests' cut: a shard that left nothing is left out


def test_no_cuda_context_without_a_gpu():
    """Without a usable GPU no CUDA call works in this process (the simulator runs check it alive)."""
    from mdnumba.backend_cuda import cuda_context_alive
    assert cuda_context_alive() is (cuda_unavailable_reason() is None)


def test_case_runs_go_on_after_a_case_lost_the_cuda_context(tmp_path):
    """On a GPU a case ending in a sticky error (an illegal or misaligned address) leaves its
    process's CUDA context unusable, and every later case of its shard would fail with it. A run
    watching the context stops after such a case and goes on with the cases it did not reach in a
    fresh process. Here under the simulator, the loss injected into the first of three cases."""
    select = "device_image_models_name_the_image or zero_padding_twins"
    folders = iter(range(9))

    def folder() -> Path:
        (path := tmp_path / str(next(folders))).mkdir()
        return path

    inject = {"MDNUMBA_TEST_SHARD": "0/1", "MDNUMBA_CASES_INJECT_LOSS": "sim_zero_padding_twins"}
    runs = [CaseRun(folder(), simulator=True, select=select, watch=True, env_extra=inject)]
    report = restarted_report(runs, folder)
    assert len(runs) == 2 and runs[0].lost.read_text() == "sim_zero_padding_twins"
    assert list(runs[0].report()) == ["sim_zero_padding_twins"]  # it stopped there
    assert report.pop("sim_zero_padding_twins")[0] == "failed"
    assert sorted(report) == ["sim_device_image_models_name_the_image[horizontal]",
                              "sim_device_image_models_name_the_image[snake]"]
    assert {state for state, _ in report.values()} == {"passed"}, report
    assert runs[1].done == {"sim_zero_padding_twins"} and not runs[1].lost.exists()


def test_cooperative_grid_limit_is_asked_once_per_kernel_types_block_and_device(monkeypatch):
    """On a GPU the co-residency limit is remembered: typing the arguments and asking the driver
    at every sweep would cost ~20 µs a sweep. A fake kernel stands in for a compiled one."""
    from types import SimpleNamespace

    from mdnumba.kernels import wavefront_cuda as gpu

    asked = []

    class Kernel:
        def typeof_pyval(self, a):
            return getattr(a, "_numba_type_", None) or getattr(a, "dtype", type(a))

        def compile(self, types):
            limit = 4 + len(asked)  # another answer each time it is asked
            return SimpleNamespace(max_cooperative_grid_blocks=lambda tpb, shmem: asked.append(
                (types, tpb, shmem)) or (0 if tpb > 1024 else limit))

    class DeviceArray:  # numba-cuda's device arrays carry their numba type
        def __init__(self, numba_type):
            self._numba_type_ = numba_type

    device = SimpleNamespace(id=0)
    monkeypatch.setattr(gpu, "SIMULATOR", False)
    monkeypatch.setattr(gpu, "cuda", SimpleNamespace(get_current_device=lambda: device))
    monkeypatch.setitem(gpu._state, "coop_limit", {})
    kernel, a = Kernel(), np.zeros((4, 6), np.float32)
    assert [gpu._coop_grid(kernel, (a, 3), 128, 0, 100) for _ in range(3)] == [4, 4, 4]
    assert gpu._coop_grid(kernel, (np.ones((4, 6), np.float32), 5), 128, 0, 3) == 3  # same types
    assert len(asked) == 1
    others = [((a.astype(np.float64), 3), 128, 0), ((a[:, ::2], 3), 128, 0), ((a[0], 3), 128, 0),
              ((a, 3.0), 128, 0), ((a, True), 128, 0), ((DeviceArray("f4 2d C"), 3), 128, 0),
              ((DeviceArray("f8 2d C"), 3), 128, 0), ((a, 3), 256, 0), ((a, 3), 128, 64)]
    for n, (args, tpb, shmem) in enumerate(others, start=1):
        assert [gpu._coop_grid(kernel, args, tpb, shmem, 100) for _ in range(2)] == [4 + n] * 2
        assert len(asked) == n + 1  # asked anew, once
    assert gpu._coop_grid(kernel, (DeviceArray("f4 2d C"), 7), 128, 0, 100) == 10  # as before
    device.id = 1  # another GPU, another kernel: asked anew
    assert gpu._coop_grid(kernel, (a, 3), 128, 0, 100) == 14
    assert gpu._coop_grid(Kernel(), (a, 3), 128, 0, 100) == 15 and len(asked) == 12
    with pytest.raises(RuntimeError, match="cannot be resident with 2048 threads and 0 B"):
        gpu._coop_grid(kernel, (a, 3), 2048, 0, 100)


def test_every_simulator_case_is_run():
    """A ``sim_`` case defined below SIM_CASES would run only under ``-o python_functions='sim_*'``,
    never in test_simulator or test_gpu."""
    assert SIM_CASES == sorted(name for name in globals() if name.startswith("sim_"))
