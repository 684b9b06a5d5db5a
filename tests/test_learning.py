"""Short deterministic learning runs: the models learn what they should."""

import numpy as np

from mdnumba.tasks.binary_addition import sample_addition
from mdnumba.tasks.diagonal import sample_diagonal
from mdnumba.train import TrainConfig, Trainer


def relevant_after(model, steps=400, seed=0):
    tr = Trainer(TrainConfig(model=model, size=6, steps=steps, seed=seed))
    hist = []
    tr.run(lambda s, m: hist.append(m["relevant_loss"]))
    return float(np.mean(hist[-50:]))


def test_md_beats_horizontal_on_relevant_loss():
    md, horizontal = relevant_after("md"), relevant_after("horizontal")
    assert md < 0.1, md
    assert horizontal > 0.5, horizontal


def test_binary_addition_learns():
    tr = Trainer(TrainConfig(model="lstm", task="binary-addition", size=6, hidden=16, batch=16,
                             steps=1500, loss="bce"))
    tr.run()
    res = tr.evaluate(size=8, batches=5)
    assert res["bit_acc"] == 1.0 and res["number_acc"] == 1.0, res


def test_generators_are_seeded_and_follow_the_definition():
    a = sample_diagonal(np.random.default_rng(5), 8, 7)
    b = sample_diagonal(np.random.default_rng(5), 8, 7)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y[:, :, :-1], a.x[:, :, 1:])   # shifted one column left
    np.testing.assert_array_equal(a.y[:, :, -1], a.x[:, :, 0])     # wrapping
    assert (a.y[np.arange(8), a.second[:, 0], a.second[:, 1], 0] == 1).all()
    assert ((a.x < 0.1) | (a.x == 1)).all() and (a.x == 1).sum() == 16
    s = sample_addition(np.random.default_rng(0), 32, 9)
    bits = 2 ** np.arange(10)
    va, vb, vs = (s.x[..., 0] @ bits), (s.x[..., 1] @ bits), (s.y[..., 0] @ bits)
    np.testing.assert_array_equal(va + vb, vs)
    assert va.max() < 2**9


def run_metrics(steps=400, **kw):
    tr = Trainer(TrainConfig(steps=steps, **{"size": 6, **kw}))
    hist = []
    tr.run(lambda s, m: hist.append(m))
    return {k: float(np.mean([h[k] for h in hist[-50:]])) for k in hist[0] if k != "time"}


def test_stable_and_spatial_cells_and_stacked_layers_learn_the_diagonal():
    assert run_metrics(cell="stable")["relevant_loss"] < 0.1
    assert run_metrics(cell="spatial", steps=800)["relevant_loss"] < 0.1
    assert run_metrics(layers=2)["relevant_loss"] < 0.1


def test_four_directions_also_predict_the_first_one():
    """The top-right scan sees x[r, c+1], so 4 directions can predict both 1s of the target."""
    one = run_metrics(directions=1)
    four = run_metrics(directions=4, hidden=8)
    assert four["relevant_loss"] < 0.1 and four["loss"] < 0.5 * one["loss"], (one, four)


def test_md3d_learns_diagonal3d():
    m = run_metrics(model="md3d", task="diagonal3d", size=4, hidden=16, steps=800, loss="bce")
    assert m["relevant_loss"] < 0.1, m
