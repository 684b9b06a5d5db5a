"""A stricter CUDA simulator for the ``sim_*`` cases: blocks run at once, races are errors.

numba-cuda's simulator runs a launch's blocks one after another and lets a cooperative grid
have one block only (``max_cooperative_grid_blocks`` is 1, ``this_grid().sync()`` is a
block barrier). Then a kernel whose blocks split a hyperplane's work wrongly, skip a grid
sync or give a block its own copy of what must be shared passes the simulator and fails on
the GPU. :func:`install` makes every launch run like hardware would allow it to:

- all blocks of a launch at once, one Python thread per CUDA thread, started in a shuffled
  order (reproducible; a GPU schedules blocks in any order); larger launches in waves of
  :data:`WAVE_THREADS` threads, as a GPU may run them (not a grid that may sync: its blocks are
  co-resident, so a wave of its own would meet other grid barriers than the rest);
- ``max_cooperative_grid_blocks`` returns ``coop_blocks``, so the cooperative sweeps run on
  several blocks, and ``this_grid().sync()`` is a barrier of every thread of the grid (an
  error in a launch larger than that, as the driver refuses it);
- ``syncthreads()`` a barrier of the block's threads, shared memory one copy per block;
- a barrier some threads skip (they return, or wait at another barrier) raises
  :class:`DivergentSync` saying which thread, instead of hanging or, as in numba's simulator,
  releasing the others; so do threads of a block meeting at ``syncthreads()`` calls in different
  places (source line and the calls that led there: ``bar.sync`` is one instruction all of a
  block's threads must execute, and device functions are inlined);
- ``device_array`` checks its shape as the GPU's does (a NumPy integer is refused there), and
  mdnumba's host code may not slice a device array into a strided view (:class:`StridedDeviceView`:
  numba-cuda builds one in Python piece by piece, 12 ms for 16k rows); ``reshape`` of a strided
  device array raises NotImplementedError and ``is_c_contiguous`` is False for a stride of 0,
  as numba-cuda's (the simulator's copies, and asks NumPy);
- memory a GPU leaves uninitialised (``device_array``, shared and local arrays) holds NaN
  or a huge integer, not numba's ``np.empty`` (often zeros);
- every access to an element of a global or shared array is checked against the others
  (:class:`_RaceCheck`): two threads touching one element, one of them writing, with no
  barrier, or atomic between fences, ordering them raise :class:`DataRace` naming both,
  whatever order the threads happened to run in;
- atomics are relaxed, as on a GPU: a hand-off through an atomic counter orders the data
  around it only with ``threadfence()`` on both sides (before the count to publish, after it
  to read), the fences a GPU's caches need.

Threads run one at a time under the GIL, so this checks the order the kernels ask for, not
the GPU's caches themselves: the real-GPU run still has the last word.
"""

from __future__ import annotations

import contextlib
import importlib.util
import operator
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from numba import cuda
from numba.cuda import api_util, simulator, types
from numba.cuda.np import numpy_support
from numba.cuda.simulator import kernel as simkernel
from numba.cuda.simulator import kernelapi
from numba.cuda.simulator.cudadrv import devicearray
from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray, FakeWithinKernelCUDAArray

#: threads of one wave of a launch too large to run all at once
WAVE_THREADS = 512
#: what :func:`install` replaced (the tracked versions call it)
_ORIGINAL = {}
#: ``id`` of the globals of each mdnumba module whose ``cuda`` the running launch holds swapped
#: for the simulator's (:meth:`_ConcurrentGrid.run`)
_HELD: set = set()


class SimulatorHazard(RuntimeError):
    """Something a GPU may run differently from the simulator (the kernel's bug)."""


class DivergentSync(SimulatorHazard):
    """Threads that must meet at a barrier do not: the kernel would hang or race on a GPU."""


class DataRace(SimulatorHazard):
    """Two threads access one element, at least one writes, and neither a barrier nor an
    atomic orders them: the result depends on the GPU's scheduling."""


class StridedDeviceView(SimulatorHazard):
    """Host code sliced a device array into a view that is not contiguous: numba-cuda builds
    one in Python, a step per contiguous piece (12 ms for a column block of 16k rows on an
    H200); the simulator's is a NumPy view. Slice whole rows, or pass offsets to a kernel."""


class _Aborted(Exception):
    """Raised in the other threads of a launch once one thread failed."""


