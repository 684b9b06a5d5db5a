"""Padded batches: ``forward(x, sizes=...)`` gives every item what it alone would give."""

import numpy as np
import pytest
from gradcheck import assert_grad_close, numeric_grad

from mdnumba import LSTM1D, MDLSTM2D, MDLSTM3D, WavefrontLSTM, pad_batch, unpad_batch
from mdnumba.grid import ROWS, direction_tables, live_items, padding_edge, wavefront
from mdnumba.kernels.wavefront import wavefront_backward, wavefront_forward, weight_operands

CASES = [  # (layer, padded grid, the items' sizes)
    (lambda: LSTM1D(2, 3, directions=2, seed=1, dtype=np.float64), (6,), [(6,), (2,), (4,)]),
    (lambda: MDLSTM2D(2, 3, directions=4, seed=1, dtype=np.float64, cell="stable"), (4, 5),
     [(3, 5), (4, 2), (1, 1)]),
    (lambda: MDLSTM2D(2, 3, seed=1, dtype=np.float64), (3, 4), [(3, 4), (2, 3)]),
    (lambda: MDLSTM3D(2, 2, directions=8, seed=1, dtype=np.float64), (3, 2, 3), [(2, 2, 3), (3, 1, 2)]),
]
#: register tiles: the padded backward's pulls chunk by chunk over blocks of items (panels of 288
#: steps), the weight gradients' rows (288 columns) packed from the items' rows
TILED = (lambda: LSTM1D(2, 72, directions=2, seed=1, dtype=np.float64), (5,), [(5,), (2,), (4,), (1,), (3,)])
#: shared tiles at batch 2 (two cells' rows in one tile), input projections too (5 channels)
SHARED = (lambda: MDLSTM2D(5, 6, directions=4, seed=1, dtype=np.float64), (6, 7), [(6, 7), (3, 5)])


def padded_batch(dims, sizes, rng, fill=7.0, channels=2):
    """Items (1, *size, channels) of the given sizes, and the batch (``pad_batch``) that holds them
    padded to ``dims`` with ``fill``."""
    items = [rng.standard_normal((1,) + tuple(sz) + (channels,)) for sz in sizes]
    x, got = pad_batch([item[0] for item in items], shape=dims, fill=fill)
    np.testing.assert_array_equal(got, sizes)
    return items, x


def box(b, size):
    return (b,) + tuple(slice(0, n) for n in size)


@pytest.mark.parametrize("make,dims,sizes", CASES + [TILED, SHARED])
def test_each_item_as_if_alone(make, dims, sizes, rng):
    """Outputs, dx and gradients of a padded batch equal those of its items run one by one; the
    output's and dx's padding is zero, dh's is ignored, x's is never read; save=False agrees."""
    layer = make()
    items, x = padded_batch(dims, sizes, rng, channels=layer.in_channels)
    y = layer.forward(x, sizes=sizes)
    dh = rng.standard_normal(y.shape)
    layer.zero_grad()
    dx = layer.backward(dh)
    grads = layer.grads.data.copy()
    np.testing.assert_array_equal(layer.forward(x, save=False, sizes=sizes), y)
    want_grads = np.zeros_like(grads)
    for b, (item, size) in enumerate(zip(items, sizes)):
        np.testing.assert_array_equal(y[box(b, size)], layer.forward(item)[0])
        layer.zero_grad()
        np.testing.assert_allclose(dx[box(b, size)], layer.backward(dh[box(b, size)][None])[0],
                                   rtol=1e-12, atol=1e-14)
        want_grads += layer.grads.data
        pad = np.ones(y.shape[1:-1], bool)
        pad[box(0, size)[1:]] = False
        assert not y[b][pad].any() and not dx[b][pad].any()
    np.testing.assert_allclose(grads, want_grads, rtol=1e-12, atol=1e-14)
    x2, dh2 = x.copy(), dh.copy()
    for b, size in enumerate(sizes):  # other padding: the same results
        keep_x, keep_dh = x2[box(b, size)].copy(), dh2[box(b, size)].copy()
        x2[b], dh2[b] = -3.0, 1e3
        x2[box(b, size)], dh2[box(b, size)] = keep_x, keep_dh
    np.testing.assert_array_equal(layer.forward(x2, sizes=sizes), y)
    layer.zero_grad()
    np.testing.assert_array_equal(layer.backward(dh2), dx)
    np.testing.assert_array_equal(layer.grads.data, grads)


