"""Property tests: any small shape, cell and direction count against the float64 reference.

The hand-picked shapes elsewhere cover each kernel path once; here Hypothesis draws the
combinations (grids with a side of 1, a single cell, batch 1 or odd, hidden sizes around the
four-unit passes, 1-4 input channels, 1-3 dimensions, one scan or all), in a fixed
(derandomized) order so CI sees the same examples every run. The kernels are compiled once per
dtype and number of dimensions: new shapes cost only the reference's loops."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refcheck import check_against_reference

from mdnumba import WavefrontLSTM

CELLS = ("graves", "stable", "spatial")


@st.composite
def layers_and_inputs(draw):
    ndim = draw(st.integers(1, 3))
    dims = tuple(draw(st.integers(1, 5 if ndim < 3 else 3)) for _ in range(ndim))
    shape = (draw(st.integers(1, 5)),) + dims + (draw(st.integers(1, 4)),)
    directions = draw(st.sampled_from([1, 2 ** ndim]))  # one scan or one per corner
    kw = dict(hidden=draw(st.integers(1, 9)), cell=draw(st.sampled_from(CELLS)), directions=directions,
              seed=draw(st.integers(0, 2 ** 16)))
    return ndim, shape, kw


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=layers_and_inputs(), dtype_rtol=st.sampled_from([(np.float64, 1e-12), (np.float32, 1e-5)]))
def test_any_shape_matches_reference(case, dtype_rtol):
    """forward, dL/dx and every parameter gradient == the float64 reference (float64: 1e-12,
    float32: 1e-5; gradients x10)."""
    (ndim, shape, kw), (dtype, rtol) = case, dtype_rtol
    layer = WavefrontLSTM(ndim, shape[-1], kw.pop("hidden"), dtype=dtype, **kw)
    rng = np.random.default_rng(kw["seed"])
    layer.params.data[...] += rng.standard_normal(layer.params.data.shape) * 0.3  # biases away from 0
    x = rng.standard_normal(shape).astype(dtype)
    check_against_reference(layer, x, rng.standard_normal(shape[:-1] + (layer.out_channels,)), rtol)
