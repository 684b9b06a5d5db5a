"""Can numba-cuda compile and run mdnumba's kind of kernels on this machine? (``run_gpu.sh`` asks first.)

Prints the versions, the GPU, and where numba-cuda finds libNVVM, libdevice and the static
cudadevrt library (a cooperative launch links it), then compiles and runs two kernels: one
calling libdevice (``math.exp``), and a cooperative one whose blocks exchange values across
``this_grid().sync()``. Exit status 0 when both gave the right answer, 1 otherwise (with the
error), so that ``run_gpu.sh`` can try the carried libNVVM (``CUDA_HOME``) before anything else.

Usage: ``python bench/gpu_probe.py``. Without a GPU or driver it says so in one line (exit 1).
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback

import numba
import numpy as np
from numba import cuda  # a module global: the simulator swaps it in kernels


def report_paths() -> None:
    """Where numba-cuda looks for the toolkit parts a kernel needs (best effort)."""
    try:
        from numba.cuda.cuda_paths import get_cuda_paths
        paths = get_cuda_paths()
        for key in ("nvvm", "libdevice", "static_cudalib_dir"):
            found = paths.get(key)
            print(f"  {key}: {getattr(found, 'info', found)} (via {getattr(found, 'by', '?')})")
    except Exception as exc:  # an older numba-cuda, or the simulator
        print(f"  (toolkit paths unknown: {type(exc).__name__}: {exc})")


def libdevice_kernel_runs() -> None:
    """A kernel calling libdevice's exp: ``out = exp(x)``."""
    @cuda.jit
    def exp_kernel(out, x):
        i = cuda.grid(1)
        if i < x.shape[0]:
            out[i] = math.exp(x[i])

    x = np.linspace(-2.0, 2.0, 300)
    out = cuda.device_array_like(x)
    exp_kernel[3, 128](out, cuda.to_device(x))
    np.testing.assert_allclose(out.copy_to_host(), np.exp(x), rtol=1e-13)  # libdevice vs SIMD: ulps


def cooperative_kernel_runs() -> int:
    """A cooperative grid (up to 8 blocks): block k writes k+1, syncs the grid, then reads
    block k+1's value; returns the blocks used."""
    @cuda.jit
    def exchange(a, b):
        k = cuda.blockIdx.x
        if cuda.threadIdx.x == 0:
            a[k] = k + 1
        cuda.cg.this_grid().sync()
        if cuda.threadIdx.x == 0:
            b[k] = a[(k + 1) % cuda.gridDim.x]

    from mdnumba.kernels.wavefront_cuda import _coop_grid  # the sweeps' own co-residency sizing
    tpb = 64
    a = cuda.device_array(8, np.int64)
    b = cuda.device_array(8, np.int64)
    blocks = _coop_grid(exchange, (a, b), tpb, 0, 8)
    exchange[blocks, tpb](a, b)
    want = (np.arange(blocks) + 1) % blocks + 1
    np.testing.assert_array_equal(b.copy_to_host()[:blocks], want)
    return blocks


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help
    print(f"numpy {np.__version__}, numba {numba.__version__}, cuda available: {cuda.is_available()}")
    if not numba.config.ENABLE_CUDASIM and not cuda.is_available():
        print("no CUDA GPU or driver was found (run_gpu.sh stops at this line)", flush=True)
        return 1
    if not numba.config.ENABLE_CUDASIM:
        cuda.detect()
    report_paths()
    ok = True
    checks = (("libdevice kernel", libdevice_kernel_runs), ("cooperative kernel", cooperative_kernel_runs))
    for name, check in checks:
        try:
            result = check()
            print(f"  {name}: ok" + (f" ({result} blocks)" if result else ""))
        except Exception:
            ok = False
            print(f"  {name}: FAILED")
            traceback.print_exc(limit=3)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
