"""Stable and spatial cells, several scan directions and the 3D layer vs the reference and FD."""

import numpy as np
import pytest
from gradcheck import check_layer_gradients
from refcheck import check_against_reference

from mdnumba import LSTM1D, MDLSTM2D, MDLSTM3D, WavefrontLSTM
from mdnumba.grid import direction_tables, state_tables, wavefront
from mdnumba.kernels.wavefront import skew_rows, unskew_rows

CELLS = ["graves", "stable", "spatial"]


def make(ndim, C, D, **kw):
    if ndim not in (1, 2, 3):  # N >= 4: the engine itself
        return WavefrontLSTM(ndim, C, D, **kw)
    cls = {1: LSTM1D, 2: MDLSTM2D, 3: MDLSTM3D}[ndim]
    return cls(C, D, **kw)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("ndim,shape,directions", [
    (2, (2, 3, 4, 2), 1), (2, (2, 3, 2, 1), 4), (3, (2, 2, 3, 2, 2), 1), (3, (1, 2, 2, 2, 1), 8),
    (1, (2, 5, 2), 2), (4, (3, 2, 1, 2, 2, 1), 1), (4, (2, 2, 2, 2, 2, 1), 1), (4, (1, 2, 2, 2, 2, 1), 16)])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_match_reference(cell, ndim, shape, directions, dtype, rtol, rng):
    layer = make(ndim, shape[-1], 3, seed=5, dtype=dtype, cell=cell, directions=directions)
    layer.params.b[...] = rng.standard_normal(layer.params.b.shape)  # exercise λ away from 0.5
    x = rng.standard_normal(shape).astype(dtype)
    assert layer.forward(x).shape == shape[:-1] + (directions * 3,)
    check_against_reference(layer, x, rng.standard_normal(shape[:-1] + (directions * 3,)), rtol)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("zeros", [False, True])
def test_cells_finite_differences_2d(cell, zeros, rng):
    layer = MDLSTM2D(2, 3, seed=3, dtype=np.float64, cell=cell)
    layer.params.b[...] = rng.standard_normal(layer.params.b.shape) * 0.5
    x = np.zeros((2, 3, 3, 2)) if zeros else rng.standard_normal((2, 3, 3, 2))
    check_layer_gradients(layer, x, rng)


@pytest.mark.parametrize("ndim,shape,kw", [
    (2, (1, 3, 3, 1), {"directions": 4}),
    (3, (1, 2, 3, 2, 1), {"cell": "stable"}),
    (3, (1, 2, 2, 2, 1), {"directions": 8}),
    (1, (2, 4, 2), {"directions": 2, "cell": "spatial"})])
def test_directions_and_3d_finite_differences(ndim, shape, kw, rng):
    layer = make(ndim, shape[-1], 2, seed=4, dtype=np.float64, **kw)
    layer.params.b[...] = rng.standard_normal(layer.params.b.shape) * 0.5
    check_layer_gradients(layer, rng.standard_normal(shape), rng)


@pytest.mark.parametrize("ndim,shape,hidden,kw", [
    (1, (2, 4, 2), 2, {"directions": 2, "cell": "stable"}),   # stable N = 1: f alone, no mixing logits
    (3, (1, 2, 3, 2, 1), 2, {"cell": "spatial"}),
    (3, (1, 2, 2, 2, 1), 1, {"directions": 8, "cell": "spatial"}),
    (3, (1, 2, 2, 2, 1), 1, {"directions": 8, "cell": "stable"}),
    (4, (1, 2, 2, 2, 2, 1), 2, {"cell": "graves"}),           # N = 4: four forget gates / parents
    (4, (1, 2, 2, 2, 2, 1), 2, {"cell": "stable"}),           # softmax over three logits and 0
    (4, (1, 2, 2, 1, 2, 1), 2, {"cell": "spatial"}),
    (4, (1, 2, 2, 2, 2, 1), 1, {"directions": 16, "cell": "stable"})])
def test_other_cells_dimensions_and_directions_finite_differences(ndim, shape, hidden, kw, rng):
    """The cell x N x directions combinations the tests above leave out: the stable cell in 1D,
    the spatial cell in 3D, every corner of a 3D grid with the stable and spatial cells, and
    N = 4 (a 2x2x2x2 grid: its last cell has all four parents; the stable cell's softmax over three
    logits), against central differences."""
    layer = make(ndim, shape[-1], hidden, seed=4, dtype=np.float64, **kw)
    layer.params.data[...] += rng.standard_normal(layer.params.data.shape) * 0.3
    check_layer_gradients(layer, rng.standard_normal(shape), rng)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("ndim,shape", [(2, (7, 2, 3, 2)), (1, (7, 4, 2))])