@pytest.mark.parametrize("make,dims,sizes", CASES)
def test_workspaces_made_full_of_nan_change_nothing(make, dims, sizes, rng, monkeypatch):
    """A padded batch computes only its items' rows (input projection, sweeps, gathers, GEMMs):
    with every workspace made full of NaN (but those the layer asks to be zeroed) outputs, dx
    and gradients are those of the usual run."""
    items, x = padded_batch(dims, sizes, rng)
    results = []
    for poison in (False, True):
        if poison:
            def workspace(self, name, shape, zeroed=False):
                buf = self._work.get(name)
                if buf is None or buf.shape != tuple(shape):
                    buf = self._work[name] = np.full(shape, 0.0 if zeroed else np.nan, self.dtype)
                return buf
            monkeypatch.setattr(WavefrontLSTM, "_workspace", workspace)
        layer = make()
        y = layer.forward(x, sizes=sizes)
        layer.zero_grad()
        results.append((y, layer.backward(np.cos(y)), layer.grads.data.copy()))
    for usual, poisoned in zip(*results):
        np.testing.assert_array_equal(poisoned, usual)


def test_pad_batch_and_unpad_batch(rng):
    """``pad_batch`` stacks items of different sizes at the start of every axis (default grid:
    the largest per axis) and ``unpad_batch`` gives each item's part of a layer's output."""
    items = [rng.standard_normal(s + (2,)).astype(np.float32) for s in ((3, 5), (4, 2), (1, 1))]
    x, sizes = pad_batch(items)
    assert x.shape == (3, 4, 5, 2) and x.dtype == np.float32 and sizes.tolist() == [[3, 5], [4, 2], [1, 1]]
    assert (x[1, :, 2:] == 0).all() and (x[2, 1:] == 0).all()
    assert all(np.array_equal(a, b) for a, b in zip(unpad_batch(x, sizes), items))
    layer = MDLSTM2D(2, 3, directions=4, seed=2)
    for item, out in zip(items, unpad_batch(layer.forward(x, sizes=sizes), sizes)):
        np.testing.assert_array_equal(out, layer.forward(item[None])[0])
    lines = [rng.standard_normal((n, 1)) for n in (4, 6)]  # 1D: lengths (B,) for unpad_batch too
    x, _ = pad_batch(lines, shape=(8,))
    y = LSTM1D(1, 2, directions=2).forward(x, sizes=[4, 6])
    assert [a.shape for a in unpad_batch(y, [4, 6])] == [(4, 4), (6, 4)]
    assert [a.shape for a in unpad_batch(y, None)] == [(8, 4)] * 2


@pytest.mark.parametrize("items,kw,error,match", [
    ([], {}, ValueError, "at least one item"),
    (np.ones((2, 3, 1)), {}, TypeError, "list or tuple of arrays"),
    ([np.ones((2, 2)), np.ones((2, 3))], {}, ValueError, r"items\[1\] \(2, 3\)"),
    ([np.ones((2, 2, 1)), np.ones((2, 1))], {}, ValueError, "one N >= 1"),
    ([np.ones(3)], {}, ValueError, "one N >= 1"),
    ([np.ones((3, 5, 1))], dict(shape=(2, 5)), ValueError, r"give at least \(3, 5\)"),
    ([np.ones((3, 5, 1))], dict(shape=(4,)), ValueError, "shape must be 2 integers"),
    ([np.ones((3, 5, 1))], dict(shape=(4.5, 5)), TypeError, "shape must be 2 integers"),
    ([np.ones((3, 5, 1))], dict(shape=(True, 5)), TypeError, "shape must be 2 integers"),
    ([np.array([["a"]])], {}, TypeError, "^items must hold numbers \\(or bools\\), got dtype <U1$"),
    ([np.ones((3, 1))], dict(fill=np.nan), ValueError, "fill must be a finite number"),
    ([np.ones((3, 1), np.float32)], dict(fill=1e300), ValueError, "dtype float32 holds"),  # inf there
    ([np.ones((3, 1), np.float32)], dict(fill=10 ** 400), ValueError, "dtype float32 holds"),
    ([np.ones((3, 1), np.uint8)], dict(fill=-1), ValueError, "dtype uint8 holds"),  # 255 there
    ([np.ones((3, 1))], dict(fill=True), TypeError, r"a number \(a bool: boolean items only\)"),
    ([np.ones((3, 1))], dict(fill="x"), TypeError, "fill must be a number, got 'x'")])  # as elsewhere
