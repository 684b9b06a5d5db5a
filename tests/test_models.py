"""Models, readout and losses: finite differences end to end, reshapes, loss gradients."""

import numpy as np
import pytest
from gradcheck import assert_grad_close, check_layer_gradients, numeric_grad

from mdnumba import NonFiniteError
from mdnumba.layers import Linear
from mdnumba.losses import bce_logits, mse_sigmoid, sigmoid
from mdnumba.models import build_model


def test_linear_gradients(rng):
    check_layer_gradients(Linear(3, 2, dtype=np.float64), rng.standard_normal((2, 4, 3)), rng)


@pytest.mark.parametrize("loss_fn", [mse_sigmoid, bce_logits])
def test_loss_gradients(loss_fn, rng):
    z = rng.standard_normal((3, 4))
    y = rng.uniform(0, 1, (3, 4))
    _, dz, p = loss_fn(z, y)
    assert_grad_close(dz, numeric_grad(lambda: loss_fn(z, y)[0], z), name=loss_fn.__name__)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-z)))


@pytest.mark.parametrize("loss_fn", [mse_sigmoid, bce_logits])
def test_a_loss_refuses_targets_of_another_shape(loss_fn):
    """A (3,) target against (3, 1) logits would broadcast to a (3, 3) loss: a wrong number."""
    with pytest.raises(ValueError, match=r"y of shape \(3,\) do not match the logits z of shape \(3, 1\)"):
        loss_fn(np.zeros((3, 1)), np.ones(3))


