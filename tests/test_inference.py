"""``forward(x, save=False)``: the saving-free sweep of two hyperplanes at a time (inference)."""

import numpy as np
import pytest
from refcheck import reference_weights

import mdnumba
from mdnumba import LSTM1D, MDLSTM2D, MDLSTM3D, WavefrontLSTM, reference
from mdnumba.grid import direction_tables, wavefront
from mdnumba.layers import Linear
from mdnumba.models import build_model
from mdnumba.stack import BlockSubsample, Sequential, mdlstm_stack

CELLS = ["graves", "stable", "spatial"]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("ndim,shape,directions", [
    (2, (3, 4, 5, 2), 1), (2, (2, 3, 2, 1), 4), (2, (1, 1, 1, 1), 1), (3, (3, 2, 3, 2, 2), 8),
    (1, (5, 6, 2), 2), (4, (2, 2, 3, 1, 2, 1), 1)])
@pytest.mark.parametrize("hidden", [3, 7])
def test_matches_the_saving_forward_and_the_reference(cell, ndim, shape, directions, hidden, rng):
    """Odd and even batches, one-cell grids, every corner, N = 1..4: the same numbers as
    ``forward(x)`` (the same products in the same order) and as the float64 reference. Hidden
    7: gate rows of 7(N+3) columns, register tiles of 16 float64, the last one partial."""
    layer = WavefrontLSTM(ndim, shape[-1], hidden, seed=5, dtype=np.float64, cell=cell, directions=directions)
    layer.params.b[...] = rng.standard_normal(layer.params.b.shape)
    x = rng.standard_normal(shape)
    y = layer.forward(x, save=False)
    np.testing.assert_allclose(y, layer.forward(x), rtol=1e-14, atol=1e-15)
    yr, _ = reference.directions_forward(x, reference_weights(layer), cell)
    np.testing.assert_allclose(y, yr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("make,shape,sizes", [
    (lambda dt: LSTM1D(6, 8, dtype=dt, directions=2), (5, 7, 6), [7, 3, 7, 1, 5]),
    (lambda dt: MDLSTM2D(5, 16, dtype=dt), (3, 4, 3, 5), [[4, 3], [2, 2], [3, 1]]),
    # 8 rows or more: the tall tiles of 64-byte vectors (simd.TALL_TILES; none took this path)
    (lambda dt: LSTM1D(6, 8, dtype=dt, directions=2), (9, 7, 6), [7, 3, 7, 1, 5, 7, 2, 6, 7]),
    (lambda dt: MDLSTM2D(5, 16, dtype=dt), (9, 6, 6, 5),
     [[6, 6], [2, 3], [6, 1], [5, 6], [6, 6], [1, 1], [4, 4], [6, 2], [3, 5]])])
def test_register_tiles_give_the_saving_forward_bit_for_bit(make, shape, sizes, dtype, rng):
    """At least 4 input channels and whole gate panels: the saving-free sweep projects an item's
    rows with register tiles (arbitrary rows of x), the saving forward with matmul_rows' tiles
    over blocks of rows; in a padded batch only the items' rows are projected (rows without an
    input, which no layer sweeps: test_rows_without_an_input_get_the_bias). The same numbers, bit
    for bit, and those of the float64 reference."""
    layer = make(dtype)
    x = rng.standard_normal(shape).astype(dtype)
    for kw in ({}, {"sizes": sizes}):
        y = layer.forward(x, save=False, **kw)
        assert np.array_equal(y, layer.forward(x, **kw))
    yr, _ = reference.directions_forward(x.astype(np.float64), reference_weights(layer), "graves")
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(layer.forward(x, save=False), yr, rtol=tol, atol=tol)


@pytest.mark.parametrize("C,B,schedule", [
    (2, 5, "planes"),   # fewer than 4 channels: one pass per row (_few_inputs)
    (5, 5, "planes"),   # a group's rows with and without an input: these one at a time (_input_rows)
    (5, 2, "planes"),   # cells sharing tiles: their projections together (_cell_inputs)
    (2, 2, "batch"), (5, 5, "batch")])  # streams' projections tile by tile (_input_tiles)
def test_rows_without_an_input_get_the_bias(C, B, schedule, rng):
    """``wavefront_infer``'s ``src = -1`` is a zero input (``act = bias``, no output row): the
    layers never pass one (every swept row of theirs, a padded batch's items too, has an input),
    so only this direct call reaches those branches. The numbers of the sweep whose rows point at
    a row of zeros of x instead (an input read from x[-1], or the bias left out, would change the
    outputs of their children)."""
    from mdnumba.kernels.wavefront import wavefront_infer
    dims, S, D = (3, 4), 4, 6
    layer = MDLSTM2D(C, D, directions=S, seed=2, dtype=np.float64)
    layer.params.data[...] += rng.standard_normal(layer.params.data.shape) * 0.3
    wf = wavefront(dims)
    src, _ = direction_tables(dims, B, S)
    n = B * wf.n_cells
    x = np.concatenate([np.zeros((1, C)), rng.standard_normal((n, C))])  # row 0: zeros (not x[-1])
    hole = rng.random(src.shape) < 0.3
    slots = 2 * wf.max_diag_cells
    outs = []
    for rows in (np.where(hole, -1, src + 1), np.where(hole, 0, src + 1)):
        out = np.full((n + 1, S, D), np.nan)
        h, c, act = (np.zeros((S * slots * B, k)) for k in (D, D, (2 + 3) * D))
        wavefront_infer(out, h, c, act, np.empty((slots, 2), wf.parent.dtype), x, rows.astype(src.dtype),
                        layer._per_direction("W"), layer._per_direction("b"),
                        layer.params["U"].reshape(S, D, -1), wf.diag_off, wf.parent, 0, wf.n_diagonals,
                        B, D, layer.cell_code, schedule=schedule)
        outs.append(out[1:])
    written = ~np.isnan(outs[1])
    assert hole.any() and written.any() and not written.all()
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-14, atol=1e-15)


