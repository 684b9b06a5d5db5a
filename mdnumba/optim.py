"""Adam with optional global-norm gradient clipping, on flat parameter buffers."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from numba import njit

from ._validate import (
    NonFiniteError,
    NonFiniteGradientError,
    check_count,
    check_finite_number,
    check_flag,
    is_device_array,
)
from .config import NJIT_OPTS
from .params import ParamBuffer


class NonFiniteUpdateError(NonFiniteError, FloatingPointError):
    """A step refused because its update would overflow the weights or moments (finite gradients,
    e.g. a huge learning rate): nothing was changed."""


def nonfinite_gradient(clip_norm: float | None) -> NonFiniteGradientError:
    """The error of a step refused for a NaN/inf gradient norm (clipping cannot rescale one)."""
    return NonFiniteGradientError("gradient norm is not finite; lower the learning rate" + (
        "" if clip_norm else " or enable clip_norm (it stops the growth that ends in overflow)"))


@njit(**NJIT_OPTS)
def sum_of_squares(g):
    """Σ g² with each square and the sum in float64 (a float32 g of 2e19 squares to inf in
    float32; no BLAS call: keeps one thread pool busy)."""
    acc = 0.0
    for k in range(g.shape[0]):
        x = np.float64(g[k])  # Numba's float() of a float32 stays float32
        acc += x * x
    return acc


@njit(**NJIT_OPTS)
def adam_update(p, g, m, v, lr, beta1, beta2, eps, bc1, bc2, scale, write, top):
    """``g' = scale·g``; ``m ← β1 m + (1−β1) g'``; ``v ← β2 v + (1−β2) g'²``;
    ``p ← p − lr · (m/bc1) / (sqrt(v/bc2) + ε)`` with ``bc = 1 − βᵗ``, in place when ``write``;
    returns how many of the new p, m, v are NaN or beyond ``top`` in size (the largest value of
    their dtype: a float64 lr makes them float64 until stored), ``write=False``: only counts."""
    bad = 0
    for k in range(p.shape[0]):
        gk = g[k] * scale
        mk = beta1 * m[k] + (1.0 - beta1) * gk
        vk = beta2 * v[k] + (1.0 - beta2) * gk * gk
        pk = p[k] - lr * (mk / bc1) / (math.sqrt(vk / bc2) + eps)
        if write:
            m[k], v[k], p[k] = mk, vk, pk
        bad += not (abs(pk) <= top and abs(mk) <= top and vk <= top)  # NaN: False
    return bad


@njit(**NJIT_OPTS)
def rmsprop_update(p, g, m, v, lr, beta1, rho, eps, bc1, bc2, scale, write, top):
    """``g' = scale·g``; ``v ← ρ v + (1−ρ) g'²``; ``p ← p − lr · g' / (sqrt(v) + ε)``, as
    :func:`adam_update` (its arguments; ``m``, ``beta1`` and the bias corrections are unused)."""
    bad = 0
    for k in range(p.shape[0]):
        gk = g[k] * scale
        vk = rho * v[k] + (1.0 - rho) * gk * gk
        pk = p[k] - lr * gk / (math.sqrt(vk) + eps)
        if write:
            v[k], p[k] = vk, pk
        bad += not (abs(pk) <= top and vk <= top)
    return bad


def collect_buffers(obj: object) -> list[tuple[np.ndarray, np.ndarray]]:
    """Flatten layers/models/(param, grad) pairs into a list of flat (param, grad) arrays.

    Accepts an object with ``params`` and ``grads`` :class:`ParamBuffer`s (or two same-shape
    arrays: a stage of the user's), an object with a ``layers`` list, a ``(param, grad)`` pair of
    same-shape arrays, or any list of those.
    """
    if isinstance(getattr(obj, "params", None), ParamBuffer):
        grads = getattr(obj, "grads", None)
        if not isinstance(grads, ParamBuffer):
            raise TypeError(f"{type(obj).__name__}.params is a ParamBuffer, so its grads must be one "
                            f"of the same layout, got {type(grads).__name__}")
        return collect_buffers((obj.params.data, grads.data))  # the pair's checks: shape, dtype
    if isinstance(getattr(obj, "params", None), np.ndarray):
        grads = getattr(obj, "grads", None)
        if not isinstance(grads, np.ndarray):
            raise TypeError(f"{type(obj).__name__}.params is an array, so its grads must be an array of "
                            f"the same shape, got {type(grads).__name__}")
        return collect_buffers((obj.params, grads))
    if hasattr(obj, "layers"):
        return collect_buffers(list(obj.layers))
    if (isinstance(obj, tuple) and len(obj) == 2 and all(isinstance(a, np.ndarray) for a in obj)):
        p, g = obj
        if p.shape != g.shape or p.dtype != g.dtype:
            raise ValueError(f"parameter {p.shape}/{p.dtype} and gradient {g.shape}/{g.dtype} differ")
        if p.dtype not in (np.float32, np.float64):
            raise TypeError(f"parameter and gradient arrays must be float32 or float64, got {p.dtype}")
        if not (p.flags.c_contiguous and g.flags.c_contiguous):
            raise ValueError("parameter and gradient arrays must be C-contiguous")
        if not (p.flags.writeable and g.flags.writeable):
            which = "parameter" if not p.flags.writeable else "gradient"
            raise ValueError(f"the {which} array is read-only; the optimiser updates the parameters in "
                             "place and zero_grad() clears the gradients")
        return [(p, g)]  # not reshape(-1) views: a deepcopy or pickle with the stage keeps them linked
    if isinstance(obj, (list, tuple)):
        out = []
        for item in obj:
            out.extend(collect_buffers(item))
        return out
    if is_device_array(getattr(obj, "params", None)):
        raise TypeError(f"{type(obj).__name__} keeps its parameters on the GPU: give it to a device "
                        "optimiser (mdnumba.backend_cuda.CudaAdam, CudaRMSprop), or copy them with its "
                        "params_to_host() and set_params(); the host optimisers and params_to_vector take "
                        "host layers (which may compute on the GPU: MDLSTM2D(..., device='cuda'))")
    raise TypeError(f"an optimiser (and params_to_vector) needs layers, models or (param, grad) array "
                    f"pairs, got {type(obj).__name__}")


def check_state_count(state: Mapping, n: int) -> None:
    """ValueError unless the optimizer ``state`` holds ``n`` m and ``n`` v buffers (one per
    buffer of the optimizer it is loaded into)."""
    if len(state["m"]) != n or len(state["v"]) != n:
        raise ValueError(f"optimizer state has {len(state['m'])} m and {len(state['v'])} v buffers, "
                         f"this optimizer {n} of each")


def _buffers(obj: object) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`collect_buffers`, at least one, each layer once (as an optimiser takes them)."""
    buffers = collect_buffers(obj)
    if not buffers:
        raise ValueError(f"{type(obj).__name__} holds no parameters")
    check_distinct(buffers)
    return buffers


def _joined(arrays: list[np.ndarray], dtype: npt.DTypeLike | None) -> np.ndarray:
    """The ``arrays`` in one new vector, in ``dtype`` (None: theirs; else a float dtype)."""
    if dtype is not None and not np.issubdtype(np.dtype(dtype), np.floating):
        raise TypeError(f"dtype must be a floating-point type (e.g. np.float64), got {np.dtype(dtype)}: "
                        "values would be truncated")
    vec = np.concatenate([a.ravel() for a in arrays])
    return vec if dtype is None else vec.astype(dtype, copy=False)


def params_to_vector(obj: object, dtype: npt.DTypeLike | None = None) -> np.ndarray:
    """A new vector of every parameter of ``obj`` (layers, models, lists of them: what an optimiser
    of ``obj`` updates, in its order), in ``dtype`` (default: the parameters'; e.g. ``np.float64``
    for ``scipy.optimize``). ``layer.params.data`` is the layer's own buffer instead, which every
    update and :func:`vector_to_params` rewrite in place."""
    return _joined([p for p, _ in _buffers(obj)], dtype)


def grads_to_vector(obj: object, dtype: npt.DTypeLike | None = None) -> np.ndarray:
    """A new vector of the gradients of :func:`params_to_vector`, in its order (``grads.data`` is
    the layer's own buffer, which the next ``zero_grad`` and ``backward`` rewrite: a list of
    them, e.g. SciPy's, would hold the last gradient only)."""
    return _joined([g for _, g in _buffers(obj)], dtype)


def vector_to_params(vec: npt.ArrayLike, obj: object) -> None:
    """Write ``vec`` (as :func:`params_to_vector` gives it) into the parameters of ``obj``, each
    part cast to its layer's dtype; all or nothing: a vector of another length, or one holding
    NaN/inf, values that overflow a layer's dtype or are not numbers, changes no weight."""
    buffers = _buffers(obj)
    vec = np.asarray(vec)
    total = sum(p.size for p, _ in buffers)
    if vec.shape != (total,):
        raise ValueError(f"the vector has shape {vec.shape}, the parameters ({total},): give what "
                         "params_to_vector returns")
    parts, start = [], 0
    for p, _ in buffers:
        part = np.empty_like(p.ravel())
        ParamBuffer._copy_into(part, "the parameters", vec[start:start + p.size])
        if not np.isfinite(part).all():
            raise NonFiniteError(f"the vector holds {int((~np.isfinite(part)).sum())} NaN or infinite "
                                 f"values at [{start}:{start + p.size}]; no weight was changed")
        parts.append(part)
        start += p.size
    for (p, _), part in zip(buffers, parts):
        p.ravel()[...] = part


def flat_state(state: dict) -> dict:
    """``state`` with its lists of moments ``m``, ``v`` as one key per array, ``m_0``, ``m_1``, ...,
    ``v_0``, ...: what ``np.savez`` can store (it cannot store a list of arrays of other sizes)."""
    flat = {k: v for k, v in state.items() if k not in ("m", "v")}
    for key in ("m", "v"):
        flat.update({f"{key}_{k}": a for k, a in enumerate(state[key])})
    return flat


def read_state(state: object) -> Mapping:
    """``state`` with the keys t, m, v (TypeError/ValueError if it has not), its moments as lists
    again if it is a :func:`flat_state` (e.g. ``np.load`` of one)."""
    if not isinstance(state, Mapping):  # np.load's NpzFile is one
        raise TypeError(f"optimizer state must be a dict like state_dict()'s (keys kind, t, m, v), got "
                        f"{type(state).__name__}")
    if "m" not in state and "v" not in state and "m_0" in state:
        lists: dict[str, list] = {"m": [], "v": []}
        for key, arrays in lists.items():
            while f"{key}_{len(arrays)}" in state:  # m_0, m_1, ... up to the first missing
                arrays.append(state[f"{key}_{len(arrays)}"])
        state = {**{k: state[k] for k in ("kind", "t") if k in state}, **lists}
    missing = [k for k in ("t", "m", "v") if k not in state]
    if missing:
        raise ValueError(f"optimizer state lacks {missing}; pass what state_dict() returned "
                         "(keys t, m, v, or t, m_0, v_0, ...)")
    for key in ("m", "v"):
        if not isinstance(state[key], (list, tuple)) and np.ndim(state[key]) < 2:
            raise TypeError(f"optimizer state {key} must be a list of arrays, one per parameter buffer "
                            f"(as state_dict() gives), got {type(state[key]).__name__}")
    return state


def check_state_shapes(srcs: list, shapes: list) -> None:
    """ValueError naming the first optimiser-state array whose shape is not its buffer's."""
    for src, shape in zip(srcs, shapes):
        if np.shape(src) != tuple(shape):
            raise ValueError(f"optimizer state shape {np.shape(src)} does not match {tuple(shape)}")


def _span(a) -> tuple[int, int]:
    """[first, last) byte address of a contiguous host or device array."""
    iface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    start = iface["data"][0]
    return start, start + a.size * a.dtype.itemsize


def check_distinct(buffers: list) -> None:
    """ValueError if two of the ``(parameters, gradients)`` buffers share memory: a layer given
    twice (e.g. ``Adam([net, net.layers[0]])``) would be updated twice per step and its gradient
    counted twice in the norm; an array given as its own gradient would be updated by itself."""
    spans = sorted(_span(p) for p, _ in buffers)
    if any(nxt[0] < cur[1] for cur, nxt in zip(spans, spans[1:])):
        raise ValueError("the same parameters appear twice in this optimiser (a layer, or a model "
                         "and one of its layers, given twice): give each layer once")
    spans = sorted(s for pair in buffers for s in map(_span, pair))
    if any(nxt[0] < cur[1] for cur, nxt in zip(spans, spans[1:])):
        raise ValueError("a gradient array shares memory with a parameter array or another gradient "
                         "in this optimiser: give each (parameters, gradients) pair arrays of their own")


def _positive(value: object, name: str) -> float:
    """A finite number > 0 (TypeError for strings and bools)."""
    if check_finite_number(value, name) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _clip_norm(value: object, name: str) -> float | None:
    """None (no clipping) or a finite number > 0."""
    return None if value is None else _positive(value, name)


def _betas(value: object, name: str) -> tuple[float, float]:
    """Two numbers in [0, 1)."""
    pair = tuple(value) if isinstance(value, (tuple, list)) or np.ndim(value) == 1 else ()
    if len(pair) != 2 or not all(0.0 <= check_finite_number(b, name) < 1.0 for b in pair):
        raise ValueError(f"{name} must be two numbers in [0, 1), e.g. (0.9, 0.999), got {value!r}")
    return float(pair[0]), float(pair[1])


def _no_first_moment(value: object, name: str) -> tuple[float, float]:
    """RMSprop's betas: ``(0, ρ)`` (it keeps no first moment, so a β1 would do nothing)."""
    b1, rho = _betas(value, name)
    if b1 != 0.0:
        raise ValueError(f"RMSprop keeps no first moment: {name}[0] must be 0, got {b1}; "
                         f"its decay is rho ({name}[1])")
    return b1, rho


class _Setting:
    """An optimiser setting checked whenever it is set, in ``__init__`` and later (a schedule
    changing ``lr``, a new ``clip_norm``): ``check(value, name)`` returns what is stored."""

    def __init__(self, check):
        self.check = check

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None):
        return self if obj is None else obj.__dict__[self.name]

    def __set__(self, obj: object, value: object) -> None:
        obj.__dict__[self.name] = self.check(value, self.name)


