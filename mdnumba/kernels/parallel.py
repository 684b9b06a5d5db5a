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
_init_lock = threading.Lock()


def serial_lock() -> threading.Lock | bool:
    """The lock every driver call holds under Numba's workqueue layer, or False under a
    threadsafe layer. The first call starts Numba's thread pool (as a first kernel would)
    to learn which layer Numba chose; threads making their first calls at once get one lock."""
    global _serial_lock
    if _serial_lock is None:
        with _init_lock:
            if _serial_lock is None:
                _numba_parallel._launch_threads()  # idempotent
                _serial_lock = threading.Lock() if numba.threading_layer() == "workqueue" else False
    return _serial_lock


class ParallelKernel:
    """A ``parallel=True`` dispatcher called through :func:`serial_lock`. Other attributes
    (``signatures``, ``stats``, ``py_func``, …) are the dispatcher's; copies are the kernel itself,
    and it pickles by name, as a function does."""

    def __init__(self, dispatcher: Callable[..., Any]) -> None:
        self.dispatcher = dispatcher
        functools.update_wrapper(self, getattr(dispatcher, "py_func", dispatcher))  # NUMBA_DISABLE_JIT=1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        lock = serial_lock()
        if not lock:
            return self.dispatcher(*args, **kwargs)
        with lock:
            return self.dispatcher(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "dispatcher":  # not set yet (e.g. on an instance being copied): no recursion
            raise AttributeError(name)
        return getattr(self.dispatcher, name)

    def __copy__(self) -> ParallelKernel:
        return self

    def __deepcopy__(self, memo: dict) -> ParallelKernel:
        return self

    def __reduce__(self) -> str:
        return self.__qualname__  # the module-level name it is bound to, in self.__module__


def parallel_njit(fn: Callable[..., Any]) -> ParallelKernel:
    """``@njit(**NJIT_PARALLEL_OPTS)`` behind :class:`ParallelKernel`."""
    return ParallelKernel(njit(**NJIT_PARALLEL_OPTS)(fn))