def test_pad_batch_refusals(items, kw, error, match):
    with pytest.raises(error, match=match):
        pad_batch(items, **kw)


def test_full_sizes_are_no_sizes(rng):
    """Items that all fill the grid take the usual tables (no padding: the final state is there, as
    it is not after a padded forward); 1D takes lengths (B,)."""
    layer = LSTM1D(2, 3, directions=2, seed=1, dtype=np.float64)
    x = rng.standard_normal((3, 5, 2))
    np.testing.assert_array_equal(layer.forward(x, sizes=[5, 5, 5]), layer.forward(x))
    for save in (True, False):
        layer.forward(x, sizes=[5, 5, 5], save=save)
        layer.final_state()
    np.testing.assert_array_equal(layer.forward(x, sizes=np.array([[5], [2], [3]])),
                                  layer.forward(x, sizes=(5, 2, 3)))
    skew, unskew = direction_tables((5,), 3, 2, ((5,), (2,), (3,)))
    assert (skew == -1).sum() == (unskew == -1).sum() == 2 * (3 + 2)  # the padded cells, per direction


@pytest.mark.parametrize("sizes,error,match", [
    ([[3, 4]], ValueError, r"shape \(batch, 2\) = \(2, 2\)"),
    ([[3, 4], [0, 2]], ValueError, r"sizes\[1\] = \(0, 2\) must lie between 1 and the padded grid \(3, 4\)"),
    ([[3, 5], [1, 1]], ValueError, r"sizes\[0\] = \(3, 5\)"),
    ([[3.0, 4.0], [1, 1]], TypeError, "must be integers"),
    ([[True, True], [True, True]], TypeError, "must be integers"),
    ([[True, 4], [3, 4]], TypeError, "not bools"),
    ([[3, 4], [2]], ValueError, "one row per item of equal length"),
    ([], ValueError, "got none"),
])
def test_bad_sizes_are_refused(sizes, error, match):
    layer = MDLSTM2D(1, 2)
    with pytest.raises(error, match=match):
        layer.forward(np.zeros((2, 3, 4, 1), np.float32), sizes=sizes)


def test_lengths_of_another_batch_are_refused_as_given():
    """1D lengths (batch,): the error shows the shape given, not the (n, 1) it is read as."""
    with pytest.raises(ValueError, match=r"= \(2, 1\) or \(batch,\) = \(2,\) lengths: .*; got \(1,\)$"):
        LSTM1D(1, 2).forward(np.ones((2, 4, 1), np.float32), sizes=[3])


def test_sizes_with_a_state_and_final_state_are_refused(rng):
    layer = LSTM1D(2, 3, seed=1)
    x = rng.standard_normal((2, 4, 2))
    for sizes in ([4, 2], [4, 4]):  # also sizes that fill the grid
        with pytest.raises(ValueError, match="sizes= cannot be combined with state="):
            layer.forward(x, state=layer.zero_state(2), sizes=sizes)
    for save in (True, False):
        layer.forward(x, save=save, sizes=[4, 2])
        with pytest.raises(RuntimeError, match="final_state.. is not defined after forward.x, sizes"):
            layer.final_state()


