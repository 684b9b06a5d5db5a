"""The parallel CPU drivers' decorator: ``@parallel_njit`` compiles with
:data:`~mdnumba.config.NJIT_PARALLEL_OPTS` and makes the drivers safe to call from several
Python threads at once.

The kernels release the GIL (``nogil=True``), so a program may run different layers in a
thread pool. Numba's GNU OpenMP and TBB threading layers take that; its ``workqueue`` layer,
the one Numba falls back to where neither is installed (no libgomp, e.g. slim Linux images
or a pip-installed Numba on macOS), aborts the whole process ("Concurrent access has been
detected"). Under workqueue a :class:`ParallelKernel` therefore runs one driver call at a
time (a process-wide lock); under the other layers it calls the dispatcher directly.

Processes: in a child forked after its parent started Numba's GNU OpenMP thread pool (a
``multiprocessing`` pool's default start method on Linux up to Python 3.13, after any layer call
in the parent), Numba ends the process at its first parallel call ("Terminating: fork() called
from a process already using GNU OpenMP"), and the pool waits forever for that worker. A driver
called there raises :class:`ForkedProcessError` instead, saying what to do; a forked child gets
a fresh workqueue lock (another thread of the parent may have held it at the fork).
"""

from __future__ import annotations

import functools
import os
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
#: this process was forked after its parent had started Numba's thread pool (checked at the next call)
_forked_after_pool = False


class ForkedProcessError(RuntimeError):
    """A parallel CPU kernel called in a process forked from one that ran GNU OpenMP's threads."""


def _after_fork_in_child() -> None:
    """``os.register_at_fork`` hook: fresh locks (a thread of the parent may have held one: it is
    not in the child to release it); note whether the pool was running."""
    global _serial_lock, _init_lock, _forked_after_pool
    _init_lock = threading.Lock()
    if _serial_lock:
        _serial_lock = threading.Lock()
    _forked_after_pool = bool(_numba_parallel._is_initialized)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_not_forked_from_gnu_openmp() -> None:
    """:class:`ForkedProcessError` in a child forked after its parent started Numba's GNU OpenMP
    pool (Numba would end the process); once checked, and passed, not again."""
    global _forked_after_pool
    if numba.threading_layer() == "omp":
        from numba.np.ufunc import omppool
        if omppool.openmp_vendor == "GNU":
            raise ForkedProcessError(
                "mdnumba's CPU kernels cannot run in this process: it was forked (multiprocessing's "
                "'fork' start method) from one that had run Numba's parallel code on GNU OpenMP, "
                "which cannot run in a forked child (Numba would end the process). Start the worker "
                "processes with 'spawn' or 'forkserver' (multiprocessing.get_context('spawn'), or "
                "ProcessPoolExecutor(mp_context=...)), or set NUMBA_THREADING_LAYER=workqueue before "
                "the parent imports numba")
    _forked_after_pool = False


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
        if _forked_after_pool:
            check_not_forked_from_gnu_openmp()
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
