"""Input checks shared by every public entry point: errors say what to fix."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from .kernels.gemm import count_nonfinite


class NonFiniteError(ValueError):
    """An array holds NaN or infinite values (inside a model: the activations diverged)."""


class NonFiniteGradientError(NonFiniteError, FloatingPointError):
    """NaN/inf gradients: a step refused for a NaN/inf gradient norm, or a ``backward`` whose
    gradients overflowed. A :class:`mdnumba.NonFiniteError` like every NaN/inf error of mdnumba,
    and a ``FloatingPointError`` (what the trainers catch)."""


def check_array(x: npt.ArrayLike, name: str, ndim: int, last: int | None, dtype: np.dtype,
                layout: str) -> np.ndarray:
    """Return ``x`` as a C-contiguous array of ``dtype`` after checking it (any float dtype is
    cast to ``dtype``: the layer computes, and answers, in its own dtype).

    Raises TypeError for non-floating data and ValueError for a wrong number of
    dimensions, a wrong last axis, empty axes or NaN/inf values.
    """
    arr = as_array(x, name, layout)
    check_floating(arr, name, dtype)
    check_layout(arr.shape, name, ndim, last, layout)
    bad = count_nonfinite(arr)
    if bad:
        raise nonfinite_input(name, bad)
    if np.dtype(dtype).itemsize < arr.dtype.itemsize:
        big = float(np.abs(arr).max())
        if big > float(np.finfo(dtype).max):
            raise ValueError(f"{name} holds values up to {big:.3g}, beyond {np.dtype(dtype)} "
                             f"(max {np.finfo(dtype).max:.3g}); scale it or use a float64 layer")
    return np.ascontiguousarray(arr, dtype=dtype)


def is_array_like(x: object) -> bool:
    """Whether ``np.asarray(x)`` gives an array of ``x``'s values: an array, an object with
    ``__array__``, a list, tuple or buffer (not None, a string or a dict)."""
    return hasattr(x, "__array__") or isinstance(x, (list, tuple, memoryview))


def as_array(x: npt.ArrayLike, name: str, layout: str) -> np.ndarray:
    """``np.asarray(x)`` for an array, array-like, buffer, list or tuple, else TypeError; also
    refuses a masked array with masked values (the layers would read the values under the
    mask) and a ragged list, saying what to do."""
    if not is_array_like(x):
        raise TypeError(f"{name} must be a NumPy array of shape {layout}, got {type(x).__name__}")
    if np.ma.is_masked(x):
        n = int(np.ma.count_masked(x))
        raise ValueError(f"{name} is a masked array with {n} masked value{'s' * (n != 1)}, "
                         f"which would be read like any other: fill them ({name}.filled(0)); for items of "
                         "different sizes in one batch see pad_batch")
    try:
        return np.asarray(x)
    except ValueError as exc:  # e.g. a ragged list
        raise ValueError(f"{name} must be an array of shape {layout}: {exc}") from None


def check_not_scalar(x: object, name: str, layout: str) -> None:
    """ValueError for a scalar (a number, or an array of no axes, NumPy or CUDA) where an array
    of at least one axis, ``layout``, is needed."""
    if isinstance(x, (numbers.Number, np.generic)) or len(getattr(x, "shape", (0,))) == 0:
        raise ValueError(f"{name} must have at least 1 dimension {layout}, got the scalar {x!r}")


def check_floating(arr: np.ndarray, name: str, dtype: npt.DTypeLike | None) -> None:
    """TypeError unless ``arr`` holds floating-point values, saying to convert to ``dtype``, the
    layer's (None: a stage of no dtype of its own; an integer image is not scaled silently)."""
    if not np.issubdtype(arr.dtype, np.floating):
        computes = "" if dtype is None else f": the layer computes in {np.dtype(dtype)}"
        to = "float32" if dtype is None else np.dtype(dtype).name
        raise TypeError(f"{name} must hold floating-point values (any float dtype{computes}), got dtype "
                        f"{arr.dtype}; convert with np.asarray({name}, dtype=np.{to})")


def check_gradient(arr: np.ndarray, name: str = "dy") -> None:
    """TypeError unless ``arr`` holds floating-point values, NonFiniteError if any is NaN/inf: a
    gradient of a stage without a dtype of its own, checked as the layers check theirs."""
    check_floating(arr, name, None)
    bad = count_nonfinite(np.ascontiguousarray(arr))
    if bad:
        raise nonfinite_input(name, bad)