class _RaceCheck:
    """Happens-before between the threads of one launch, with vector clocks (the method of
    ThreadSanitizer): ``clock[t, u]`` is the latest step of thread u that thread t is ordered
    after. A barrier joins its threads' clocks. Atomics are relaxed, with fences as in C++:
    ``threadfence()`` snapshots its thread's clock (``fenced``) and takes in what the thread's
    atomics read since (``acquired``); an atomic on an element adds ``fenced`` to the clock
    the element carries and reads that clock into ``acquired``. A barrier shares its threads'
    ``fenced`` and ``acquired`` too (a fence is cumulative: it publishes what its thread has
    seen, the block's writes before a barrier included), a grid sync fences. Each element
    keeps its last write and the reads since, by thread and step; an access conflicting with
    one its thread is not ordered after is a :class:`DataRace`. Atomics themselves are not
    checked against plain accesses."""

    def __init__(self, names: list):
        self.names = names
        self.clock = [{t: 1} for t in range(len(names))]  # sparse: threads never met are at 0
        self.fenced = [{} for _ in names]  # each thread's clock at its last fence (or grid sync)
        self.acquired = [{} for _ in names]  # clocks its atomics read since its last fence
        self.lock = threading.Lock()
        self.shadow = {}  # address -> [(writer, step) or None, {reader: step}]
        self.released = {}  # address -> clock released by the atomics on it
        self.keep = []  # the launch's shared memory

    @staticmethod
    def _max(a: dict, b: dict) -> dict:
        joined = dict(a)
        for t, step in b.items():
            if step > joined.get(t, 0):
                joined[t] = step
        return joined

    def join(self, tids: list, fence: bool = False) -> None:
        """A barrier of ``tids`` opened (called under the barrier's lock); ``fence``: a grid sync."""
        joined, fenced, acquired = {}, {}, {}
        for t in tids:
            joined = self._max(joined, self.clock[t])
            fenced = self._max(fenced, self.fenced[t])
            acquired = self._max(acquired, self.acquired[t])
        if fence:
            joined, acquired = self._max(joined, acquired), {}
            fenced = joined
        for t in tids:  # the shared dicts are replaced, never changed in place
            self.clock[t] = dict(joined)
            self.clock[t][t] += 1
            self.fenced[t], self.acquired[t] = fenced, acquired

    def fence(self, tid: int) -> None:
        """``threadfence()``: acquire what the thread's atomics read, release what it has seen."""
        with self.lock:
            mine = self.clock[tid] = self._max(self.clock[tid], self.acquired[tid])
            self.acquired[tid], self.fenced[tid] = {}, dict(mine)
            mine[tid] += 1

    def atomic(self, tid: int, address: int) -> None:
        """A relaxed read-modify-write: it carries the thread's fenced clock to whoever reads it."""
        with self.lock:
            carried = self.released.get(address, {})
            self.acquired[tid] = self._max(self.acquired[tid], carried)
            self.released[address] = self._max(carried, self.fenced[tid])

    def access(self, tid: int, address: int, write: bool, what) -> None:
        with self.lock:
            seen = self.clock[tid]
            entry = self.shadow.get(address)
            if entry is None:
                entry = self.shadow[address] = [None, {}]
            last = entry[0]
            if last is not None and last[0] != tid and seen.get(last[0], 0) < last[1]:
                self._race(last[0], "wrote", tid, write, what)
            if not write:
                entry[1][tid] = seen[tid]
                return
            for other, step in entry[1].items():
                if other != tid and seen.get(other, 0) < step:
                    self._race(other, "read", tid, write, what)
            entry[0], entry[1] = (tid, seen[tid]), {}

    def _race(self, other: int, did: str, tid: int, write: bool, what) -> None:
        ary, idx = what
        raise DataRace(f"{self.names[other]} {did} element {idx} of a {ary.dtype}{list(ary.shape)} "
                       f"array and {self.names[tid]} {'writes' if write else 'reads'} it, with no "
                       "barrier, or atomic between fences, ordering the two")


def _locate(item: FakeCUDAArray, idx):
    """``(address, shape, strides)`` of ``item[idx]`` when ``idx`` is leading integers (an
    element, or a row view), else None (a slice: a view whose layout is read when needed)."""
    layout = item.__dict__.get("_race_layout")
    if layout is None:  # once per array or view not derived from its parent's
        ary = item._ary
        layout = item.__dict__["_race_layout"] = (ary.__array_interface__["data"][0], ary.shape, ary.strides)
    address, shape, strides = layout
    idx = idx if isinstance(idx, tuple) else (idx,)
    if len(idx) > len(shape):
        return None
    for i, n, stride in zip(idx, shape, strides):
        try:
            i = operator.index(i)
        except TypeError:
            return None
        address += (i + n if i < 0 else i) * stride
    return address, shape[len(idx):], strides[len(idx):]


