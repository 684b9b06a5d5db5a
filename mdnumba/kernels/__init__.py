"""Hand-written forward/backward kernels (CPU ``@njit``; CUDA twins in ``*_cuda``).

A convention of the CPU kernels: compiled code passes another compiled function no literal
argument (a constant ``0``, ``1``, ``True``, or a variable whose first value is one), but
``np.int64(...)`` or ``np.bool_(...)``. Numba compiles a function once more for each literal it
is called with (1-2 s each, for a branch the value picks at run time anyway): a cold char-lm grid
run compiled 53 s with them, 40 s without. Likewise an index passed on is an int64 wherever it
comes from (an int32 table's entry is cast), so that no callee is compiled for both widths.
``tests/test_kernel_cache.py`` (a slow test) checks that no kernel is compiled twice but for
literals or integer widths.
"""
