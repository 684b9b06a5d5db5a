"""Inference benchmark: ``forward(x, save=False)`` vs ``forward(x)``, side by side in one process.

For each shape (graves cell unless noted, float32 unless ``--dtype``, C=1): the time of a
forward that saves the activations for backward and of one that keeps none
(:func:`mdnumba.kernels.wavefront.wavefront_infer`, two hyperplanes at a time), interleaved, best
of N; the most bytes NumPy held during each one's first call on a fresh layer (tracemalloc,
buffers included); the buffers each keeps (``workspace_bytes``); and, for the 2D one-direction
shapes, PyTorch's ``torch.no_grad()`` forward of the same layer (``torch_wavefront.py``). The two
mdnumba outputs are checked equal first. The last rows are grids whose saving forward needs GiBs:
timed once each.

Usage: ``python bench/inference.py [--quick] [--no-torch] [--dtype float32|float64] [--out PATH]``
(default ``bench/results/inference.md``; ``--quick`` prints small shapes only).
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_args import out_path
from bench_cpu import (
    Timing,
    load_average,
    load_torch_baseline,
    machine_info,
    mib,
    ms,
    report_out,
    run_phases,
    time_interleaved,
    trim_heap,
    write_report,
)

import mdnumba
from mdnumba.grid import direction_tables, wavefront

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "inference.md"


@dataclass(frozen=True)
class Shape:
    dims: tuple
    B: int
    D: int
    directions: int = 1
    cell: str = "graves"
    big: bool = False  # timed once (its saving forward needs GiBs)
    grid: bool = False  # a GridLSTM2D: dims = (time T, depth), input (B, T, D)

    @property
    def label(self) -> str:
        if self.grid:
            return f"Grid LSTM T{self.dims[0]} x depth {self.dims[1]} B{self.B} D{self.D}"
        d = f", {self.directions} directions" if self.directions > 1 else ""
        c = f", {self.cell}" if self.cell != "graves" else ""
        return f"{len(self.dims)}D {'x'.join(map(str, self.dims))} B{self.B} D{self.D}{d}{c}"


SHAPES = [Shape((32, 32), 16, 32), Shape((32, 32), 16, 32, 4), Shape((64, 64), 16, 32),
          Shape((256, 256), 8, 64, cell="stable"), Shape((32, 32, 32), 2, 16),
          Shape((2048, 2048), 1, 32, cell="stable", big=True),
          Shape((128, 128, 128), 1, 16, cell="stable", big=True),
          Shape((100, 3), 32, 256, grid=True)]  # a char-LM's evaluation window (seq-len 100)
BIG_ROUNDS = 2  # calls per mode of a big shape, alternating
QUICK = [Shape((8, 8), 4, 8), Shape((8, 8), 4, 8, 4), Shape((6, 6, 6), 2, 8), Shape((10, 2), 4, 8, grid=True)]


def table_bytes(shape: Shape) -> int:
    """Bytes of the index tables of the shape (built here; cached per shape, used by both modes)."""
    wf = wavefront(shape.dims)
    tables = () if shape.grid else direction_tables(shape.dims, shape.B, shape.directions)
    return sum(a.nbytes for a in (wf.perm, wf.inv_perm, wf.diag_off, wf.parent, wf.child) + tables)


def peak_of_first_call(shape: Shape, x: np.ndarray, save: bool) -> tuple[int, int]:
    """Peak bytes NumPy allocates (tracemalloc) in one forward on a fresh layer, and the buffers
    it keeps; compiled and with the shape's index tables built beforehand."""
    tiny = build(Shape((2,) * len(shape.dims), 1, 2, shape.directions, shape.cell, grid=shape.grid), x.dtype)
    tiny.forward(make_input(Shape((2,) * len(shape.dims), 1, 2, grid=shape.grid), x.dtype), save=save)
    layer = build(shape, x.dtype)
    gc.collect()
    tracemalloc.start()
    layer.forward(x, save=save)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, layer.workspace_bytes()


def build(shape: Shape, dtype: np.dtype) -> mdnumba.WavefrontLSTM | mdnumba.GridLSTM2D:
    if shape.grid:
        return mdnumba.GridLSTM2D(shape.D, shape.dims[1], seed=0, dtype=dtype)
    cls = {2: mdnumba.MDLSTM2D, 3: mdnumba.MDLSTM3D}[len(shape.dims)]  # 2D: the named views torch reads
    return cls(1, shape.D, seed=0, directions=shape.directions, cell=shape.cell, dtype=dtype)


def make_input(shape: Shape, dtype: np.dtype) -> np.ndarray:
    """Uniform [0, 1): (B, *dims, 1), or (B, T, D) for a Grid LSTM."""
    tail = (shape.dims[0], shape.D) if shape.grid else shape.dims + (1,)
    return np.random.default_rng(0).random((shape.B,) + tail, dtype=dtype)


