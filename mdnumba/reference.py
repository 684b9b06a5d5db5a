"""Float64 NumPy reference of every cell, forward and backward (slow, obviously right).

Conventions match the public layers: input ``x`` is dense ``(B, *dims, C)``,
``W`` is ``(C, G)``, ``U`` is a list of N matrices ``(D, G)`` (one per grid
dimension, applied to the parent one step back along it), ``b`` is ``(G,)``,
with ``G = (N+3)*D`` gate columns ordered ``[i | f_1 .. f_N | o | g]`` (graves and
spatial cells) or ``[i | f | l_1 .. l_{N-1} | o | g]`` (stable cell).
Cells are visited in plain row-major order (every parent comes earlier); the
backward pass *pushes* gradients to parents, unlike the kernels which pull, so
the two are independent derivations. Nothing here is fast, nothing is shared
with the kernels.
"""

from __future__ import annotations

import itertools

import numpy as np

Arr = np.ndarray
#: what a forward pass keeps for its backward (inputs, weights, activations by name)
Cache = dict


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _parents(idx, d):
    if idx[d] == 0:
        return None
    p = list(idx)
    p[d] -= 1
    return tuple(p)


def _softmax_with_zero(logits):
    """softmax over the last axis of ``[logits, 0]`` (the stable cell's neighbour weights)."""
    z = np.concatenate([logits, np.zeros(logits.shape[:-1] + (1,))], axis=-1)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _cell_state(a, c_par, N, D, cell):
    """Gates and new state of one cell for all batch items.

    Returns ``(gates, c, F)`` with ``gates`` the stored activations in the kernel's
    block order and ``F`` (N, B, D) the weight of each parent state in c.
    graves/spatial: ``c = i g + Σ_d f_d c_d``; stable: ``c = i g + f Σ_d w_d c_d``,
    ``w = softmax(l_1..l_{N-1}, 0)``.
    """
    gi = _sigmoid(a[:, :D])
    go = _sigmoid(a[:, (N + 1) * D:(N + 2) * D])
    gg = np.tanh(a[:, (N + 2) * D:])
    if cell == "stable":
        f = _sigmoid(a[:, D:2 * D])
        logits = a[:, 2 * D:(N + 1) * D].reshape(a.shape[0], N - 1, D).transpose(0, 2, 1)  # (B, D, N-1)
        w = _softmax_with_zero(logits).transpose(2, 0, 1)  # (N, B, D)
        F = f[None] * w
        mid = [f] + [w[k] for k in range(N - 1)]
    else:
        F = np.stack([_sigmoid(a[:, (1 + d) * D:(2 + d) * D]) for d in range(N)])
        mid = list(F)
    c = gi * gg + sum(F[d] * c_par[d] for d in range(N))
    return np.concatenate([gi] + mid + [go, gg], axis=1), c, F


def mdlstm_forward(x: Arr, W: Arr, U: list[Arr], b: Arr, cell: str = "graves") -> tuple[Arr, Cache]:
    """Return ``(h, cache)`` for an N-D LSTM, ``h`` of shape (B, *dims, D).

    a = W x + Σ_d U_d h_{parent d} + b;  i, o = σ(·), g = tanh(·);
    c = i·g + Σ_d F_d·c_{parent d} (:func:`_cell_state`);
    h = o·tanh(c), or tanh(c·o) for the spatial cell.
    """
    x = np.asarray(x, dtype=np.float64)
    B, dims, N = x.shape[0], x.shape[1:-1], x.ndim - 2
    D = U[0].shape[0]
    h = np.zeros((B,) + dims + (D,))
    c = np.zeros_like(h)
    gates = np.zeros((B,) + dims + ((N + 3) * D,))
    zero = np.zeros((B, D))
    for idx in itertools.product(*(range(n) for n in dims)):
        cell_ix = (slice(None),) + idx
        a = x[cell_ix] @ W + b
        par = [_parents(idx, d) for d in range(N)]
        for d, p in enumerate(par):
            if p is not None:
                a = a + h[(slice(None),) + p] @ U[d]
        c_par = [zero if p is None else c[(slice(None),) + p] for p in par]
        gates[cell_ix], c[cell_ix], _ = _cell_state(a, c_par, N, D, cell)
        go = gates[cell_ix][:, (N + 1) * D:(N + 2) * D]
        h[cell_ix] = np.tanh(c[cell_ix] * go) if cell == "spatial" else go * np.tanh(c[cell_ix])
    return h, dict(x=x, W=W, U=U, b=b, h=h, c=c, gates=gates, cell=cell)


