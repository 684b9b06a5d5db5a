"""Host time of mdnumba's CUDA launches, through numba-cuda and prepared (mdnumba/kernels/launch.py),
side by side, on a machine with no GPU.

numba-cuda runs for real: its dispatcher, the arguments' typing, the compile (NVVM, for sm_90) and
the preparation of each argument's launch fields; what needs the driver is replaced: the device
(its compute capability), the module load, the launch configuration and the driver call itself
(``cuda.core.launch``, which both ways make the same, with the same fields), and device arrays are
numba ``DeviceNDArray`` objects on made-up pointers. So the times are what mdnumba and numba-cuda
spend in Python per launcher call, at 32x32 B64 D64 in float32: the GPU benchmark's whole device
train step (its 9 launches; device allocations and copies stubbed too), the forward and backward
sweeps in their default and item layouts, the weight-gradient GEMM and the Adam update; and, timed
alone, what ``cuda.core.launch`` does with the fields before the driver call. The cooperative grid's
limit, which the launchers remember after their first call, is stubbed; the item layout's opt-in to
more shared memory, which they remember too, calls a stubbed driver once and then looks up its key
at each call. Best (median) of N calls in µs; writes a markdown table (default
``bench/results/launch_host.md``).

Usage: ``python bench/launch_host.py [--repeats N] [--only TEXT[,TEXT..]] [--out PATH]`` (``--only``:
the launchers whose name contains one of the TEXTs)
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from bench_args import out_path, positive_int

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "launch_host.md"
#: steps of the device trainer's timed block (the GPU benchmark's trainer rows'; ``--sync-every`` is 50)
BLOCK = 20
#: the launch fields of each driver call since last cleared (a launcher call's)
_fields: list[tuple] = []


class _Pointer:
    """A made-up device pointer with what numba-cuda reads of one."""

    def __init__(self, value: int):
        self.value = self.device_pointer_value = self.device_pointer = value

    @property
    def device_ctypes_pointer(self):
        return ctypes.c_void_p(self.value)

    def view(self, start: int, stop: int | None = None) -> _Pointer:
        return _Pointer(self.value + start)


def mock_driver() -> None:
    """Replace what numba-cuda would ask the driver (module docstring)."""
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda
    from numba.cuda import codegen
    from numba.cuda.cudadrv import driver

    dispatcher.get_current_device = cuda.get_current_device = \
        lambda: SimpleNamespace(compute_capability=(9, 0), id=0)
    codegen.CUDACodeLibrary._ensure_cc = lambda self, cc: cc or (9, 0, "a")
    cufunc = SimpleNamespace(kernel="kernel", module=SimpleNamespace(initialized=True, setup=lambda: None),
                             handle=0, device=SimpleNamespace(id=0))
    codegen.CUDACodeLibrary.get_cufunc = lambda self: cufunc
    driver.driver.cuKernelSetAttribute = lambda attr, value, kernel, device: None
    driver._to_core_stream = lambda stream: "default stream"
    dispatcher.LaunchConfig = lambda **kw: SimpleNamespace(**kw)
    dispatcher.launch = lambda stream, config, kernel, *fields: _fields.append(fields)
    mock_memory()


def mock_memory() -> None:
    """Device allocations on made-up pointers, copies that copy nothing, no context to make:
    what a layer's and an optimiser's set-up and a train step ask of the driver besides launches."""
    import contextlib

    from numba import cuda
    from numba.cuda.cudadrv import devices, driver
    top = [1 << 40]

    def memalloc(nbytes: int) -> _Pointer:
        top[0] += -(-max(int(nbytes), 1) // 256) * 256 + 256
        return _Pointer(top[0])
    context = SimpleNamespace(memalloc=memalloc, device=SimpleNamespace(id=0, compute_capability=(9, 0)))
    devices.get_context = lambda *args, **kw: context
    devices._runtime.ensure_context = contextlib.nullcontext
    for name in ("host_to_device", "device_to_host", "device_to_device", "device_memset"):
        setattr(driver, name, lambda *args, **kw: None)
    cuda.is_available = lambda: True


def launchers(H: int = 32, B: int = 64, D: int = 64) -> dict:
    """The timed launcher calls, on arrays of a 2D layer's train step (C = 1)."""
    from numba import cuda

    from mdnumba.grid import wavefront
    from mdnumba.kernels import optim_cuda as O
    from mdnumba.kernels import wavefront_cuda as W

    def dev(shape: tuple, dtype=np.float32):  # on a made-up pointer (mock_memory)
        return cuda.device_array(shape, dtype)
    W._coop_limit = lambda kernel, args, tpb, shmem: 3 * 132
    W._sm_count = lambda: 132
    W._item_shared_limit = lambda: 227 * 1024
    wf = wavefront((H, H))
    R, G, N = wf.n_cells * B, 5 * D, 2
    h, c, act, dact, dc, dh = dev((R, D)), dev((R, D)), dev((R, G)), dev((R, G)), dev((R, D)), dev((R, D))
    U, out, dh_in, src = dev((1, D, N * G)), dev((R, 1, D)), dev((R, 1, D)), dev((1, R), np.int32)
    tables = [dev(np.shape(a), np.asarray(a).dtype) for a in (wf.diag_off, wf.parent, wf.child)]
    z, xs, grads = dev((R, 2 + N * D)), dev((R, 1)), dev((2 + N * D, G))
    P = grads.size
    p, g, m, v = (dev((P,)) for _ in range(4))
    steps = dev((2,), np.int64)
    norm = O.NormArgs(dev((64,), np.float64), 0.0, dev((2,)), dev((100,)), 3, True)
    off = np.asarray(wf.diag_off)

    def forward(layout):
        W.wavefront_forward(h, c, act, U, tables[0], tables[1], B, D, 0, diag_off_host=off, out=out,
                            out_src=src, layout=layout, path="cooperative")

    def backward(layout):
        W.wavefront_backward(dact, dc, dh, act, c, U, *tables, B, D, 0, diag_off_host=off, dh_in=dh_in,
                             dh_src=src, operands=(z, xs, h), layout=layout, path="cooperative")

    return {"device train step (bench_gpu.py's)": built_when_called(lambda: train_step(H, B, D)),
            f"`train --device cuda`, a block of {BLOCK} steps":
                built_when_called(lambda: trainer_block(H, B, D)),
            "forward sweep (auto: flat)": lambda: forward("auto"),
            "forward sweep, item layout": lambda: forward("item"),
            "backward sweep (auto: sliced)": lambda: backward("auto"),
            "backward sweep, item layout": lambda: backward("item"),
            "weight-gradient GEMM": lambda: W.gemm(grads, z, dact, ta=True),
            "Adam update": lambda: O.adam_update(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, steps, 0, norm)}


