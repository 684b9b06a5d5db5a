"""Compile the CUDA kernels a simulator run launched for a real GPU, without a GPU.

The CUDA simulator runs kernels as plain Python: it never types them, so a kernel that
passes there can still fail to compile for a GPU (a call numba-cuda does not support, a
variable that changes type, a local array of non-constant size), and the simulator's tiny
GEMM tiles are not the ones a GPU builds. This module closes that gap:

- :func:`install_recorder` (in a ``NUMBA_ENABLE_CUDASIM=1`` process) notes the numba
  argument types of every kernel launch; :func:`save` writes them to a file.
- ``python tests/ptxcheck.py RECORD [RECORD ...] [--ptx-dir DIR]`` (in a process *without*
  the simulator) compiles every recorded (kernel, argument types) pair with NVVM to PTX for
  compute capability 9.0 (H100) with the GPU's sizes (``config`` defaults), and reports,
  per kernel, its local-memory frame (``.local`` bytes in the PTX: register-blocked arrays
  that did not become registers show up here). It needs libnvvm and libnvrtc (the
  ``nvidia-nvvm`` and ``nvidia-cuda-nvrtc`` wheels of the ``test`` extra), no driver.

Exit status 0 when every pair compiled without a local-memory frame and, for kernels whose
arrays are all float32, without float64 arithmetic (a Python float literal in float32 math
promotes it: half rate or worse on a GPU) and without widening a float32 to float64 (``x if p
else 0``: Numba unifies float32 and int to float64; a conversion to or from float64 runs at 16
per clock per SM on an H100, an FMA at 128); 1 otherwise (the failures are printed).

``--part main`` leaves out the float64 twins (the float64 launches of kernels also launched in
float32: the same code at another float type), ``--part float64-twins`` compiles only them: the
suite's default run takes the first, its slow tests the second.

``--ptxas PATH`` (the ``nvidia-cuda-nvcc`` wheel has one) also prints each kernel's
registers, spills and shared memory, e.g. to size the cooperative grid, and,
with ``cuobjdump`` and ``nvdisasm`` beside it (``nvidia-cuda-cuobjdump``,
``nvidia-cuda-nvdisasm``), the instructions per iteration of its hottest FMA loops.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from shard import parse_shard

#: compute capability the kernels are compiled for (H100: sm_90)
TARGET_CC = (9, 0)
_LOCAL = re.compile(r"\.local\s+\.align\s+\d+\s+\.b8\s+__local_depot\d+\[(\d+)\]")

_F64_MATH = re.compile(r"\b(?:add|sub|mul|fma|div|rcp|sqrt)(?:\.\w+)*\.f64\b")
#: a float32 value widened to float64 (``x if p else 0`` with a float32 x is a float64 in Numba)
_F64_WIDEN = re.compile(r"\bcvt\.f64\.f32\b")
_SASS_OP = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)[^;]*;")
_SASS_BRA = re.compile(r"/\*([0-9a-f]{4,})\*/[^;]*BRA[^;]*0x([0-9a-f]+)\s*;")

_records: set = set()

#: kernels whose float arrays have one dtype whatever the layer's (the others are expected in
#: both float32 and float64 launches): the norm and clip scale are float64 scratch; tensor cores
#: take float32
ONE_DTYPE = {"mdnumba.kernels.optim_cuda._norm_and_scale": "float64",
             "mdnumba.kernels.tensor_cuda.*": "float32"}


def _arg_type(arg):
    """numba type of a launch argument as a GPU launch would see it (simulator arrays unwrapped)."""
    import numba

    if isinstance(arg, tuple):
        return numba.typeof(tuple(getattr(a, "_ary", a) for a in arg))
    return numba.typeof(getattr(arg, "_ary", arg))


def install_recorder() -> None:
    """Record (module, kernel name, argument types) of every launch of a package kernel under
    the simulator (the tests' own kernels are not the package's to check)."""
    from numba.cuda.simulator import kernel as sim

    call = sim.FakeCUDAKernel.__call__
    if getattr(call, "_ptxcheck", False):
        return

    def recording(self, *args):
        if not self._device and self.fn.__module__.startswith("mdnumba."):
            _records.add((self.fn.__module__, self.fn.__qualname__,
                          tuple(_arg_type(a) for a in args)))
        return call(self, *args)

    recording._ptxcheck = True
    sim.FakeCUDAKernel.__call__ = recording


def save(path: Path) -> int:
    """Write the recorded launches to ``path`` (pickle); return how many distinct ones."""
    Path(path).write_bytes(pickle.dumps(sorted(_records, key=str)))
    return len(_records)


def load(paths) -> list[tuple]:
    """The union of the launch records in ``paths``, sorted."""
    return sorted(set().union(*(pickle.loads(Path(p).read_bytes()) for p in paths)), key=str)


def _floats(argtypes: tuple) -> set[str]:
    """The float dtypes of a signature's array arguments."""
    return {str(getattr(t, "dtype", "")) for t in argtypes} & {"float32", "float64"}


def _dtype_class(argtypes: tuple) -> str:
    """float32 (a float32 array among the arguments) or float64 (float64 arrays only)."""
    return "float32" if "float32" in _floats(argtypes) else "float64"


