"""A few device train steps of one MD-LSTM layer, for a profiler (``run_gpu.sh --profile``).

Builds ``CudaLSTM`` + ``CudaAdam`` for one configuration (as ``bench_gpu.py``), runs
``--warmup`` steps (compilation, allocation) and then ``--steps`` steps, synchronising after
each. Under Nsight Compute (``ncu --launch-skip`` past the warm-up kernels) this gives the
sweep and GEMM kernels' occupancy, issue-slot use and memory traffic; on its own it prints
the mean step time.

Usage: ``python bench/profile_gpu.py [--config 32] [--path cooperative] [--warmup 2] [--steps 2]``.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench_args import positive_int
from bench_cpu import make_input
from bench_gpu import mdnumba_device_fns, parse_config, require_cuda_or_exit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=parse_config, default="32",
                    help="32, 128, 256 or HxWxBxD (as bench_gpu.py)")
    ap.add_argument("--path", default="cooperative", choices=["cooperative", "per-diagonal"])
    ap.add_argument("--warmup", type=positive_int, default=2)
    ap.add_argument("--steps", type=positive_int, default=2)
    args = ap.parse_args(argv)
    require_cuda_or_exit()

    from numba import cuda

    from mdnumba.backend_cuda import last_path
    cfg = args.config
    train, _, _ = mdnumba_device_fns(cfg, make_input(cfg), args.path)
    for _ in range(args.warmup):
        train()
    cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train()
        cuda.synchronize()
    per_step = (time.perf_counter() - t0) / max(args.steps, 1)
    print(f"{cfg.label}: {per_step * 1e3:.3f} ms per train step ({last_path()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
