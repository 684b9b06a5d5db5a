"""Cost per unit across hidden and batch sizes: do shapes that fill no whole tiles fall off?

The CPU kernels' products run as register tiles of W columns (32 float32 with AVX-512, 16 with
AVX2); a gate row of (N+3)·D columns that W does not divide ends in a partial tile. Per layer
kind (LSTM1D, 2D and 3D MD-LSTM, Grid LSTM), hidden sizes around multiples of W are timed side
by side in one process, interleaved, best of N: a training step (forward + backward,
``input_grad=False``) and the saving-free forward, as ns per cell-unit (time / (batch · cells ·
D)), and each size's cost per unit against a whole-tile size: W (for the 3D layer W / 2, where
its gate row of 6D fills whole tiles). Small sizes cost more per unit anyway
(the cell math and the sweep's fixed costs weigh more), so the column to read is how far an odd
size sits from its neighbours.

A second table does the same across batch sizes at equal batch · cells (2D, a 256x256 image at
batch 1 down to 91x91 at batch 8): a tile holds 4 batch rows of a cell, or at batches 1 and 2
the rows of 4 or 2 cells of one diagonal.

Usage: ``python bench/shapes.py [--quick] [--out PATH]`` (default ``bench/results/shapes.md``;
``--quick`` prints small shapes only, unless ``--out``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_args import out_path
from bench_cpu import best_median, load_average, machine_info, report_out, time_interleaved, write_report

import mdnumba
from mdnumba.kernels.simd import tile_width

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "shapes.md"


@dataclass(frozen=True)
class Kind:
    label: str
    shape: tuple  # batch and grid (1D: steps; Grid LSTM: steps, levels)
    ref: int      # the hidden size of whole tiles the others are compared with

    def layer(self, D: int):
        if self.label.startswith("Grid"):
            return mdnumba.GridLSTM2D(D, self.shape[2], seed=0)
        cls = {2: mdnumba.LSTM1D, 3: mdnumba.MDLSTM2D, 4: mdnumba.MDLSTM3D}[len(self.shape)]
        return cls(1, D, seed=0)

    def data(self, D: int) -> tuple[np.ndarray, int]:
        """The input and its cell-units (batch · cells · D)."""
        rng = np.random.default_rng(0)
        if self.label.startswith("Grid"):
            B, T, L = self.shape
            return rng.standard_normal((B, T, D)).astype(np.float32), B * T * L * D
        return rng.standard_normal(self.shape + (1,)).astype(np.float32), int(np.prod(self.shape)) * D


def kinds(W: int, quick: bool) -> list[tuple[Kind, list[int]]]:
    """The layer kinds and hidden sizes timed: around W (and W / 2) at the issue-sized shapes."""
    if quick:
        return [(Kind("LSTM1D T8", (2, 8), 4), [3, 4]), (Kind("2D 4x4", (2, 4, 4), 4), [3, 4])]
    sizes = sorted({W // 2 - 1, W // 2, W // 2 + 4, W - 1, W, W + 1, 2 * W - 1, 2 * W})
    cube = sorted({W // 2 - 1, W // 2, W // 2 + 5, W - 1, W})
    return [(Kind("LSTM1D T200", (16, 200), W), sizes),
            (Kind("2D 32x32", (16, 32, 32), W), sizes),
            (Kind("3D 16x16x16", (4, 16, 16, 16), W // 2), cube),
            (Kind("Grid LSTM T32 L3", (16, 32, 3), W), sizes)]


def bench_kind(kind: Kind, sizes: list[int], budget_s: float) -> list[dict]:
    """Each size's train step and saving-free forward, interleaved with the other sizes'."""
    cases, units = {}, {}
    for D in sizes:
        layer, (x, units[D]) = kind.layer(D), kind.data(D)
        g = np.full(layer.forward(x, save=False).shape, 1e-3, np.float32)

        def step(layer=layer, x=x, g=g) -> None:
            layer.forward(x)
            layer.backward(g, input_grad=False)

        cases[(D, "train")] = [("step", step)]
        cases[(D, "infer")] = [("forward", lambda layer=layer, x=x: layer.forward(x, save=False))]
    times = time_interleaved(cases, budget_s)
    return [dict(D=D, units=units[D], train=times[(D, "train")], infer=times[(D, "infer")]) for D in sizes]


#: the batch table: (batch, side of the square image, hidden size), batch · cells about equal
BATCHES = [(1, 256, 64), (2, 181, 64), (3, 148, 64), (4, 128, 64), (8, 91, 64),
           (1, 256, 128), (8, 91, 128)]
BATCHES_QUICK = [(1, 8, 4), (4, 4, 4)]


def bench_batches(quick: bool, budget_s: float) -> list[dict]:
    """Each (batch, image, D) of the batch table: train step and saving-free forward, interleaved
    (the stable cell: the graves cell's state can overflow on a 256x256 grid)."""
    cases, units = {}, {}
    for B, side, D in BATCHES_QUICK if quick else BATCHES:
        layer = mdnumba.MDLSTM2D(1, D, seed=0, cell="stable")
        x = np.random.default_rng(0).standard_normal((B, side, side, 1)).astype(np.float32)
        g = np.full(layer.forward(x, save=False).shape, 1e-3, np.float32)
        units[(B, side, D)] = B * side * side * D

        def step(layer=layer, x=x, g=g) -> None:
            layer.forward(x)
            layer.backward(g, input_grad=False)

        cases[(B, side, D, "train")] = [("step", step)]
        cases[(B, side, D, "infer")] = [("forward", lambda layer=layer, x=x: layer.forward(x, save=False))]
    times = time_interleaved(cases, budget_s)
    return [dict(B=B, side=side, D=D, units=u, train=times[(B, side, D, "train")],
                 infer=times[(B, side, D, "infer")]) for (B, side, D), u in units.items()]


def render_batches(rows: list[dict]) -> list[str]:
    lines = ["", "## Across batch sizes (2D, equal batch · cells)", "",
             "| image | batch | D | train ms | train ns/unit | vs the largest batch | save=False ms | "
             "save=False ns/unit | vs the largest batch |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = max((q for q in rows if q["D"] == r["D"]), key=lambda q: q["B"])
        cells = [f"{r['side']}x{r['side']}", f"B{r['B']}", str(r["D"])]
        lines.append("| " + " | ".join(cells + phase_cells(r, ref)) + " |")
    return lines


def phase_cells(r: dict, ref: dict) -> list[str]:
    """A row's train and saving-free forward: time, ns per cell-unit, cost per unit against ``ref``."""
    cells = []
    for phase in ("train", "infer"):
        per = r[phase].best / r["units"]
        cells += [best_median(r[phase]), f"{per * 1e9:.1f}", f"{per / (ref[phase].best / ref['units']):.2f}x"]
    return cells


def render(info: dict, results: list[tuple[Kind, list[dict]]], batches: list[dict]) -> str:
    lines = ["# Cost per unit across hidden sizes and batch sizes (CPU)", ""]
    lines += [f"- **{k}**: {v}" for k, v in info.items()]
    lines += ["", "Produced by `python bench/shapes.py` (one process). " + " ".join(
        __doc__.split("\n\n")[1].split()).replace("``", "`"), "", "## Across hidden sizes", "",
        "| layer | batch | D | train ms | train ns/unit | vs whole tiles | save=False ms | "
        "save=False ns/unit | vs whole tiles |", "|---|---|---|---|---|---|---|---|---|"]
    for kind, rows in results:
        ref = next(r for r in rows if r["D"] == kind.ref)
        for r in rows:
            cells = [kind.label, f"B{kind.shape[0]}", f"{r['D']}{' (ref)' if r is ref else ''}"]
            lines.append("| " + " | ".join(cells + phase_cells(r, ref)) + " |")
    return "\n".join(lines + render_batches(batches)) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, prints only (unless --out)")
    ap.add_argument("--out", type=out_path, default=None, help=f"report file (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    load_before = load_average()
    W = tile_width(np.empty(0, np.float32))
    results = []
    for kind, sizes in kinds(W, args.quick):
        print(f"... {kind.label}: D {sizes}", flush=True)
        results.append((kind, bench_kind(kind, sizes, 0.2 if args.quick else 3.0)))
    print("... batch sizes", flush=True)
    batches = bench_batches(args.quick, 0.2 if args.quick else 3.0)
    info = dict(machine_info(None, load_before), dtype="float32", tile_width=f"{W} float32 columns")
    info.pop("torch", None)  # no PyTorch here
    write_report(render(info, results, batches), report_out(args, DEFAULT_OUT))


if __name__ == "__main__":
    main()
