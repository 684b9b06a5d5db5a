"""CPU benchmark (issue 3, item 6): mdnumba vs. the NumPy reference vs. PyTorch autograd.

Times, in one process and on the same thread count, a *train step* (forward,
loss gradient, backward, Adam step) and a *forward* pass of a 2D MD-LSTM with
C=1 input channel in float32 for 8x8 B16 D16, 32x32 B16 D32 and 64x64 B16 D32:

- ``mdnumba.MDLSTM2D`` + ``mdnumba.Adam`` (hand-written Numba kernels);
- ``mdnumba.reference`` (row-major NumPy loops; it always computes in float64);
- :class:`torch_wavefront.TorchMDLSTM2D` + ``torch.optim.Adam`` (eager PyTorch
  autograd, one anti-diagonal per step), if torch is importable. Before timing,
  its forward and gradients are checked against mdnumba's for the same weights.

Loss: ``L = 0.5 * mean(h**2)``, so ``dL/dh = h / h.size``. Every timing is the
best (and median) of an adaptive number of repeats; mdnumba and PyTorch are
timed in interleaved rounds so a background load hits both alike, the (slow)
reference on its own afterwards. Optionally (``--big``, default on) two train
steps at 256x256 B8 D64 (the first allocating) with the peak RSS increase, with the stable
cell (the Graves cell's state overflows float32 on such a grid, and backward then refuses).
Writes a markdown report (default ``bench/results/cpu.md``).

Usage: ``python bench/bench_cpu.py [--quick] [--no-big] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import importlib
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
from bench_args import out_path

import mdnumba
from mdnumba import config as md_config
from mdnumba import reference
from mdnumba.checkpoint import atomic_write_bytes

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "cpu.md"
LOSS = "0.5 * mean(h**2)"
#: issue-3 targets, checked in the report
TARGET_TRAIN_RATIO_32 = 10.0
TARGET_FWD_RATIO_32 = 5.0
TARGET_TRAIN_MS_8 = 1.0

Phase = tuple[str, Callable[[], None]]


def quick_simulator_handoffs() -> None:
    """Under numba's CUDA simulator (the CI's smoke runs), let a thread take the GIL after 0.1 ms
    instead of 5: the simulator's block manager polls a block's threads in a loop that never
    blocks, so each thread woken at a barrier waited up to 5 ms behind it (``bench_gpu.py
    --smoke`` took 202 s, with this 77 s; the tensor layout's warps meet 32 threads at a time). Not
    for tests/simgrid.py's runs, which have no such loop (there it made the cases slower)."""
    if numba.config.ENABLE_CUDASIM:
        sys.setswitchinterval(1e-4)


@dataclass(frozen=True)
class Config:
    """One benchmark shape: grid H x W, batch B, hidden D, C input channels."""

    H: int
    W: int
    B: int
    D: int
    C: int = 1

    @property
    def label(self) -> str:
        return f"{self.H}x{self.W} B{self.B} D{self.D}"


@dataclass
class Timing:
    """Per-call seconds of one measured function (or of a sequence of phases)."""

    total: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    @property
    def best(self) -> float:
        return min(self.total)

    @property
    def median(self) -> float:
        return statistics.median(self.total)

    @property
    def reps(self) -> int:
        return len(self.total)

    def phase_best(self, name: str) -> float:
        """Fastest run of one phase (the phases' bests need not add up to ``best``)."""
        return min(self.phases[name])


# --------------------------------------------------------------------------- timing
def run_phases(phases: list[Phase], timing: Timing | None = None) -> float:
    """Run the phases in order once; return the total seconds (recorded into ``timing``)."""
    total = 0.0
    for name, fn in phases:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        total += dt
        if timing is not None:
            timing.phases.setdefault(name, []).append(dt)
    if timing is not None:
        timing.total.append(total)
    return total


def time_interleaved(cases: dict[str, list[Phase]], budget_s: float, min_reps: int = 3,
                     max_reps: int = 500, rounds: int = 5) -> dict[str, Timing]:
    """Best-of-N timing of several implementations of the same work, interleaved.

    Each case is warmed up once (JIT, workspace allocation) and its call time
    estimated as the fastest of up to 3 more calls (one slow call must not cut
    the repeat count), then gets ``clip(budget_s / t_one_call, min_reps, max_reps)``
    timed calls, spread over ``rounds`` rounds that alternate between the cases.
    """
    reps = {}
    for name, phases in cases.items():
        run_phases(phases)
        one = run_phases(phases)
        for _ in range(2):
            if one * 3 > budget_s:
                break
            one = min(one, run_phases(phases))
        reps[name] = int(np.clip(budget_s / max(one, 1e-9), min_reps, max_reps))
    out = {name: Timing() for name in cases}
    for r in range(rounds):
        for name, phases in cases.items():
            n = reps[name] // rounds + (1 if r < reps[name] % rounds else 0)
            for _ in range(n):
                run_phases(phases, out[name])
    return out


# ----------------------------------------------------------------- implementations
def make_input(cfg: Config, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) float32 input of shape (B, H, W, C)."""
    return np.random.default_rng(seed).random((cfg.B, cfg.H, cfg.W, cfg.C), dtype=np.float32)


def mdnumba_cases(cfg: Config, x: np.ndarray, cell: str = "graves") -> tuple[mdnumba.MDLSTM2D, list[Phase],
                                                                              list[Phase]]:
    """mdnumba layer plus its train-step phases (forward, backward, adam) and forward-only phase."""
    layer = mdnumba.MDLSTM2D(cfg.C, cfg.D, seed=0, cell=cell)
    opt = mdnumba.Adam(layer)
    st: dict = {}

    def forward() -> None:
        h = layer.forward(x)
        st["dh"] = h * np.float32(1.0 / h.size)  # dL/dh of 0.5 * mean(h**2)

    def backward() -> None:
        layer.zero_grad()
        layer.backward(st["dh"], input_grad=False)  # x is data (PyTorch computes no dL/dx either)

    train = [("forward", forward), ("backward", backward), ("adam", opt.step)]
    return layer, train, [("forward", lambda: layer.forward(x))]


def reference_cases(layer: mdnumba.MDLSTM2D, x: np.ndarray) -> tuple[list[Phase], list[Phase]]:
    """Float64 NumPy reference: train-step phases (incl. ``reference.adam_step``) and forward."""
    p = layer.params
    params = [np.array(p[k], dtype=np.float64) for k in ("W", "U_up", "U_left", "b")]
    moments = [[np.zeros_like(q), np.zeros_like(q)] for q in params]
    x64 = x.astype(np.float64)
    st: dict = {"t": 0}

    def forward() -> None:
        W, Uu, Ul, b = params
        h, st["cache"] = reference.mdlstm_forward(x64, W, [Uu, Ul], b)
        st["dh"] = h / h.size

    def backward() -> None:
        _, dW, (dUu, dUl), db = reference.mdlstm_backward(st["dh"], st["cache"])
        st["grads"] = [dW, dUu, dUl, db]

    def adam() -> None:
        st["t"] += 1
        for k, (q, g) in enumerate(zip(params, st["grads"])):
            m, v = moments[k]
            params[k], moments[k][0], moments[k][1] = reference.adam_step(
                q, g, m, v, st["t"], 1e-3, 0.9, 0.999, 1e-8)

    fwd_only = [("forward", lambda: reference.mdlstm_forward(x64, params[0], params[1:3], params[3]))]
    return [("forward", forward), ("backward", backward), ("adam", adam)], fwd_only


def load_torch_baseline():
    """Return ``(torch, TorchMDLSTM2D)`` or ``None`` if torch is not importable."""
    try:
        import torch
    except ImportError:
        return None
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return torch, importlib.import_module("torch_wavefront").TorchMDLSTM2D


def torch_cases(tb, layer: mdnumba.MDLSTM2D, x: np.ndarray) -> tuple[list[Phase], list[Phase]]:
    """PyTorch train-step phases (forward+loss, zero_grad+backward, Adam) and no-grad forward."""
    torch, TorchMDLSTM2D = tb
    model = TorchMDLSTM2D(layer.in_channels, layer.hidden)
    model.load_from_mdnumba(layer)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt = torch.from_numpy(x)
    st: dict = {}

    def forward() -> None:
        st["loss"] = 0.5 * model(xt).square().mean()

    def backward() -> None:
        opt.zero_grad()
        st["loss"].backward()

    def forward_only() -> None:
        with torch.no_grad():
            model(xt)

    return [("forward", forward), ("backward", backward), ("adam", opt.step)], \
        [("forward", forward_only)]


def verify_torch(tb, cfg: Config, x: np.ndarray, fwd_tol: float = 1e-9, grad_tol: float = 1e-7) -> dict:
    """Check torch forward == mdnumba forward and the gradients, both in float64.

    (In float32, rounding alone differs by ~1e-4 after the 127 diagonals of a 64x64
    grid, so the check would say nothing about correctness.) Uses fresh seed-0
    layers of the timed shape. Returns the max abs forward difference and the max
    relative gradient difference; exits on failure.
    """
    torch, TorchMDLSTM2D = tb
    layer = mdnumba.MDLSTM2D(cfg.C, cfg.D, seed=0, dtype=np.float64)
    model = TorchMDLSTM2D(cfg.C, cfg.D, dtype=torch.float64)
    model.load_from_mdnumba(layer)
    x = x.astype(np.float64)
    h = layer.forward(x)
    ht = model(torch.from_numpy(x))
    fwd = float(np.abs(ht.detach().numpy() - h).max())
    (0.5 * ht.square().mean()).backward()
    layer.zero_grad()
    layer.backward(h / h.size)
    g = layer.grads
    pairs = [(model.W.grad, g["W"]), (model.U.grad, np.concatenate([g["U_up"], g["U_left"]])),
             (model.b.grad, g["b"])]
    grad = max(float(np.abs(t.numpy() - a).max() / (np.abs(a).max() + 1e-30)) for t, a in pairs)
    if not fwd <= fwd_tol or not grad <= grad_tol:
        raise SystemExit(f"torch baseline disagrees with mdnumba at {cfg.label}: forward max abs "
                         f"{fwd:.2e} (tol {fwd_tol:g}), gradient max rel {grad:.2e}")
    return {"forward_max_abs": fwd, "grad_max_rel": grad}


# ------------------------------------------------------------------------ memory
def proc_status_kb(key: str) -> int:
    """A ``Vm*`` line of /proc/self/status in kB (0 where unavailable)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def trim_heap() -> None:
    """Hand free heap memory back to the OS (glibc ``malloc_trim``), as a fresh process would
    not have it: mdnumba keeps freed arrays for reuse (``mdnumba.config.tune_malloc``)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """:func:`trim_heap` (reused memory would hide part of the next run's needs), then reset
    VmHWM to the current RSS (Linux ``clear_refs`` 5); False if not possible."""
    trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def max_abs_cell_state(layer: mdnumba.MDLSTM2D) -> float | None:
    """Largest |c| saved by the last forward (None if the layer does not expose it)."""
    c = (getattr(layer, "_saved", None) or {}).get("c")
    return None if c is None else float(np.abs(c).max())


def big_run(cfg: Config) -> dict:
    """One (then a second) mdnumba train step on a big grid, stable cell: times, peak RSS
    increase, bytes.

    Records rather than raises a non-finite gradient norm (``Adam.step`` refuses
    to update), should one occur.
    """
    gc.collect()
    exact = reset_peak_rss()
    rss0 = proc_status_kb("VmRSS")
    hwm0 = proc_status_kb("VmHWM")
    x = make_input(cfg)
    layer, train, _ = mdnumba_cases(cfg, x, cell="stable")
    adam = train[-1][1]
    events: list[str] = []
    max_c: list[float | None] = []

    def safe_adam() -> None:
        try:
            adam()
        except FloatingPointError:
            events.append(f"step {len(max_c) + 1}: gradient norm not finite, Adam skipped the "
                          "update")

    train[-1] = ("adam", safe_adam)
    first = run_phases(train)
    peak = proc_status_kb("VmHWM")
    max_c.append(max_abs_cell_state(layer))  # outside the timed phases: a pass over ~1 GB
    second = Timing()
    run_phases(train, second)
    max_c.append(max_abs_cell_state(layer))
    res = dict(cfg=cfg, first_s=first, second=second, saved=layer.saved_bytes(),
               workspace=layer.workspace_bytes(), params=layer.params.data.nbytes,
               input=x.nbytes, rss_increase=(peak - rss0) * 1024, exact=exact,
               hwm_before=hwm0 * 1024, events=events, max_c=max_c)
    return res


# ----------------------------------------------------------------------- report
def load_average() -> str:
    """1/5/15-minute load averages as text ('?' where unavailable)."""
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def command_line() -> str:
    """How the report was made: ``python bench/SCRIPT.py OPTIONS`` (as a report's first line)."""
    script = Path(sys.argv[0])
    name = f"bench/{script.name}" if script.parent.name == "bench" else str(script)
    return "`" + " ".join(["python", name, *map(shlex.quote, sys.argv[1:])]) + "`"


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's word for it."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info(tb, load_before: str) -> dict[str, str]:
    """The command, CPU model, cores, library versions, thread counts, date and load averages."""
    cpu = cpu_model()
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        layer = numba.config.THREADING_LAYER
    aff = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "command": command_line(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "CPU": f"{cpu} ({os.cpu_count()} logical cores, {aff} usable)",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": f"{numba.__version__} ({numba.get_num_threads()} threads, threading layer "
                 f"{layer}, fastmath={md_config.FASTMATH})",
        "mdnumba": mdnumba.__version__,
        "malloc tuning (all implementations: one process)": md_config.MALLOC_TUNING,
        "load average (1/5/15 min) before / after": f"{load_before}  /  {load_average()}",
    }
    if tb is not None:
        torch = tb[0]
        info["torch"] = f"{torch.__version__} ({torch.get_num_threads()} intra-op threads)"
    else:
        info["torch"] = "not used (not installed, or --no-torch): PyTorch columns skipped"
    return info


def ms(t: float | None) -> str:
    """Seconds → milliseconds text ('–' for missing)."""
    if t is None:
        return "–"
    return f"{t * 1e3:.3g}" if t < 1 else f"{t * 1e3:.0f}"


def best_median(tm: Timing | None) -> str:
    """A timing as table text: best ms in bold, median in brackets ('–' for missing)."""
    return "–" if tm is None else f"**{ms(tm.best)}** ({ms(tm.median)})"


def ratio(num: Timing | None, den: Timing | None) -> str:
    """``num.best / den.best`` as text ('–' if either is missing)."""
    return "–" if num is None or den is None else f"{num.best / den.best:.1f}x"


def mib(n: int) -> str:
    """Bytes → MiB text."""
    return f"{n / 2**20:.1f}"


def speed_table(results: list[dict], mode: str) -> list[str]:
    """Markdown rows: best (median) ms per implementation and the speed-up ratios."""
    rows = ["| config | mdnumba ms | PyTorch ms | reference f64 ms | PyTorch / mdnumba | "
            "reference / mdnumba | repeats (md/pt/ref) |", "|---|---|---|---|---|---|---|"]
    for res in results:
        t = res[mode]
        md, pt, ref = t.get("mdnumba"), t.get("torch"), t.get("reference")
        reps = "/".join(str(tm.reps) if tm else "–" for tm in (md, pt, ref))
        rows.append(f"| {res['cfg'].label} | {best_median(md)} | {best_median(pt)} | {best_median(ref)} | "
                    f"{ratio(pt, md)} | {ratio(ref, md)} | {reps} |")
    return rows


def phase_table(results: list[dict]) -> list[str]:
    """Markdown rows: where a train step's time goes (best ms of each phase)."""
    rows = ["| config | implementation | forward (+loss) | backward (+zero_grad) | Adam step |",
            "|---|---|---|---|---|"]
    for res in results:
        for name, tm in res["train"].items():
            rows.append(f"| {res['cfg'].label} | {name} | {ms(tm.phase_best('forward'))} | "
                        f"{ms(tm.phase_best('backward'))} | {ms(tm.phase_best('adam'))} |")
    return rows


def memory_table(results: list[dict]) -> list[str]:
    """Markdown rows: mdnumba saved/workspace bytes (and PyTorch's autograd-saved bytes)."""
    rows = ["| config | mdnumba saved_bytes() MiB | mdnumba workspace_bytes() MiB | "
            "PyTorch autograd-saved tensors MiB |", "|---|---|---|---|"]
    for res in results:
        pt = res.get("torch_saved")
        rows.append(f"| {res['cfg'].label} | {mib(res['saved'])} | {mib(res['workspace'])} | "
                    f"{'–' if pt is None else mib(pt)} |")
    return rows


def targets(results: list[dict]) -> list[str]:
    """Markdown bullet list: the issue-3 targets, met or not."""
    by = {(r["cfg"].H, r["cfg"].B, r["cfg"].D): r for r in results}
    lines = []
    r32 = by.get((32, 16, 32))
    if r32 and "torch" in r32["train"]:
        for mode, goal in (("train", TARGET_TRAIN_RATIO_32), ("forward", TARGET_FWD_RATIO_32)):
            got = r32[mode]["torch"].best / r32[mode]["mdnumba"].best
            lines.append(f"- {mode} at 32x32 B16 D32: PyTorch / mdnumba = {got:.2f}x "
                         f"(target ≥ {goal:g}x): **{'met' if got >= goal else 'NOT met'}**")
    r8 = by.get((8, 16, 16))
    if r8:
        got = r8["train"]["mdnumba"].best * 1e3
        lines.append(f"- train step at 8x8 B16 D16: {got:.3g} ms (target ≤ {TARGET_TRAIN_MS_8:g} ms): "
                     f"**{'met' if got <= TARGET_TRAIN_MS_8 else 'NOT met'}**")
    return lines


def noise_lines(results: list[dict], limit: float = 1.5) -> list[str]:
    """Markdown bullets for measurements whose median exceeds ``limit`` x their best."""
    lines = []
    for res in results:
        for mode in ("train", "forward"):
            for name, tm in res[mode].items():
                if tm.median > limit * tm.best:
                    lines.append(f"- {res['cfg'].label} {mode} {name}: median {ms(tm.median)} ms vs. "
                                 f"best {ms(tm.best)} ms")
    if lines:
        lines.insert(0, f"Noisy measurements (median > {limit:g}x best: probably background load; "
                        "rerun on a quiet machine):")
    return lines


def big_lines(big: dict) -> list[str]:
    """Markdown lines of the big single-step run."""
    how = ("peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before" if big["exact"]
           else "VmHWM after minus VmRSS before; VmHWM could not be reset, so this is an upper "
                f"bound if the process had peaked higher before ({mib(big['hwm_before'])} MiB)")
    sec = big["second"]
    return [
        f"One mdnumba train step at **{big['cfg'].label}** (C={big['cfg'].C}, float32, stable cell):",
        "",
        f"- first step (allocates every workspace): **{big['first_s']:.2f} s**; second step "
        f"(buffers reused): **{sec.best:.2f} s** (forward {sec.phase_best('forward'):.2f} s, "
        f"backward {sec.phase_best('backward'):.2f} s, Adam {ms(sec.phase_best('adam'))} ms)",
        f"- peak RSS increase during the first step: **{mib(big['rss_increase'])} MiB** ({how})",
        f"- `saved_bytes()` {mib(big['saved'])} MiB, `workspace_bytes()` {mib(big['workspace'])} MiB, "
        f"parameters {big['params'] / 1024:.1f} KiB, input {mib(big['input'])} MiB",
        "- largest cell state |c| after each step's forward: "
        + ", ".join("?" if c is None else f"{c:.3g}" for c in big["max_c"])
        + " (float32 max is 3.4e38)",
    ] + [f"- **{e}**" for e in big["events"]]


def render(info: dict[str, str], results: list[dict], big: dict | None, quick: bool,
           verify: dict[str, dict]) -> str:
    """The whole markdown report."""
    out = ["# CPU benchmark: mdnumba vs. PyTorch autograd vs. NumPy reference", ""]
    if quick:
        out += ["**--quick smoke run: few repeats, small configs only; not for quoting.**", ""]
    out += [f"- **{k}**: {v}" for k, v in info.items()]
    out += ["", "Produced by `python bench/bench_cpu.py` (one process, all implementations on the "
            "same thread count). The machine may have been running other jobs (e.g. the test "
            "suite) at the same time; rerun the script for fresh numbers. Times are the **best** "
            "of N repeats in ms, (median) in brackets; ratios use the best times.", "",
            f"Set-up: 2D MD-LSTM, one direction, C=1 input channel, float32; loss `{LOSS}`; "
            "train step = forward + loss gradient + zero_grad + backward (no dL/dx in either: x "
            "is data) + Adam step (lr 1e-3). "
            "mdnumba: `MDLSTM2D` + `mdnumba.Adam`. PyTorch: `bench/torch_wavefront.py`, eager "
            "autograd computing one anti-diagonal per step + `torch.optim.Adam`; its forward-only "
            "time is under `torch.no_grad()`. Reference: `mdnumba.reference` (row-major NumPy "
            "loops; always float64 internally, so no separate float32 variant) + "
            "`reference.adam_step`.", "", "## Targets (issue 3)", ""]
    out += targets(results) or ["- (not measured in this run)"]
    noise = noise_lines(results)
    out += ["", *noise] if noise else []
    out += ["", "## Train step (forward + backward + Adam)", ""] + speed_table(results, "train")
    out += ["", "## Forward only", ""] + speed_table(results, "forward")
    out += ["", "## Where a train step's time goes (best ms per phase)", ""] + phase_table(results)
    out += ["", "## Memory", ""] + memory_table(results)
    out += ["", "`saved_bytes()`: activations kept for backward; `workspace_bytes()`: every "
            "buffer the layer keeps between calls (saved activations + backward scratch). "
            "PyTorch: unique storages saved by autograd for one forward.", ""]
    if big is not None:
        out += ["## Big grid", ""] + big_lines(big) + [""]
    if verify:
        out += ["## PyTorch baseline check (before timing, same weights, both in float64)", "",
                "| config | forward max abs diff | gradient max rel diff |", "|---|---|---|"]
        out += [f"| {k} | {v['forward_max_abs']:.1e} | {v['grad_max_rel']:.1e} |"
                for k, v in verify.items()]
        out.append("")
    return "\n".join(out)


def torch_saved_bytes(tb, layer: mdnumba.MDLSTM2D, x: np.ndarray) -> int:
    """Bytes of the unique tensor storages autograd saves in one PyTorch forward."""
    torch, TorchMDLSTM2D = tb
    model = TorchMDLSTM2D(layer.in_channels, layer.hidden)
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _ = 0.5 * model(torch.from_numpy(x)).square().mean()
    return sum(seen.values())


# ------------------------------------------------------------------------- main
def bench_config(cfg: Config, tb, budget_s: float, ref_budget_s: float, use_ref: bool) -> dict:
    """Time every implementation at one config; return timings and memory figures."""
    x = make_input(cfg)
    layer, md_train, md_fwd = mdnumba_cases(cfg, x)
    train = {"mdnumba": md_train}
    fwd = {"mdnumba": md_fwd}
    if tb is not None:
        train["torch"], fwd["torch"] = torch_cases(tb, layer, x)
    res = {"cfg": cfg}
    res["train"] = time_interleaved(train, budget_s)
    res["forward"] = time_interleaved(fwd, budget_s)
    res["saved"], res["workspace"] = layer.saved_bytes(), layer.workspace_bytes()
    if tb is not None:
        res["torch_saved"] = torch_saved_bytes(tb, layer, x)
    if use_ref:
        ref_train, ref_fwd = reference_cases(mdnumba.MDLSTM2D(cfg.C, cfg.D, seed=0), x)
        res["train"].update(time_interleaved({"reference": ref_train}, ref_budget_s, min_reps=2,
                                             rounds=1))
        res["forward"].update(time_interleaved({"reference": ref_fwd}, ref_budget_s, min_reps=2,
                                               rounds=1))
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: few repeats, 8x8 and 32x32 only; writes no file unless --out")
    ap.add_argument("--big", action=argparse.BooleanOptionalAction, default=True,
                    help="also run two train steps at 256x256 B8 D64, the first allocating (~2 GB; "
                         "default: on)")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip the (slow) NumPy reference")
    ap.add_argument("--no-torch", dest="torch", action="store_false",
                    help="skip the PyTorch baseline even if torch is installed")
    ap.add_argument("--threads", type=int, default=None,
                    help="numba and torch thread count (default: numba's default)")
    ap.add_argument("--out", type=out_path, default=None,
                    help=f"markdown report path (default: {DEFAULT_OUT.relative_to(HERE.parent)}; "
                         "none with --quick)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the report and write it to ``--out``."""
    args = parse_args(argv)
    load_before = load_average()
    if args.threads is not None:
        if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
            sys.exit(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} (numba's "
                     f"NUMBA_NUM_THREADS), got {args.threads}")
        numba.set_num_threads(args.threads)
    tb = load_torch_baseline() if args.torch else None
    if tb is not None:
        tb[0].set_num_threads(numba.get_num_threads())
    configs = [Config(8, 8, 16, 16), Config(32, 32, 16, 32)]
    if not args.quick:
        configs.append(Config(64, 64, 16, 32))
    budget, ref_budget = (0.3, 0.3) if args.quick else (3.0, 2.0)
    verify = {}
    if tb is not None:
        for cfg in configs:
            verify[cfg.label] = verify_torch(tb, cfg, make_input(cfg))
    results = []
    for cfg in configs:
        t0 = time.perf_counter()
        results.append(bench_config(cfg, tb, budget, ref_budget, args.reference))
        print(f"[{cfg.label}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    big = big_run(Config(256, 256, 8, 64)) if args.big else None
    report = render(machine_info(tb, load_before), results, big, args.quick, verify)
    write_report(report, report_out(args, DEFAULT_OUT))


def report_out(args: argparse.Namespace, default: Path) -> Path | None:
    """Where a benchmark writes its report: ``--out`` if given, else nowhere for a ``--quick`` or
    ``--smoke`` run (it prints only: its numbers are not for quoting), else ``default``."""
    if args.out is not None:
        return args.out
    return None if getattr(args, "quick", False) or getattr(args, "smoke", False) else default


def write_report(text: str, out: Path | None, echo: bool = True) -> str:
    """Write a benchmark's markdown report to ``out`` atomically (a run cut while writing never
    leaves half a table; None: write nothing) and print it if ``echo``; returns it."""
    if echo:
        print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, lambda fh: fh.write(text.encode()))
        print(f"wrote {out}", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
