"""GPU tuning sweep (issue 5): sweep time per anti-diagonal vs. rows per thread, unrolled steps,
block size, sweep layout and launch bounds, with or without stages of the sweeps.

``MDNUMBA_CUDA_ROWS_PER_THREAD`` (batch rows a sweep thread computes; ``MDNUMBA_CUDA_ITEM_ROWS``, the
item layout's cells per thread, is set to the same), ``MDNUMBA_CUDA_UNROLL``
(steps of its inner sum whose loads go out together; both compile-time: they size the register
arrays), ``MDNUMBA_THREADS_PER_BLOCK``, ``MDNUMBA_CUDA_LAYOUT`` (flat, sliced, staged, item or tensor) and
``MDNUMBA_CUDA_SLICE_UNITS`` (the sliced and staged layouts' units per block, compile-time),
``MDNUMBA_CUDA_ITEM_THREADS`` (the item layout's threads per block, compile-time),
``MDNUMBA_CUDA_TENSOR_TILES`` (the tensor layout's backward n-tiles per warp, compile-time) are read when
mdnumba is imported, as are ``MDNUMBA_CUDA_MIN_BLOCKS`` (``--min-blocks``: the sweep kernels
compiled for that many blocks per SM, registers capped to fit, 0 none), the diagnostic
``MDNUMBA_CUDA_SKIP`` (``--variants``: ``no-sum``, the sweeps without their recurrent sums;
``no-cell``, without the cells' gate math; ``neither``, without both: what is left is the
pre-activations' loads and stores, the item bookkeeping and the grid syncs; the differences
place a sweep's time without a profiler; their results are wrong and their train steps no
candidate defaults) and ``MDNUMBA_CUDA_CELL_REGISTERS`` (variant ``memory-cell``: the cell math
on global memory instead of registers, the same results), so
each combination runs in a child process of its own (``--child``), which builds a
``CudaLSTM`` on the cooperative path, times the forward and backward sweeps alone and a
device train step (``bench_gpu.mdnumba_device_fns``) and prints one JSON line. The parent
collects them into a markdown table (default ``bench/results/tune_gpu.md``; ``--quick`` only
prints it unless given ``--out``): the fastest
combination per config is the default to pick in ``mdnumba/config.py``.

Usage: ``python bench/tune_gpu.py [--rows 1,2,4,8] [--unroll 4,8,16] [--tpb 64,128,256]
[--layout flat,sliced,staged,item,tensor] [--slice 4,8,16] [--item-threads 256,512,1024]
[--tensor-tiles 1,2,4] [--min-blocks 0,3,4] [--variants full,memory-cell,no-sum,no-cell,neither]
[--configs 32,256] [--quick] [--out PATH]`` (the slice sizes apply to the sliced and staged layouts,
the item threads to the item layout, the n-tiles to the tensor layout); on a lent GPU machine
``bench/run_gpu.sh --tune``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_args import choice_list, int_list, out_path
from bench_cpu import make_input, report_out, write_report
from bench_gpu import Config, config_list, mdnumba_device_fns, require_cuda_or_exit, sweep_times, time_it

from mdnumba.config import CUDA_LAYOUTS, INT_RANGES

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "tune_gpu.md"
#: variant -> its environment: the sweep stages it skips (MDNUMBA_CUDA_SKIP), the cell math on
#: global memory (MDNUMBA_CUDA_CELL_REGISTERS=0)
VARIANTS = {"full": {}, "memory-cell": {"MDNUMBA_CUDA_CELL_REGISTERS": "0"},
            "no-sum": {"MDNUMBA_CUDA_SKIP": "sum"}, "no-cell": {"MDNUMBA_CUDA_SKIP": "cell"},
            "neither": {"MDNUMBA_CUDA_SKIP": "sum,cell"}}
#: per layout with a size of its own: that size's environment variable (a layout spec is "name N")
LAYOUT_SIZES = {"sliced": "MDNUMBA_CUDA_SLICE_UNITS", "staged": "MDNUMBA_CUDA_SLICE_UNITS",
                "item": "MDNUMBA_CUDA_ITEM_THREADS", "tensor": "MDNUMBA_CUDA_TENSOR_TILES"}
#: the variants whose results are right: their train steps are candidate defaults
CANDIDATES = ("full", "memory-cell")
#: seconds a combination's child process may run: one still going then (a kernel that never ends)
#: is killed and its row says so, and the other combinations still run
COMBO_LIMIT_S = 180.0


def child(configs: list[Config], budget: float, variant: str) -> None:
    """Time every config with this process's settings (those of ``variant`` among them); one JSON
    line each on stdout."""
    from numba import cuda

    from mdnumba import config
    from mdnumba.backend_cuda import last_path
    for cfg in configs:
        train, _, dev = mdnumba_device_fns(cfg, make_input(cfg), "cooperative")
        step = time_it(train, cuda.synchronize, budget)
        path = last_path()
        sweeps = sweep_times(dev, cfg, "cooperative", cuda.synchronize, budget)
        layout = config.CUDA_LAYOUT
        if layout in LAYOUT_SIZES:  # its size: the config setting of that variable (MDNUMBA_X -> config.X)
            layout += f" {getattr(config, LAYOUT_SIZES[layout].removeprefix('MDNUMBA_'))}"
        print(json.dumps({"config": cfg.label, "rows": config.CUDA_ROWS_PER_THREAD,
                          "unroll": config.CUDA_UNROLL, "tpb": config.THREADS_PER_BLOCK, "layout": layout,
                          "min_blocks": config.CUDA_MIN_BLOCKS, "variant": variant,
                          "train_ms": step.best * 1e3,
                          "fwd_us_diag": sweeps["forward"].best / cfg.diagonals * 1e6,
                          "bwd_us_diag": sweeps["backward"].best / cfg.diagonals * 1e6,
                          "path": path}), flush=True)


def run_combo(rows: int, unroll: int, tpb: int, layout: str, configs: str, quick: bool,
              variant: str = "full", min_blocks: int = 0) -> list[dict]:
    """Run :func:`child` with ``rows`` per thread, ``unroll`` steps, ``tpb`` threads per block,
    ``layout`` ("flat", "sliced N" / "staged N": N units per slice, "item N": N threads per block,
    "tensor N": N backward n-tiles per warp),
    ``variant`` (of :data:`VARIANTS`) and
    the sweep kernels compiled for ``min_blocks`` blocks per SM (0: no bound)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    name, _, units = layout.partition(" ")
    env = dict(os.environ, MDNUMBA_CUDA_ROWS_PER_THREAD=str(rows), MDNUMBA_CUDA_ITEM_ROWS=str(rows),
               MDNUMBA_CUDA_UNROLL=str(unroll),
               MDNUMBA_THREADS_PER_BLOCK=str(tpb), MDNUMBA_CUDA_LAYOUT=name, MDNUMBA_CUDA_SKIP="",
               MDNUMBA_CUDA_CELL_REGISTERS="1", MDNUMBA_CUDA_MIN_BLOCKS=str(min_blocks),
               **({LAYOUT_SIZES[name]: units} if units else {}))
    env.update(VARIANTS[variant])
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--configs", configs] + \
        (["--quick"] if quick else [])
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=COMBO_LIMIT_S)
        out = proc.stdout
        error = (proc.stderr.strip().splitlines() or ["no output"])[-1] if proc.returncode else ""
    except subprocess.TimeoutExpired as exc:  # the configs it finished still count
        out, err = (b.decode(errors="replace") if isinstance(b, bytes) else b or ""
                    for b in (exc.stdout, exc.stderr))  # what it wrote before (bytes, or str)
        error = f"HUNG: still running after {COMBO_LIMIT_S:g} s, killed" + \
            "".join(f" (its last words: {line})" for line in err.strip().splitlines()[-1:])
    found = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    if error:
        found.append({"config": "?", "rows": rows, "unroll": unroll, "tpb": tpb, "layout": layout,
                      "min_blocks": min_blocks, "variant": variant, "error": error})
    return found


