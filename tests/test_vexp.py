"""The vectorisable exp/sigmoid/tanh of the CPU kernels (mdnumba.kernels.vexp) vs NumPy."""

import numpy as np
import pytest
from numba import njit

from mdnumba.kernels import vexp


@njit(error_model="numpy")
def _apply(out, x, which):
    for i in range(x.shape[0]):
        if which == 0:
            out[i] = vexp.exp(x[i])
        elif which == 1:
            out[i] = vexp.sigmoid(x[i])
        else:
            out[i] = vexp.tanh(x[i])


@pytest.mark.parametrize("dtype,lo,hi,rtol", [(np.float64, -708, 708, 4e-16), (np.float32, -87, 87, 2e-7)])
def test_accuracy_against_numpy(dtype, lo, hi, rtol):
    x = np.linspace(lo, hi, 100_003).astype(dtype)
    x64 = x.astype(np.float64)
    for which, want in ((0, np.exp(x64)), (1, 1 / (1 + np.exp(-x64))), (2, np.tanh(x64))):
        out = np.empty_like(x)
        _apply(out, x, which)
        err = np.abs(out - want) / np.maximum(np.abs(want), 1e-30 if which == 0 else 1.0)
        assert err.max() < rtol * (1 if which == 0 else 4), (which, err.max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_limits_and_nan(dtype):
    x = np.array([np.nan, -np.inf, np.inf, -1e30, 1e30, 0.0], dtype)
    out = np.empty_like(x)
    _apply(out, x, 0)
    assert np.isnan(out[0]) and np.all(np.isfinite(out[1:])) and out[5] == 1.0
    _apply(out, x, 1)
    tiny = np.finfo(dtype).tiny  # σ(−∞) is clamped to a tiny *normal* number, not a subnormal
    assert np.isnan(out[0]) and tiny <= out[1] < 4 * tiny and out[2] == 1.0 and out[5] == 0.5
    _apply(out, x, 2)
    assert np.isnan(out[0]) and out[1] == -1.0 and out[2] == 1.0 and out[5] == 0.0


def test_python_fallback_is_numpy():
    assert vexp.exp(1.0) == np.exp(1.0) and vexp.sigmoid(0.0) == 0.5 and vexp.tanh(0.0) == 0.0
