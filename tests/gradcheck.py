"""Central finite differences for layer gradient tests (float64)."""

from __future__ import annotations

import numpy as np


def numeric_grad(f, arr: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """dF/d arr by central differences, perturbing ``arr`` in place entry by entry."""
    grad = np.zeros(arr.shape)
    flat, gflat = arr.reshape(-1), grad.reshape(-1)
    for k in range(flat.size):
        old = flat[k]
        flat[k] = old + eps
        fp = f()
        flat[k] = old - eps
        fm = f()
        flat[k] = old
        gflat[k] = (fp - fm) / (2 * eps)
    return grad


def assert_grad_close(analytic, numeric, rtol=1e-6, atol=1e-9, name=""):
    """Relative error max|a-n| / max(max|n|, atol/rtol) must be <= rtol."""
    analytic, numeric = np.asarray(analytic), np.asarray(numeric)
    err = np.abs(analytic - numeric).max()
    scale = max(np.abs(numeric).max(), atol / rtol)
    assert err / scale <= rtol, f"{name}: max abs err {err:.3e}, scale {scale:.3e}"
    assert np.abs(numeric).max() > 0 or np.abs(analytic).max() == 0, name


def check_layer_gradients(layer, x, rng):
    """Compare layer.backward against finite differences for x and every parameter."""
    y = layer.forward(x)
    w = rng.standard_normal(y.shape)

    def loss():
        return float(np.sum(w * layer.forward(x)))

    layer.zero_grad()
    layer.forward(x)
    dx = layer.backward(w)
    assert_grad_close(dx, numeric_grad(loss, x), name="dx")
    for name in layer.layout.shapes:
        num = numeric_grad(loss, layer.params[name])
        assert_grad_close(layer.grads[name], num, name=name)