def render(rows: list[dict]) -> str:
    out = ["# GPU tuning: rows per thread x unrolled steps x threads per block x layout x launch bounds "
           "(cooperative path)", "",
           "Produced by `python bench/tune_gpu.py` (one process per combination). Best of N; sweeps "
           "alone per anti-diagonal, train step = `CudaLSTM` forward + backward + `CudaAdam`. "
           "Blocks/SM: the sweep kernels compiled for that many blocks of the row's threads per SM "
           "(`MDNUMBA_CUDA_MIN_BLOCKS`, registers capped to fit; 0 none). **Bold**: fastest train step "
           "per config (of the variants with right results: full, memory-cell, the cell math on global "
           "memory). The other variants (`MDNUMBA_CUDA_SKIP`, wrong results, for timing only): no-sum, "
           "the sweeps without their recurrent sums; no-cell, without the cells' gate math; neither, "
           "without both.", "",
           "| config | rows/thread | unroll | threads/block | layout | blocks/SM | variant | train step ms | "
           "forward µs/diag | backward µs/diag | path |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    best = {}
    for r in rows:
        right = r.get("variant", "full") in CANDIDATES
        if right and "train_ms" in r and r["train_ms"] < best.get(r["config"], float("inf")):
            best[r["config"]] = r["train_ms"]
    for r in sorted(rows, key=lambda r: (r["config"], r["rows"], r["unroll"], r["tpb"], r["layout"],
                                         r.get("min_blocks", 0), r.get("variant", "full"))):
        setting = (f"| {r['config']} | {r['rows']} | {r['unroll']} | {r['tpb']} | {r['layout']} | "
                   f"{r.get('min_blocks', 0)} | {r.get('variant', 'full')} |")
        if "error" in r:
            out.append(f"{setting} FAILED: {r['error']} | | | |")
            continue
        t = f"{r['train_ms']:.3g}"
        t = f"**{t}**" if r["train_ms"] == best.get(r["config"]) else t
        out.append(f"{setting} {t} | {r['fwd_us_diag']:.1f} | "
                   f"{r['bwd_us_diag']:.1f} | {r['path']} |")
    return "\n".join(out) + "\n"


def setting_list(name: str):
    """An argparse type: a comma list of values of the setting ``MDNUMBA_<name>``, each in its range."""
    return int_list(*INT_RANGES[f"MDNUMBA_{name}"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    settings = (("--rows", "CUDA_ROWS_PER_THREAD", "1,2,4,8", "rows per thread"),
                ("--unroll", "CUDA_UNROLL", "4,8,16", "unrolled steps"),
                ("--tpb", "THREADS_PER_BLOCK", "64,128,256", "threads per block"),
                ("--slice", "CUDA_SLICE_UNITS", "8", "units per slice in the sliced and staged layouts"),
                ("--item-threads", "CUDA_ITEM_THREADS", "512", "threads per block of the item layout"),
                ("--tensor-tiles", "CUDA_TENSOR_TILES", "2", "backward n-tiles per warp (tensor layout)"))
    for flag, name, default, what in settings:
        ap.add_argument(flag, type=setting_list(name), default=default, help=f"{what} to try (comma list)")
    ap.add_argument("--layout", type=choice_list(CUDA_LAYOUTS), default="flat,sliced,staged,item,tensor",
                    help="sweep layouts to try (comma list)")
    ap.add_argument("--min-blocks", type=setting_list("CUDA_MIN_BLOCKS"), default="0",
                    help="blocks per SM to compile the sweep kernels for (comma list; 0: no bound)")
    ap.add_argument("--variants", type=choice_list(tuple(VARIANTS)), default="full",
                    help="comma list of full, memory-cell (the cell math on global memory), no-sum, no-cell, "
                         "neither (sweep stages left out)")
    ap.add_argument("--variant", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--configs", type=config_list, default="32,256", help="as bench_gpu.py --configs")
    ap.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=out_path, default=None,
                    help="the table's file (default bench/results/tune_gpu.md; with --quick none: the "
                         "table is printed)")
    args = ap.parse_args(argv)
    budget = 0.3 if args.quick else 1.0
    if args.child:
        child(args.configs, budget, args.variant)
        return 0
    require_cuda_or_exit()  # before a child process per combination finds it out
    args.out = report_out(args, DEFAULT_OUT)
    rows: list[dict] = []
    sizes = {"item": args.item_threads, "tensor": args.tensor_tiles}
    layouts = [f"{lay} {n}".strip() for lay in args.layout
               for n in (sizes.get(lay, args.slice) if lay in LAYOUT_SIZES else [""])]
    configs = ",".join(f"{c.H}x{c.W}x{c.B}x{c.D}" for c in args.configs)  # the child's --configs
    combos = [(r, u, t, lay, m, v) for r in args.rows for u in args.unroll for t in args.tpb
              for lay in layouts for m in args.min_blocks for v in args.variants]
    for r, u, t, lay, m, v in combos:
        t0 = time.perf_counter()
        rows += run_combo(r, u, t, lay, configs, args.quick, v, m)
        print(f"rows/thread {r}, unroll {u}, threads/block {t}, {lay}, {m} blocks/SM, {v}: "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        # after every combination: a cut-off run keeps its rows
        write_report(render(rows), args.out, echo=False)
    print(render(rows))
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