#: ``--part``: every record; all but the float64 twins; the float64 twins only
PARTS = ("all", "main", "float64-twins")


def select_part(records: list[tuple], part: str) -> list[tuple]:
    """The records of ``part``: the float64 twins are the float64 launches of kernels also
    launched in float32 (the same code at another float type); "main" keeps every kernel at least
    once, in float32 where it has a float32 launch."""
    if part == "all":
        return records
    in_float32 = {(m, n) for m, n, t in records if _dtype_class(t) == "float32"}
    twin = [(m, n) in in_float32 and _dtype_class(t) == "float64" for m, n, t in records]
    return [r for r, is_twin in zip(records, twin) if is_twin == (part == "float64-twins")]


def package_kernels() -> list[str]:
    """``module.name`` of every kernel (not device function) of the ``mdnumba.kernels.*_cuda``
    modules (outside the simulator: there they are not dispatchers)."""
    import pkgutil

    from numba.cuda.dispatcher import CUDADispatcher

    import mdnumba.kernels

    names = []
    for info in pkgutil.iter_modules(mdnumba.kernels.__path__):
        if info.name.endswith("_cuda"):
            mod = importlib.import_module(f"mdnumba.kernels.{info.name}")
            names += [f"{mod.__name__}.{n}" for n, obj in vars(mod).items()
                      if isinstance(obj, CUDADispatcher) and not obj.targetoptions.get("device")
                      and obj.py_func.__module__ == mod.__name__]
    return sorted(names)


def unlaunched(records: list[tuple]) -> list[str]:
    """What the compile check would miss: each package kernel with the dtypes (float32: a float32
    array among its arguments; float64: float64 arrays only) in which no record launched it, as
    expected by :data:`ONE_DTYPE`."""
    seen: dict[str, set] = {}
    for module, name, argtypes in records:
        seen.setdefault(f"{module}.{name}", set()).add(_dtype_class(argtypes))
    missing = []
    for kernel in package_kernels():
        one = ONE_DTYPE.get(kernel, ONE_DTYPE.get(kernel.rsplit(".", 1)[0] + ".*"))
        lacking = ({one} if one else {"float32", "float64"}) - seen.get(kernel, set())
        missing += [f"{kernel} in {dtype}" for dtype in sorted(lacking)]
    return missing


def _offline_device() -> None:
    """Let device functions compile with no GPU: they ask the current device for its cc."""
    import numba.cuda.dispatcher as dispatcher

    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=TARGET_CC)


