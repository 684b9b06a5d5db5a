"""Compare any WavefrontLSTM (any cell, any number of directions) with the float64 reference."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

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


@st.composite
def layers_and_inputs(draw, max_side: int = 5, max_hidden: int = 9, max_rows: int | None = None):
    """(ndim, input shape, WavefrontLSTM keywords incl. ``hidden``): 1-3 dimensions with sides
    1..max_side (3 for 3D), batch 1-5, 1-4 channels, any cell, one scan or all, any seed.

    ``max_rows``: at most that many batch rows x cells x scans (what a draw costs under the CUDA
    simulator): the scans drop to one, then the batch shrinks (the draws stay the same)."""
    ndim = draw(st.integers(1, 3))
    dims = tuple(draw(st.integers(1, max_side if ndim < 3 else min(max_side, 3))) for _ in range(ndim))
    shape = (draw(st.integers(1, 5)),) + dims + (draw(st.integers(1, 4)),)
    kw = dict(hidden=draw(st.integers(1, max_hidden)),
              cell=draw(st.sampled_from(("graves", "stable", "spatial"))),
              directions=draw(st.sampled_from([1, 2 ** ndim])), seed=draw(st.integers(0, 2 ** 16)))
    if max_rows is not None:
        cells = math.prod(dims)
        if cells * kw["directions"] > max_rows:
            kw["directions"] = 1
        shape = (max(1, min(shape[0], max_rows // (cells * kw["directions"]))),) + shape[1:]
    return ndim, shape, kw


def check_drawn_layer(case, dtype, rtol, device: str = "cpu") -> None:
    """Build the layer of a :func:`layers_and_inputs` draw (parameters perturbed, so biases are
    not all 0) and compare it with the reference on a random input and dL/dh."""
    from mdnumba import WavefrontLSTM
    ndim, shape, kw = case
    kw = dict(kw)
    layer = WavefrontLSTM(ndim, shape[-1], kw.pop("hidden"), dtype=dtype, device=device, **kw)
    rng = np.random.default_rng(kw["seed"])
    layer.params.data[...] += rng.standard_normal(layer.params.data.shape) * 0.3
    x = rng.standard_normal(shape).astype(dtype)
    check_against_reference(layer, x, rng.standard_normal(shape[:-1] + (layer.out_channels,)), rtol)


def check_state_against_reference(layer, x, state, dh, final_grad, rtol) -> None:
    """An LSTM1D from ``state = (h0, c0)``: output, final state, dx, every weight gradient and the
    initial state's gradient (for upstream ``dh`` and ``final_grad = (dL/dh_T, dL/dc_T)``) vs
    :func:`mdnumba.reference.lstm1d_state_forward` per direction (a reversed scan: the reference
    on the time-reversed sequence)."""
    D, dt = layer.hidden, layer.dtype
    layer.zero_grad()
    def cast(pair):
        return tuple(np.asarray(a, dt) for a in pair)
    y = layer.forward(np.asarray(x, dt), state=cast(state))
    got = dict(h=y, final=layer.final_state())
    got["dx"] = layer.backward(np.asarray(dh, dt), final_state_grad=cast(final_grad))
    got["init"] = layer.initial_state_grad()
    tol = dict(rtol=rtol, atol=rtol)
    dx = 0
    for q, (W, (U,), b) in enumerate(reference_weights(layer)):
        cols = slice(q * D, (q + 1) * D)

        def rev(a, q=q):  # direction q's scan order <-> time order
            return a[:, ::-1] if q else a
        h, hT, cT, cache = ref.lstm1d_state_forward(rev(np.asarray(x, np.float64)), W, U, b,
                                                    state[0][:, cols], state[1][:, cols], layer.cell)
        dxq, dW, dU, db, dh0, dc0 = ref.lstm1d_state_backward(
            rev(np.asarray(dh, np.float64)[..., cols]), final_grad[0][:, cols], final_grad[1][:, cols], cache)
        dx = dx + rev(dxq)
        np.testing.assert_allclose(got["h"][..., cols], rev(h), err_msg=f"h[{q}]", **tol)
        for i, (name, want) in enumerate((("h_T", hT), ("c_T", cT))):
            np.testing.assert_allclose(got["final"][i][:, cols], want, err_msg=f"{name}[{q}]", **tol)
        lead = layer.directions > 1
        G = {n: layer.grads[n][q] if lead else layer.grads[n] for n in ("W", "U", "b")}
        for name, a, want in (("dW", G["W"], dW), ("dU", G["U"][:, 0], dU), ("db", G["b"], db),
                              ("dh0", got["init"][0][:, cols], dh0), ("dc0", got["init"][1][:, cols], dc0)):
            np.testing.assert_allclose(a, want, err_msg=f"{name}[{q}]", rtol=10 * rtol, atol=10 * rtol)
    np.testing.assert_allclose(got["dx"], dx, err_msg="dx", rtol=10 * rtol, atol=10 * rtol)