def _forget_grads(dcell, gates, c_par, N, D, cell):
    """dL/d(forget-block pre-activations) and dL/dc_parent_d, for one cell.

    graves/spatial: da_fd = dc·c_d·f_d(1−f_d), dc_d = dc·f_d. stable: with
    J = diag(w) − w wᵀ (softmax Jacobian), dw_d = dc·f·c_d, da_l = (J dw)[:N-1],
    da_f = dc·(Σ_d w_d c_d)·f(1−f), dc_d = dc·f·w_d.
    """
    if cell != "stable":
        f = [gates[:, (1 + d) * D:(2 + d) * D] for d in range(N)]
        da = [dcell * c_par[d] * f[d] * (1 - f[d]) for d in range(N)]
        return np.concatenate(da, axis=1), [dcell * f[d] for d in range(N)]
    f = gates[:, D:2 * D]
    w_first = [gates[:, (2 + k) * D:(3 + k) * D] for k in range(N - 1)]
    w = np.stack(w_first + [1 - sum(w_first, np.zeros_like(f))])  # (N, B, D)
    dw = np.stack([dcell * f * c_par[d] for d in range(N)])
    J = np.einsum("dbj,de->debj", w, np.eye(N)) - np.einsum("dbj,ebj->debj", w, w)
    dl = np.einsum("debj,dbj->ebj", J, dw)[:N - 1]
    da_f = dcell * sum(w[d] * c_par[d] for d in range(N)) * f * (1 - f)
    return np.concatenate([da_f] + list(dl), axis=1), [dcell * f * w[d] for d in range(N)]


def mdlstm_backward(dh_out: Arr, cache: Cache) -> tuple[Arr, Arr, list[Arr], Arr]:
    """Return ``(dx, dW, [dU_d], db)`` for upstream gradient ``dh_out`` (push form)."""
    x, W, U, h, c, gates, cell = (cache[k] for k in ("x", "W", "U", "h", "c", "gates", "cell"))
    B, dims, N = x.shape[0], x.shape[1:-1], x.ndim - 2
    D = U[0].shape[0]
    dh = np.array(dh_out, dtype=np.float64)
    dc = np.zeros_like(h)
    dx = np.zeros_like(x)
    dW, db = np.zeros_like(W, dtype=np.float64), np.zeros(W.shape[1])
    dU = [np.zeros_like(u, dtype=np.float64) for u in U]
    zero = np.zeros((B, D))
    cells = list(itertools.product(*(range(n) for n in dims)))
    for idx in reversed(cells):
        cell_ix = (slice(None),) + idx
        g = gates[cell_ix]
        gi, go, gg = g[:, :D], g[:, (N + 1) * D:(N + 2) * D], g[:, (N + 2) * D:]
        da = np.zeros((B, (N + 3) * D))
        if cell == "spatial":
            du = dh[cell_ix] * (1 - np.tanh(c[cell_ix] * go) ** 2)
            dcell = dc[cell_ix] + du * go
            da[:, (N + 1) * D:(N + 2) * D] = du * c[cell_ix] * go * (1 - go)
        else:
            tc = np.tanh(c[cell_ix])
            dcell = dc[cell_ix] + dh[cell_ix] * go * (1 - tc**2)
            da[:, (N + 1) * D:(N + 2) * D] = dh[cell_ix] * tc * go * (1 - go)
        da[:, :D] = dcell * gg * gi * (1 - gi)
        da[:, (N + 2) * D:] = dcell * gi * (1 - gg**2)
        par = [_parents(idx, d) for d in range(N)]
        c_par = [zero if p is None else c[(slice(None),) + p] for p in par]
        da[:, D:(N + 1) * D], dc_par = _forget_grads(dcell, g, c_par, N, D, cell)
        for d, p in enumerate(par):  # push to parents only once da is complete
            if p is None:
                continue
            pc = (slice(None),) + p
            dc[pc] += dc_par[d]
            dh[pc] += da @ U[d].T
            dU[d] += h[pc].T @ da
        dx[cell_ix] = da @ W.T
        dW += x[cell_ix].T @ da
        db += da.sum(axis=0)
    return dx, dW, dU, db