@pytest.mark.parametrize("loss_fn", [mse_sigmoid, bce_logits])
def test_a_loss_refuses_what_is_not_real_numbers_or_nothing(loss_fn):
    """Empty logits were a ZeroDivisionError (mse) or a NaN loss (bce); complex targets gave a
    complex gradient, strings or None NumPy's own errors: each is named now. Integer logits and
    targets are numbers (the gradient float64)."""
    for z, y, error, said in ((np.zeros(0), np.zeros(0), ValueError, r"^logits z is empty \(shape \(0,\)\)"),
                              (np.zeros(2), np.zeros(2, complex), TypeError, "^targets y must hold real "
                               r"numbers \(floating point or integer\), got dtype complex128$"),
                              (None, None, TypeError, "^logits z must hold real numbers .* dtype object"),
                              (["a"], ["b"], TypeError, "^logits z must hold real numbers .* dtype <U1"),
                              (np.zeros(2, bool), np.zeros(2), TypeError, "^logits z must hold real")):
        with pytest.raises(error, match=said):
            loss_fn(z, y)
    loss, dz, _ = loss_fn(np.array([0, 1]), np.array([0, 1]))
    want = loss_fn(np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    assert loss == want[0] and dz.dtype == np.float64 and np.array_equal(dz, want[1])


def test_a_loss_refuses_nan_logits_and_takes_infinite_ones_at_their_limit():
    """bce of an infinite logit was inf − inf = NaN with a finite gradient (a training loop went
    on), and NaN logits were taken: bce and mse now take ±inf at their limits and refuse NaN;
    the softmax cross-entropy, without a limit for several infinite logits, refuses both."""
    from mdnumba.charlm import softmax_xent
    z, y = np.array([np.inf, np.inf, -np.inf, -np.inf, np.inf]), np.array([1.0, 0.0, 0.0, 1.0, 0.5])
    loss, dz, p = bce_logits(z[[0, 2]], y[[0, 2]])
    assert loss == 0.0 and not dz.any() and list(p) == [1.0, 0.0]
    for k in (1, 3, 4):  # σ(z) the opposite of the target, or a target inside (0, 1): +inf
        assert bce_logits(z[[0, k]], y[[0, k]])[0] == np.inf
    np.testing.assert_array_equal(bce_logits(z, y)[1], (sigmoid(z) - y) / 5)
    assert mse_sigmoid(z, y)[0] == pytest.approx((1 + 1 + 0.25) / 5) and not mse_sigmoid(z, y)[1].any()
    for loss_fn in (mse_sigmoid, bce_logits):
        with pytest.raises(NonFiniteError, match=r"^logits z hold 1 NaN values \(of 3\): the model's output"):
            loss_fn(np.array([0.5, np.nan, np.inf]), np.ones(3))
    for bad in (np.inf, -np.inf, np.nan):
        with pytest.raises(NonFiniteError, match=r"^logits hold 1 NaN or infinite values \(of 3\)"):
            softmax_xent(np.array([[0.5, bad, 1.0]]), np.array([0]))


def test_bce_takes_targets_in_0_1_only():
    """A target of 2 or -1 is no probability: the loss was a number without meaning."""
    z, y = np.array([-1.0, 0.5, 2.0]), np.array([0, 0.25, 1])  # integer and float targets alike
    want = np.mean(np.log1p(np.exp(z)) - y * z)
    assert bce_logits(z, y)[0] == pytest.approx(want) == bce_logits(z, np.array([0.0, 0.25, 1.0]))[0]
    for y, got in (([2.0, -1.0], "values from -1.0 to 2.0"), ([1.0, 255.0], "values from 1.0 to 255.0"),
                   ([np.nan, 1.0], "NaN")):  # a 0/255 mask: too large, though none is negative
        with pytest.raises(ValueError, match=rf"^bce_logits takes targets y in \[0, 1\] .*, got {got}$"):
            bce_logits(np.zeros(2), np.array(y))


def test_sigmoid_of_integers_is_a_float():
    np.testing.assert_allclose(sigmoid(np.array([-2, 0, 3])), 1 / (1 + np.exp(-np.array([-2.0, 0.0, 3.0]))))


def test_bce_is_finite_for_extreme_logits():
    loss, dz, _ = bce_logits(np.array([-1e4, 1e4]), np.array([1.0, 0.0]))
    assert np.isfinite(loss) and np.isfinite(dz).all() and loss > 1e3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loss_gradients_keep_their_precision_at_saturated_logits(dtype):
    """σ(z) rounds to 1 for large positive z: 1 − σ(z) and σ(z) − y lost every digit there (a
    confidently wrong positive logit had a zero mse gradient from z ≈ 17 in float32, 37 in
    float64), while negative logits kept theirs. Against the exact values of σ(±z) in float64."""
    z = np.array([10.0, 17.0, 30.0, 40.0, -10.0, -17.0, -30.0, -40.0])
    for y in (0.0, 1.0, 0.25):
        yy = np.full(z.shape, y)
        p, q = 1 / (1 + np.exp(-z)), 1 / (1 + np.exp(z))  # σ(z), σ(−z): no cancellation in either
        err = np.where(z > 0, (1 - y) - q, p - y)
        _, g_mse, _ = mse_sigmoid(z.astype(dtype), yy)
        _, g_bce, _ = bce_logits(z.astype(dtype), yy)
        keep = np.abs(z) < (80 if dtype == np.float32 else 700)  # representable in dtype
        np.testing.assert_allclose(g_mse[keep], (2 / z.size * err * p * q)[keep], rtol=1e-6)
        np.testing.assert_allclose(g_bce[keep], (err / z.size)[keep], rtol=1e-6)


@pytest.mark.parametrize("kind,shape,loss_fn,kw", [
    ("md", (2, 3, 4, 1), mse_sigmoid, dict(hidden=3)),
    ("horizontal", (2, 3, 4, 1), mse_sigmoid, dict(hidden=3)),
    ("snake", (2, 3, 4, 1), mse_sigmoid, dict(hidden=3)),
    # what the trainers build from --layers/--directions/--cell
    ("lstm", (2, 4, 2), bce_logits, dict(hidden=2, directions=2, layers=2, cell="spatial")),
    ("md3d", (1, 2, 2, 2, 1), bce_logits, dict(hidden=2, cell="stable")),
    ("md", (1, 2, 2, 1), bce_logits, dict(hidden=1, directions=4, layers=2, cell="stable"))])
def test_model_gradients_end_to_end(kind, shape, loss_fn, kw, rng):
    """dL/dx and every layer's gradients of a model with its loss against central differences."""
    model = build_model(kind, in_channels=shape[-1], seed=2, dtype=np.float64, **kw)
    x = rng.uniform(0, 1, shape)
    y = rng.uniform(0, 1, shape[:-1] + (1,))

    def loss():
        return loss_fn(model.forward(x), y)[0]

    model.zero_grad()
    _, dz, _ = loss_fn(model.forward(x), y)
    dx = model.backward(dz)
    assert_grad_close(dx, numeric_grad(loss, x), name="dx")
    for k, layer in enumerate(model.layers):
        assert_grad_close(layer.grads.data, numeric_grad(loss, layer.params.data), name=f"{kind} layer {k}")


def test_horizontal_treats_rows_independently(rng):
    model = build_model("horizontal", hidden=3, dtype=np.float64)
    x = rng.uniform(0, 1, (1, 4, 5, 1))
    y = model.forward(x)
    x[0, 2, 0] += 1.0
    y2 = model.forward(x)
    changed = np.abs(y2 - y).reshape(4, 5).max(axis=1) > 0
    assert changed.tolist() == [False, False, True, False]


def test_snake_carries_state_across_rows(rng):
    model = build_model("snake", hidden=3, dtype=np.float64)
    x = rng.uniform(0, 1, (1, 4, 5, 1))
    y = model.forward(x)
    x[0, 1, 4] += 1.0  # last cell of row 1 influences all of rows 2..3
    y2 = model.forward(x)
    assert (np.abs(y2 - y)[0, 2:] > 0).all() and (y2[0, :1] == y[0, :1]).all()


def test_unknown_model():
    with pytest.raises(ValueError, match="choose one of"):
        build_model("transformer")


@pytest.mark.parametrize("name", ["diagonal", "diagonal3d"])
def test_task_probe_covers_what_metrics_read(name, rng):
    """The device trainer copies back only ``task.probe`` of the probabilities: metrics computed
    from those alone must equal metrics from the whole array."""
    from mdnumba.tasks import get_task
    task = get_task(name)
    batch = task.sample(rng, 3, 6, np.float64)
    prob = rng.random(batch.y.shape)
    idx = task.probe(prob.shape, batch)
    sparse = np.zeros_like(prob)
    sparse.reshape(-1)[idx] = prob.reshape(-1)[idx]
    assert len(idx) == 3 and task.metrics(sparse, 0.5, batch) == task.metrics(prob, 0.5, batch)


def _stack(**kw):
    from mdnumba.stack import mdlstm_stack
    return mdlstm_stack(2, 2, 3, dtype=np.float64, seed=1, **kw)


def _model(kind, **kw):
    return build_model(kind, in_channels=2, hidden=3, seed=1, dtype=np.float64, **kw)


@pytest.mark.parametrize("build,shape", [
    (lambda: _model("md", directions=4), (2, 4, 4, 2)),
    (lambda: _model("lstm", directions=2), (2, 5, 2)),
    (lambda: _stack(layers=2, subsample=2), (2, 4, 4, 2)),
    (lambda: _stack(layers=1, directions=4), (2, 3, 4, 2))])
def test_backward_without_input_grad(build, shape, rng):
    """``input_grad=False`` (what training uses): the same parameter gradients, no dL/dx."""
    model = build()
    x = rng.uniform(0, 1, shape)
    dz = rng.standard_normal(model.forward(x).shape)
    grads = []
    for input_grad in (True, False):
        model.zero_grad()
        model.forward(x)
        dx = model.backward(dz, input_grad=input_grad)
        assert (dx is None) == (not input_grad)
        grads.append(np.concatenate([layer.grads.data.copy() for layer in model.layers]))
    np.testing.assert_array_equal(grads[1], grads[0])


def test_nested_sequential_with_linear_trains_every_layer(rng):
    """A Sequential stage inside a Sequential: its layers are the outer one's too (gradients
    zeroed, checked against finite differences, updated by Adam); Linear takes input_grad."""
    from mdnumba import Adam
    from mdnumba.stack import Sequential
    inner = _stack(layers=2, subsample=2)
    net = Sequential(inner, Linear(3, 2, dtype=np.float64))
    assert net.layers == inner.layers + [net.stages[1]]
    x = rng.uniform(0, 1, (2, 4, 4, 2))
    w = rng.standard_normal(net.forward(x).shape)

    def loss():
        return float(np.sum(w * net.forward(x)))
    for layer in net.layers:
        layer.grads.data[...] = 1.0  # zero_grad must reach the nested layers
    net.zero_grad()
    net.forward(x)
    assert_grad_close(net.backward(w), numeric_grad(loss, x), name="dx")
    for k, layer in enumerate(net.layers):
        assert_grad_close(layer.grads.data, numeric_grad(loss, layer.params.data), name=f"layer {k}")
    before = [layer.params.data.copy() for layer in net.layers]
    Adam(net, lr=0.1).step()
    assert all((b != layer.params.data).all() for b, layer in zip(before, net.layers))


@pytest.mark.parametrize("ndim,k", [(1, 3), (2, 2), (3, 2)])
def test_block_subsample_channel_order_and_inverse(ndim, k, rng):
    """Output cell (b, i_1..i_N), channel (o_1..o_N, c) in row-major order holds input cell
    (b, k·i_1 + o_1, .., k·i_N + o_N), channel c; backward puts every value back."""
    from mdnumba import BlockSubsample
    C, dims = 2, (2 * k, k, 3 * k)[:ndim]
    x = rng.standard_normal((2,) + dims + (C,))
    sub = BlockSubsample(k, ndim=ndim)
    y = sub.forward(x)
    assert y.shape == (2,) + tuple(n // k for n in dims) + (k ** ndim * C,)
    for idx in np.ndindex(y.shape):
        b, cell, ch = idx[0], idx[1:-1], idx[-1]
        offsets, c = np.unravel_index(ch, (k,) * ndim + (C,))[:-1], ch % C
        assert y[idx] == x[(b,) + tuple(k * i + o for i, o in zip(cell, offsets)) + (c,)]
    np.testing.assert_array_equal(sub.backward(y), x)


@pytest.mark.parametrize("ndim", [2, 3])
def test_diagonal_task_is_the_designed_one(ndim):
    """The task as designed: x ~ U[0, 0.1] with 1s at p and p + (1,..,1), p uniform in [1, n-2]^N; y is x
    shifted one step back along the last axis (wrapping); ``second`` is y's second 1."""
    from mdnumba.tasks.diagonal import sample_diagonal_nd
    n = 6
    b = sample_diagonal_nd(np.random.default_rng(0), 400, n, ndim, np.float64)
    x, y = b.x[..., 0], b.y[..., 0]
    np.testing.assert_array_equal(y, np.roll(x, -1, axis=ndim))
    p = b.second.copy()
    p[:, :-1] -= 1  # second = p + (1, .., 1, 0)
    assert p.min() == 1 and p.max() == n - 2 and all(len(np.unique(p[:, d])) == n - 2 for d in range(ndim))
    bi = np.arange(400)
    assert (x[(bi,) + tuple(p.T)] == 1).all() and (x[(bi,) + tuple(p.T + 1)] == 1).all()
    assert (y[(bi,) + tuple(b.second.T)] == 1).all()
    assert (x == 1).sum() == 800 and x[x != 1].max() < 0.1 and x.min() >= 0


def test_task_metrics_values():
    from mdnumba.tasks.binary_addition import AdditionBatch, addition_metrics, sample_addition
    from mdnumba.tasks.diagonal import diagonal_metrics, sample_diagonal
    batch = sample_diagonal(np.random.default_rng(0), 4, 5, np.float64)
    prob = np.full(batch.y.shape, 0.9)
    prob[(np.arange(4),) + tuple(batch.second.T) + (0,)] = [0.5, 0.5, 0.9, 0.2]
    m = diagonal_metrics(prob, 1.5, batch)
    assert m == pytest.approx({"loss": 1.5, "relevant_loss": (0.25 * 2 + 0.01 + 0.64) / 4,
                               "second_x_acc": 0.25})
    y = np.ones((2, 2, 1))
    m = addition_metrics(np.array([[0.9, 0.1], [0.9, 0.9]])[..., None], 0.3, AdditionBatch(y, y))
    assert m == pytest.approx({"loss": 0.3, "bit_acc": 0.75, "number_acc": 0.5})
    add = sample_addition(np.random.default_rng(0), 50, 6)
    weights = 2 ** np.arange(7)
    a, b, s = add.x[..., 0] @ weights, add.x[..., 1] @ weights, add.y[..., 0] @ weights
    np.testing.assert_array_equal(a + b, s)
    assert a.max() < 64 and b.max() < 64   # 6-bit numbers, the 7th step holds the carry


def test_sigmoid_readout_never_overflows():
    """σ(z) for |z| up to 1e4 with no floating-point warning (exp only of −|z|)."""
    import warnings

    from mdnumba.losses import sigmoid
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(sigmoid(np.array([-1e4, 0.0, 1e4])), [0.0, 0.5, 1.0])


def test_every_task_takes_its_smallest_size_and_refuses_one_less():
    from mdnumba.tasks import TASKS
    for task in TASKS.values():
        task.check_size(task.min_size)
        with pytest.raises(ValueError, match=f"must be >= {task.min_size}, got {task.min_size - 1}$"):
            task.check_size(task.min_size - 1)


def test_stacks_of_neighbouring_seeds_share_no_layer():
    """Layer k > 0 of seed s must not start with layer 0's weights of seed s + k (as ``seed + k``
    would give): a sweep over consecutive seeds would train correlated models."""
    from mdnumba.stack import mdlstm_stack
    stacks = [mdlstm_stack(2, 3, 3, layers=3, seed=s, dtype=np.float64) for s in range(3)]
    layers = [(s, k, stage.params.data) for s, stack in enumerate(stacks)
              for k, stage in enumerate(stack.stages)]
    assert all(a.shape == layers[0][2].shape for _, _, a in layers)  # else the check below is void
    for i, (s, k, a) in enumerate(layers):
        for t, m, b in layers[i + 1:]:
            assert not np.array_equal(a, b), ((s, k), (t, m))


def test_task_layouts_describe_their_batches(rng):
    """What ``mdnumba predict`` tells a user to give: the rank and channels of the task's x."""
    from mdnumba.tasks import TASKS
    for task in TASKS.values():
        if task.sample is None:  # char-lm reads text
            continue
        x = task.sample(rng, 2, task.min_size + 1).x
        assert task.layout.count(",") + 1 == x.ndim and task.layout.endswith(f" {x.shape[-1]})"), task
        assert (x.ndim, x.shape[-1]) == (task.ndim + 2, task.in_channels), task  # what predict checks


@pytest.mark.parametrize("loss_fn,per_logit", [
    (mse_sigmoid, lambda z, y: (sigmoid(z) - y) ** 2),
    (bce_logits, lambda z, y: np.logaddexp(0.0, z) - y * z)])
def test_losses_are_means_over_every_logit(loss_fn, per_logit):
    """The loss is the mean over every logit of the batch, not a sum per item (the logged loss
    would grow with the grid; the gradient check holds either way), and p and dL/dz come back
    in the logits' dtype."""
    z = np.array([[0.5, -1.0, 2.0], [0.0, 1.5, -0.5]], np.float32)[..., None]  # (2 items, 3 cells, 1)
    y = np.array([[1.0, 0.0, 1.0], [0.5, 1.0, 0.0]], np.float32)[..., None]
    loss, dz, p = loss_fn(z, y)
    want = np.mean(per_logit(z.astype(np.float64), y.astype(np.float64)))
    assert loss == pytest.approx(want, rel=1e-6)
    assert p.dtype == dz.dtype == np.float32


def test_addition_metrics_count_a_number_only_with_all_its_bits_right():
    """number_acc is the share of items (the batch axis) whose every step is right, here on a
    batch of more steps than items; a probability of exactly 0.5 is right for neither bit."""
    from mdnumba.tasks.binary_addition import AdditionBatch, addition_metrics
    y = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])[..., None]       # (2 items, 3 steps, 1)
    prob = np.array([[0.9, 0.1, 0.8], [0.2, 0.5, 0.7]])[..., None]    # item 1's step 1: undecided
    m = addition_metrics(prob, 0.1, AdditionBatch(np.zeros((2, 3, 2)), y))
    assert m == pytest.approx({"loss": 0.1, "bit_acc": 5 / 6, "number_acc": 0.5})


def test_linear_starts_uniform_within_the_fan_in_bound():
    """W ~ U(-1/sqrt(in_features), 1/sqrt(in_features)) (as PyTorch's nn.Linear), b = 0: the
    bound is the fan-in's, so a wide readout does not start smaller."""
    lin = Linear(4, 64, seed=3, dtype=np.float64)
    top = np.abs(lin.params.W).max()
    assert 0.45 < top <= 0.5 and not lin.params.b.any()
