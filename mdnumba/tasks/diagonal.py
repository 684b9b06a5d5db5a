"""The random diagonal task (from the TensorFlow MD-LSTM seed's data code), in 2D and 3D.

2D: ``x ~ U[0, 0.1]`` of shape (n, n); pick r, c uniformly in [1, n-2]; set
``x[r, c] = x[r+1, c+1] = 1``. Target ``y[r, c] = x[r, c+1]`` (every row shifted
one column left, wrapping). The second 1 of ``y`` sits at (r+1, c): a top-left
scan can predict it from the input's 1 at (r, c), directly above it; nothing can predict
the first.

N-D (``diagonal3d``): the same with a point p in [1, n-2]^N, ``x[p] = x[p + (1,..,1)] = 1``
(a line parallel to the main space diagonal) and the target shifted one step back
along the last axis; the second 1 of ``y`` is at ``p + (1, .., 1, 0)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass
class DiagonalBatch:
    x: np.ndarray        # (B, n, .., n, 1)
    y: np.ndarray        # (B, n, .., n, 1)
    second: np.ndarray   # (B, N) coordinates of the second 1 of y


def sample_diagonal_nd(rng: np.random.Generator, batch: int, size: int, ndim: int,
                       dtype: npt.DTypeLike = np.float32) -> DiagonalBatch:
    """Draw one batch of the N-D task (vectorised)."""
    if size < 4:
        raise ValueError(f"diagonal task needs size >= 4, got {size}")
    x = rng.uniform(0.0, 0.1, size=(batch,) + (size,) * ndim).astype(dtype)
    p = np.stack([rng.integers(1, size - 1, size=batch) for _ in range(ndim)], axis=1)
    bi = np.arange(batch)
    x[(bi,) + tuple(p.T)] = 1.0
    x[(bi,) + tuple(p.T + 1)] = 1.0
    y = np.roll(x, -1, axis=ndim)
    second = p + 1
    second[:, -1] -= 1
    return DiagonalBatch(x[..., None], y[..., None], second)


def sample_diagonal(rng: np.random.Generator, batch: int, size: int,
                    dtype: npt.DTypeLike = np.float32) -> DiagonalBatch:
    """The seed's 2D task."""
    return sample_diagonal_nd(rng, batch, size, 2, dtype)


def sample_diagonal3d(rng: np.random.Generator, batch: int, size: int,
                      dtype: npt.DTypeLike = np.float32) -> DiagonalBatch:
    """The 3D task on (size, size, size) volumes."""
    return sample_diagonal_nd(rng, batch, size, 3, dtype)


def _second_index(batch: DiagonalBatch) -> tuple:
    bi = np.arange(batch.second.shape[0])
    return (bi,) + tuple(batch.second.T) + (np.zeros_like(bi),)


def diagonal_probe(shape: tuple, batch: DiagonalBatch) -> np.ndarray:
    """Flat indices (into ``prob`` of ``shape``) of what :func:`diagonal_metrics` reads."""
    return np.ravel_multi_index(_second_index(batch), shape)


def diagonal_metrics(prob: np.ndarray, loss: float, batch: DiagonalBatch) -> dict[str, float]:
    """overall loss, relevant loss (squared error at the second 1), second-x accuracy."""
    p = prob[_second_index(batch)].astype(np.float64)
    return {"loss": loss, "relevant_loss": float(np.mean((p - 1.0) ** 2)),
            "second_x_acc": float(np.mean(p > 0.5))}
