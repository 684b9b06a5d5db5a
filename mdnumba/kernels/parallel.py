"""The parallel CPU drivers' decorator: ``@parallel_njit`` compiles with
:data:`~mdnumba.config.NJIT_PARALLEL_OPTS` and makes the drivers safe to call from several
Python threads at once.

The kernels release the GIL (``nogil=True``), so a program may run different layers in a
thread pool. Numba's GNU OpenMP and TBB threading layers take that; its ``workqueue`` layer,
the one Numba falls back to where neither is installed (no libgomp, e.g. slim Linux images
or a pip-installed Numba on macOS), aborts the whole process ("Concurrent access has been
detected"). Under workqueue a :class:`ParallelKernel` therefore runs one driver call at a
time (a process-wide lock); under the other layers it calls the dispatcher directly.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import numba
from numba import njit
from numba.np.ufunc import parallel as _numba_parallel

from ..config import NJIT_PARALLEL_OPTS

#: None until the first driver call; then a lock under workqueue, else False
_serial_lock: threading.Lock | bool | None = None


def serial_lock() -> threading.Lock | bool:
    """The lock every driver call holds under Numba's workqueue layer, or False under a
    threadsafe layer. The first call starts Numba's thread pool (as a first kernel would)
    to learn which layer Numba chose."""
    global _serial_lock
    if _serial_lock is None:
        _numba_parallel._launch_threads()  # idempotent, and holds Numba's own init lock
        _serial_lock = threading.Lock() if numba.threading_layer() == "workqueue" else False
    return _serial_lock


class ParallelKernel:
    """A ``parallel=True`` dispatcher called through :func:`serial_lock`. Other attributes
    (``signatures``, ``stats``, ``py_func``, …) are the dispatcher's."""

    def __init__(self, dispatcher) -> None:
        self.dispatcher = dispatcher
        functools.update_wrapper(self, dispatcher.py_func)

    def __call__(self, *args):
        lock = serial_lock()
        if not lock:
            return self.dispatcher(*args)
        with lock:
            return self.dispatcher(*args)

    def __getattr__(self, name: str):
        return getattr(self.dispatcher, name)


def parallel_njit(fn: Callable[..., Any]) -> ParallelKernel:
    """``@njit(**NJIT_PARALLEL_OPTS)`` behind :class:`ParallelKernel`."""
    return ParallelKernel(njit(**NJIT_PARALLEL_OPTS)(fn))
