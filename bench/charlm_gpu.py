"""Char-LM training on the GPU: the device-resident trainer against the copying path and the CPU.

One process; per model (stacked LSTM1D layers, and a tied Grid LSTM; embedding, dropout,
softmax readout, Adam) on the standard-library corpus of ``charlm_compare.py``, a block of
steps timed per case, the cases interleaved (``bench_cpu.time_interleaved``, best of N):

- *device-resident*: ``mdnumba train --task char-lm --model M --device cuda``
  (:class:`mdnumba.train_charlm_device.DeviceCharLMTrainer`), blocks of ``--block`` steps
  with one host sync each, the next block's windows and masks drawn while the GPU runs;
- *copying*: the char-LM trainer on ``CharLM(device="cuda")`` layers, what ``--device
  cuda`` ran before: each layer uploads its parameters and downloads its gradients at every
  call (the grid's weight-gradient GEMMs on the CPU), the loss and Adam on the CPU;
- *CPU*: the CPU trainer on every core of this machine.

Validation is off (``EVAL_EVERY`` past the run), so every timed step is a training step.
Writes ``bench/results/charlm_gpu.md`` (``--out``). ``--smoke``: tiny sizes, each case once, the
report printed only unless given ``--out``
(CI runs it under the CUDA simulator).

Usage: ``python bench/charlm_gpu.py [--models stacked,grid] [--batch 32] [--seq-len 100]
[--hidden 256] [--layers 2] [--smoke] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import numba
from bench_args import choice_list, out_path, positive_float, positive_int
from bench_cpu import (
    Timing,
    best_median,
    ms,
    quick_simulator_handoffs,
    report_out,
    time_interleaved,
    write_report,
)
from bench_gpu import require_cuda_or_exit
from charlm_compare import build_corpus

HERE = Path(__file__).resolve().parent
CASES = [("device", "device-resident (`DeviceCharLMTrainer`)"),
         ("copying", "copying (`CharLM(device='cuda')` layers, CPU Adam)"),
         ("cpu", "CPU trainer")]


def config(args, model: str, data: Path, device: str):
    """The ``TrainConfig`` of ``model`` on ``device`` (a run of "endless" steps)."""
    from mdnumba.train import TrainConfig
    return TrainConfig(task="char-lm", model=model, data=str(data), batch=args.batch,
                       seq_len=args.seq_len, hidden=args.hidden, layers=args.layers,
                       dropout=args.dropout, steps=10**9, device=device, sync_every=args.block)


def trainers(args, model: str, data: Path) -> dict:
    """The three trainers of the same config (validation off)."""
    from mdnumba.train import make_trainer
    from mdnumba.train_charlm import CharLMTrainer
    CharLMTrainer.EVAL_EVERY = 10**9  # after the first step's validation, none

    out = {"device": make_trainer(config(args, model, data, "cuda")),
           "copying": CharLMTrainer(config(args, model, data, "cuda")),
           "cpu": make_trainer(config(args, model, data, "cpu"))}
    for tr in out.values():
        tr.train_step()  # the first step's validation, compiles
    return out


def time_cases(trs: dict, block: int, budget_s: float, smoke: bool) -> dict[str, Timing]:
    """Seconds per step of each trainer: blocks of ``block`` steps, interleaved."""
    def steps(tr):
        if hasattr(tr, "_draw_ahead"):  # device-resident: one block, the next drawn ahead (as `run`)
            return lambda: tr._train_block(block, block)
        return lambda: [tr.train_step() for _ in range(block)]
    reps = dict(min_reps=1, max_reps=1, rounds=1) if smoke else dict(min_reps=3, max_reps=50)
    timed = time_interleaved({k: [("block", steps(tr))] for k, tr in trs.items()}, budget_s, **reps)
    return {k: Timing([t / block for t in tm.total]) for k, tm in timed.items()}


def render(info: dict, results: dict[str, dict[str, Timing]], args, chars: int) -> str:
    out = ["# Char-LM training on the GPU: device-resident vs copying vs CPU", ""]
    if args.smoke:
        out += ["**--smoke run: tiny sizes, one repeat; not for quoting.**", ""]
    out += [f"- **{k}**: {v}" for k, v in info.items()]
    out += ["", "Produced by `python bench/charlm_gpu.py` (also part of `bench/run_gpu.sh`). Char-LM "
            f"with {args.layers} layers (stacked: LSTM1D layers; grid: a tied Grid LSTM of that "
            f"depth), hidden {args.hidden}, batch {args.batch}, windows of {args.seq_len} "
            f"characters, dropout {args.dropout:g}, Adam, float32, on {chars} characters of "
            f"standard-library source; per training step, blocks of {args.block} steps "
            "(validation off). Best of N in ms (median).", "",
            "| model | trainer | ms per step | characters per s | vs device-resident |",
            "|---|---|---|---|---|"]
    for model, times in results.items():
        dev = times.get("device")
        for key, label in CASES:
            tm = times.get(key)
            per_s = "–" if tm is None else f"{args.batch * args.seq_len / tm.best:,.0f}"
            vs = "–" if tm is None or dev is None else f"{tm.best / dev.best:.1f}x"
            out.append(f"| {model} | {label} | {best_median(tm)} | {per_s} | {vs} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=positive_int, default=32)
    ap.add_argument("--seq-len", type=positive_int, default=100)
    ap.add_argument("--hidden", type=positive_int, default=256)
    ap.add_argument("--layers", type=positive_int, default=2)
    ap.add_argument("--models", type=choice_list(("stacked", "grid")), default="stacked,grid",
                    help="comma list of stacked, grid")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--block", type=positive_int, default=20,
                    help="steps per timed block (the device sync interval)")
    ap.add_argument("--budget", type=positive_float, default=20.0, help="seconds of timing per case")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, each case once")
    ap.add_argument("--out", type=out_path, default=None,
                    help="the report's file (default bench/results/charlm_gpu.md; with --smoke none: "
                         "the report is printed)")
    args = ap.parse_args(argv)
    quick_simulator_handoffs()
    if args.smoke:
        args.batch, args.seq_len, args.hidden, args.layers, args.block, args.budget = 2, 4, 3, 1, 2, 0.1
    try:  # the settings mdnumba refuses, before minutes of corpus and compiles
        for model in args.models:
            config(args, model, Path("corpus.txt"), "cpu").validate()
    except ValueError as exc:
        ap.error(str(exc))
    args.out = report_out(args, HERE / "results" / "charlm_gpu.md")
    require_cuda_or_exit()  # before numba.cuda's import, which may fail (numpy 2.5)
    from numba import cuda

    name = getattr(cuda.get_current_device(), "name", "CUDA simulator")
    info = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "GPU": name.decode() if isinstance(name, bytes) else str(name),
            "CPU threads": str(numba.get_num_threads())}
    results: dict[str, dict[str, Timing]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = build_corpus(Path(tmp) / "corpus.txt", 0.02 if args.smoke else 1.0)
        for model in args.models:
            trs = trainers(args, model, data)
            chars = len(trs["cpu"].corpus.train)
            results[model] = time_cases(trs, args.block, args.budget, args.smoke)
            del trs
            for key, _ in CASES:
                print(f"{model} {key}: {ms(results[model][key].best)} ms per step", flush=True)
            # after every model: a cut run keeps it
            report = write_report(render(info, results, args, chars), args.out, echo=False)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
