"""mdnumba: multi-dimensional LSTMs with hand-written Numba kernels."""

from .layers import LSTM1D, MDLSTM2D, MDLSTM3D, WavefrontLSTM
from .optim import Adam

__all__ = ["MDLSTM2D", "MDLSTM3D", "LSTM1D", "WavefrontLSTM", "Adam"]
__version__ = "0.1.0"