def check_layout(shape: tuple, name: str, ndim: int, last: int | None, layout: str) -> None:
    """ValueError for a wrong number of dimensions, an empty axis or a wrong last axis (NumPy and
    CUDA arrays alike)."""
    shape = tuple(shape)
    if len(shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{name} has an empty axis, shape {shape}; every axis of {layout} "
                         "must be at least 1")
    if last is not None and shape[-1] != last:
        plural = "s" * (shape[-1] != 1)
        hint = ""
        if ndim > 2 and shape[1] == last:  # (B, C, H, W), as PyTorch lays images out
            order = (0, *range(2, ndim), 1)
            hint = f"; channels go last: {name}.transpose{order} if axis 1 holds them"
        raise ValueError(f"{name} has {shape[-1]} channel{plural} in its last axis, the layer "
                         f"expects {last} {layout}{hint}")


def nonfinite_input(name: str, count: int) -> NonFiniteError:
    """The error for ``count`` NaN/inf values in the input ``name`` (``d...``: a gradient)."""
    gradient = name.startswith("d") or "_grad" in name  # dh, dy, final_state_grad[0], ...
    fix = "the loss or the stages after this layer produced them" if gradient else "clean the input first"
    return NonFiniteError(f"{name} contains {count} NaN or infinite values; {fix}")


#: what :func:`overflowed_gradients` names: a layer's gradients, or the ``dx`` its backward returns
GRADS, INPUT_GRAD = "the layer's gradients hold", "the input's gradient dx holds"


def check_grads(grads: np.ndarray, dtype: npt.DTypeLike, what: str = GRADS) -> None:
    """:class:`NonFiniteGradientError` if a ``backward`` left NaN/inf in a layer's gradients
    (``grads``, its flat buffer; or ``what=INPUT_GRAD``, the ``dx`` it would return): without it
    they would reach the optimiser, whose advice is about the learning rate, a user reading
    them, or the stage before (which would blame the stages after it)."""
    bad = count_nonfinite(grads)
    if bad:
        raise overflowed_gradients(bad, dtype, what)


def overflowed_gradients(count: int, dtype: npt.DTypeLike, what: str = GRADS) -> NonFiniteGradientError:
    """The error of a ``backward`` that left ``count`` NaN/inf values in the layer's gradients
    (or ``dx``: ``what``): finite inputs, but a ``dh`` too large for ``dtype`` once the sweep
    has summed it (or, for ``dx``, multiplied it by large weights)."""
    wider = " or use a float64 layer" if np.dtype(dtype) != np.float64 else ""
    return NonFiniteGradientError(
        f"backward overflowed: {what} {count} NaN or infinite values in "
        f"{np.dtype(dtype)}; scale dh down (e.g. a loss averaged rather than summed){wider}, and "
        "call zero_grad() before the next backward")


def overflowed_state(cell: str, count: int, output: bool = False) -> NonFiniteError:
    """The error for ``count`` NaN/inf values in a forward's cell state c: h = o·tanh(c) stays
    finite there, but the gradients would be NaN (0·inf), so backward says so instead; or
    (``output``) in the forward's output h itself, where an overflowed state met 0 or −inf."""
    advice = "lower the learning rate or set clip_norm"
    if cell != "stable":
        advice = (f"the {cell} cell's state grows geometrically along the diagonals of a large "
                  "grid when its forget gates sum above 1 (from the start with a forget_bias above "
                  "the default, or after training): use cell='stable', keep the default "
                  f"forget_bias, or {advice}")
    if output:
        return NonFiniteError(f"the cell state overflowed in forward: {count} values of its output h "
                              f"are NaN or inf; {advice}")
    return NonFiniteError(f"the cell state overflowed to inf in forward ({count} values), so the "
                          f"gradients would be NaN; {advice}")


def check_state(state: object, name: str, batch: int, width: int, dtype: np.dtype | None = None,
                check: Callable[[Any, str], Any] | None = None) -> tuple:
    """Return ``state = (h, c)`` as two arrays ``(batch, width)`` after checking it: each with
    ``check(array, name)`` (default: :func:`check_array` with ``dtype``: float values, finite)."""
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        got = f"{len(state)} item" + "s" * (len(state) != 1) if isinstance(state, (tuple, list)) \
            else type(state).__name__
        raise TypeError(f"{name} must be a pair (h, c) of arrays (batch, {width}), got {got}")
    if check is None:
        def check(a, what):
            return check_array(a, what, 2, width, dtype, f"(batch, {width})")
    pair = tuple(check(a, f"{name}[{i}]") for i, a in enumerate(state))
    for i, a in enumerate(pair):
        if a.shape[0] != batch:
            raise ValueError(f"{name}[{i}] is for a batch of {a.shape[0]}, the input's batch is {batch}")
    return pair