def test_unrolled_kernel_paths_finite_differences(cell, ndim, shape, rng):
    """hidden 5 (a four-unit pass of the recurrent products and pulls plus a remainder of 1) with
    a batch of 7 (work items of four, two and one rows): paths the other finite-difference tests
    (hidden <= 4) do not reach."""
    layer = make(ndim, shape[-1], 5, seed=6, dtype=np.float64, cell=cell)
    layer.params.data[...] += rng.standard_normal(layer.params.data.shape) * 0.3
    check_layer_gradients(layer, rng.standard_normal(shape), rng)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("ndim,shape,kw", [(2, (7, 2, 3, 2), {}), (1, (7, 4, 2), {"directions": 2}),
                                           (3, (1, 2, 2, 2, 1), {"directions": 8})])
def test_register_tile_paths_match_reference_and_finite_differences(cell, ndim, shape, kw, rng):
    """hidden 16 in float64: whole register tiles (16 columns with AVX-512, else 8) of the gate
    rows in the forward products and of dh in the backward pulls; a batch of 7: tiles of four
    rows, the last one repeating its last row. Every gradient against the reference's, 300
    random entries of each against finite differences (every entry: 77k forward passes, a
    minute for the 3D layer)."""
    layer = make(ndim, shape[-1], 16, seed=6, dtype=np.float64, cell=cell, **kw)
    layer.params.data[...] += rng.standard_normal(layer.params.data.shape) * 0.3
    x = rng.standard_normal(shape)
    check_against_reference(layer, x, rng.standard_normal(layer.forward(x).shape), 1e-12)
    check_layer_gradients(layer, x, rng, max_entries=300)


@pytest.mark.parametrize("dims", [(5, 5), (3, 7), (2, 3, 4), (4, 1, 3)])
def test_cells_of_a_hyperplane_stay_in_row_major_order(dims):
    """``perm`` lists each hyperplane's cells in row-major order (mdnumba.grid's layout), and
    the hyperplanes in order of their index sum."""
    wf = wavefront(dims)
    level = np.indices(dims).reshape(len(dims), -1).sum(axis=0)
    for k in range(len(wf.diag_off) - 1):
        cells = wf.perm[wf.diag_off[k]:wf.diag_off[k + 1]]
        assert (np.diff(cells) > 0).all() and (level[cells] == k).all(), k


@pytest.mark.parametrize("dims", [(5,), (3, 4), (2, 3, 2)])
def test_skew_tables_flip_and_reorder(dims, rng):
    """Slab q of ``skew_rows`` is flip_q(x) in skewed row order (``perm``); ``unskew_rows`` puts it
    back (P = S) or sums the directions (P = 1). The same tables drive the CUDA kernels."""
    B, F, S = 3, 2, 2 ** len(dims)
    wf, (skew_src, unskew_src) = wavefront(dims), direction_tables(dims, B, S)
    x = rng.standard_normal((B,) + dims + (F,))
    xs = np.empty((S * wf.n_cells * B, F))
    skew_rows(xs, x.reshape(-1, 1, F), skew_src, unskew_src, B)
    for q in range(S):
        flipped = np.flip(x, tuple(1 + d for d in range(len(dims)) if (q >> d) & 1)).reshape(B, -1, F)
        want = flipped[:, wf.perm].transpose(1, 0, 2).reshape(-1, F)  # row s*B + b
        np.testing.assert_array_equal(xs[q * wf.n_cells * B:(q + 1) * wf.n_cells * B], want)
    back = np.empty((wf.n_cells * B, S, F))
    unskew_rows(back, xs, skew_src, unskew_src)
    np.testing.assert_array_equal(back, np.repeat(x.reshape(-1, 1, F), S, axis=1))
    total = np.empty((wf.n_cells * B, 1, F))
    unskew_rows(total, xs, skew_src, unskew_src)
    np.testing.assert_allclose(total[:, 0], S * x.reshape(-1, F), rtol=1e-12)