def test_float32_matches_the_saving_forward(rng):
    layer = MDLSTM2D(3, 8, directions=4, cell="stable", seed=1)
    x = rng.standard_normal((3, 9, 6, 3)).astype(np.float32)
    y = layer.forward(x, save=False)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, layer.forward(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("T", [1, 2, 7])
def test_1d_state_and_final_state(directions, T, rng):
    """From a given state, with the final state handed on: equal to the saving forward's."""
    layer = LSTM1D(2, 4, directions=directions, dtype=np.float64, seed=3)
    x = rng.standard_normal((3, T, 2))
    state = tuple(rng.standard_normal((3, 4 * directions)) for _ in range(2))
    for st in (state, None):
        y = layer.forward(x, state=st)
        final = layer.final_state()
        np.testing.assert_allclose(layer.forward(x, state=st, save=False), y, rtol=1e-14, atol=1e-15)
        for a, b in zip(layer.final_state(), final):
            np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)


def test_1d_streaming_in_chunks_is_one_sequence(rng):
    layer = LSTM1D(2, 5, seed=2, dtype=np.float64)
    x = rng.standard_normal((2, 12, 2))
    whole = layer.forward(x, save=False)
    state, parts = layer.zero_state(2), []
    for lo in range(0, 12, 5):
        parts.append(layer.forward(x[:, lo:lo + 5], state=state, save=False))
        state = layer.final_state()
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, rtol=1e-13, atol=1e-14)


def test_buffers_grow_with_the_largest_hyperplane_not_the_grid(rng):
    """8x8 and 8x64 grids have hyperplanes of at most 8 cells: the same buffers; the saving
    forward's grow with the grid (8x more)."""
    sizes = {}
    for width in (8, 64):
        x = rng.random((2, 8, width, 1), dtype=np.float32)
        layer = MDLSTM2D(1, 4)
        layer.forward(x, save=False)
        assert layer.saved_bytes() == 0
        sizes[width] = layer.workspace_bytes()
        layer.forward(x)
        sizes[width, "saved"] = layer.workspace_bytes() - sizes[width]
    assert sizes[8] == sizes[64] > 0
    assert sizes[64, "saved"] > 7 * sizes[8, "saved"] > 7 * sizes[8]