def is_device_array(x: object) -> bool:
    """True for numba device arrays (the simulator's too) and objects exporting
    ``__cuda_array_interface__``; imports no CUDA module."""
    return hasattr(x, "copy_to_host") or hasattr(x, "__cuda_array_interface__")


def check_device(device: object) -> str:
    """``device`` as given when it is 'cpu' or 'cuda' (then with a usable GPU and numba-cuda)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        from .backend_cuda import require_cuda
        require_cuda()
    return device


def check_flag(value: object, name: str) -> bool:
    """``value`` as a bool; TypeError unless it is one (``save="no"`` must not mean True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def missing_activations(what: str = "backward()", inference: bool = False,
                        run: str = "forward(x)") -> RuntimeError:
    """The error of ``what`` without saved activations: before any forward, after
    ``free_buffers()``, in a copy, or (``inference``) after a ``forward(x, save=False)``, which
    keeps none."""
    if inference:
        return RuntimeError(f"{what} needs the activations of a forward with save=True; the last "
                            f"forward(x, save=False) kept none")
    return RuntimeError(f"{what} has no saved activations; run {run} first (a layer keeps "
                        "those of its last forward until free_buffers(); copies and pickles start "
                        "without them)")


def check_saved(saved: dict | None, what: str = "backward()") -> dict:
    """The saved activations (a dict) of a layer's last forward, else :func:`missing_activations`."""
    if saved is None or saved.get("inference"):
        raise missing_activations(what, saved is not None)
    return saved


SIZES_WITH_STATE = ("sizes= cannot be combined with state=: a chunk of padded sequences would hand "
                    "on the states of the padding; stream sequences of one length, or pass sizes "
                    "without a state")
FINAL_STATE_WITH_SIZES = ("final_state() is not defined after forward(x, sizes=...): the scans of "
                          "the shorter items end in the padding (each item's last h is in the output)")
NO_STATE_GRAD = "no initial-state gradient: run forward(x, state=...) and then backward(dh)"


def check_size_values(sizes: object, positive: bool = False) -> np.ndarray:
    """``sizes`` as an int64 array of at least one entry (shape not checked; signed: ``-(-s // k)``
    of an unsigned one wraps around): a TypeError for bools (also mixed into a list of ints) and
    non-integers, a ValueError for a ragged or empty list, values beyond int64 and
    (``positive``) sizes below 1."""
    what = "sizes must be integers >= 1 (each item's extent along each grid axis)"
    try:
        arr = np.asarray(sizes)
    except ValueError as exc:  # ragged
        raise ValueError(f"{what}, one row per item of equal length; got {sizes!r} ({exc})") from None
    if arr.dtype == object or not isinstance(sizes, np.ndarray):
        flat = np.asarray(sizes, dtype=object).ravel()
        if any(isinstance(v, (bool, np.bool_)) for v in flat):
            raise TypeError(f"{what}, not bools; got {sizes!r}")
    if arr.size == 0:
        raise ValueError(f"{what}; got none ({sizes!r})")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what}; got dtype {arr.dtype}")
    if positive and (arr < 1).any():
        raise ValueError(f"{what}; got {arr.min()}")
    if arr.max() > np.iinfo(np.int64).max:  # uint64
        raise ValueError(f"{what}; got {arr.max()}")
    return arr.astype(np.int64, copy=False)


def check_sizes(sizes: object, batch: int, dims: tuple) -> tuple | None:
    """The extents of the items of a padded batch (``forward(x, sizes=...)``) as B tuples of N
    Python ints (hashable: the tables are cached on them), or None when absent or when every
    item fills the grid. 1D also takes lengths of shape (B,)."""
    if sizes is None:
        return None
    arr, N = check_size_values(sizes), len(dims)
    given = arr.shape
    if arr.ndim == 1 and N == 1:
        arr = arr[:, None]
    if arr.shape != (batch, N):
        alt = f" or (batch,) = ({batch},) lengths" if N == 1 else ""
        raise ValueError(f"sizes must have shape (batch, {N}) = {(batch, N)}{alt}: each item's extent "
                         f"along each grid axis; got {given}")
    bad = np.nonzero(((arr < 1) | (arr > np.array(dims))).any(axis=1))[0]
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"sizes[{b}] = {tuple(arr[b].tolist())} must lie between 1 and the padded "
                         f"grid {tuple(dims)} on every axis")
    if (arr == np.array(dims)).all():
        return None
    return tuple(tuple(row) for row in arr.tolist())


def check_stateful(stateful: bool, final_state_grad: object) -> None:
    """ValueError for a ``final_state_grad`` given after a forward that took no ``state``."""
    if final_state_grad is not None and not stateful:
        raise ValueError("final_state_grad needs a forward from a state: run forward(x, "
                         "state=layer.zero_state(batch)) for a zero initial state")


