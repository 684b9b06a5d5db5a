"""Binary addition (the seed gist): add two random numbers bit by bit, LSB first.

Input (B, T, 2): bit t of a and of b; target (B, T, 1): bit t of a + b. With
``T = bits + 1`` the operands use ``bits`` bits and the carry fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass
class AdditionBatch:
    x: np.ndarray   # (B, T, 2)
    y: np.ndarray   # (B, T, 1)


def sample_addition(rng: np.random.Generator, batch: int, bits: int,
                    dtype: npt.DTypeLike = np.float32) -> AdditionBatch:
    """Draw one batch of ``bits``-bit additions (vectorised, any length)."""
    if bits < 1:
        raise ValueError(f"binary addition needs bits >= 1, got {bits}")
    a = rng.integers(0, 2, size=(batch, bits + 1))
    b = rng.integers(0, 2, size=(batch, bits + 1))
    a[:, -1] = 0
    b[:, -1] = 0
    s = np.zeros_like(a)
    carry = np.zeros(batch, dtype=a.dtype)
    for t in range(bits + 1):  # the definition of the target, O(T) vector ops
        tot = a[:, t] + b[:, t] + carry
        s[:, t] = tot & 1
        carry = tot >> 1
    x = np.stack([a, b], axis=-1).astype(dtype)
    return AdditionBatch(x, s[..., None].astype(dtype))


def addition_metrics(prob: np.ndarray, loss: float, batch: AdditionBatch) -> dict[str, float]:
    """Per-bit accuracy (|y − p| < 0.5) and per-number accuracy (all bits right)."""
    ok = np.abs(batch.y - prob) < 0.5
    return {"loss": loss, "bit_acc": float(ok.mean()),
            "number_acc": float(ok.reshape(ok.shape[0], -1).all(axis=1).mean())}
