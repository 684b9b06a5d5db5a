"""2D MD-LSTM kernels vs the float64 reference, finite differences, causality."""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from gradcheck import check_layer_gradients
from refcheck import check_against_reference

from mdnumba import LSTM1D, MDLSTM2D
from mdnumba import reference as ref

SHAPES = [(2, 3, 4, 3), (1, 1, 5, 2), (2, 4, 1, 2), (3, 3, 7, 1), (2, 5, 5, 4), (1, 1, 1, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("hidden", [3, 9, 16, 18])
def test_forward_backward_match_reference(shape, dtype, rtol, hidden, rng):
    """Hidden 9: 45 gate columns, register tiles (16 float64 or 32 float32 columns with
    AVX-512) ending in a partial panel; hidden 16: whole float64 tiles of dh in the backward
    sweep; hidden 18: a whole and a partial (2 units) float64 panel in the backward sweep, and
    90 gate columns: 5 whole forward panels and a partial one of 10 columns."""
    layer = MDLSTM2D(shape[-1], hidden, seed=7, dtype=dtype)
    x = rng.standard_normal(shape).astype(dtype)
    check_against_reference(layer, x, rng.standard_normal(shape[:-1] + (hidden,)), rtol)


@pytest.mark.parametrize("directions", [1, 4])
@pytest.mark.parametrize("hidden", [16, 18])
def test_tall_tiles_match_reference(directions, hidden, rng):
    """Batch 13 (groups of 4, 4, 4 and 1 rows): two groups of a cell share a tall register tile
    (8 rows, with 64-byte vectors) in the saving forward, the backward pulls and the saving-free
    forward; a lone group and the scans' boundaries do not."""
    layer = MDLSTM2D(2, hidden, directions=directions, seed=3, dtype=np.float64)
    x = rng.standard_normal((13, 3, 4, 2))
    check_against_reference(layer, x, rng.standard_normal((13, 3, 4, directions * hidden)), 1e-12)
    np.testing.assert_array_equal(layer.forward(x, save=False), layer.forward(x))


def test_named_views_are_up_and_left(rng):
    """U_up acts on the neighbour above (axis 0), U_left on the one to the left."""
    layer = MDLSTM2D(2, 3, seed=1, dtype=np.float64)
    x = rng.standard_normal((1, 3, 4, 2))
    y, _ = ref.mdlstm_forward(x, layer.params.W, [layer.params.U_up, layer.params.U_left],
                              layer.params.b)
    np.testing.assert_allclose(layer.forward(x), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 4, 2), (1, 2, 3, 1)])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("hidden", [3, 16, 18])
def test_gradients_finite_differences(shape, zeros, hidden, rng):
    """Hidden 16: whole register tiles in both sweeps (float64, 16 columns); 18: partial last
    panels of units and columns too."""
    layer = MDLSTM2D(shape[-1], hidden, seed=3, dtype=np.float64)
    layer.params.b[...] = rng.standard_normal(layer.params.b.shape) * 0.5
    x = np.zeros(shape) if zeros else rng.standard_normal(shape)
    check_layer_gradients(layer, x, rng)


def test_zero_input_gives_finite_gradients():
    layer = MDLSTM2D(2, 4, seed=0)
    y = layer.forward(np.zeros((2, 6, 6, 2), np.float32))
    dx = layer.backward(np.ones_like(y))
    assert np.isfinite(dx).all() and np.isfinite(layer.grads.data).all()
    assert np.abs(layer.grads.data).max() > 0


@pytest.mark.parametrize("make, shape", [
    (lambda: MDLSTM2D(2, 3, dtype=np.float64), (2, 3, 3, 2)),
    (lambda: MDLSTM2D(2, 3, directions=4, dtype=np.float64), (2, 3, 3, 2)),
    (lambda: LSTM1D(2, 3, directions=2, dtype=np.float64), (2, 4, 2))], ids=["2d", "2d-4dirs", "1d-2dirs"])
def test_backward_accumulates_and_zero_grad(rng, make, shape):
    """Every direction's gradients add to what is there (one overwrote them)."""
    layer = make()
    x = rng.standard_normal(shape)
    dh = rng.standard_normal(layer.forward(x).shape)
    layer.backward(dh)
    once = layer.grads.data.copy()
    layer.backward(dh)
    np.testing.assert_allclose(layer.grads.data, 2 * once, rtol=1e-12)
    layer.zero_grad()
    assert not layer.grads.data.any()