def test_backward_after_it_is_refused_and_training_is_unharmed(rng):
    layer = MDLSTM3D(2, 3, seed=1, dtype=np.float64)
    x, x2 = rng.standard_normal((2, 3, 2, 4, 2)), rng.standard_normal((1, 5, 5, 5, 2))
    dh = rng.standard_normal((2, 3, 2, 4, 3))
    layer.forward(x)
    dx = layer.backward(dh)
    grads = layer.grads.data.copy()
    layer.forward(x2, save=False)
    assert layer.saved_bytes() == 0
    with pytest.raises(RuntimeError, match=r"save=True; the last forward\(x, save=False\) kept none"):
        layer.backward(dh)
    np.testing.assert_array_equal(layer.grads.data, grads)  # nothing added
    layer.zero_grad()
    layer.forward(x)  # a saving forward between inference calls: backward as before
    np.testing.assert_array_equal(layer.backward(dh), dx)
    np.testing.assert_array_equal(layer.grads.data, grads)


@pytest.mark.parametrize("save", [False, True])
def test_an_overflowed_state_in_the_output_is_named(save, rng):
    """Forget gates near 1 on a large grid: the graves cell's state overflows and h holds NaN;
    forward says so (not the next stage, which would blame its input)."""
    layer = MDLSTM2D(1, 4, forget_bias=10.0)
    with pytest.raises(mdnumba.NonFiniteError, match="state overflowed in forward: .* output h are NaN"):
        layer.forward(rng.standard_normal((1, 200, 200, 1)).astype(np.float32), save=save)


def test_save_is_a_keyword_and_a_bool():
    layer, x = MDLSTM2D(1, 2), np.ones((1, 2, 2, 1))
    for stage in (layer, Linear(1, 2), Sequential(layer), BlockSubsample(1)):
        for flag in ("no", 0):  # an int is no bool either: save=0 must not mean False
            with pytest.raises(TypeError, match=f"save must be True or False, got {flag!r}"):
                stage.forward(x, save=flag)
        with pytest.raises(TypeError, match="positional"):
            stage.forward(x, False)


def test_input_grad_and_tied_are_bools():
    """``input_grad="no"`` must not mean True (it returned dL/dx), nor ``tied="no"``."""
    from mdnumba import GridLSTM2D
    from mdnumba.models import build_model
    x = np.ones((1, 2, 2, 1), np.float32)
    grid = GridLSTM2D(2, 2)
    for stage, inp in ((MDLSTM2D(1, 2), x), (Linear(1, 2), x), (Sequential(MDLSTM2D(1, 2)), x),
                       (BlockSubsample(1), x), (build_model("md", hidden=2), x), (grid, np.ones((1, 3, 2)))):
        y = stage.forward(inp)
        for flag in ("no", 0):
            with pytest.raises(TypeError, match=f"input_grad must be True or False, got {flag!r}"):
                stage.backward(np.ones_like(y), input_grad=flag)
    with pytest.raises(TypeError, match="tied must be True or False, got 'no'"):
        GridLSTM2D(2, 2, tied="no")


def test_refusals_and_the_state_api(rng):
    layer = LSTM1D(2, 3)
    with pytest.raises(ValueError, match="x must"):
        layer.forward(np.ones((2, 3)), save=False)
    with pytest.raises(TypeError, match="state must be a pair .* got 1 item$"):
        layer.forward(np.ones((2, 3, 2)), state=(np.ones((2, 3)),), save=False)
    layer.forward(np.ones((2, 3, 2), np.float32), save=False)
    assert [a.shape for a in layer.final_state()] == [(2, 3), (2, 3)]
    with pytest.raises(RuntimeError, match="no initial-state gradient"):
        layer.initial_state_grad()
    with pytest.raises(RuntimeError, match="save=True"):
        layer.backward(np.ones((2, 3, 3)), final_state_grad=layer.zero_state(2))