def _flip(x, q):
    """Reverse ``x`` (B, *dims, F) along every grid axis d with bit d of direction q set."""
    axes = tuple(1 + d for d in range(x.ndim - 2) if (q >> d) & 1)
    return np.flip(x, axes) if axes else x


def directions_forward(x: Arr, weights: list[tuple[Arr, list[Arr], Arr]],
                       cell: str = "graves") -> tuple[Arr, list[Cache]]:
    """All scan directions: ``weights[q] = (W, [U_d], b)`` of direction q; direction q runs
    :func:`mdlstm_forward` on x flipped along the axes of q's set bits and flips back.
    Returns the outputs concatenated on the last axis and the caches."""
    outs, caches = [], []
    for q, (W, U, b) in enumerate(weights):
        h, cache = mdlstm_forward(_flip(x, q), W, U, b, cell)
        outs.append(_flip(h, q))
        caches.append(cache)
    return np.concatenate(outs, axis=-1), caches


def directions_backward(dh: Arr, caches: list[Cache]) -> tuple[Arr, list[tuple[Arr, list[Arr], Arr]]]:
    """Backward of :func:`directions_forward`: ``(dx, [(dW, [dU_d], db)] per direction)``."""
    D = caches[0]["U"][0].shape[0]
    dx, grads = 0.0, []
    for q, cache in enumerate(caches):
        dxq, dW, dU, db = mdlstm_backward(_flip(dh[..., q * D:(q + 1) * D], q), cache)
        dx = dx + _flip(dxq, q)
        grads.append((dW, dU, db))
    return dx, grads


def lstm1d_forward(x: Arr, W: Arr, U: Arr, b: Arr) -> tuple[Arr, Cache]:
    """1D LSTM (gates [i | f | o | g]) = the N=1 case; ``x`` is (B, T, C)."""
    return mdlstm_forward(x, W, [U], b)


def lstm1d_backward(dh_out: Arr, cache: Cache) -> tuple[Arr, Arr, Arr, Arr]:
    """Return ``(dx, dW, dU, db)`` of :func:`lstm1d_forward`."""
    dx, dW, dU, db = mdlstm_backward(dh_out, cache)
    return dx, dW, dU[0], db


def lstm1d_state_forward(x: Arr, W: Arr, U: Arr, b: Arr, h0: Arr, c0: Arr,
                         cell: str = "graves") -> tuple[Arr, Arr, Arr, Cache]:
    """1D LSTM from the state ``(h0, c0)`` (B, D), one scan forward in time:
    ``a_t = W x_t + U h_{t-1} + b``, ``c_t = i g + f c_{t-1}``, ``h_t = o tanh c_t`` (spatial:
    ``tanh(c_t o)``). Returns ``(h (B, T, D), h_T, c_T, cache)``."""
    x = np.asarray(x, dtype=np.float64)
    T, D = x.shape[1], U.shape[0]
    hs, cs = [np.array(h0, dtype=np.float64)], [np.array(c0, dtype=np.float64)]
    gates = []
    for t in range(T):
        a = x[:, t] @ W + hs[-1] @ U + b
        gi, gf, go = (_sigmoid(a[:, k * D:(k + 1) * D]) for k in range(3))
        gg = np.tanh(a[:, 3 * D:])
        cs.append(gi * gg + gf * cs[-1])
        hs.append(np.tanh(cs[-1] * go) if cell == "spatial" else go * np.tanh(cs[-1]))
        gates.append((gi, gf, go, gg))
    h = np.stack(hs[1:], axis=1)
    return h, hs[-1], cs[-1], dict(x=x, W=W, U=U, hs=hs, cs=cs, gates=gates, cell=cell)