@pytest.mark.parametrize("tables", ["sizes", "state"])
@pytest.mark.parametrize("P", ["S", 1])
def test_skew_and_unskew_follow_their_formulas_with_minus_ones(tables, P, rng):
    """The scatter kernels write every row of their formulas (written as gathers here), zeros
    where a table has -1: a padded batch's padding, the state cells of a stateful 1D layer."""
    B, F = 3, 2
    if tables == "sizes":
        dims, S = (3, 4), 4
        skew_src, unskew_src = direction_tables(dims, B, S, ((3, 4), (1, 2), (2, 3)))
    else:
        dims, S = (5,), 2
        skew_src, unskew_src = state_tables(dims[0], B, S)[1:]
    P = S if P == "S" else 1
    R, n = skew_src.shape[1], unskew_src.shape[1]
    assert (skew_src < 0).any() and (R == n) == (tables == "sizes")
    x = rng.standard_normal((n, P, F))
    xs = np.full((S * R, F), np.nan)
    skew_rows(xs, x, skew_src, unskew_src, B)
    want = np.concatenate([np.where(skew_src[q, :, None] >= 0, x[skew_src[q], q % P], 0) for q in range(S)])
    np.testing.assert_array_equal(xs, want)
    out = np.full((n, P, F), np.nan)
    unskew_rows(out, xs, skew_src, unskew_src)
    terms = [np.where(unskew_src[q, :, None] >= 0, xs[q * R + unskew_src[q]], 0) for q in range(S)]
    want = np.stack(terms, axis=1) if P == S else sum(terms)[:, None]
    np.testing.assert_array_equal(out, want)


def test_direction_q_scans_from_its_corner(rng):
    """Output block q of a 4-direction layer only sees inputs on its scan's side."""
    layer = MDLSTM2D(1, 2, directions=4, seed=0, dtype=np.float64)
    x = rng.standard_normal((1, 4, 5, 1))
    y = layer.forward(x)
    x2 = x.copy()
    x2[0, 3, 4] += 1.0  # bottom-right corner: only the scan that starts there (q=3) sees it first
    d = np.abs(layer.forward(x2) - y)[0].reshape(4, 5, 4, 2).max(axis=-1)
    assert d[:3, :4, :3].max() == 0  # every other cell of q=0..2 before the corner is unaffected
    assert d[0, 0, 3] > 0            # q=3 carries it to the top-left corner
    assert d[3, 4, 0] > 0 and d[3, 0, 1] == 0 and d[3, 0, 2] > 0  # q=1 (bottom-left), q=2 (top-right)


def _grads(layer, x, dh):
    """``(h, dx, grads)`` of a fresh forward/backward."""
    layer.zero_grad()
    h = layer.forward(x)
    return h, layer.backward(dh), {k: v.copy() for k, v in layer.grads.items()}


