"""Hand-written forward/backward kernels (CPU ``@njit``; CUDA twins in ``*_cuda``)."""