def test_models_and_stacks(rng):
    """Models and stacks pass ``save`` to their stages (a stage of the user's without it is
    called as before) and refuse backward before any stage adds a gradient."""
    model = build_model("md", hidden=4, layers=2, directions=4, seed=1, dtype=np.float64)
    x = rng.random((2, 6, 6, 1))
    logits = model.forward(x)
    np.testing.assert_allclose(model.forward(x, save=False), logits, rtol=1e-14, atol=1e-15)
    model.zero_grad()
    with pytest.raises(RuntimeError, match="save=False"):
        model.backward(np.ones_like(logits))
    assert not any(layer.grads.data.any() for layer in model.layers)

    class Scale:  # no save parameter
        def forward(self, x):
            return 2 * x

        def backward(self, dy, input_grad=True):
            return 2 * dy

    class Keywords(Scale):  # takes it through **kwargs
        def forward(self, x, **kw):
            self.kw = kw
            return 2 * x

    kw = Keywords()
    Sequential(kw).forward(x, save=False)
    assert kw.kw == {"save": False}

    net = Sequential(mdlstm_stack(2, 1, 3, layers=2, subsample=2, seed=2), Scale(), BlockSubsample(1),
                     Linear(3, 2))
    y = net.forward(x)
    np.testing.assert_array_equal(net.forward(x, save=False), y)
    with pytest.raises(RuntimeError, match="save=False"):
        net.backward(np.ones_like(y))
    net.forward(x)
    assert net.backward(np.ones_like(y)).shape == x.shape
    lin = Linear(3, 2)
    lin.forward(np.ones((4, 3)), save=False)
    with pytest.raises(RuntimeError, match="save=False"):
        lin.backward(np.ones((4, 2)))


@pytest.mark.parametrize("tied", [True, False])
def test_grid_lstm_without_saving(tied, rng):
    """``GridLSTM2D.forward(x, save=False)`` (``grid_infer``: the same blocks in buffers of two
    anti-diagonals) equals ``forward(x)`` bit for bit and the float64 reference, with time longer
    and shorter than the depth, and at hidden 17 with register tiles (batch 9: a tall one); backward
    is then refused."""
    from mdnumba.layers import GridLSTM2D
    for B, T, L, D in ((3, 5, 3, 3), (2, 1, 4, 3), (1, 6, 1, 3), (4, 3, 3, 3), (5, 3, 2, 17), (9, 2, 2, 17)):
        layer = GridLSTM2D(D, L, seed=1, dtype=np.float64, tied=tied)
        for name in ("b_time", "b_depth"):  # biases that differ per level and gate
            layer.params[name] = rng.standard_normal(layer.params[name].shape)
        x = rng.standard_normal((B, T, D))
        y = layer.forward(x)
        got = layer.forward(x, save=False)
        np.testing.assert_array_equal(got, y)
        p = {k: np.asarray(v) for k, v in layer.params.items()}
        want, _ = reference.gridlstm_forward(x, p["U_time"], p["U_depth"], p["b_time"], p["b_depth"], L)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
        assert layer.saved_bytes() == 0
        with pytest.raises(RuntimeError, match="save=False"):
            layer.backward(np.ones_like(y))


def test_grid_lstm_without_saving_holds_two_diagonals():
    """Beyond its output (and the time-major copies of input and output, each x's size) the
    saving-free Grid LSTM forward allocates the same at T = 16 and T = 256: two anti-diagonals
    of at most ``depth`` blocks, not T x depth."""
    import tracemalloc

    from mdnumba.layers import GridLSTM2D
    layer, extra = GridLSTM2D(8, 2, dtype=np.float32), {}
    for T in (16, 256):
        x = np.ones((4, T, 8), np.float32)
        layer.forward(x, save=False)  # compiled, tables cached
        tracemalloc.start()
        layer.forward(x, save=False)
        extra[T] = tracemalloc.get_traced_memory()[1] - 3 * x.nbytes
        tracemalloc.stop()
    assert 0 < extra[256] <= extra[16] + 512, extra
