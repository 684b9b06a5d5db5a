"""Losses on logits ``z`` with a sigmoid output ``p = σ(z)``; each returns the gradient."""

from __future__ import annotations

import numpy as np

from ._validate import NonFiniteError
from .kernels.gemm import count_nonfinite


def sigmoid(z: np.ndarray) -> np.ndarray:
    """σ(z) computed without overflow warnings, in z's float type (float64 for integers)."""
    z = np.asarray(z)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def real_values(a: object, name: str) -> np.ndarray:
    """``a`` as an array of real numbers (floating point or integer) holding at least one:
    TypeError for bools, complex numbers, strings or objects, ValueError for an empty one (whose
    mean would be NaN, or a division by zero)."""
    arr = np.asarray(a)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.floating) and \
            not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold real numbers (floating point or integer), got dtype "
                        f"{arr.dtype}")
    if not arr.size:
        raise ValueError(f"{name} is empty (shape {arr.shape}); give at least one value")
    return arr


def checked_logits(z: object, name: str, infinite: bool) -> np.ndarray:
    """:func:`real_values`, and :class:`mdnumba.NonFiniteError` for NaN logits, or (not
    ``infinite``: a loss without a limit there) ±inf ones."""
    z = real_values(z, name)
    bad = count_nonfinite(z)
    if bad and infinite:  # only NaN is refused
        bad = int(np.count_nonzero(np.isnan(z)))
    if bad:
        raise NonFiniteError(f"{name} hold {bad} {'NaN' if infinite else 'NaN or infinite'} values "
                             f"(of {z.size}): the model's output diverged; give it finite inputs and "
                             "weights (in training: a lower learning rate, or clip_norm)")
    return z


def _same_shape(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(z, y)`` as arrays of real numbers, the logits not NaN (:func:`checked_logits`: σ(±inf)
    is 1 or 0); ValueError unless their shapes are equal (NumPy would broadcast a (B,) target
    against (B, 1) logits into a (B, B) loss, a wrong number without an error)."""
    z, y = checked_logits(z, "logits z", infinite=True), real_values(y, "targets y")
    if z.shape != y.shape:
        raise ValueError(f"targets y of shape {y.shape} do not match the logits z of shape {z.shape}; "
                         "give one target per logit (reshape y, e.g. y.reshape(z.shape))")
    return z, y


def _sigmoid_error(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(p, q, p − y)`` for ``p = σ(z)``, ``q = 1 − p = σ(−z)``, each to its own precision: where
    z > 0, p rounds to 1, so ``1 − p`` and ``p − y`` are taken as ``σ(−z)`` and ``(1 − y) − σ(−z)``
    (``p − y`` and ``1 − p`` lost every digit from z ≈ 17 in float32, 37 in float64: a
    confidently wrong positive logit had a zero gradient)."""
    p, q = sigmoid(z), sigmoid(-z)
    return p, q, np.where(z > 0, (1 - y) - q, p - y)


def mse_sigmoid(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """L = mean((σ(z) − y)²); dL/dz = 2(p − y)·p(1 − p) / n. Returns (L, dL/dz, p)."""
    z, y = _same_shape(z, y)
    p, q, err = _sigmoid_error(z, y)
    loss = float(np.mean(err.astype(np.float64) ** 2))
    return loss, (2.0 / z.size) * err * p * q, p


def bce_logits(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """L = mean(softplus(z) − y·z) (binary cross-entropy of σ(z)); dL/dz = (p − y)/n; targets
    ``y`` in [0, 1]. An infinite z has its limit: 0 where σ(z) = y, else +inf."""
    z, y = _same_shape(z, y)
    if not ((y >= 0) & (y <= 1)).all():  # NaN fails too
        got = "NaN" if np.isnan(y).any() else f"values from {np.min(y)} to {np.max(y)}"
        raise ValueError(f"bce_logits takes targets y in [0, 1] (probabilities of the positive class), "
                         f"got {got}")
    p, _, err = _sigmoid_error(z, y)
    z64 = z.astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf − inf at an infinite z: its limit, below
        per = np.logaddexp(0.0, z64) - y * z64
    inf = np.isinf(z64)
    if inf.any():  # the limits: 0 where σ(z) is the target, +inf where it differs
        wrong = np.where(z64[inf] > 0, y[inf] < 1, y[inf] > 0)
        per[inf] = np.where(wrong, np.inf, 0.0)
    return float(np.mean(per)), err / z.size, p


LOSSES = {"mse": mse_sigmoid, "bce": bce_logits}
