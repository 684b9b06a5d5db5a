"""Time one recurrent layer on this machine (``mdnumba bench``): forward, inference and a train step.

A self-measurement for users of an installed package, CPU or GPU. The side-by-side
benchmarks against PyTorch and the reference, with their results files, live in the
repository's ``bench/``. No timing here is asserted anywhere: the numbers are reported.

The layer is a :class:`mdnumba.layers.WavefrontLSTM` on random data; *inference* is
``forward(x, save=False)`` (no activations kept); a *train step* is
forward, ``dh = h`` (the gradient of ``0.5·Σh²``), zero_grad, backward without dL/dx (the
layer reads data) and an Adam step: on the GPU all of it device-resident
(:class:`mdnumba.backend_cuda.CudaLSTM`, :class:`~mdnumba.backend_cuda.CudaAdam`), each timed
call ending with ``cuda.synchronize()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from . import config
from ._validate import check_positive_int
from .layers import WavefrontLSTM
from .optim import Adam


@dataclass(frozen=True)
class BenchResult:
    """Seconds per call: best and median of ``repeats`` timed calls after one warm-up call,
    ``first_s`` that warm-up (forward and train step; includes compiling the kernels unless the
    kernel cache has them). ``path``: the CUDA sweep path taken (None on the CPU)."""

    forward_s: float
    forward_median_s: float
    inference_s: float
    inference_median_s: float
    step_s: float
    step_median_s: float
    first_s: float
    repeats: int
    cells: int
    path: str | None


def _timed(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    """(best, median) seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def _cpu_calls(layer: WavefrontLSTM, x: np.ndarray) -> tuple[Callable[[], None], ...]:
    """(forward, inference, train step) on the CPU."""
    opt = Adam(layer, lr=1e-3)

    def step() -> None:
        h = layer.forward(x)
        layer.zero_grad()
        layer.backward(h, input_grad=False)
        opt.step()
    return (lambda: layer.forward(x)), (lambda: layer.forward(x, save=False)), step


def _cuda_calls(layer: WavefrontLSTM, x: np.ndarray) -> tuple[Callable[[], None], ...]:
    """(forward, inference, train step) device-resident, each ending with a synchronize."""
    from numba import cuda

    from .backend_cuda import CudaAdam, CudaLSTM
    dev = CudaLSTM.from_layer(layer)
    opt = CudaAdam([dev], lr=1e-3)
    xd = cuda.to_device(x)

    def forward(save: bool = True) -> None:
        dev.forward(xd, save=save)
        cuda.synchronize()

    def step() -> None:
        h = dev.forward(xd)
        dev.zero_grad()
        dev.backward(h, input_grad=False)
        opt.step(sync=False)
        cuda.synchronize()
    return forward, (lambda: forward(save=False)), step


def step_bytes(ndim: int, cells: int, batch: int, hidden: int, channels: int, directions: int,
               itemsize: int) -> int:
    """At least what a train step of an ``ndim``-D layer over ``cells`` cells per item holds: the
    input and, per cell, batch item and direction, the saved gates, c and h (``(N+3)·D + 2·D``
    values) and as many gradients."""
    return itemsize * batch * cells * (channels + 2 * directions * (ndim + 5) * hidden)


def step_estimate(ndim: int, cells: int, batch: int, hidden: int, channels: int, directions: int,
                  itemsize: int) -> int:
    """About what a CPU train step of such a layer holds at its peak: :func:`step_bytes`, and per
    cell and batch item three more copies of the input (skewed, its gradient, the weight
    gradients' operand) and per direction that operand's parents' h and 1, and dh
    (``(N+2)·D + 1`` values). Fitted to tracemalloc's peaks of :func:`bench_layer` (1-3D, 1-8
    directions, 1-32 channels, 8-64 units): within −2% to +14%."""
    per_cell = 3 * channels + directions * ((ndim + 2) * hidden + 1)
    return step_bytes(ndim, cells, batch, hidden, channels, directions, itemsize) + \
        itemsize * batch * cells * per_cell


def bench_layer(ndim: int, size: int, *, batch: int, hidden: int, channels: int = 1,
                directions: int = 1, cell: str = "graves", dtype: npt.DTypeLike = config.DEFAULT_DTYPE,
                device: str = "cpu", repeats: int = 10, seed: int = 0) -> BenchResult:
    """Time forward, inference and train step of an ``ndim``-D layer over a grid of side ``size`` (1D: a
    sequence of ``size`` steps), ``batch`` items of ``channels`` channels, ``hidden`` units per
    direction. Errors as the layer's (bad sizes, cell, directions; ``device="cuda"`` without a
    GPU: :class:`mdnumba.CudaUnavailableError`)."""
    repeats = check_positive_int(repeats, "repeats")
    layer = WavefrontLSTM(ndim, channels, hidden, directions=directions, cell=cell, dtype=dtype,
                          device=device, seed=seed)
    if device == "cpu":
        from .memory import require_memory
        from .train import ESTIMATE_MARGIN, FLOOR_PARTS
        shape = (ndim, size**ndim, batch, hidden, channels, directions, layer.dtype.itemsize)
        require_memory(step_bytes(*shape), "a train step of this layer needs at least", FLOOR_PARTS)
        require_memory(step_estimate(*shape), "a train step of this layer needs about",
                       margin=ESTIMATE_MARGIN)
    x = np.random.default_rng(seed).random((batch,) + (size,) * ndim + (channels,), dtype=layer.dtype)
    forward, inference, step = (_cuda_calls if device == "cuda" else _cpu_calls)(layer, x)
    t0 = time.perf_counter()
    forward()
    step()
    first = time.perf_counter() - t0
    inference()  # compiles the saving-free sweep (CPU)
    inf, inf_med = _timed(inference, repeats)
    fwd, fwd_med = _timed(forward, repeats)
    path = _sweep_path(device)
    stp, stp_med = _timed(step, repeats)
    if path != _sweep_path(device):  # the backward sweep took another path than the forward
        path = f"forward {path}; backward {_sweep_path(device)}"
    return BenchResult(fwd, fwd_med, inf, inf_med, stp, stp_med, first, repeats, batch * size ** ndim, path)


def _sweep_path(device: str) -> str | None:
    """The CUDA sweep path the last sweep took (None on the CPU)."""
    if device != "cuda":
        return None
    from .backend_cuda import last_path
    return last_path()