def built_when_called(make):
    """A launcher that builds its arrays and trainer (``make()``, the launcher) at its first call,
    so that one left out by ``--only`` costs nothing."""
    built = []

    def call():
        if not built:
            built.append(make())
        built[0]()
    return call


def train_step(H: int, B: int, D: int):
    """The GPU benchmark's device train step (``bench_gpu.mdnumba_device_fns``: forward, loss
    gradient, zero_grad, backward, Adam; no synchronize) on the cooperative path."""
    import bench_gpu
    cfg = bench_gpu.parse_config(f"{H}x{H}x{B}x{D}")
    x = np.zeros((B, H, H, 1), np.float32)
    return bench_gpu.mdnumba_device_fns(cfg, x, "cooperative")[0]


def trainer_block(H: int, B: int, D: int):
    """A block of :data:`BLOCK` steps of the CLI's device trainer (``DeviceTrainer._train_block``: the
    diagonal task at side H, batch B, hidden D; upload, every step's launches, the sync's copies)
    on one block drawn beforehand (its drawing is host work of its own: the GPU benchmark times
    it) and with the metrics of the copied-back (made-up) values left out."""
    from mdnumba.train import TrainConfig, make_trainer
    tr = make_trainer(TrainConfig(steps=10**9, device="cuda", size=H, batch=B, hidden=D, sync_every=BLOCK,
                                  dtype="float32"))
    draw = tr._draw(0, BLOCK, tr.rng.bit_generator.state)
    tr._block = lambda start, n: draw
    tr._draw_ahead = lambda *args: None
    tr._metrics = lambda *args: {}
    tr.k = SimpleNamespace(**{**vars(tr.k), "mean_loss": lambda sums, n: 0.0})  # of made-up sums
    return lambda: tr._train_block(BLOCK)


