"""CUDA kernels of the device-resident char-LM step: the embedding's gradient (its lookup is
``wavefront_cuda.gather_rows``), dropout with the counter-based mask of a seed (the CPU's mask:
:mod:`mdnumba.kernels.dropout`), and the softmax cross-entropy
loss (twins of :class:`mdnumba.charlm.Embedding`, :class:`~mdnumba.charlm.Dropout` and
:func:`~mdnumba.charlm.softmax_xent`, the NumPy code the tests compare them with).

Nothing here copies to the host: the loss lands as block sums in a float64 device array
(:func:`mdnumba.kernels.optim_cuda.mean_loss` finishes it), and every sum has a fixed
order, so a result is the same every run (the embedding gradient adds the rows in the
order of the CPU's :func:`~mdnumba.kernels.gemm.scatter_add_rows`, no atomics).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from numba import cuda, float64

from .dropout import bits53, threshold
from .launch import launch
from .optim_cuda import REDUCE_BLOCKS, REDUCE_TPB, _block_sum, _flat
from .wavefront_cuda import SIMULATOR, _blocks, _tpb

if TYPE_CHECKING:
    from ..backend_cuda import DeviceArray


def _wrapping(fn):
    """``fn`` with NumPy's integer overflow warnings off (the simulator runs device functions as
    Python on NumPy scalars; uint64 arithmetic wraps on the GPU by design)."""
    def run(*args):
        with np.errstate(over="ignore"):
            return fn(*args)
    return run


@cuda.jit
def _scatter_add_rows(dW, ids, dy):
    """``dW[v, d] += Σ_{n: ids[n] = v} dy[n, d]``, one thread per (v, d) adding the rows in
    order n = 0, 1, .. (the CPU's order: the same float sums)."""
    D = dW.shape[1]
    for k in range(cuda.grid(1), dW.shape[0] * D, cuda.gridsize(1)):
        v = k // D
        d = k - v * D
        acc = dW[v, d]
        for n in range(ids.shape[0]):
            if ids[n] == v:
                acc += dy[n, d]
        dW[v, d] = acc


_bits53 = cuda.jit(device=True)(_wrapping(bits53) if SIMULATOR else bits53)


@cuda.jit
def _dropout(out, x, seed, thr, scale, zero):
    """Inverted dropout with the counter-based mask of ``seed``: ``out = x · (kept ? scale : 0)``,
    element k kept iff ``bits53(seed, k) ≥ thr`` (flat arrays; ``scale`` and ``zero`` of ``x``'s
    dtype, so float32 stays float32)."""
    for k in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        out[k] = x[k] * (scale if _bits53(seed, np.uint64(k)) >= thr else zero)


@cuda.jit
def _softmax_xent(dz, partials, z, targets, n):
    """Per row r of ``z`` (R, V), in float64: ``m = max z``, ``s = Σ exp(z − m)``,
    ``ℓ_r = log s − (z_t − m)`` (``t = targets[r]``), ``dz = (exp(z − m)/s − onehot_t)/n``.
    Block sums of ℓ go to ``partials``."""
    V = z.shape[1]
    acc = 0.0
    for r in range(cuda.grid(1), z.shape[0], cuda.gridsize(1)):
        m = float64(z[r, 0])
        for j in range(1, V):
            m = max(m, float64(z[r, j]))
        s = 0.0
        for j in range(V):
            s += math.exp(float64(z[r, j]) - m)
        t = targets[r]
        acc += math.log(s) - (float64(z[r, t]) - m)
        for j in range(V):
            p = math.exp(float64(z[r, j]) - m) / s
            dz[r, j] = ((p - 1.0) if j == t else p) / n
    _block_sum(acc, partials)


# ---------------------------------------------------------------- launchers
def scatter_add_rows(dW: DeviceArray, ids: DeviceArray, dy: DeviceArray) -> None:
    """``dW[ids[n]] += dy[n]`` for every n in order (repeated ids add up), on the device."""
    tpb = _tpb(None)
    launch(_scatter_add_rows, _blocks(dW.size, tpb), tpb, 0, dW, ids, dy)


def dropout(out: DeviceArray, x: DeviceArray, seed: int, p: float) -> None:
    """Twin of :class:`mdnumba.charlm.Dropout`'s forward (and, on dL/dy, its backward) with the
    mask of ``seed`` (:func:`mdnumba.kernels.dropout.keep_mask`): ``out = x · mask / (1 − p)``."""
    tpb, xf = _tpb(None), _flat(x)
    like = np.dtype(xf.dtype).type
    scale = like(1) / like(1 - p)  # the host's factor, in the same dtype
    # through numba-cuda, not prepared (launch.launch): the seed is new at every step, its key too
    _dropout[_blocks(xf.size, tpb), tpb](_flat(out), xf, np.uint64(seed), threshold(p), scale, like(0))


def softmax_xent(dz: DeviceArray, partials: DeviceArray, z: DeviceArray, targets: DeviceArray) -> None:
    """Twin of :func:`mdnumba.charlm.softmax_xent` for logits ``z`` (..., V) and integer
    ``targets`` (...): writes ``dz = dL/dz`` and the loss's REDUCE_BLOCKS block sums (float64)
    into ``partials``; ``mean_loss(partials, targets.size)`` is the mean loss in nats."""
    V = tuple(z.shape)[-1]
    z2, t = z.reshape(z.size // V, V), _flat(targets)
    launch(_softmax_xent, REDUCE_BLOCKS, REDUCE_TPB, 0, dz.reshape(z2.shape), partials, z2, t, float(t.size))