def lstm1d_state_backward(dh_out: Arr, dhT: Arr, dcT: Arr, cache: Cache) -> tuple[Arr, ...]:
    """Backward of :func:`lstm1d_state_forward` for dL/dh (B, T, D) and dL/d(h_T, c_T):
    ``(dx, dW, dU, db, dh0, dc0)`` (backpropagation through time, step by step)."""
    x, W, U, hs, cs, gates, cell = (cache[k] for k in ("x", "W", "U", "hs", "cs", "gates", "cell"))
    T = x.shape[1]
    dx, dW, dU = np.zeros_like(x), np.zeros(W.shape), np.zeros(U.shape)
    db = np.zeros(W.shape[1])
    dh_next, dc_next = np.array(dhT, dtype=np.float64), np.array(dcT, dtype=np.float64)
    for t in range(T - 1, -1, -1):
        gi, gf, go, gg = gates[t]
        dh = dh_out[:, t] + dh_next
        c = cs[t + 1]
        if cell == "spatial":
            du = dh * (1 - np.tanh(c * go) ** 2)
            dc, dgo = dc_next + du * go, du * c
        else:
            dc, dgo = dc_next + dh * go * (1 - np.tanh(c) ** 2), dh * np.tanh(c)
        da = np.concatenate([dc * gg * gi * (1 - gi), dc * cs[t] * gf * (1 - gf),
                             dgo * go * (1 - go), dc * gi * (1 - gg ** 2)], axis=1)
        dx[:, t] = da @ W.T
        dW += x[:, t].T @ da
        dU += hs[t].T @ da
        db += da.sum(axis=0)
        dh_next, dc_next = da @ U.T, dc * gf
    return dx, dW, dU, db, dh_next, dc_next


def _lstm_transform(a, m_prev, D):
    """One LSTM transform, gates ``[i | f | o | g]``: ``m = f·m_prev + i·g``, ``h = o·tanh m``."""
    i, f, o = _sigmoid(a[:, :D]), _sigmoid(a[:, D:2 * D]), _sigmoid(a[:, 2 * D:3 * D])
    g = np.tanh(a[:, 3 * D:])
    m = f * m_prev + i * g
    return o * np.tanh(m), m, (i, f, o, g)


def _lstm_transform_backward(dh, dm_out, m, m_prev, gates):
    """Backward of :func:`_lstm_transform`: ``(da, dm_prev)``."""
    i, f, o, g = gates
    tm = np.tanh(m)
    dm = dm_out + dh * o * (1 - tm**2)
    da = np.concatenate([dm * g * i * (1 - i), dm * m_prev * f * (1 - f), dh * tm * o * (1 - o),
                         dm * i * (1 - g**2)], axis=1)
    return da, dm * f


def _level(w, layer, tied_ndim):
    """Weights of depth level ``layer``: ``w`` itself when tied, else ``w[layer]``."""
    return w[layer] if w.ndim > tied_ndim else w


def gridlstm_forward(x: Arr, U_time: Arr, U_depth: Arr, b_time: Arr, b_depth: Arr,
                     layers: int) -> tuple[Arr, Cache]:
    """2D Grid LSTM (Kalchbrenner et al. 2015) over time x depth, depth prioritised.
    ``x`` (B, T, D) is the depth input of the bottom blocks. Weights tied along depth
    (``U_*`` (2D, 4D), ``b_*`` (4D,)) or one set per level (a leading axis of ``layers``).

    Block (t, l) gets ``(h_T, m_T)`` from (t-1, l) and ``(h_L, m_L)`` from (t, l-1)
    (``(x_t, 0)`` at l = 0; zeros outside the grid), then
    ``(h_T', m_T') = LSTM([h_T; h_L] U_time + b_time, m_T)`` and, using the new h_T',
    ``(h_L', m_L') = LSTM([h_T'; h_L] U_depth + b_depth, m_L)``; ``U_*`` are (2D, 4D).
    Returns ``h_L'`` of the top blocks, (B, T, D), and the cache.
    """
    x = np.asarray(x, dtype=np.float64)
    B, T, D = x.shape
    hT, mT, hL, mL = (np.zeros((T, layers, B, D)) for _ in range(4))
    gates = {}
    zero = np.zeros((B, D))
    for t in range(T):
        for layer in range(layers):
            hT_in, mT_in = (hT[t - 1, layer], mT[t - 1, layer]) if t else (zero, zero)
            hL_in, mL_in = (hL[t, layer - 1], mL[t, layer - 1]) if layer else (x[:, t], zero)
            Ut, Ud = _level(U_time, layer, 2), _level(U_depth, layer, 2)
            bt, bd = _level(b_time, layer, 1), _level(b_depth, layer, 1)
            hT[t, layer], mT[t, layer], gT = _lstm_transform(
                np.concatenate([hT_in, hL_in], 1) @ Ut + bt, mT_in, D)
            hL[t, layer], mL[t, layer], gL = _lstm_transform(
                np.concatenate([hT[t, layer], hL_in], 1) @ Ud + bd, mL_in, D)
            gates[t, layer] = (gT, gL)
    cache = dict(x=x, U_time=U_time, U_depth=U_depth, hT=hT, mT=mT, hL=hL, mL=mL, gates=gates)
    return hL[:, -1].transpose(1, 0, 2).copy(), cache