class Adam:
    """Adam (Kingma & Ba 2015) over every flat buffer of the given layers.

    ``clip_norm``: if set, gradients are scaled by ``min(1, clip_norm/‖g‖₂)``
    where ‖g‖₂ is the global norm over all buffers. ``step()`` returns that norm.
    Moments ``m``, ``v`` use the same flat layout as the parameters. ``lr``, ``betas``,
    ``eps`` and ``clip_norm`` may be changed between steps (e.g. a learning-rate schedule);
    they are checked on every change.
    """

    #: the name :meth:`state_dict` records (``OPTIMIZERS``' key; the device twins share it)
    kind = "adam"
    lr = _Setting(_positive)
    eps = _Setting(_positive)  # eps = 0 would divide 0 by 0 where a gradient stays 0
    clip_norm = _Setting(_clip_norm)
    betas = _Setting(_betas)
    t = _Setting(check_count)  # steps taken (the bias correction's t)

    def __init__(self, layers_or_params: object, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, clip_norm: float | None = None):
        self.lr, self.betas, self.eps, self.clip_norm = lr, betas, eps, clip_norm
        self.buffers = self._collect(layers_or_params)
        if not self.buffers:
            raise ValueError(f"{type(self).__name__} got no parameters")
        check_distinct(self.buffers)
        self.t = 0
        self.m = [self._zeros_like(self._as_1d(p)) for p, _ in self.buffers]
        self.v = [self._zeros_like(self._as_1d(p)) for p, _ in self.buffers]

    # Per-buffer primitives; a device twin (backend_cuda.CudaAdam) overrides them.
    _collect = staticmethod(collect_buffers)
    _zeros_like = staticmethod(np.zeros_like)
    _sum_of_squares = staticmethod(sum_of_squares)
    _update = staticmethod(adam_update)
    _to_host = staticmethod(np.copy)
    _assign = staticmethod(np.copyto)

    @staticmethod
    def _as_1d(a):
        """A buffer as 1-D (a view; the buffers are C-contiguous). Made at each use: the optimiser
        keeps the arrays it was given, so that copies of it and of its stages stay linked."""
        return a.reshape(-1)

    def grad_norm(self) -> float:
        """Global L2 norm of all gradients."""
        return math.sqrt(sum(self._sum_of_squares(self._as_1d(g)) for _, g in self.buffers))

    def step(self) -> float:
        """Apply one update; return the (pre-clipping) global gradient norm."""
        norm = self.grad_norm()
        if not math.isfinite(norm):
            raise nonfinite_gradient(self.clip_norm)
        scale = 1.0
        if self.clip_norm is not None and norm > self.clip_norm:
            scale = self.clip_norm / norm
        self._apply(scale)
        return norm

    def _apply(self, scale) -> None:
        """Advance t and update every buffer with gradients scaled by ``scale``, unless a new weight
        or moment would be NaN or infinite: then :class:`NonFiniteUpdateError` and nothing changes
        (the device twins have their own: the scale and t on the device)."""
        b1, b2 = self.betas
        bc1, bc2 = 1.0 - b1 ** (self.t + 1), 1.0 - b2 ** (self.t + 1)
        for write in (False, True):
            bad = sum(self._update(self._as_1d(p), self._as_1d(g), m, v, self.lr, b1, b2, self.eps, bc1, bc2,
                                   scale, write, float(np.finfo(p.dtype).max))
                      for (p, g), m, v in zip(self.buffers, self.m, self.v))
            if bad and not write:
                raise NonFiniteUpdateError(
                    f"this step would make {bad} weights or moments NaN or infinite (beyond "
                    f"{self.m[0].dtype}); nothing was changed: lower the learning rate (lr={self.lr:g})"
                    + ("" if self.clip_norm else " or set clip_norm (a huge gradient overflows the moments)"))
        self.t += 1

    def zero_grad(self) -> None:
        """Set every gradient this optimiser reads to zero (as each layer's ``zero_grad``;
        ``backward`` accumulates)."""
        for _, g in self.buffers:
            self._fill_zero(g)

    @staticmethod
    def _fill_zero(g) -> None:
        g[...] = 0

    def state_dict(self, flat: bool = False) -> dict:
        """Moments (lists ``m``, ``v``, an array per layer), step count and the optimiser's kind (for
        checkpoints), as host values; ``flat``: the moments one key per array (:func:`flat_state`),
        e.g. ``np.savez(path, **opt.state_dict(flat=True))``."""
        check_flag(flat, "flat")
        state = self._state()
        return flat_state(state) if flat else state

    def _state(self) -> dict:
        """:meth:`state_dict`'s moments as lists."""
        return {"kind": self.kind, "t": self.t, "m": [self._to_host(m) for m in self.m],
                "v": [self._to_host(v) for v in self.v]}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output, either form (of the same kind of optimiser; a state
        without ``kind`` is taken as it is), e.g. ``np.load`` of a saved one; shapes must match."""
        state = read_state(state)
        kind = str(np.asarray(state.get("kind", self.kind)))  # np.load gives a 0-d array
        if kind != self.kind:
            raise ValueError(f"this optimizer state is {kind}'s, this optimizer is {self.kind}")
        check_state_count(state, len(self.m))
        t = check_count(state["t"], "optimizer state step t")
        dsts = self.m + self.v
        srcs = [np.asarray(src) for src in list(state["m"]) + list(state["v"])]
        check_state_shapes(srcs, [dst.shape for dst in dsts])
        kinds = sorted({str(src.dtype) for src in srcs if not np.issubdtype(src.dtype, np.floating)})
        if kinds:
            raise ValueError(f"optimizer state moments must be floating point, got {', '.join(kinds)}")
        with np.errstate(over="ignore"):  # checked below: a float64 1e300 is inf in float32
            srcs = [src.astype(dst.dtype) for src, dst in zip(srcs, dsts)]
        if not all(np.isfinite(src).all() for src in srcs) or any((v < 0).any() for v in srcs[len(self.m):]):
            raise ValueError("optimizer state holds NaN/inf (or values too large for the optimizer's "
                             "dtype) or negative second moments v")
        for dst, src in zip(dsts, srcs):
            self._assign(dst, src)
        self.t = t


class RMSprop(Adam):
    """RMSprop (Tieleman & Hinton 2012): ``v ← ρ v + (1−ρ) g²``, ``p ← p − lr · g / (sqrt(v) + ε)``.

    Same buffers, clipping and checkpoint state as :class:`Adam` (its first moment stays 0).
    """

    kind = "rmsprop"
    betas = _Setting(_no_first_moment)

    def __init__(self, layers_or_params: object, lr: float = 1e-3, rho: float = 0.95, eps: float = 1e-8,
                 clip_norm: float | None = None):
        self.rho = rho
        super().__init__(layers_or_params, lr=lr, betas=self.betas, eps=eps, clip_norm=clip_norm)

    @property
    def rho(self) -> float:
        """ρ, the decay of the mean square: ``betas[1]`` (``betas[0]`` stays 0); may be changed
        between steps like ``lr`` and is checked when set."""
        return self.betas[1]

    @rho.setter
    def rho(self, value: float) -> None:
        """Set ρ (a number in [0, 1)): ``betas`` becomes ``(0, value)``."""
        if not 0 <= check_finite_number(value, "rho") < 1:
            raise ValueError(f"rho must be a number in [0, 1), got {value}")
        self.betas = (0.0, value)

    _update = staticmethod(rmsprop_update)


OPTIMIZERS = {"adam": Adam, "rmsprop": RMSprop}
