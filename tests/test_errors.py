"""Bad input gives a clear error that says what to fix."""

import numpy as np
import pytest

from mdnumba import LSTM1D, MDLSTM2D, Adam, BlockSubsample
from mdnumba.charlm import Embedding
from mdnumba.models import MDModel
from mdnumba.train import TrainConfig, Trainer


@pytest.fixture
def layer():
    return MDLSTM2D(3, 4)


@pytest.mark.parametrize("x,exc,match", [
    (np.zeros((4, 4, 3), np.float32), ValueError, "4 dimensions"),
    (np.zeros((2, 4, 4, 2), np.float32), ValueError, "expects 3"),
    (np.zeros((0, 4, 4, 3), np.float32), ValueError, "empty axis"),
    (np.zeros((2, 0, 4, 3), np.float32), ValueError, "empty axis"),
    (np.zeros((2, 4, 4, 3), np.int64), TypeError, "floating-point"),
    (np.zeros((2, 4, 4, 3), bool), TypeError, "floating-point"),
    ("not an array", TypeError, "NumPy array"),
])
def test_forward_rejects(layer, x, exc, match):
    with pytest.raises(exc, match=match):
        layer.forward(x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_forward_rejects_non_finite(layer, bad):
    x = np.zeros((1, 3, 3, 3), np.float32)
    x[0, 1, 2, 0] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer.forward(x)


@pytest.mark.parametrize("make,dy", [
    (MDModel, np.zeros((1, 3, 3, 1))),
    (lambda: Embedding(5, 3), np.zeros((2, 3))),
    (lambda: BlockSubsample(2), np.zeros((1, 2, 2, 4))),
])
def test_backward_before_forward_says_so(make, dy):
    with pytest.raises(RuntimeError, match="before forward"):
        make().backward(dy)


def test_trainer_without_folder_cannot_save():
    with pytest.raises(ValueError, match="no output folder"):
        Trainer(TrainConfig(steps=1)).save()


def test_backward_errors(layer):
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((1, 3, 3, 4), np.float32))
    layer.forward(np.zeros((1, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="shape of the forward output"):
        layer.backward(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        layer.backward(np.full((1, 3, 3, 4), np.nan, np.float32))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(directions=3), ValueError, "directions must be 1 or 4"),
    (dict(directions=2), ValueError, "directions must be 1 or 4"),
    (dict(cell="lstm"), ValueError, "unknown cell"),
    (dict(forget_bias=float("nan")), ValueError, "forget_bias must be a finite"),
    (dict(dtype=np.int32), TypeError, "float32 or float64"),
    (dict(dtype=np.float16), TypeError, "float32 or float64"),
])
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MDLSTM2D(3, 4, **kwargs)


@pytest.mark.parametrize("args,exc", [((0, 4), ValueError), ((3, 0), ValueError),
                                      ((3.5, 4), TypeError), ((3, -1), ValueError)])
def test_size_errors(args, exc):
    with pytest.raises(exc):
        MDLSTM2D(*args)
    with pytest.raises(exc):
        LSTM1D(*args)


def test_lstm1d_rejects_images():
    with pytest.raises(ValueError, match=r"\(batch, time, C\)"):
        LSTM1D(3, 4).forward(np.zeros((1, 2, 2, 3), np.float32))


def test_adam_errors():
    layer = LSTM1D(2, 2)
    with pytest.raises(ValueError, match="lr"):
        Adam(layer, lr=0)
    with pytest.raises(ValueError, match="clip_norm"):
        Adam(layer, clip_norm=-1)
    with pytest.raises(TypeError, match="Adam needs"):
        Adam(42)
    with pytest.raises(ValueError, match="no parameters"):
        Adam([])
    opt = Adam(layer)
    with pytest.raises(ValueError, match="lacks"):
        opt.load_state_dict({"t": 1})
    layer.grads.data[0] = np.nan
    with pytest.raises(FloatingPointError, match="not finite"):
        opt.step()
