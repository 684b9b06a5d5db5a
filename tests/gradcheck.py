"""Central finite differences for layer gradient tests (float64)."""

from __future__ import annotations

import numpy as np


def numeric_grad(f, arr: np.ndarray, eps: float = 1e-6, entries=None) -> np.ndarray:
    """dF/d arr by central differences, perturbing ``arr`` in place entry by entry (the flat
    indices ``entries`` only, where given: the others stay 0)."""
    grad = np.zeros(arr.shape)
    flat, gflat = arr.reshape(-1), grad.reshape(-1)
    for k in range(flat.size) if entries is None else entries:
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


def sample_entries(size: int, count: int | None, rng) -> np.ndarray | None:
    """``count`` flat indices of an array of ``size`` entries drawn without replacement, the
    first and last always among them; None (every entry) where ``count`` is None or >= size."""
    if count is None or count >= size:
        return None
    return np.union1d([0, size - 1], rng.choice(size, count, replace=False))


def check_layer_gradients(layer, x, rng, max_entries: int | None = None):
    """Compare layer.backward against finite differences for x and every parameter (in each of
    these arrays, ``max_entries`` random entries and the first and last where given: for layers
    whose every gradient the tests also compare with the reference's, which every entry of
    these finite differences checks at smaller sizes)."""
    y = layer.forward(x)
    w = rng.standard_normal(y.shape)

    def loss():
        return float(np.sum(w * layer.forward(x)))

    def check(analytic, arr, name):
        entries = sample_entries(arr.size, max_entries, rng)
        num = numeric_grad(loss, arr, entries=entries)
        pick = slice(None) if entries is None else entries
        assert_grad_close(np.asarray(analytic).reshape(-1)[pick], num.reshape(-1)[pick], name=name)

    layer.zero_grad()
    layer.forward(x)
    check(layer.backward(w), x, "dx")
    for name in layer.layout.shapes:
        check(layer.grads[name], layer.params[name], name)


def large_input_weights(layer) -> None:
    """Zero weights but for those multiplying the input, 100: a large dh then overflows
    dx = dact·Wᵀ while the weight gradients (x·dact, for x = 1e-3) stay finite."""
    layer.params.data[...] = 0
    try:
        layer.params["W"][...] = 100
    except KeyError:  # GridLSTM2D: its input is the depth dimension's h, the last rows of U_depth
        layer.params["U_depth"][..., layer.hidden:, :] = 100