def test_stacks_pass_sizes_through_the_blocks(rng):
    """A Sequential of 4-direction layers with 2x2 blocks between them gives each padded item
    what the stack gives it alone, with and without saving; BlockSubsample divides the sizes
    (rounding up); a stage that takes no sizes (Linear) keeps them for the next."""
    from mdnumba.layers import Linear
    from mdnumba.stack import BlockSubsample, Sequential, mdlstm_stack
    stack = mdlstm_stack(2, 2, 2, layers=2, directions=4, subsample=2, seed=3, dtype=np.float64)
    net = Sequential(stack, Linear(8, 3, dtype=np.float64))
    sizes = [(4, 6), (2, 4), (4, 2)]
    items, x = padded_batch((4, 6), sizes, rng)
    y = net.forward(x, sizes=sizes)
    np.testing.assert_array_equal(net.forward(x, save=False, sizes=sizes), y)
    for b, (item, (h, w)) in enumerate(zip(items, sizes)):
        np.testing.assert_array_equal(y[b, :h // 2, :w // 2], net.forward(item)[0])
    np.testing.assert_array_equal(BlockSubsample(2).out_sizes([[5, 4], [1, 2]]), [[3, 2], [1, 1]])


def test_nested_stacks_divide_the_sizes(rng):
    """A stack inside a Sequential divides the sizes for the stages after it (Sequential.out_sizes)."""
    from mdnumba.stack import Sequential, mdlstm_stack
    stack = mdlstm_stack(2, 2, 2, layers=2, directions=4, subsample=2, seed=3, dtype=np.float64)
    top = MDLSTM2D(8, 2, directions=4, seed=5, dtype=np.float64)
    sizes = [(4, 6), (2, 2)]
    _, x = padded_batch((4, 6), sizes, rng)
    flat = Sequential(*stack.stages, top).forward(x, sizes=sizes)
    np.testing.assert_array_equal(Sequential(stack, top).forward(x, sizes=sizes), flat)
    assert not flat[1, 1:].any() and not flat[1, :, 1:].any()  # item 1 is one cell after the blocks
    np.testing.assert_array_equal(stack.out_sizes(sizes), [[2, 3], [1, 1]])


@pytest.mark.parametrize("dims,B", [((4, 5), 5), ((3, 2, 3), 3), ((7,), 4)])
def test_live_items_are_the_items_cells_each_once(dims, B, rng):
    """``live_items``: every row of an item's cell exactly once, in row order, on its hyperplane;
    a group of up to ROWS rows only on consecutive items that all have the cell."""
    sizes = tuple(tuple(int(rng.integers(1, n + 1)) for n in dims) for _ in range(B))
    offsets, items = live_items(dims, B, sizes)
    wf = wavefront(dims)
    coords = np.indices(dims).reshape(len(dims), -1)[:, wf.perm]
    rows = []
    for k in range(wf.n_diagonals):
        for e in items[offsets[k]:offsets[k + 1]].tolist():
            s, b, nb = e // ROWS // B, e // ROWS % B, e % ROWS + 1
            assert wf.diag_off[k] <= s < wf.diag_off[k + 1] and b + nb <= B
            rows += [s * B + b + i for i in range(nb)]
    assert rows == [s * B + b for s in range(wf.n_cells) for b in range(B) if (coords[:, s] < sizes[b]).all()]
    assert len(items) < len(rows)  # cell 0 belongs to every item: groups are formed


@pytest.mark.parametrize("dims,B", [((4, 5), 5), ((3, 2, 3), 3), ((7,), 4)])
def test_padding_edge_is_the_padding_with_a_parent_in_the_item(dims, B, rng):
    """``padding_edge``: exactly the rows outside their item with a parent inside it (what the
    backward sweep of the item's cells pulls from), ascending."""
    sizes = tuple(tuple(int(rng.integers(1, n + 1)) for n in dims) for _ in range(B))
    wf = wavefront(dims)
    coords = np.indices(dims).reshape(len(dims), -1)[:, wf.perm]
    live = np.array([[(coords[:, s] < sizes[b]).all() for b in range(B)] for s in range(wf.n_cells)])
    want = [s * B + b for s in range(wf.n_cells) for b in range(B)
            if not live[s, b] and any(p >= 0 and live[p, b] for p in wf.parent[s])]
    got = padding_edge(dims, B, sizes)
    assert got.tolist() == want and not got.flags.writeable
    assert padding_edge(dims, B, (dims,) * B).size == 0


def test_the_sweeps_skip_the_padding(rng):
    """With live items the CPU sweeps leave the padding's rows as they are (not computed), and
    the items' rows equal those of a sweep over every row whose padding holds zeros; so does
    the gather of the weight gradients' operands."""
    dims, B, D, sizes = (4, 5), 3, 2, ((4, 5), (2, 3), (1, 4))
    wf, G = wavefront(dims), 5 * D
    items = live_items(dims, B, sizes)
    live = np.zeros(wf.n_cells * B, bool)
    live[direction_tables(dims, B, 1, sizes)[0][0] >= 0] = True
    U, act0 = rng.uniform(-0.5, 0.5, (1, D, 2 * G)), rng.standard_normal((wf.n_cells * B, G))
    h, c, act = np.zeros((wf.n_cells * B, D)), np.zeros((wf.n_cells * B, D)), act0.copy()
    wavefront_forward(h, c, act, U, wf.diag_off, wf.parent, B, D, 0)
    h2, c2, act2 = np.full_like(h, 7.0), np.full_like(c, 7.0), act0.copy()
    wavefront_forward(h2, c2, act2, U, wf.diag_off, wf.parent, B, D, 0, items=items)
    np.testing.assert_array_equal(h2[live], h[live])
    assert (h2[~live] == 7.0).all() and (c2[~live] == 7.0).all() and (act2[~live] == act0[~live]).all()
    h[~live], c[~live] = 0.0, 0.0
    dh = np.where(live[:, None], np.cos(3 * h), 0.0)
    grads = []
    for kw in ({}, dict(items=items)):
        dact, dc = np.zeros_like(act), np.zeros_like(c)
        wavefront_backward(dact, dc, dh.copy(), act, c, U, wf.diag_off, wf.parent, wf.child, B, D, 0, **kw)
        grads.append(dact)
    np.testing.assert_array_equal(grads[1], grads[0])
    assert grads[0][live].any()
    xs = rng.standard_normal((len(h), 3))
    z, z2 = np.zeros((len(h), 3 + 2 * D + 1)), np.full((len(h), 3 + 2 * D + 1), 7.0)
    weight_operands(z, xs, h, wf.parent, B, D)
    weight_operands(z2, xs, h, wf.parent, B, D, np.flatnonzero(live))  # the items' rows only
    np.testing.assert_array_equal(z2[live], z[live])
    assert (z2[~live] == 7.0).all() and z[live, 3:-1].any()


def test_an_overflow_in_the_padding_does_not_stop_backward(rng):
    """The padding's cells, which no item reads, could overflow (graves cell, forget gates summing
    to 2, a long stretch of padding) if they were swept: the sweep skips them and the saving
    forward zeroes their state, so backward runs and gives the items' own gradients."""
    n = 70
    layer = MDLSTM2D(1, 2, cell="graves", forget_bias=8.0, dtype=np.float32)
    sizes = [(n, 1), (1, n)]
    items, x = padded_batch((n, n), sizes, rng)
    items = [it[..., :1].astype(np.float32) for it in items]
    x = x[..., :1].astype(np.float32)
    y = layer.forward(x, sizes=sizes)
    layer.zero_grad()
    layer.backward(np.ones_like(y), input_grad=False)
    grads, want = layer.grads.data.copy(), np.zeros_like(layer.grads.data)
    for item in items:
        layer.zero_grad()
        layer.backward(np.ones_like(layer.forward(item)), input_grad=False)
        want += layer.grads.data
    np.testing.assert_allclose(grads, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sizes,error,match", [
    ([[True, True], [4, 4]], TypeError, "not bools"), ([[-3, 4], [4, 4]], ValueError, "got -3"),
    ([[4.0, 4.0], [4, 4]], TypeError, "got dtype float64")])
def test_a_stack_checks_the_sizes_before_its_blocks_divide_them(sizes, error, match):
    from mdnumba.stack import BlockSubsample, Sequential
    net = Sequential(BlockSubsample(2), MDLSTM2D(4, 2))
    with pytest.raises(error, match=match):
        net.forward(np.zeros((2, 4, 4, 1), np.float32), sizes=sizes)


@pytest.mark.parametrize("make,dims,sizes", CASES + [
    (lambda: LSTM1D(2, 2, directions=2, seed=1, dtype=np.float64, cell="spatial"), (5,), [(2,), (5,), (3,)]),
    (lambda: MDLSTM2D(2, 2, directions=4, seed=1, dtype=np.float64, cell="spatial"), (3, 3),
     [(3, 2), (1, 3), (2, 2)]),
    # hidden 5, an odd batch: the four-unit products of single rows
    (lambda: MDLSTM2D(2, 5, seed=1, dtype=np.float64), (3, 3), [(2, 3), (3, 3), (3, 1)]),
    (lambda: MDLSTM3D(2, 2, directions=8, seed=1, dtype=np.float64, cell="stable"), (2, 2, 2),
     [(2, 1, 2), (1, 2, 1)]),
    (lambda: WavefrontLSTM(4, 2, 2, seed=1, dtype=np.float64, cell="stable"), (2, 2, 1, 2),
     [(2, 1, 1, 2), (1, 2, 1, 1)])])
def test_padded_batch_finite_differences(make, dims, sizes, rng):
    """dL/dx and every gradient of a padded batch against central differences (the live-row
    sweeps, gathers and GEMMs): dx is 0 on the padding, which the output ignores. The layer
    first runs the whole grid once, so that the workspaces' padding rows hold that run's values,
    not the zeros of new buffers."""
    layer = make()
    layer.params.data[...] += rng.standard_normal(layer.params.data.shape) * 0.3
    _, x = padded_batch(dims, sizes, rng)
    y = layer.forward(x)
    layer.backward(np.cos(y))
    w = rng.standard_normal(y.shape)

    def loss():
        return float(np.sum(w * layer.forward(x, sizes=sizes)))

    layer.forward(x, sizes=sizes)
    layer.zero_grad()
    dx = layer.backward(w)
    assert_grad_close(dx, numeric_grad(loss, x), name="dx")
    for name in layer.layout.shapes:
        assert_grad_close(layer.grads[name], numeric_grad(loss, layer.params[name]), name=name)


def test_stack_with_blocks_and_sizes_finite_differences(rng):
    """Backward of a padded batch through a stack (4-direction layers, 2x2 blocks, a Linear that
    takes no sizes), with items whose sides the block does not divide, against central
    differences: the first layer ignores dL/dh on its padding, where its output is 0."""
    from mdnumba.layers import Linear
    from mdnumba.stack import Sequential, mdlstm_stack
    stack = mdlstm_stack(2, 2, 2, layers=2, directions=4, subsample=2, seed=3, dtype=np.float64)
    net = Sequential(stack, Linear(8, 2, dtype=np.float64))
    for layer in net.layers:
        layer.params.data[...] += rng.standard_normal(layer.params.data.shape) * 0.3
    sizes = [(4, 4), (3, 1), (2, 3)]
    _, x = padded_batch((4, 4), sizes, rng)
    w = rng.standard_normal(net.forward(x, sizes=sizes).shape)

    def loss():
        return float(np.sum(w * net.forward(x, sizes=sizes)))

    net.zero_grad()
    net.forward(x, sizes=sizes)
    assert_grad_close(net.backward(w), numeric_grad(loss, x), name="dx")
    for k, layer in enumerate(net.layers):
        assert_grad_close(layer.grads.data, numeric_grad(loss, layer.params.data), name=f"layer {k}")


def test_pad_batch_fills_with_fill_in_the_items_common_dtype():
    """The padding holds ``fill`` (a stack that starts with a BlockSubsample reads it), and
    float32 and float64 items make a float64 batch (not the first item's float32, which would
    round the other item)."""
    a, b = np.full((1, 2, 1), 0.5, np.float32), np.full((2, 1, 1), 0.1, np.float64)
    x, sizes = pad_batch([a, b], fill=-2.0)
    assert x.dtype == np.float64 and sizes.tolist() == [[1, 2], [2, 1]]
    np.testing.assert_array_equal(x[..., 0], [[[0.5, 0.5], [-2.0, -2.0]], [[0.1, -2.0], [0.1, -2.0]]])
