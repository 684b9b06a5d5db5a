"""CUDA kernels of a device-resident training step: sigmoid losses, the global gradient
norm with clipping, and the Adam / RMSprop updates (twins of :mod:`mdnumba.losses` and
:mod:`mdnumba.optim`).

Nothing here copies to the host. A loss or a gradient norm lands in a slot of a device
array (one slot per step), which the trainer reads once every few steps. Sums use a
fixed number of blocks and a fixed reduction order, so a result is the same every run.
None of them takes ``MDNUMBA_FASTMATH``: numba-cuda's fastmath lets LLVM assume no NaN or inf,
which would fold the NaN/inf counts and the norm's finiteness test to "finite" (and these
kernels are memory-bound: fastmath would gain nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from numba import cuda, float64

from .launch import launch
from .wavefront_cuda import SIMULATOR, _blocks, _scratch, _tpb, as_device

if TYPE_CHECKING:
    from ..backend_cuda import DeviceArray, HostOrDevice

#: threads per block of the reduction kernels and blocks they use (fixed: deterministic sums)
REDUCE_TPB = 8 if SIMULATOR else 256
REDUCE_BLOCKS = 2 if SIMULATOR else 128

#: loss codes of :func:`sigmoid_loss` (names as in :data:`mdnumba.losses.LOSSES`)
LOSS_CODES = {"bce": 0, "mse": 1}


# ---------------------------------------------------------------- kernels
@cuda.jit(device=True)
def _block_sum(acc, partials):
    """Sum ``acc`` over the block's threads (tree in shared memory); thread 0 writes
    ``partials[blockIdx.x]``. Every thread of the block must call it."""
    buf = cuda.shared.array(REDUCE_TPB, float64)
    tid = cuda.threadIdx.x
    buf[tid] = acc
    cuda.syncthreads()
    width = REDUCE_TPB // 2
    while width > 0:
        if tid < width:
            buf[tid] += buf[tid + width]
        cuda.syncthreads()
        width //= 2
    if tid == 0:
        partials[cuda.blockIdx.x] = buf[0]


@cuda.jit
def _sumsq_partials(partials, g):
    """``partials[block] = Σ g[k]²`` over the block's grid-stride share, in float64."""
    acc = 0.0
    for k in range(cuda.grid(1), g.shape[0], cuda.gridsize(1)):
        acc += float64(g[k]) * float64(g[k])
    _block_sum(acc, partials)


@cuda.jit
def _nonfinite_partials(partials, a):
    """``partials[block] =`` how many ``a[k]`` of the block's grid-stride share are NaN or ±inf."""
    acc = 0.0
    for k in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        if not math.isfinite(a[k]):
            acc += 1.0
    _block_sum(acc, partials)


@cuda.jit(device=True)
def _norm_scale(partials, clip):
    """``norm = sqrt(Σ partials)`` (fixed order), ``scale = min(1, clip/norm)`` (1 if clip <= 0)."""
    acc = 0.0
    for k in range(partials.shape[0]):
        acc += partials[k]
    norm = math.sqrt(acc)
    scale = 1.0
    if clip > 0 and norm > clip:
        scale = clip / norm
    return norm, scale


@cuda.jit(device=True)
def _update_scale(partials, clip, stats, record, slot):
    """In an update kernel: every thread finishes the norm itself (:func:`_norm_scale`, the same
    fixed-order sum, so no extra launch), thread 0 stores ``stats = [norm, scale]`` and
    ``record[slot] = norm``; returns (norm is finite, scale)."""
    norm, scale = _norm_scale(partials, clip)
    if cuda.grid(1) == 0:
        stats[0] = norm
        stats[1] = scale
        record[slot] = norm
    return abs(norm) < math.inf, scale


@cuda.jit
def _norm_and_scale(stats, partials, clip, record, slot):
    """Launched with one thread: the norm and clip scale alone (:func:`_update_scale`, no update)."""
    _update_scale(partials, clip, stats, record, slot)


@cuda.jit(device=True)
def _step_count(steps, parity):
    """The update's step ``t = steps[parity] + 1``; thread 0 stores it in ``steps[1 − parity]``, where
    the next update reads it (its ``parity`` the other one). Counted on the device so that a
    launch's arguments are the same at every other step (a prepared launch, :mod:`.launch`), not
    the bias corrections of each step."""
    t = steps[parity] + 1
    if cuda.grid(1) == 0:
        steps[1 - parity] = t
    return t


