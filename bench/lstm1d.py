"""1D LSTM: ``mdnumba.LSTM1D`` vs PyTorch's fused ``torch.nn.LSTM`` (CPU).

The plain LSTM is the baseline every user compares against, and PyTorch's own LSTM is not an
autograd loop of small ops (as the wavefront baselines of ``bench_cpu.py`` are) but one fused
operator whose per-step products are MKL/oneDNN GEMMs. Side by side in one process,
interleaved, best of N (median in brackets), float32, one direction, initial state zero: the
train step (forward, loss ``0.5 * mean(h**2)``, zero_grad, backward with no dL/dx since x is
data, Adam) and the forward alone (``save=False``; PyTorch under ``torch.no_grad()``), with
torch given Numba's thread count. Before timing, each shape's forward and gradients are checked
equal in float64 with the same weights (mdnumba's gate blocks ``[i | f | o | g]`` map to
PyTorch's ``[i | f | g | o]``).

Usage: ``python bench/lstm1d.py [--quick] [--no-torch] [--out PATH]`` (default
``bench/results/lstm1d.md``; ``--quick`` prints tiny shapes only, unless ``--out``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
from bench_args import out_path
from bench_cpu import best_median, load_average, machine_info, report_out, time_interleaved, write_report

import mdnumba

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "lstm1d.md"


@dataclass(frozen=True)
class Case:
    T: int
    B: int
    C: int
    D: int

    @property
    def label(self) -> str:
        return f"T{self.T} B{self.B} C{self.C} D{self.D}"

    def input(self, dtype, T: int | None = None, B: int | None = None) -> np.ndarray:
        rng = np.random.default_rng(0)
        return rng.standard_normal((B or self.B, T or self.T, self.C)).astype(dtype)


CASES = [Case(20, 8, 16, 32), Case(100, 16, 32, 64), Case(50, 32, 64, 128), Case(200, 64, 128, 256)]
QUICK = [Case(6, 3, 2, 4), Case(5, 2, 3, 8)]


def torch_lstm(torch, layer: mdnumba.LSTM1D, dtype):
    """A ``torch.nn.LSTM`` with ``layer``'s weights: its gate rows ``[i | f | g | o]`` are
    mdnumba's columns ``[i | f | o | g]`` reordered; the bias goes to ``bias_ih``."""
    D = layer.hidden
    order = np.r_[0:2 * D, 3 * D:4 * D, 2 * D:3 * D]  # torch's gate rows in mdnumba's columns
    model = torch.nn.LSTM(layer.in_channels, D, batch_first=True).to(dtype)
    p = layer.params
    with torch.no_grad():
        model.weight_ih_l0.copy_(torch.from_numpy(p["W"][:, order].T.copy()))
        model.weight_hh_l0.copy_(torch.from_numpy(p["U"].reshape(D, -1)[:, order].T.copy()))
        model.bias_ih_l0.copy_(torch.from_numpy(p["b"][order].copy()))
        model.bias_hh_l0.zero_()
    return model, order


def verify(torch, case: Case) -> tuple[float, float]:
    """Forward max abs difference and gradient max relative difference, float64, same weights."""
    layer = mdnumba.LSTM1D(case.C, case.D, seed=0, dtype=np.float64)
    model, order = torch_lstm(torch, layer, torch.float64)
    x = case.input(np.float64, T=7, B=3)
    h = layer.forward(x)
    layer.zero_grad()
    layer.backward(h / h.size)
    ht = model(torch.from_numpy(x))[0]
    (0.5 * ht.square().mean()).backward()
    D = case.D
    pairs = [(layer.grads["W"][:, order].T, model.weight_ih_l0.grad),
             (layer.grads["U"].reshape(D, -1)[:, order].T, model.weight_hh_l0.grad),
             (layer.grads["b"][order], model.bias_ih_l0.grad)]
    rel = max(float(np.abs(a - g.numpy()).max() / max(np.abs(a).max(), 1e-30)) for a, g in pairs)
    return float(np.abs(h - ht.detach().numpy()).max()), rel