def _address(item: FakeCUDAArray, idx):
    """Byte address of ``item[idx]`` when ``idx`` picks one element, else None."""
    where = _locate(item, idx)
    return where[0] if where is not None and not where[1] else None


def _record(item: FakeCUDAArray, idx, write: bool) -> None:
    thread = threading.current_thread()
    race = getattr(thread, "race", None)
    if race is not None and not thread.in_atomic:
        address = _address(item, idx)
        if address is not None:
            race.access(thread.tid, address, write, (item._ary, idx))


def _tracked_getitem(self, idx):
    value = _ORIGINAL["getitem"](self, idx)
    if not isinstance(value, FakeWithinKernelCUDAArray):
        _record(self._item, idx, False)
    else:  # a view: a row's layout follows from its parent's (no __array_interface__ per row)
        where = _locate(self._item, idx)
        if where is not None:
            value._item.__dict__["_race_layout"] = where
    return value


def _tracked_setitem(self, idx, value):
    _record(self._item, idx, True)
    _ORIGINAL["setitem"](self, idx, value)


def _tracked_atomic(name: str):
    """FakeCUDAAtomic.<name>, ordered by :meth:`_RaceCheck.atomic` and not recorded as an access."""
    def atomic(self, array, *args):
        thread = threading.current_thread()
        race = getattr(thread, "race", None)
        if race is None:
            return _ORIGINAL[name](self, array, *args)
        index = 0 if name == "compare_and_swap" else args[0]
        race.atomic(thread.tid, _address(array._item, index))
        thread.in_atomic = True
        try:
            return _ORIGINAL[name](self, array, *args)
        finally:
            thread.in_atomic = False
    return atomic


def _fence(self) -> None:
    """``cuda.threadfence()`` (and ``threadfence_system``) in a tracked thread: :meth:`_RaceCheck.fence`."""
    thread = threading.current_thread()
    if getattr(thread, "race", None) is not None:
        thread.race.fence(thread.tid)


class _Barriers:
    """The barriers of one wave of blocks under one lock: ``("grid",)`` needs every thread of
    the grid, ``("block", b)`` every thread of block b. A thread arriving at a barrier that a
    returned thread would have to reach, or the last running thread waiting while no barrier
    can open, is a :class:`DivergentSync`."""

    def __init__(self, blocks: list, per_block: int, grid_sync_ok: bool, race: _RaceCheck, members: dict):
        self.cond = threading.Condition()
        self.race, self.members = race, members  # ("block", b) -> its threads' ids, ("grid",) -> all
        self.parties = {("grid",): len(blocks) * per_block, **{("block", b): per_block for b in blocks}}
        self.arrived = dict.fromkeys(self.parties, 0)
        self.generation = dict.fromkeys(self.parties, 0)
        self.returned = dict.fromkeys(blocks, 0)
        self.running, self.waiting = len(blocks) * per_block, 0
        self.grid_sync_ok, self.error = grid_sync_ok, None
        self.sites: dict = {}  # key -> where its current generation's first thread called it

    def _fail(self, msg: str):
        self.error = msg
        self.cond.notify_all()
        raise DivergentSync(msg)

    def wait(self, key: tuple, block, who: str, site: tuple | None = None) -> None:
        """Block until every thread of ``key`` arrived (``block``: the caller's; ``site``: where
        it called the barrier, the same for every thread of a generation, if given)."""
        with self.cond:
            if self.error:
                raise _Aborted(self.error)
            if site is not None:
                first = self.sites.setdefault(key, site) if not self.arrived[key] else self.sites[key]
                if site != first:
                    self._fail(f"{who} waits at syncthreads() {_where(site)}, other threads of its block "
                               f"at {_where(first)} (a GPU's threads must meet at one)")
            if key == ("grid",) and not self.grid_sync_ok:
                self._fail(f"{who}: this_grid().sync() in a launch of more blocks than "
                           "max_cooperative_grid_blocks (the driver refuses such a launch)")
            gone = sum(self.returned.values()) if key == ("grid",) else self.returned[block]
            if gone:
                self._fail(f"{who} waits at {key[0]} sync, but {gone} thread(s) it waits for returned")
            self.arrived[key] += 1
            if self.arrived[key] == self.parties[key]:
                self.sites.pop(key, None)
                self.race.join(self.members[key], fence=key == ("grid",))
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