@cuda.jit
def _adam_update(p, g, m, v, lr, beta1, beta2, eps, steps, parity, partials, clip, stats, record, slot,
                 clear):
    """``g' = scale·g``; ``m ← β1 m + (1−β1) g'``; ``v ← β2 v + (1−β2) g'²``;
    ``p ← p − lr · (m/bc1) / (sqrt(v/bc2) + ε)``, ``bc = 1 − βᵗ`` at the step t of
    :func:`_step_count`, with the norm and clip scale from the sum-of-squares ``partials``
    (:func:`_update_scale`); nothing changes when the norm is not finite (the trainer reports it)
    but t, which the host counts too. ``clear``: also set ``g = 0`` (the next step's zero_grad)."""
    ok, scale = _update_scale(partials, clip, stats, record, slot)
    t = float64(_step_count(steps, parity))
    bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
    for k in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        gk = g[k] * scale
        if clear:
            g[k] = 0
        if ok:
            m[k] = beta1 * m[k] + (1.0 - beta1) * gk
            v[k] = beta2 * v[k] + (1.0 - beta2) * gk * gk
            p[k] -= lr * (m[k] / bc1) / (math.sqrt(v[k] / bc2) + eps)


@cuda.jit
def _rmsprop_update(p, g, m, v, lr, beta1, rho, eps, steps, parity, partials, clip, stats, record, slot,
                    clear):
    """``g' = scale·g``; ``v ← ρ v + (1−ρ) g'²``; ``p ← p − lr · g' / (sqrt(v) + ε)``
    (Adam's arguments; ``m`` and ``beta1`` unused, t only counted); as :func:`_adam_update` otherwise."""
    ok, scale = _update_scale(partials, clip, stats, record, slot)
    _step_count(steps, parity)
    for k in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        gk = g[k] * scale
        if clear:
            g[k] = 0
        if ok:
            v[k] = rho * v[k] + (1.0 - rho) * gk * gk
            p[k] -= lr * gk / (math.sqrt(v[k]) + eps)


@cuda.jit(device=True)
def _sigmoid(zk):
    """``(σ(z), σ(−z), e^{-|z|})`` in float64, without overflow, each to its own precision."""
    e = math.exp(-abs(zk))
    big, small = 1.0 / (1.0 + e), e / (1.0 + e)
    return (big, small, e) if zk >= 0 else (small, big, e)


@cuda.jit
def _sigmoid_loss(prob, dz, partials, z, y, kind, inv_n, probe, idx):
    """Per element ``p = σ(z)``, ``q = 1 − p = σ(−z)``; bce (kind 0): ``ℓ = softplus(z) − y z``,
    ``dz = (p − y)/n``; mse (kind 1): ``ℓ = (p − y)²``, ``dz = 2 (p − y) p q/n``; where z > 0,
    ``p − y = (1 − y) − q`` (as :func:`mdnumba.losses._sigmoid_error`). Block sums of ℓ (float64)
    go to ``partials``; ``probe[i] = σ(z[idx[i]])`` (the same value as ``prob`` there). Flat
    arrays."""
    acc = 0.0
    for k in range(cuda.grid(1), z.shape[0], cuda.gridsize(1)):
        zk, yk = float64(z[k]), float64(y[k])
        p, q, e = _sigmoid(zk)
        err = (1.0 - yk) - q if zk > 0 else p - yk
        if kind == 0:
            acc += max(zk, 0.0) + math.log1p(e) - yk * zk
            dz[k] = err * inv_n
        else:
            acc += err * err
            dz[k] = 2.0 * err * p * q * inv_n
        prob[k] = p
    for i in range(cuda.grid(1), idx.shape[0], cuda.gridsize(1)):
        probe[i] = _sigmoid(float64(z[idx[i]]))[0]
    _block_sum(acc, partials)


# ---------------------------------------------------------------- launchers
def _flat(a):
    d = as_device(a)
    return d.reshape(d.size)


class NormArgs(NamedTuple):
    """Where an update kernel finds the gradient norm: the sum-of-squares ``partials`` of
    :func:`sumsq_partials`, the clip norm (0: none), ``stats`` / ``record[slot]`` to store
    ``[norm, scale]`` / the norm, and ``clear`` (zero the gradients after reading them)."""

    partials: object
    clip: float
    stats: object
    record: object
    slot: int
    clear: bool


def sumsq_partials(partials: DeviceArray, grads: Sequence[DeviceArray]) -> None:
    """Per-block sums of squares of the flat buffers ``grads`` into ``partials`` (float64 scratch
    of ``len(grads) * REDUCE_BLOCKS`` entries), one launch per buffer."""
    for i, g in enumerate(grads):  # (the first: partials itself, its blocks write its first entries)
        part = partials[i * REDUCE_BLOCKS:(i + 1) * REDUCE_BLOCKS] if i else partials
        launch(_sumsq_partials, REDUCE_BLOCKS, REDUCE_TPB, 0, part, g)


