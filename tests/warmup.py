"""Fill Numba's kernel cache before a whole test session: ``python tests/warmup.py JOB ...``.

Most of a cold suite's time goes to compiling (on one core per process), and the simulator
runs of tests/simruns.py compile the same CPU kernels, their oracle, as the suite itself, all
at the same time. (Not before the GPU case runs of tests/test_cuda.py: see its ``gpu_report``.)
:func:`fill_cache` therefore runs this script first, its parts (:data:`JOBS`) split over one
process per core (2 cores: one dtype each), and the runs start when it is done: they and the
suite then load the kernels from the cache. Tiny calls of every layer kind, both sweep
schedules, padded batches, 1D states, the saving-free forward and both optimisers reach most
compiled signatures; what they miss compiles where it is first needed, as before (this only
saves time: no test depends on it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

#: the dtypes warmed (with 2 processes, one each)
DTYPES = ("float32", "float64")
TIMEOUT = 900
ROOT = Path(__file__).resolve().parents[1]


def _layer_calls(layer, x, **kw) -> None:
    """A saving forward, the backward with dx, and the saving-free forward."""
    h = layer.forward(x, **kw)
    layer.backward(np.ones_like(h))
    layer.forward(x, save=False, **kw)


def schedules():
    """Context managers forcing each sweep schedule of :func:`mdnumba.kernels.wavefront.batch_blocks`."""
    import contextlib

    from mdnumba.kernels import wavefront

    @contextlib.contextmanager
    def forced(max_cells, per_thread):
        saved = wavefront.BATCH_MAX_CELLS, wavefront.BATCH_STREAMS_PER_THREAD
        wavefront.BATCH_MAX_CELLS, wavefront.BATCH_STREAMS_PER_THREAD = max_cells, per_thread
        try:
            yield
        finally:
            wavefront.BATCH_MAX_CELLS, wavefront.BATCH_STREAMS_PER_THREAD = saved

    return forced(-1, 0), forced(10**9, 0)  # a prange per hyperplane; blocks of batch items


def _md(rand, dt) -> None:
    """2D (4 directions; a padded batch) and 3D MD-LSTMs, both sweep schedules."""
    import mdnumba
    for schedule in schedules():
        with schedule:
            _layer_calls(mdnumba.MDLSTM2D(2, 5, directions=4, dtype=dt, seed=0), rand(3, 3, 4, 2))
            x, sizes = mdnumba.pad_batch([rand(2, 4, 2), rand(3, 3, 2)])
            _layer_calls(mdnumba.MDLSTM2D(2, 5, dtype=dt, seed=0), x, sizes=sizes)
            _layer_calls(mdnumba.MDLSTM3D(1, 4, dtype=dt, seed=0), rand(2, 2, 3, 2, 1))


def _lstm(rand, dt) -> None:
    """1D LSTMs: bidirectional, padded, from a state with the state's gradients; both schedules."""
    from mdnumba import LSTM1D
    for schedule in schedules():
        with schedule:
            lstm = LSTM1D(3, 6, directions=2, dtype=dt, seed=0)
            _layer_calls(lstm, rand(3, 5, 3))
            _layer_calls(lstm, rand(3, 5, 3), sizes=[5, 2, 4])
            lstm = LSTM1D(3, 6, dtype=dt, seed=0)
            h = lstm.forward(rand(3, 5, 3), state=lstm.zero_state(3))
            lstm.backward(np.ones_like(h), final_state_grad=lstm.final_state())
            lstm.initial_state_grad()
            lstm.forward(rand(3, 5, 3), state=lstm.zero_state(3), save=False)


def _grid_and_optimisers(rand, dt) -> None:
    """Grid LSTMs (tied and not), and a step of each optimiser with clipping."""
    import mdnumba
    for tied in (True, False):
        _layer_calls(mdnumba.GridLSTM2D(2, 3, dtype=dt, tied=tied, seed=0), rand(2, 4, 2))
    layer = mdnumba.MDLSTM2D(1, 4, dtype=dt, seed=0)
    for opt in (mdnumba.Adam(layer, clip_norm=1.0), mdnumba.RMSprop(layer, clip_norm=1.0)):
        _layer_calls(layer, rand(2, 3, 3, 1))
        opt.step()


KINDS = {"md": _md, "lstm": _lstm, "grid": _grid_and_optimisers}
#: the warm-up's parts, "dtype:kind"; process i of n takes every n-th from the i-th on
JOBS = tuple(f"{dtype}:{kind}" for kind in KINDS for dtype in DTYPES)


def warm(job: str) -> None:
    """One part of :data:`JOBS`."""
    dtype, kind = job.split(":")
    rng, dt = np.random.default_rng(0), np.dtype(dtype)
    KINDS[kind](lambda *shape: rng.random(shape).astype(dt), dt)


def command(jobs) -> list[str]:
    """The command line that runs ``jobs`` (parts of :data:`JOBS`) in one process."""
    return [sys.executable, str(Path(__file__).resolve()), *jobs]


def environment() -> dict:
    """The warm-up processes' environment: one Numba thread each, the CPU target, and the
    checkout on the path (where mdnumba is not installed, pytest still finds it from there)."""
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def fill_cache(processes: int | None = None, timeout: float = TIMEOUT) -> None:
    """Run :data:`JOBS` in ``processes`` (default: one per core, at most one per job) at once
    and wait up to ``timeout`` s (skipped with MDNUMBA_TEST_WARMUP=0, and where nothing is
    cached: MDNUMBA_CACHE=0, NUMBA_DISABLE_JIT=1). A failure or timeout only costs time, the
    tests compiling what they need: it is a warning with the process's last output."""
    from mdnumba import config
    off = os.environ.get("MDNUMBA_TEST_WARMUP") == "0" or os.environ.get("NUMBA_DISABLE_JIT") == "1"
    if off or not config.CACHE:
        return
    n = max(1, min(processes or os.cpu_count() or 1, len(JOBS)))
    runs = []
    for i in range(n):
        log = tempfile.TemporaryFile()
        runs.append((JOBS[i::n], log, subprocess.Popen(command(JOBS[i::n]), cwd=ROOT, env=environment(),
                                                       stdout=log, stderr=subprocess.STDOUT)))
    deadline = time.monotonic() + timeout
    for jobs, log, proc in runs:
        try:
            rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = f"stopped after {timeout:.0f} s"
            proc.wait()
        if rc != 0:
            log.seek(0)
            warnings.warn(f"kernel warm-up {' '.join(jobs)} failed ({rc}); the tests compile as they go:\n"
                          + log.read().decode(errors="replace")[-2000:], stacklevel=2)
        log.close()


if __name__ == "__main__":
    for name in sys.argv[1:]:
        start = time.perf_counter()
        warm(name)
        print(f"warm-up {name}: {time.perf_counter() - start:.1f} s")
