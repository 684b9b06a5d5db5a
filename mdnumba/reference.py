"""Float64 NumPy reference of every cell, forward and backward (slow, obviously right).

Conventions match the public layers: input ``x`` is dense ``(B, *dims, C)``,
``W`` is ``(C, G)``, ``U`` is a list of N matrices ``(D, G)`` (one per grid
dimension, applied to the parent one step back along it), ``b`` is ``(G,)``,
with ``G = (N+3)*D`` gate columns ordered ``[i | f_1 .. f_N | o | g]``.
Cells are visited in plain row-major order (every parent comes earlier); the
backward pass *pushes* gradients to parents, unlike the kernels which pull, so
the two are independent derivations. Nothing here is fast, nothing is shared
with the kernels.
"""

from __future__ import annotations

import itertools

import numpy as np


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _parents(idx, d):
    if idx[d] == 0:
        return None
    p = list(idx)
    p[d] -= 1
    return tuple(p)


def mdlstm_forward(x, W, U, b):
    """Return ``(h, cache)`` for an N-D LSTM, ``h`` of shape (B, *dims, D).

    a = W x + Σ_d U_d h_{parent d} + b;  i, f_d, o = σ(·), g = tanh(·);
    c = i·g + Σ_d f_d·c_{parent d};  h = o·tanh(c).
    """
    x = np.asarray(x, dtype=np.float64)
    B, dims, N = x.shape[0], x.shape[1:-1], x.ndim - 2
    D = U[0].shape[0]
    h = np.zeros((B,) + dims + (D,))
    c = np.zeros_like(h)
    gates = np.zeros((B,) + dims + ((N + 3) * D,))
    for idx in itertools.product(*(range(n) for n in dims)):
        cell = (slice(None),) + idx
        a = x[cell] @ W + b
        par = [_parents(idx, d) for d in range(N)]
        for d, p in enumerate(par):
            if p is not None:
                a = a + h[(slice(None),) + p] @ U[d]
        gi = _sigmoid(a[:, :D])
        go = _sigmoid(a[:, (N + 1) * D:(N + 2) * D])
        gg = np.tanh(a[:, (N + 2) * D:])
        c_new = gi * gg
        gf = []
        for d, p in enumerate(par):
            f = _sigmoid(a[:, (1 + d) * D:(2 + d) * D])
            gf.append(f)
            if p is not None:
                c_new = c_new + f * c[(slice(None),) + p]
        c[cell] = c_new
        h[cell] = go * np.tanh(c_new)
        gates[cell] = np.concatenate([gi] + gf + [go, gg], axis=1)
    return h, dict(x=x, W=W, U=U, b=b, h=h, c=c, gates=gates)


def mdlstm_backward(dh_out, cache):
    """Return ``(dx, dW, [dU_d], db)`` for upstream gradient ``dh_out`` (push form)."""
    x, W, U, h, c, gates = (cache[k] for k in ("x", "W", "U", "h", "c", "gates"))
    B, dims, N = x.shape[0], x.shape[1:-1], x.ndim - 2
    D = U[0].shape[0]
    dh = np.array(dh_out, dtype=np.float64)
    dc = np.zeros_like(h)
    dx = np.zeros_like(x)
    dW, db = np.zeros_like(W, dtype=np.float64), np.zeros(W.shape[1])
    dU = [np.zeros_like(u, dtype=np.float64) for u in U]
    cells = list(itertools.product(*(range(n) for n in dims)))
    for idx in reversed(cells):
        cell = (slice(None),) + idx
        g = gates[cell]
        gi, go, gg = g[:, :D], g[:, (N + 1) * D:(N + 2) * D], g[:, (N + 2) * D:]
        tc = np.tanh(c[cell])
        dcell = dc[cell] + dh[cell] * go * (1 - tc**2)
        da = np.zeros((B, (N + 3) * D))
        da[:, :D] = dcell * gg * gi * (1 - gi)
        da[:, (N + 1) * D:(N + 2) * D] = dh[cell] * tc * go * (1 - go)
        da[:, (N + 2) * D:] = dcell * gi * (1 - gg**2)
        par = [_parents(idx, d) for d in range(N)]
        for d, p in enumerate(par):
            f = g[:, (1 + d) * D:(2 + d) * D]
            if p is not None:
                da[:, (1 + d) * D:(2 + d) * D] = dcell * c[(slice(None),) + p] * f * (1 - f)
        for d, p in enumerate(par):  # push to parents only once da is complete
            if p is None:
                continue
            pc = (slice(None),) + p
            dc[pc] += dcell * g[:, (1 + d) * D:(2 + d) * D]
            dh[pc] += da @ U[d].T
            dU[d] += h[pc].T @ da
        dx[cell] = da @ W.T
        dW += x[cell].T @ da
        db += da.sum(axis=0)
    return dx, dW, dU, db


def lstm1d_forward(x, W, U, b):
    """1D LSTM (gates [i | f | o | g]) = the N=1 case; ``x`` is (B, T, C)."""
    return mdlstm_forward(x, W, [U], b)


def lstm1d_backward(dh_out, cache):
    """Return ``(dx, dW, dU, db)`` of :func:`lstm1d_forward`."""
    dx, dW, dU, db = mdlstm_backward(dh_out, cache)
    return dx, dW, dU[0], db


def adam_step(p, g, m, v, t, lr, beta1, beta2, eps):
    """One Adam update (Kingma & Ba 2015), returning new ``(p, m, v)``.

    m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;
    p ← p − lr · (m / (1−β1ᵗ)) / (sqrt(v / (1−β2ᵗ)) + ε)
    """
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    mhat = m / (1 - beta1**t)
    vhat = v / (1 - beta2**t)
    return p - lr * mhat / (np.sqrt(vhat) + eps), m, v
