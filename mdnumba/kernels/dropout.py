"""Counter-based dropout masks: one seed per mask, and element i's keep bit a pure function of
(seed, i), so the CPU and the GPU draw the very same mask without storing or copying it.

Element i of a mask with seed s gets 53 random bits ``b_i``, the top bits of the (i+1)-th
output of SplitMix64 started at s (Steele, Lea & Flood 2014; the constants of Java's
``SplittableRandom``); it is kept iff ``b_i ≥ ⌈p·2^53⌉``, i.e. iff the uniform ``u_i = b_i·2^-53``
in [0, 1) is ≥ p (probability 1 − p). Integer arithmetic only (uint64, wrapping), so the
compiled CPU kernel here and the CUDA twin (:mod:`mdnumba.kernels.charlm_cuda`, built from
:func:`bits53`) agree bit for bit, and a float32 kernel needs no float64 operation.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .parallel import parallel_njit

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
ONE, S11, S27, S30, S31 = (np.uint64(n) for n in (1, 11, 27, 30, 31))


def bits53(seed, i):
    """53 random bits for element ``i`` (uint64) of the mask with ``seed`` (uint64): the top bits
    of SplitMix64's (i+1)-th output from ``seed``."""
    z = seed + (i + ONE) * GOLDEN
    z = (z ^ (z >> S30)) * MIX1
    z = (z ^ (z >> S27)) * MIX2
    return (z ^ (z >> S31)) >> S11


_bits53 = njit(inline="always", cache=True)(bits53)


def threshold(p: float) -> np.uint64:
    """Keep an element iff its :func:`bits53` are ≥ this (⌈p·2^53⌉, exact in float64): iff
    ``u = bits·2^-53 ≥ p``."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout must lie in [0, 1), got {p}")
    return np.uint64(math.ceil(p * 2.0**53))


def draw_seed(rng: np.random.Generator) -> np.uint64:
    """One mask's seed from the run's generator (a single draw: the CPU and the device trainers
    consume the stream alike)."""
    return np.uint64(rng.integers(2**63))


@parallel_njit
def _keep_mask(out, seed, thr):
    for k in prange(out.shape[0]):
        out[k] = _bits53(seed, np.uint64(k)) >= thr


def keep_mask(shape: tuple, seed: np.uint64, p: float) -> np.ndarray:
    """The boolean keep mask of ``shape`` (element i in C order) for ``seed`` at rate ``p``."""
    out = np.empty(int(np.prod(shape)), dtype=np.bool_)
    _keep_mask(out, np.uint64(seed), threshold(p))
    return out.reshape(shape)
