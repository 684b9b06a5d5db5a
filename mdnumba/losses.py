"""Losses on logits ``z`` with a sigmoid output ``p = σ(z)``; each returns the gradient."""

from __future__ import annotations

import numpy as np


def sigmoid(z: np.ndarray) -> np.ndarray:
    """σ(z) computed without overflow warnings."""
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def mse_sigmoid(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """L = mean((σ(z) − y)²); dL/dz = 2(p − y)·p(1 − p) / n. Returns (L, dL/dz, p)."""
    p = sigmoid(z)
    err = p - y
    loss = float(np.mean(err.astype(np.float64) ** 2))
    return loss, (2.0 / z.size) * err * p * (1.0 - p), p


def bce_logits(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """L = mean(softplus(z) − y·z) (binary cross-entropy of σ(z)); dL/dz = (p − y)/n."""
    p = sigmoid(z)
    z64 = z.astype(np.float64)
    loss = float(np.mean(np.logaddexp(0.0, z64) - y * z64))
    return loss, (p - y) / z.size, p


LOSSES = {"mse": mse_sigmoid, "bce": bce_logits}
