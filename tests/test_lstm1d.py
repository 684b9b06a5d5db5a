"""1D LSTM kernel vs reference and finite differences."""

import numpy as np
import pytest
from gradcheck import assert_grad_close, check_layer_gradients, numeric_grad
from refcheck import check_against_reference, check_state_against_reference

from mdnumba import LSTM1D
from mdnumba import reference as ref


@pytest.mark.parametrize("shape", [(2, 5, 3), (1, 1, 2), (3, 17, 4)])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_matches_reference(shape, dtype, rtol, rng):
    layer = LSTM1D(shape[-1], 5, seed=4, dtype=dtype)
    x = rng.standard_normal(shape).astype(dtype)
    y = layer.forward(x)
    assert y.shape == shape[:2] + (5,)
    p = {k: v.astype(np.float64) for k, v in layer.params.items()}
    yr, cache = ref.lstm1d_forward(x, p["W"], p["U"][:, 0], p["b"])
    np.testing.assert_allclose(y, yr, rtol=rtol, atol=rtol)
    dh = rng.standard_normal(y.shape)
    dx = layer.backward(dh.astype(dtype))
    rdx, rdW, rdU, rdb = ref.lstm1d_backward(dh, cache)
    for got, want in [(dx, rdx), (layer.grads.W, rdW), (layer.grads.U_rec, rdU),
                      (layer.grads.b, rdb)]:
        np.testing.assert_allclose(got, want, rtol=10 * rtol, atol=10 * rtol)


@pytest.mark.parametrize("directions", [1, 2])
def test_tall_tiles_match_reference(directions, rng):
    """Batch 13: pairs of groups of 4 rows in tall register tiles (the batch schedule's chunks and
    input panels, the weight gradients' rows of K), the lone group of 1 row in a small one;
    float64 tiles of hidden 18 (72 gate columns: 4 whole panels and a partial one of 8)."""
    layer = LSTM1D(5, 18, directions=directions, seed=2, dtype=np.float64)
    x = rng.standard_normal((13, 6, 5))
    check_against_reference(layer, x, rng.standard_normal((13, 6, directions * 18)), 1e-12)
    np.testing.assert_array_equal(layer.forward(x, save=False), layer.forward(x))


@pytest.mark.parametrize("zeros", [False, True])
def test_gradients_finite_differences(zeros, rng):
    layer = LSTM1D(3, 4, seed=1, dtype=np.float64)
    x = np.zeros((2, 6, 3)) if zeros else rng.standard_normal((2, 6, 3))
    check_layer_gradients(layer, x, rng)


def test_causal_in_time(rng):
    layer = LSTM1D(2, 3, dtype=np.float64)
    x = rng.standard_normal((1, 8, 2))
    y = layer.forward(x)
    x[0, 5] += 1
    y2 = layer.forward(x)
    np.testing.assert_array_equal(y[0, :5], y2[0, :5])
    assert np.abs(y[0, 5:] - y2[0, 5:]).min() > 0


# ------------------------------------------------------------------ initial / final state
def _state_case(rng, B=3, T=5, C=2, D=4, S=1):
    x = rng.standard_normal((B, T, C))
    state = (rng.standard_normal((B, S * D)), rng.standard_normal((B, S * D)))
    final_grad = (rng.standard_normal((B, S * D)), rng.standard_normal((B, S * D)))
    return x, state, rng.standard_normal((B, T, S * D)), final_grad


@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("cell", ["graves", "spatial"])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_state_matches_reference(directions, cell, dtype, rtol, rng):
    layer = LSTM1D(2, 4, directions=directions, cell=cell, dtype=dtype, seed=3)
    x, state, dh, final_grad = _state_case(rng, S=directions)
    check_state_against_reference(layer, x, state, dh, final_grad, rtol)


@pytest.mark.parametrize("T,cell,directions,B,D", [
    (1, "graves", 2, 2, 3), (4, "graves", 2, 2, 3),
    (3, "spatial", 2, 2, 3),   # h = tanh(c·o): cell 0 (o = 0) and the pad pass dL/dc through
    (3, "stable", 1, 2, 3),    # stable N = 1: the pad's forget gate is the only factor of dL/dc_T
    (3, "graves", 1, 3, 5)])   # odd batch, hidden 5: the single-row four-unit pulls
