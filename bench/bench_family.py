"""Issue-6 benchmark: 4-direction 2D and 3D MD-LSTM, mdnumba vs PyTorch autograd, side by side.

For each shape, in one process: a train step (forward, loss gradient, backward,
Adam) and a forward pass of the same layer (graves cell, float32, C=1, loss
``0.5 * mean(h**2)``) in mdnumba and in :class:`torch_wavefront_nd.TorchWavefrontLSTM`
(eager autograd, one hyperplane per step, directions batched), after checking
that both compute the same forward and gradients. Timing, interleaving and the
best-of-N rule are those of ``bench_cpu.py``.

``--device cuda`` times ``mdnumba.backend_cuda.CudaLSTM`` + ``CudaAdam`` (device-resident), in
the default (auto), the flat and the sliced sweep layout (``MDNUMBA_CUDA_LAYOUT``), against the
same PyTorch module on the GPU (all synchronised after every phase).

``--smoke`` runs tiny shapes once each (CI runs it with ``--device cuda`` under the CUDA simulator,
PyTorch on CPU tensors there, so the script works when a GPU comes).

Usage: ``python bench/bench_family.py [--quick | --smoke] [--device cpu|cuda] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import datetime
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
from bench_args import out_path
from bench_cpu import (
    Phase,
    command_line,
    cpu_model,
    load_average,
    ms,
    quick_simulator_handoffs,
    ratio,
    report_out,
    time_interleaved,
    write_report,
)
from launch_times import HEADER, launch_breakdown, render

try:  # without torch the table keeps mdnumba's timings and says why the baseline is missing
    import torch
    from torch_wavefront_nd import TorchWavefrontLSTM
except Exception as exc:  # not only ImportError: a torch at odds with the carried numpy or CUDA
    torch, TORCH_ERROR = None, exc

import mdnumba

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Shape:
    dims: tuple
    B: int
    D: int
    directions: int

    @property
    def label(self) -> str:
        return f"{len(self.dims)}D {'x'.join(map(str, self.dims))} B{self.B} D{self.D}, " \
               f"{self.directions} direction{'s' * (self.directions > 1)}"


SHAPES = [Shape((32, 32), 16, 32, 4), Shape((16, 16, 16), 8, 16, 1), Shape((16, 16, 16), 8, 16, 8)]
QUICK = [Shape((8, 8), 4, 8, 4), Shape((6, 6, 6), 2, 8, 8)]
SMOKE = [Shape((3, 3), 1, 2, 4), Shape((2, 2, 2), 1, 2, 1)]  # 3D: one direction (the simulator is slow)


def build_layer(shape: Shape, dtype=np.float32) -> mdnumba.WavefrontLSTM:
    """The mdnumba layer (host; ``mdnumba_phases`` moves it to the device)."""
    return mdnumba.WavefrontLSTM(len(shape.dims), 1, shape.D, seed=0, directions=shape.directions,
                                 dtype=dtype)


def build_torch(layer: mdnumba.WavefrontLSTM, device: str) -> TorchWavefrontLSTM:
    """The matching torch module with ``layer``'s weights, on ``device``."""
    model = TorchWavefrontLSTM(layer.ndim, 1, layer.hidden, layer.directions,
                               dtype=torch.float64 if layer.dtype == np.float64 else torch.float32)
    model.load_from_mdnumba(layer)
    return model.to(device)


