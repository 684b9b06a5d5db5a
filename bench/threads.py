"""CPU thread-pool wait policy: MD-LSTM forward+backward alone and with two runs at once.

The parallel CPU drivers open one OpenMP parallel region per anti-diagonal (63 for a
32x32 grid, per pass). Between regions GNU OpenMP's threads spin before they sleep:
300,000 iterations by default. Alone on the machine that starts the next region a
little sooner; with a second such process on the same cores (two trainings, or a
training beside the tests) each pool's spinning threads hold the cores the other
pool's threads need for their part of a diagonal, and every region waits a scheduler
time slice. mdnumba therefore sets ``GOMP_SPINCOUNT`` (unless the environment has it)
in :mod:`mdnumba.config`. This benchmark measures fwd+bwd of ``MDLSTM2D`` per setting,
each in fresh processes (the settings are read once, when the pool starts): alone, and
as two identical processes started together; it writes a markdown table.

Usage: ``python bench/threads.py [--out PATH] [--seconds S] [--rounds N]``. Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_args import out_path, positive_float, positive_int

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "threads.md"
SHAPES = [(8, 16, 16), (32, 16, 16), (64, 16, 32)]  # (side, batch, hidden)
#: (label, environment) of each pool setting; "mdnumba default" leaves the environment alone
VARIANTS = [
    ("mdnumba default (GOMP_SPINCOUNT=3000)", {}),
    ("libgomp default (GOMP_SPINCOUNT=300000)", {"GOMP_SPINCOUNT": "300000"}),
    ("GOMP_SPINCOUNT=30000", {"GOMP_SPINCOUNT": "30000"}),
    ("OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("NUMBA_THREADING_LAYER=workqueue", {"NUMBA_THREADING_LAYER": "workqueue"}),
    ("NUMBA_NUM_THREADS=1", {"NUMBA_NUM_THREADS": "1"}),
]
CONDITIONS = ("alone", "two at once")
WARMUP_S = 8.0  # import + one call per shape (kernels cached), before the copies time together
POOL_VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER")


def worker(seconds: float, start_at: float) -> None:
    """Time fwd+bwd for every shape in this process (after a warm-up call each, from wall-clock
    time ``start_at`` on, so that copies started together time together); print one JSON
    line of ms values."""
    import numba
    import numpy as np

    import mdnumba
    cases = []
    for side, batch, hidden in SHAPES:
        layer = mdnumba.MDLSTM2D(1, hidden, seed=0)
        x = np.random.default_rng(0).random((batch, side, side, 1), dtype=np.float32)
        dh = np.ones((batch, side, side, hidden), np.float32) / (batch * side * side)

        def step(layer=layer, x=x, dh=dh) -> None:
            layer.forward(x)
            layer.zero_grad()
            layer.backward(dh)
        step()  # compile / load from cache, allocate
        cases.append((f"{side}x{side} B{batch} D{hidden}", step))
    time.sleep(max(0.0, start_at - time.time()))
    out = {}
    for label, step in cases:
        times, stop = [], time.perf_counter() + seconds
        while len(times) < 3 or time.perf_counter() < stop:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        out[label] = {"median": 1e3 * statistics.median(times), "best": 1e3 * min(times), "n": len(times)}
    out["layer"] = numba.threading_layer()
    out["threads"] = numba.get_num_threads()
    print(json.dumps(out))


def run_workers(env: dict, seconds: float, copies: int) -> dict:
    """``copies`` identical worker processes started together; per shape the slowest median."""
    clean = {k: v for k, v in os.environ.items() if k not in POOL_VARS}
    start_at = time.time() + WARMUP_S
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--seconds", str(seconds),
                               "--start-at", str(start_at)],
                              env={**clean, **env}, stdout=subprocess.PIPE, text=True)
             for _ in range(copies)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker failed with {env}")
    merged = dict(outs[0])
    for key, val in merged.items():
        if isinstance(val, dict):
            merged[key] = max((o[key] for o in outs), key=lambda v: v["median"])
    return merged


def measure(seconds: float, rounds: int) -> dict:
    """``{(condition, label): result}``: every variant runs ``rounds`` times, interleaved; per
    shape the median over the rounds of the per-process median."""
    runs: dict = {}
    for _ in range(rounds):
        for condition in CONDITIONS:
            for label, env in VARIANTS:
                r = run_workers(env, seconds, 1 if condition == "alone" else 2)
                runs.setdefault((condition, label), []).append(r)
                print(condition, label, json.dumps(r), file=sys.stderr, flush=True)
    results = {}
    for key, rs in runs.items():
        merged = dict(rs[0])
        for shape, val in merged.items():
            if isinstance(val, dict):
                merged[shape] = {"median": statistics.median(r[shape]["median"] for r in rs)}
        results[key] = merged
    return results


def render(results: dict, seconds: float, rounds: int) -> str:
    shapes = [f"{s}x{s} B{b} D{d}" for s, b, d in SHAPES]
    any_r = next(iter(results.values()))
    lines = [f"# CPU thread-pool wait policy ({datetime.date.today()})", "",
             f"`python bench/threads.py --seconds {seconds:g} --rounds {rounds}`: MDLSTM2D float32 "
             f"forward + backward, median ms over "
             f"{seconds:g} s of repeats per process, median of {rounds} interleaved rounds; "
             f"threading layer `{any_r['layer']}`, {any_r['threads']} threads, {os.cpu_count()} "
             "cores. *alone*: one process; *2x*: two identical processes started together "
             "(the slower one's median).", "",
             "| setting | " + " | ".join(f"{s} alone | 2x" for s in shapes) + " |",
             "|---|" + "---:|---:|" * len(shapes)]
    for label, _ in VARIANTS:
        cells = []
        for s in shapes:
            for condition in CONDITIONS:
                cells.append(f"{results[(condition, label)][s]['median']:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=positive_float, default=3.0, help="timing per shape and process")
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=out_path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.seconds, args.start_at)
        return
    text = render(measure(args.seconds, args.rounds), args.seconds, args.rounds)
    from bench_cpu import write_report  # only now: it imports mdnumba, which sets GOMP_SPINCOUNT
    write_report(text, args.out)


if __name__ == "__main__":
    main()
