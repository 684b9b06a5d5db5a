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
    with pytest.raises(ValueError, match="shape"):
        Adam(LSTM1D(2, 4)).load_state_dict(state)
