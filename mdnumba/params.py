"""One flat buffer with named views (llm.c's ``params_memory``).

Parameters, gradients and optimiser moments of a layer all use the same
:class:`ParamLayout`, so an optimiser works on whole flat buffers and the names
only matter to people and checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

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
                             "use a smaller hidden size")
        self.size = off

    def new(self, dtype: npt.DTypeLike) -> ParamBuffer:
        """A zero-filled :class:`ParamBuffer` of this layout."""
        return ParamBuffer(self, np.zeros(self.size, dtype=dtype))


class ParamBuffer(Mapping):
    """A flat vector ``data`` plus named views into it (``buf["W"]`` or ``buf.W``).

    Writing into a view, or assigning to it (``buf.W = w``), writes into ``data``;
    ``aliases`` adds derived views (e.g. ``U_up`` = one slice of ``U``).
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
        for name, (offset, shape, strides) in state["aliases"].items():
            self.add_alias(name, np.lib.stride_tricks.as_strided(self.data[offset:], shape, strides))

    def __getitem__(self, name: str) -> np.ndarray:
        return self._views[name]

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.__dict__["_views"][name]
        except KeyError:
            raise AttributeError(name) from None

    _OWN = ("layout", "data", "_views")

    def __setattr__(self, name: str, value: object) -> None:
        """``buf.W = w`` writes ``w`` into the flat buffer, like ``buf.W[...] = w`` (an attribute
        set beside the view would hide it and leave the weights the kernels read unchanged)."""
        if name in self._OWN:
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
        try:
            np.copyto(view, value, casting="same_kind")
        except (ValueError, TypeError) as exc:
            raise ValueError(f"cannot assign to {name} {view.shape} {view.dtype}: {exc}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    def __repr__(self) -> str:
        names = ", ".join(f"{k}{tuple(v.shape)}" for k, v in self._views.items())
        return f"ParamBuffer({names}; {self.data.size} x {self.data.dtype})"
