"""Where a device step's time goes: every CUDA launcher call timed alone (a diagnosis, not a benchmark).

:func:`launch_breakdown` wraps the public launchers of :mod:`mdnumba.kernels.wavefront_cuda` and
:mod:`mdnumba.kernels.optim_cuda` (``gemm``, ``wavefront_backward``, ``adam_update``, ...; the
layers call them through the module, so patching its attributes reaches every call) with a
device synchronize before and after each outermost call, runs a step a few times and returns,
per launcher, its calls and milliseconds in the fastest step, and the kernels numba compiled
during the timed steps (a kernel that is compiled again at every call, e.g. for arguments whose
type changes, shows up there and not in a best-of-N timing table's explanation).
"""

from __future__ import annotations

if __name__ == "__main__":
    raise SystemExit("bench/launch_times.py is a module of bench_family.py --device cuda, not a script: "
                     "run that")

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager


def _modules():
    from mdnumba.kernels import optim_cuda, wavefront_cuda
    return wavefront_cuda, optim_cuda


def _launchers(module) -> dict[str, Callable]:
    """The module's public functions that launch kernels (defined there, not imported)."""
    return {name: f for name, f in vars(module).items()
            if callable(f) and not name.startswith("_") and getattr(f, "__module__", None) == module.__name__
            and not isinstance(f, type) and name not in ("last_path", "shares_memory", "as_device")}


def _compiled(module) -> dict[str, int]:
    """Compiled specialisations per CUDA kernel of ``module``."""
    return {name: len(getattr(k, "overloads", {})) for name, k in vars(module).items()
            if hasattr(k, "overloads")}


@contextmanager
def _timed(calls: dict, sync: Callable[[], None]):
    """Patch the launchers to record (name, seconds) of each outermost call into ``calls``."""
    saved, depth = [], [0]
    for module in _modules():
        for name, f in _launchers(module).items():
            def wrapper(*args, _f=f, _name=name, **kw):
                if depth[0]:
                    return _f(*args, **kw)
                depth[0] += 1
                sync()
                t0 = time.perf_counter()
                try:
                    return _f(*args, **kw)
                finally:
                    sync()
                    calls[_name].append(time.perf_counter() - t0)
                    depth[0] -= 1
            saved.append((module, name, f))
            setattr(module, name, wrapper)
    try:
        yield
    finally:
        for module, name, f in saved:
            setattr(module, name, f)


def launch_breakdown(step: Callable[[], None], sync: Callable[[], None], repeats: int = 5) -> dict:
    """``{"step_ms", "launchers": {name: (calls, ms)}, "compiled": {kernel: new specialisations}}``
    for the fastest of ``repeats`` runs of ``step`` (after one untimed run that compiles)."""
    step()
    sync()
    before = {m.__name__: _compiled(m) for m in _modules()}
    best = None
    for _ in range(repeats):
        calls: dict = defaultdict(list)
        with _timed(calls, sync):
            t0 = time.perf_counter()
            step()
            sync()
            total = time.perf_counter() - t0
        if best is None or total < best[0]:
            best = (total, calls)
    compiled = {}
    for m in _modules():
        for name, n in _compiled(m).items():
            if n > before[m.__name__].get(name, 0):
                compiled[name] = n - before[m.__name__].get(name, 0)
    return {"step_ms": best[0] * 1e3, "compiled": compiled,
            "launchers": {name: (len(t), sum(t) * 1e3) for name, t in best[1].items()}}


def render(label: str, result: dict, top: int = 8) -> list[str]:
    """Markdown lines: the step's slowest launchers."""
    items = sorted(result["launchers"].items(), key=lambda kv: -kv[1][1])[:top]
    parts = ", ".join(f"`{name}` {ms:.3g} ms ({n}x)" for name, (n, ms) in items)
    recompiled = ", ".join(f"`{k}` +{n}" for k, n in result["compiled"].items()) or "none"
    return [f"| {label} | {result['step_ms']:.3g} | {parts} | {recompiled} |"]


HEADER = ["| layer | synchronized step ms | slowest launchers: ms per step (calls) | compiled while timed |",
          "|---|---|---|---|"]
