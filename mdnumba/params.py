"""One flat buffer with named views (llm.c's ``params_memory``).

Parameters, gradients and optimiser moments of a layer all use the same
:class:`ParamLayout`, so an optimiser works on whole flat buffers and the names
only matter to people and checkpoints.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt


class ParamLayout:
    """Ordered ``name -> shape`` table with offsets into one flat vector."""

    def __init__(self, shapes: Mapping[str, tuple]):
        self.shapes = {k: tuple(int(n) for n in v) for k, v in shapes.items()}
        self.offsets = {}
        off = 0
        for name, shape in self.shapes.items():
            self.offsets[name] = off
            off += math.prod(shape)  # Python ints: no silent int64 overflow
        if off >= 2 ** 40:
            raise ValueError(f"{off:,} parameters ({dict(self.shapes)}) cannot be allocated; "
                             "use a smaller hidden size or fewer input channels (features)")
        self.size = off

    def new(self, dtype: npt.DTypeLike) -> ParamBuffer:
        """A zero-filled :class:`ParamBuffer` of this layout."""
        return ParamBuffer(self, np.zeros(self.size, dtype=dtype))


class ParamBuffer(Mapping):
    """A flat vector ``data`` plus named views into it (``buf["W"]`` or ``buf.W``).

    Writing into a view, or assigning to it (``buf.W = w``, ``buf.data = flat``), writes into
    ``data``: the value must have the view's shape, or be a scalar. Iterating gives each
    parameter once (the layout's names); :meth:`add_alias` adds derived views that are reached
    by name only (e.g. ``U_up`` = one slice of ``U``).
    """

    def __init__(self, layout: ParamLayout, data: np.ndarray):
        if data.ndim != 1 or data.size != layout.size:
            raise ValueError(f"flat buffer must have shape ({layout.size},), got {data.shape}")
        self.layout = layout
        self.data = data
        self._views = {
            name: data[off:off + math.prod(shape)].reshape(shape)
            for (name, shape), off in zip(layout.shapes.items(), layout.offsets.values())
        }

    def add_alias(self, name: str, view: np.ndarray) -> None:
        """Register a derived view; it must share memory with ``data``."""
        if not np.shares_memory(view, self.data):
            raise ValueError(f"alias {name!r} is not a view into the flat buffer")
        self._views[name] = view

    def __getstate__(self) -> dict:
        """Pickle and ``copy.deepcopy`` keep one buffer: ``data``, the layout and where each alias
        lies in ``data``; the views are rebuilt from it. (NumPy copies every view on its own,
        which would cut the views loose from ``data``: an optimiser updating ``data`` would no
        longer move the weights the kernels read.)"""
        base, size = self.data.__array_interface__["data"][0], self.data.itemsize
        aliases = {name: ((v.__array_interface__["data"][0] - base) // size, v.shape, v.strides)
                   for name, v in self._views.items() if name not in self.layout.shapes}
        return dict(layout=self.layout, data=self.data, aliases=aliases)

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["layout"], state["data"])
        self._add_aliases(state["aliases"])

    def writable_copy(self) -> ParamBuffer:
        """A copy in a writable buffer of its own, with the same views and aliases."""
        copy = ParamBuffer(self.layout, np.array(self.data, copy=True))
        copy._add_aliases(self.__getstate__()["aliases"])
        return copy

    def _add_aliases(self, aliases: dict) -> None:
        """The aliases of :meth:`__getstate__` (name -> offset, shape, strides in ``data``)."""
        for name, (offset, shape, strides) in aliases.items():
            self.add_alias(name, np.lib.stride_tricks.as_strided(self.data[offset:], shape, strides))

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self._views[name]
        except KeyError:
            raise KeyError(f"no parameter {name!r}; the names are {', '.join(self._views)}") from None

    @property
    def aliases(self) -> list[str]:
        """The names of the derived views (not parameters of their own)."""
        return [name for name in self._views if name not in self.layout.shapes]

    def __getattr__(self, name: str) -> np.ndarray:
        views = self.__dict__.get("_views")
        if views is not None and name in views:
            return views[name]
        if views is None or name.startswith("__"):  # (copy and pickle probe for special methods)
            raise AttributeError(name)
        raise AttributeError(f"no parameter {name!r}; the names are {', '.join(views)}")

    _OWN = ("layout", "data", "_views")

    def __setattr__(self, name: str, value: object) -> None:
        """``buf.W = w`` writes ``w`` into the flat buffer, like ``buf.W[...] = w``, and so does
        ``buf.data = flat`` (an attribute set beside the view, or a new ``data`` array, would
        leave the weights the kernels read unchanged)."""
        if name == "data" and "data" in self.__dict__:
            self._copy_into(self.data, "data", value)
        elif name in self._OWN:
            if name in self.__dict__:
                raise AttributeError(f"a parameter buffer's {name} cannot be replaced")
            object.__setattr__(self, name, value)
        else:
            self._assign(name, value, AttributeError)

    def __setitem__(self, name: str, value: object) -> None:
        """``buf["W"] = w``: as ``buf.W = w``."""
        self._assign(name, value, KeyError)

    def _assign(self, name: str, value: object, missing: type[Exception]) -> None:
        view = self._views.get(name)
        if view is None:
            raise missing(f"no parameter {name!r}; the names are {', '.join(self._views)}")
        self._copy_into(view, name, value)

    @staticmethod
    def _copy_into(view: np.ndarray, name: str, value: object) -> None:
        """``view[...] = value`` for a value of the view's shape or a scalar, without a silent
        broadcast (a one-direction matrix copied into every direction) or overflow to inf. The
        value is cast in a copy first, so a refused one leaves the weights as they were."""
        shape = np.shape(value)
        if shape and shape != view.shape:
            raise ValueError(f"cannot assign a {shape} array to {name} {view.shape}: give the shape "
                             "of the view, or a scalar")
        try:
            staged = np.empty_like(view)
            with np.errstate(over="raise"):
                np.copyto(staged, value, casting="same_kind")
            np.copyto(view, staged)
        except (FloatingPointError, OverflowError):  # OverflowError: a Python int beyond float64
            raise ValueError(f"the values given for {name} overflow {view.dtype}") from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"cannot assign to {name} {view.shape} {view.dtype}: {exc}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.shapes)

    def __len__(self) -> int:
        return len(self.layout.shapes)

    def __repr__(self) -> str:
        names = ", ".join(f"{k}{tuple(v.shape)}" for k, v in self._views.items())
        return f"ParamBuffer({names}; {self.data.size} x {self.data.dtype})"


#: ``id`` of each object inside a call guarded by :func:`one_thread_at_a_time` -> (thread, call): by
#: id, not an attribute of the object, so that a copy made during a call is free (and a forked
#: child, whose other threads are gone, starts with none)
_RUNNING: dict[int, tuple[int, object]] = {}
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_RUNNING.clear)


def one_thread_at_a_time(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` of a layer or stack, refused (RuntimeError) while another thread runs one so
    decorated on the same object: it holds the activations and buffers of its last call, so two
    threads' calls would mix them and give wrong results without an error. The same thread may
    nest calls; the guard is released however the call ends."""
    @functools.wraps(method)
    def run(self, *args, **kw):
        token, key = (threading.get_ident(), object()), id(self)
        try:
            owner = _RUNNING.setdefault(key, token)  # atomic: one call's token wins
            if owner[0] != token[0]:
                raise RuntimeError(f"this {type(self).__name__} is running a forward or backward in "
                                   "another thread; it holds the activations of its last call, so give "
                                   "each thread its own (copy.deepcopy)")
            return method(self, *args, **kw)
        finally:
            if _RUNNING.get(key) is token:  # the outermost call of the owning thread
                del _RUNNING[key]
    return run


class OwnsParams:
    """Base of a layer with its own ``params`` and ``grads`` buffers, bound once: rebinding one
    (``layer.params = other.params``) would skip every shape check and share weights unseen.

    ``_BUFFERS`` names the attributes holding activations saved for backward and scratch
    buffers, with the factory of their empty value: :meth:`free_buffers` empties them, and
    pickles and ``copy.deepcopy`` leave them out (a copy runs ``forward`` before ``backward``).
    """

    _BUFFERS: dict = {}
    #: settings fixed when the layer is built: the weights' shapes, the kernels and the saved
    #: activations follow them, so a new value would compute with the old ones (or fail deep inside)
    _FIXED: tuple = ("layout", "dtype", "device")

    def zero_grad(self) -> None:
        """Set every gradient to zero (backward accumulates)."""
        self.grads.data[...] = 0

    def free_buffers(self) -> None:
        """Drop the activations and scratch buffers kept between calls (``backward`` then needs a
        new ``forward``); the next ``forward`` allocates them again. NumPy gets the memory back;
        the process keeps up to 512 MiB of it for reuse unless ``MDNUMBA_MALLOC_TUNING=0``
        (:func:`mdnumba.config.tune_malloc`)."""
        for name, empty in self._BUFFERS.items():
            setattr(self, name, empty())

    def saved_bytes(self) -> int:
        """Bytes of the arrays kept between calls for ``backward`` (0 before ``forward`` and after
        :meth:`free_buffers`; not the scratch buffers of ``_work``)."""
        return sum(a.nbytes for a in self._held_arrays(exclude=("_work",)))

    def workspace_bytes(self) -> int:
        """Bytes of every buffer kept between calls: the saved activations and the scratch
        buffers (``_work``), each array once."""
        return sum(a.nbytes for a in self._held_arrays())

    def _held_arrays(self, exclude: tuple = ()) -> list:
        """The distinct arrays of the ``_BUFFERS`` attributes (dict values too) but ``exclude``."""
        held = [getattr(self, name, None) for name in self._BUFFERS if name not in exclude]
        arrays = [a for h in held for a in (h.values() if isinstance(h, dict) else [h])]
        return list({id(a): a for a in arrays if isinstance(a, np.ndarray)}.values())

    def _workspace(self, name: str, shape: tuple, zeroed: bool = False) -> np.ndarray:
        """A scratch/activation buffer of ``self._work`` (a layer with ``"_work"`` in its
        ``_BUFFERS``) reused across calls of the same shape (new ones hold zeros if ``zeroed``,
        else whatever the memory held), in the layer's dtype.

        Re-allocating tens of MB per step costs more in page faults than the
        kernels themselves; buffers are kept while the input shape is unchanged.
        """
        buf = self._work.get(name)
        if buf is None or buf.shape != tuple(shape):
            buf = self._work[name] = (np.zeros if zeroed else np.empty)(shape, dtype=self.dtype)
        return buf

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update({name: empty() for name, empty in self._BUFFERS.items()})
        return state

    def __setstate__(self, state: dict) -> None:
        """A copy unpickled from read-only memory (joblib's memory-mapped arguments, pickle
        protocol 5 with read-only buffers) reads its weights there, shared and read-only, and
        gets gradients of its own: ``backward`` accumulates into them."""
        grads = state.get("grads")
        if isinstance(grads, ParamBuffer) and not grads.data.flags.writeable:
            state = dict(state, grads=grads.writable_copy())
        self.__dict__.update(state)

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("params", "grads") and name in self.__dict__:
            raise AttributeError(f"a layer's {name} cannot be replaced; copy values into it: "
                                 f"layer.{name}.data = other.{name}.data, or by name (layer.{name}.W = w)")
        if name in self._FIXED and name in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.{name} is fixed when the layer is built (its "
                                 f"weights and kernels follow it); build a new layer with the {name} you "
                                 "want and copy the weights that still fit by name")
        super().__setattr__(name, value)