def test_causality(rng):
    """h(i, j) ignores inputs below/right of it and depends on (i-1, j-1)."""
    layer = MDLSTM2D(2, 4, seed=1, dtype=np.float64)
    x = rng.standard_normal((1, 5, 6, 2))
    y = layer.forward(x)
    i, j = 2, 3
    for (a, b) in [(i + 1, j), (i, j + 1), (4, 5), (i + 1, j - 1), (i - 1, j + 1)]:
        x2 = x.copy()
        x2[0, a, b] += 1.0
        assert layer.forward(x2)[0, i, j].tolist() == y[0, i, j].tolist(), (a, b)
    x2 = x.copy()
    x2[0, i - 1, j - 1] += 1.0
    assert np.abs(layer.forward(x2)[0, i, j] - y[0, i, j]).max() > 1e-6


def test_same_result_with_one_or_two_threads(rng):
    """Bit-identical on one thread and on two (README: results do not depend on the threads)."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread only (NUMBA_NUM_THREADS): nothing to compare")
    x = rng.standard_normal((4, 9, 7, 3)).astype(np.float32)
    results = []
    old = numba.get_num_threads()
    try:
        for n in (1, 2):
            numba.set_num_threads(n)
            layer = MDLSTM2D(3, 8, seed=2)
            y = layer.forward(x)
            dx = layer.backward(np.cos(y))
            results.append((y, dx, layer.grads.data.copy()))
    finally:
        numba.set_num_threads(old)
    for name, a, b in zip(("h", "dx", "grads"), *results):
        np.testing.assert_array_equal(a, b, err_msg=name)


THREADED_LAYERS = """
import threading, numpy as np, numba
from mdnumba import LSTM1D, MDLSTM2D, GridLSTM2D, Linear
rng = np.random.default_rng(0)
cases = [(MDLSTM2D(3, 5, directions=4, seed=1), rng.standard_normal((3, 4, 5, 3))),
         (GridLSTM2D(5, 2, seed=2), rng.standard_normal((3, 6, 5))),
         (LSTM1D(3, 5, seed=3), rng.standard_normal((3, 6, 3))),
         (Linear(3, 5, seed=4), rng.standard_normal((3, 7, 3)))]
cases = [(layer, x.astype(np.float32)) for layer, x in cases]
def run(layer, x, out):
    for _ in range(30):
        layer.grads.data[:] = 0
        h = layer.forward(x)
        out.append((h, layer.backward(np.cos(h)), layer.grads.data.copy()))
alone = [[] for _ in cases]
for (layer, x), out in zip(cases, alone):
    run(layer, x, out)
together = [[] for _ in cases]
threads = [threading.Thread(target=run, args=(layer, x, out)) for (layer, x), out in zip(cases, together)]
for t in threads: t.start()
for t in threads: t.join()
same = all(np.array_equal(a, b) for r1, r2 in zip(alone, together)
           for t1, t2 in zip(r1, r2) for a, b in zip(t1, t2))
print(numba.threading_layer(), len(together[0]), same)
"""


def test_layers_run_in_python_threads_under_workqueue():
    """Layers release the GIL, so a thread pool may run several at once. Numba's workqueue
    layer (its fallback without OpenMP or TBB) aborted the process on such concurrent calls;
    the drivers now take turns there (mdnumba/kernels/parallel.py), with the same results."""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    run = subprocess.run([sys.executable, "-c", THREADED_LAYERS], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["workqueue", "30", "True"], run.stdout


FORKED_WORKERS = """
import multiprocessing as mp, threading, numpy as np, numba
from mdnumba import MDLSTM2D
from mdnumba.kernels import parallel
def work(x):
    return float(MDLSTM2D(1, 3, seed=0).forward(x).sum())
