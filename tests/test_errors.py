"""Bad input gives a clear error that says what to fix."""

import copy
import pickle
import re

import numpy as np
import pytest
from gradcheck import large_input_weights

from mdnumba import (
    LSTM1D,
    MDLSTM2D,
    Adam,
    BlockSubsample,
    GridLSTM2D,
    Linear,
    NonFiniteError,
    RMSprop,
    pad_batch,
)
from mdnumba.charlm import Embedding
from mdnumba.models import MDModel, build_model
from mdnumba.stack import Sequential, mdlstm_stack
from mdnumba.train import TrainConfig, Trainer


@pytest.fixture
def layer():
    return MDLSTM2D(3, 4)


@pytest.mark.parametrize("x,exc,match", [
    (np.zeros((4, 4, 3), np.float32), ValueError, "4 dimensions"),
    (np.zeros((2, 4, 4, 2), np.float32), ValueError, r"expects 3 \(batch, height, width, C\)$"),
    (np.zeros((2, 3, 5, 6), np.float32), ValueError,  # PyTorch's (B, C, H, W)
     r"expects 3 \(batch, height, width, C\); channels go last: x.transpose\(0, 2, 3, 1\) if axis 1 "
     "holds them"),
    (np.zeros((0, 4, 4, 3), np.float32), ValueError, "empty axis"),
    (np.zeros((2, 0, 4, 3), np.float32), ValueError, "empty axis"),
    (np.zeros((2, 4, 4, 3), np.int64), TypeError, "floating-point"),
    (np.zeros((2, 4, 4, 3), bool), TypeError, "floating-point"),
    ("not an array", TypeError, "NumPy array"),
    ([[[[0.0] * 3] * 4] * 4, [[[0.0] * 3] * 4]], ValueError, r"x must be an array of shape \(batch, "),
])
def test_forward_rejects(layer, x, exc, match):
    with pytest.raises(exc, match=match):
        layer.forward(x)


def test_int_input_is_told_the_layers_dtype():
    with pytest.raises(TypeError, match=r"convert with np.asarray\(x, dtype=np.float64\)$"):
        MDLSTM2D(3, 4, dtype=np.float64).forward(np.zeros((2, 4, 4, 3), np.int64))


def test_masked_values_are_refused_not_read():
    """A masked array's masked cells would be read as their values: refused, by the layers,
    pad_batch and BlockSubsample; a masked array with nothing masked is an array like any other."""
    m = np.ma.masked_array(np.ones((1, 2, 2, 3)), mask=False)
    assert MDLSTM2D(3, 4).forward(m).shape == (1, 2, 2, 4)
    m[0, 0, 0, 0] = np.ma.masked
    sub = BlockSubsample(2)
    sub.forward(np.ones((1, 2, 2, 3)))  # backward read the masked values of dy (as the data)
    dy = np.ma.masked_array(np.ones((1, 1, 1, 12)), mask=False)
    dy[0, 0, 0, 5] = np.ma.masked
    for call, name in ((lambda: MDLSTM2D(3, 4).forward(m), "x"), (lambda: pad_batch([m[0]]), r"items\[0\]"),
                       (lambda: BlockSubsample(2).forward(m), "x"),
                       (lambda: sub.backward(dy), "dy")):
        with pytest.raises(ValueError, match=rf"^{name} is a masked array with 1 masked value, .*"
                                             rf"\({name}.filled\(0\)\)"):
            call()


def test_a_gradient_that_is_not_an_array_is_a_type_error():
    """``None`` or a string as dy: 'must have shape (4, 2), got ()' was a ValueError."""
    lin, sub = Linear(3, 2), BlockSubsample(2)
    lin.forward(np.ones((4, 3), np.float32))
    sub.forward(np.ones((1, 2, 2, 1)))
    for stage in (lin, sub):
        for dy in (None, "dy", {}):
            match = f"^dy must be a.* array of shape .*, got {type(dy).__name__}$"
            with pytest.raises(TypeError, match=match):
                stage.backward(dy)


@pytest.mark.parametrize("kind,shape", [("md", (1, 4, 4, 1)), ("horizontal", (1, 4, 4, 1)),
                                        ("lstm", (1, 4, 2))])
def test_models_and_predict_refuse_masked_values(kind, shape):
    """Models and Trainer.predict converted x before the layers' check, dropping the mask."""
    m = np.ma.masked_array(np.ones(shape), mask=False)
    m[(0,) * len(shape)] = np.ma.masked
    with pytest.raises(ValueError, match="^x is a masked array with 1 masked value"):
        build_model(kind, in_channels=shape[-1]).forward(m)
    if kind == "md":
        with pytest.raises(ValueError, match="^x is a masked array"):
            Trainer(TrainConfig(size=4, steps=1)).predict(m)


def test_a_memoryview_is_an_array_like():
    x = np.random.default_rng(0).random((1, 2, 3, 3))
    layer = MDLSTM2D(3, 4, dtype=np.float64)
    np.testing.assert_array_equal(layer.forward(memoryview(x)), layer.forward(x))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_forward_rejects_non_finite(layer, bad):
    x = np.zeros((1, 3, 3, 3), np.float32)
    x[0, 1, 2, 0] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer.forward(x)


@pytest.mark.parametrize("make,x,name", [
    (lambda: MDLSTM2D(1, 4), np.ones((1, 3, 3, 1)), "b"),
    (lambda: LSTM1D(2, 3), np.ones((1, 4, 2)), "U"),
    (lambda: Linear(3, 2), np.ones((4, 3)), "W"),
    (lambda: GridLSTM2D(4, 2), np.ones((1, 3, 4)), "U_depth"),
    (lambda: Embedding(5, 3), np.array([[0, 4]]), "W"),
])
def test_forward_rejects_non_finite_weights(make, x, name):
    """Weights set to NaN by hand (or by a diverged update of the user's own) are named, not
    turned into an all-NaN output."""
    layer = make()
    layer.params[name].flat[0] = np.nan
    with pytest.raises(ValueError, match=f"the layer's weights {name} hold NaN or infinite values"):
        layer.forward(x)
    layer.params[name].flat[0] = 0.0
    assert np.isfinite(layer.forward(x)).all()


@pytest.mark.parametrize("make,dy", [
    (MDModel, np.zeros((1, 3, 3, 1))),
    (lambda: Embedding(5, 3), np.zeros((2, 3))),
    (lambda: BlockSubsample(2), np.zeros((1, 2, 2, 4))),
])
def test_backward_before_forward_says_so(make, dy):
    with pytest.raises(RuntimeError, match="no saved activations; run forward"):
        make().backward(dy)


def test_trainer_without_folder_cannot_save():
    with pytest.raises(ValueError, match="no output folder"):
        Trainer(TrainConfig(steps=1)).save()


def test_backward_errors(layer):
    with pytest.raises(RuntimeError, match="no saved activations; run forward"):
        layer.backward(np.zeros((1, 3, 3, 4), np.float32))
    layer.forward(np.zeros((1, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"dh must have shape .* \(the forward output.s\)"):
        layer.backward(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        layer.backward(np.full((1, 3, 3, 4), np.nan, np.float32))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(directions=3), ValueError, "directions must be 1 or 4"),
    (dict(directions=2), ValueError, "directions must be 1 or 4"),
    (dict(cell="lstm"), ValueError, "unknown cell"),
    (dict(forget_bias=float("nan")), ValueError, "forget_bias must be finite"),
    (dict(forget_bias="1"), TypeError, "forget_bias must be a number"),
    (dict(forget_bias=1e39), ValueError, r"^forget_bias=1e\+39 overflows the layer's float32$"),
    (dict(directions=4.0), ValueError, "directions must be 1 or 4"),
    (dict(directions=True), ValueError, "directions must be 1 or 4"),
    (dict(dtype=np.int32), TypeError, "float32 or float64"),
    (dict(dtype=np.float16), TypeError, "float32 or float64"),
])
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MDLSTM2D(3, 4, **kwargs)


def test_dtype_none_is_the_default():
    """``dtype=None`` means the default float32, not NumPy's reading of None (float64)."""
    for layer in (MDLSTM2D(3, 4, dtype=None), LSTM1D(3, 4, dtype=None), GridLSTM2D(3, 4, dtype=None)):
        assert layer.dtype == np.float32 and layer.params.data.dtype == np.float32