_SIMULATOR_DIR = str(Path(kernelapi.__file__).parent)


def _call_site() -> tuple:
    """The kernel's calls that led to this ``syncthreads()``, innermost first: ``(file, line)``
    of each frame of the kernel and its device functions (the simulator's own left out)."""
    frame, site = sys._getframe(2), []
    while frame is not None and not (frame.f_code.co_filename == __file__ and frame.f_code.co_name == "run"):
        name = frame.f_code.co_filename
        if name != __file__ and not name.startswith(_SIMULATOR_DIR):
            site.append((name, frame.f_lineno))
        frame = frame.f_back
    return tuple(site)


def _where(site: tuple) -> str:
    """``file:line`` of a :func:`_call_site`, called from its callers' lines."""
    (name, line), *callers = site
    via = "".join(f" < {line}" for _, line in callers)
    return f"{Path(name).name}:{line}{via}"


class _BlockShared:
    """``cuda.shared`` of one block: an array per allocating source line, like numba's
    simulator, but one set per block and safe when the block's threads allocate at once."""

    def __init__(self, dynshared_size: int):
        self._lock = threading.Lock()
        self._arrays = {}
        self._dynamic = np.full(dynshared_size, -1, dtype=np.int8)  # as float: NaN

    def array(self, shape, dtype, alignment=None):
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        dtype = np.dtype(dtype)
        if shape == 0:
            ary = np.frombuffer(self._dynamic.data, dtype=dtype, count=self._dynamic.size // dtype.itemsize)
            return FakeWithinKernelCUDAArray(FakeCUDAArray(ary))  # accesses race-checked
        caller = sys._getframe(1)
        with self._lock:
            key = (caller.f_code.co_filename, caller.f_lineno)
            if key not in self._arrays:
                self._arrays[key] = FakeWithinKernelCUDAArray(FakeCUDAArray(_poison(np.empty(shape, dtype))))
            return self._arrays[key]


def _poison(ary: np.ndarray) -> np.ndarray:
    """Fill memory a GPU leaves uninitialised with what fails loudly when read: NaN, or an
    integer far past any index (numba's simulator hands out ``np.empty``, often zeros). The NaN
    has every mantissa bit set, as a GPU's do (0x7fffffff in float32; NumPy's has one): bit
    tricks that assume NumPy's NaN (a rounding carry into the exponent) lose it."""
    if ary.dtype.kind in "fc":
        ary.view(np.uint8).fill(0xFF)
    elif ary.dtype.kind in "iu":
        ary.fill(np.iinfo(ary.dtype).max // 2 + 1)
    return ary


def _poisoned_device_array(shape, dtype=np.float64, strides=None, order="C", stream=0):
    # the GPU's check of the shape first: it takes a Python int or a tuple, and refuses a NumPy
    # integer ("'numpy.int64' object is not iterable"), which the simulator's np.ndarray accepts
    api_util.prepare_shape_strides_dtype(shape, strides, dtype, order)
    dev = _ORIGINAL["device_array"](shape=shape, dtype=dtype, strides=strides, order=order, stream=stream)
    _poison(dev._ary)
    return dev


def _contiguous_getitem(self, idx):
    view = _ORIGINAL["host_getitem"](self, idx)
    ary = getattr(view, "_ary", None)
    if ary is None or ary.ndim == 0 or ary.flags.c_contiguous or ary.flags.f_contiguous:
        return view  # an element (most calls: a kernel's reads) or a contiguous view
    # mdnumba's host code only: a kernel slices freely on a GPU, a test may hand over such a view
    in_kernel = isinstance(threading.current_thread(), _CudaThread)
    if not in_kernel and sys._getframe(1).f_globals.get("__name__", "").startswith("mdnumba"):
        raise StridedDeviceView(f"a strided view {ary.shape} of a device array {self._ary.shape} "
                                f"(index {idx!r}); numba-cuda builds it in Python, piece by piece")
    return view


def _real_dummyarray():
    """numba-cuda's own ``cudadrv/dummyarray.py`` (pure Python and NumPy), loaded from its file: the
    simulator puts a stub (``Array = None``) in its place."""
    if "dummyarray" not in _ORIGINAL:
        path = Path(simulator.__file__).parents[1] / "cudadrv" / "dummyarray.py"
        spec = importlib.util.spec_from_file_location("_numba_cuda_real_dummyarray", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _ORIGINAL["dummyarray"] = module
    return _ORIGINAL["dummyarray"]


def _dummy_of(self):
    """numba-cuda's description of the device array ``self`` (its ``_dummy``)."""
    return _real_dummyarray().Array.from_desc(0, self._ary.shape, self._ary.strides, self._ary.itemsize)


def _faithful_is_c_contiguous(self):
    """As numba-cuda's: False for a length-1 axis of stride 0 (``x[..., None]``), which NumPy calls
    C-contiguous."""
    return _dummy_of(self).is_c_contig


def _faithful_reshape(self, *newshape, **kws):
    """``reshape`` as numba-cuda's ``DeviceNDArray.reshape`` decides it (the same dummy-array
    code): NotImplementedError where it needs a copy (a strided array), which the simulator's
    NumPy reshape makes silently."""
    shape = tuple(newshape[0]) if len(newshape) == 1 and isinstance(newshape[0], (tuple, list)) else newshape
    if shape != self._ary.shape:
        dummy = _dummy_of(self)
        _, extents = dummy.reshape(*shape, **kws)  # raises NotImplementedError as on a GPU
        if extents != [dummy.extent]:
            raise NotImplementedError("operation requires copying")
    return _ORIGINAL["reshape"](self, *newshape, **kws)


def _poisoned_local_array(self, shape, dtype, alignment=None):
    return _poison(_ORIGINAL["local"](self, shape, dtype, alignment))


class _CudaThread(threading.Thread):
    """One CUDA thread: what numba's simulated ``cuda`` module asks ``current_thread()`` for."""

    def __init__(self, fn, args, barriers: _Barriers, shared: _BlockShared, block, thread, block_dim,
                 tid: int):
        super().__init__(daemon=True)
        self._fn, self._args, self._barriers = fn, args, barriers
        self.race, self.tid, self.in_atomic = barriers.race, tid, False
        self.block_shared = shared
        self.blockIdx, self.threadIdx = kernelapi.Dim3(*block), kernelapi.Dim3(*thread)
        self.thread_id = thread[0] + block_dim[0] * (thread[1] + block_dim[1] * thread[2])
        self.who = f"thread {list(thread)} of block {list(block)}"
        self.exception = None

    def syncthreads(self) -> None:
        self._barriers.wait(("block", tuple(self.blockIdx)), tuple(self.blockIdx), self.who, _call_site())

    def grid_sync(self) -> None:
        self._barriers.wait(("grid",), tuple(self.blockIdx), self.who)

    def run(self) -> None:
        try:
            self._fn(*self._args)
            self._barriers.leave(tuple(self.blockIdx), self.who)
        except BaseException as exc:  # re-raised by the launching thread
            self.exception = exc
            if not isinstance(exc, _Aborted):
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
        with contextlib.ExitStack() as held:
            _hold_cuda_swapped(held)
            self._run(args)

    def _run(self, args) -> None:
        _ConcurrentGrid.launches += 1
        order = np.random.default_rng(_ConcurrentGrid.launches)  # reproducible from run to run
        blocks = [tuple(map(int, b)) for b in order.permutation(list(np.ndindex(*self._grid_dim)))]
        threads = list(np.ndindex(*self._block_dim))
        race = _RaceCheck([f"thread {list(t)} of block {list(b)}" for b in blocks for t in threads])
        coop = len(blocks) <= self.coop_blocks  # may sync its grid: every block at once, as the driver
        per_wave = len(blocks) if coop else max(1, WAVE_THREADS // len(threads))  # keeps them resident
        dynshared_size = simkernel._get_kernel_context()._shared._dynshared_size
        for w in range(0, len(blocks), per_wave):  # a later wave is not ordered after an earlier one
            self._run_wave(blocks, w, min(len(blocks), w + per_wave), threads, race,
                           coop, dynshared_size, args, order)

    def _run_wave(self, blocks, first, stop, threads, race, grid_sync_ok, dynshared_size, args, order):
        """Blocks ``first..stop-1`` at once; thread t of block number i has id ``i * len(threads) + t``."""
        n = len(threads)
        members = {("grid",): list(range(first * n, stop * n))}
        members.update({("block", blocks[i]): list(range(i * n, (i + 1) * n)) for i in range(first, stop)})
        barriers = _Barriers(blocks[first:stop], n, grid_sync_ok, race, members)
        wave = []
        for i in range(first, stop):
            shared = _BlockShared(dynshared_size)
            race.keep.append(shared)  # alive to the launch's end: no other block gets its addresses
            wave += [_CudaThread(self._fn, args, barriers, shared, blocks[i], t, self._block_dim, i * n + k)
                     for k, t in enumerate(threads)]
        for i in order.permutation(len(wave)):
            wave[i].start()
        for t in wave:
            t.join()
        failed = sorted((t for t in wave if t.exception is not None),
                        key=lambda t: isinstance(t.exception, _Aborted))  # the cause first
        if failed:
            if hasattr(failed[0].exception, "add_note"):  # Python >= 3.11
                failed[0].exception.add_note(f"in {failed[0].who}")
            raise failed[0].exception


def _hold_cuda_swapped(held: contextlib.ExitStack) -> None:
    """For the launch (``held``): every mdnumba module's ``cuda`` the simulator's, as numba's
    simulator swaps it at each device function call (two locks and a context manager: a fifth of
    the cases' time), which :func:`_device_call` then skips."""
    context = simkernel._get_kernel_context()
    for name, module in list(sys.modules.items()):
        if name.startswith("mdnumba.") and hasattr(module, "__dict__"):
            fn = SimpleNamespace(__globals__=vars(module))  # what swapped_cuda_module reads
            held.enter_context(kernelapi.swapped_cuda_module(fn, context))
            _HELD.add(id(vars(module)))
    held.callback(_HELD.clear)


def _type_call(self, *args):
    """``numba.core.types.Type.__call__``: a cast of a number (``numba.int64(x)`` in a kernel)
    without its import at every call and ``isinstance`` against an ABC."""
    if len(args) == 1 and isinstance(args[0], (int, float, np.number)):
        return self.cast_python_value(args[0])
    return _ORIGINAL["type_call"](self, *args)


def _device_call(self, *args):
    """``FakeCUDAKernel.__call__``, a device function of a module the launch holds swapped called
    directly."""
    if self._device and id(self.fn.__globals__) in _HELD:
        return self.fn(*args)
    return _ORIGINAL["kernel_call"](self, *args)


@contextmanager
def install(coop_blocks: int = 3):
    """Run simulated launches with concurrent blocks (see the module docstring) inside the
    ``with``; cooperative grids get up to ``coop_blocks`` blocks."""
    atomics = [name for name, f in vars(kernelapi.FakeCUDAAtomic).items()
               if callable(f) and not name.startswith("_")]
    _ORIGINAL.update(device_array=devicearray.device_array, local=kernelapi.FakeCUDALocal.array,
                     getitem=FakeWithinKernelCUDAArray.__getitem__, host_getitem=FakeCUDAArray.__getitem__,
                     reshape=FakeCUDAArray.reshape, kernel_call=simkernel.FakeCUDAKernel.__call__,
                     type_call=types.Type.__call__,
                     setitem=FakeWithinKernelCUDAArray.__setitem__,
                     **{name: getattr(kernelapi.FakeCUDAAtomic, name) for name in atomics})
    patches = [(kernelapi.FakeCUDAAtomic, name, _tracked_atomic(name)) for name in atomics] + [
        (devicearray, "device_array", _poisoned_device_array),  # device_array_like calls it
        (simulator, "device_array", _poisoned_device_array),
        (cuda, "device_array", _poisoned_device_array),  # under the simulator, the same function
        (kernelapi.FakeCUDALocal, "array", _poisoned_local_array),
        (FakeCUDAArray, "__getitem__", _contiguous_getitem),
        (FakeCUDAArray, "reshape", _faithful_reshape),
        (FakeCUDAArray, "is_c_contiguous", _faithful_is_c_contiguous),
        (FakeWithinKernelCUDAArray, "__getitem__", _tracked_getitem),
        (FakeWithinKernelCUDAArray, "__setitem__", _tracked_setitem),
        (simkernel.FakeCUDAKernel, "__call__", _device_call),
        (types.Type, "__call__", _type_call),
        (simkernel, "BlockManager", type("ConcurrentGrid", (_ConcurrentGrid,), {"coop_blocks": coop_blocks})),
        (simkernel.FakeOverload, "max_cooperative_grid_blocks", lambda self, blockdim: coop_blocks),
        (kernelapi.GridGroup, "sync", lambda self: threading.current_thread().grid_sync()),
        (kernelapi.FakeCUDAModule, "threadfence", _fence),  # threadfence_block: CTA scope, no release
        (kernelapi.FakeCUDAModule, "threadfence_system", _fence),
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