if __name__ == "__main__":
    x = np.random.default_rng(0).random((2, 4, 5, 1), dtype=np.float32)
    want = work(x)  # in the parent: Numba's pool runs
    lock, held = parallel.serial_lock(), threading.Event()
    if lock:  # workqueue: another thread holds the drivers' lock when the workers fork
        threading.Thread(target=lambda: (lock.acquire(), held.set()), daemon=True).start()
        held.wait()
    try:
        with mp.get_context("fork").Pool(1) as pool:
            got = pool.apply_async(work, (x,)).get(timeout=120)
        print(numba.threading_layer(), got == want)
    except Exception as exc:
        print(numba.threading_layer(), type(exc).__name__, exc)
"""


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_forked_workers_compute_or_say_what_to_do(layer):
    """A multiprocessing pool forked after the parent ran a layer: on GNU OpenMP Numba ended each
    worker at its first parallel call and the pool waited forever; now the worker raises
    ForkedProcessError naming the fixes, which the pool hands back. Under workqueue (fork-safe)
    the workers compute, also when another thread held the drivers' lock at the fork (the child's
    copy stayed held: a deadlock)."""
    env = dict(os.environ, **({"NUMBA_THREADING_LAYER": layer} if layer != "default" else {}))
    run = subprocess.run([sys.executable, "-c", FORKED_WORKERS], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    chosen = run.stdout.split()[0]
    if layer == "workqueue":
        assert run.stdout.split() == ["workqueue", "True"], run.stdout + run.stderr[-2000:]
    elif chosen == "omp" and _gnu_openmp():
        assert run.stdout.startswith("omp ForkedProcessError mdnumba's CPU kernels cannot run in this "
                                     "process: it was forked"), run.stdout + run.stderr[-2000:]
        assert "'spawn' or 'forkserver'" in run.stdout and "NUMBA_THREADING_LAYER=workqueue" in run.stdout
    else:  # TBB, Intel or LLVM OpenMP: fork-safe
        assert run.stdout.split() == [chosen, "True"], run.stdout


def _gnu_openmp() -> bool:
    try:
        from numba.np.ufunc import omppool
    except ImportError:
        return False
    return omppool.openmp_vendor == "GNU"


def test_threads_starting_together_share_one_lock(monkeypatch):
    """Threads whose first kernel calls come at once all get the one workqueue lock (each made
    its own, and their kernels ran side by side: the abort again)."""
    import threading
    import time

    from mdnumba.kernels import parallel

    def slow_workqueue():
        time.sleep(0.01)  # widens the window between the check and the set
        return "workqueue"
    monkeypatch.setattr(parallel, "_serial_lock", None)
    monkeypatch.setattr(parallel.numba, "threading_layer", slow_workqueue)
    start, locks = threading.Barrier(8), []

    def first_call():
        start.wait()
        locks.append(parallel.serial_lock())
    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(locks) == 8 and all(lock is locks[0] for lock in locks) and locks[0]


def test_a_layer_refuses_a_second_thread_while_one_runs_in_it(monkeypatch):
    """Two threads calling one layer (or stack) would mix its saved activations and buffers (wrong
    gradients, no error): a call while another thread is inside forward or backward is refused,
    saying to give each thread its own, before the stack's first stage runs; a copy made during a
    call is free; the guard is released when the call ends, also by an error."""
    import copy
    import threading

    from mdnumba import Linear, layers
    from mdnumba.stack import Sequential
    layer = MDLSTM2D(1, 2)
    net = Sequential(layer, Linear(2, 1))
    x = np.ones((1, 3, 3, 1), np.float32)
    net.forward(x)  # compiled, before the kernel is held
    inside, release, sweep = threading.Event(), threading.Event(), layers.wavefront_forward

    def held_sweep(*args, **kw):
        inside.set()
        release.wait(60)
        return sweep(*args, **kw)
    monkeypatch.setattr(layers, "wavefront_forward", held_sweep)
    first = threading.Thread(target=net.forward, args=(x,))
    first.start()
    assert inside.wait(60)
    for name, call in (("MDLSTM2D", lambda: layer.forward(x)), ("Sequential", lambda: net.forward(2 * x)),
                       ("MDLSTM2D", lambda: layer.backward(np.ones((1, 3, 3, 2), np.float32)))):
        with pytest.raises(RuntimeError, match=f"this {name} is running a forward or backward in another "
                                               r"thread; .*give each thread its own \(copy.deepcopy"):
            call()
    twin = copy.deepcopy(net)  # not running anything
    release.set()
    first.join()
    monkeypatch.setattr(layers, "wavefront_forward", sweep)
    grads = []
    for each in (net, twin):
        each.forward(x)  # the first thread's forward was x's too: the same gradients
        each.zero_grad()
        each.backward(np.ones((1, 3, 3, 1), np.float32))
        grads.append(each.layers[0].grads.data.copy())
    np.testing.assert_array_equal(*grads)
    with pytest.raises(ValueError):
        layer.forward(np.full((1, 3, 3, 1), np.nan, np.float32))
    out: list = []
    done = threading.Thread(target=lambda: out.append(layer.forward(x)))  # released by the error
    done.start()
    done.join()
    assert len(out) == 1


def test_a_parallel_kernel_copies_pickles_and_takes_keywords():
    """The wrapped drivers behave as the functions they were: a copy is the kernel itself, a
    pickle names it, keyword arguments pass through; and mdnumba imports with the JIT off."""
    import copy
    import pickle

    from mdnumba.kernels.gemm import column_sums
    assert copy.copy(column_sums) is column_sums and copy.deepcopy(column_sums) is column_sums
    assert pickle.loads(pickle.dumps(column_sums)) is column_sums
    out = np.zeros(3, np.float32)
    column_sums(out=out, a=np.ones((5, 3), np.float32), rows=None)
    assert out.tolist() == [5, 5, 5]
    run = subprocess.run([sys.executable, "-c", "import mdnumba, numpy as np; "
                          "print(mdnumba.MDLSTM2D(1, 2).forward(np.ones((1, 2, 2, 1))).shape)"],
                         env=dict(os.environ, NUMBA_DISABLE_JIT="1"), capture_output=True, text=True,
                         timeout=300)
    assert run.stdout.strip() == "(1, 2, 2, 2)", run.stderr[-2000:]


def test_named_views_share_one_flat_buffer():
    layer = MDLSTM2D(3, 4)
    p = layer.params
    assert p.W.shape == (3, 20) and p.U_up.shape == (4, 20) and p.U_left.shape == (4, 20)
    assert p.b.shape == (20,)
    for name in ("W", "U_up", "U_left", "b"):
        assert np.shares_memory(p[name], p.data)
        assert np.shares_memory(layer.grads[name], layer.grads.data)
    assert p.data.size == 3 * 20 + 2 * 4 * 20 + 20
    np.testing.assert_array_equal(p.b[4:12], 0.0)  # 2D forget gates start at 0 (sum of two = 1)
    assert not p.b[:4].any() and not p.b[12:].any()
    p.U_left[0, 0] = 42.0
    assert 42.0 in p.data


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_views_into_their_own_flat_buffer(how, dtype, rng):
    """A layer copied with its optimiser: the copy's views (aliases too) lie in its own ``data``,
    which the copied optimiser updates."""
    import copy
    import pickle

    from mdnumba import Adam
    layer = MDLSTM2D(1, 3, seed=0, dtype=dtype)
    x = rng.random((2, 3, 4, 1)).astype(dtype)
    y = layer.forward(x)
    pair = (layer, Adam(layer, lr=0.1))
    twin, twin_opt = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    for buf in (twin.params, twin.grads):
        for name in ("W", "U", "U_up", "U_left", "b"):
            assert np.shares_memory(buf[name], buf.data), name
    assert not np.shares_memory(twin.params.data, layer.params.data)
    np.testing.assert_array_equal(twin.params.U_left, layer.params.U_left)
    np.testing.assert_array_equal(twin.forward(x), y)
    twin.zero_grad()
    twin.backward(np.ones_like(y), input_grad=False)
    twin_opt.step()
    assert np.abs(twin.forward(x) - y).max() > 1e-3   # the copy learnt
    np.testing.assert_array_equal(layer.forward(x), y)  # the original did not move


def _read_only_copy(layer):
    """``layer`` through pickle protocol 5 with read-only buffers (as joblib memory-maps a large
    layer for its workers)."""
    import pickle
    buffers = []
    data = pickle.dumps(layer, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=[memoryview(b.raw()).toreadonly() for b in buffers])


def test_a_copy_from_read_only_memory_shares_its_weights_and_owns_its_gradients(rng):
    """backward wrote into the read-only gradients of such a copy: a Numba typing error deep in a
    GEMM. Now the copy reads the shared weights and accumulates into gradients of its own (with
    their aliases). Computed with a Linear (the layers' read-only weights compile kernels of their
    own: ~14 s for an MDLSTM2D, checked by hand, more for a Grid LSTM)."""
    from mdnumba import Linear
    layer = MDLSTM2D(2, 3, seed=0)
    layer.grads.data[:] = rng.random(layer.grads.data.size)
    twin = _read_only_copy(layer)
    assert not twin.params.data.flags.writeable and np.shares_memory(twin.params.data, layer.params.data)
    assert twin.grads.data.flags.writeable and not np.shares_memory(twin.grads.data, layer.grads.data)
    np.testing.assert_array_equal(twin.grads.data, layer.grads.data)  # the gradients so far
    assert twin.grads.aliases == layer.grads.aliases == ["U_up", "U_left"]
    for name in twin.grads:
        np.testing.assert_array_equal(twin.grads[name], layer.grads[name])
        assert np.shares_memory(twin.grads[name], twin.grads.data)
    linear, x = Linear(2, 3, seed=0, dtype=np.float64), rng.random((2, 5, 2))
    y = linear.forward(x)
    dx = linear.backward(np.cos(y))
    twin = _read_only_copy(linear)
    twin.zero_grad()
    np.testing.assert_array_equal(twin.forward(x), y)
    np.testing.assert_array_equal(twin.backward(np.cos(y)), dx)
    np.testing.assert_array_equal(twin.grads.data, linear.grads.data)


def test_non_contiguous_and_float64_input_accepted(rng):
    layer = MDLSTM2D(2, 3, dtype=np.float32)
    x = rng.standard_normal((2, 4, 6, 2))
    y1 = layer.forward(x[:, :, ::2])
    y2 = layer.forward(np.ascontiguousarray(x[:, :, ::2]).astype(np.float32))
    np.testing.assert_array_equal(y1, y2)
    y3 = layer.forward(x.transpose(0, 2, 1, 3))
    assert y3.shape == (2, 6, 4, 3)


def test_default_init_does_not_overflow_on_large_grids():
    """+1 forget biases overflow c to inf on 128x128 float32; the 2D default must not."""
    x = np.random.default_rng(0).uniform(0, 1, (1, 128, 128, 1)).astype(np.float32)
    assert np.isfinite(MDLSTM2D(1, 4).forward(x)).all()
    layer = MDLSTM2D(1, 4, forget_bias=1.0)
    layer.forward(x)
    assert not np.isfinite(layer._saved["c"]).all()


def test_copies_and_free_buffers_leave_the_activations_out(rng):
    """A pickle or deep copy carries weights, gradients and settings, not the activations and
    scratch buffers of the last call (67 MB for a 64x64 B8 D32 layer); free_buffers drops them."""
    import copy
    import pickle

    from mdnumba import Linear, Sequential
    layer = MDLSTM2D(1, 8, seed=0)
    empty = len(pickle.dumps(layer))
    x = rng.random((4, 16, 16, 1)).astype(np.float32)
    net = Sequential(layer, Linear(8, 2))
    y = net.forward(x)
    assert layer.workspace_bytes() > 10 * empty
    assert layer.workspace_bytes() >= layer.saved_bytes()  # the saved index tables count in both
    net.backward(np.ones_like(y))
    assert layer.workspace_bytes() > layer.saved_bytes()  # + backward's scratch
    assert net.saved_bytes() == layer.saved_bytes() + x.size * 8 * 4  # + the Linear's input
    assert net.workspace_bytes() == layer.workspace_bytes() + x.size * 8 * 4
    assert len(pickle.dumps(net)) < 2 * (empty + len(pickle.dumps(Linear(8, 2))))
    twin = copy.deepcopy(net)
    np.testing.assert_array_equal(twin.forward(x), y)
    net.free_buffers()
    assert layer.workspace_bytes() == layer.saved_bytes() == net.workspace_bytes() == 0
    with pytest.raises(RuntimeError, match="backward\\(\\) has no saved activations"):
        net.backward(np.ones_like(y))
    np.testing.assert_array_equal(net.forward(x), y)
    net.backward(np.ones_like(y))
