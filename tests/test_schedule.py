"""The CPU sweeps' two schedules (:func:`mdnumba.kernels.wavefront.batch_blocks`): one ``prange``
per hyperplane, or blocks of (scan, group of batch items) streams each sweeping every hyperplane,
give bit-identical results, however the streams are cut into blocks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mdnumba import LSTM1D, MDLSTM2D, MDLSTM3D
from mdnumba.grid import direction_tables, live_items, wavefront
from mdnumba.kernels import wavefront as wfk
from mdnumba.kernels.gemm import matmul_rows

CASES = [  # layer class, grid, batch, directions, cell, hidden, input channels, dtype
    (LSTM1D, (7,), 5, 2, "graves", 3, 2, np.float64),
    (LSTM1D, (6,), 7, 1, "stable", 6, 2, np.float32),
    (MDLSTM2D, (4, 5), 3, 4, "stable", 6, 2, np.float64),
    (MDLSTM2D, (3, 6), 1, 1, "spatial", 3, 2, np.float64),
    (MDLSTM3D, (2, 3, 2), 3, 8, "graves", 5, 2, np.float32),
    # register tiles: the batch schedule runs them chunk by chunk over a block's streams
    # (_tiles_items; D = 264: chunks of the forward's D steps and the backward's G, a partial last
    # panel), and the saving-free sweep's input projection a panel at a time (_input_tiles: C >= 4)
    (LSTM1D, (4,), 9, 2, "graves", 264, 6, np.float32),
    (MDLSTM2D, (3, 4), 5, 4, "graves", 32, 5, np.float32),
    # tall tiles: two groups of rows of a cell in one (batch 12: groups 0-1 paired, 2 alone)
    (MDLSTM2D, (3, 4), 12, 4, "stable", 32, 5, np.float32),
    # shared tiles (wfk.shared_tiles): the plane schedule puts the rows of 4 cells (batch 1) or
    # 2 (batch 2) in one tile, skipping the cells without that parent (child), per scan; the
    # saving-free sweep's input projections too (C >= 4)
    (MDLSTM2D, (5, 7), 1, 4, "graves", 33, 6, np.float32),
    (MDLSTM2D, (4, 6), 2, 4, "stable", 8, 5, np.float64),
    (MDLSTM3D, (3, 3, 4), 1, 1, "graves", 5, 4, np.float32),
]


def sweeps(layer, x, schedule: str) -> list[np.ndarray]:
    """Forward, backward and saving-free sweeps of ``layer`` on ``x`` under one schedule."""
    B, dims, S, D = x.shape[0], x.shape[1:-1], layer.directions, layer.hidden
    wf = wavefront(dims)
    skew_src, _ = direction_tables(dims, B, S)
    W, bias = layer._per_direction("W"), layer._per_direction("b")
    U = layer.params["U"].reshape(S, D, -1)
    rows, x2 = wf.n_cells * B, x.reshape(-1, x.shape[-1])
    dt = layer.dtype
    act = np.concatenate([bias[q] + np.where(skew_src[q][:, None] >= 0, x2[skew_src[q]], 0) @ W[q]
                          for q in range(S)]).astype(dt)
    h, c = np.zeros((S * rows, D), dt), np.zeros((S * rows, D), dt)
    wfk.wavefront_forward(h, c, act, U, wf.diag_off, wf.parent, B, D, layer.cell_code, schedule=schedule)
    dact, dc, dh = np.zeros_like(act), np.zeros_like(c), np.cos(3 * h)
    wfk.wavefront_backward(dact, dc, dh, act, c, U, wf.diag_off, wf.parent, wf.child, B, D,
                           layer.cell_code, schedule=schedule)
    slots = 2 * wf.max_diag_cells
    out = np.full((x2.shape[0], S, D), np.nan, dt)
    hr, cr, ar = (np.zeros((S * slots * B, n), dt) for n in (D, D, act.shape[1]))
    wfk.wavefront_infer(out, hr, cr, ar, np.empty((slots, len(dims)), wf.parent.dtype), x2, skew_src, W,
                        bias, U, wf.diag_off, wf.parent, 0, wf.n_diagonals, B, D, layer.cell_code,
                        schedule=schedule)
    return [h, c, act, dact, dc, dh, out]


@pytest.mark.parametrize("cls,dims,B,S,cell,D,C,dtype", CASES)
@pytest.mark.parametrize("threads", [1, 3, 1000])
def test_batch_schedule_equals_plane_schedule(cls, dims, B, S, cell, D, C, dtype, threads, rng, monkeypatch):
    """Every array of the three sweeps is bit-identical under both schedules, with the streams in
    one block, in uneven blocks, or one stream per block (as many blocks as ``threads`` would
    get; the sweeps still run on Numba's threads)."""
    monkeypatch.setattr(wfk, "numba", SimpleNamespace(get_num_threads=lambda: threads))
    layer = cls(C, D, directions=S, cell=cell, dtype=dtype, seed=1)
    layer.params.data[:] = rng.uniform(-0.6, 0.6, layer.params.data.shape)
    x = rng.standard_normal((B,) + dims + (C,)).astype(dtype)
    assert wfk.batch_blocks(S, B, wavefront(dims).diag_off, None, "batch") == min(threads, S * wfk.groups(B))
    planes, batched = sweeps(layer, x, "planes"), sweeps(layer, x, "batch")
    for name, a, b in zip(["h", "c", "act", "dact", "dc", "dh", "out"], planes, batched):
        assert np.isfinite(a).all() and np.abs(a).max() > 0, name
        np.testing.assert_array_equal(b, a, err_msg=name)
    np.testing.assert_array_equal(batched[-1].reshape(-1, S * D), layer.forward(x).reshape(-1, S * D))


def test_batch_blocks_choice(monkeypatch):
    """"auto" splits the batch only with small hyperplanes, enough streams per thread (but in 1D)
    and no padded batch; a block per thread, never more blocks than streams; a bad schedule is
    refused."""
    monkeypatch.setattr(wfk, "numba", SimpleNamespace(get_num_threads=lambda: 2))
    line, small, big = wavefront((50,)).diag_off, wavefront((8, 8)).diag_off, wavefront((16, 16)).diag_off
    assert wfk.batch_blocks(1, 8, line, None) == 2  # 4 pairs: 2 per thread
    assert wfk.batch_blocks(1, 6, line, None) == 2  # 1D: a time step has no more items than streams
    assert wfk.batch_blocks(1, 1, line, None) == 1
    assert wfk.batch_blocks(4, 1, line, None) == 2  # 4 scans of one item
    assert wfk.batch_blocks(1, 16, small, None) == 2  # 4.3 cells per hyperplane
    assert wfk.batch_blocks(1, 6, small, None) == 0  # 2 groups of rows: fewer than 2 per thread
    assert wfk.batch_blocks(1, 16, big, None) == 0  # 8.3
    assert wfk.batch_blocks(1, 16, big, None, "batch") == 2
    assert wfk.batch_blocks(1, 2, line, None, "batch") == 1  # one stream: one block
    assert wfk.batch_blocks(1, 8, line, None, "planes") == 0
    items = live_items((3, 3), 8, ((3, 3),) * 8)
    assert wfk.batch_blocks(1, 8, line, items, "batch") == 0  # a padded batch: per hyperplane
    with pytest.raises(ValueError, match="schedule must be one of auto, planes, batch"):
        wfk.batch_blocks(1, 8, line, None, "fast")
    with wfk.schedule_as_batch(16):  # the memory probes at batch 1 and 2 of a batch-16 run
        assert wfk.batch_blocks(1, 1, small, None) == 1 and wfk.batch_blocks(1, 2, small, None) == 1
        assert wfk.batch_blocks(1, 2, big, None) == 0
    with wfk.schedule_as_batch(2):
        assert wfk.batch_blocks(1, 16, small, None) == 0
    assert wfk.batch_blocks(1, 1, small, None) == 0


def test_memory_probes_compile_the_full_batchs_sweeps(monkeypatch):
    """step_memory's probe steps at batch 1 and 2 run the sweeps of the run's batch (a batch-16
    8x8 run: blocks), so a first run does not compile the other schedule too."""
    from mdnumba.train import TrainConfig, step_memory
    monkeypatch.setattr(wfk, "numba", SimpleNamespace(get_num_threads=lambda: 2))
    seen = []
    real = wfk.batch_blocks
    monkeypatch.setattr(wfk, "batch_blocks", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    step_memory(TrainConfig(model="md", size=8, batch=16, hidden=4, dtype="float64"))
    assert seen and all(n >= 1 for n in seen), seen


def test_layer_with_state_same_under_both_schedules(rng, monkeypatch):
    """A bidirectional LSTM1D run from an initial state (the sweep over cells 1..T of the state
    layout, the saving-free sweep from plane 1), its gradients and final state: the same bits
    with the batch in blocks (the default for 2 threads) and with a prange per time step."""
    B, T, C, D, S = 6, 5, 2, 3, 2
    layer = LSTM1D(C, D, directions=S, cell="stable", dtype=np.float64, seed=4)
    x, dh = rng.standard_normal((B, T, C)), rng.standard_normal((B, T, S * D))
    state = (rng.standard_normal((B, S * D)), rng.standard_normal((B, S * D)))
    final_grad = (rng.standard_normal((B, S * D)), rng.standard_normal((B, S * D)))

    def run():
        y = layer.forward(x, state=state)
        final = layer.final_state()
        layer.zero_grad()
        dx = layer.backward(dh, final_state_grad=final_grad)
        return [y, *final, dx, *layer.initial_state_grad(), layer.grads.data.copy(),
                layer.forward(x, state=state, save=False), *layer.final_state()]

    monkeypatch.setattr(wfk, "numba", SimpleNamespace(get_num_threads=lambda: 2))  # any machine
    assert wfk.batch_blocks(S, B, wavefront((T + 2,)).diag_off[1:-1], None) == 2
    batched = run()
    monkeypatch.setattr(wfk, "BATCH_MAX_CELLS", -1)  # every sweep a prange per time step
    for a, b in zip(run(), batched):
        np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("cls,dims,B,S,C,padded,schedule", [
    (LSTM1D, (7,), 5, 2, 1, False, "batch"),
    (LSTM1D, (7,), 9, 1, 3, True, "planes"),
    (MDLSTM2D, (4, 5), 9, 4, 3, False, "planes"),
    (MDLSTM2D, (4, 5), 12, 1, 1, False, "batch"),  # tall pairs of groups
    (MDLSTM2D, (5, 4), 6, 4, 2, True, "planes"),
    (MDLSTM3D, (2, 3, 2), 3, 1, 2, False, "batch"),
])
def test_sweep_projects_the_inputs_itself(cls, dims, B, S, C, padded, schedule, rng):
    """``wavefront_forward(inputs=(xs, W, b))`` (each swept row gets ``act = b + xs @ W`` just
    before its recurrent products, as the layers do for fewer than 4 input channels) gives
    exactly the numbers of ``matmul_rows`` before the sweep, under either schedule and for a
    padded batch's items (the padding's rows untouched in both)."""
    D, dt = 8, np.float32
    layer = cls(C, D, directions=S, dtype=dt, seed=1)
    layer.params.data[:] = rng.uniform(-0.6, 0.6, layer.params.data.shape)
    wf = wavefront(dims)
    sizes = rng.integers(1, np.array(dims) + 1, (B, len(dims))).tolist() if padded else None
    sizes = sizes and tuple(map(tuple, sizes))  # hashable, as the layers pass them
    skew_src, _ = direction_tables(dims, B, S, sizes)
    live = np.flatnonzero(skew_src[0] >= 0) if padded else None
    items = live_items(dims, B, sizes) if padded else None
    x2 = rng.standard_normal((B * wf.n_cells, C)).astype(dt)  # dense rows; skewed below
    xs = np.concatenate([np.where(skew_src[q][:, None] >= 0, x2[skew_src[q]], 0) for q in range(S)])
    W, bias = layer._per_direction("W"), layer._per_direction("b")
    U, rows = layer.params["U"].reshape(S, D, -1), wf.n_cells * B
    out = []
    for fused in (False, True):
        act = np.zeros((S * rows, W.shape[2]), dt)
        h, c = np.zeros((S * rows, D), dt), np.zeros((S * rows, D), dt)
        for q in range(0 if fused else S):
            sl = slice(q * rows, (q + 1) * rows)
            matmul_rows(act[sl], xs[sl], W[q], bias[q], False, live)
        wfk.wavefront_forward(h, c, act, U, wf.diag_off, wf.parent, B, D, layer.cell_code, items=items,
                              schedule=schedule, inputs=(xs, W, bias) if fused else None)
        out.append((h, c, act))
    for name, a, b in zip("hca", *out):
        assert np.abs(a).max() > 0, name
        np.testing.assert_array_equal(b, a, err_msg=name)


@pytest.mark.parametrize("schedule", ["planes", "batch"])
def test_own_index_tables_share_the_layers_compiled_sweeps(schedule, rng, monkeypatch):
    """A caller's own (writable) index tables give the numbers of the layers' read-only ones and
    compile no second sweep (Numba keys a compiled sweep on whether each array is writable: 20-30 s
    per sweep and dtype)."""
    layer = MDLSTM2D(2, 6, directions=4, cell="stable", dtype=np.float64, seed=1)  # CASES[2]
    x = rng.standard_normal((3, 4, 5, 2))
    want = sweeps(layer, x, schedule)
    kernels = [getattr(wfk, f"_sweep_{k}{s}") for k in ("forward", "backward", "infer")
               for s in ("", "_batched")]
    compiled = [len(k.signatures) for k in kernels]
    wf = wavefront((4, 5))
    own = SimpleNamespace(**{k: np.array(getattr(wf, k)) for k in ("diag_off", "parent", "child")},
                          n_cells=wf.n_cells, max_diag_cells=wf.max_diag_cells, n_diagonals=wf.n_diagonals)
    monkeypatch.setattr(f"{__name__}.wavefront", lambda dims: own)
    tables = direction_tables
    monkeypatch.setattr(f"{__name__}.direction_tables", lambda *a: tuple(np.array(t) for t in tables(*a)))
    assert own.parent.flags.writeable
    got = sweeps(layer, x, schedule)
    for name, a, b in zip(["h", "c", "act", "dact", "dc", "dh", "out"], want, got):
        np.testing.assert_array_equal(b, a, err_msg=name)
    assert [len(k.signatures) for k in kernels] == compiled
