"""NumPy-facing layers: arrays in, arrays out, ``forward`` and ``backward`` callable.

:class:`WavefrontLSTM` is the N-dimensional engine; :class:`MDLSTM2D` (images)
and :class:`LSTM1D` (sequences) are its public faces with fixed names.
"""

from __future__ import annotations

import numpy as np

from . import config
from ._validate import check_array, check_positive_int
from .grid import from_skewed, to_skewed, wavefront
from .kernels.gemm import column_sums, matmul_at_b, matmul_rows
from .kernels.wavefront import gather_parents, wavefront_backward, wavefront_forward
from .params import ParamLayout


class WavefrontLSTM:
    """N-dimensional LSTM over a grid (Graves 2007), one scan direction.

    Input ``(B, n_1, ..., n_N, C)``, output ``(B, n_1, ..., n_N, D)``. Parameters
    in one flat buffer: ``W (C, G)``, ``U (D, N, G)`` (``U[:, d]`` acts on the
    parent along dimension d), ``b (G,)``, ``G = (N+3)*D`` gate columns
    ``[i | f_1..f_N | o | g]``.

    Forget-gate biases start at ``forget_bias``; the default (None) is +1 for
    N = 1 (common practice) and 0 for N >= 2: with +1 each of the N forget gates
    starts near 0.73, their sum 1.46 makes c grow ~1.46^k along diagonal k and a
    128x128 float32 grid overflows to inf at step 1 (measured); with 0 the sum
    starts at N/2 = 1 for 2D.
    """

    def __init__(self, ndim: int, in_channels: int, hidden: int, seed: int = 0,
                 dtype=config.DEFAULT_DTYPE, forget_bias: float | None = None, device: str = "cpu"):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda":
            from .backend_cuda import require_cuda
            require_cuda()
        self.device = device
        self.ndim = check_positive_int(ndim, "ndim")
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.hidden = check_positive_int(hidden, "hidden")
        self.dtype = config.resolve_dtype(dtype)
        N, C, D = self.ndim, self.in_channels, self.hidden
        G = (N + 3) * D
        self.layout = ParamLayout({"W": (C, G), "U": (D, N, G), "b": (G,)})
        self.params = self.layout.new(self.dtype)
        self.grads = self.layout.new(self.dtype)
        rng = np.random.default_rng(seed)
        scale = 1.0 / np.sqrt(C + N * D)
        self.params["W"][...] = rng.uniform(-scale, scale, (C, G))
        self.params["U"][...] = rng.uniform(-scale, scale, (D, N, G))
        if forget_bias is None:
            forget_bias = 1.0 if N == 1 else 0.0
        self.params["b"][D:(N + 1) * D] = forget_bias
        self._saved: dict | None = None
        self._work: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ API
    @property
    def out_channels(self) -> int:
        return self.hidden

    def zero_grad(self) -> None:
        """Set every gradient to zero (backward accumulates)."""
        self.grads.data[...] = 0

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Run the forward sweep and save the activations needed by backward."""
        x = check_array(x, "x", self.ndim + 2, self.in_channels, self.dtype, self._layout_str())
        if self.device == "cuda":
            from .backend_cuda import layer_forward
            return layer_forward(self, x)
        B, D = x.shape[0], self.hidden
        wf = wavefront(x.shape[1:-1])
        xs = to_skewed(x, wf)
        rows = xs.shape[0]
        act = self._workspace("act", (rows, self.layout.shapes["b"][0]))
        h = self._workspace("h", (rows, D))
        c = self._workspace("c", (rows, D))
        matmul_rows(act, xs, self.params["W"], self.params["b"], False)
        U = self.params["U"].reshape(D, -1)
        wavefront_forward(h, c, act, U, wf.diag_off, wf.parent, B, D)
        self._saved = dict(xs=xs, act=act, c=c, h=h, wf=wf, batch=B)
        return from_skewed(h, wf, B)

    def backward(self, dh: np.ndarray) -> np.ndarray:
        """Return dL/dx for upstream ``dh`` = dL/dh and accumulate parameter grads."""
        if self.device == "cuda":
            from .backend_cuda import layer_backward
            return layer_backward(self, dh)
        if self._saved is None:
            raise RuntimeError("backward() called before forward(); run forward(x) first")
        sv = self._saved
        wf, B, D, N = sv["wf"], sv["batch"], self.hidden, self.ndim
        want = (B,) + wf.dims + (D,)
        dh = check_array(dh, "dh", self.ndim + 2, None, self.dtype, self._layout_str("D"))
        if dh.shape != want:
            raise ValueError(f"dh must have the shape of the forward output {want}, got {dh.shape}")
        dhs = to_skewed(dh, wf)
        dact = self._workspace("dact", sv["act"].shape)
        dc = self._workspace("dc", sv["c"].shape)
        UT = np.ascontiguousarray(self.params["U"].transpose(2, 1, 0)).reshape(-1, N * D)
        wavefront_backward(dact, dc, dhs, sv["act"], sv["c"], UT, wf.diag_off, wf.parent,
                           wf.child, B, D)
        hpar = self._workspace("hpar", (dact.shape[0], D * N))
        gather_parents(hpar, sv["h"], wf.parent, B, D)
        matmul_at_b(self.grads["W"], sv["xs"], dact)
        matmul_at_b(self.grads["U"].reshape(D * N, -1), hpar, dact)
        column_sums(self.grads["b"], dact)
        dxs = np.zeros_like(sv["xs"])
        matmul_rows(dxs, dact, np.ascontiguousarray(self.params["W"].T), self.params["b"], True)
        return from_skewed(dxs, wf, B)

    def saved_bytes(self) -> int:
        """Bytes held by the activations saved for backward (0 before forward)."""
        if self._saved is None:
            return 0
        return sum(v.nbytes for v in self._saved.values() if isinstance(v, np.ndarray))

    def workspace_bytes(self) -> int:
        """Bytes of every buffer the layer keeps between calls (saved + scratch)."""
        return sum(v.nbytes for v in self._work.values()) + self._saved["xs"].nbytes \
            if self._saved else 0

    # -------------------------------------------------------------- helpers
    def _workspace(self, name: str, shape: tuple) -> np.ndarray:
        """A scratch/activation buffer reused across calls of the same shape.

        Re-allocating tens of MB per step costs more in page faults than the
        kernels themselves; buffers are kept while the input shape is unchanged.
        """
        buf = self._work.get(name)
        if buf is None or buf.shape != tuple(shape):
            buf = self._work[name] = np.empty(shape, dtype=self.dtype)
        return buf

    def _layout_str(self, ch: str = "C") -> str:
        axes = ", ".join(f"n{d + 1}" for d in range(self.ndim))
        return f"(batch, {axes}, {ch})"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(in={self.in_channels}, hidden={self.hidden}, "
                f"dtype={self.dtype.name})")


class MDLSTM2D(WavefrontLSTM):
    """2D multi-dimensional LSTM (Graves 2007) scanning from the top-left corner.

    ``forward(x)``: ``x`` of shape (B, H, W, C) → (B, H, W, directions*hidden).
    ``backward(dh)`` → dL/dx, accumulating into ``grads``. Named views:
    ``W (C, 5D)``, ``U_up (D, 5D)``, ``U_left (D, 5D)``, ``b (5D,)`` with gate
    blocks ``[i | f_up | f_left | o | g]``; ``U`` is both recurrent matrices.
    """

    def __init__(self, in_channels: int, hidden: int, directions: int = 1, seed: int = 0,
                 dtype=config.DEFAULT_DTYPE, forget_bias: float | None = None, device: str = "cpu"):
        if directions != 1:
            raise ValueError(f"directions={directions} is not supported yet; use directions=1 "
                             "(the top-left to bottom-right scan)")
        self.directions = directions
        super().__init__(2, in_channels, hidden, seed=seed, dtype=dtype, forget_bias=forget_bias,
                         device=device)
        for buf in (self.params, self.grads):
            buf.add_alias("U_up", buf["U"][:, 0, :])
            buf.add_alias("U_left", buf["U"][:, 1, :])

    @property
    def out_channels(self) -> int:
        return self.directions * self.hidden

    def _layout_str(self, ch: str = "C") -> str:
        return f"(batch, height, width, {ch})"


class LSTM1D(WavefrontLSTM):
    """Plain LSTM over sequences: ``forward(x)`` with (B, T, C) → (B, T, hidden).

    Named views ``W (C, 4D)``, ``U (D, 1, 4D)`` (alias ``U_rec (D, 4D)``),
    ``b (4D,)`` with gate blocks ``[i | f | o | g]``.
    """

    def __init__(self, in_features: int, hidden: int, seed: int = 0,
                 dtype=config.DEFAULT_DTYPE, forget_bias: float | None = None, device: str = "cpu"):
        super().__init__(1, in_features, hidden, seed=seed, dtype=dtype, forget_bias=forget_bias,
                         device=device)
        for buf in (self.params, self.grads):
            buf.add_alias("U_rec", buf["U"][:, 0, :])

    def _layout_str(self, ch: str = "C") -> str:
        return f"(batch, time, {ch})"


class Linear:
    """Per-position affine map ``y = x @ W + b`` over the last axis (the readout).

    ``forward(x)`` with x of shape (..., in_features) → (..., out_features);
    ``backward(dy)`` → dL/dx, accumulating ``W (in, out)`` and ``b (out,)`` grads.
    """

    def __init__(self, in_features: int, out_features: int, seed: int = 0,
                 dtype=config.DEFAULT_DTYPE):
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_features = check_positive_int(out_features, "out_features")
        self.dtype = config.resolve_dtype(dtype)
        self.layout = ParamLayout({"W": (in_features, out_features), "b": (out_features,)})
        self.params = self.layout.new(self.dtype)
        self.grads = self.layout.new(self.dtype)
        scale = 1.0 / np.sqrt(in_features)
        self.params["W"][...] = np.random.default_rng(seed).uniform(-scale, scale,
                                                                    (in_features, out_features))
        self._x: np.ndarray | None = None

    def zero_grad(self) -> None:
        """Set every gradient to zero (backward accumulates)."""
        self.grads.data[...] = 0

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``y = x @ W + b`` on the last axis."""
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects last axis {self.in_features}, got shape {x.shape}")
        x2 = np.ascontiguousarray(x, dtype=self.dtype).reshape(-1, self.in_features)
        y = np.empty((x2.shape[0], self.out_features), dtype=self.dtype)
        matmul_rows(y, x2, self.params["W"], self.params["b"], False)
        self._x = x2
        self._shape = x.shape
        return y.reshape(x.shape[:-1] + (self.out_features,))

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """``dW += xᵀ dy``, ``db += Σ dy``; return ``dx = dy Wᵀ``."""
        if self._x is None:
            raise RuntimeError("backward() called before forward(); run forward(x) first")
        want = self._shape[:-1] + (self.out_features,)
        if np.shape(dy) != want:
            raise ValueError(f"dy must have shape {want}, got {np.shape(dy)}")
        dy2 = np.ascontiguousarray(dy, dtype=self.dtype).reshape(-1, self.out_features)
        matmul_at_b(self.grads["W"], self._x, dy2)
        column_sums(self.grads["b"], dy2)
        dx = np.zeros_like(self._x)
        matmul_rows(dx, dy2, np.ascontiguousarray(self.params["W"].T), self.params["b"], True)
        return dx.reshape(self._shape)
