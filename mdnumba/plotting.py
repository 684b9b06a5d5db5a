"""PNG plots (needs the ``plot`` extra: ``pip install 'mdnumba[plot]'``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np


def matplotlib_problem() -> str | None:
    """None where pyplot imports (with the Agg backend the plots use), else what is wrong, to
    follow "plotting" or an option: matplotlib missing, or installed but failing to import."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError as exc:
        if exc.name == "matplotlib":
            return "needs matplotlib: pip install 'mdnumba[plot]'"
        return f"needs matplotlib, which is installed but failed to import ({exc}); repair it"
    except Exception as exc:  # a broken installation raises what it raises
        return (f"needs matplotlib, which is installed but failed to import ({type(exc).__name__}: "
                f"{exc}); repair it")
    return None


def _pyplot():
    problem = matplotlib_problem()
    if problem:
        raise RuntimeError(f"plotting {problem}")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (a temp file renamed over it) and close it;
    RuntimeError naming ``path`` if it cannot be written (a folder of that name, a full disk)."""
    from .checkpoint import atomic_write_bytes
    try:
        atomic_write_bytes(Path(path), lambda fh: fig.savefig(fh, dpi=110, format="png"))
    except OSError as exc:
        raise RuntimeError(f"cannot write the plot {path} ({exc.strerror or exc}); move what is "
                           "there away, or make room") from None
    finally:
        plt.close(fig)
    return Path(path)


def read_log(path: Path) -> dict[str, np.ndarray]:
    """TSV log → column name → array (rows that are not a number per column are skipped: a
    row cut short by a crash or a full disk)."""
    lines = Path(path).read_text(errors="replace").splitlines()
    names = lines[0].split("\t") if lines else []
    rows = []
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) == len(names):
            with contextlib.suppress(ValueError):
                rows.append([float(v) for v in fields])
    data = np.array(rows, dtype=float).reshape(-1, len(names))
    return {n: data[:, k] for k, n in enumerate(names)}


def smooth(y: np.ndarray, window: int = 20) -> np.ndarray:
    """Trailing moving average (window clipped to the series length)."""
    w = max(1, min(window, len(y)))
    c = np.cumsum(np.insert(y, 0, 0.0))
    out = (c[w:] - c[:-w]) / w
    return np.concatenate([np.cumsum(y[:w - 1]) / np.arange(1, w), out])


def plot_curves(runs: dict[str, dict[str, np.ndarray]], columns: list[str], path: Path,
                title: str = "") -> Path:
    """One panel per column, one line per run (log-scale, smoothed)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(columns), figsize=(5 * len(columns), 3.6), squeeze=False)
    for ax, col in zip(axes[0], columns):
        for name, log in runs.items():
            ax.plot(log["step"], smooth(log[col]), label=name)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(col.replace("_", " "))
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_predictions(x: np.ndarray, y: np.ndarray, prob: np.ndarray, path: Path, n: int = 4) -> Path:
    """Rows: input, target, prediction for the first ``n`` samples of an image batch."""
    plt = _pyplot()
    n = min(n, x.shape[0])
    fig, axes = plt.subplots(3, n, figsize=(2.4 * n, 7), squeeze=False)
    for k in range(n):
        for row, (img, name) in enumerate([(x, "input"), (y, "target"), (prob, "prediction")]):
            ax = axes[row][k]
            ax.imshow(img[k, ..., 0], vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_ylabel(name)
    fig.tight_layout()
    return _save(plt, fig, path)
