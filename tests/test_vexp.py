"""The vectorisable exp/sigmoid of the CPU kernels (mdnumba.kernels.vexp), and the tanh the CPU
kernels build from them (mdnumba.kernels.cell), vs NumPy."""

import numpy as np
import pytest
from numba import njit

from mdnumba import config
from mdnumba.kernels import vexp
from mdnumba.kernels.cell import build


def _applier(fastmath):
    """``apply(out, x, which)``: exp (0), σ (1) or the cell's tanh (2) elementwise, compiled with
    ``fastmath`` as the sweeps are (the cell functions inlined into a loop,
    :data:`mdnumba.kernels.vexp.CPU_MATH`)."""
    jit = njit(fastmath=fastmath, error_model="numpy")
    tanh = build(njit(inline="always", fastmath=fastmath, error_model="numpy"), **vexp.CPU_MATH)["tanh"]

    @jit
    def apply(out, x, which):
        for i in range(x.shape[0]):
            if which == 0:
                out[i] = vexp.exp(x[i])
            elif which == 1:
                out[i] = vexp.sigmoid(x[i])
            else:
                out[i] = tanh(x[i])
    return apply


#: the flags of the default build and of ``MDNUMBA_FASTMATH=1`` (:data:`mdnumba.config.FASTMATH_FLAGS`)
FLAGS = {"exact": False, "fastmath": set(config.FASTMATH_FLAGS)}
_APPLY = {name: _applier(flags) for name, flags in FLAGS.items()}
_apply = _APPLY["exact"]


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("dtype,lo,hi,rtol", [(np.float64, -708, 708, 4e-16), (np.float32, -87, 87, 2e-7)])
def test_accuracy_against_numpy(flags, dtype, lo, hi, rtol):
    """Also with ``MDNUMBA_FASTMATH``'s flags: with "reassoc" among them the range reduction
    was regrouped (float64 exp 213 ulp off at x = 707)."""
    x = np.linspace(lo, hi, 100_003).astype(dtype)
    x64 = x.astype(np.float64)
    for which, want in ((0, np.exp(x64)), (1, 1 / (1 + np.exp(-x64))), (2, np.tanh(x64))):
        out = np.empty_like(x)
        _APPLY[flags](out, x, which)
        err = np.abs(out - want) / np.maximum(np.abs(want), 1e-30 if which == 0 else 1.0)
        assert err.max() < rtol * (1 if which == 0 else 4), (which, err.max())


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_limits_and_nan(flags, dtype):
    """NaN stays NaN, also with ``MDNUMBA_FASTMATH``'s flags: with "nnan" among them the cell's
    tanh gave 1 for NaN, and a forward whose state overflowed returned a finite h."""
    _apply = _APPLY[flags]
    x = np.array([np.nan, -np.inf, np.inf, -1e30, 1e30, 0.0], dtype)
    out = np.empty_like(x)
    _apply(out, x, 0)
    assert np.isnan(out[0]) and np.all(np.isfinite(out[1:])) and out[5] == 1.0
    _apply(out, x, 1)
    tiny = np.finfo(dtype).tiny  # σ(−∞) is clamped to a tiny *normal* number, not a subnormal
    assert np.isnan(out[0]) and tiny <= out[1] < 4 * tiny and out[2] == 1.0 and out[5] == 0.5
    _apply(out, x, 2)
    assert np.isnan(out[0]) and out[1] == -1.0 and out[2] == 1.0 and out[5] == 0.0


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 4e-15), (np.float32, 1.5e-6)])
def test_tanh_keeps_its_relative_precision_near_zero(dtype, rtol):
    """2σ(2x) − 1 alone cancels near 0 (float32 tanh(1e-6) was 19% off, tanh(1e-8) 0); the
    series below |x| = 0.1 keeps tanh(x)/x right down to the smallest normal numbers."""
    mag = np.geomspace(np.finfo(dtype).tiny, 2.0, 20_001)
    x = np.concatenate([mag, -mag]).astype(dtype)
    out = np.empty_like(x)
    _apply(out, x, 2)
    want = np.tanh(x.astype(np.float64))
    err = np.abs(out - want) / np.abs(want)
    assert err.max() < rtol, (x[err.argmax()], err.max())


