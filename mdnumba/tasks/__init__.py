"""Generated training tasks, each seeded and vectorised.

A :class:`Task` knows how to sample a batch of a given size, which models fit
it, and which metrics it logs (the TSV columns after ``step``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .binary_addition import addition_metrics, sample_addition
from .diagonal import diagonal_metrics, diagonal_probe, sample_diagonal, sample_diagonal3d


@dataclass(frozen=True)
class Task:
    name: str
    sample: Callable          # (rng, batch, size, dtype) -> batch with .x, .y
    metrics: Callable         # (prob, loss, batch) -> dict
    columns: tuple            # metric names, in TSV order
    models: tuple             # model kinds that fit the task
    in_channels: int
    size_name: str            # what --size means for this task
    min_size: int
    #: (prob shape, batch) -> flat indices of the probabilities ``metrics`` reads (None: all);
    #: the device trainer copies only those to the host
    probe: Callable | None = None
    #: the loss a run uses unless it names one (the seed's MSE for the diagonal
    #: task, sigmoid + BCE for binary addition)
    loss: str = "mse"
    #: the layout of an input batch ``x`` (what ``mdnumba predict`` takes)
    layout: str = ""
    #: grid axes of one item: ``--size`` gives each (an item has ``size**ndim`` cells)
    ndim: int = 1

    def check_size(self, size: int) -> None:
        """ValueError unless ``size`` (``--size``) is at least this task's smallest."""
        if size < self.min_size:
            raise ValueError(f"--size ({self.size_name}) must be >= {self.min_size}, got {size}")


TASKS = {
    "diagonal": Task("diagonal", sample_diagonal, diagonal_metrics,
                     ("loss", "relevant_loss", "second_x_acc"), ("md", "horizontal", "snake"),
                     1, "image side", 4, diagonal_probe, layout="(batch, height, width, 1)", ndim=2),
    "diagonal3d": Task("diagonal3d", sample_diagonal3d, diagonal_metrics,
                       ("loss", "relevant_loss", "second_x_acc"), ("md3d",), 1, "volume side", 4,
                       diagonal_probe, layout="(batch, depth1, depth2, depth3, 1)", ndim=3),
    # char-lm reads a text file; its data and metrics live in mdnumba.train_charlm
    "char-lm": Task("char-lm", None, None, ("loss", "bpc", "val_loss", "val_bpc", "chars_per_s"),
                    ("grid", "stacked"), 0, "unused", 1),
    "binary-addition": Task("binary-addition", sample_addition, addition_metrics,
                            ("loss", "bit_acc", "number_acc"), ("lstm",), 2, "bits", 1, loss="bce",
                            layout="(batch, steps, 2)"),
}


def get_task(name: str) -> Task:
    """Look a task up by name with a clear error."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]
