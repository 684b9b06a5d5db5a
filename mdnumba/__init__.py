"""mdnumba: multi-dimensional LSTMs with hand-written Numba kernels."""

from . import config  # noqa: F401  (first: it checks the environment before Numba reads it)
from ._validate import NonFiniteError
from .backend_cuda import CudaUnavailableError
from .batching import pad_batch, unpad_batch
from .layers import LSTM1D, MDLSTM2D, MDLSTM3D, GridLSTM2D, Linear, WavefrontLSTM
from .optim import Adam, RMSprop, grads_to_vector, params_to_vector, vector_to_params
from .stack import BlockSubsample, Sequential, mdlstm_stack

__all__ = ["MDLSTM2D", "MDLSTM3D", "LSTM1D", "GridLSTM2D", "WavefrontLSTM", "Linear", "Adam", "RMSprop",
           "Sequential", "BlockSubsample", "mdlstm_stack", "pad_batch", "unpad_batch", "NonFiniteError",
           "CudaUnavailableError", "params_to_vector", "grads_to_vector", "vector_to_params"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``mdnumba.train``, ``mdnumba.losses``, ``mdnumba.charlm``, …: a submodule not imported yet
    is imported at its first use (PEP 562), so every dotted name the README gives works after a
    plain ``import mdnumba`` without importing them all up front."""
    import importlib
    import importlib.util
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