@pytest.mark.parametrize("args,exc", [((0, 4), ValueError), ((3, 0), ValueError),
                                      ((3.5, 4), TypeError), ((3, -1), ValueError),
                                      ((True, 4), TypeError), ((2, True), TypeError)])
def test_size_errors(args, exc):
    with pytest.raises(exc):
        MDLSTM2D(*args)
    with pytest.raises(exc):
        LSTM1D(*args)


def test_other_constructor_errors():
    with pytest.raises(ValueError, match="forget_bias must be finite"):
        GridLSTM2D(4, 2, forget_bias=np.nan)
    with pytest.raises(ValueError, match="directions must be 1 or 2"):
        LSTM1D(2, 3, directions=True)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="subsample must be >= 1"):
            mdlstm_stack(2, 1, 3, layers=2, subsample=bad)


def test_arguments_after_the_sizes_are_keyword_only():
    """``LSTM1D(1, 8, 2)`` would have meant seed=2 and ``MDLSTM2D(1, 8, 4)`` directions=4."""
    for make in (lambda: LSTM1D(1, 8, 2), lambda: MDLSTM2D(1, 8, 4), lambda: Linear(2, 3, 1),
                 lambda: GridLSTM2D(4, 2, 7)):
        with pytest.raises(TypeError, match="positional argument"):
            make()


@pytest.mark.parametrize("x,exc,match", [
    (np.zeros((2, 3), np.int64), TypeError, "floating-point"),
    (np.zeros((2, 3), np.complex64), TypeError, "floating-point"),
    (np.full((2, 3), np.nan), ValueError, "NaN"),
    (np.zeros((2, 4)), ValueError, "expects 3"),
    (np.float32(2), ValueError, r"x must have at least 1 dimension \(..., in_features\), got the scalar"),
    (np.array(2.0), ValueError, "at least 1 dimension"),
])
def test_linear_checks_its_input(x, exc, match):
    with pytest.raises(exc, match=match):
        Linear(3, 2).forward(x)


def test_float64_input_beyond_float32_range_says_so(layer):
    x = np.zeros((1, 2, 2, 3))
    x[0, 0, 0, 0] = 1e39
    with pytest.raises(ValueError, match="beyond float32"):
        layer.forward(x)


@pytest.mark.parametrize("make,x,dy", [
    (lambda: MDModel(hidden=3), np.zeros((2, 3, 4, 1), np.float32), np.zeros((2, 4, 3, 1), np.float32)),
    (lambda: BlockSubsample(2), np.zeros((1, 2, 4, 3)), np.zeros((1, 2, 1, 12))),
])
def test_backward_rejects_a_gradient_of_the_right_size_but_wrong_shape(make, x, dy):
    m = make()
    m.forward(x)
    with pytest.raises(ValueError, match="must have shape"):
        m.backward(dy)


