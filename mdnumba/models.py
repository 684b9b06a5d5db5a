"""Models composed from layers: a recurrent layer, a per-position linear readout, a sigmoid.

``md``: 2D MD-LSTM over the image. ``horizontal``: every row is an independent
1D LSTM sequence. ``snake``: the image flattened row-major into one sequence.
``lstm``: a 1D LSTM over a sequence task. Each model maps its input to logits of
the target's shape; the loss (``mdnumba.losses``) applies the sigmoid.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from . import config
from ._validate import (
    as_array,
    check_array,
    check_flag,
    check_layout,
    check_shape,
    missing_activations,
    part_seed,
    shared_seed,
)
from .layers import Linear, WavefrontLSTM
from .params import one_thread_at_a_time
from .stack import LayerGroup, Sequential, check_not_refused_midway, mdlstm_stack, run_tracked


def check_dlogits(dlogits: object, want: tuple, dtype: np.dtype, values: bool = True) -> object:
    """``dlogits`` checked as dL/d(logits of shape ``want``), named as the caller knows it (not
    the readout's ``dy``): its shape, and with ``values`` (a NumPy array) its dtype and NaN/inf,
    returned cast to ``dtype``. Models and :class:`mdnumba.train_device.DeviceModel` alike."""
    check_shape(dlogits, want, "dlogits")
    return check_array(dlogits, "dlogits", len(want), want[-1], dtype, "(the logits' shape)") if values \
        else dlogits


class RecurrentReadout(LayerGroup):
    """``logits = Linear(recurrent(reshape_in(x)))`` reshaped back to the target shape."""

    kind = "base"

    def __init__(self, recurrent: WavefrontLSTM | Sequential, out_features: int, seed: int,
                 dtype: npt.DTypeLike):
        self.recurrent = recurrent
        self.readout = Linear(recurrent.out_channels, out_features, seed=part_seed(seed, 1), dtype=dtype)
        self.layers = list(getattr(recurrent, "layers", [recurrent])) + [self.readout]
        self._in_shape: tuple | None = None
        self._inference = False  # the last forward had save=False
        self._refused_at: int | None = None  # 0 / 1: the last forward failed partway in the recurrent
        # part / the readout (stack.refused_midway)

    def _to_recurrent(self, x: np.ndarray) -> np.ndarray:
        return x

    def _from_recurrent(self, y: np.ndarray) -> np.ndarray:
        return y.reshape(self._in_shape[:-1] + (y.shape[-1],))

    @one_thread_at_a_time
    def forward(self, x: np.ndarray, *, save: bool = True) -> np.ndarray:
        """Return logits with the input's shape except the last axis (out_features);
        ``save=False`` (evaluation) keeps no activations for backward."""
        x = as_array(x, "x", "(batch, grid axes.., channels)")  # masked values: refused
        inference = not check_flag(save, "save")
        y = run_tracked(self, self.recurrent,
                        lambda: self.recurrent.forward(self._to_recurrent(x), save=save),
                        lambda h: self.readout.forward(h, save=save))
        self._in_shape, self._inference = x.shape, inference  # a refused x changes nothing
        return self._from_recurrent(y)

    @one_thread_at_a_time
    def backward(self, dlogits: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Back-propagate dL/dlogits through readout and recurrent layer; return dL/dx (None
        with ``input_grad=False``: training needs only the parameter gradients)."""
        input_grad = check_flag(input_grad, "input_grad")
        if self._in_shape is None or self._inference:
            raise missing_activations(inference=self._in_shape is not None)
        check_not_refused_midway(self)
        dlogits = check_dlogits(dlogits, self._in_shape[:-1] + (self.readout.out_features,),
                                self.readout.dtype)
        dy = self.readout.backward(np.reshape(dlogits, self.readout._shape[:-1] + (-1,)))
        dx = self.recurrent.backward(dy, input_grad)
        return None if dx is None else dx.reshape(self._in_shape)



class MDModel(RecurrentReadout):
    """Stacked 2D MD-LSTM (``layers`` layers of ``directions`` scans, ``cell``) + readout over
    (B, H, W, C) images (3D volumes (B, D1, D2, D3, C): :class:`MD3DModel`)."""

    kind = "md"

    ndim = 2

    def __init__(self, in_channels: int = 1, hidden: int = 16, out_features: int = 1, seed: int = 0,
                 dtype: npt.DTypeLike = config.DEFAULT_DTYPE, cell: str = "graves", directions: int = 1,
                 layers: int = 1, device: str = "cpu"):
        seed = shared_seed(seed)
        stack = mdlstm_stack(self.ndim, in_channels, hidden, layers=layers, directions=directions,
                             cell=cell, seed=seed, dtype=dtype, device=device)
        super().__init__(stack if layers > 1 else stack.stages[0], out_features, seed, dtype)


class MD3DModel(MDModel):
    """Stacked 3D MD-LSTM + readout over (B, D1, D2, D3, C) volumes."""

    kind = "md3d"
    ndim = 3


class SequenceModel(MDModel):
    """Stacked 1D LSTM + readout over (B, T, C) sequences (``directions=2``: bidirectional)."""

    kind = "lstm"
    ndim = 1


class HorizontalModel(SequenceModel):
    """Each image row is an independent sequence of length W (batch B·H)."""

    kind = "horizontal"

    def _image(self, x: np.ndarray) -> np.ndarray:
        """``x`` checked as the image it is (the 1D layer would describe the reshaped array); of a
        device array (:class:`mdnumba.train_device.DeviceModel`, which checked its values) the shape."""
        layout = f"(batch, height, width, C) of the {self.kind} model"
        if not isinstance(x, np.ndarray):
            check_layout(x.shape, "x", 4, None, layout)
            return x
        return check_array(x, "x", 4, None, self.readout.dtype, layout)

    def _to_recurrent(self, x):
        B, H, W, C = (x := self._image(x)).shape
        return x.reshape(B * H, W, C)


class SnakeModel(HorizontalModel):
    """The image flattened row-major into one sequence of length H·W."""

    kind = "snake"

    def _to_recurrent(self, x):
        B, H, W, C = (x := self._image(x)).shape
        return x.reshape(B, H * W, C)


MODELS = {cls.kind: cls for cls in (MDModel, MD3DModel, HorizontalModel, SnakeModel, SequenceModel)}


def build_model(kind: str, **kwargs) -> RecurrentReadout:
    """Instantiate a model by name (one of :data:`MODELS`)."""
    if not isinstance(kind, str) or kind not in MODELS:  # a list: unhashable
        raise ValueError(f"unknown model {kind!r}; choose one of {sorted(MODELS)}")
    return MODELS[kind](**kwargs)
