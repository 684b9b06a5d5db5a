"""Environment report for ``mdnumba info``."""

from __future__ import annotations

import os
import platform

import numba
import numpy as np

from . import __version__, config, kernel_cache
from .kernels import parallel


def cuda_status() -> str:
    """One line saying whether the CUDA backend can run, and if not why and what to do: the same
    gate as ``device="cuda"`` (:func:`~mdnumba.backend_cuda.cuda_unavailable_reason`)."""
    from .backend_cuda import cuda_hint, cuda_unavailable_reason
    reason = cuda_unavailable_reason()
    if reason is not None:
        return f"unavailable: {reason}; {cuda_hint(reason)}"
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "simulator (NUMBA_ENABLE_CUDASIM=1)"
    from numba import cuda
    try:
        name = cuda.get_current_device().name
    except Exception as exc:  # pragma: no cover - a driver that fails past is_available()
        return f"unavailable: the CUDA driver failed ({type(exc).__name__}: {exc}); use --device cpu"
    return f"available: {name.decode() if isinstance(name, bytes) else name}"


def cuda_sweep_path() -> str:
    """Run a tiny CUDA forward and report which sweep path it took (or why none ran)."""
    from .backend_cuda import cuda_unavailable_reason, last_path
    reason = cuda_unavailable_reason()
    if reason is not None:
        return f"none ({reason})"
    from .layers import MDLSTM2D
    try:
        MDLSTM2D(1, 4, device="cuda").forward(np.ones((1, 4, 4, 1), np.float32))
    except Exception as exc:  # pragma: no cover - depends on the GPU
        return f"probe failed: {type(exc).__name__}: {exc}"
    from .kernels.launch import failed
    why = failed()
    return str(last_path()) + (f"; prepared launches turned off after {why}" if why else "")


def threading_layer() -> str:
    """The threading layer Numba chose (starting its thread pool), and what that means for
    calls from several Python threads (:mod:`mdnumba.kernels.parallel`)."""
    if parallel.serial_lock():
        return "workqueue, so calls from several Python threads take turns"
    return numba.threading_layer()


def cuda_sweep_settings() -> str:
    """The compile-time and default settings of the CUDA sweeps (``MDNUMBA_CUDA_*``)."""
    cell = "registers (1- to 3-D)" if config.CUDA_CELL_REGISTERS else "global memory"
    bound = f"compiled for {config.CUDA_MIN_BLOCKS} blocks per SM" if config.CUDA_MIN_BLOCKS else \
        "no launch bounds"
    launches = "prepared launches" if config.CUDA_PREPARED_LAUNCH else "every launch through numba-cuda"
    text = (f"{config.CUDA_LAYOUT} layout ({config.CUDA_SLICE_UNITS} units per slice when sliced or staged; "
            f"item: {config.CUDA_ITEM_THREADS} threads per block, {config.CUDA_ITEM_ROWS} cells per thread; "
            f"tensor: {config.CUDA_TENSOR_TILES} n-tiles per warp backward), "
            f"{config.CUDA_ROWS_PER_THREAD} rows per thread, {config.CUDA_UNROLL} unrolled steps, "
            f"{config.THREADS_PER_BLOCK} threads per block, path {config.CUDA_PATH}, cell math on {cell}, "
            f"{bound}, {launches} (MDNUMBA_CUDA_* settings)")
    if config.CUDA_SKIP:
        text += (f"; DIAGNOSTIC: the sweeps skip {' and '.join(config.CUDA_SKIP)}, their results are wrong "
                 "(MDNUMBA_CUDA_SKIP)")
    return text


def collect_info() -> dict[str, str]:
    """Versions, threading and device facts as ``name -> text``."""
    return {
        "mdnumba": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba threads": f"{numba.get_num_threads()} (threading layer: {threading_layer()}; GOMP_SPINCOUNT="
                         f"{os.environ.get('GOMP_SPINCOUNT', 'unset')}, see README 'Two jobs')",
        "malloc tuning": config.MALLOC_TUNING,
        "default dtype": np.dtype(config.DEFAULT_DTYPE).name,
        "fastmath": str(config.FASTMATH),
        "cpu register tiles": f"{config.VECTOR_BYTES}-byte vectors (host: {config.HOST_VECTOR_BYTES}; "
                              "MDNUMBA_VECTOR_BYTES)",
        "kernel cache": kernel_cache.describe() if config.CACHE else f"off ({kernel_cache.OFF_BECAUSE})",
        "cuda": cuda_status(),
        "cuda sweep settings": cuda_sweep_settings(),
        "cuda sweep path": cuda_sweep_path(),
    }