def check_finite_params(params: object) -> None:
    """Raise :class:`NonFiniteError` naming the weights of ``params`` (a ParamBuffer) that hold
    NaN or infinite values: set by hand, or by an update of the user's own that diverged."""
    if not count_nonfinite(params.data):
        return
    bad = [name for name in params.layout.shapes if not np.isfinite(params[name]).all()]
    raise NonFiniteError(f"the layer's weights {', '.join(bad)} hold NaN or infinite values; give "
                         "them finite values (e.g. those of a fresh layer or a checkpoint)")


def check_count(value: object, name: str) -> int:
    """Return ``int(value)`` if it is an integer in [0, 2^63) (not a bool), else raise ValueError
    (a count read from saved state, e.g. a step; ``np.load`` gives it as a 0-d array)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if not is_int_in(value, 0, 2 ** 63):
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {value!r}")
    return int(value)


def is_int_in(value: object, low: int, high: int) -> bool:
    """Whether ``value`` is an integer (Python or NumPy, not a bool) in [``low``, ``high``)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and low <= value < high


def check_positive_int(value: object, name: str) -> int:
    """Return ``int(value)`` if it is an integer >= 1, else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_shape(a: object, want: tuple, name: str = "dy") -> None:
    """Raise ValueError unless ``a`` has shape ``want`` (e.g. a gradient: the shape of the
    output it belongs to, not just the same number of values); TypeError unless ``a`` is an
    array or array-like (NumPy or CUDA)."""
    if not (is_array_like(a) or is_device_array(a)):
        raise TypeError(f"{name} must be an array of shape {tuple(want)} (the forward output's), "
                        f"got {type(a).__name__}")
    if tuple(np.shape(a)) != tuple(want):
        raise ValueError(f"{name} must have shape {tuple(want)} (the forward output's), got "
                         f"{tuple(np.shape(a))}")


#: the names of a grid's axes in the layers' layouts, by how many it has (other N: n1, .., nN)
GRID_AXES = {1: ("time",), 2: ("height", "width"), 3: ("depth1", "depth2", "depth3")}


def grid_layout(ndim: int, channels: str = "C") -> str:
    """The layout of an N-D layer's input (``channels`` "C") or output ("D"), as its errors name
    it: ``(batch, height, width, C)`` for 2D."""
    axes = GRID_AXES.get(ndim) or tuple(f"n{d + 1}" for d in range(ndim))
    return f"(batch, {', '.join(axes)}, {channels})"


def check_directions(directions: object, ndim: int) -> int:
    """Return ``directions`` as an int if it is 1 or 2**ndim (one scan, or one from every corner
    of the grid), else raise ValueError. (2**ndim only where it fits int64: that of a huge ndim,
    say 2**63, would take Python forever.)"""
    corners = 2 ** ndim if ndim < 63 else None
    if isinstance(directions, bool) or not isinstance(directions, (int, np.integer)) or \
            directions not in (1, corners):
        raise ValueError(f"directions must be 1 or {corners or f'2**{ndim}'} (every corner of a "
                         f"{ndim}-D grid), got {directions!r}")
    return int(directions)


def check_finite_number(value: object, name: str, dtype: npt.DTypeLike | None = None) -> float:
    """Return ``float(value)`` for a finite real number (not a bool or string; finite in
    ``dtype`` too, if given: a float32 layer's 1e39 would be inf), else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)  # a Python int beyond int64 too (np.isfinite refuses those)
    except OverflowError:  # an int beyond float64
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value}")
    if dtype is not None:
        with np.errstate(over="ignore"):
            if not np.isfinite(np.dtype(dtype).type(number)):
                raise ValueError(f"{name}={value} overflows the layer's {np.dtype(dtype)}")
    return number


def shared_seed(seed: object) -> object:
    """A model's seed for its parts: an int or None as it is (part k then takes
    :func:`part_seed`), any other NumPy seed (a SeedSequence, a Generator) as one Generator the
    parts draw from in turn (the same SeedSequence for each part would repeat its stream)."""
    return seed if seed is None or isinstance(seed, (int, np.integer)) else seeded_rng(seed)


def part_seed(seed: object, k: int) -> object:
    """Part ``k``'s seed from a :func:`shared_seed`: ``seed + k`` for an int, else the seed."""
    return seed + k if isinstance(seed, (int, np.integer)) else seed


def seeded_rng(seed: object, name: str = "seed") -> np.random.Generator:
    """``np.random.default_rng(seed)``, with an error that names the argument ``name`` (NumPy's
    says only "expected non-negative integer")."""
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name} must be an integer >= 0 or None, got {seed!r} ({exc})") from None