def test_state_gradients_finite_differences(T, cell, directions, B, D, rng):
    """dL/dx, the weights' and the initial state's gradients, with a loss on the output and on
    the final state (h_T, c_T), against central differences."""
    layer = LSTM1D(2, D, directions=directions, cell=cell, dtype=np.float64, seed=5)
    layer.params.data[...] += rng.standard_normal(layer.params.data.shape) * 0.3
    x, (h0, c0), w, (wh, wc) = _state_case(rng, B=B, T=T, C=2, D=D, S=directions)

    def loss():
        y = layer.forward(x, state=(h0, c0))
        hT, cT = layer.final_state()
        return float(np.sum(w * y) + np.sum(wh * hT) + np.sum(wc * cT))

    loss()
    layer.zero_grad()
    dx = layer.backward(w, final_state_grad=(wh, wc))
    dh0, dc0 = layer.initial_state_grad()
    for name, got, arr in (("dx", dx, x), ("dh0", dh0, h0), ("dc0", dc0, c0)):
        assert_grad_close(got, numeric_grad(loss, arr), name=name)
    for name in layer.layout.shapes:
        assert_grad_close(layer.grads[name], numeric_grad(loss, layer.params[name]), name=name)


def test_chunks_chain_like_one_sequence(rng):
    """Two chunks, the second starting from the first's final state and the first's backward
    taking the second's initial-state gradient, give the one-sequence outputs and gradients."""
    x, _, dh, _ = _state_case(rng, B=2, T=7)
    whole, first, second = (LSTM1D(2, 4, dtype=np.float64, seed=2) for _ in range(3))
    y = whole.forward(x)
    dx = whole.backward(dh)
    y1 = first.forward(x[:, :3], state=first.zero_state(2))
    y2 = second.forward(x[:, 3:], state=first.final_state())
    np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), y, rtol=1e-13, atol=1e-13)
    dx2 = second.backward(dh[:, 3:])
    dx1 = first.backward(dh[:, :3], final_state_grad=second.initial_state_grad())
    np.testing.assert_allclose(np.concatenate([dx1, dx2], axis=1), dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(first.grads.data + second.grads.data, whole.grads.data, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(second.final_state()[0], whole.final_state()[0], rtol=1e-13, atol=1e-13)


def test_zero_state_is_the_default(rng):
    layer = LSTM1D(2, 3, directions=2, seed=1)
    x = rng.standard_normal((2, 4, 2)).astype(np.float32)
    y, final = layer.forward(x), layer.final_state()
    np.testing.assert_array_equal(layer.forward(x, state=layer.zero_state(2)), y)
    for a, b in zip(layer.final_state(), final):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(final[0][:, :3], y[:, -1, :3])  # forward scan: its last step
    np.testing.assert_array_equal(final[0][:, 3:], y[:, 0, 3:])   # reversed scan: time 0


def test_state_errors(rng):
    layer = LSTM1D(2, 3, seed=1)
    x = rng.standard_normal((2, 4, 2))
    with pytest.raises(TypeError, match=r"state must be a pair \(h, c\)"):
        layer.forward(x, state=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"state\[1\] has 4 channels"):
        layer.forward(x, state=(np.zeros((2, 3)), np.zeros((2, 4))))
    with pytest.raises(ValueError, match=r"state\[0\] is for a batch of 3, the input's batch is 2"):
        layer.forward(x, state=(np.zeros((3, 3)), np.zeros((3, 3))))
    bad = np.zeros((2, 3))
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"state\[0\] contains 1 NaN"):
        layer.forward(x, state=(bad, np.zeros((2, 3))))
    y = layer.forward(x)
    with pytest.raises(ValueError, match="final_state_grad needs a forward from a state"):
        layer.backward(np.ones_like(y), final_state_grad=layer.zero_state(2))
    layer.backward(np.ones_like(y))
    with pytest.raises(RuntimeError, match="no initial-state gradient"):
        layer.initial_state_grad()
    layer.forward(x, state=layer.zero_state(2))
    with pytest.raises(ValueError, match=r"final_state_grad\[0\] is for a batch of 1"):
        layer.backward(np.ones_like(y), final_state_grad=(np.zeros((1, 3)), np.zeros((1, 3))))
    with pytest.raises(RuntimeError, match="no saved activations; run forward"):
        LSTM1D(2, 3).final_state()


def test_state_results_are_the_callers(rng):
    """initial_state_grad() and final_state() hand out copies; a NaN in final_state_grad is
    blamed on what produced the gradient."""
    layer = LSTM1D(2, 3, dtype=np.float64, seed=1)
    x, state, dh, final_grad = _state_case(rng, B=2, T=3, D=3)
    layer.forward(x, state=state)
    layer.backward(dh)
    dh0 = layer.initial_state_grad()[0]
    want = dh0.copy()
    dh0[...] = 0
    np.testing.assert_array_equal(layer.initial_state_grad()[0], want)
    layer.forward(x, state=state)
    with pytest.raises(ValueError, match=r"final_state_grad\[1\] contains 6 NaN .*the loss or the stages"):
        layer.backward(dh, final_state_grad=(final_grad[0], final_grad[1] * np.nan))