def test_python_fallback_is_numpy():
    assert vexp.exp(1.0) == np.exp(1.0) and vexp.sigmoid(0.0) == 0.5


@pytest.mark.parametrize("dtype,lo,hi,ulps", [
    (np.float64, 0.0, 0.1, 1), (np.float64, 0.1, 0.5, 16), (np.float64, 0.5, 20.0, 6),
    (np.float32, 0.0, 0.1, 3), (np.float32, 0.1, 0.5, 4), (np.float32, 0.5, 20.0, 6)])
@pytest.mark.parametrize("sign", [1, -1])
def test_tanh_ulps(dtype, lo, hi, ulps, sign):
    """The cell's tanh in units in the last place (the README's figures). float64: its Taylor
    series for |x| < 0.1, ``2σ(2x) − 1`` from there on, which cancels most just above 0.1
    (~15.5 ulp). float32: the rational ``x·P(x²)/Q(x²)`` (max 2.8, 3.4, 5.9 ulp over every input)."""
    x = np.linspace(lo, hi, 200_001).astype(dtype)[1:]
    x = x[x < 0.1] if hi == 0.1 else x
    out = np.empty_like(x)
    _apply(out, sign * x, 2)
    want = np.tanh(x.astype(np.float64))
    err = np.abs(sign * out.astype(np.float64) - want) / np.spacing(want.astype(dtype)).astype(np.float64)
    assert err.max() <= ulps, err.max()


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("dtype,lo", [(np.float64, -708.0), (np.float32, -87.0)])
def test_sigmoid_keeps_its_relative_precision_in_the_lower_tail(flags, dtype, lo):
    """σ's relative error where σ is small (x from ``lo``, the clamp, up to 0). The accuracy test
    above divides σ's error by max(|σ|, 1), an absolute check: a σ that cancels,
    ``1 − 1/(1 + e^x)`` (σ(−20) = 0 in float32), or one whose argument is clamped to ±16 (σ stuck
    at 1.1e-7 below −16) passed it. Measured: at most 2.5 ulp (float32, every input; float64
    sampled)."""
    x = np.concatenate([np.linspace(lo, 0.0, 100_001), -np.geomspace(1e-30, -lo, 20_001)]).astype(dtype)
    out = np.empty_like(x)
    _APPLY[flags](out, x, 1)
    want = 1 / (1 + np.exp(-x.astype(np.float64)))
    err = np.abs(out.astype(np.float64) - want) / np.spacing(want.astype(dtype)).astype(np.float64)
    assert err.max() <= 4, (x[err.argmax()], err.max())


@pytest.mark.parametrize("flags", FLAGS)
def test_float32_tanh_within_its_documented_ulps_at_the_worst_inputs(flags):
    """The float32 tanh's maxima over every float32 input, which the docs state (cell.py's
    tanh_single, docs/cpu-speed.md; they once gave 3.2 and 5.3, measured on a grid of points):
    2.80 ulp at 0.0623955578, 3.39 at 0.498138458, 5.85 at 5.32714367 (5.39 at 8.42523956 with
    MDNUMBA_FASTMATH's flags)."""
    cases = [(0.06239555776119232, 2.8), (0.4981384575366974, 3.4), (5.327143669128418, 5.9),
             (8.425239562988281, 5.9)]
    x = np.array([v for v, _ in cases], np.float32)
    bound = np.array([b for _, b in cases])
    for sign in (1, -1):
        out = np.empty_like(x)
        _APPLY[flags](out, sign * x, 2)
        want = np.tanh(x.astype(np.float64))
        ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
        err = np.abs(sign * out.astype(np.float64) - want) / ulp
        assert np.all(err <= bound), list(zip(x.tolist(), err.round(3).tolist(), bound.tolist()))