def test_grid_lstm_backward_without_input_grad():
    grid = GridLSTM2D(3, 2, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((2, 4, 3))
    dh = np.ones((2, 4, 3))
    grid.forward(x)
    dx = grid.backward(dh)
    grads = grid.grads.data.copy()
    grid.zero_grad()
    grid.forward(x)
    assert grid.backward(dh, input_grad=False) is None and dx.shape == x.shape
    np.testing.assert_array_equal(grid.grads.data, grads)


@pytest.mark.parametrize("name,value,match", [
    ("MDNUMBA_THREADS_PER_BLOCK", "abc", "use an integer in"),
    ("MDNUMBA_THREADS_PER_BLOCK", "0", "use an integer in"),
    ("MDNUMBA_FASTMATH", "maybe", "use 1 or 0"),
    ("MDNUMBA_CUDA_PATH", "fast", "use one of auto, cooperative, per-diagonal"),
    ("MDNUMBA_VECTOR_BYTES", "16", "use one of 32, 64"),
    ("MDNUMBA_CUDA_SKIP", "sum,cells", "use a comma list of sum, cell, or leave it unset"),
])
def test_bad_environment_settings(monkeypatch, name, value, match):
    from mdnumba.config import (
        CUDA_PATHS,
        CUDA_SKIP_STAGES,
        VECTOR_CHOICES,
        env_choice,
        env_flag,
        env_int,
        env_subset,
    )
    monkeypatch.setenv(name, value)
    read = {"MDNUMBA_FASTMATH": lambda: env_flag(name, True),
            "MDNUMBA_THREADS_PER_BLOCK": lambda: env_int(name, 1),
            "MDNUMBA_CUDA_PATH": lambda: env_choice(name, "auto", CUDA_PATHS),
            "MDNUMBA_VECTOR_BYTES": lambda: env_choice(name, "64", VECTOR_CHOICES),
            "MDNUMBA_CUDA_SKIP": lambda: env_subset(name, CUDA_SKIP_STAGES)}[name]
    with pytest.raises(ValueError, match=f"{name}=.*{match}"):
        read()


def test_numba_cudas_low_occupancy_warning_is_off_unless_asked_for():
    """numba-cuda warns at every launch of fewer than 128 blocks, which mdnumba's per-diagonal
    sweeps and small layers make by design; a setting of the user's is kept."""
    import os
    import subprocess
    import sys
    code = "import os, mdnumba, numba.core.config as c; print(c.CUDA_LOW_OCCUPANCY_WARNINGS)"
    for given, want in ((None, "0"), ("1", "1")):
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS"}
        if given is not None:
            env["NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS"] = given
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert res.returncode == 0 and res.stdout == want + "\n", res.stderr


@pytest.mark.parametrize("code", ["import mdnumba", "from mdnumba.cli.main import main; main()"])
def test_a_bad_environment_setting_is_one_line_not_a_traceback(code):
    """Raised while mdnumba is imported, where the mdnumba command cannot catch it; a program
    that catches it gets a ValueError."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, MDNUMBA_FASTMATH="2")
    res = subprocess.run([sys.executable, "-c", code, "info"], env=env, capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr == "Error: environment variable MDNUMBA_FASTMATH='2': use 1 or 0\n"
    catch = "try:\n    import mdnumba\nexcept ValueError as e:\n    print(type(e).__name__)"
    res = subprocess.run([sys.executable, "-c", catch], env=env, capture_output=True, text=True)
    assert res.stdout == "ConfigError\n" and res.returncode == 0
    for value in ("0", "two", "²"):  # read by Numba on import: checked first ("²".isdigit())
        env = dict(os.environ, NUMBA_NUM_THREADS=value)
        res = subprocess.run([sys.executable, "-c", code, "info"], env=env, capture_output=True, text=True)
        assert res.returncode == 1 and res.stderr == (
            f"Error: environment variable NUMBA_NUM_THREADS={value!r}: use an integer >= 1 (the CPU "
            "threads; unset it to use every core)\n")
    res = subprocess.run([sys.executable, "-c", "import mdnumba; raise KeyError(3)"], capture_output=True,
                         text=True)
    assert "Traceback" in res.stderr  # other errors keep Python's display
    other = catch.replace("print(type(e).__name__)", "pass") + "\nraise ValueError('mine')"
    res = subprocess.run([sys.executable, "-c", other], env=env, capture_output=True, text=True)
    assert "Traceback" in res.stderr and "ValueError: mine" in res.stderr  # even after the hook


def test_threads_per_block_at_most_256():
    """512 threads of the sweep kernels (~250 registers each in float64) do not fit an SM."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, MDNUMBA_THREADS_PER_BLOCK="512")
    res = subprocess.run([sys.executable, "-c", "import mdnumba"], env=env, capture_output=True, text=True)
    assert res.stderr == ("Error: environment variable MDNUMBA_THREADS_PER_BLOCK='512': "
                          "use an integer in [1, 256]\n")


def test_environment_choice(monkeypatch):
    from mdnumba.config import CUDA_PATHS, env_choice
    for raw, want in ((" cooperative ", "cooperative"), ("per-diagonal", "per-diagonal"), ("", "auto")):
        monkeypatch.setenv("MDNUMBA_CUDA_PATH", raw)
        assert env_choice("MDNUMBA_CUDA_PATH", "auto", CUDA_PATHS) == want


def test_environment_subset(monkeypatch):
    """A comma list, any case and spacing, in the choices' order; empty or unset: none."""
    from mdnumba.config import CUDA_SKIP_STAGES, env_subset
    for raw, want in ((" Cell , sum", ("sum", "cell")), ("cell", ("cell",)), ("", ()), (",", ())):
        monkeypatch.setenv("MDNUMBA_CUDA_SKIP", raw)
        assert env_subset("MDNUMBA_CUDA_SKIP", CUDA_SKIP_STAGES) == want
    monkeypatch.delenv("MDNUMBA_CUDA_SKIP")
    assert env_subset("MDNUMBA_CUDA_SKIP", CUDA_SKIP_STAGES) == ()


def test_environment_flag_words(monkeypatch):
    from mdnumba.config import env_flag
    for word, want in (("yes", True), ("ON", True), ("0", False), ("false", False), ("", True)):
        monkeypatch.setenv("MDNUMBA_FASTMATH", word)
        assert env_flag("MDNUMBA_FASTMATH", True) is want


def test_lstm1d_rejects_images():
    with pytest.raises(ValueError, match=r"\(batch, time, C\)"):
        LSTM1D(3, 4).forward(np.zeros((1, 2, 2, 3), np.float32))


def test_adam_errors():
    layer = LSTM1D(2, 2)
    with pytest.raises(ValueError, match="lr"):
        Adam(layer, lr=0)
    with pytest.raises(ValueError, match="clip_norm"):
        Adam(layer, clip_norm=-1)
    for kw in (dict(lr=np.inf), dict(eps=0), dict(eps=-1e-8), dict(lr=np.nan)):
        with pytest.raises(ValueError, match=next(iter(kw)) + " must be .*finite"):
            Adam(layer, **kw)
    for kw in (dict(lr="0.1"), dict(lr=True), dict(eps="1e-8"), dict(clip_norm="1")):
        with pytest.raises(TypeError, match=next(iter(kw)) + " must be a number"):
            Adam(layer, **kw)
    with pytest.raises(ValueError, match=r"rho must be a number in \[0, 1\), got 1.0"):
        RMSprop(layer, rho=1.0)
    with pytest.raises(TypeError, match=r"an optimiser \(and params_to_vector\) needs layers"):
        Adam(42)
    with pytest.raises(ValueError, match="no parameters"):
        Adam([])
    opt = Adam(layer)
    with pytest.raises(ValueError, match="lacks"):
        opt.load_state_dict({"t": 1})
    layer.grads.data[0] = np.nan
    with pytest.raises(FloatingPointError, match="not finite") as err:
        opt.step()
    assert isinstance(err.value, NonFiniteError)  # as every NaN/inf error (README)


def test_sequential_misuse_is_refused():
    from mdnumba.stack import Sequential
    layer = LSTM1D(2, 2)
    with pytest.raises(TypeError, match=r"Sequential\(\*stages\)"):
        Sequential([layer])
    for stages in ((layer, layer), (Sequential(layer), LSTM1D(2, 2), layer)):
        with pytest.raises(ValueError, match="appears twice"):
            Sequential(*stages)
    net = Sequential(layer)  # assigning stages skipped those checks: (layer, layer) trained wrong
    with pytest.raises(AttributeError, match=r"stages are fixed when it is built .*Sequential\(\*stages\)"):
        net.stages = (layer, layer)
    assert net.stages == (layer,)


def test_a_users_stage_with_params_needs_grads_and_zero_grad():
    """The stack trains a stage with ``params``: without ``zero_grad`` its ``zero_grad`` failed
    with an AttributeError at the first step."""
    from mdnumba.params import ParamLayout

    class Scale:
        def __init__(self, zero_grad: bool):
            layout = ParamLayout({"a": (1,)})
            self.params, self.grads = layout.new(np.float64), layout.new(np.float64)
            if zero_grad:
                self.zero_grad = lambda: self.grads.data.fill(0)

        def forward(self, x):
            self._x = x
            return self.params.a[0] * x

        def backward(self, dy, input_grad=True):
            self.grads.a[0] += np.sum(dy * self._x)
            return self.params.a[0] * dy

    with pytest.raises(TypeError, match=r"Scale has params, so the stack trains it: .* grads .*zero_grad"):
        Sequential(LSTM1D(2, 2), Scale(zero_grad=False))
    net = Sequential(LSTM1D(2, 2, dtype=np.float64), Scale(zero_grad=True))
    net.zero_grad()
    assert len(net.layers) == 2 and net.n_params == net.layers[0].params.data.size + 1


class _ArrayScale:
    """A stage of the user's with plain arrays as params and grads."""

    def __init__(self, params, grads):
        self.params, self.grads = params, grads

    def zero_grad(self):
        self.grads[...] = 0

    def forward(self, x):
        self._x = x
        return self.params[0] * x

    def backward(self, dy, input_grad=True):
        self.grads[0] += np.sum(dy * self._x)
        return self.params[0] * dy


def test_a_users_stage_with_array_params_trains_and_other_params_are_refused(rng):
    """Plain arrays as a stage's params and grads: the stack counts them and Adam updates them
    in place (Adam refused such a stage, and n_params failed on a dict, after Sequential had
    accepted it); params an optimiser cannot update are refused when the stack is built."""
    scale = _ArrayScale(np.ones(1), np.zeros(1))
    net = Sequential(LSTM1D(2, 2, dtype=np.float64), scale)
    assert net.n_params == net.layers[0].params.data.size + 1
    opt = Adam(net, lr=0.1)
    y = net.forward(rng.random((1, 3, 2)))
    net.zero_grad()
    net.backward(y)
    assert scale.grads[0] > 0
    opt.step()
    assert scale.params[0] == pytest.approx(0.9)  # Adam's first step: lr against the gradient's sign
    for params, grads, error, match in (
            ({"a": np.ones(1)}, {"a": np.zeros(1)}, TypeError, "_ArrayScale.params and .grads must be two"),
            (np.ones(1), [0.0], TypeError, "NumPy arrays of one shape .*got ndarray and list"),
            (np.ones(2), np.zeros(1), ValueError, r"_ArrayScale.params \(2,\) and .grads \(1,\) differ")):
        with pytest.raises(error, match=match):
            Sequential(LSTM1D(2, 2), _ArrayScale(params, grads))
    frozen = _ArrayScale(np.ones(1), np.zeros(1))  # a stage nobody trains may be read-only
    frozen.params.setflags(write=False)
    net = Sequential(LSTM1D(2, 2), frozen)
    with pytest.raises(ValueError, match="the parameter array is read-only"):  # what Adam says
        Adam(net)
    with pytest.raises(TypeError, match="its grads must be an array of the same shape, got list"):
        Adam(_ArrayScale(np.ones(1), [0.0]))


def test_a_users_stage_with_a_param_buffer_needs_grads_of_its_size():
    """ParamBuffer params with grads of another size or kind: accepted, then the update read
    past the end of the gradients (or failed with an AttributeError)."""
    from mdnumba.params import ParamLayout
    params = ParamLayout({"w": (6,)}).new(np.float32)
    for grads, error, match in ((ParamLayout({"w": (2,)}).new(np.float32), ValueError, r"\(6,\).* \(2,\)"),
                                (np.zeros(6, np.float32), TypeError, "ParamBuffer.*ndarray")):
        with pytest.raises(error, match=match):
            Sequential(_ArrayScale(params, grads))
        with pytest.raises(error, match=match):
            RMSprop(_ArrayScale(params, grads))


def test_a_layers_settings_are_fixed_once_built():
    """Setting a layer's size, dtype, cell or device after it is built computed with the old
    weights (in_channels = 3 ran a 1-channel W on 3 channels, then backward failed inside a
    kernel): refused, naming what to do; other attributes can still be set."""
    for layer, names in ((MDLSTM2D(1, 2), ("in_channels", "hidden", "directions", "dtype", "cell", "device")),
                         (Linear(2, 3), ("in_features", "out_features", "dtype")),
                         (GridLSTM2D(2, 2), ("hidden", "depth", "tied", "layout"))):
        for name in names:
            with pytest.raises(AttributeError, match=f"{type(layer).__name__}.{name} is fixed when the "
                                                     f"layer is built.*build a new layer"):
                setattr(layer, name, 3)
        layer.note = "mine"
        assert pickle.loads(pickle.dumps(layer)).note == copy.deepcopy(layer).note == "mine"


def test_a_missing_parameter_name_lists_the_names():
    with pytest.raises(AttributeError, match="no parameter 'Q'; the names are W, U, b, U_up, U_left"):
        _ = MDLSTM2D(1, 2).params.Q
    with pytest.raises(KeyError, match="no parameter 'Q'; the names are W, U, b, U_up, U_left"):
        _ = MDLSTM2D(1, 2).params["Q"]


def test_pad_batch_names_the_item_it_refuses_once():
    with pytest.raises(ValueError, match=r"every n >= 1: items\[0\] has shape \(0, 3, 1\)$"):
        pad_batch([np.ones((0, 3, 1))])
    with pytest.raises(ValueError, match=r"items\[0\] has shape \(2, 3, 1\), items\[1\] \(2, 3, 2\)$"):
        pad_batch([np.ones((2, 3, 1)), np.ones((2, 3, 2))])


def test_a_slice_of_a_sequential_is_a_sequential(rng):
    a, b = LSTM1D(2, 3, dtype=np.float64), LSTM1D(3, 2, dtype=np.float64, seed=1)
    net = Sequential(a, b)
    head = net[:1]
    assert isinstance(head, Sequential) and head.stages == (a,) and net[1] is b
    with pytest.raises(IndexError, match="the slice 2:None:None of a Sequential of 2 stages holds none"):
        net[2:]
    x = rng.random((1, 4, 2))
    np.testing.assert_array_equal(head.forward(x), a.forward(x))


def test_optimizer_state_is_checked_before_it_is_loaded():
    layer = LSTM1D(2, 2)
    opt = Adam(layer)
    state = opt.state_dict()
    for bad, match in ((dict(state, v=[]), "0 v buffers"),
                       (dict(state, t=-1), r"t must be an integer in \[0, 2\*\*63\)"),
                       (dict(state, v=[-np.ones_like(v) for v in state["v"]]), "negative second moments"),
                       # finite in float64, inf in the float32 moments (then -inf weights)
                       (dict(state, m=[np.full(m.shape, 1e300) for m in state["m"]]), "too large"),
                       (dict(state, m=[np.zeros(m.shape, np.int32) for m in state["m"]]),
                        "moments must be floating point, got int32")):
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
    with pytest.raises(TypeError, match="rho must be a number"):
        RMSprop(layer, rho="x")


def test_linear_backward_checks_dy_and_skips_dx_on_request():
    lin = Linear(3, 2)
    lin.forward(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        lin.backward(np.full((4, 2), np.nan, np.float32))
    with pytest.raises(TypeError, match="floating-point"):
        lin.backward(np.ones((4, 2), np.int64))
    assert lin.backward(np.ones((4, 2), np.float32), input_grad=False) is None
    assert lin.grads["b"].tolist() == [4.0, 4.0]


def test_an_optimiser_refuses_the_same_parameters_twice():
    """A layer given twice would be updated twice per step and counted twice in the norm."""
    from mdnumba.stack import Sequential
    layer = MDLSTM2D(3, 4)
    net = Sequential(layer, BlockSubsample(2), MDLSTM2D(16, 2))
    p = np.zeros(10, np.float32)
    for params in ([layer, layer], [net, net.layers[0]],
                   [(p[:6], np.zeros(6, np.float32)), (p[4:], np.zeros(6, np.float32))]):
        for opt in (Adam, RMSprop):
            with pytest.raises(ValueError, match="the same parameters appear twice"):
                opt(params)
    Adam([(p[:5], np.zeros(5, np.float32)), (p[5:], np.zeros(5, np.float32))])  # adjacent: fine
    Adam([net, MDLSTM2D(3, 4)])


def test_optimiser_array_pairs_must_be_writable_floats():
    p = np.ones(4, np.int64)
    with pytest.raises(TypeError, match="float32 or float64, got int64"):
        Adam([(p, p.copy())])
    p = np.ones(4, np.float16)
    with pytest.raises(TypeError, match="float32 or float64, got float16"):
        Adam([(p, p.copy())])
    p = np.ones(4, np.float32)
    p.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        Adam([(p, p.copy())])


@pytest.mark.parametrize("clip_norm,advice", [(None, "rate or enable clip_norm"), (1.0, "rate$")])
def test_non_finite_gradient_advice_fits_the_clipping(clip_norm, advice):
    layer = Linear(2, 2)
    layer.grads.data[0] = np.inf
    with pytest.raises(FloatingPointError, match="^gradient norm is not finite; lower the learning "
                       + advice):
        Adam(layer, clip_norm=clip_norm).step()


def test_assigning_a_named_view_writes_the_weights():
    layer = MDLSTM2D(3, 4, seed=0)
    x = np.random.default_rng(0).random((1, 4, 4, 3), dtype=np.float32)
    h0 = layer.forward(x).copy()
    data = layer.params.data
    layer.params.b = np.full(layer.params.b.shape, 5.0)    # float64 in, float32 buffer
    assert layer.params.data is data and (layer.params.data[-layer.params.b.size:] == 5).all()
    assert np.abs(layer.forward(x) - h0).max() > 0.1
    layer.params["b"] = 0.0                                  # broadcast, like b[...] = 0
    assert (layer.params.b == 0).all() and "b" not in vars(layer.params)
    with pytest.raises(AttributeError, match="no parameter 'Wx'; the names are W, U, b"):
        layer.params.Wx = 1.0
    with pytest.raises(KeyError, match="no parameter 'Wx'"):
        layer.params["Wx"] = 1.0
    with pytest.raises(ValueError, match=r"cannot assign a \(3,\) array to b \(20,\): give the shape"):
        layer.params.b = np.ones(3)
    with pytest.raises(ValueError, match="cannot assign to W"):
        layer.params.W = 1j
    before = layer.params.data.copy()
    with pytest.raises(ValueError, match="values given for W overflow float32"):
        layer.params.W = np.full(layer.params.W.shape, 1e300)
    with pytest.raises(ValueError, match="values given for b overflow float32"):  # an int beyond float64
        layer.params.b = 10 ** 400
    with pytest.raises(ValueError, match="values given for data overflow float32"):  # partly
        layer.params.data = np.where(np.arange(before.size) % 2, 1e300, 2.0)
    np.testing.assert_array_equal(layer.params.data, before)  # a refused value writes nothing
    layer.params.data = np.zeros(layer.params.data.size)    # a saved flat vector: copied in
    assert layer.params.data is data and not data.any() and not layer.forward(x).any()
    with pytest.raises(ValueError, match=r"cannot assign a \(3,\) array to data"):
        layer.params.data = np.zeros(3)
    with pytest.raises(AttributeError, match="cannot be replaced"):
        layer.params.layout = None
    with pytest.raises(AttributeError, match="a layer's params cannot be replaced; copy values into it"):
        layer.params = MDLSTM2D(2, 4).params


def test_a_broadcast_into_every_direction_is_refused_and_aliases_are_not_parameters():
    """A one-direction matrix is not copied into each of 4 directions; iterating the buffer
    gives each parameter once (U_up, U_left are views of U, reached by name)."""
    layer = MDLSTM2D(1, 4, directions=4)
    with pytest.raises(ValueError, match=r"cannot assign a \(4, 20\) array to U_up \(4, 4, 20\)"):
        layer.params.U_up = np.ones((4, 20))
    assert list(layer.params) == ["W", "U", "b"] and len(layer.params) == 3
    assert layer.params.aliases == ["U_up", "U_left"]
    assert sum(v.size for v in layer.params.values()) == layer.params.data.size
    assert layer.params.U_up.base is not None and "U_up" in repr(layer.params)


@pytest.mark.parametrize("seed,exc", [(-1, ValueError), ("a", TypeError), (1.5, TypeError)])
def test_a_bad_seed_is_named(seed, exc):
    for make in (lambda: MDLSTM2D(3, 4, seed=seed), lambda: Linear(2, 2, seed=seed),
                 lambda: GridLSTM2D(4, 2, seed=seed), lambda: Embedding(5, 3, seed=seed)):
        with pytest.raises(exc, match=f"seed must be an integer >= 0 or None, got {seed!r}"):
            make()


def test_block_subsample_says_which_rule_is_broken():
    sub = BlockSubsample(2)
    with pytest.raises(ValueError, match=r"needs a \(batch, 2 grid axes, channels\) array, got shape "
                                         r"\(1, 4, 4, 4, 1\); for 3 grid axes use "
                                         r"BlockSubsample\(2, ndim=3\)$"):
        sub.forward(np.zeros((1, 4, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"needs every grid side divisible by 2, got shape \(1, 5, 4, 1\)"):
        sub.forward(np.zeros((1, 5, 4, 1)))
    with pytest.raises(ValueError, match=r"got an empty axis, shape \(1, 0, 4, 1\)"):
        sub.forward(np.zeros((1, 0, 4, 1)))
    x = np.ones((1, 2, 2, 3))  # one block: the output is a new array all the same
    assert not np.shares_memory(BlockSubsample(2).forward(x), x)
    assert not np.shares_memory(BlockSubsample(1).forward(x), x)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'gpu'"):
        BlockSubsample(2, device="gpu")


def test_a_stack_names_the_stage_that_failed():
    """An error inside a Sequential names the stage, and keeps its type (NonFiniteError)."""
    from mdnumba._validate import NonFiniteError
    net = mdlstm_stack(2, 1, 3, layers=2, subsample=2)
    assert len(net) == 3 and isinstance(net[1], BlockSubsample)
    with pytest.raises(ValueError, match=r"^stage 1 \(BlockSubsample\) forward: BlockSubsample\(2\) needs "
                                         "every grid side divisible by 2"):
        net.forward(np.zeros((1, 5, 4, 1), np.float32))
    with pytest.raises(NonFiniteError, match=r"^stage 0 \(MDLSTM2D\) forward: x contains 16 NaN"):
        net.forward(np.full((1, 4, 4, 1), np.nan, np.float32))
    net.forward(np.zeros((1, 4, 4, 1), np.float32))
    with pytest.raises(ValueError, match=r"^stage 2 \(MDLSTM2D\) backward: dh must have shape \(1, 2, 2, 3\) "
                                         r"\(the forward output.s\)"):
        net.backward(np.zeros((1, 2, 2, 4), np.float32))
    with pytest.raises(AttributeError):
        net.stages.append(net[0])  # fixed once built: a stage cannot be added twice this way


@pytest.mark.parametrize("kind", ["md", "snake"])
def test_a_refused_forward_leaves_a_model_as_it_was(kind, rng):
    """A model (or stack) whose forward refuses x keeps the activations of the last good
    forward: backward then works as if the refused call had not happened."""
    from mdnumba.models import build_model
    model = build_model(kind, hidden=2, dtype=np.float64)
    x = rng.standard_normal((2, 3, 4, 1))
    z = model.forward(x)
    dx = model.backward(np.ones_like(z))
    for bad in (np.ones((2, 3, 4, 2)), np.ones((1, 3, 1))):  # another channel count, another rank
        with pytest.raises(ValueError):
            model.forward(bad)
        with pytest.raises(ValueError):
            model.forward(bad, save=False)
        np.testing.assert_array_equal(model.backward(np.ones_like(z)), dx)


@pytest.mark.parametrize("kind", ["horizontal", "snake"])
def test_image_models_name_the_image_not_the_rows(kind):
    """The horizontal and snake models describe x as the user gave it (not the rows their 1D
    layer sees), and NaN in dlogits as dlogits (not the readout's dy)."""
    from mdnumba.models import build_model
    model = build_model(kind, hidden=2)
    with pytest.raises(ValueError, match=rf"x has an empty axis, shape \(2, 0, 4, 1\); every axis of "
                                         rf"\(batch, height, width, C\) of the {kind} model"):
        model.forward(np.ones((2, 0, 4, 1)))
    z = model.forward(np.ones((2, 3, 4, 1), np.float32))
    with pytest.raises(NonFiniteError, match="^dlogits contains 24 NaN"):
        model.backward(np.full(z.shape, np.nan))


def test_a_layer_inside_a_model_counts_as_a_stage():
    """``Sequential(model, model.recurrent)`` shares a layer (its backward gave a wrong dx)."""
    from mdnumba.models import build_model
    model = build_model("md", hidden=2)
    with pytest.raises(ValueError, match="a stage appears twice"):
        Sequential(model, model.recurrent)


def test_a_stack_whose_stages_disagree_on_channels_is_refused_when_built():
    """Found at the first forward, the error said "channels go last" when the grid's height happened
    to be the channels the stage wanted. Channels are followed through BlockSubsample; a stage of
    the user's makes them unknown (no check past it)."""
    from mdnumba import Linear
    with pytest.raises(ValueError, match=r"^stage 1 \(MDLSTM2D\) takes 3 channels, but stage 0 "
                                         r"\(MDLSTM2D\) gives 2$"):
        Sequential(MDLSTM2D(1, 2), MDLSTM2D(3, 2))
    with pytest.raises(ValueError, match=r"^stage 2 \(Linear\) takes 5 channels, but stage 1 "
                                         r"\(BlockSubsample\) gives 16$"):
        Sequential(MDLSTM2D(1, 4), BlockSubsample(2), Linear(5, 1))
    assert len(Sequential(MDLSTM2D(1, 4), BlockSubsample(2), MDLSTM2D(16, 2, directions=4),
                          Linear(8, 1))) == 4

    class Identity:
        def forward(self, x):
            return x

        def backward(self, dy):
            return dy
    assert len(Sequential(MDLSTM2D(1, 4), Identity(), MDLSTM2D(3, 2))) == 3  # unknown past the user's

    class Reports(Identity):  # a user's stage with out_channels of another signature: unknown too
        def out_channels(self):
            return 3
    assert len(Sequential(MDLSTM2D(1, 4), BlockSubsample(2), Reports(), MDLSTM2D(5, 2))) == 4
    Identity.in_channels, Identity.out_channels = np.int64(4), np.int64(7)  # NumPy integers count
    with pytest.raises(ValueError, match=r"^stage 2 \(MDLSTM2D\) takes 5 channels, but stage 1 "
                                         r"\(Identity\) gives 7$"):
        Sequential(MDLSTM2D(1, 4), Identity(), MDLSTM2D(5, 2))
    with pytest.raises(ValueError, match=r"^stage 1 \(Sequential\), its stage 0 \(MDLSTM2D\) takes 3 "
                                         r"channels, but stage 0 \(MDLSTM2D\) gives 2$"):
        Sequential(MDLSTM2D(1, 2), Sequential(MDLSTM2D(3, 2)))  # nested stacks are followed
    with pytest.raises(ValueError, match=r"^stage 1 \(Sequential\), its stage 1 \(Linear\) takes 5 "
                                         r"channels, but stage 1 \(Sequential\), its stage 0 "
                                         r"\(BlockSubsample\) gives 16$"):
        Sequential(Sequential(MDLSTM2D(1, 4)), Sequential(BlockSubsample(2), Linear(5, 1)))
    assert len(Sequential(Sequential(MDLSTM2D(1, 4), BlockSubsample(2)), Linear(16, 1))) == 2


def test_a_stack_calls_a_users_backward_without_input_grad_if_it_takes_none(rng):
    """A stage of the user's with ``backward(self, dy)``: called with dy alone (``save`` and
    ``sizes`` are likewise passed only to forwards that take them)."""
    class Double:
        def forward(self, x):
            return 2 * x

        def backward(self, dy):
            return 2 * dy
    layer = MDLSTM2D(1, 2, dtype=np.float64)
    net = Sequential(Double(), layer)
    x = rng.standard_normal((1, 3, 3, 1))
    h = net.forward(x)
    np.testing.assert_array_equal(net.backward(np.ones_like(h)), 2 * layer.backward(np.ones_like(h)))
    assert net.backward(np.ones_like(h), input_grad=False) is None


def test_a_stack_passes_input_grad_false_to_its_first_stage_only(rng):
    """``backward(dy, input_grad=False)`` (the models' call: x is data) spares the first stage its
    dL/dx; the stages after it still need theirs (a first stage always asked for one computed
    a dL/dx only to drop it)."""
    asked = []

    class Scale:
        def forward(self, x):
            return 3 * x

        def backward(self, dy, input_grad=True):
            asked.append(("scale", input_grad))
            return 3 * dy if input_grad else None
    layer = MDLSTM2D(1, 2, dtype=np.float64)
    real = layer.backward
    layer.backward = lambda dy, input_grad=True: (asked.append(("lstm", input_grad)), real(dy, input_grad))[1]
    net = Sequential(Scale(), layer)
    h = net.forward(rng.standard_normal((1, 3, 3, 1)))
    assert net.backward(np.ones_like(h), input_grad=False) is None
    assert asked == [("lstm", True), ("scale", False)]


@pytest.mark.parametrize("cell,advice", [
    ("graves", "; the graves cell.*use cell='stable', keep the default forget_bias, or lower"),
    ("stable", "; lower"),
])
def test_backward_after_an_overflowing_cell_state_says_so(cell, advice):
    """c overflowed to inf in forward (h stays finite): backward raises instead of returning
    NaN gradients."""
    from mdnumba._validate import NonFiniteError
    layer = MDLSTM2D(1, 2, cell=cell)
    x = np.ones((1, 6, 6, 1), np.float32)
    h = layer.forward(x)
    layer._saved["c"][-1, 0] = np.inf  # as a 128x128 graves state at lr 1e-2 does
    with pytest.raises(NonFiniteError, match=r"the cell state overflowed to inf in forward \(1 values\), "
                                             r"so the gradients would be NaN" + advice):
        layer.backward(np.ones_like(h))
    layer.forward(x)
    layer.backward(np.ones_like(h))  # a finite state again


@pytest.mark.parametrize("make,inputs", [
    (lambda dt: MDLSTM2D(1, 2, dtype=dt), lambda rng: rng.standard_normal((1, 4, 4, 1))),
    (lambda dt: MDLSTM2D(1, 2, dtype=dt, directions=4), lambda rng: rng.standard_normal((2, 3, 4, 1))),
    (lambda dt: LSTM1D(1, 2, dtype=dt), lambda rng: rng.standard_normal((1, 5, 1))),
    (lambda dt: GridLSTM2D(2, 2, dtype=dt), lambda rng: rng.standard_normal((1, 3, 2))),
    (lambda dt: Linear(2, 3, dtype=dt), lambda rng: 4 + rng.random((3, 2))),
    (lambda dt: Embedding(3, 2, dtype=dt), lambda rng: np.array([[1, 1, 1]])),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_backward_whose_gradients_overflow_says_so(make, inputs, dtype, rng):
    """A finite dh too large for the dtype once the sweep (or GEMM) has summed it leaves inf/NaN
    in the gradients: backward raises NonFiniteGradientError saying what to change (which the
    optimiser would have blamed on the learning rate); after zero_grad a sane dh trains on."""
    from mdnumba.optim import NonFiniteGradientError
    layer = make(dtype)
    x = inputs(rng)
    h = layer.forward(x if x.dtype.kind == "i" else x.astype(dtype))
    huge = np.full_like(h, np.finfo(dtype).max)
    wider = " or use a float64 layer," if dtype == np.float32 else ","
    with pytest.raises(NonFiniteGradientError, match=r"^backward overflowed: the layer's gradients hold "
                       rf"\d+ NaN or infinite values in {np.dtype(dtype)}; scale dh down \(e.g. a loss "
                       rf"averaged rather than summed\){wider} and call zero_grad\(\) before the next "
                       "backward$"):
        layer.backward(huge)
    assert not np.isfinite(layer.grads.data).all()
    layer.zero_grad()
    layer.backward(np.ones_like(h))
    assert np.isfinite(layer.grads.data).all() and layer.grads.data.any()


@pytest.mark.parametrize("make,shape", [
    (lambda dt: MDLSTM2D(1, 2, dtype=dt, directions=4), (1, 2, 3, 1)),
    (lambda dt: LSTM1D(1, 2, dtype=dt), (1, 3, 1)),
    (lambda dt: GridLSTM2D(2, 2, dtype=dt), (1, 3, 2)),
    (lambda dt: Linear(2, 3, dtype=dt), (2, 2)),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_backward_whose_input_gradient_overflows_says_so(make, shape, dtype):
    """dx = dact·Wᵀ can overflow where the layer's gradients do not (large weights): backward
    raises NonFiniteGradientError naming dx rather than return inf (it returned it, and the stage
    before blamed the stages after it)."""
    from mdnumba.optim import NonFiniteGradientError
    layer = make(dtype)
    large_input_weights(layer)
    h = layer.forward(np.full(shape, 1e-3, dtype))
    dh = np.full_like(h, np.finfo(dtype).max / 30)
    with pytest.raises(NonFiniteGradientError, match=r"^backward overflowed: the input's gradient dx "
                       rf"holds \d+ NaN or infinite values in {np.dtype(dtype)}; scale dh down"):
        layer.backward(dh)
    layer.zero_grad()
    assert layer.backward(dh, input_grad=False) is None  # its own gradients are finite
    assert np.isfinite(layer.grads.data).all() and layer.grads.data.any()


def test_a_linear_layer_keeps_its_own_copy_of_the_input():
    lin = Linear(4, 2, dtype=np.float64)
    h = np.random.default_rng(0).random((2, 3, 4))
    lin.forward(h)
    want = h.reshape(-1, 4).T @ np.ones((6, 2))
    h *= 0  # the caller reuses its buffer before backward
    lin.backward(np.ones((2, 3, 2)))
    np.testing.assert_allclose(lin.grads.W, want)


def test_stacked_layers_of_different_seeds_start_apart():
    """Layer k > 0 of a stack draws from (seed, k): seed 7's first layer is not seed 0's second."""
    a, b = mdlstm_stack(2, 4, 4, layers=2, seed=0), mdlstm_stack(2, 4, 4, layers=2, seed=7)
    assert not np.array_equal(a.layers[1].params.data, b.layers[0].params.data)
    assert not np.array_equal(a.layers[0].params.data, a.layers[1].params.data)
    np.testing.assert_array_equal(a.layers[1].params.data,
                                  mdlstm_stack(2, 4, 4, layers=2, seed=0).layers[1].params.data)


@pytest.mark.parametrize("make", [lambda: np.random.SeedSequence(3), lambda: np.random.default_rng(3)])
def test_a_stack_seeded_by_a_seed_sequence_or_generator(make):
    """Layers take any NumPy seed; a stack then draws its layers from one stream in turn
    (repeatable, layers apart), and a bad one is named."""
    a, b = (mdlstm_stack(2, 4, 4, layers=2, seed=make()) for _ in range(2))
    for la, lb in zip(a.layers, b.layers):
        np.testing.assert_array_equal(la.params.data, lb.params.data)
    assert not np.array_equal(a.layers[0].params.data, a.layers[1].params.data)
    with pytest.raises(TypeError, match="seed must be an integer >= 0 or None, got 'x'"):
        mdlstm_stack(2, 4, 4, layers=2, seed="x")


def test_a_non_finite_gradient_is_blamed_on_what_comes_after():
    import mdnumba
    layer = MDLSTM2D(1, 2)
    h = layer.forward(np.ones((1, 2, 2, 1), np.float32))
    with pytest.raises(mdnumba.NonFiniteError, match="dh contains 1 NaN or infinite values; the loss or "
                                                     "the stages after this layer produced them"):
        layer.backward(np.where(np.arange(h.size).reshape(h.shape) == 0, np.nan, h))
    assert issubclass(mdnumba.CudaUnavailableError, RuntimeError)


def _stack_refused_by_a_later_stage():
    """A stack whose stage 1 refuses x after stage 0 ran on it (a block side of 3)."""
    net = mdlstm_stack(2, 1, 2, layers=2, subsample=2, dtype=np.float64)

    def refused():
        with pytest.raises(ValueError, match=r"^stage 1 \(BlockSubsample\) forward"):
            net.forward(np.ones((1, 3, 2, 1)))
    return net, (1, 4, 4, 1), refused


def _sequential_refused_by_a_later_stage():
    """Same shapes: a Linear's output overflows to inf, which the layer after it refuses."""
    net = Sequential(Linear(2, 3, dtype=np.float64), MDLSTM2D(3, 2, dtype=np.float64))
    net.layers[0].params.W = 1.0

    def refused():
        with pytest.raises(NonFiniteError, match=r"^stage 1 \(MDLSTM2D\) forward: x contains"):
            net.forward(np.full((1, 2, 2, 2), 1.7e308))
    return net, (1, 2, 2, 2), refused


def _model_refused_by_its_readout():
    """The recurrent layer runs, the readout refuses (its weights set to NaN by hand)."""
    model = MDModel(hidden=2, dtype=np.float64)

    def refused():
        w = model.readout.params.W.copy()
        model.readout.params.W[0, 0] = np.nan
        with pytest.raises(NonFiniteError, match="weights W hold NaN"):
            model.forward(np.ones((1, 4, 4, 1)))
        model.readout.params.W = w
    return model, (1, 4, 4, 1), refused


def _overflow_state(layer: MDLSTM2D, x: np.ndarray) -> None:
    """Set ``layer`` (graves cell, one direction, float32) so that its cell state overflows to
    +inf and to -inf on ``x``'s 80x80 grid, which meet (NaN): i = f = o = 1 (biases 30), U = 0,
    g = tanh(100·x0) with x0 = 1 down the first column and -1 along the first row (0
    elsewhere), so c grows like binomial coefficients, one sign on each side of the diagonal."""
    D = layer.hidden
    layer.params.data[...] = 0
    layer.params.b[:4 * D] = 30
    layer.params.W[0, 4 * D:] = 100
    x[:] = 0
    x[:, 1:, 0, 0], x[:, 0, 1:, 0] = 1, -1


def _nan_state(layer: MDLSTM2D):
    """A refusal for NaN in what ``layer`` computed (:func:`_overflow_state`), after the layer
    has run: the parameters restored afterwards."""
    params = layer.params.data.copy()

    def refused(forward):
        x = np.empty((1, 80, 80, layer.in_channels), np.float32)
        _overflow_state(layer, x)
        with pytest.raises(NonFiniteError, match="overflowed in forward"):
            forward(x)
        layer.params.data[...] = params
    return refused


def _sequential_whose_first_layer_computes_nan():
    net = Sequential(MDLSTM2D(2, 2), MDLSTM2D(2, 2))
    nan = _nan_state(net.layers[0])
    return net, (1, 4, 4, 2), lambda: nan(net.forward)


def _model_whose_layer_computes_nan():
    model = MDModel(in_channels=2, hidden=2)
    nan = _nan_state(model.recurrent)
    return model, (1, 4, 4, 2), lambda: nan(model.forward)


def _interrupted_at(code, line: str, forward, hit: int = 1) -> None:
    """``forward()`` interrupted (KeyboardInterrupt, as from Ctrl-C) where the function of ``code``
    is about to run its source line ``line`` for the ``hit``-th time."""
    import linecache
    import sys
    hits = []

    def trace(frame, event, arg):
        if frame.f_code is not code:
            return None
        if event == "line" and linecache.getline(code.co_filename, frame.f_lineno).strip() == line:
            hits.append(frame.f_lineno)
            if len(hits) == hit:
                raise KeyboardInterrupt
        return trace
    sys.settrace(trace)
    try:
        with pytest.raises(KeyboardInterrupt):
            forward()
    finally:
        sys.settrace(None)
    assert len(hits) == hit


def _sequential_interrupted_between_its_stages():
    """Stage 0 ran, stage 1 not begun: each stage's call was guarded, the loop around them was not."""
    net = Sequential(MDLSTM2D(2, 2), MDLSTM2D(2, 2))
    x = np.random.default_rng(1).standard_normal((1, 4, 4, 2))
    line = 'kw = {} if save or not _takes(stage, "save") else {"save": False}'
    return net, (1, 4, 4, 2), lambda: _interrupted_at(Sequential.forward.__wrapped__.__code__, line,
                                                      lambda: net.forward(x), hit=2)


def _model_interrupted_after_its_recurrent_part():
    """The recurrent part ran, the readout not begun."""
    from mdnumba import stack
    model = MDModel(in_channels=2, hidden=2)
    x = np.random.default_rng(1).standard_normal((1, 4, 4, 2))
    return model, (1, 4, 4, 2), lambda: _interrupted_at(stack.run_tracked.__code__, "y = rest(y)",
                                                        lambda: model.forward(x))


@pytest.mark.parametrize("make", [_stack_refused_by_a_later_stage, _sequential_refused_by_a_later_stage,
                                  _model_refused_by_its_readout, _sequential_whose_first_layer_computes_nan,
                                  _model_whose_layer_computes_nan, _sequential_interrupted_between_its_stages,
                                  _model_interrupted_after_its_recurrent_part])
def test_a_forward_refused_after_its_first_stage_ran_refuses_backward(make, rng):
    """A stage after the first refuses x: the stages before it already hold that x's activations
    and those after it the last forward's, so backward is refused (before any gradient is added)
    until a forward runs through; it used to add the later stages' gradients, then raise, or
    (same shapes) silently mix the two forwards."""
    net, shape, refuse = make()
    x = rng.standard_normal(shape)
    y = net.forward(x)
    dy = np.ones_like(y)
    refuse()
    grads = [layer.grads.data.copy() for layer in net.layers]
    with pytest.raises(RuntimeError, match=r"after a forward that failed partway \(at stage [0-9]\)"):
        net.backward(dy)
    for g, layer in zip(grads, net.layers):
        np.testing.assert_array_equal(layer.grads.data, g)
    net.forward(x)
    net.backward(dy)  # a forward that ran through
    for g, layer in zip(grads, net.layers):
        assert not np.array_equal(layer.grads.data, g)


def test_a_stack_refused_by_its_first_stage_keeps_the_last_forward(rng):
    """The first stage checks x before changing anything: backward then works as if the refused
    call had not happened."""
    net = mdlstm_stack(2, 1, 2, layers=2, subsample=2, dtype=np.float64)
    x = rng.standard_normal((1, 4, 4, 1))
    y = net.forward(x)
    dx = net.backward(np.ones_like(y))
    with pytest.raises(ValueError, match="^stage 0 "):
        net.forward(np.ones((1, 4, 4, 2)))
    np.testing.assert_array_equal(net.backward(np.ones_like(y)), dx)


def test_a_grid_lstm_keeps_its_own_copy_of_the_input():
    """With batch 1 the time-major input was a view of the caller's array (so with T = 1): backward
    used to read the caller's array as it was at backward time."""
    layer = GridLSTM2D(3, 2, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((1, 4, 3))
    y = layer.forward(x)
    layer.backward(np.ones_like(y))
    want = layer.grads.data.copy()
    layer.zero_grad()
    x *= 0  # the caller reuses its buffer before backward
    layer.backward(np.ones_like(y))
    np.testing.assert_array_equal(layer.grads.data, want)


def test_a_refused_forward_leaves_no_nan_for_a_later_padded_batch(rng):
    """A forward whose cell state overflowed to NaN is refused; a later padded batch of the same
    grid, whose sweep skips the padding's rows, must not read that NaN back (its backward
    multiplied the padding's gates by zero: NaN)."""
    layer = MDLSTM2D(2, 2)
    x, sizes = rng.standard_normal((2, 80, 80, 2)).astype(np.float32), [[80, 80], [40, 40]]
    h = layer.forward(x, sizes=sizes)
    dx = layer.backward(np.ones_like(h))
    grads = layer.grads.data.copy()
    params = layer.params.data.copy()
    bad = np.empty_like(x)
    _overflow_state(layer, bad)
    with pytest.raises(NonFiniteError, match="overflowed in forward"):
        layer.forward(bad)
    layer.params.data[...] = params
    layer.zero_grad()
    np.testing.assert_array_equal(layer.forward(x, sizes=sizes), h)
    np.testing.assert_array_equal(layer.backward(np.ones_like(h)), dx)
    np.testing.assert_array_equal(layer.grads.data, grads)


def test_a_stack_that_starts_with_block_subsample_refuses_integer_images_at_once():
    """BlockSubsample would pass an integer image on to the layer after it, which refuses it: the
    stack then counted as failed partway, and a backward of its last good forward was refused."""
    from mdnumba.stack import BlockSubsample
    net = Sequential(BlockSubsample(2, 2), MDLSTM2D(4, 3))
    x = np.random.default_rng(0).random((1, 4, 4, 1), dtype=np.float32)
    h = net.forward(x)
    with pytest.raises(TypeError, match=r"^stage 0 \(BlockSubsample\) forward: x must hold floating-point "
                                        r"values \(any float dtype\), got dtype uint8; convert with "):
        net.forward((x * 255).astype(np.uint8))
    net.backward(np.ones_like(h))  # the last good forward's


def test_block_subsample_refuses_gradients_the_layers_refuse():
    """An integer dy came back as an int64 dx, NaN/inf went through unnamed."""
    from mdnumba.stack import BlockSubsample
    sub = BlockSubsample(2)
    y = sub.forward(np.ones((1, 4, 4, 1), np.float32))
    with pytest.raises(TypeError, match="^dy must hold floating-point values"):
        sub.backward(np.ones(y.shape, np.int64))
    bad = np.ones_like(y)
    bad[0, 1, 0, 2], bad[0, 0, 1, 3] = np.nan, -np.inf
    with pytest.raises(NonFiniteError, match="^dy contains 2 NaN or infinite values; the loss or the stages"):
        sub.backward(bad)
    assert sub.backward(np.ones_like(y)).shape == (1, 4, 4, 1)


def test_unsigned_sizes_pass_a_subsampling_stack():
    """ceil(size / block) of an unsigned size wrapped around (3 // 2 gave 130 for a uint8 3), and
    the next stage refused sizes of 130; a uint64 beyond int64 is named."""
    net = mdlstm_stack(2, 1, 2, layers=2, subsample=2, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 1))
    want = net.forward(x, sizes=[[3, 3], [4, 2]])
    for dtype in (np.uint8, np.uint32, np.uint64):
        assert BlockSubsample(2).out_sizes(np.array([[3, 3]], dtype)).tolist() == [[2, 2]]
        np.testing.assert_array_equal(net.forward(x, sizes=np.array([[3, 3], [4, 2]], dtype)), want)
    with pytest.raises(ValueError, match="sizes must be integers >= 1 .*; got 18446744073709551615$"):
        BlockSubsample(2).out_sizes(np.array([[2 ** 64 - 1, 3]], np.uint64))


def test_a_layout_beyond_int64_or_of_another_size_is_refused():
    """A parameter count past int64 is refused, not wrapped round to a small one; a flat buffer
    that is longer or shorter than its layout is refused (spare values the optimiser would
    update, or numpy's reshape error)."""
    from mdnumba.params import ParamBuffer, ParamLayout
    with pytest.raises(ValueError, match="parameters .* cannot be allocated"):
        ParamLayout({"U": (2 ** 32, 5, 2 ** 32)})  # 5 * 2**64: an int64 product wraps to 0
    layout = ParamLayout({"W": (2, 3), "b": (3,)})
    for n in (8, 10):
        with pytest.raises(ValueError, match=rf"^flat buffer must have shape \(9,\), got \({n},\)$"):
            ParamBuffer(layout, np.zeros(n))


def test_a_huge_ndim_is_refused_at_once():
    """2**ndim (directions) and block**ndim (channels) of a huge ndim took Python forever (memory
    growing) before any size was checked."""
    from mdnumba import WavefrontLSTM
    with pytest.raises(ValueError, match="parameters .* cannot be allocated"):
        WavefrontLSTM(2 ** 63, 1, 1)
    with pytest.raises(ValueError, match=r"^directions must be 1 or 2\*\*64 \(every corner of a 64-D grid\)"):
        WavefrontLSTM(64, 1, 1, directions=4)
    with pytest.raises(ValueError, match=r"^block\*\*ndim = 2\*\*1000000000000 channels per input channel"):
        BlockSubsample(2, ndim=10 ** 12)
    assert BlockSubsample(1, ndim=10 ** 12).out_channels(3) == 3


def test_numbers_beyond_int64_are_numbers():
    """A Python int beyond int64 (np.isfinite refuses it) was NumPy's 'ufunc isfinite not
    supported' TypeError, naming nothing."""
    layer = MDLSTM2D(1, 1)
    assert Adam(layer, lr=10 ** 30, clip_norm=2 ** 64).lr == 1e30
    assert MDLSTM2D(1, 1, forget_bias=2 ** 64).params.b[1] == np.float32(2 ** 64)
    with pytest.raises(ValueError, match="^lr must be finite, got 1000"):
        Adam(layer, lr=10 ** 400)
    with pytest.raises(ValueError, match="^forget_bias=1000000000000000000000000000000000000000 overflows "
                                         "the layer's float32$"):
        MDLSTM2D(1, 1, forget_bias=10 ** 39)


def test_odd_kinds_of_ndim_cell_model_and_stage_are_named():
    """mdlstm_stack(True, ...) built a 1-D stack and (2.0, ...) a 2-D one; a list as ndim, cell
    or model kind was 'unhashable type'; a layer class as a Sequential stage failed at forward."""
    for ndim in (True, 2.0, [2]):
        with pytest.raises(TypeError, match=rf"^ndim must be an integer, got {re.escape(repr(ndim))}$"):
            mdlstm_stack(ndim, 1, 2)
    with pytest.raises(ValueError, match=r"^unknown cell \['graves'\]; choose one of"):
        MDLSTM2D(1, 2, cell=["graves"])
    with pytest.raises(ValueError, match=r"^unknown model \['md'\]; choose one of"):
        build_model(["md"])
    with pytest.raises(TypeError, match=r"^a Sequential stage must be a layer, got the class Linear; make "
                                        r"one first, e.g. Linear\(...\)$"):
        Sequential(Linear)


def test_optimiser_settings_and_state_of_the_wrong_kind_are_named():
    """betas as a 0-d array ('iteration over a 0-d array'), moments m/v that are no list
    ('object of type NoneType has no len()'), and a read-only gradient (accepted, then NumPy's
    'assignment destination is read-only' at zero_grad)."""
    layer = MDLSTM2D(1, 1)
    opt = Adam(layer)
    with pytest.raises(ValueError, match=r"^betas must be two numbers in \[0, 1\), .* got array\(0.1\)$"):
        opt.betas = np.array(0.1)
    opt.betas = np.array([0.8, 0.99])
    assert opt.betas == (0.8, 0.99)
    for m in (None, 1.0, np.array(1.0)):
        with pytest.raises(TypeError, match="^optimizer state m must be a list of arrays, one per "):
            opt.load_state_dict(dict(opt.state_dict(), m=m))
    p, g = np.zeros(3, np.float32), np.zeros(3, np.float32)
    g.flags.writeable = False
    with pytest.raises(ValueError, match="^the gradient array is read-only; the optimiser updates"):
        Adam((p, g))


def test_a_stack_beyond_the_memory_is_refused_before_it_is_built(monkeypatch):
    """--layers 10**30 built layers for minutes (Linux only promises their zeroed buffers) before
    any memory check: a stack whose weights and gradients do not fit is refused after two layers."""
    import mdnumba.memory
    with pytest.raises(MemoryError, match=rf"^a stack of {10 ** 30} layers needs [0-9.e+]+ GiB for its "
                                          r"weights and gradients, this machine has .* use fewer layers"):
        mdlstm_stack(2, 1, 4, layers=10 ** 30)
    need = 2 * sum(layer.params.data.nbytes for layer in mdlstm_stack(2, 1, 4, layers=3).layers)
    monkeypatch.setattr(mdnumba.memory, "available_memory", lambda: need)
    assert len(mdlstm_stack(2, 1, 4, layers=3).layers) == 3
    monkeypatch.setattr(mdnumba.memory, "available_memory", lambda: need - 1)
    with pytest.raises(MemoryError, match="^a stack of 3 layers needs"):
        mdlstm_stack(2, 1, 4, layers=3)