def best_median(f, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0] * 1e6, times[len(times) // 2] * 1e6


def packing_time(launches: list[tuple], repeats: int) -> float | None:
    """Best µs of what ``cuda.core.launch`` does with the launch fields of ``launches`` before the
    driver call (its ``ParamHolder``: the fields packed into the driver's argument array), all of
    them; None where this cuda.core has no such class."""
    try:
        from cuda.core._kernel_arg_handler import ParamHolder
    except ImportError:
        return None

    def pack():
        for fields in launches:
            ParamHolder(list(fields))
    return best_median(pack, repeats)[0]


def _unprepared_launches(f) -> int:
    """How many of the launches of ``f()`` go through numba-cuda (prepared launches on, ``f``'s keys
    seen twice already): those whose key changes from call to call, or which cannot be prepared."""
    from mdnumba.kernels import launch
    run, count = launch.run, [0]

    def counted(*args):
        count[0] += 1
        return run(*args)
    launch.run = counted
    try:
        f()
    finally:
        launch.run = run
    return count[0]


def measure(repeats: int, only: str = "") -> list[tuple]:
    """``(launcher, launches, of them through numba-cuda when prepared, fields, numba-cuda (best,
    median) µs, prepared (best, median) µs)`` per launcher (those whose name contains one of the
    comma-separated texts of ``only``, in any case)."""
    from mdnumba.kernels import launch
    rows = []
    for name, f in launchers().items():
        if not any(text.lower() in name.lower() for text in only.split(",")):
            continue
        f()  # compiles
        times = []
        for prepared in (False, True):
            launch.config.CUDA_PREPARED_LAUNCH = prepared
            launch._state["prepared"].clear()
            launch._state["seen"].clear()
            f()
            f()  # prepares (a key's second launch)
            times.append(best_median(f, repeats))
        _fields.clear()
        unprepared = _unprepared_launches(f)
        rows.append((name, len(_fields), unprepared, sum(map(len, _fields)), packing_time(_fields, repeats),
                     *times))
    if launch.failed():
        raise RuntimeError(f"prepared launches failed: {launch.failed()}")
    return rows


def report(rows: list[tuple], repeats: int) -> str:
    import numba
    import numba_cuda
    out = ["# Host time of a launcher call: through numba-cuda vs prepared", "",
           f"- **python / numba / numba-cuda**: {platform.python_version()} / {numba.__version__} / "
           f"{numba_cuda.__version__}; {platform.processor() or platform.machine()}",
           "", "Produced by `python bench/launch_host.py` on a machine without a GPU (its module "
           "docstring: numba-cuda's dispatch, typing and argument preparation run for real, the driver "
           f"calls are stubbed). 32x32 B64 D64, float32. Best (median) of {repeats} calls, µs. "
           "*Launches*: kernel launches per call, in brackets those that still go through numba-cuda "
           "with prepared launches on (a key that changes from call to call). *Fields*: the values "
           "the call hands to the driver (both ways the same). *Packing*: what the stubbed "
           "`cuda.core.launch` would do with them before the driver call (its `ParamHolder`, timed "
           "alone on the fields captured), best µs; not in the other columns.", "",
           "| launcher call | launches | fields | packing µs | numba-cuda µs | prepared µs | "
           "numba-cuda / prepared |", "|---|---|---|---|---|---|---|"]
    for name, launches, unprepared, fields, pack, (b0, m0), (b1, m1) in rows:
        packed = "–" if pack is None else f"{pack:.1f}"
        out.append(f"| {name} | {launches} ({unprepared}) | {fields} | {packed} | {b0:.1f} ({m0:.1f}) | "
                   f"{b1:.1f} ({m1:.1f}) | {b0 / b1:.1f}x |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=positive_int, default=300)
    ap.add_argument("--only", default="", help="time the launchers whose name contains one of these "
                    "comma-separated texts")
    ap.add_argument("--out", type=out_path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    import numba
    if numba.config.ENABLE_CUDASIM:
        ap.error("run without NUMBA_ENABLE_CUDASIM: this times numba-cuda's own launch path")
    mock_driver()
    rows = measure(args.repeats, args.only)
    if not rows:
        ap.error(f"no launcher's name contains {args.only!r}; the launchers: {'; '.join(launchers())}")
    from bench_cpu import write_report
    write_report(report(rows, args.repeats), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
