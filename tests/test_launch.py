"""Prepared CUDA launches (mdnumba/kernels/launch.py): their keys, when they are made and used, and
what they hand to the driver call; the item sweeps' opt-in to more shared memory and the staged
layout's row limit; with stand-ins for numba-cuda's dispatcher and compiled kernel (the GPU runs
of tests/test_cuda.py launch every kernel through them for real)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mdnumba.kernels import launch as L


def device_array(ptr: int, shape: tuple, dtype=np.float32) -> SimpleNamespace:
    """What of a numba device array the keys read: its data pointer, shape, strides, dtype."""
    strides = tuple(int(np.prod(shape[i + 1:])) * np.dtype(dtype).itemsize for i in range(len(shape)))
    return SimpleNamespace(gpu_data=SimpleNamespace(device_pointer_value=ptr), shape=shape, strides=strides,
                           dtype=np.dtype(dtype))


class Compiled:
    """numba-cuda's compiled kernel, as :func:`launch.prepare` uses it: an array's launch fields are
    its pointer and shape; a NumPy array is copied at each launch (a writeback)."""
    argument_types = ("a", "a", "i")
    cooperative = False

    def __init__(self):
        self._codelibrary = SimpleNamespace(get_cufunc=lambda: SimpleNamespace(
            kernel="cufunc", handle="handle", device=SimpleNamespace(id=3)))

    def _prepare_args(self, ty, value, stream, writeback, fields):
        if isinstance(value, np.ndarray):
            writeback.append(value)
        elif ty == "a":
            fields += [value.gpu_data.device_pointer_value, *value.shape]
        else:
            fields.append(value)


class Kernel:
    """A dispatcher: ``kernel[grid, block, stream, shmem](*args)`` records the launch and runs the
    configured launch's pre-launch callbacks with a :class:`Compiled`; as numba-cuda's, it keeps one
    configuration per ``(grid, block, stream, shmem)``."""

    def __init__(self):
        self.launched = []
        self.configured = {}

    def __getitem__(self, conf):
        grid, block, _, shmem = conf
        kernel = self

        class Configured:
            griddim, blockdim, sharedmem, stream = (grid, 1, 1), (block, 1, 1), shmem, "stream"

            def __init__(self):
                self.pre_launch_callbacks = []

            def __call__(self, *args):
                for callback in self.pre_launch_callbacks:
                    callback(Compiled(), self)
                kernel.launched.append(args)

        return self.configured.setdefault(conf, Configured())

    def callbacks_left(self) -> int:
        """Callbacks left on its configurations (a launch must take its own off again)."""
        return sum(len(c.pre_launch_callbacks) for c in self.configured.values())


@pytest.fixture
def prepared(monkeypatch):
    """Prepared launches on (as on a GPU), the driver call recorded."""
    calls = []
    from numba.cuda import dispatcher
    monkeypatch.setattr(L, "SIMULATOR", False)
    monkeypatch.setattr(L.config, "CUDA_PREPARED_LAUNCH", True)
    monkeypatch.setattr(dispatcher, "launch", lambda stream, lc, kernel, *fields: calls.append(
        (stream, lc.grid, lc.block, lc.shmem_size, kernel, fields)))
    monkeypatch.setattr(L, "_state", {"prepared": {}, "seen": set(), "failed": None})
    return calls


def test_keys_follow_the_launch_fields():
    """A device array keys by pointer, shape, strides and dtype (two views of the same memory key
    the same), a scalar by type and value; a host array cannot be prepared."""
    a, view = device_array(4096, (3, 4)), device_array(4096, (3, 4))
    assert L.arg_key(a) == L.arg_key(view)
    others = device_array(4160, (3, 4)), device_array(4096, (4, 3)), device_array(4096, (3, 4), np.float64)
    assert all(L.arg_key(other) != L.arg_key(a) for other in others)
    assert len({L.arg_key(v) for v in (1, True, 1.0, np.float32(1), np.int64(1))}) == 5
    # equal values with other launch fields: a float's sign, a NumPy scalar's unit; a record keys
    assert L.arg_key(0.0) != L.arg_key(-0.0) and L.arg_key(np.float32(0)) != L.arg_key(np.float32(-0.0))
    assert L.arg_key(np.timedelta64(24, "h")) != L.arg_key(np.timedelta64(1, "D"))
    assert hash(L.arg_key(np.zeros((), dtype=[("a", "f4")])[()])) is not None
    assert L.arg_key(np.zeros(3)) is None and L.arg_key((1, 2)) is None
    assert L.launch_key("k", 2, 8, 0, (a, 3)) != L.launch_key("k", 2, 8, 0, (a, 4))
    assert L.launch_key("k", 2, 8, 0, (a, np.zeros(2))) is None


def test_a_launch_is_prepared_once_then_reused(prepared):
    """The first two launches of a key go through the dispatcher, the second prepared from the fields
    numba-cuda makes; the next with the same key (another view of the same memory) is the driver call
    alone, with those fields, grid, block and shared memory; another scalar is another key."""
    kernel = Kernel()
    x, y = device_array(4096, (3, 4)), device_array(8192, (5,))
    for _ in range(2):
        L.launch(kernel, 2, 8, 64, x, y, 7)
    assert len(kernel.launched) == 2 and not prepared and len(L._state["prepared"]) == 1
    L.launch(kernel, 2, 8, 64, device_array(4096, (3, 4)), y, 7)
    assert len(kernel.launched) == 2
    assert prepared == [("stream", (2, 1, 1), (8, 1, 1), 64, "cufunc", (4096, 3, 4, 8192, 5, 7))]
    L.launch(kernel, 2, 8, 64, x, y, 8)
    assert len(kernel.launched) == 3 and len(prepared) == 1 and L._state["seen"]
    assert L.failed() is None and kernel.callbacks_left() == 0


def test_kernels_with_argument_extensions_are_not_prepared(prepared):
    """numba-cuda runs a kernel's argument extensions at each launch: such a kernel always
    launches through it."""
    kernel, x = Kernel(), device_array(4096, (3, 4))
    Compiled.extensions = ["an extension"]
    try:
        for _ in range(3):
            L.launch(kernel, 1, 8, 0, x, x, 1)
    finally:
        del Compiled.extensions
    assert len(kernel.launched) == 3 and not prepared and not L._state["prepared"]


def test_threads_take_turns(prepared):
    """Launches from several threads take turns: each prepared launch gets the compiled kernel of
    its own arguments, not one another thread's launch handed to the capturing callback (it sits
    on the launch configuration the threads share; here a launch waits a moment before running
    the callbacks, and its compiled kernel is named after its first argument)."""
    import threading
    import time
    kernel = Kernel()
    configured = kernel[1, 8, 0, 0]

    def call(*args):  # as Configured.__call__, slowly, with a compiled kernel of these arguments
        time.sleep(0.002)
        compiled = Compiled()
        compiled._codelibrary = SimpleNamespace(get_cufunc=lambda: SimpleNamespace(
            kernel=f"cufunc{args[0].gpu_data.device_pointer_value}"))
        for callback in list(configured.pre_launch_callbacks):
            callback(compiled, configured)
        kernel.launched.append(args)
    type(configured).__call__ = lambda self, *args: call(*args)
    arrays = [device_array(4096 * (i + 1), (3, 4)) for i in range(4)]

    def work(x):
        for _ in range(5):
            L.launch(kernel, 1, 8, 0, x, x, 1)
    threads = [threading.Thread(target=work, args=(x,)) for x in arrays]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kernel.callbacks_left() == 0 and L.failed() is None
    assert len(kernel.launched) == 8 and len(prepared) == 4 * 3
    assert all(handle == f"cufunc{fields[0]}" for _, _, _, _, handle, fields in prepared)


def test_keys_are_forgotten_past_the_limit(prepared, monkeypatch):
    """Past MAX_PREPARED keys (seen or prepared) all are forgotten: a key then starts over."""
    monkeypatch.setattr(L, "MAX_PREPARED", 3)
    kernel = Kernel()
    x = device_array(4096, (3, 4))
    for n in (1, 1, 2, 3):
        L.launch(kernel, 1, 8, 0, x, x, n)
    assert len(L._state["prepared"]) == 1 and len(L._state["seen"]) == 2
    L.launch(kernel, 1, 8, 0, x, x, 4)
    assert not L._state["prepared"] and L._state["seen"] == {L.launch_key(kernel, 1, 8, 0, (x, x, 4))}
    L.launch(kernel, 1, 8, 0, x, x, 1)
    assert len(kernel.launched) == 6 and not prepared


def test_host_arrays_and_a_failed_driver_call_launch_through_numba_cuda(prepared):
    """An argument numba-cuda copies at each launch (a host array) is never prepared; a prepared
    launch that raises turns prepared launches off, says why, and the launch goes through
    numba-cuda, as every later one."""
    kernel = Kernel()
    x = device_array(4096, (3, 4))
    for _ in range(2):
        L.launch(kernel, 1, 8, 0, x, np.zeros(2), 1)
    assert len(kernel.launched) == 2 and not prepared and not L._state["prepared"]
    for _ in range(2):
        L.launch(kernel, 1, 8, 0, x, x, 1)
    (key,) = L._state["prepared"]

    def broken():
        raise RuntimeError("driver says no")
    L._state["prepared"][key] = broken
    L.launch(kernel, 1, 8, 0, x, x, 1)
    assert L.failed() == "RuntimeError: driver says no" and not L._state["prepared"]
    assert len(kernel.launched) == 5
    for _ in range(2):
        L.launch(kernel, 1, 8, 0, x, x, 1)
    assert len(kernel.launched) == 7 and not prepared and not L._state["prepared"]


def test_item_sweeps_opt_in_to_their_shared_memory_once(monkeypatch):
    """On a GPU an item sweep past 48 KiB of dynamic shared memory sets the compiled kernel's opt-in
    attribute to its size, on its device, before its first launch, once per kernel, argument types
    and size (a prepared launch finds it set); 48 KiB or less sets nothing."""
    from numba.cuda.cudadrv.driver import binding, driver

    from mdnumba.kernels import wavefront_cuda as W
    set_calls, compiled_for = [], []

    class Dispatcher:
        def typeof_pyval(self, a):
            return type(a).__name__

        def compile(self, types):
            compiled_for.append(types)
            return Compiled()
    monkeypatch.setitem(vars(driver), "cuKernelSetAttribute", lambda *a: set_calls.append(a))
    monkeypatch.setattr(W, "SIMULATOR", False)
    monkeypatch.setattr(W.cuda, "get_current_device", lambda: SimpleNamespace(id=3))
    monkeypatch.setitem(W._state, "opt_in", set())
    kernel, x = Dispatcher(), np.zeros((3, 4), np.float32)
    for shmem in (W.SHARED_BYTES_LIMIT, W.SHARED_BYTES_LIMIT + 16, W.SHARED_BYTES_LIMIT + 16):
        W._opt_in_shared(kernel, (x, 1), shmem)
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    assert set_calls == [(attr, W.SHARED_BYTES_LIMIT + 16, "handle", 3)]
    assert compiled_for == [("ndarray", "int")]


def test_staged_layout_refuses_rows_past_its_int32_row_table():
    """The staged tile keeps its rows' sources in int32: a sweep of 2**31 rows or more (cells x
    batch x scans) runs flat, said; one row fewer may stay staged (checked before any GPU query)."""
    from mdnumba.kernels import wavefront_cuda as W
    tpb = W.config.THREADS_PER_BLOCK
    cells = np.array([0, 1, 2 ** 15])  # offsets of the hyperplanes' cells

    def note(B):
        try:
            return W._plan_slices(None, (), 1, 2, 1, B, cells, 4, "staged", None, tpb)[3]
        except Exception as exc:  # past the check: the co-residency query needs a GPU
            return f"queried the GPU: {type(exc).__name__}"
    assert note(2 ** 16) == ("flat layout: 2147483648 rows, past what the staged tile's int32 row "
                             "table indexes")
    assert "int32" not in note(2 ** 16 - 1)