def torch_forward(tb, layer, x: np.ndarray):
    """PyTorch's no-grad forward of the same 2D layer, or None where the baseline does not apply."""
    if tb is None or not isinstance(layer, mdnumba.MDLSTM2D):
        return None
    if layer.directions != 1 or layer.cell != "graves":
        return None
    torch, TorchMDLSTM2D = tb
    model = TorchMDLSTM2D(layer.in_channels, layer.hidden)
    model.load_from_mdnumba(layer)
    xt = torch.from_numpy(x)

    def forward() -> None:
        with torch.no_grad():
            model(xt)
    return forward


def bench_shape(shape: Shape, tb, budget_s: float, dtype: np.dtype = np.float32) -> dict:
    """Check, memory, then the interleaved timings of one shape."""
    x = make_input(shape, dtype)
    tables = table_bytes(shape)
    mem = {save: peak_of_first_call(shape, x, save) for save in (False, True)}
    layer = build(shape, dtype)
    diff = float(np.abs(layer.forward(x, save=False) - layer.forward(x)).max())
    cases = {"save": [("forward", lambda: layer.forward(x))],
             "nosave": [("forward", lambda: layer.forward(x, save=False))]}
    fwd = torch_forward(tb, layer, x)
    if fwd is not None:
        cases["torch"] = [("forward", fwd)]
    if shape.big:  # one-shot inference of a huge input: each call allocates its buffers
        times = {name: Timing() for name in cases}
        for _ in range(BIG_ROUNDS):
            for name, phases in cases.items():
                layer.free_buffers()
                trim_heap()  # the freed buffers go back to the OS, as for a one-off process
                run_phases(phases, times[name])
        layer.free_buffers()
    else:
        times = time_interleaved(cases, budget_s)
    return dict(shape=shape, mem=mem, tables=tables, diff=diff, times=times)


def best_ms(tm: Timing) -> str:
    """Best ms in bold, the median in brackets when there was more than one call."""
    return f"**{ms(tm.best)}**" + (f" ({ms(tm.median)})" if tm.reps > 1 else "")


def render(info: dict, results: list[dict], torch_used: bool) -> str:
    lines = ["# Inference: `forward(x, save=False)` vs `forward(x)` (CPU)", ""]
    lines += [f"- **{k}**: {v}" for k, v in info.items()]
    lines += ["", "Produced by `python bench/inference.py` (one process). `save=False` runs "
              "`wavefront_infer`: per hyperplane the input projection, recurrent products and cell of "
              "every (direction, cell, batch item), in buffers of two hyperplanes, writing h straight "
              "into the output; `forward(x)` keeps every cell's input, gates, h and c for backward. "
              "The Grid LSTM row (`GridLSTM2D(256, layers=3)`, a char-LM's evaluation batch) runs "
              "`grid_infer`: the same blocks in buffers of two anti-diagonals of the time x depth grid. "
              f"Times are the best of N in ms (median in brackets; big grids: {BIG_ROUNDS} calls each, "
              "alternating, each allocating its buffers afresh as a one-off inference would). "
              "Peak = the most bytes NumPy held during the first call on a fresh layer "
              "(tracemalloc: its buffers and the output array, which both make). Buffers = "
              "`workspace_bytes()` after that call. Index tables: the skewed layout's tables "
              "(cell order, parents, children, the skew rows of every direction and batch item), "
              "built once per shape and cached, the same for both; not in the peaks.", ""]
    head = "| shape | forward ms | save=False ms | forward / save=False | peak MiB (save / save=False) | " \
           "buffers MiB (save / save=False) | index tables MiB | max abs difference |"
    if torch_used:
        head = head.replace("| forward / save=False |",
                            "| forward / save=False | PyTorch no_grad ms | PyTorch / save=False |")
    lines += [head, "|" + "---|" * head.count(" |")]
    for r in results:
        t, (m0, w0), (m1, w1) = r["times"], r["mem"][False], r["mem"][True]
        sp = t["save"].best / t["nosave"].best
        row = [r["shape"].label, best_ms(t["save"]), best_ms(t["nosave"]), f"{sp:.2f}x"]
        if torch_used:
            row += [best_ms(t["torch"]), f"{t['torch'].best / t['nosave'].best:.1f}x"] if "torch" in t \
                else ["–", "–"]
        row += [f"{mib(m1)} / {mib(m0)}", f"{mib(w1)} / {mib(w0)}", mib(r["tables"]), f"{r['diff']:.1g}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, prints only (unless --out)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch column")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--out", type=out_path, default=None, help=f"report file (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    tb = None if args.no_torch else load_torch_baseline()
    load_before = load_average()
    results = []
    for shape in QUICK if args.quick else SHAPES:
        print(f"... {shape.label}", flush=True)
        results.append(bench_shape(shape, tb, 0.3 if args.quick else 4.0, np.dtype(args.dtype)))
    text = render(dict(machine_info(tb, load_before), dtype=args.dtype), results, tb is not None)
    write_report(text, report_out(args, DEFAULT_OUT))


if __name__ == "__main__":
    main()