def gridlstm_backward(dout: Arr, cache: Cache) -> tuple[Arr, Arr, Arr, Arr, Arr]:
    """Push-form backward of :func:`gridlstm_forward`: ``(dx, dU_time, dU_depth, db_time, db_depth)``."""
    x, U_time, U_depth = cache["x"], cache["U_time"], cache["U_depth"]
    hT, mT, hL, mL, gates = (cache[k] for k in ("hT", "mT", "hL", "mL", "gates"))
    T, layers, B, D = hT.shape
    dhT, dmT, dhL, dmL = (np.zeros_like(hT) for _ in range(4))
    dhL[:, -1] += np.asarray(dout, dtype=np.float64).transpose(1, 0, 2)
    dx = np.zeros_like(x)
    dUt, dUd = np.zeros(U_time.shape), np.zeros(U_depth.shape)
    dbt = np.zeros(U_time.shape[:-2] + U_time.shape[-1:])
    dbd = np.zeros(U_depth.shape[:-2] + U_depth.shape[-1:])
    zero = np.zeros((B, D))
    for t in reversed(range(T)):
        for layer in reversed(range(layers)):
            hT_in, mT_in = (hT[t - 1, layer], mT[t - 1, layer]) if t else (zero, zero)
            hL_in, mL_in = (hL[t, layer - 1], mL[t, layer - 1]) if layer else (x[:, t], zero)
            gT, gL = gates[t, layer]
            daL, dmL_in = _lstm_transform_backward(dhL[t, layer], dmL[t, layer], mL[t, layer], mL_in, gL)
            HL = np.concatenate([hT[t, layer], hL_in], 1)
            _level(dUd, layer, 2)[...] += HL.T @ daL
            _level(dbd, layer, 1)[...] += daL.sum(0)
            dHL = daL @ _level(U_depth, layer, 2).T
            daT, dmT_in = _lstm_transform_backward(dhT[t, layer] + dHL[:, :D], dmT[t, layer],
                                                   mT[t, layer], mT_in, gT)
            _level(dUt, layer, 2)[...] += np.concatenate([hT_in, hL_in], 1).T @ daT
            _level(dbt, layer, 1)[...] += daT.sum(0)
            dHT = daT @ _level(U_time, layer, 2).T
            dhL_in = dHL[:, D:] + dHT[:, D:]
            if t:
                dhT[t - 1, layer] += dHT[:, :D]
                dmT[t - 1, layer] += dmT_in
            if layer:
                dhL[t, layer - 1] += dhL_in
                dmL[t, layer - 1] += dmL_in
            else:
                dx[:, t] += dhL_in
    return dx, dUt, dUd, dbt, dbd


def adam_step(p: Arr, g: Arr, m: Arr, v: Arr, t: int, lr: float, beta1: float, beta2: float,
              eps: float) -> tuple[Arr, Arr, Arr]:
    """One Adam update (Kingma & Ba 2015), returning new ``(p, m, v)``.

    m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;
    p ← p − lr · (m / (1−β1ᵗ)) / (sqrt(v / (1−β2ᵗ)) + ε)
    """
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    mhat = m / (1 - beta1**t)
    vhat = v / (1 - beta2**t)
    return p - lr * mhat / (np.sqrt(vhat) + eps), m, v


def rmsprop_step(p: Arr, g: Arr, v: Arr, lr: float, rho: float, eps: float) -> tuple[Arr, Arr]:
    """One RMSprop update, returning new ``(p, v)``: v ← ρ v + (1−ρ) g²; p ← p − lr · g / (sqrt(v) + ε)."""
    v = rho * v + (1 - rho) * g * g
    return p - lr * g / (np.sqrt(v) + eps), v
