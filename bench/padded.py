"""Padded batches: ``forward(x, sizes=...)`` on one padded batch vs the items one by one.

Items of different sizes (pages, text lines) can run as one batch padded to the largest, with
their sizes (each item then gets what it gets alone, checked here first), or one call per
item. Side by side in one process, interleaved, best of N (median in brackets), float32 (or
``--dtype``), on the CPU: forward + backward (``input_grad=False``: the items are data; with
64 input channels the layer is an upper one of a stack, and its dx is computed) and the
saving-free forward. The input projection, the sweeps, the parents' gather, the weight-gradient
GEMMs and the dx product skip the padding (the "padded cells" column), the backward zeroes only
the padding next to the items; the skew and unskew copies and zeroing the padding's h and c
run over every row: batching wins where the per-call cost and the parallelism of a larger batch
outweigh that.

Usage: ``python bench/padded.py [--quick] [--dtype float32|float64] [--out PATH]`` (default
``bench/results/padded.md``; ``--quick`` prints small shapes only, unless ``--out``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_args import out_path
from bench_cpu import best_median, load_average, machine_info, report_out, time_interleaved, write_report

import mdnumba

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "padded.md"


@dataclass(frozen=True)
class Case:
    label: str
    ndim: int
    lows: tuple    # smallest item size per axis
    highs: tuple   # largest (the padded grid)
    B: int
    D: int
    directions: int
    channels: int = 1  # input channels; above 1 an upper layer of a stack, whose dx is needed

    def layer(self, dtype: str):
        cls = {1: mdnumba.LSTM1D, 2: mdnumba.MDLSTM2D}[self.ndim]
        return cls(self.channels, self.D, directions=self.directions, seed=0, dtype=dtype)

    def items(self, dtype: str) -> list[np.ndarray]:
        rng = np.random.default_rng(0)
        sizes = [tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(self.lows, self.highs))
                 for _ in range(self.B)]
        return [rng.random((1,) + s + (self.channels,)).astype(dtype) for s in sizes]


CASES = [Case("2D pages 16..48 x 32..128, 4 directions", 2, (16, 32), (48, 128), 16, 16, 4),
         Case("2D pages 16..48 x 32..128, 4 directions, 64 input channels", 2, (16, 32), (48, 128),
              16, 16, 4, channels=64),
         Case("1D lines 20..200 steps, 2 directions", 1, (20,), (200,), 32, 64, 2)]
QUICK = [Case("2D 3..8 x 3..8, 4 directions", 2, (3, 3), (8, 8), 4, 4, 4),
         Case("1D 3..12 steps, 2 directions", 1, (3,), (12,), 4, 4, 2)]


def check(layer, x, sizes, items) -> float:
    """Largest difference between each item's part of the padded output and its own output."""
    parts = mdnumba.unpad_batch(layer.forward(x, sizes=sizes), sizes)
    return max(float(np.abs(part - layer.forward(it)[0]).max()) for part, it in zip(parts, items))


def bench_case(case: Case, budget_s: float, dtype: str = "float32") -> dict:
    layer, items = case.layer(dtype), case.items(dtype)
    x, sizes = mdnumba.pad_batch([it[0] for it in items], shape=case.highs)
    diff = check(layer, x, sizes, items)

    dx = case.channels > 1

    def batch_step() -> None:
        h = layer.forward(x, sizes=sizes)
        layer.backward(h, input_grad=dx)

    def items_step() -> None:
        for it in items:
            layer.backward(layer.forward(it), input_grad=dx)

    cases = {"batch": [("step", batch_step)], "items": [("step", items_step)],
             "batch_infer": [("forward", lambda: layer.forward(x, save=False, sizes=sizes))],
             "items_infer": [("forward", lambda: [layer.forward(it, save=False) for it in items])]}
    times = time_interleaved(cases, budget_s)
    cells = sum(int(np.prod(s)) for s in sizes)
    return dict(case=case, times=times, diff=diff, pad=1 - cells / (case.B * int(np.prod(case.highs))))


def ratio(slow, fast) -> str:
    """``slow / fast`` of the best times (of the medians in brackets: on a noisy machine the best
    of a few ~200 ms calls can be an outlier, the median less so)."""
    return f"{slow.best / fast.best:.2f}x ({slow.median / fast.median:.2f}x)"


def render(info: dict, results: list[dict]) -> str:
    lines = ["# Padded batches: `forward(x, sizes=...)` vs one call per item (CPU)", ""]
    lines += [f"- **{k}**: {v}" for k, v in info.items()]
    lines += ["", "Produced by `python bench/padded.py` (one process). " + __doc__.split("\n\n")[1]
              .replace("\n", " ").replace("``", "`"), "",
              "| items | padded cells | fwd+bwd batch ms | fwd+bwd one by one ms | one by one / batch | "
              "save=False batch ms | save=False one by one ms | one by one / batch | max abs difference |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, c = r["times"], r["case"]
        cells = [f"{c.label}, B{c.B} D{c.D}", f"{r['pad']:.0%}"]
        for batch, items in (("batch", "items"), ("batch_infer", "items_infer")):
            cells += [best_median(t[batch]), best_median(t[items]), ratio(t[items], t[batch])]
        lines.append("| " + " | ".join(cells + [f"{r['diff']:.1g}"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, prints only (unless --out)")
    ap.add_argument("--out", type=out_path, default=None, help=f"report file (default {DEFAULT_OUT})")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = ap.parse_args(argv)
    load_before = load_average()
    results = []
    for case in QUICK if args.quick else CASES:
        print(f"... {case.label}", flush=True)
        results.append(bench_case(case, 0.3 if args.quick else 10.0, args.dtype))
    info = dict(machine_info(None, load_before), dtype=args.dtype)
    info.pop("torch", None)  # no PyTorch here
    text = render(info, results)
    write_report(text, report_out(args, DEFAULT_OUT))


if __name__ == "__main__":
    main()