def mdnumba_phases(layer, x: np.ndarray, device: str, layout: str | None = None
                   ) -> tuple[list[Phase], list[Phase]]:
    """Train-step phases (forward, backward, adam) and the forward-only phase (``layout``: the
    CUDA sweep layout)."""
    st: dict = {}
    if device == "cuda":
        from numba import cuda

        from mdnumba.backend_cuda import CudaAdam, CudaLSTM
        net, sync = CudaLSTM.from_layer(layer, layout=layout), cuda.synchronize
        net.reuse_outputs = True  # no allocation (and deferred frees) per call: each h is used at once
        opt, xin = CudaAdam([net], lr=1e-3), cuda.to_device(x)
        scale = mdnumba.backend_cuda._kernels().axpby
        kept: dict = {}

        def loss_grad(h):
            dh = kept.get(h.shape)
            if dh is None:
                dh = kept[h.shape] = cuda.device_array_like(h)
            scale(dh.reshape(dh.size), h.reshape(h.size), np.float32(1.0 / h.size), h.reshape(h.size),
                  np.float32(0.0))
            return dh
    else:
        net, sync, opt, xin = layer, (lambda: None), mdnumba.Adam(layer, lr=1e-3), x

        def loss_grad(h):
            return h * np.float32(1.0 / h.size)

    def forward() -> None:
        st["dh"] = loss_grad(net.forward(xin))
        sync()

    def backward() -> None:
        net.zero_grad()
        net.backward(st["dh"], input_grad=False)  # x is data (PyTorch computes no dL/dx either)
        sync()

    def adam() -> None:
        opt.step(**({"sync": False} if device == "cuda" else {}))  # the device's: no norm read back
        sync()

    def forward_only() -> None:
        net.forward(xin)
        sync()
    return [("forward", forward), ("backward", backward), ("adam", adam)], [("forward", forward_only)]


def torch_phases(model, x: np.ndarray, device: str) -> tuple[list[Phase], list[Phase]]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt = torch.from_numpy(x).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    st: dict = {}

    def forward() -> None:
        st["loss"] = 0.5 * model(xt).square().mean()
        sync()

    def backward() -> None:
        opt.zero_grad()
        st["loss"].backward()
        sync()

    def adam() -> None:
        opt.step()
        sync()

    def forward_only() -> None:
        with torch.no_grad():
            model(xt)
        sync()
    return [("forward", forward), ("backward", backward), ("adam", adam)], [("forward", forward_only)]


def verify(shape: Shape, x: np.ndarray, device: str) -> float:
    """Float64 copies of both implementations must agree (forward 1e-9 abs, gradients 1e-7 rel):
    in float32 the graves state can reach ~1e8 on 3D grids and rounding alone differs by ~1e-4."""
    layer = build_layer(shape, np.float64)
    model = build_torch(layer, device)
    x = x.astype(np.float64)
    h = layer.forward(x)
    ht = model(torch.from_numpy(x).to(device))
    fwd = float(np.abs(ht.detach().cpu().numpy() - h).max())
    (0.5 * ht.square().mean()).backward()
    layer.zero_grad()
    layer.backward(h / h.size)
    grad = 0.0
    for n in ("W", "U", "b"):
        a, t = layer.grads[n].reshape(-1), getattr(model, n).grad.cpu().numpy().reshape(-1)
        grad = max(grad, float(np.abs(t - a).max() / (np.abs(a).max() + 1e-30)))
    if not (fwd <= 1e-9 and grad <= 1e-7):
        raise ValueError(f"torch baseline disagrees: forward {fwd:.2e}, gradient rel {grad:.2e}")
    return fwd


def _ms(timings: dict, name: str) -> str:
    return f"{ms(timings[name].best)} ms" if name in timings else "–"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="few repeats; writes no file unless --out")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, every part once; writes no file "
                                                         "unless --out")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where mdnumba and PyTorch run")
    ap.add_argument("--out", type=out_path, default=None, help="the report's file (default "
                                                           "bench/results/family_DEVICE.md)")
    return ap.parse_args()


def time_shape(shape: Shape, dev: str, tdev: str, names: list[str],
               args: argparse.Namespace) -> tuple[str, list]:
    """The table row of ``shape``: mdnumba (in each layout of ``names``) and PyTorch on ``tdev``,
    train step and forward interleaved; and mdnumba's train-step phases (for the launchers)."""
    x = np.random.default_rng(0).random((shape.B,) + shape.dims + (1,), dtype=np.float32)
    layer = build_layer(shape)
    mt, mf = mdnumba_phases(layer, x, dev)
    train_fns, fwd_fns = {"mdnumba": mt}, {"mdnumba": mf}
    for layout in names[1:]:
        train_fns[layout], fwd_fns[layout] = mdnumba_phases(layer, x, dev, layout)
    try:  # a baseline that fails (e.g. torch without CUDA) leaves mdnumba's times
        if torch is None:
            raise TORCH_ERROR
        diff = f"{verify(shape, x, tdev):.1e}"
        train_fns["torch"], fwd_fns["torch"] = torch_phases(build_torch(layer, tdev), x, tdev)
    except Exception as exc:
        if args.smoke and torch is not None:  # a smoke run checks that every part runs
            raise
        diff = f"PyTorch failed: {type(exc).__name__}: {str(exc)[:120]}"
    budget = 0.5 if args.quick or args.smoke else 3.0
    reps = (1, 1) if args.smoke else (3, 500)  # min, max timed calls
    train, fwd = (time_interleaved(fns, budget, *reps) for fns in (train_fns, fwd_fns))
    row = f"| {shape.label} | " + " | ".join(
        " | ".join([*(_ms(t, n) for n in names), _ms(t, "torch"),
                    " / ".join(ratio(t.get("torch"), t[n]) for n in names)]) for t in (train, fwd))
    return row + f" | {diff} |", mt


