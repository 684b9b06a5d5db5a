"""1D LSTM kernel vs reference and finite differences."""

import numpy as np
import pytest
from gradcheck import check_layer_gradients

from mdnumba import LSTM1D
from mdnumba import reference as ref


@pytest.mark.parametrize("shape", [(2, 5, 3), (1, 1, 2), (3, 17, 4)])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_matches_reference(shape, dtype, rtol, rng):
    layer = LSTM1D(shape[-1], 5, seed=4, dtype=dtype)
    x = rng.standard_normal(shape).astype(dtype)
    y = layer.forward(x)
    assert y.shape == shape[:2] + (5,)
    p = {k: v.astype(np.float64) for k, v in layer.params.items()}
    yr, cache = ref.lstm1d_forward(x, p["W"], p["U"][:, 0], p["b"])
    np.testing.assert_allclose(y, yr, rtol=rtol, atol=rtol)
    dh = rng.standard_normal(y.shape)
    dx = layer.backward(dh.astype(dtype))
    rdx, rdW, rdU, rdb = ref.lstm1d_backward(dh, cache)
    for got, want in [(dx, rdx), (layer.grads.W, rdW), (layer.grads.U_rec, rdU),
                      (layer.grads.b, rdb)]:
        np.testing.assert_allclose(got, want, rtol=10 * rtol, atol=10 * rtol)


@pytest.mark.parametrize("zeros", [False, True])
def test_gradients_finite_differences(zeros, rng):
    layer = LSTM1D(3, 4, seed=1, dtype=np.float64)
    x = np.zeros((2, 6, 3)) if zeros else rng.standard_normal((2, 6, 3))
    check_layer_gradients(layer, x, rng)


def test_causal_in_time(rng):
    layer = LSTM1D(2, 3, dtype=np.float64)
    x = rng.standard_normal((1, 8, 2))
    y = layer.forward(x)
    x[0, 5] += 1
    y2 = layer.forward(x)
    np.testing.assert_array_equal(y[0, :5], y2[0, :5])
    assert np.abs(y[0, 5:] - y2[0, 5:]).min() > 0