def missing_toolchain() -> str | None:
    """Why the kernels cannot be compiled here (no numba-cuda, libnvvm or libnvrtc), or None."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        for lib in ("nvvm", "nvrtc"):
            load_nvidia_dynamic_lib(lib)
    except Exception as exc:  # noqa: BLE001 - any failure means: cannot compile here
        return (f"cannot compile CUDA kernels here ({type(exc).__name__}: {str(exc)[:200]}); "
                "install the test extra: pip install -e '.[test]'")
    return None


def _ptxas_info(ptxas: Path, ptx: str, workdir: Path) -> str:
    """``ptxas -v`` summary of one kernel: registers, spills, shared memory."""
    src = workdir / "kernel.ptx"
    src.write_text(ptx)
    proc = subprocess.run([str(ptxas), f"-arch=sm_{TARGET_CC[0]}{TARGET_CC[1]}", "-c", "-v",
                           str(src), "-o", str(workdir / "kernel.o")], capture_output=True, text=True)
    lines = [ln.split(":", 1)[-1].strip() for ln in proc.stderr.splitlines()
             if "Used" in ln or "spill" in ln or "error" in ln]
    cuobjdump = ptxas.parent / "cuobjdump"  # with nvdisasm beside it (nvidia-cuda-nvdisasm)
    if cuobjdump.exists() and proc.returncode == 0:
        lines.append(_hot_loop(cuobjdump, workdir / "kernel.o"))
    return "; ".join(lines)


def _hot_loop(cuobjdump: Path, obj: Path) -> str:
    """Instructions per iteration of the (up to 3) innermost SASS loops with the most FMAs, of those
    where at least one instruction in 8 is an FMA: the cost of a sweep's multiply-add loops
    (address arithmetic and loop control beside the FMAs; the forward sweep has one per gate-block
    width: 6, 5 for 2D, 4 for 1D), not a loop over rows running the cell math (~100 FMAs in
    ~1,500 instructions). A loop of tensor-core products counts its HMMA instructions (each 32
    multiply-adds per lane in m16n8k8)."""
    sass = subprocess.run([str(cuobjdump), "-sass", str(obj)], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{cuobjdump.parent}:{os.environ.get('PATH', '')}"})
    code = [(int(a, 16), op) for a, op in _SASS_OP.findall(sass.stdout)]
    back = [(int(t, 16), a) for a, t in _SASS_BRA.findall(sass.stdout)]
    loops = [(lo, int(hi, 16)) for lo, hi in back if lo < int(hi, 16)]
    inner = [(lo, hi) for lo, hi in loops if not any(lo <= a and b <= hi and (a, b) != (lo, hi)
                                                     for a, b in loops)]
    found = []
    for lo, hi in inner:
        ops = [op for a, op in code if lo <= a <= hi]
        fma = sum(op.startswith(("FFMA", "DFMA")) for op in ops)
        mma = sum(op.startswith("HMMA") for op in ops)  # a warp's 16x8x8 product: 32 multiply-adds per lane
        if mma or (fma and 8 * fma >= len(ops)):
            found.append((fma + 32 * mma, len(ops), f"{mma} HMMA" if mma else f"{fma} FMA"))
    top = sorted(found, reverse=True)[:3]
    if not top:
        return "no FMA loop"
    return "FMA loops " + ", ".join(f"{n} instructions / {what}" for _, n, what in top)


def compile_record(module: str, name: str, argtypes: tuple) -> str:
    """PTX of kernel ``module.name`` for ``argtypes`` (its own jit options: fastmath, launch
    bounds), for TARGET_CC."""
    from numba import cuda

    disp = getattr(importlib.import_module(module), name)
    opts = disp.targetoptions
    ptx, _ = cuda.compile_ptx(disp.py_func, argtypes, cc=TARGET_CC,
                              fastmath=bool(opts.get("fastmath", False)),
                              launch_bounds=opts.get("launch_bounds"))
    return ptx


def _write_markdown(path: Path, rows: list[tuple], failures: int) -> None:
    """The per-kernel lines as a markdown table (what ``--ptxas`` found, for sm_90)."""
    import numba

    out = [f"# CUDA kernels compiled for sm_{TARGET_CC[0]}{TARGET_CC[1]} (no GPU needed)", "",
           f"Produced by `python tests/ptxcheck.py RECORD --ptxas PATH --markdown {path.name}` "
           f"(numba {numba.__version__}): every kernel signature the simulator cases launched, "
           "compiled with NVVM and ptxas at the GPU's sizes (`config` defaults). *FMA loops*: "
           "instructions in one iteration of the innermost SASS loops with the most FMAs. "
           f"{failures} failures.", "",
           "| kernel | float arrays | local bytes | ptxas / FMA loops |", "|---|---|---|---|"]
    out += [f"| `{k}` | {t} | {loc} | {info} |" for k, t, loc, info in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path, nargs="+", help="launch records (their union is compiled)")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/K",
                        help="compile only every K-th signature from the I-th on (0 <= I < K)")
    parser.add_argument("--part", choices=PARTS, default="all",
                        help="main: leave out the float64 twins of kernels launched in float32 too; "
                             "float64-twins: only those (default: all)")
    parser.add_argument("--ptx-dir", type=Path, help="also write each kernel's PTX here")
    parser.add_argument("--ptxas", type=Path, help="ptxas binary: also print registers and spills")
    parser.add_argument("--markdown", type=Path, help="also write the per-kernel lines as a table here")
    args = parser.parse_args(argv)
    _offline_device()
    records = select_part(load(args.records), args.part)
    first, step = args.shard
    mine = list(enumerate(records))[first::step]
    failures, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (module, name, argtypes) in mine:
            label = f"{module}.{name}{argtypes}"
            try:
                ptx = compile_record(module, name, argtypes)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, the exit says so
                failures.append(f"{label}\n  {type(exc).__name__}: {exc}")
                continue
            local = sum(int(n) for n in _LOCAL.findall(ptx))
            if local:
                failures.append(f"{label}\n  needs a {local}-byte local-memory frame (a local "
                                "array indexed at run time, or too large for registers)")
            floats = _floats(argtypes)
            f64 = len(_F64_MATH.findall(ptx)) if floats == {"float32"} else 0
            if f64:
                failures.append(f"{label}\n  float32 kernel with {f64} float64 operations (a Python "
                                "float literal in float32 arithmetic? use cell.like(x, value))")
            widen = len(_F64_WIDEN.findall(ptx)) if floats == {"float32"} else 0
            if widen:
                failures.append(f"{label}\n  float32 kernel that widens {widen} float32 values to float64 "
                                "(`x if p else 0` makes a float64 of a float32 x: use an if statement)")
            info = _ptxas_info(args.ptxas, ptx, Path(tmp)) if args.ptxas else ""
            rows.append((f"{module.rsplit('.', 1)[-1]}.{name}", "/".join(sorted(floats)), local, info))
            print(f"{'LOCAL' if local else 'ok':5s} {rows[-1][0]:30s} {rows[-1][1]}  local={local} B  {info}")
            if args.ptx_dir:
                args.ptx_dir.mkdir(parents=True, exist_ok=True)
                (args.ptx_dir / f"{i:03d}_{name}.ptx").write_text(ptx)
    for f in failures:
        print(f"FAILED {f}")
    if args.markdown:
        _write_markdown(args.markdown, rows, len(failures))
    print(f"{len(mine)} of {len(records)} kernel signatures compiled for sm_{TARGET_CC[0]}{TARGET_CC[1]}, "
          f"{len(failures)} failures")
    return 1 if failures or not records else 0


if __name__ == "__main__":
    sys.exit(main())