def count_nonfinite(a: DeviceArray) -> int:
    """How many elements of the device array ``a`` are NaN or ±inf (one launch, then a copy of
    REDUCE_BLOCKS partial counts to the host: it waits for the GPU). Its scratch is kept: an
    allocation on a GPU is a cuMemAlloc, and a checked layer counts at every forward and backward."""
    partials = _scratch("nonfinite partials", (REDUCE_BLOCKS,), np.float64)
    launch(_nonfinite_partials, REDUCE_BLOCKS, REDUCE_TPB, 0, partials, _flat(a))
    return int(partials.copy_to_host().sum())


def global_norm(stats: DeviceArray, partials: DeviceArray, grads: Sequence[DeviceArray], clip: float | None,
                record: DeviceArray, slot: int) -> None:
    """``stats = [‖g‖₂, clip scale]`` over all flat buffers ``grads``; ``record[slot] = ‖g‖₂``.

    ``partials`` is float64 scratch of ``len(grads) * REDUCE_BLOCKS`` entries.
    """
    sumsq_partials(partials, grads)
    launch(_norm_and_scale, 1, 1, 0, stats, partials[:len(grads) * REDUCE_BLOCKS], float(clip or 0.0), record,
           int(slot))


def adam_update(p: DeviceArray, g: DeviceArray, m: DeviceArray, v: DeviceArray, lr: float, beta1: float,
                beta2: float, eps: float, steps: DeviceArray, parity: int, norm: NormArgs) -> None:
    """CUDA twin of :func:`mdnumba.optim.adam_update`; the clip scale comes from ``norm``, the bias
    corrections from the step count ``steps[parity] + 1`` (int64, two entries: :func:`_step_count`)."""
    tpb = _tpb(None)
    launch(_adam_update, _blocks(p.shape[0], tpb), tpb, 0, p, g, m, v, lr, beta1, beta2, eps, steps, parity,
           *norm)


def rmsprop_update(p: DeviceArray, g: DeviceArray, m: DeviceArray, v: DeviceArray, lr: float, beta1: float,
                   rho: float, eps: float, steps: DeviceArray, parity: int, norm: NormArgs) -> None:
    """CUDA twin of :func:`mdnumba.optim.rmsprop_update` (clip scale from ``norm``, step count as
    :func:`adam_update`'s)."""
    tpb = _tpb(None)
    launch(_rmsprop_update, _blocks(p.shape[0], tpb), tpb, 0, p, g, m, v, lr, beta1, rho, eps, steps, parity,
           *norm)


def sigmoid_loss(prob: DeviceArray, dz: DeviceArray, z: HostOrDevice, y: HostOrDevice, loss: str,
                 partials: DeviceArray, probe: tuple[DeviceArray, DeviceArray] | None = None) -> None:
    """Twin of :data:`mdnumba.losses.LOSSES` ``[loss]``: writes ``prob = σ(z)``, ``dz = dL/dz`` and
    the loss's REDUCE_BLOCKS block sums into ``partials`` (float64; :func:`mean_loss` finishes
    the mean on the host, so a step needs no second launch), all on the device. ``probe=(out,
    index)``: also ``out[i] = prob.flat[index[i]]`` (the values a task's metrics read)."""
    if loss not in LOSS_CODES:
        raise ValueError(f"loss must be one of {sorted(LOSS_CODES)}, got {loss!r}")
    zf = _flat(z)
    out, idx = probe if probe is not None else (zf[:0], cuda.device_array(0, np.int64))
    launch(_sigmoid_loss, REDUCE_BLOCKS, REDUCE_TPB, 0, _flat(prob), _flat(dz), partials, zf, _flat(y),
           LOSS_CODES[loss], 1.0 / zf.size, out, idx)


def mean_loss(partials: np.ndarray, n: int) -> float:
    """The mean loss over ``n`` elements from :func:`sigmoid_loss`'s block sums (host side)."""
    return math.fsum(partials) / n


def step_counter() -> DeviceArray:
    """The device step count of an optimiser (:func:`_step_count`): int64, two entries, at 0."""
    return cuda.to_device(np.zeros(2, np.int64))


def set_step_count(steps: DeviceArray, t: int) -> None:
    """Set the device step count ``steps`` to ``t`` (both entries: the next update reads ``t % 2``)."""
    steps.copy_to_device(np.full(2, t, np.int64))


def scratch(n: int) -> DeviceArray:
    """float64 device scratch for the sums above."""
    return cuda.device_array(max(1, int(n)), dtype=np.float64)
