"""Adam matches hand-computed steps; clipping uses the global norm."""

import numpy as np
import pytest

from mdnumba import LSTM1D, MDLSTM2D, Adam, RMSprop
from mdnumba import reference as ref


def test_first_step_by_hand():
    p = np.array([1.0, -2.0, 0.5])
    g = np.array([0.1, -0.4, 0.0])
    Adam([(p, g)], lr=0.1).step()
    # t=1: mhat = g, vhat = g², so the step is lr * g / (|g| + eps) = ±lr (0 where g = 0).
    expected = np.array([1.0 - 0.1 * 0.1 / (0.1 + 1e-8), -2.0 + 0.1 * 0.4 / (0.4 + 1e-8), 0.5])
    np.testing.assert_allclose(p, expected, rtol=1e-14)


def test_three_steps_match_reference(rng):
    layer = MDLSTM2D(2, 3, dtype=np.float64)
    opt = Adam(layer, lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    p = layer.params.data.copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t in range(1, 4):
        g = rng.standard_normal(p.shape)
        layer.grads.data[...] = g
        opt.step()
        p, m, v = ref.adam_step(p, g, m, v, t, 0.01, 0.8, 0.99, 1e-6)
        np.testing.assert_allclose(layer.params.data, p, rtol=1e-12)


def test_global_norm_clipping():
    a, b = LSTM1D(1, 1, dtype=np.float64), LSTM1D(1, 1, dtype=np.float64)
    a.grads.data[...] = 3.0
    b.grads.data[...] = 4.0
    n = a.grads.data.size
    opt = Adam([a, b], lr=1.0, clip_norm=1.0)
    norm = opt.step()
    assert norm == pytest.approx(5.0 * np.sqrt(n))
    # first Adam step moves every parameter by lr regardless of scale; moments reveal clipping
    np.testing.assert_allclose(opt.m[0], 0.1 * 3.0 / norm, rtol=1e-12)
    np.testing.assert_allclose(opt.m[1], 0.1 * 4.0 / norm, rtol=1e-12)


def test_clipping_rescues_a_float32_gradient_whose_squares_overflow_float32():
    """‖g‖ of a float32 g of 2e19 (squares 4e38 > float32's max 3.4e38) is finite: the squares
    are taken in float64, so clipping scales the step instead of refusing it."""
    layer = LSTM1D(1, 1)  # float32
    layer.grads.data[...] = 2e19
    opt = Adam(layer, lr=1e-3, clip_norm=1.0)
    assert opt.step() == pytest.approx(2e19 * np.sqrt(layer.grads.data.size), rel=1e-7)
    np.testing.assert_allclose(opt.m[0], 0.1 / np.sqrt(layer.grads.data.size), rtol=1e-6)


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_clipped_steps_match_the_reference_on_the_clipped_gradient(name, rng):
    """With ``clip_norm`` below the global norm of two parameter groups, every step (update and
    both moments) equals the reference's on ``g · clip/‖g‖``."""
    ps = [rng.standard_normal(5), rng.standard_normal((2, 3))]
    gs = [rng.standard_normal(5) * 3, rng.standard_normal((2, 3)) * 3]
    norm = np.sqrt(sum((g ** 2).sum() for g in gs))
    clip = 0.3 * norm
    opt = (Adam(list(zip(ps, gs)), lr=0.1, betas=(0.8, 0.99), eps=1e-6, clip_norm=clip) if name == "adam"
           else RMSprop(list(zip(ps, gs)), lr=0.1, rho=0.9, eps=1e-6, clip_norm=clip))
    want = [(p.copy(), np.zeros_like(p), np.zeros_like(p)) for p in ps]

    def ref_step(p, g, m, v, t):
        if name == "adam":
            return ref.adam_step(p, g, m, v, t, 0.1, 0.8, 0.99, 1e-6)
        p, v = ref.rmsprop_step(p, g, v, 0.1, 0.9, 1e-6)
        return p, m, v  # RMSprop's first moment stays 0
    for t in range(1, 4):
        assert opt.step() == pytest.approx(norm, rel=1e-12)  # the norm before clipping
        for k, (p, m, v) in enumerate(want):
            want[k] = ref_step(p, gs[k] * (clip / norm), m, v, t)
            for what, got, w in zip("pmv", (ps[k], opt.m[k], opt.v[k]), want[k]):
                np.testing.assert_allclose(got.reshape(w.shape), w, rtol=1e-12, err_msg=f"{what}{k} t={t}")


def test_state_dict_roundtrip(rng):
    layer = LSTM1D(2, 3)
    opt = Adam(layer)
    layer.grads.data[...] = rng.standard_normal(layer.grads.data.shape)
    opt.step()
    state = opt.state_dict()
    opt2 = Adam(LSTM1D(2, 3))
    opt2.load_state_dict(state)
    assert opt2.t == 1
    np.testing.assert_array_equal(opt2.m[0], opt.m[0])
    np.testing.assert_array_equal(opt2.v[0], opt.v[0])
    with pytest.raises(ValueError, match="shape"):
        Adam(LSTM1D(2, 4)).load_state_dict(state)
    with pytest.raises(TypeError, match=r"^optimizer state must be a dict like state_dict\(\)'s \(keys kind, "
                                        r"t, m, v\), got NoneType$"):
        opt2.load_state_dict(None)
    with pytest.raises(ValueError, match=r"^optimizer state lacks \['m'\]"):
        opt2.load_state_dict({"t": 1, "v": state["v"]})


def test_a_state_saved_with_np_savez_loads_and_its_kind_must_match(tmp_path):
    """``state_dict(flat=True)``, a key per moment array, is what ``np.savez`` can store (not the
    lists of a layer's arrays each, which a user tries first), and loads as ``np.load`` reads it
    back (t and kind as 0-d arrays); an RMSprop state is not Adam's."""
    from mdnumba.layers import Linear
    layers = [LSTM1D(2, 3), Linear(3, 1)]
    opt = Adam(layers)
    for _, g in opt.buffers:
        g[...] = 1.0
    opt.step()
    state = opt.state_dict()
    with pytest.raises(ValueError):  # NumPy cannot make one array of the list m
        np.savez(tmp_path / "lists.npz", **state)
    flat = opt.state_dict(flat=True)
    assert sorted(flat) == ["kind", "m_0", "m_1", "t", "v_0", "v_1"]
    np.savez(tmp_path / "opt.npz", **flat)
    again = Adam([LSTM1D(2, 3), Linear(3, 1)])
    with np.load(tmp_path / "opt.npz") as f:
        again.load_state_dict(f)
    assert again.t == 1 and again.state_dict()["kind"] == "adam"
    for a, b in zip(state["m"] + state["v"], again.state_dict()["m"] + again.state_dict()["v"]):
        np.testing.assert_array_equal(b, a)
    with pytest.raises(ValueError, match="optimizer state has 1 m and 2 v buffers"):
        again.load_state_dict({k: v for k, v in flat.items() if k != "m_1"})
    with pytest.raises(TypeError, match="flat must be True or False"):
        opt.state_dict(flat="yes")
    with pytest.raises(ValueError, match="this optimizer state is rmsprop's, this optimizer is adam"):
        Adam(layers).load_state_dict(RMSprop(layers).state_dict(flat=True))
    del state["kind"]  # a state of an older mdnumba: taken as it is
    RMSprop(layers).load_state_dict(state)


@pytest.mark.parametrize("name,value,exc,match", [
    ("lr", -1e-3, ValueError, "lr must be a finite number > 0, got -0.001"),
    ("lr", "1e-3", TypeError, "lr must be a number, got '1e-3'"),
    ("clip_norm", 0.0, ValueError, "clip_norm must be a finite number > 0"),
    ("clip_norm", -1.0, ValueError, "clip_norm must be a finite number > 0"),
    ("eps", float("nan"), ValueError, "eps must be finite"),
    ("betas", 0.9, ValueError, r"betas must be two numbers in \[0, 1\), e.g. \(0.9, 0.999\), got 0.9"),
    ("betas", (0.9, 1.0), ValueError, "betas must be two numbers"),
])
def test_settings_are_checked_when_set_later_too(name, value, exc, match):
    """A schedule may change lr or clip_norm between steps: a bad value is refused then too
    (a negative clip_norm would step up the gradient, 0 would not step at all)."""
    layer = LSTM1D(2, 3)
    with pytest.raises(exc, match=match):
        Adam(layer, **{name: value})
    opt = Adam(layer, clip_norm=1.0)
    with pytest.raises(exc, match=match):
        setattr(opt, name, value)
    opt.lr, opt.clip_norm, opt.betas = 0.5, None, [0.8, 0.9]
    assert (opt.lr, opt.clip_norm, opt.betas) == (0.5, None, (0.8, 0.9))


@pytest.mark.parametrize("value", [-1, 2.5, "3", True, 2**63])
def test_the_step_count_is_checked_when_set(value):
    """A negative t would divide the bias correction by zero (NaN weights at the next step)."""
    opt = Adam(LSTM1D(2, 3))
    with pytest.raises(ValueError, match=r"^t must be an integer in \[0, 2\*\*63\), got "):
        opt.t = value
    opt.t = np.int64(7)
    assert opt.t == 7 and type(opt.t) is int


@pytest.mark.parametrize("kind", [Adam, RMSprop])
@pytest.mark.parametrize("dtype,lr", [(np.float32, 1e38), (np.float32, 1e300), (np.float64, 1e308)])
def test_an_update_that_would_overflow_changes_nothing(kind, dtype, lr):
    """Finite gradients, a huge learning rate: the new weights would be inf (or, lr being a Python
    float, beyond float32 only when stored). The step is refused before anything is written,
    and a later step with a sane lr goes on from the same state."""
    from mdnumba.optim import NonFiniteUpdateError
    layer = MDLSTM2D(1, 3, dtype=dtype, seed=0)
    layer.forward(np.ones((1, 3, 3, 1)))
    layer.backward(np.ones((1, 3, 3, 3)))
    opt = kind(layer, lr=lr)
    k = np.argmax(np.abs(layer.grads.data))  # a weight the update pushes past the largest value
    layer.params.data[k] = -0.9 * np.finfo(dtype).max * np.sign(layer.grads.data[k])
    before = (layer.params.data.copy(), opt.m[0].copy(), opt.v[0].copy())
    match = rf"^this step would make \d+ weights or moments NaN or infinite \(beyond {np.dtype(dtype)}\); "
    with pytest.raises(NonFiniteUpdateError, match=match):
        opt.step()
    assert isinstance(NonFiniteUpdateError("x"), FloatingPointError)
    for a, b in zip(before, (layer.params.data, opt.m[0], opt.v[0])):
        np.testing.assert_array_equal(a, b)
    assert opt.t == 0
    opt.lr = 1e-3
    opt.step()
    assert opt.t == 1 and np.isfinite(layer.params.data).all()


def test_a_gradient_whose_square_overflows_the_second_moment_is_refused_with_clipping_advised():
    """Before, v became inf and the weights never moved again (m / sqrt(inf) = 0): a silent stall."""
    from mdnumba.optim import NonFiniteUpdateError
    p, g = np.ones(3, np.float32), np.full(3, 1e22, np.float32)  # a finite norm (summed in float64)
    with pytest.raises(NonFiniteUpdateError, match=r"lower the learning rate \(lr=0.001\) or set clip_norm"):
        Adam([(p, g)]).step()
    opt = Adam([(p, g)], clip_norm=1.0)
    opt.step()
    assert opt.t == 1 and np.isfinite(opt.v[0]).all() and (p < 1).all()


class ArrayStage:
    """A stage of the user's: ``params`` and ``grads`` are plain arrays (module level: picklable)."""

    def __init__(self, params, grads):
        self.params, self.grads = params, grads


def test_rmsprop_refuses_a_first_moment_decay():
    """RMSprop keeps no first moment: a β1 in ``betas`` would do nothing, so it is refused."""
    opt = RMSprop(LSTM1D(2, 3))
    with pytest.raises(ValueError, match=r"no first moment: betas\[0\] must be 0, got 0.9"):
        opt.betas = (0.9, 0.8)
    opt.betas = (0.0, 0.8)
    assert opt.rho == 0.8


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("shape", [(4,), (2, 3)])
def test_copies_of_an_optimiser_over_arrays_update_the_copied_arrays(how, shape):
    """A stage with array ``params`` (and a bare (param, grad) pair) copied with its optimiser:
    the copied optimiser updates the copied arrays and reads the copied gradients (it kept
    reshape views, which a copy cut loose from the arrays they viewed)."""
    import copy
    import pickle

    stage = ArrayStage(np.ones(shape), np.full(shape, 0.5))
    pair = (np.ones(shape), np.full(shape, 0.5))
    bundle = (stage, pair, Adam([stage, pair], lr=0.1))
    copied = copy.deepcopy(bundle) if how == "deepcopy" else pickle.loads(pickle.dumps(bundle))
    twin, twin_pair, twin_opt = copied
    twin.grads[...] = -1.0  # the copied gradients: the update must follow them
    twin_opt.step()
    np.testing.assert_allclose(twin.params, 1.1)
    np.testing.assert_allclose(twin_pair[0], 0.9)
    np.testing.assert_array_equal(stage.params, 1.0)  # the original did not move
    assert twin_opt.m[0].shape == (int(np.prod(shape)),)  # moments stay flat (checkpoint layout)


def test_rmsprop_rho_is_checked_and_used_when_changed_later():
    """``opt.rho = ...`` between steps (a schedule) changes the decay the next step uses, and a
    bad value is refused as in the constructor (it used to be a plain attribute nothing read)."""
    p, g = np.zeros(2), np.array([0.3, -0.4])
    opt = RMSprop([(p, g)], lr=0.1, rho=0.9)
    for bad, exc in ((1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError), ("0.5", TypeError)):
        with pytest.raises(exc, match="rho"):
            opt.rho = bad
        with pytest.raises(exc, match="rho"):
            RMSprop([(p, g)], rho=bad)
    assert opt.rho == 0.9 and opt.betas == (0.0, 0.9)
    opt.rho = 0.5
    opt.step()
    np.testing.assert_allclose(opt.v[0], 0.5 * g**2)
    assert opt.rho == 0.5 and opt.betas == (0.0, 0.5)


@pytest.mark.parametrize("kind", [Adam, RMSprop])
def test_a_gradient_below_clip_norm_is_not_scaled(kind):
    """clip_norm only ever scales down: a gradient of norm 0.5 under clip_norm 10 updates exactly
    as without clipping (not scaled up to the norm 10)."""
    runs = []
    for clip in (None, 10.0):
        p, g = np.zeros(3), np.array([0.3, 0.4, 0.0])
        opt = kind([(p, g)], lr=0.1, clip_norm=clip)
        assert opt.step() == pytest.approx(0.5)
        runs.append((p, opt.m[0], opt.v[0]))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(runs[0][2], (1 - opt.betas[1]) * np.array([0.09, 0.16, 0.0]))


def test_flat_vectors_are_new_arrays_in_the_optimisers_order():
    """params_to_vector / grads_to_vector: new vectors (the layers' own buffers are rewritten by
    every update and backward), in the order of Adam's buffers, in the dtype asked for;
    vector_to_params writes one back, cast to each layer's dtype, all or nothing."""
    from mdnumba import Linear, grads_to_vector, params_to_vector, vector_to_params
    from mdnumba.models import Sequential
    net = Sequential(LSTM1D(2, 3, seed=1, dtype=np.float64), Linear(3, 2, seed=2))
    opt = Adam(net)
    rng = np.random.default_rng(0)
    for _, g in opt.buffers:
        g[...] = rng.standard_normal(g.shape)
    theta, grad = params_to_vector(net), grads_to_vector(net, np.float32)
    assert theta.dtype == np.float64 and grad.dtype == np.float32  # float64 and float32 layers: float64
    np.testing.assert_array_equal(theta, np.concatenate([p for p, _ in opt.buffers]))
    np.testing.assert_array_equal(grad, np.concatenate([g for _, g in opt.buffers]).astype(np.float32))
    assert params_to_vector(net.layers[1]).dtype == np.float32
    for one in (params_to_vector(net.layers[1]), grads_to_vector(net.layers[1])):  # one buffer: a copy too
        assert not np.shares_memory(one, net.layers[1].params.data)
        assert not np.shares_memory(one, net.layers[1].grads.data)
    net.zero_grad()
    assert np.abs(grad).sum() > 0 and not np.shares_memory(theta, net.layers[0].params.data)
    n0 = net.layers[0].params.data.size
    new = theta + 0.1
    vector_to_params(new, net)
    cast = np.concatenate([new[:n0], new[n0:].astype(np.float32)])  # the Linear's part in float32
    np.testing.assert_array_equal(params_to_vector(net), cast)
    before = params_to_vector(net)
    bad = before.copy()
    bad[0], bad[-1] = 1e39, 1e39  # the float64 LSTM1D's part takes it, the float32 Linear's does not
    with pytest.raises(ValueError, match="overflow float32"):
        vector_to_params(bad, net)
    np.testing.assert_array_equal(params_to_vector(net), before)  # not even the LSTM1D's part
    for vec, match in ((before[:-1], rf"the vector has shape \({before.size - 1},\), the parameters "
                                     rf"\({before.size},\)"),
                       (np.array(["a"] * before.size), "cannot assign"),
                       (np.where(np.arange(before.size) == 1, np.nan, before),
                        r"the vector holds 1 NaN or infinite values at \[0:\d+\]; no weight was changed")):
        with pytest.raises(ValueError, match=match):
            vector_to_params(vec, net)
    with pytest.raises(TypeError, match="dtype must be a floating-point type .*, got int32: values would"):
        params_to_vector(net, np.int32)
    with pytest.raises(ValueError, match="the same parameters appear twice"):
        params_to_vector([net, net.layers[0]])
    with pytest.raises(ValueError, match="list holds no parameters"):
        grads_to_vector([])


@pytest.mark.parametrize("make", [Adam, RMSprop])
def test_an_optimiser_refuses_a_gradient_that_shares_memory_with_a_parameter(make):
    """``Adam([(a, a)])`` was taken: each step updated the weights by themselves."""
    a, b = np.ones(4), np.zeros(4)
    for pairs in ([(a, a)], [(a, b), (np.ones(4), b)], [(a[:3], a[1:])]):
        with pytest.raises(ValueError, match="a gradient array shares memory with a parameter"):
            make(pairs)
    make([(a[:2], a[2:])])  # two views of one array that do not overlap


def test_an_optimiser_zeroes_the_gradients_it_reads():
    """opt.zero_grad() (PyTorch's habit): every layer it updates, as each layer's zero_grad."""
    from mdnumba import Linear
    from mdnumba.models import Sequential
    net = Sequential(LSTM1D(2, 3), Linear(3, 1))
    opt = Adam(net)
    for _, g in opt.buffers:
        g[...] = 1.0
    opt.zero_grad()
    assert all(not g.any() for _, g in opt.buffers) and not net.layers[0].grads.data.any()
