"""Stacks of layers (Graves' MD-LSTM hierarchy): :class:`Sequential` and :class:`BlockSubsample`."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt

from . import config
from ._validate import (
    NonFiniteError,
    as_array,
    check_device,
    check_flag,
    check_floating,
    check_gradient,
    check_positive_int,
    check_shape,
    check_size_values,
    is_device_array,
    missing_activations,
    shared_seed,
)
from .layers import LSTM1D, MDLSTM2D, MDLSTM3D, WavefrontLSTM
from .memory import require_memory
from .params import ParamBuffer, one_thread_at_a_time

_NAMED = {1: LSTM1D, 2: MDLSTM2D, 3: MDLSTM3D}


class BlockSubsample:
    """Non-overlapping ``block^N`` blocks of the grid become channels (space-to-depth).

    ``forward``: ``(B, n_1, .., n_N, C)`` → ``(B, n_1/k, .., n_N/k, k^N·C)`` for
    ``k = block`` and ``N = ndim`` grid axes (2: images, 3: volumes), channel order
    ``(offset_1, .., offset_N, c)``; ``backward`` is the exact inverse (no parameters). Every
    grid side must be divisible by ``block``. Both return new arrays, never views of their input.
    A NumPy input must hold floats, as the layer after it would ask (an integer image is refused
    here, before a stack's later stages run).
    With ``device="cuda"`` (as the layers of ``mdlstm_stack(..., device="cuda")``) a CUDA array
    in gives a device array out (:class:`~mdnumba.backend_cuda.CudaBlockSubsample`), a NumPy
    array NumPy.
    """

    def __init__(self, block: int, ndim: int = 2, device: str = "cpu"):
        self.block = check_positive_int(block, "block")
        self.ndim = check_positive_int(ndim, "ndim")
        if self.block > 1 and self.ndim * math.log2(self.block) >= 63:  # block**ndim: forever, if huge
            raise ValueError(f"block**ndim = {self.block}**{self.ndim} channels per input channel "
                             "is too many; give a smaller block or ndim")
        self.device = check_device(device)
        self._in_shape: tuple | None = None
        self._twin = None  # the CudaBlockSubsample for CUDA arrays (device="cuda"), made once needed
        self._ran_on = None  # the twin when the last forward ran on the device

    def __getstate__(self) -> dict:
        """Pickles and ``copy.deepcopy`` keep the settings, not the last call nor the device
        twin (its index tables live on the GPU; a copy makes its own)."""
        return dict(self.__dict__, _in_shape=None, _twin=None, _ran_on=None)

    def out_channels(self, in_channels: int) -> int:
        """Channels of the output for ``in_channels`` input channels (``in_channels * block**ndim``)."""
        return in_channels * self.block ** self.ndim

    def out_sizes(self, sizes: npt.ArrayLike) -> np.ndarray:
        """The items' sizes after the blocks (of a padded batch, ``Sequential.forward(x, sizes=...)``):
        ``ceil(size / block)``, an item then being what it gives zero-padded to whole blocks (the
        layers leave zeros in the padding)."""
        arr = check_size_values(sizes, positive=True)
        return -(-arr // self.block)

    def _device_twin(self, x: object):
        """The device twin that takes ``x`` when it is a CUDA array (``device="cuda"``), else None."""
        if self.device != "cuda":
            return None
        from .backend_cuda import CudaBlockSubsample
        if not is_device_array(x):
            return None
        if self._twin is None:
            self._twin = CudaBlockSubsample(self.block, self.ndim)
        return self._twin

    def _check_input(self, shape: tuple) -> None:
        """(batch, ``ndim`` grid axes, channels), every grid side divisible by the block."""
        N, k = self.ndim, self.block
        if len(shape) != N + 2:
            hint = f"; for {len(shape) - 2} grid axes use BlockSubsample({k}, ndim={len(shape) - 2})" \
                if len(shape) > 2 else ""
            raise ValueError(f"BlockSubsample({k}) needs a (batch, {N} grid axes, channels) array, "
                             f"got shape {shape}{hint}")
        if 0 in shape:
            raise ValueError(f"BlockSubsample({k}) got an empty axis, shape {shape}; every axis must "
                             "be at least 1")
        if any(n % k for n in shape[1:-1]):
            raise ValueError(f"BlockSubsample({k}) needs every grid side divisible by {k}, got "
                             f"shape {shape}; crop or pad the input (in "
                             f"mdlstm_stack(..., subsample={k}) every side of the stack's input must be "
                             f"divisible by {k}**(layers-1))")

    @one_thread_at_a_time
    def forward(self, x: np.ndarray, *, save: bool = True) -> np.ndarray:
        """Move each block's cells into the channel axis (``save`` is accepted like the layers';
        backward needs only the input's shape, which is always kept)."""
        check_flag(save, "save")
        twin = self._device_twin(x)
        if twin is None:
            x = as_array(x, "x", f"(batch, {self.ndim} grid axes, channels)")
            check_floating(x, "x", None)  # as the layer after it would, before a stack's stage 1 ran
        shape = tuple(x.shape)
        self._check_input(shape)
        y = twin.forward(x) if twin is not None else self._to_blocks(x)
        self._in_shape, self._ran_on = shape, twin
        return y

    def _to_blocks(self, x: np.ndarray) -> np.ndarray:
        """The host op: ``(B, .., n_d, .., C)`` → ``(B, .., n_d/k, .., (.., offset_d, .., c))``."""
        N, k, dims = self.ndim, self.block, x.shape[1:-1]
        split = (x.shape[0],) + sum(((n // k, k) for n in dims), ()) + (x.shape[-1],)
        order = (0,) + tuple(1 + 2 * d for d in range(N)) + tuple(2 + 2 * d for d in range(N)) + (2 * N + 1,)
        y = x.reshape(split).transpose(order)
        return np.array(y, order="C").reshape((x.shape[0],) + tuple(n // k for n in dims) + (-1,))

    @one_thread_at_a_time
    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Inverse of :meth:`forward` applied to the gradient (None with ``input_grad=False``)."""
        input_grad = check_flag(input_grad, "input_grad")
        if self._in_shape is None:
            raise missing_activations()
        if not input_grad:
            return None
        # dx comes as dy does, NumPy or CUDA (as the layers' dx comes as their dh)
        if self._ran_on is not None:  # the last forward ran on the device
            dx = self._ran_on.backward(dy)
            return dx if is_device_array(dy) else dx.copy_to_host()
        dx = self._from_blocks(as_array(dy, "dy", f"(batch, {self.ndim} grid axes, channels)"))
        if self.device == "cuda" and is_device_array(dy):
            from numba import cuda
            return cuda.to_device(dx)
        return dx

    def _from_blocks(self, dy: np.ndarray) -> np.ndarray:
        """The host op of :meth:`backward`: :meth:`_to_blocks` undone, after the layers' checks of
        a gradient (floating point, finite, the shape of the forward's output)."""
        N, k, shape = self.ndim, self.block, self._in_shape
        dims = shape[1:-1]
        check_gradient(dy)  # as the layers: an integer gradient is a mistake, NaN/inf too
        check_shape(dy, (shape[0],) + tuple(n // k for n in dims) + (self.out_channels(shape[-1]),))
        blocks = (shape[0],) + tuple(n // k for n in dims) + (k,) * N + (shape[-1],)
        inverse = (0,) + sum(((1 + d, 1 + N + d) for d in range(N)), ()) + (2 * N + 1,)
        return np.array(np.reshape(dy, blocks).transpose(inverse), order="C").reshape(shape)

    def __repr__(self) -> str:
        extra = (f", ndim={self.ndim}" if self.ndim != 2 else "") + \
            (f", device={self.device!r}" if self.device != "cpu" else "")
        return f"BlockSubsample({self.block}{extra})"


def _check_channels(stages: tuple, have: int | None = None, before: str = "", where: str = "") -> tuple:
    """ValueError where a stage takes other channels than the stage before gives: known from a
    stage's ``in_channels`` (``in_features``) and ``out_channels`` (a method of the input's, as
    :meth:`BlockSubsample.out_channels`), followed into nested Sequentials; a stage without them
    makes the count unknown. Caught at its first forward, the error blamed the input's layout.
    Returns what the last stage gives (None: unknown) and its name, given those before the first."""
    def count(value: object) -> int | None:
        return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else None

    for i, s in enumerate(stages):
        name = f"{where}stage {i} ({type(s).__name__})"
        if isinstance(s, Sequential):
            have, before = _check_channels(s.stages, have, before, f"{name}, its ")
            continue
        want = count(getattr(s, "in_channels", getattr(s, "in_features", None)))
        if want is not None and have is not None and want != have:
            raise ValueError(f"{name} takes {want} channels, but {before} gives {have}")
        out = getattr(s, "out_channels", None)
        if callable(out) and have is not None:  # BlockSubsample's, of the input's; a user's may differ
            try:
                out = out(have)
            except TypeError:
                out = None
        have, before = count(out), name
    return have, before


@contextmanager
def _named_stage(i: int, stage: object, what: str):
    """Re-raise a ValueError/TypeError of ``stage`` (number ``i``) with the stage named first,
    as the same type (e.g. :class:`NonFiniteError`, which the trainers catch)."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        try:
            named = type(exc)(f"stage {i} ({type(stage).__name__}) {what}: {exc}")
        except Exception:  # an exception type with another signature: as it was
            raise exc from None
        raise named from exc


def backward_stages(stages: list, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
    """``dy`` back through ``stages`` in reverse; ``input_grad=False``: the first stage computes
    no dL/dx (None is returned; a stage of the user's whose ``backward`` does not take
    ``input_grad`` is called without it). Host stages or device stages alike."""
    input_grad = check_flag(input_grad, "input_grad")
    for i in range(len(stages) - 1, -1, -1):
        with _named_stage(i, stages[i], "backward"):
            if _takes(stages[i], "input_grad", "backward"):
                dy = stages[i].backward(dy, input_grad or i > 0)
            else:
                dy = stages[i].backward(dy)
    return dy if input_grad else None


class LayerGroup:
    """Base of everything that holds a ``layers`` list of parametrised layers."""

    layers: list

    def zero_grad(self) -> None:
        """Set every gradient of every layer to zero (backward accumulates)."""
        for layer in self.layers:
            layer.zero_grad()

    def free_buffers(self) -> None:
        """Drop every layer's saved activations and scratch buffers (see ``OwnsParams``)."""
        for layer in self.layers:
            getattr(layer, "free_buffers", lambda: None)()

    def saved_bytes(self) -> int:
        """Bytes of the activations every layer keeps for backward."""
        return sum(getattr(layer, "saved_bytes", lambda: 0)() for layer in self.layers)

    def workspace_bytes(self) -> int:
        """Bytes of every buffer the layers keep between calls (saved + scratch)."""
        return sum(getattr(layer, "workspace_bytes", lambda: 0)() for layer in self.layers)

    @property
    def n_params(self) -> int:
        """Number of parameters of all layers together."""
        return sum(layer.params.data.size if isinstance(layer.params, ParamBuffer) else layer.params.size
                   for layer in self.layers)  # a ParamBuffer, or a device twin's flat device array


def _takes(stage: object, name: str, method: str = "forward") -> bool:
    """Whether ``stage.forward`` (or ``method``) takes the keyword ``name`` (``save``, ``sizes``,
    backward's ``input_grad``: the layers here do; a stage of the user's may not), by name or
    through ``**kwargs``."""
    try:
        params = inspect.signature(getattr(stage, method)).parameters
    except (TypeError, ValueError):  # no signature to read
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _all_stages(stages: list):
    """``stages`` and, depth first, the stages of nested groups (a ``Sequential``'s stages, a
    model's parametrised ``layers``)."""
    for s in stages:
        yield s
        children = getattr(s, "stages", None)
        if children is None:
            children = [] if hasattr(s, "params") else getattr(s, "layers", [])
        yield from _all_stages(children)


def refused_midway(group: object) -> bool:
    """Whether the last forward of ``group`` (a :class:`Sequential`, a model) failed partway
    (:func:`left_partial`): its stages then hold activations of two different forwards, and
    ``backward`` is refused (:func:`check_not_refused_midway`) until a forward runs through."""
    return getattr(group, "_refused_at", None) is not None


def left_partial(stage: object, exc: BaseException, first: bool) -> bool:
    """Whether a forward that ``stage`` refused with ``exc`` leaves some stages holding that
    input's activations: any stage after the first; the first one too when the forward was
    interrupted, raised NonFiniteError (NaN/inf in what it computed: it then keeps nothing, while
    the later stages hold the last forward's; NaN in x is refused the same way, conservatively)
    or is a group that failed partway. A first stage refusing x by its other checks changes
    nothing, and backward then uses the last forward."""
    return (not first or refused_midway(stage) or isinstance(exc, NonFiniteError)
            or not isinstance(exc, (ValueError, TypeError)))


def run_tracked(group: object, first_stage: object, first: Callable, rest: Callable) -> object:
    """``rest(first())`` for a forward of ``group`` whose first stage is ``first_stage``, recording
    in ``group._refused_at`` whether it failed partway (:func:`left_partial`; 0: in ``first``,
    1: in ``rest``), or None once it ran through (the models' and CharLM's forwards). One ``try``
    over both: an interrupt between them (``first`` done, ``rest`` not begun) counts as partway."""
    done = False
    try:
        y = first()
        done = True
        y = rest(y)
    except BaseException as exc:  # after first: it holds this x's activations, the rest the last forward's
        if done or left_partial(first_stage, exc, first=True):
            group._refused_at = int(done)
        raise
    group._refused_at = None
    return y


def check_not_refused_midway(group: object) -> None:
    """RuntimeError, before any stage adds a gradient, after a forward :func:`refused_midway`."""
    if refused_midway(group):
        raise RuntimeError(f"backward() after a forward that failed partway (at stage {group._refused_at}): "
                           "some stages hold that input's activations, others the last good forward's; "
                           "run forward(x) again first")


def _check_trainable(stage: object) -> None:
    """TypeError/ValueError unless a stage with ``params`` (which the stack trains) also has
    ``grads`` and ``zero_grad()``, and ``params`` of a kind an optimiser takes: a
    :class:`~mdnumba.params.ParamBuffer`, a device twin's array, or a NumPy array with ``grads``
    an array of its shape (a stage of the user's; its dtype, layout and writability are checked
    by the optimiser that trains it)."""
    name = type(stage).__name__
    if not (hasattr(stage, "grads") and callable(getattr(stage, "zero_grad", None))):
        raise TypeError(f"{name} has params, so the stack trains it: it also needs "
                        "grads (where its backward accumulates) and zero_grad()")
    params, grads = stage.params, stage.grads
    if is_device_array(params):
        return
    if not any(isinstance(params, kind) and isinstance(grads, kind) for kind in (ParamBuffer, np.ndarray)):
        raise TypeError(f"{name}.params and .grads must be two ParamBuffers or two NumPy arrays of one "
                        "shape (an optimiser updates params in place), got "
                        f"{type(params).__name__} and {type(grads).__name__}")
    if isinstance(params, ParamBuffer):
        params, grads = params.data, grads.data
    if params.shape != grads.shape:
        raise ValueError(f"{name}.params {params.shape} and .grads {grads.shape} differ in shape")


class Sequential(LayerGroup):
    """Stages applied in order; ``backward`` runs them in reverse.

    ``layers`` lists the parametrised layers (what :class:`mdnumba.Adam` and checkpoints
    see), in order, those of nested groups (a ``Sequential`` stage) included. A stage may
    appear once: each saves its own activations for ``backward``, so sharing one layer's
    weights between two stages this way would give wrong gradients. A stage with ``params`` (a
    :class:`~mdnumba.params.ParamBuffer`, a NumPy array or a device twin's array) also needs
    ``grads`` of the same kind and shape and ``zero_grad()``; other stages need only ``forward``
    and ``backward``. ``stages`` is a tuple (fixed once built); ``len(seq)`` and ``seq[i]`` give
    the stages, ``seq[i:j]`` a Sequential of them. An error of a stage's ``forward`` or
    ``backward`` names the stage.
    """

    def __init__(self, *stages):
        if not stages:
            raise ValueError("Sequential needs at least one stage")
        for s in stages:
            if isinstance(s, type):  # a class has forward and backward too, unbound
                raise TypeError(f"a Sequential stage must be a layer, got the class {s.__name__}; "
                                f"make one first, e.g. {s.__name__}(...)")
            if not (hasattr(s, "forward") and hasattr(s, "backward")):
                hint = "; pass the stages as arguments: Sequential(*stages)" \
                    if isinstance(s, (list, tuple)) else ""
                raise TypeError(f"a Sequential stage needs forward and backward, got "
                                f"{type(s).__name__}{hint}")
        self._stages = tuple(stages)
        self._inference = False  # the last forward had save=False
        self._refused_at: int | None = None  # the stage that refused the last forward after others ran
        for s in self.layers:
            _check_trainable(s)
        ids = [id(s) for s in _all_stages(self.stages)]
        if len(set(ids)) < len(ids):
            raise ValueError("a stage appears twice in this Sequential: every stage saves its own "
                             "activations for backward, so one layer cannot serve twice; use two layers")
        _check_channels(self.stages)

    @property
    def stages(self) -> tuple:
        """The stages, in order (fixed once built: a new tuple would skip the checks above)."""
        return self._stages

    @stages.setter
    def stages(self, value: object) -> None:
        raise AttributeError("a Sequential's stages are fixed when it is built (each is checked "
                             "then); build a new one: Sequential(*stages)")

    @property
    def layers(self) -> list:
        """The parametrised layers of the stages, in order (those of nested groups included)."""
        out = []
        for s in self.stages:
            out.extend([s] if hasattr(s, "params") else getattr(s, "layers", []))
        return out

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, i: int | slice):
        """Stage ``i``; a slice gives a Sequential of those stages (the same objects)."""
        if not isinstance(i, slice):
            return self.stages[i]
        if not self.stages[i]:
            raise IndexError(f"the slice {i.start}:{i.stop}:{i.step} of a Sequential of "
                             f"{len(self)} stages holds none (a Sequential needs one)")
        return Sequential(*self.stages[i])

    @one_thread_at_a_time
    def forward(self, x: np.ndarray, *, save: bool = True, sizes: npt.ArrayLike | None = None) -> np.ndarray:
        """``x`` through every stage in order; each keeps what its backward needs, or with
        ``save=False`` (inference) nothing: the stages whose ``forward`` takes ``save`` get it.
        ``sizes``: a padded batch (:meth:`mdnumba.WavefrontLSTM.forward`), given to the stages
        that take it; a :class:`BlockSubsample` divides it by its block (a stage's ``out_sizes``)."""
        inference = not check_flag(save, "save")
        if sizes is not None:  # values checked here, before any stage divides them
            sizes = check_size_values(sizes, positive=True)
        done = 0  # stages whose forward ran on this x
        try:  # around the loop, not each call: an interrupt between two stages counts as partway
            for i, stage in enumerate(self.stages):
                kw = {} if save or not _takes(stage, "save") else {"save": False}
                if sizes is not None and _takes(stage, "sizes"):
                    kw["sizes"] = sizes
                with _named_stage(i, stage, "forward"):
                    x = stage.forward(x, **kw)
                    done = i + 1
                    if sizes is not None and hasattr(stage, "out_sizes"):  # BlockSubsample and its twin
                        sizes = stage.out_sizes(sizes)
            self._inference = inference  # set once every stage ran: a refused x changes nothing
        except BaseException as exc:  # the stages before the one that failed hold this x's activations,
            if done or left_partial(self.stages[0], exc, first=True):  # those after it the last forward's
                self._refused_at = min(done, len(self.stages) - 1)
            raise
        self._refused_at = None
        return x

    def out_sizes(self, sizes: npt.ArrayLike) -> npt.ArrayLike:
        """The items' sizes after every stage (a nested stack divides them as its blocks do)."""
        for stage in self.stages:
            if hasattr(stage, "out_sizes"):
                sizes = stage.out_sizes(sizes)
        return sizes

    @one_thread_at_a_time
    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """``dL/dy`` of the last forward back through the stages in reverse, accumulating every
        layer's parameter gradients; returns dL/dx (None with ``input_grad=False``)."""
        if self._inference:  # refused before any stage adds its gradients
            raise missing_activations(inference=True)
        check_not_refused_midway(self)
        return backward_stages(self.stages, dy, input_grad)

    def __repr__(self) -> str:
        return "Sequential(" + ", ".join(map(repr, self.stages)) + ")"


def mdlstm_stack(ndim: int, in_channels: int, hidden: int, *, layers: int = 1, directions: int = 1,
                 cell: str = "graves", subsample: int = 1, seed: int = 0,
                 dtype: npt.DTypeLike = config.DEFAULT_DTYPE,
                 device: str = "cpu") -> Sequential:
    """``layers`` N-D MD-LSTM layers (each ``directions`` scans, outputs concatenated), with a
    :class:`BlockSubsample` of ``subsample`` between consecutive layers when ``subsample > 1``."""
    ndim = check_positive_int(ndim, "ndim")  # not True (1) nor 2.0 for the layers of _NAMED
    check_positive_int(layers, "layers")
    check_positive_int(subsample, "subsample")
    seed = shared_seed(seed)
    stages, channels = [], in_channels
    for k in range(layers):
        if k and subsample > 1:
            stages.append(BlockSubsample(subsample, ndim, device=device))
            channels = stages[-1].out_channels(channels)
        # with an int seed, layer k > 0 draws from the stream (seed, k): no other seed below 2**32
        # has a layer that starts with its weights (layer 0 of seed 1 + 2**32 reads the words
        # (1, 1), as layer 1 of seed 1 does); a bad seed is refused by layer 0, built first
        layer_seed = np.random.SeedSequence([seed, k]) if k and isinstance(seed, (int, np.integer)) else seed
        kw = dict(seed=layer_seed, dtype=dtype, cell=cell, directions=directions, device=device)
        if ndim in _NAMED:
            stages.append(_NAMED[ndim](channels, hidden, **kw))
        else:
            stages.append(WavefrontLSTM(ndim, channels, hidden, **kw))
        channels = stages[-1].out_channels
        if k == 1:  # the weights and gradients of all, before the rest is built: Linux only promises
            # each layer's zeroed buffers, so building them would run for minutes (10**30 layers: forever)
            need = 2 * (stages[0].params.data.nbytes + (layers - 1) * stages[-1].params.data.nbytes)
            require_memory(need, f"a stack of {layers} layers needs", "for its weights and gradients",
                           fix="use fewer layers or a smaller hidden size")
    stack = Sequential(*stages)
    stack.out_channels = channels
    return stack