def bench_case(case: Case, torch, budget_s: float) -> dict:
    """Time mdnumba (and PyTorch) on one shape: train step and forward."""
    x = case.input(np.float32)
    layer = mdnumba.LSTM1D(case.C, case.D, seed=0)
    opt = mdnumba.Adam(layer, lr=1e-3)

    def md_step() -> None:
        h = layer.forward(x)
        layer.zero_grad()
        layer.backward(h / h.size, input_grad=False)
        opt.step()

    cases = {"md_train": [("step", md_step)],
             "md_forward": [("forward", lambda: layer.forward(x, save=False))]}
    check = None
    if torch is not None:
        check = verify(torch, case)
        if not (check[0] <= 1e-9 and check[1] <= 1e-7):
            raise SystemExit(f"{case.label}: torch.nn.LSTM and LSTM1D disagree in float64 (forward "
                             f"{check[0]:.1e}, gradients {check[1]:.1e}): the mapping is wrong")
        model, _ = torch_lstm(torch, layer, torch.float32)
        topt = torch.optim.Adam(model.parameters(), lr=1e-3)
        xt = torch.from_numpy(x)

        def pt_step() -> None:
            loss = 0.5 * model(xt)[0].square().mean()
            topt.zero_grad()
            loss.backward()
            topt.step()

        def pt_forward() -> None:
            with torch.no_grad():
                model(xt)

        cases.update(pt_train=[("step", pt_step)], pt_forward=[("forward", pt_forward)])
    return dict(case=case, times=time_interleaved(cases, budget_s), check=check)


def render(info: dict, results: list[dict]) -> str:
    """The markdown report."""
    lines = ["# 1D LSTM: `mdnumba.LSTM1D` vs `torch.nn.LSTM` (CPU)", ""]
    lines += [f"- **{k}**: {v}" for k, v in info.items()]
    lines += ["", "Produced by `python bench/lstm1d.py` (one process). " + __doc__.split("\n\n")[1]
              .replace("\n", " ").replace("``", "`"), "",
              "| shape | train step mdnumba ms | torch.nn.LSTM ms | torch / mdnumba | "
              "forward mdnumba ms | torch.nn.LSTM ms | torch / mdnumba | float64 check: "
              "forward max abs diff, gradient max rel diff |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["times"]

        def ratio(slow: str, fast: str, t=t) -> str:
            return f"{t[slow].best / t[fast].best:.2f}x" if slow in t else "–"

        cells = [r["case"].label]
        for what in ("train", "forward"):
            cells += [best_median(t.get(f"md_{what}")), best_median(t.get(f"pt_{what}")),
                      ratio(f"pt_{what}", f"md_{what}")]
        cells.append("–" if r["check"] is None else f"{r['check'][0]:.1e}, {r['check'][1]:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, prints only (unless --out)")
    ap.add_argument("--no-torch", action="store_true", help="leave out the PyTorch columns")
    ap.add_argument("--out", type=out_path, default=None, help=f"report file (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    load_before = load_average()
    torch = None
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(numba.get_num_threads())
        except ImportError:
            print("torch is not installed: the PyTorch columns are left out", flush=True)
    results = []
    for case in QUICK if args.quick else CASES:
        print(f"... {case.label}", flush=True)
        results.append(bench_case(case, torch, 0.3 if args.quick else 8.0))
    tb = None if torch is None else (torch, None)
    info = machine_info(tb, load_before)
    info["GOMP_SPINCOUNT"] = (f"{os.environ.get('GOMP_SPINCOUNT')} (mdnumba sets 3000 on import unless "
                              "given; PyTorch's OpenMP threads run under it too)")
    text = render(info, results)
    write_report(text, report_out(args, DEFAULT_OUT))


if __name__ == "__main__":
    main()
