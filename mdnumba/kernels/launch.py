"""Prepared CUDA kernel launches: numba-cuda's launch work done once per argument set.

A launch through numba-cuda (``kernel[grid, block, 0, shmem](*args)``) types every argument,
looks the compiled kernel up and turns every array into its launch fields (pointer, shape,
strides: ~9 values for a 2-D array) before the driver call, a few µs per array argument
(numba-cuda issue #477). The sweeps take ~20 arguments, and the device train step's launches
cost the host ~1.9 ms at 32x32 B64 D64 (bench/results/gpu.md, "Host dispatch"): more than a
step at the 32x32 target would take. :func:`launch` does that work on the first launch of a
kernel with a given *argument key* and keeps its result, the launch fields numba-cuda built;
later launches with the same key hand them straight to the driver call numba-cuda makes
(``cuda.core.launch``). A key is prepared the second time it is seen (arrays made for one call,
e.g. a host array's copy, would pay for a preparation they never use).

The key of a device array is what its launch fields are made of, its data pointer, shape,
strides and dtype (not its identity: a view made again each step, e.g. a reshape, keys the
same), of a scalar its type and value; the entry holds no reference to any array (a freed
array's memory reused by another of the same key gets the same, right, fields). Anything else
(a host array, which numba-cuda copies to the device at each launch), the simulator, a debug
kernel, or ``MDNUMBA_CUDA_PREPARED_LAUNCH=0`` launches through numba-cuda every time; so does
every launch after a prepared one raised (then numba-cuda's own launch of the same arguments
says why). Only the default stream, and the thread's current context, which a prepared launch
does not set (numba-cuda's does): launches from a thread where numba-cuda never launched raise
and turn them off as above. Launches from several threads take turns (a lock: the callback that
captures the compiled kernel sits on a launch configuration all threads share).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numba
import numpy as np

from .. import config

#: True under numba's CUDA simulator (its kernels launch as they are)
SIMULATOR: bool = bool(numba.config.ENABLE_CUDASIM)
#: keys kept at most, prepared or seen once (then forgotten all at once: a step's keys recur, a
#: per-diagonal sweep has one per anti-diagonal)
MAX_PREPARED = 2048
#: "prepared": key -> launch (a callable); "seen": keys launched once; "failed": why prepared
#: launches were turned off, or None
_state: dict = {"prepared": {}, "seen": set(), "failed": None}
_lock = threading.Lock()


def arg_key(a: Any) -> tuple | None:
    """What of a launch argument its launch fields are made of: ``(type, pointer, shape, strides,
    dtype)`` of a numba device array, ``(type, value)`` of a bool or int, with the sign of a float
    (``0.0 == -0.0``), and the dtype and bytes of a NumPy scalar (``timedelta64(24, 'h') ==
    timedelta64(1, 'D')``); None for anything else (not preparable)."""
    data = getattr(a, "gpu_data", None)
    if data is not None:
        return type(a), data.device_pointer_value, a.shape, a.strides, a.dtype
    if isinstance(a, float):
        return float, a, math.copysign(1.0, a)
    if isinstance(a, (bool, int)):
        return type(a), a
    if isinstance(a, np.generic):
        return type(a), a.dtype.str, a.tobytes()
    return None


def launch_key(kernel, griddim, blockdim, shmem: int, args: tuple) -> tuple | None:
    """The key of a launch (None: not preparable)."""
    keys = tuple(map(arg_key, args))
    if None in keys:
        return None
    return id(kernel), griddim, blockdim, shmem, keys


def launch(kernel, griddim, blockdim, shmem: int, *args) -> None:
    """``kernel[griddim, blockdim, 0, shmem](*args)``, prepared (the module docstring)."""
    if SIMULATOR or not config.CUDA_PREPARED_LAUNCH or _state["failed"]:
        run(kernel, griddim, blockdim, shmem, args, [])
        return
    with _lock:
        _launch(kernel, griddim, blockdim, shmem, args)


def _launch(kernel, griddim, blockdim, shmem: int, args: tuple) -> None:
    """:func:`launch` with prepared launches on, holding the lock."""
    key = launch_key(kernel, griddim, blockdim, shmem, args)
    prepared = _state["prepared"].get(key) if key is not None else None
    if prepared is not None:
        try:
            prepared()
            return
        except Exception as exc:  # say why once, then numba-cuda's launch (and its error, if any)
            _state["failed"] = f"{type(exc).__name__}: {exc}"
            _state["prepared"].clear()
            _state["seen"].clear()
    captured: list = []
    callbacks = []
    if key is not None and _state["failed"] is None:
        if len(_state["prepared"]) + len(_state["seen"]) >= MAX_PREPARED:
            _state["prepared"].clear()
            _state["seen"].clear()
        if key in _state["seen"]:
            callbacks.append(lambda compiled, lc: captured.append(compiled))
        else:
            _state["seen"].add(key)
    configured = run(kernel, griddim, blockdim, shmem, args, callbacks)
    if captured:
        _state["seen"].discard(key)
        prepared = prepare(captured[0], configured, args)
        if prepared is not None:
            _state["prepared"][key] = prepared


def run(kernel, griddim, blockdim, shmem: int, args: tuple, callbacks: list):
    """``kernel[griddim, blockdim, 0, shmem](*args)`` through numba-cuda, with ``callbacks`` run
    before its driver call; returns the launch configuration. numba-cuda keeps one configuration
    per grid, block, stream and shared memory (``Dispatcher.configure`` is cached), so the
    callbacks are taken off it again after the launch."""
    configured = kernel[griddim, blockdim, 0, shmem]
    if not callbacks:  # (the simulator's kernels have no callbacks)
        configured(*args)
        return configured
    hooks = configured.pre_launch_callbacks
    hooks.extend(callbacks)
    try:
        configured(*args)
    finally:
        for callback in callbacks:
            hooks.remove(callback)
    return configured


def prepare(compiled, configured, args: tuple):
    """A callable that launches ``compiled`` (numba-cuda's compiled kernel) as ``configured`` (its
    launch configuration) with the launch fields numba-cuda makes of ``args``, as its own launch
    does; None where that is not the same (a debug kernel, argument extensions, an argument
    copied at each launch)."""
    from numba.cuda import dispatcher
    if getattr(compiled, "debug", False) or getattr(compiled, "extensions", None):
        return None  # (numba-cuda runs argument extensions at each launch: it launches these)
    fields: list = []
    writeback: list = []
    try:
        for ty, value in zip(compiled.argument_types, args):
            compiled._prepare_args(ty, value, configured.stream, writeback, fields)
        kernel = compiled._codelibrary.get_cufunc().kernel
        coop = "is_cooperative" if getattr(dispatcher, "CUDA_CORE_GE_1_0", True) else "cooperative_launch"
        lc = dispatcher.LaunchConfig(grid=configured.griddim, block=configured.blockdim,
                                     shmem_size=configured.sharedmem, **{coop: compiled.cooperative})
    except Exception:  # another numba-cuda: launch through it
        return None
    if writeback:
        return None
    core_launch, stream = dispatcher.launch, configured.stream
    return lambda: core_launch(stream, lc, kernel, *fields)


def failed() -> str | None:
    """Why prepared launches were turned off in this process (None: they were not)."""
    return _state["failed"]
