"""Issue-4 acceptance runs: the seed's random-diagonal experiment and binary addition.

Writes bench/results/acceptance.md (numbers quoted in the README). Not a test:
it trains for minutes. Usage: ``python bench/acceptance.py [--quick]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from bench_args import out_path
from bench_cpu import load_average, machine_info, report_out, write_report

from mdnumba.train import TrainConfig, Trainer


def run(cfg: TrainConfig) -> tuple[Trainer, list[dict], float]:
    """Train ``cfg`` in memory; return trainer, per-step metrics and wall seconds."""
    tr = Trainer(cfg)
    hist: list[dict] = []
    t0 = time.perf_counter()
    tr.run(lambda s, m: hist.append(m))
    return tr, hist, time.perf_counter() - t0


def last_mean(hist: list[dict], key: str, n: int = 100) -> float:
    return float(np.mean([h[key] for h in hist[-n:]]))


def seed_experiment(seeds, steps) -> list[str]:
    """md / horizontal / snake at the seed's set-up (8x8, B16, D16, Adam 1e-2, MSE)."""
    rows = ["| model | seed | relevant loss (last 100) | second-x acc (last 100) | overall loss | "
            "ms/step |", "|---|---|---|---|---|---|"]
    for model in ("md", "horizontal", "snake"):
        for seed in seeds:
            _, hist, wall = run(TrainConfig(model=model, size=8, steps=steps, seed=seed))
            rows.append(f"| {model} | {seed} | {last_mean(hist, 'relevant_loss'):.4f} | "
                        f"{last_mean(hist, 'second_x_acc'):.3f} | {last_mean(hist, 'loss'):.4f} | "
                        f"{1e3 * wall / steps:.2f} |")
            print(rows[-1], flush=True)
    return rows


def large_experiment(cfgs) -> list[str]:
    """Larger grids: steps needed, final metrics, NaN check."""
    rows = ["| set-up | steps | relevant loss (last 100) | second-x acc (last 100) | "
            "eval second-x acc (20 batches) | NaN-free | minutes |", "|---|---|---|---|---|---|---|"]
    for label, cfg in cfgs:
        try:
            tr, hist, wall = run(cfg)
        except FloatingPointError as exc:
            rows.append(f"| {label} | {cfg.steps} | diverged: {exc} | | | False | |")
            print(rows[-1], flush=True)
            continue
        finite = all(np.isfinite(h["loss"]) for h in hist) and np.isfinite(
            np.concatenate([layer.params.data for layer in tr.model.layers])).all()
        ev = tr.evaluate(batches=20)
        first95 = next((i + 1 for i in range(len(hist)) if
                        np.mean([h["second_x_acc"] for h in hist[max(0, i - 49):i + 1]]) >= 0.95
                        and i >= 49 and cfg.size_at(i) == cfg.size), None)
        reached = "never" if first95 is None else f"from step {first95}"
        rows.append(f"| {label} | {cfg.steps} (>=95% over 50 steps at full size {reached}) | "
                    f"{last_mean(hist, 'relevant_loss'):.4f} | "
                    f"{last_mean(hist, 'second_x_acc'):.3f} | {ev['second_x_acc']:.3f} | {finite} | "
                    f"{wall / 60:.1f} |")
        print(rows[-1], flush=True)
    return rows


def addition_experiment(steps) -> list[str]:
    """Binary addition at 10 bits (hidden 20, Adam 1e-2, B16, BCE), evaluated at 10/20/40 bits."""
    tr, hist, wall = run(TrainConfig(model="lstm", task="binary-addition", size=10, hidden=20,
                                     batch=16, lr=1e-2, steps=steps, loss="bce"))
    rows = ["| evaluated at | bit accuracy | number accuracy |", "|---|---|---|"]
    for bits in (10, 20, 40):
        ev = tr.evaluate(size=bits, batches=50)
        rows.append(f"| {bits} bits | {ev['bit_acc']:.4f} | {ev['number_acc']:.4f} |")
        print(rows[-1], flush=True)
    rows.append(f"\n({steps} training steps on variable lengths 1..10 bits, {wall:.1f} s)")
    return rows


DEFAULT_OUT = Path(__file__).parent / "results" / "acceptance.md"
QUICK = "**--quick smoke run: few steps; not for quoting.**"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="few steps and seeds (smoke run); writes no "
                                                         "file unless --out")
    ap.add_argument("--out", type=out_path, default=None, help="the report's file (default "
                                                           "bench/results/acceptance.md)")
    args = ap.parse_args()
    q = args.quick
    seeds, steps = ((0,), 200) if q else ((0, 1, 2), 1000)
    big = [("32x32 md, curriculum 8,16 -> 32, MSE", TrainConfig(size=32, curriculum=(8, 16),
                                                                steps=300 if q else 3000)),
           ("32x32 md, no curriculum, MSE", TrainConfig(size=32, steps=100 if q else 3000)),
           ("64x64 md, curriculum 8,16,32 -> 64", TrainConfig(size=64, curriculum=(8, 16, 32),
                                                             steps=80 if q else 2000)),
           ("128x128 md, curriculum 8,16,32,64 -> 128",
            TrainConfig(size=128, curriculum=(8, 16, 32, 64), steps=50 if q else 500)),
           ("128x128 md, lr 1e-3, clip-norm 1", TrainConfig(size=128, lr=1e-3, clip_norm=1.0,
                                                            steps=20 if q else 100))]
    load_before = load_average()
    parts = seed_experiment(seeds, steps)
    parts += ["", "## Larger grids (B16, D16, Adam 1e-2, MSE)", ""] + large_experiment(big)
    parts += ["", "## Binary addition", ""] + addition_experiment(300 if q else 3000)
    info = [f"- **{k}**: {v}" for k, v in machine_info(None, load_before).items() if k != "torch"]
    parts = ["# Acceptance runs (issue 4)", "", "Generated by `python bench/acceptance.py` (ms/step and "
             "minutes depend on the machine; the losses do not).", ""] + ([QUICK, ""] if q else []) + info + \
            ["", "## Random diagonal, seed set-up (8x8, B16, D16, Adam 1e-2, MSE)", ""] + parts
    write_report("\n".join(parts) + "\n", report_out(args, DEFAULT_OUT))


if __name__ == "__main__":
    main()
