"""The random diagonal task (from the TensorFlow MD-LSTM seed's data code).

``x ~ U[0, 0.1]`` of shape (n, n); pick r, c uniformly in [1, n-2]; set
``x[r, c] = x[r+1, c+1] = 1``. Target ``y[r, c] = x[r, c+1]`` (every row shifted
one column left, wrapping). The second 1 of ``y`` sits at (r+1, c): a top-left
scan can predict it from the 1 above-left of it; nothing can predict the first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DiagonalBatch:
    x: np.ndarray        # (B, n, n, 1)
    y: np.ndarray        # (B, n, n, 1)
    second: np.ndarray   # (B, 2) row, col of the second 1 of y


def sample_diagonal(rng: np.random.Generator, batch: int, size: int, dtype=np.float32) -> DiagonalBatch:
    """Draw one batch (vectorised)."""
    if size < 4:
        raise ValueError(f"diagonal task needs size >= 4, got {size}")
    x = rng.uniform(0.0, 0.1, size=(batch, size, size)).astype(dtype)
    r = rng.integers(1, size - 1, size=batch)
    c = rng.integers(1, size - 1, size=batch)
    bi = np.arange(batch)
    x[bi, r, c] = 1.0
    x[bi, r + 1, c + 1] = 1.0
    y = np.roll(x, -1, axis=2)
    return DiagonalBatch(x[..., None], y[..., None], np.stack([r + 1, c], axis=1))


def diagonal_metrics(prob: np.ndarray, loss: float, batch: DiagonalBatch) -> dict[str, float]:
    """overall loss, relevant loss (squared error at the second 1), second-x accuracy."""
    bi = np.arange(prob.shape[0])
    p = prob[bi, batch.second[:, 0], batch.second[:, 1], 0].astype(np.float64)
    return {"loss": loss, "relevant_loss": float(np.mean((p - 1.0) ** 2)),
            "second_x_acc": float(np.mean(p > 0.5))}
