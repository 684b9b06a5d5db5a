"""A stricter CUDA simulator for the ``sim_*`` cases: a launch's blocks run concurrently.

numba-cuda's simulator runs a launch's blocks one after another and lets a cooperative grid
have one block only (``max_cooperative_grid_blocks`` is 1, ``this_grid().sync()`` is a
block barrier). Then a kernel whose blocks split a hyperplane's work wrongly, skip a grid
sync or give a block its own copy of what must be shared passes the simulator and fails on
the GPU. :func:`install` makes every launch run like hardware would allow it to:

- all blocks of a launch at once, one Python thread per CUDA thread, started in a shuffled
  order (reproducible; a GPU schedules blocks in any order); larger launches in waves of
  :data:`WAVE_THREADS` threads, as a GPU may run them;
- ``max_cooperative_grid_blocks`` returns ``coop_blocks``, so the cooperative sweeps run on
  several blocks, and ``this_grid().sync()`` is a barrier of every thread of the grid (an
  error in a launch larger than that, as the driver refuses it);
- ``syncthreads()`` a barrier of the block's threads, shared memory one copy per block;
- a barrier some threads skip (they return, or wait at another barrier) raises
  :class:`DivergentSync` naming both, instead of hanging or, as in numba's simulator,
  releasing the others.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager

import numpy as np
from numba.cuda import types
from numba.cuda.np import numpy_support
from numba.cuda.simulator import kernel as simkernel
from numba.cuda.simulator import kernelapi

#: threads of one wave of a launch too large to run all at once
WAVE_THREADS = 512


class DivergentSync(RuntimeError):
    """Threads that must meet at a barrier do not: the kernel would hang or race on a GPU."""


class _Aborted(Exception):
    """Raised in the other threads of a launch once one thread failed."""


class _Barriers:
    """The barriers of one wave of blocks under one lock: ``("grid",)`` needs every thread of
    the grid, ``("block", b)`` every thread of block b. A thread arriving at a barrier that a
    returned thread would have to reach, or the last running thread waiting while no barrier
    can open, is a :class:`DivergentSync`."""

    def __init__(self, blocks: list, per_block: int, grid_sync_ok: bool):
        self.cond = threading.Condition()
        self.parties = {("grid",): len(blocks) * per_block, **{("block", b): per_block for b in blocks}}
        self.arrived = dict.fromkeys(self.parties, 0)
        self.generation = dict.fromkeys(self.parties, 0)
        self.returned = dict.fromkeys(blocks, 0)
        self.running, self.waiting = len(blocks) * per_block, 0
        self.grid_sync_ok, self.error = grid_sync_ok, None

    def _fail(self, msg: str):
        self.error = msg
        self.cond.notify_all()
        raise DivergentSync(msg)

    def wait(self, key: tuple, block, who: str) -> None:
        """Block until every thread of ``key`` arrived (``block``: the caller's)."""
        with self.cond:
            if self.error:
                raise _Aborted(self.error)
            if key == ("grid",) and not self.grid_sync_ok:
                self._fail(f"{who}: this_grid().sync() in a launch of more blocks than "
                           "max_cooperative_grid_blocks (the driver refuses such a launch)")
            gone = sum(self.returned.values()) if key == ("grid",) else self.returned[block]
            if gone:
                self._fail(f"{who} waits at {key[0]} sync, but {gone} thread(s) it waits for returned")
            self.arrived[key] += 1
            if self.arrived[key] == self.parties[key]:
                self.waiting -= self.arrived[key] - 1
                self.arrived[key] = 0
                self.generation[key] += 1
                self.cond.notify_all()
                return
            self.waiting += 1
            self._check_deadlock(who)
            gen = self.generation[key]
            while self.generation[key] == gen and not self.error:
                self.cond.wait()
            if self.generation[key] == gen:
                raise _Aborted(self.error)

    def leave(self, block, who: str) -> None:
        """The calling thread returned from the kernel."""
        with self.cond:
            if self.error:
                return
            self.returned[block] += 1
            self.running -= 1
            if self.arrived[("grid",)] or self.arrived[("block", block)]:
                self._fail(f"{who} returned while other threads wait for it at a sync")
            self._check_deadlock(who)

    def abort(self, msg: str) -> None:
        with self.cond:
            self.error = self.error or msg
            self.cond.notify_all()

    def _check_deadlock(self, who: str) -> None:
        if self.running and self.waiting == self.running:
            waits = {k: n for k, n in self.arrived.items() if n}
            self._fail(f"every running thread waits at a sync and none can open (arrivals {waits}, "
                       f"last: {who}): threads wait at different syncs")


class _BlockShared:
    """``cuda.shared`` of one block: an array per allocating source line, like numba's
    simulator, but one set per block and safe when the block's threads allocate at once."""

    def __init__(self, dynshared_size: int):
        self._lock = threading.Lock()
        self._arrays = {}
        self._dynamic = np.zeros(dynshared_size, dtype=np.byte)

    def array(self, shape, dtype, alignment=None):
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        dtype = np.dtype(dtype)
        if shape == 0:
            return np.frombuffer(self._dynamic.data, dtype=dtype, count=self._dynamic.size // dtype.itemsize)
        caller = sys._getframe(1)
        with self._lock:
            key = (caller.f_code.co_filename, caller.f_lineno)
            if key not in self._arrays:
                self._arrays[key] = np.empty(shape, dtype)
            return self._arrays[key]


class _CudaThread(threading.Thread):
    """One CUDA thread: what numba's simulated ``cuda`` module asks ``current_thread()`` for."""

    def __init__(self, fn, args, barriers: _Barriers, shared: _BlockShared, block, thread, block_dim):
        super().__init__(daemon=True)
        self._fn, self._args, self._barriers = fn, args, barriers
        self.block_shared = shared
        self.blockIdx, self.threadIdx = kernelapi.Dim3(*block), kernelapi.Dim3(*thread)
        self.thread_id = thread[0] + block_dim[0] * (thread[1] + block_dim[1] * thread[2])
        self.who = f"thread {list(thread)} of block {list(block)}"
        self.exception = None

    def syncthreads(self) -> None:
        self._barriers.wait(("block", tuple(self.blockIdx)), tuple(self.blockIdx), self.who)

    def grid_sync(self) -> None:
        self._barriers.wait(("grid",), tuple(self.blockIdx), self.who)

    def run(self) -> None:
        try:
            self._fn(*self._args)
            self._barriers.leave(tuple(self.blockIdx), self.who)
        except BaseException as exc:  # re-raised by the launching thread
            self.exception = exc
            if not isinstance(exc, _Aborted | DivergentSync):
                self._barriers.abort(f"{self.who} raised {type(exc).__name__}")


class _ConcurrentGrid:
    """Stands in for the simulator's ``BlockManager`` (one per block of a launch): the first
    block's :meth:`run` runs every block of the launch, the others' do nothing."""

    coop_blocks = 1
    launches = 0

    def __init__(self, fn, grid_dim, block_dim, debug):
        self._fn, self._grid_dim, self._block_dim = fn, tuple(grid_dim), tuple(block_dim)

    def run(self, grid_point, *args) -> None:
        if any(grid_point):
            return
        _ConcurrentGrid.launches += 1
        order = np.random.default_rng(_ConcurrentGrid.launches)  # reproducible from run to run
        blocks = [tuple(b) for b in order.permutation(list(np.ndindex(*self._grid_dim)))]
        per_block = int(np.prod(self._block_dim))
        per_wave = max(1, WAVE_THREADS // per_block)
        module = simkernel._get_kernel_context()
        for w in range(0, len(blocks), per_wave):
            self._run_wave(blocks[w:w + per_wave], per_block, len(blocks) <= self.coop_blocks,
                           module._shared._dynshared_size, args, order)

    def _run_wave(self, blocks, per_block, grid_sync_ok, dynshared_size, args, order) -> None:
        barriers = _Barriers(blocks, per_block, grid_sync_ok)
        threads = []
        for b in blocks:
            shared = _BlockShared(dynshared_size)
            threads += [_CudaThread(self._fn, args, barriers, shared, b, t, self._block_dim)
                        for t in np.ndindex(*self._block_dim)]
        for i in order.permutation(len(threads)):
            threads[i].start()
        for t in threads:
            t.join()
        failed = sorted((t for t in threads if t.exception is not None),
                        key=lambda t: isinstance(t.exception, _Aborted))  # the cause first
        if failed:
            if hasattr(failed[0].exception, "add_note"):  # Python >= 3.11
                failed[0].exception.add_note(f"in {failed[0].who}")
            raise failed[0].exception


@contextmanager
def install(coop_blocks: int = 3):
    """Run simulated launches with concurrent blocks (see the module docstring) inside the
    ``with``; cooperative grids get up to ``coop_blocks`` blocks."""
    patches = [
        (simkernel, "BlockManager", type("ConcurrentGrid", (_ConcurrentGrid,), {"coop_blocks": coop_blocks})),
        (simkernel.FakeOverload, "max_cooperative_grid_blocks", lambda self, blockdim: coop_blocks),
        (kernelapi.GridGroup, "sync", lambda self: threading.current_thread().grid_sync()),
        (kernelapi.FakeCUDAModule, "shared",
         property(lambda self: getattr(threading.current_thread(), "block_shared", self._shared))),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, _ in saved:
        if name not in vars(obj):
            raise RuntimeError(f"numba-cuda's simulator changed: {obj.__name__}.{name} is gone")
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
