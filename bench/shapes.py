"""Cost per unit across hidden sizes: do sizes that do not fill whole register tiles fall off?

The CPU kernels' products run as register tiles of W columns (32 float32 with AVX-512, 16 with
AVX2); a gate row of (N+3)·D columns that W does not divide ends in a partial tile. Per layer
kind (LSTM1D, 2D and 3D MD-LSTM, Grid LSTM), hidden sizes around multiples of W are timed side
by side in one process, interleaved, best of N: a training step (forward + backward,
``input_grad=False``) and the saving-free forward, as ns per cell-unit (time / (batch · cells ·
D)), and each size's cost per unit against the whole-tile size W (D = W / 2 too for the
3D layer, whose gate row 6D fills whole tiles there). Small sizes cost more per unit anyway
(the cell math and the sweep's fixed costs weigh more), so the column to read is how far an odd
size sits from its neighbours.

Usage: ``python bench/shapes.py [--quick] [--out PATH]`` (default ``bench/results/shapes.md``;
``--quick`` prints small shapes only, unless ``--out``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_cpu import best_median, load_average, machine_info, time_interleaved, write_report

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


def render(info: dict, results: list[tuple[Kind, list[dict]]]) -> str:
    lines = ["# Cost per unit across hidden sizes (CPU)", ""]
    lines += [f"- **{k}**: {v}" for k, v in info.items()]
    lines += ["", "Produced by `python bench/shapes.py` (one process). " + " ".join(
        __doc__.split("\n\n")[1].split()).replace("``", "`"), "",
        "| layer | batch | D | train ms | train ns/unit | vs whole tiles | save=False ms | "
        "save=False ns/unit | vs whole tiles |", "|---|---|---|---|---|---|---|---|---|"]
    for kind, rows in results:
        ref = next(r for r in rows if r["D"] == kind.ref)
        for r in rows:
            cells = [kind.label, f"B{kind.shape[0]}", f"{r['D']}{' (ref)' if r is ref else ''}"]
            for phase in ("train", "infer"):
                per = r[phase].best / r["units"]
                cells += [best_median(r[phase]), f"{per * 1e9:.1f}",
                          f"{per / (ref[phase].best / ref['units']):.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, prints only (unless --out)")
    ap.add_argument("--out", type=Path, default=None, help=f"report file (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    load_before = load_average()
    W = tile_width(np.empty(0, np.float32))
    results = []
    for kind, sizes in kinds(W, args.quick):
        print(f"... {kind.label}: D {sizes}", flush=True)
        results.append((kind, bench_kind(kind, sizes, 0.2 if args.quick else 3.0)))
    info = dict(machine_info(None, load_before), dtype="float32", tile_width=f"{W} float32 columns")
    info.pop("torch", None)  # no PyTorch here
    write_report(render(info, results), args.out or (None if args.quick else DEFAULT_OUT))


if __name__ == "__main__":
    main()