def main() -> None:
    args = parse_args()
    quick_simulator_handoffs()
    dev = args.device
    if dev == "cuda":
        from bench_gpu import require_cuda_or_exit
        require_cuda_or_exit()
    # the baseline's device: CPU tensors under the CUDA simulator (no GPU there)
    tdev = "cpu" if dev == "cuda" and numba.config.ENABLE_CUDASIM else dev
    if torch is not None:
        torch.set_num_threads(numba.get_num_threads())
    out = report_out(args, HERE / "results" / f"family_{dev}.md")
    load0 = load_average()
    # on CUDA mdnumba in its default sweep layout (auto) and in the flat and the sliced one
    names = ["mdnumba", "flat", "sliced"] if dev == "cuda" else ["mdnumba"]
    per = ["mdnumba", "PyTorch", "PyTorch / mdnumba"]
    if dev == "cuda":
        per = ["mdnumba", "mdnumba flat", "mdnumba sliced", "PyTorch",
               "PyTorch / mdnumba (auto / flat / sliced)"]
    cols = [f"{what} {n}" for what in ("train step", "forward") for n in per]
    rows = ["| layer | " + " | ".join(cols) + " | float64 forward max abs diff |",
            "|---" * (len(cols) + 2) + "|"]
    breakdown: list[str] = []
    for shape in (SMOKE if args.smoke else QUICK if args.quick else SHAPES):
        row, mt = time_shape(shape, dev, tdev, names, args)
        rows.append(row)
        print(row, flush=True)
        if dev == "cuda":  # where the device step's time goes, launcher by launcher
            from numba import cuda
            result = launch_breakdown(lambda fns=mt: [f() for _, f in fns], cuda.synchronize,
                                      1 if args.smoke else 5)
            breakdown += render(shape.label, result)
            print(breakdown[-1], flush=True)
        # after every shape: a run cut short keeps what it measured
        write_report(report(dev, load0, rows, breakdown), out, echo=False)


def report(dev: str, load0: str, rows: list[str], breakdown: list[str]) -> str:
    """The markdown report: how it was made, then the table rows so far (and the device
    step's launchers, :mod:`launch_times`)."""
    head = [f"# MD-LSTM family benchmark ({dev}, issue 6)", "",
            f"Generated by {command_line()} on {datetime.date.today()}: {cpu_model()}, "
            f"{numba.get_num_threads()} numba threads = torch threads, numba {numba.__version__}, "
            f"torch {torch.__version__ if torch else 'not importable'}; load average before {load0}, "
            f"after {load_average()}.", "",
            "Graves cell, float32, C=1, loss 0.5*mean(h^2), best of N interleaved repeats; train step = "
            "forward + backward (no dL/dx: x is data) + Adam. PyTorch: `bench/torch_wavefront_nd.py` "
            "(eager autograd, one "
            "hyperplane per step, directions batched), checked equal to mdnumba first.", ""]
    if breakdown:
        rows = rows + ["", "## Where the device train step goes", "",
                       "Each launcher call of one train step alone, a device synchronize before and after "
                       "(`bench/launch_times.py`; fastest of 5 steps, 1 with --smoke): the sum is above "
                       "the table's pipelined step.", ""] + HEADER + breakdown
    return "\n".join(head + rows) + "\n"


if __name__ == "__main__":
    main()
