"""Issue-7 comparison: 2D Grid LSTM vs stacked LSTM on character-level language modelling.

The corpus is built offline from the Python standard library's own sources (the
``.py`` files under ``os.__file__``'s folder, sorted by path, concatenated up to
``--mb`` megabytes), so every machine with CPython has it. Both models get about
the same number of recurrent parameters (grid hidden = stacked hidden *
sqrt(layers/2): the grid's two tied (2D, 4D) transforms vs ``layers`` LSTMs of
8D^2), the same optimiser, batch, window and steps. Writes
``bench/results/charlm.md`` (and ``charlm.png`` when matplotlib is installed), or ``--out``; a
``--quick`` run only prints its table unless given ``--out``.

Usage: ``python bench/charlm_compare.py [--steps 1000] [--hidden 64] [--layers 3] [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

from bench_args import out_path
from bench_cpu import command_line, cpu_model, report_out, write_report

from mdnumba.train import TrainConfig, make_trainer

HERE = Path(__file__).resolve().parent


def build_corpus(path: Path, megabytes: float) -> Path:
    """Concatenate standard-library sources (UTF-8 decodable ones) into ``path``."""
    root = Path(os.__file__).parent
    limit, parts, size = int(megabytes * 2**20), [], 0
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts or "test" in f.parts:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text.encode())
        if size >= limit:
            break
    path.write_text("".join(parts))
    return path


def config(args, kind: str, hidden: int, data: Path) -> TrainConfig:
    """The run of model ``kind`` that the command line asks for."""
    return TrainConfig(model=kind, task="char-lm", data=str(data), hidden=hidden, layers=args.layers,
                       seq_len=args.seq_len, batch=args.batch, lr=args.lr, steps=args.steps,
                       optimizer=args.optimizer, dropout=args.dropout, seed=0)


def train(kind: str, hidden: int, args, data: Path) -> tuple[list, dict]:
    """Train one model; return (validation curve [(step, val_bpc)], summary)."""
    cfg = config(args, kind, hidden, data)
    tr = make_trainer(cfg)
    curve: list = []
    t0 = time.perf_counter()

    def on_step(step: int, m: dict) -> None:
        if step % tr.EVAL_EVERY == 0 or step == cfg.steps:
            curve.append((step, m["val_bpc"]))
            print(f"{kind} step {step} train bpc {m['bpc']:.3f} val bpc {m['val_bpc']:.3f}", flush=True)
    tr.run(on_step)
    wall = time.perf_counter() - t0
    final = tr.evaluate(batches=20)
    recurrent = sum(layer.params.data.size for layer in tr.model.layers[1:-1])
    return curve, dict(kind=kind, hidden=hidden, params=tr.model.n_params, recurrent=recurrent,
                       val_bpc=final["val_bpc"], chars_per_s=args.steps * args.batch * args.seq_len / wall,
                       minutes=wall / 60, vocab=tr.corpus.vocab_size, chars=len(tr.corpus.train))


def plot(curves: dict, out: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(*zip(*curve), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits per char")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=None, help="default 1000 (--quick: 60)")
    ap.add_argument("--hidden", type=int, default=None,
                    help="stacked LSTM hidden size (default 64, --quick: 16)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--optimizer", default="rmsprop")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--mb", type=float, default=None,
                    help="at least this many MB of corpus (default 3, --quick: 0.2)")
    ap.add_argument("--quick", action="store_true", help="60 steps, hidden 16, 0.2 MB (smoke run); writes "
                                                         "no file unless --out")
    ap.add_argument("--out", type=out_path, default=None, help="the report's file, the plot beside it "
                                                           "(default bench/results/charlm.md)")
    args = ap.parse_args()
    for name, default, quick in (("steps", 1000, 60), ("hidden", 64, 16), ("mb", 3.0, 0.2)):
        if getattr(args, name) is None:  # --quick only changes the defaults
            setattr(args, name, quick if args.quick else default)
    try:  # the settings' errors now, not after the first model's run
        config(args, "stacked", args.hidden, Path("corpus.txt")).validate()
    except (TypeError, ValueError) as exc:
        ap.error(str(exc))
    if not args.mb > 0:
        ap.error(f"--mb must be > 0, got {args.mb}")
    out = report_out(args, HERE / "results" / "charlm.md")
    data = build_corpus(Path(tempfile.gettempdir()) / "mdnumba_stdlib_corpus.txt", args.mb)
    grid_hidden = round(args.hidden * math.sqrt(args.layers / 2))
    curves, rows = {}, []
    for kind, hidden in (("stacked", args.hidden), ("grid", grid_hidden)):
        curve, summary = train(kind, hidden, args, data)
        curves[f"{kind} (D={hidden})"] = curve
        rows.append(summary)
    png = plot(curves, out.with_suffix(".png")) if out else None
    s = rows[0]
    lines = [
        "# Grid LSTM vs stacked LSTM, character-level LM (issue 7)", "",
        *(["**--quick smoke run: 60 steps at hidden 16; not for quoting.**", ""] if args.quick else []),
        f"Generated by {command_line()} on {time.strftime('%Y-%m-%d')} ({cpu_model()}, "
        f"{os.cpu_count()} CPUs). Corpus: {data.stat().st_size / 2**20:.2g} MB of CPython "
        f"standard-library sources ({s['chars']} training characters, "
        f"vocabulary {s['vocab']}, last 10% for validation). {args.layers} layers (grid: depth "
        f"{args.layers}, weights tied along depth, depth prioritised), sequence length {args.seq_len}, "
        f"batch {args.batch}, {args.optimizer} lr {args.lr}, dropout {args.dropout}, {args.steps} steps.",
        "", "| model | hidden | recurrent params | all params | validation bits/char (20 batches) | "
        "chars/s | minutes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['hidden']} | {r['recurrent']} | {r['params']} | "
                     f"{r['val_bpc']:.3f} | {r['chars_per_s']:.0f} | {r['minutes']:.1f} |")
    if png:
        lines += ["", f"![validation curves]({png.name})"]
    write_report("\n".join(lines) + "\n", out)


if __name__ == "__main__":
    main()
