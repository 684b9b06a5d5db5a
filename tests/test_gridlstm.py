"""2D Grid LSTM (time x depth) kernels vs the float64 reference and finite differences."""

import numpy as np
import pytest
from gradcheck import check_layer_gradients

from mdnumba import reference as ref
from mdnumba.layers import GridLSTM2D


def ref_forward(layer, x):
    p = {k: np.asarray(v, np.float64) for k, v in layer.params.items()}
    return ref.gridlstm_forward(np.asarray(x, np.float64), p["U_time"], p["U_depth"], p["b_time"],
                                p["b_depth"], layer.depth)


@pytest.mark.parametrize("B,T,L,D,tied", [(2, 5, 3, 3, True), (1, 1, 1, 2, True), (3, 4, 1, 2, True),
                                           (2, 1, 4, 3, True), (1, 6, 6, 4, True), (2, 5, 3, 3, False),
                                           (1, 3, 1, 2, False), (7, 3, 2, 6, True), (9, 2, 3, 4, False),
                                           # register tiles (16 float64 / 32 float32 columns) of the
                                           # products and pulls, the last panels partial
                                           (6, 3, 2, 17, False), (5, 2, 3, 33, True),
                                           # tall tiles (8 rows of a batch, 64-byte vectors) and
                                           # the 3 or 1 rows past them
                                           (11, 2, 2, 17, True), (9, 2, 2, 33, False)])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_matches_reference(B, T, L, D, tied, dtype, rtol, rng):
    layer = GridLSTM2D(D, L, seed=2, dtype=dtype, tied=tied)
    layer.params.data[...] += rng.standard_normal(layer.params.data.shape).astype(dtype) * 0.3
    x = rng.standard_normal((B, T, D)).astype(dtype)
    y = layer.forward(x)
    yr, cache = ref_forward(layer, x)
    assert y.shape == (B, T, D) and y.dtype == dtype
    np.testing.assert_allclose(y, yr, rtol=rtol, atol=rtol)
    dh = rng.standard_normal(y.shape)
    dx = layer.backward(dh.astype(dtype))
    rdx, dUt, dUd, dbt, dbd = ref.gridlstm_backward(dh, cache)
    tol = dict(rtol=rtol * 10, atol=rtol * 10)
    np.testing.assert_allclose(dx, rdx, err_msg="dx", **tol)
    for name, want in (("U_time", dUt), ("U_depth", dUd), ("b_time", dbt), ("b_depth", dbd)):
        np.testing.assert_allclose(layer.grads[name], want, err_msg=name, **tol)


@pytest.mark.parametrize("zeros,tied", [(False, True), (True, True), (False, False)])
def test_finite_differences(zeros, tied, rng):
    layer = GridLSTM2D(2, 3, seed=1, dtype=np.float64, tied=tied)
    layer.params.data[...] += rng.standard_normal(layer.params.data.shape) * 0.3
    x = np.zeros((2, 4, 2)) if zeros else rng.standard_normal((2, 4, 2))
    check_layer_gradients(layer, x, rng)


@pytest.mark.parametrize("B,T,L,D,tied", [(3, 3, 2, 4, True),    # hidden 4: the four-unit products
                                           (1, 2, 3, 5, False),   # untied, time shorter than depth
                                           (2, 1, 3, 2, True),    # one time step: no time neighbours
                                           (3, 4, 1, 2, False),   # one level: bottom and top at once
                                           (7, 3, 2, 5, True),    # work items of 4, 2 and 1 rows
                                           (2, 2, 2, 17, True)])  # register tiles, a partial last panel
def test_finite_differences_shapes(B, T, L, D, tied, rng):
    layer = GridLSTM2D(D, L, seed=1, dtype=np.float64, tied=tied)
    layer.params.data[...] += rng.standard_normal(layer.params.data.shape) * 0.3
    check_layer_gradients(layer, rng.standard_normal((B, T, D)), rng)


def test_output_at_t_ignores_later_inputs(rng):
    layer = GridLSTM2D(3, 2, dtype=np.float64)
    x = rng.standard_normal((1, 6, 3))
    y = layer.forward(x)
    x2 = x.copy()
    x2[0, 4] += 1.0
    y2 = layer.forward(x2)
    assert np.array_equal(y[0, :4], y2[0, :4]) and np.abs(y2[0, 4:] - y[0, 4:]).max() > 1e-6


def test_untied_levels_have_their_own_weights():
    tied, untied = GridLSTM2D(3, 4), GridLSTM2D(3, 4, tied=False)
    assert tied.params.U_time.shape == (6, 12) and untied.params.U_time.shape == (4, 6, 12)
    assert untied.params.data.size == 4 * tied.params.data.size


def test_bad_input():
    layer = GridLSTM2D(3, 2)
    with pytest.raises(ValueError, match="hidden=3"):
        layer.forward(np.zeros((1, 4, 2), np.float32))
    with pytest.raises(RuntimeError, match="no saved activations; run forward"):
        layer.backward(np.zeros((1, 4, 3), np.float32))


@pytest.mark.parametrize("B,T,tied", [(1, 4, True), (2, 1, True), (3, 4, False)])
def test_buffers_are_kept_and_results_are_the_callers(B, T, tied, rng):
    """Activations and scratch buffers are made once per shape and reused by the next step (no
    fresh tens of MB per step); the returned output and dx are the caller's (also with B or T =
    1, where a transpose of a buffer is contiguous), a later step leaves them as they were; the
    buffer counts: saved (for backward) within workspace, 0 after free_buffers."""
    layer = GridLSTM2D(3, 2, seed=1, tied=tied)
    x1, x2 = rng.standard_normal((2, B, T, 3)).astype(np.float32)
    y1 = layer.forward(x1)
    dx1 = layer.backward(np.ones_like(y1))
    kept = dict(layer._work)
    y1c, dx1c = y1.copy(), dx1.copy()
    y2 = layer.forward(x2)
    dx2 = layer.backward(np.cos(y2))
    assert layer._work.keys() == kept.keys() and all(layer._work[n] is buf for n, buf in kept.items())
    np.testing.assert_array_equal(y1, y1c)
    np.testing.assert_array_equal(dx1, dx1c)
    fresh = GridLSTM2D(3, 2, seed=1, tied=tied)
    np.testing.assert_array_equal(fresh.forward(x2), y2)
    np.testing.assert_array_equal(fresh.backward(np.cos(y2)), dx2)
    assert 0 < layer.saved_bytes() < layer.workspace_bytes()
    layer.free_buffers()
    assert layer.saved_bytes() == layer.workspace_bytes() == 0
    with pytest.raises(RuntimeError, match=r"backward\(\) has no saved activations; run forward"):
        layer.backward(np.cos(y2))