@pytest.mark.parametrize("cell", ["graves", "spatial"])
@pytest.mark.parametrize("directions", [1, 4])
def test_a_2d_layer_on_one_row_is_a_1d_lstm(cell, directions, rng):
    """Metamorphic, independent of the reference: on a (B, 1, W) grid no cell has an upper
    neighbour, so a 2D layer is the 1D LSTM over W with its [i | f_left | o | g] weights; the
    f_up and U_up gradients are 0. Four 2D directions = two 1D ones (bottom/top starts agree)."""
    D, C = 3, 2
    md = MDLSTM2D(C, D, cell=cell, directions=directions, seed=1, dtype=np.float64)
    md.params.b = rng.standard_normal(md.params.b.shape)
    one = LSTM1D(C, D, cell=cell, directions=max(1, directions // 2), dtype=np.float64)
    cols = np.concatenate([np.arange(k * D, (k + 1) * D) for k in (0, 2, 3, 4)])  # i, f_left, o, g
    up = np.arange(D, 2 * D)                                                       # f_up
    first = (lambda a: a[0]) if directions > 1 else (lambda a: a)
    for name in ("W", "U", "b") if directions > 1 else ():  # every direction: direction 0's weights
        md.params[name][1:] = md.params[name][0]
    one.params.W = np.broadcast_to(first(md.params.W)[..., cols], one.params.W.shape)
    one.params.U = np.broadcast_to(first(md.params.U)[..., 1:, cols], one.params.U.shape)
    one.params.b = np.broadcast_to(first(md.params.b)[..., cols], one.params.b.shape)
    x = rng.standard_normal((3, 1, 5, C))
    dh = rng.standard_normal((3, 1, 5, directions * D))
    # 2D direction q is 1D direction q >> 1 (bit 1 reverses W; bit 0 reverses the one row)
    pick = np.concatenate([np.arange((q >> 1) * D, ((q >> 1) + 1) * D) for q in range(directions)])
    h2, dx2, g2 = _grads(md, x, dh)
    dh1 = np.zeros((3, 5, one.directions * D))
    np.add.at(dh1, (slice(None), slice(None), pick), dh[:, 0])  # 2D directions q, q^1 feed one 1D one
    h1, dx1, g1 = _grads(one, x[:, 0], dh1)
    np.testing.assert_allclose(h2[:, 0], h1[..., pick], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx2[:, 0], dx1, rtol=1e-12, atol=1e-14)
    summed = (lambda a: a.sum(axis=0)) if directions > 1 else (lambda a: a)
    np.testing.assert_allclose(summed(g2["W"])[..., cols], summed(g1["W"]), rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(summed(g2["U"])[..., 1, cols], summed(g1["U"])[..., 0, :], rtol=1e-11,
                               atol=1e-14)
    assert not g2["W"][..., up].any() and not g2["U"][..., 0, :].any() and not g2["U"][..., up].any()


@pytest.mark.parametrize("axis,bit", [(1, 1), (2, 2)])
def test_flipping_the_input_permutes_the_directions(axis, bit, rng):
    """Metamorphic: flipping x along an axis gives the flipped output of the layer whose
    direction weights are swapped q <-> q ^ bit (the bit that reverses that axis), with the
    output blocks swapped the same way; likewise dx and the (swapped) gradients."""
    D = 2
    a = MDLSTM2D(2, D, cell="stable", directions=4, seed=3, dtype=np.float64)
    a.params.b = rng.standard_normal(a.params.b.shape)
    b = MDLSTM2D(2, D, cell="stable", directions=4, dtype=np.float64)
    swap = [q ^ bit for q in range(4)]
    b.params.data = np.concatenate([a.params[k][swap].ravel() for k in ("W", "U", "b")])
    blocks = np.concatenate([np.arange(q * D, (q + 1) * D) for q in swap])
    x, dh = rng.standard_normal((2, 3, 4, 2)), rng.standard_normal((2, 3, 4, 4 * D))
    ha, dxa, ga = _grads(a, x, dh)
    hb, dxb, gb = _grads(b, np.flip(x, axis), np.flip(dh, axis)[..., blocks])
    np.testing.assert_allclose(hb, np.flip(ha, axis)[..., blocks], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dxb, np.flip(dxa, axis), rtol=1e-12, atol=1e-14)
    for k in ("W", "U", "b"):
        np.testing.assert_allclose(gb[k], ga[k][swap], rtol=1e-11, atol=1e-14)


def test_stable_state_is_bounded_where_graves_grows():
    """With every gate saturated open, graves c doubles per diagonal, stable c stays <= 1/(1-f)."""
    x = np.ones((1, 40, 40, 1))
    for cell, bound in (("graves", None), ("stable", 1.0 / (1.0 - 1.0 / (1.0 + np.exp(-6.0))) + 1e-9)):
        layer = MDLSTM2D(1, 1, seed=0, dtype=np.float64, cell=cell, forget_bias=6.0)
        layer.params.U[...] = 0
        layer.params.b[0] = 6.0   # i ~ 1
        layer.params.b[-1] = 6.0  # g ~ 1
        layer.forward(x)
        cmax = np.abs(layer._saved["c"]).max()
        if bound is None:
            assert cmax > 1e10
        else:
            assert cmax <= bound


def test_bad_cell_and_directions():
    with pytest.raises(ValueError, match="unknown cell 'lstm'.*graves.*spatial.*stable"):
        MDLSTM2D(1, 2, cell="lstm")
    with pytest.raises(ValueError, match="directions must be 1 or 4"):
        MDLSTM2D(1, 2, directions=2)
    with pytest.raises(ValueError, match="directions must be 1 or 8"):
        MDLSTM3D(1, 2, directions=4)
    with pytest.raises(ValueError, match="directions must be 1 or 2"):
        WavefrontLSTM(1, 1, 2, directions=3)


def test_stable_layout_and_default_forget_bias():
    layer = MDLSTM2D(1, 2, cell="stable")
    b = layer.params.b
    np.testing.assert_array_equal(b[2:4], 1.0)   # f
    np.testing.assert_array_equal(b[4:6], 0.0)   # λ logits: λ = 0.5, an even mix
    four = MDLSTM2D(1, 2, directions=4)
    assert four.params.W.shape == (4, 1, 10) and four.params.U_up.shape == (4, 2, 10)
    assert four.out_channels == 8


@pytest.mark.parametrize("cell", ["graves", "stable", "spatial"])
@pytest.mark.parametrize("ndim,shape,directions", [(2, (7, 3, 4, 2), 1), (2, (3, 2, 3, 1), 4),
                                                    (3, (3, 2, 2, 3, 1), 1), (1, (5, 4, 2), 2)])
def test_unrolled_kernel_paths_match_reference(cell, ndim, shape, directions, rng):
    """hidden 6 (the products' four-unit passes plus a remainder of 2) and odd batches (work items
    of four (batch 7), two and one rows) against the float64 reference."""
    layer = WavefrontLSTM(ndim, shape[-1], 6, seed=4, dtype=np.float64, cell=cell, directions=directions)
    layer.params.data[...] += rng.standard_normal(layer.params.data.shape) * 0.2
    x = rng.standard_normal(shape)
    check_against_reference(layer, x, rng.standard_normal(shape[:-1] + (layer.out_channels,)), 1e-12)


@pytest.mark.parametrize("ndim,cell,bias", [(1, "graves", 1.0), (2, "graves", 0.0), (2, "spatial", 0.0),
                                            (3, "graves", -np.log(2)), (3, "spatial", -np.log(2)),
                                            (2, "stable", 1.0), (3, "stable", 1.0)])
@pytest.mark.parametrize("directions", [1, "all"])
def test_default_forget_biases(ndim, cell, bias, directions):
    """README's initialisation note: graves/spatial forget gates start at 1/N each (bias
    −ln(N−1)), the 1D LSTM's and the stable cell's single forget gate at σ(1); other biases 0."""
    D = 4
    layer = WavefrontLSTM(ndim, 1, D, cell=cell, dtype=np.float64,
                          directions=2 ** ndim if directions == "all" else 1)
    b = layer.params.b.reshape(-1, (ndim + 3) * D)
    n_forget = 1 if cell == "stable" else ndim
    np.testing.assert_allclose(b[:, D:(1 + n_forget) * D], bias, rtol=1e-15, atol=0)
    assert not b[:, :D].any() and not b[:, (1 + n_forget) * D:].any()


def test_3d_default_init_does_not_overflow_on_a_large_volume():
    """The 3D counterpart of test_default_init_does_not_overflow_on_large_grids: with forget
    biases 0 (σ = 1/2 each, three of them) the state grows ~1.5x per plane."""
    x = np.random.default_rng(0).uniform(0, 1, (1, 16, 16, 16, 1)).astype(np.float32)
    layer = MDLSTM3D(1, 4)
    layer.forward(x)
    assert np.abs(layer._saved["c"]).max() < 100
    layer = MDLSTM3D(1, 4, forget_bias=0.0)
    layer.forward(x)
    assert np.abs(layer._saved["c"]).max() > 1e5


def test_table_caches_are_bounded_by_bytes(monkeypatch):
    """Tables of many grid sizes do not pile up: least recently used ones go once the cache holds
    more than TABLE_CACHE_BYTES; the newest stays even when larger; a hit returns the same object."""
    from mdnumba import grid
    grid.wavefront.cache_clear()
    one, third = (grid._nbytes(grid.wavefront(dims)) for dims in ((6, 7), (2, 21)))
    assert third > one  # more diagonals
    monkeypatch.setattr(grid, "TABLE_CACHE_BYTES", one + third)
    grid.wavefront.cache_clear()
    a, b = grid.wavefront((6, 7)), grid.wavefront((7, 6))  # as many bytes as (6, 7)
    assert grid.wavefront((6, 7)) is a and grid.wavefront.cache_bytes() == 2 * one  # a is now newest
    grid.wavefront((2, 21))  # one + one + third > the budget: b, the least recently used, goes
    assert grid.wavefront.cache_bytes() == one + third
    assert grid.wavefront((6, 7)) is a and grid.wavefront((7, 6)) is not b
    big = grid.wavefront((30, 30))
    assert grid.wavefront.cache_bytes() == grid._nbytes(big) > one + third and grid.wavefront((30, 30)) is big
    grid.wavefront.cache_clear()


def test_padded_batches_tables_have_a_smaller_budget(monkeypatch):
    """Padded batches' items seldom repeat their sizes: their tables (calls with ``sizes``) stay
    within PADDED_TABLE_CACHE_BYTES, least recently used first, and leave the unpadded ones be
    (random pages padded to one shape used to add tables at every batch, up to 512 MiB each)."""
    from mdnumba import grid
    padded = [((8, 8), 2, 1, ((k, 8), (8, k))) for k in range(1, 9)]
    one = grid._nbytes(grid.direction_tables(*padded[0]))  # the same for each: same grid and batch
    monkeypatch.setattr(grid, "PADDED_TABLE_CACHE_BYTES", 3 * one)
    grid.direction_tables.cache_clear()
    dense = grid.direction_tables((8, 8), 2)
    tables = [grid.direction_tables(*p) for p in padded]
    assert grid.direction_tables.cache_bytes() == grid._nbytes(dense) + 3 * one
    assert grid.direction_tables((8, 8), 2) is dense
    assert all(grid.direction_tables(*p) is t for p, t in zip(padded[-3:], tables[-3:]))
    assert grid.direction_tables(*padded[0]) is not tables[0]
    grid.direction_tables.cache_clear()


def test_building_the_tables_takes_little_more_than_they_keep():
    """Temporaries in the tables' own int32, one item at a time: a 2048x2048 image's tables took
    4.75x (wavefront) and 8x (direction_tables, 4 directions, batch 2) what they keep to build."""
    import tracemalloc

    from mdnumba import grid
    dims = (256, 256)
    for fn, args in ((grid.wavefront, (dims,)), (grid.direction_tables, (dims, 2, 4))):
        grid.wavefront(dims)  # built before direction_tables is traced: not its temporaries
        fn.cache_clear()
        tracemalloc.start()
        try:
            kept = grid._nbytes(fn(*args))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 3 * kept, (fn.__name__, peak / kept)
    grid.wavefront.cache_clear()
    grid.direction_tables.cache_clear()


def test_table_cache_keys_fill_in_the_defaults():
    """One entry however the arguments are passed (positional, keyword, a default left out or
    given): a layer's call with ``sizes=None`` finds the tables a caller built without it."""
    from mdnumba import grid
    grid.direction_tables.cache_clear()
    a = grid.direction_tables((3, 4), 2)
    assert grid.direction_tables((3, 4), 2, 1) is a and grid.direction_tables((3, 4), 2, 1, None) is a
    assert grid.direction_tables(dims=(3, 4), batch=2, sizes=None) is a
    assert grid.direction_tables((3, 4), 2, 4) is not a and grid.direction_tables((3, 4), 3) is not a
    assert grid.direction_tables.cache_bytes() == grid._nbytes(a) + sum(
        grid._nbytes(grid.direction_tables(*k)) for k in (((3, 4), 2, 4), ((3, 4), 3)))
    grid.direction_tables.cache_clear()


def test_index_tables_are_int32_below_two_to_the_31():
    """The tables are int32 (half the memory) below 2**31 entries and int64 beyond."""
    from mdnumba import grid
    assert grid.index_dtype(2**31 - 1) is np.int32 and grid.index_dtype(2**31) is np.int64
    wf, (skew, unskew) = grid.wavefront((3, 4)), grid.direction_tables((3, 4), 2, 4)
    _, *state = grid.state_tables(5, 2, 2)
    arrays = (wf.perm, wf.inv_perm, wf.diag_off, wf.parent, wf.child, skew, unskew, *state)
    assert {a.dtype for a in arrays} == {np.dtype(np.int32)}


@pytest.mark.slow
def test_int64_index_tables_give_the_same_output(monkeypatch, rng):
    """A layer whose tables are int64 (as a grid of 2**31 cells would get) computes the same
    output (the kernels widen every index before arithmetic). Checked on the saving-free sweep,
    what a grid that large runs (its int64 compile: about half a minute)."""
    from mdnumba import grid
    x = rng.standard_normal((2, 3, 4, 2))

    def run():
        layer = MDLSTM2D(2, 3, directions=4, seed=1, dtype=np.float64)
        return layer.forward(x, save=False)

    def clear():
        for fn in (grid.wavefront, grid.direction_tables, grid.state_tables):
            fn.cache_clear()

    want = run()
    clear()
    monkeypatch.setattr(grid, "index_dtype", lambda bound: np.int64)
    try:
        assert grid.wavefront((3, 4)).parent.dtype == direction_tables((3, 4), 2, 2)[0].dtype == np.int64
        np.testing.assert_array_equal(run(), want)
    finally:
        clear()
