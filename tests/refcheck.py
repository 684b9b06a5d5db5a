"""Compare any WavefrontLSTM (any cell, any number of directions) with the float64 reference."""

from __future__ import annotations

import numpy as np

from mdnumba import reference as ref


def reference_weights(layer) -> list:
    """``[(W, [U_d], b)]`` per direction, in float64, from the layer's named views."""
    P = layer.params
    lead = layer.directions > 1

    def f64(a):
        return np.asarray(a, dtype=np.float64)
    out = []
    for q in range(layer.directions):
        W, U, b = (P[n][q] if lead else P[n] for n in ("W", "U", "b"))
        out.append((f64(W), [f64(U[:, d]) for d in range(layer.ndim)], f64(b)))
    return out


def check_against_reference(layer, x, dh, rtol) -> None:
    """forward(x), backward(dh): h, dx and every gradient vs the reference (gradients tol x10)."""
    layer.zero_grad()
    y = layer.forward(x)
    yr, caches = ref.directions_forward(np.asarray(x, np.float64), reference_weights(layer), layer.cell)
    assert y.shape == yr.shape and y.dtype == layer.dtype
    np.testing.assert_allclose(y, yr, rtol=rtol, atol=rtol, err_msg="h")
    dx = layer.backward(np.asarray(dh, layer.dtype))
    rdx, grads = ref.directions_backward(np.asarray(dh, np.float64), caches)
    tol = dict(rtol=rtol * 10, atol=rtol * 10)
    np.testing.assert_allclose(dx, rdx, err_msg="dx", **tol)
    lead = layer.directions > 1
    for q, (dW, dU, db) in enumerate(grads):
        G = layer.grads
        gW, gU, gb = (G[n][q] if lead else G[n] for n in ("W", "U", "b"))
        np.testing.assert_allclose(gW, dW, err_msg=f"dW[{q}]", **tol)
        for d in range(layer.ndim):
            np.testing.assert_allclose(gU[:, d], dU[d], err_msg=f"dU[{q}][{d}]", **tol)
        np.testing.assert_allclose(gb, db, err_msg=f"db[{q}]", **tol)
