"""Padded batches of items of different sizes, and back: the arrays ``forward(x, sizes=...)``
takes (:meth:`mdnumba.WavefrontLSTM.forward`) and the items' parts of what it returns."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ._validate import as_array, check_sizes


def pad_batch(items: Sequence[npt.ArrayLike], *, shape: Sequence[int] | None = None,
              fill: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Stack ``items`` (arrays ``(n_1, .., n_N, C)`` of one N and one C, of any sizes) into one
    padded batch: returns ``(x, sizes)``, ``x`` (B, *shape, C) with item b at the start of every
    axis, ``x[b, :n_1, .., :n_N] = items[b]``, and ``fill`` elsewhere; ``sizes`` (B, N) ints.

    ``shape``: the padded grid (default: the largest size along each axis). A fixed one keeps a
    layer's buffers and index tables from batch to batch. ``fill``: the padding's value (layers
    never read it, but a stack that starts with a ``BlockSubsample`` does: keep 0 there).
    The batch takes the items' common dtype (``np.result_type``).
    """
    if isinstance(items, np.ndarray) or not isinstance(items, Sequence):
        raise TypeError(f"items must be a list or tuple of arrays (n_1, .., n_N, channels), got "
                        f"{type(items).__name__}")
    arrays = [as_array(item, f"items[{b}]", "(n_1, .., n_N, channels)") for b, item in enumerate(items)]
    if not arrays:
        raise ValueError("items is empty: pad_batch needs at least one item")
    ndim, channels = arrays[0].ndim, arrays[0].shape[-1] if arrays[0].ndim else None
    for b, arr in enumerate(arrays):
        if arr.ndim < 2 or arr.ndim != ndim or arr.shape[-1] != channels or 0 in arr.shape:
            this = f", items[{b}] {arr.shape}" if b else ""
            raise ValueError(f"every item must be an array (n_1, .., n_N, channels) of one N >= 1 and "
                             f"one channel count, every n >= 1: items[0] has shape {arrays[0].shape}{this}")
    sizes = np.array([arr.shape[:-1] for arr in arrays], dtype=np.int64)
    grid = sizes.max(axis=0) if shape is None else _padded_grid(shape, sizes)
    dtype = np.result_type(*arrays)
    if dtype != np.bool_ and not np.issubdtype(dtype, np.number):
        raise TypeError(f"items must hold numbers (or bools), got dtype {dtype}")
    x = np.full((len(arrays),) + tuple(int(n) for n in grid) + (channels,), _fill_value(fill, dtype),
                dtype=dtype)
    for b, arr in enumerate(arrays):
        x[(b,) + tuple(slice(0, n) for n in arr.shape[:-1])] = arr
    return x, sizes


def _fill_value(fill: object, dtype: np.dtype) -> np.generic:
    """``fill`` as a ``dtype`` value: a number (not a bool) that ``dtype`` holds, finite (layers
    refuse NaN/inf anywhere in x: 1e300 is inf in float32) and exact for an integer dtype
    (-1 is 255 in uint8); a bool only for boolean items."""
    flag = isinstance(fill, (bool, np.bool_))
    if (flag and dtype != np.bool_) or not isinstance(fill, (int, float, np.integer, np.floating, np.bool_)):
        raise TypeError(f"fill must be a number{' (a bool: boolean items only)' if flag else ''}, "
                        f"got {fill!r}")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            value = np.array(fill).astype(dtype)[()]
        fits = bool(np.isfinite(value)) and (np.issubdtype(dtype, np.inexact) or value == fill)
    except (OverflowError, TypeError, ValueError):  # e.g. 10**400
        fits = False
    if not fits:
        raise ValueError(f"fill must be a finite number that the items' dtype {dtype} holds (layers "
                         f"refuse NaN/inf anywhere in x), got {fill!r}")
    return value


def _padded_grid(shape: Sequence[int], sizes: np.ndarray) -> np.ndarray:
    """``shape`` checked: N ints, each at least the largest item's size along its axis."""
    what = f"shape must be {sizes.shape[1]} integers (the padded grid's extent along each axis)"
    try:
        if any(isinstance(n, (bool, np.bool_)) for n in shape):  # operator.index(True) is 1
            raise TypeError
        grid = np.array([operator.index(n) for n in shape], dtype=np.int64)
    except TypeError:
        raise TypeError(f"{what}, got {shape!r}") from None
    if grid.shape[0] != sizes.shape[1]:
        raise ValueError(f"{what}, got {tuple(shape)}")
    big = sizes.max(axis=0)
    if (big > grid).any():
        b = int(np.nonzero((sizes > grid).any(axis=1))[0][0])
        raise ValueError(f"shape {tuple(grid.tolist())} is smaller than items[{b}], of sizes "
                         f"{tuple(sizes[b].tolist())}: give at least {tuple(big.tolist())}")
    return grid


def unpad_batch(y: npt.ArrayLike, sizes: npt.ArrayLike) -> list:
    """The items' parts of a padded batch's output ``y`` (B, *grid, F): ``y[b, :sizes[b][0], ..]``
    for each b (views into ``y``: a CUDA device array gives device views). ``sizes`` as ``forward``
    took them ((B, N), or lengths (B,) for N = 1); after a stack with ``BlockSubsample`` stages,
    ``net.out_sizes(sizes)``."""
    if not hasattr(y, "shape") or not hasattr(y, "__getitem__"):
        y = np.asarray(y)
    if len(y.shape) < 3:
        raise ValueError(f"y must be a padded batch (batch, n_1, .., n_N, features), got shape {y.shape}")
    dims = y.shape[1:-1]
    full = check_sizes(sizes, y.shape[0], dims)
    rows = [dims] * y.shape[0] if full is None else full
    return [y[(b,) + tuple(slice(0, n) for n in size)] for b, size in enumerate(rows)]
