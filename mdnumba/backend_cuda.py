"""CUDA backend: device-resident layers and optimisers (numba-cuda).

Nothing here imports ``numba.cuda`` at module import, so ``import mdnumba`` works
without numba-cuda; :func:`require_cuda` says what is missing.

:class:`CudaLSTM` (N-D LSTM), :class:`CudaGridLSTM`, :class:`CudaLinear`,
:class:`CudaEmbedding` and :class:`CudaBlockSubsample` keep parameters, gradients, saved
activations and workspaces on the GPU;
``forward``/``backward`` take NumPy arrays (result copied back to NumPy) or CUDA
arrays (numba device arrays or anything with ``__cuda_array_interface__``, e.g. a
CUDA ``torch.Tensor``; the result stays a numba device array). :class:`CudaAdam`
and :class:`CudaRMSprop` update them in place. A train step without host round trips::

    dev = CudaLSTM.from_layer(mdnumba.MDLSTM2D(1, 64))
    opt = CudaAdam([dev], lr=1e-3)
    h = dev.forward(x_dev)                    # device in, device out
    dev.zero_grad(); dev.backward(dh_dev); opt.step(sync=False)

(:mod:`mdnumba.train_device` runs whole models and training loops that way.)
:func:`layer_forward` / :func:`layer_backward` serve ``WavefrontLSTM(device="cuda")``:
host parameters are uploaded at each forward and the gradients added back to
the host buffers after each backward, so the NumPy API (and the CPU Adam) is
unchanged. :func:`last_path` reports which sweep path ran.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from . import config
from ._validate import (
    FINAL_STATE_WITH_SIZES,
    GRADS,
    INPUT_GRAD,
    NO_STATE_GRAD,
    SIZES_WITH_STATE,
    NonFiniteError,
    as_array,
    check_array,
    check_count,
    check_directions,
    check_flag,
    check_floating,
    check_gradient,
    check_layout,
    check_not_scalar,
    check_positive_int,
    check_saved,
    check_shape,
    check_sizes,
    check_state,
    check_stateful,
    grid_layout,
    is_device_array,
    is_int_in,
    missing_activations,
    nonfinite_input,
    overflowed_gradients,
    overflowed_state,
)
from .grid import table_cache
from .optim import Adam, RMSprop, check_state_count, check_state_shapes, nonfinite_gradient, read_state

if TYPE_CHECKING:
    from .charlm import Embedding
    from .layers import GridLSTM2D, Linear, WavefrontLSTM

#: a numba device array or anything with ``__cuda_array_interface__`` (numba-cuda is optional,
#: so its class is not named here)
DeviceArray = Any
#: a NumPy array or a :data:`DeviceArray`; results come back as the same kind
HostOrDevice = Any

INSTALL_HINT = ("install the CUDA extra with `pip install 'mdnumba[cuda]'` (numba-cuda; it needs "
                "numpy<2.5) on a machine with an NVIDIA GPU and driver, or use device='cpu'")
#: numba-cuda imports, but finds no GPU or driver to run on
NO_GPU_HINT = "the CUDA kernels need an NVIDIA GPU and its driver on this machine; or use device='cpu'"


class CudaUnavailableError(RuntimeError):
    """Raised when device='cuda' is requested but no usable CUDA GPU is found."""


#: the start of :func:`cuda_unavailable_reason`'s reasons that installing the extra fixes
NOT_INSTALLED = ("numba-cuda is not installed", "numba.cuda cannot be imported")


def cuda_unavailable_reason() -> str | None:
    """None if CUDA kernels can run here (a GPU, or NUMBA_ENABLE_CUDASIM=1), else why not. Numba
    still ships a ``numba.cuda`` of its own, which imports without numba-cuda: it is not enough
    (mdnumba's kernels take numba-cuda's API), so numba-cuda is looked for first."""
    import importlib.util
    if importlib.util.find_spec("numba_cuda") is None:
        return "numba-cuda is not installed (Numba's own numba.cuda, which it replaces, is not enough)"
    try:
        from numba import cuda
    except Exception as exc:  # numba-cuda missing, or numpy 2.5 breaking its import
        return f"numba.cuda cannot be imported ({type(exc).__name__}: {exc})"
    try:
        if cuda.is_available():
            return None
    except Exception as exc:
        return f"the CUDA driver failed ({type(exc).__name__}: {exc})"
    return "no CUDA GPU or driver was found"


def cuda_available() -> bool:
    """True if CUDA kernels can run in this process."""
    return cuda_unavailable_reason() is None


def cuda_hint(reason: str) -> str:
    """What to do about :func:`cuda_unavailable_reason`'s ``reason``: install numba-cuda where it does
    not import, else find a GPU (installing the extra again would not help)."""
    return INSTALL_HINT if reason.startswith(NOT_INSTALLED) else NO_GPU_HINT


def require_cuda() -> None:
    """Raise :class:`CudaUnavailableError` with a fix if CUDA cannot be used."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise CudaUnavailableError(f"device='cuda' is not available: {reason}; {cuda_hint(reason)}")


def cuda_context_alive() -> bool:
    """Whether CUDA still works in this process: a synchronize, an allocation and a copy back.
    False after a sticky error (an illegal or misaligned address in a kernel), which leaves the
    process's CUDA context unusable: every later CUDA call fails, and only a new process helps."""
    try:
        from numba import cuda
        cuda.synchronize()
        return bool(cuda.to_device(np.ones(1)).copy_to_host()[0] == 1.0)
    except Exception:
        return False


def _kernels():
    require_cuda()
    from .kernels import wavefront_cuda
    return wavefront_cuda


def last_path() -> str | None:
    """Which sweep ran last ("cooperative ..." / "per-diagonal ..."), None before any CUDA sweep."""
    import sys
    mod = sys.modules.get("mdnumba.kernels.wavefront_cuda")
    return None if mod is None else mod.last_path()


@dataclass(frozen=True)
class DeviceTables:
    """Wavefront tables of one (grid shape, batch, directions) on the device, plus host ``diag_off``."""

    dims: tuple
    batch: int
    n_cells: int
    diag_off_host: np.ndarray
    diag_off: object
    parent: object
    child: object
    skew_src: object     # grid.direction_tables: [q, s*B + b] = dense row b*M + flip_q(perm[s])
    unskew_src: object   # [q, b*M + m] = skewed row inv_perm[flip_q(m)]*B + b
    sizes: tuple | None = None  # the items' extents of a padded batch (direction_tables' sizes)
    _planes: dict = field(default_factory=dict, repr=False, compare=False)

    def planes(self, start: int | None = None, stop: int | None = None) -> tuple[object, np.ndarray]:
        """``diag_off[start:stop]`` on the device and on the host (the hyperplanes a sweep takes),
        the device view made once: numba-cuda's slicing costs ~10 µs of host time a call."""
        key = (start, stop)
        if key not in self._planes:
            cut = slice(start, stop)
            self._planes[key] = (self.diag_off if key == (None, None) else self.diag_off[cut],
                                 self.diag_off_host[cut])
        return self._planes[key]


@table_cache  # device memory, bounded as the host tables
def device_tables(dims: tuple, batch: int, directions: int = 1, stateful: bool = False,
                  sizes: tuple | None = None) -> DeviceTables:
    """Build (and cache) :class:`DeviceTables`; direction q mirrors the axes of q's set bits;
    ``stateful`` (1D): the layout with state cells of :func:`mdnumba.grid.state_tables`;
    ``sizes``: a padded batch (:func:`mdnumba.grid.direction_tables`)."""
    from numba import cuda

    from .grid import direction_tables, state_tables, wavefront
    if stateful:
        wf, skew, unskew = state_tables(dims[0], int(batch), directions)
    else:
        wf = wavefront(tuple(dims))
        skew, unskew = direction_tables(wf.dims, int(batch), directions, sizes)
    return DeviceTables(tuple(dims), int(batch), wf.n_cells, np.array(wf.diag_off),
                        *(cuda.to_device(a) for a in (wf.diag_off, wf.parent, wf.child, skew, unskew)),
                        sizes)


def contiguous_device_array(x: object, name: str) -> DeviceArray:
    """The CUDA array ``x`` as a numba device array, refused unless C-contiguous: the layers read
    it as rows and reshape it, which numba-cuda cannot do without a copy (NotImplementedError
    on a GPU; the simulator copies silently)."""
    from .kernels.wavefront_cuda import as_device
    xd = as_device(x)
    if not xd.is_c_contiguous():
        raise ValueError(f"{name} on the device must be C-contiguous, with C-order strides (copy it "
                         "first, e.g. cuda.to_device(x.copy_to_host().copy()))")
    return xd


def kept_buffer(store: dict, key: object, shape: tuple, dtype: npt.DTypeLike) -> DeviceArray:
    """``store[key]``, a device array kept while its shape and dtype are unchanged (else a new one)."""
    from numba import cuda
    buf, dtype = store.get(key), np.dtype(dtype)
    if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
        buf = store[key] = cuda.device_array(tuple(shape), dtype=dtype)
    return buf


def kept_view(store: dict, key: object, base: DeviceArray, index: int | tuple[int, int]) -> DeviceArray:
    """``base[index]`` (``index`` an int, or ``(lo, hi)``: rows lo..hi), kept in ``store[key]`` while
    ``base`` and ``index`` are the same: numba-cuda's slicing costs ~10 µs of host time a call,
    and a training step takes several (a new ``base`` replaces the view, and the old base goes)."""
    kept = store.get(key)
    if kept is None or kept[0] is not base or kept[1] != index:
        view = base[index] if isinstance(index, int) else base[index[0]:index[1]]
        kept = store[key] = (base, index, view)
    return kept[2]


class OnTheDevice:
    """Base of the device twins: they hold GPU memory and kernel modules, so a pickle or copy is
    refused with what to copy instead (the failure was "cannot pickle 'module' object")."""

    def __reduce_ex__(self, protocol):
        raise TypeError(f"a {type(self).__name__} holds GPU memory and is not pickled or copied: copy "
                        "the host layer or model it was made from (device='cuda' layers copy) and make "
                        "a twin of the copy, e.g. CudaLSTM.from_layer(layer)")


def _check_host_layer(twin: type, layer: object, kind: type, name: str, hint: str = "") -> None:
    """TypeError unless ``layer``, which ``twin.from_layer`` copies, is a ``kind`` (``name``)."""
    if not isinstance(layer, kind):
        raise TypeError(f"{twin.__name__}.from_layer takes a {name}, got {type(layer).__name__}{hint}")


def _all_finite(values: np.ndarray) -> bool:
    """Whether every value is a finite number (False for values NumPy cannot test, e.g. objects)."""
    try:
        return bool(np.isfinite(values).all())
    except TypeError:
        return False


class DeviceLayer(OnTheDevice):
    """Flat device ``params`` and ``grads`` of one layer (its host layout) and device workspaces.

    ``reuse_outputs``: forward/backward write their results into buffers kept between calls
    (no allocation per step, whose frees make numba synchronise now and then); a result is
    then valid until the next call. The device trainer's :class:`mdnumba.train_device.DeviceModel`
    sets it.
    """

    reuse_outputs = False
    #: the checks that wait for the GPU, made for the NumPy API (``device="cuda"`` layers set it;
    #: the device loop leaves it off): NaN/inf in a CUDA-array input, in the weights and in the
    #: gradients after backward, and in :class:`CudaLSTM` an overflowed cell state before
    #: backward (host inputs are always checked)
    checked = False

    def _init_buffers(self, host: np.ndarray, dtype, size: int, what: str) -> None:
        from numba import cuda
        self.k = _kernels()
        self.dtype = config.resolve_dtype(dtype)
        self.size, self._sizes_said = size, what
        self.params = cuda.to_device(self._flat_params(host))
        self.grads = cuda.to_device(np.zeros(size, self.dtype))
        self._work: dict = {}
        self._blocks: dict = {}
        self._bind()

    def _bind(self) -> None:
        """Make the named views of ``params`` and ``grads`` (subclass hook)."""

    def rebind(self, params: DeviceArray, grads: DeviceArray) -> None:
        """Move parameters and gradients into the given flat device views (e.g. slices of one
        model-wide buffer, so that zeroing and the optimiser run once over all layers)."""
        params.copy_to_device(self.params)
        grads.copy_to_device(self.grads)
        self.params, self.grads = params, grads
        self._bind()

    def _flat_params(self, host: npt.ArrayLike) -> np.ndarray:
        """``host`` as this layer's flat parameter vector (its dtype), else ValueError for another
        size and :class:`~mdnumba.NonFiniteError` for NaN/inf (the sweeps would return NaN)."""
        from .kernels.gemm import count_nonfinite
        given = np.asarray(host)
        with np.errstate(over="ignore"):
            host = np.ascontiguousarray(given, dtype=self.dtype).reshape(-1)
        if host.size != self.size:
            raise ValueError(f"params must have {self.size} entries for {self._sizes_said}, got {host.size}")
        bad = count_nonfinite(host)
        if bad and _all_finite(given):
            raise ValueError(f"params hold values up to {float(np.abs(given).max()):.3g}, beyond "
                             f"{self.dtype} (max {np.finfo(self.dtype).max:.3g})")
        if bad:
            raise NonFiniteError(f"params hold {bad} NaN or infinite values; give them finite values "
                                 "(e.g. those of a fresh layer or a checkpoint)")
        return host

    def set_params(self, host: npt.ArrayLike) -> None:
        """Upload a flat host parameter vector (checked as the constructor's ``params``)."""
        self.params.copy_to_device(self._flat_params(host))

    def params_to_host(self) -> np.ndarray:
        """A host copy of the flat parameter vector."""
        return self.params.copy_to_host()

    def grads_to_host(self) -> np.ndarray:
        """A host copy of the flat gradient vector."""
        return self.grads.copy_to_host()

    def zero_grad(self) -> None:
        """Set every gradient to zero (backward accumulates)."""
        self.k.fill(self.grads, 0.0)

    def workspace_bytes(self) -> int:
        """Device bytes of the buffers kept between calls (activations, scratch, kept results)."""
        return sum(a.nbytes for a in self._work.values())

    #: the workspaces that hold a forward's activations (a subclass with ``_saved``, the
    #: record of its last forward)
    _SAVED: tuple = ()

    def saved_bytes(self) -> int:
        """Device bytes of the last forward's activations (0 before one, and after a forward
        with ``save=False``)."""
        saved = getattr(self, "_saved", None)
        if saved is None or saved.get("inference"):
            return 0
        return sum(a.nbytes for name, a in self._work.items() if name in self._SAVED)

    def _check_weights(self) -> None:
        """With :attr:`checked`, :class:`~mdnumba.NonFiniteError` for NaN/inf weights, as the host
        layers refuse them (a device optimiser does not refuse an update that overflows them)."""
        bad = self._nonfinite(self.params)
        if bad:
            raise NonFiniteError(f"the layer's weights hold {bad} NaN or infinite values; give them "
                                 "finite values with set_params (e.g. a fresh layer's or a checkpoint's)")

    def _check_grads(self, dx=None) -> None:
        """With :attr:`checked`, the host layers' check after ``backward``
        (:func:`~mdnumba._validate.check_grads`): NaN/inf left in ``grads`` by a ``dh`` too large
        (or in ``dx``, the device array backward would return, when given)."""
        bad = self._nonfinite(self.grads if dx is None else dx)
        if bad:
            raise overflowed_gradients(bad, self.dtype, GRADS if dx is None else INPUT_GRAD)

    def _nonfinite(self, a) -> int:
        """How many values of the device array ``a`` are NaN or ±inf (waits for the GPU); 0
        without counting unless :attr:`checked`."""
        if not self.checked:
            return 0
        from .kernels.optim_cuda import count_nonfinite
        return count_nonfinite(a)

    def _ws(self, name: str, shape: tuple, dtype=None):
        """A device workspace kept while its shape and dtype (the layer's, or ``dtype``) are unchanged."""
        return kept_buffer(self._work, name, shape, self.dtype if dtype is None else dtype)

    def _block(self, name: str, q: int, n: int | None = None):
        """Direction q's part of workspace ``name``: rows ``q*n .. (q+1)*n`` (the workspace itself when
        it has n rows), or ``[q]`` (n None); a view made once per workspace (:func:`kept_view`: a
        step of a layer of S directions takes 5 S)."""
        a = self._work[name]
        if a.shape[0] == n:
            return a
        return kept_view(self._blocks, (name, q), a, q if n is None else (q * n, (q + 1) * n))

    def _new(self, shape: tuple, dtype=None):
        from numba import cuda
        return cuda.device_array(shape, dtype=self.dtype if dtype is None else dtype)

    def _kept_copy(self, name: str, xd):
        """``xd`` copied into workspace ``name`` (device to device): what backward reads must not
        change with the caller's array."""
        buf = self._ws(name, tuple(xd.shape), np.dtype(xd.dtype))
        buf.copy_to_device(xd)
        return buf

    def _result(self, name: str, shape: tuple):
        """A buffer for a returned result: kept (``reuse_outputs``) or new."""
        return self._ws(name, shape) if self.reuse_outputs else self._new(shape)

    def _input(self, x, name: str, ndim: int | None, last: int | None,
               layout: str = "(batch, grid axes.., channels)"):
        """(device array, came-from-host) after the same checks as the CPU layer (ndim None: any
        but 0)."""
        k = self.k
        if ndim is None:  # at least 1: the last axis is the channels
            check_not_scalar(x, name, layout)
            ndim = len(x.shape) if is_device_array(x) else max(np.ndim(x), 1)
        if is_device_array(x):
            xd = k.as_device(x)
            check_layout(xd.shape, name, ndim, last, layout)
            if np.dtype(xd.dtype) != self.dtype:
                raise TypeError(f"{name} on the device has dtype {xd.dtype}, the layer uses "
                                f"{self.dtype}; convert it first")
            xd = contiguous_device_array(xd, name)
            bad = self._nonfinite(xd)
            if bad:
                raise nonfinite_input(name, bad)
            return xd, False
        arr = check_array(x, name, ndim, last, self.dtype, layout)
        return k.as_device(arr), True


class CudaLSTM(DeviceLayer):
    """Device-resident N-D LSTM with the layout, cell and directions of ``WavefrontLSTM``.

    ``params`` and ``grads`` are flat device buffers in the host order
    ``W (S, C, G) | U (S, D, N, G) | b (S, G)`` for S directions, ``G = (N+3)*D``.
    ``path`` picks the sweep ("auto", "cooperative", "per-diagonal"),
    ``use_shared`` whether the recurrent weights go to shared memory (None: when
    they fit), ``layout`` how a sweep shares out its work ("auto": per sweep, "flat", "sliced", "staged",
    "item", "tensor"; None: ``MDNUMBA_CUDA_LAYOUT``,
    :func:`mdnumba.kernels.wavefront_cuda.wavefront_forward`).
    """

    def __init__(self, ndim: int, in_channels: int, hidden: int, params: np.ndarray,
                 dtype: npt.DTypeLike = config.DEFAULT_DTYPE, *, cell: str = "graves", directions: int = 1,
                 path: str | None = None, use_shared: bool | None = None,
                 threads_per_block: int | None = None, layout: str | None = None):
        from .kernels.cell import cell_code
        self.ndim = check_positive_int(ndim, "ndim")  # the host layer's checks
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.hidden = check_positive_int(hidden, "hidden")
        self.cell, self.cell_code = cell, cell_code(cell)
        self.directions = check_directions(directions, self.ndim)
        N, C, D, S = self.ndim, self.in_channels, self.hidden, self.directions
        G = (N + 3) * D
        self._init_buffers(params, dtype, S * (C * G + D * N * G + G),
                           f"ndim={N}, in={C}, hidden={D}, directions={S}")
        self.tpb = None if threads_per_block is None else self.k._tpb(threads_per_block)  # checked now
        self.path, self.use_shared, self.layout = path, use_shared, layout
        self._saved: dict | None = None

    _SAVED = ("xs", "act", "h", "c")  # the rest of the workspaces is scratch

    @property
    def out_channels(self) -> int:
        """As the host layer's: ``directions * hidden`` (what a following stage takes)."""
        return self.directions * self.hidden

    def _bind(self) -> None:
        self.W, self.U, self.b = self._views(self.params)
        # made once (numba-cuda's slicing and reshaping cost µs of host time a call): direction q's
        # W and b, and the gradients as the one [dW; dU; db] matrix of a single direction
        N, C, D, S = self.ndim, self.in_channels, self.hidden, self.directions
        self.Wq, self.bq = [self.W[q] for q in range(S)], [self.b[q] for q in range(S)]
        self.grad_matrix = self.grads.reshape(C + N * D + 1, (N + 3) * D) if S == 1 else None

    def _views(self, flat):
        """``W (S, C, G)``, ``U (S, D, N*G)``, ``b (S, G)`` of the flat parameters."""
        N, C, D, S = self.ndim, self.in_channels, self.hidden, self.directions
        G = (N + 3) * D
        nW, nU = S * C * G, S * D * N * G
        return flat[:nW].reshape(S, C, G), flat[nW:nW + nU].reshape(S, D, N * G), flat[nW + nU:].reshape(S, G)

    @classmethod
    def from_layer(cls, layer: WavefrontLSTM, **kw) -> CudaLSTM:
        """A device copy of a host ``WavefrontLSTM`` (MDLSTM2D, LSTM1D, ...) and its parameters."""
        from .layers import WavefrontLSTM
        _check_host_layer(cls, layer, WavefrontLSTM, "WavefrontLSTM (MDLSTM2D, LSTM1D, ...)",
                          "; a GridLSTM2D: CudaGridLSTM.from_layer; a stack or model: "
                          "mdnumba.train_device.DeviceModel, or each layer")
        return cls(layer.ndim, layer.in_channels, layer.hidden, layer.params.data, layer.dtype,
                   cell=layer.cell, directions=layer.directions, **kw)

    # ------------------------------------------------------------ passes
    def forward(self, x: HostOrDevice, state: tuple | None = None, *, save: bool = True,
                sizes: object = None, upload: np.ndarray | None = None) -> HostOrDevice:
        """``h`` (B, *dims, S*D) for ``x`` (B, *dims, C); saves what backward needs.

        Per direction q: ``act_q = flip_q(x) W_q + b_q`` (one GEMM), then one sweep
        for all directions adds ``Σ_d h_parent_d U_qd`` and applies the cell. 1D: from the
        initial ``state = (h0, c0)`` (as :meth:`mdnumba.LSTM1D.forward`) if given.
        ``save=False``: :meth:`_forward_rolling`, nothing kept for ``backward`` (refused).
        ``sizes``: a padded batch, as :meth:`mdnumba.WavefrontLSTM.forward` (its tables only).
        ``upload``: flat host parameters to upload first, once the inputs are checked (a refused
        forward keeps the weights of the last forward, which its backward uses).
        """
        k, N, C, D, S = self.k, self.ndim, self.in_channels, self.hidden, self.directions
        save = check_flag(save, "save")
        xd, host_in = self._input(x, "x", N + 2, C, grid_layout(N))
        B, dims = xd.shape[0], tuple(xd.shape[1:-1])
        if state is not None:  # checked before any workspace of the last forward is written
            self._require_1d("state")
            if sizes is not None:
                raise ValueError(SIZES_WITH_STATE)
            h0, c0 = check_state(state, "state", B, S * D, check=self._state_input)
        sizes = check_sizes(sizes, B, dims)
        if upload is None:  # else the host layer's weights, checked there (not again)
            self._check_weights()
        self._saved = None  # from here on the workspaces no longer hold the last forward's
        if upload is not None:
            self.params.copy_to_device(np.ascontiguousarray(upload, dtype=self.dtype).reshape(-1))
        t = device_tables(dims, B, S, state is not None, sizes)
        if not save:
            return self._forward_rolling(xd, host_in, t, None if state is None else (h0, c0))
        R, G, dense = t.n_cells * B, (N + 3) * D, B * math.prod(dims)
        xs, act = self._ws("xs", (S * R, C)), self._ws("act", (S * R, G))
        h, c = self._ws("h", (S * R, D)), self._ws("c", (S * R, D))
        out = self._result("out", (dense, S, D))
        k.skew_rows(xs, xd.reshape(dense, 1, C), t.skew_src)
        for q in range(S):
            k.gemm(self._block("act", q, R), self._block("xs", q, R), self.Wq[q], self.bq[q])
        planes = t.planes()
        if state is not None:
            k.seed_state(h, c, act, h0, c0, B)
            planes = t.planes(1, -1)  # cells 1..T; cell 0 holds (h0, c0)
        k.wavefront_forward(h, c, act, self.U, planes[0], t.parent, B, D, self.cell_code,
                            path=self.path, use_shared=self.use_shared, tpb=self.tpb, layout=self.layout,
                            diag_off_host=planes[1], out=out, out_src=t.unskew_src)
        if t.sizes is not None:  # the padding's cells: no state (it may have overflowed there)
            k.zero_padding(h, c, t.skew_src)
        return self._forward_result(out, t, dims, host_in, state is not None, inference=False)

    def _forward_rolling(self, xd, host_in: bool, t: DeviceTables, state: tuple | None):
        """:meth:`forward` with ``save=False``: :func:`~mdnumba.kernels.wavefront_cuda.wavefront_infer`
        in buffers of two hyperplanes, as the CPU layer's; keeps where the final state is (1D)."""
        k, N, C, D, S, B = self.k, self.ndim, self.in_channels, self.hidden, self.directions, t.batch
        slots, K = 2 * int(np.diff(t.diag_off_host).max()), len(t.diag_off_host) - 1
        act = self._ws("roll_act", (S * slots * B, (N + 3) * D))
        h, c = self._ws("roll_h", (S * slots * B, D)), self._ws("roll_c", (S * slots * B, D))
        lp = self._ws("roll_lp", (slots, N), t.parent.dtype)  # parents' slots
        first, last = (0, K) if state is None else (1, K - 1)
        if state is not None:
            k.seed_state(h, c, act, *state, B)  # cell 0 (slot 0) holds (h0, c0)
        dense = xd.size // C
        out = self._result("out", (dense, S, D))
        if k.shares_memory(out, xd):  # a kept output fed back in: the sweep reads x as it writes out
            out = self._new((dense, S, D))
        if t.sizes is not None:  # the sweep writes the items' cells only
            k.fill(out.reshape(out.size), 0.0)
        k.wavefront_infer(out, h, c, act, lp, xd.reshape(dense, C), t.skew_src, self.W, self.b, self.U,
                          t.diag_off, t.parent, first, last, B, D, self.cell_code, path=self.path,
                          use_shared=self.use_shared, tpb=self.tpb, diag_off_host=t.diag_off_host,
                          layout=self.layout)
        return self._forward_result(out, t, tuple(xd.shape[1:-1]), host_in, state is not None,
                                    inference=True, final_slot=(last - 1) % 2)

    def _forward_result(self, out, t: DeviceTables, dims: tuple, host_in: bool, stateful: bool, **kept):
        """Record the forward (``kept``: what the saving and the saving-free forward differ in),
        refuse an output with NaN/inf (an overflowed state; checked layers only) and return it
        shaped (B, *dims, S*D), on the host for a host input."""
        S, D = self.directions, self.hidden
        bad = self._nonfinite(out)
        if bad:  # nothing saved to differentiate (as the CPU layer)
            raise overflowed_state(self.cell, bad, output=True)
        self._saved = dict(tables=t, shape=(t.batch,) + dims + (S * D,), stateful=stateful,
                           host_in=host_in, **kept)
        out = out.reshape((t.batch,) + dims + (S * D,))
        return out.copy_to_host() if host_in else out

    def backward(self, dh: HostOrDevice, input_grad: bool = True,
                 final_state_grad: tuple | None = None) -> HostOrDevice | None:
        """dL/dx for upstream ``dh`` = dL/dh; adds ``[dW; dU; db]_q += z_qᵀ dact_q`` into ``grads``.

        ``z = [x | h_parents | 1]`` per row, so a direction's weight gradients are
        one GEMM (three column blocks); ``dx = Σ_q unflip_q(dact_q W_qᵀ)``. ``input_grad=False``
        skips dx (the layer reads the data: two launches fewer) and returns None. After a
        forward from a state: ``final_state_grad`` and :meth:`initial_state_grad` as in
        :meth:`mdnumba.LSTM1D.backward`.
        """
        input_grad = check_flag(input_grad, "input_grad")
        check_saved(self._saved)
        k, N, C, D, S = self.k, self.ndim, self.in_channels, self.hidden, self.directions
        t, want, stateful = self._saved["tables"], self._saved["shape"], self._saved["stateful"]
        check_stateful(stateful, final_state_grad)
        dhd, host_in = self._input(dh, "dh", N + 2, None, grid_layout(N, "D"))
        check_shape(dhd, want, "dh")
        bad = self._nonfinite(self._work["c"])
        if bad:
            raise overflowed_state(self.cell, bad)
        B, R, G = t.batch, t.n_cells * t.batch, (N + 3) * D
        dense = dhd.size // (S * D)
        dhs = self._ws("dhs", (S * R, D))
        dact, dc = self._ws("dact", (S * R, G)), self._ws("dc", (S * R, D))
        act, c, h, xs = (self._work[n] for n in ("act", "c", "h", "xs"))
        z = self._ws("z", (S * R, C + N * D + 1))
        planes, dh_in, dh_src = t.planes(), dhd.reshape(dense, S, D), t.skew_src
        if stateful:  # skew dh here, then add dL/d(h_T, c_T) (the sweep's prologue would skew it)
            k.skew_rows(dhs, dh_in, dh_src)
            k.seed_state_grad(dhs, dc, dact, *self._final_grad(final_state_grad, B), B)
            planes, dh_in, dh_src = t.planes(None, -1), None, None  # cells T..0
        k.wavefront_backward(dact, dc, dhs, act, c, self.U, planes[0], t.parent, t.child, B, D,
                             self.cell_code, path=self.path, use_shared=self.use_shared, tpb=self.tpb,
                             layout=self.layout, diag_off_host=planes[1], dh_in=dh_in,
                             dh_src=dh_src, operands=(z, xs, h))
        if stateful:
            grad = self._new((B, S * D)), self._new((B, S * D))
            k.take_state_grad(*grad, dhs, dc, dact, B)
            self._saved["state_grad"] = grad
        Z = C + N * D + 1
        if S == 1:  # [dW; dU; db] is contiguous in the flat layout: one GEMM (fewer launches)
            k.gemm(self.grad_matrix, z, dact, ta=True, accumulate=True)
        else:  # per direction the three blocks lie apart in the flat layout: a GEMM each, then one add
            parts = self._ws("grad_parts", (S, Z, G))
            for q in range(S):
                z_q, dact_q = self._block("z", q, R), self._block("dact", q, R)
                k.gemm(self._block("grad_parts", q), z_q, dact_q, ta=True)
            k.add_direction_grads(self.grads, parts, C, N * D)
        self._check_grads()
        if not input_grad:
            return None
        dxs = self._ws("dxs", (S * R, C))
        for q in range(S):
            k.gemm(self._block("dxs", q, R), self._block("dact", q, R), self.Wq[q], tb=True)
        dx = self._result("dx", (dense, C))
        k.unskew_rows(dx.reshape(dense, 1, C), dxs, t.unskew_src)  # Σ_q unflip_q(dact_q W_qᵀ)
        self._check_grads(dx)
        dx = dx.reshape(want[:-1] + (C,))
        return dx.copy_to_host() if host_in else dx

    def final_state(self) -> tuple:
        """``(h_T, c_T)`` of the last forward (1D; as :meth:`mdnumba.LSTM1D.final_state`): NumPy
        arrays after a forward of NumPy arrays, else device arrays."""
        self._require_1d("final_state()")
        if self._saved is None:
            raise missing_activations("final_state()")
        if self._saved["tables"].sizes is not None:
            raise RuntimeError(FINAL_STATE_WITH_SIZES)
        sv, S, D = self._saved, self.directions, self.hidden
        t = sv["tables"]
        pair = self._new((t.batch, S * D)), self._new((t.batch, S * D))
        if sv["inference"]:  # the slot of the two-plane buffers the last step went to
            h, c, last = self._work["roll_h"], self._work["roll_c"], sv["final_slot"]
        else:
            h, c, last = self._work["h"], self._work["c"], t.n_cells - (2 if sv["stateful"] else 1)
        self.k.state_of_cell(*pair, h, c, last, t.batch)
        return self._as_input(pair)

    def initial_state_grad(self) -> tuple:
        """``(dL/dh0, dL/dc0)`` of the last backward after a forward from a state."""
        grad = (self._saved or {}).get("state_grad")
        if grad is None:
            raise RuntimeError(NO_STATE_GRAD)
        return self._as_input(grad)

    def zero_state(self, batch: int) -> tuple:
        """A zero initial state ``(h0, c0)`` for ``batch`` sequences (NumPy; as
        :meth:`mdnumba.LSTM1D.zero_state`)."""
        self._require_1d("zero_state()")
        shape = (check_positive_int(batch, "batch"), self.directions * self.hidden)
        return np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)

    def _require_1d(self, what: str) -> None:
        if self.ndim != 1:
            raise ValueError(f"{what} is for 1D layers (LSTM1D), this layer has {self.ndim} grid axes")

    def _as_input(self, pair: tuple) -> tuple:
        """``pair`` on the host if the last forward's input was, else on the device."""
        return tuple(a.copy_to_host() for a in pair) if self._saved["host_in"] else pair

    def _state_input(self, a, name: str):
        """A state array checked as :meth:`_input` checks ``x`` (device array out)."""
        width = self.directions * self.hidden
        return self._input(a, name, 2, width, f"(batch, {width})")[0]

    def _final_grad(self, final_state_grad, batch: int) -> tuple:
        """``final_state_grad`` checked, on the device; zeros for None."""
        if final_state_grad is not None:
            return check_state(final_state_grad, "final_state_grad", batch, self.directions * self.hidden,
                               check=self._state_input)
        zero = self._ws("zero_state", (batch, self.directions * self.hidden))
        self.k.fill(zero.reshape(zero.size), 0.0)
        return zero, zero

    def __repr__(self) -> str:
        return (f"CudaLSTM(ndim={self.ndim}, in={self.in_channels}, hidden={self.hidden}, "
                f"dtype={self.dtype.name})")


class CudaLinear(DeviceLayer):
    """Device twin of :class:`mdnumba.layers.Linear`: ``y = x W + b`` on the last axis,
    parameters ``W (in, out) | b (out,)`` in one flat device buffer."""

    def __init__(self, in_features: int, out_features: int, params: np.ndarray,
                 dtype: npt.DTypeLike = config.DEFAULT_DTYPE):
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_features = check_positive_int(out_features, "out_features")
        C, F = self.in_features, self.out_features
        self._init_buffers(params, dtype, C * F + F, f"in={C}, out={F}")
        self._x = None

    @property
    def out_channels(self) -> int:
        """As the host layer's: ``out_features``."""
        return self.out_features

    def saved_bytes(self) -> int:
        """Device bytes of the input kept for backward (its copy, or the array given)."""
        return 0 if self._x is None else self._x.nbytes

    def _bind(self) -> None:
        C, F = self.in_features, self.out_features
        self.W, self.b = self.params[:C * F].reshape(C, F), self.params[C * F:]

    @classmethod
    def from_layer(cls, layer: Linear) -> CudaLinear:
        """A device copy of a host :class:`mdnumba.layers.Linear`."""
        from .layers import Linear
        _check_host_layer(cls, layer, Linear, "mdnumba.layers.Linear")
        return cls(layer.in_features, layer.out_features, layer.params.data, layer.dtype)

    def forward(self, x: HostOrDevice, *, copy_input: bool = True) -> HostOrDevice:
        """``y = x W + b`` for ``x (..., in)``; device or NumPy in, the same kind out. Backward
        needs ``x``: a device ``x`` is copied, unless ``copy_input=False`` (the caller keeps it
        unchanged until then, as the device trainers do theirs)."""
        copy_input = check_flag(copy_input, "copy_input")
        xd, host_in = self._input(x, "x", None, self.in_features, "(..., in_features)")
        self._check_weights()
        if not host_in and copy_input:
            xd = self._kept_copy("x", xd)
        R = xd.size // self.in_features
        self._x, self._shape = xd.reshape(R, self.in_features), tuple(xd.shape)
        y = self._result("y", (R, self.out_features))
        self.k.gemm(y, self._x, self.W, self.b)
        y = y.reshape(self._shape[:-1] + (self.out_features,))
        return y.copy_to_host() if host_in else y

    def backward(self, dy: HostOrDevice, input_grad: bool = True) -> HostOrDevice | None:
        """``[dW; db] += [xᵀ; 1ᵀ] dy`` (one GEMM: W then b is the flat layout); return ``dx = dy Wᵀ``
        (None with ``input_grad=False``)."""
        input_grad = check_flag(input_grad, "input_grad")
        if self._x is None:
            raise missing_activations()
        want = self._shape[:-1] + (self.out_features,)
        dyd, host_in = self._input(dy, "dy", len(want), self.out_features, "(..., out_features)")
        check_shape(dyd, want)
        R = self._x.shape[0]
        dy2 = dyd.reshape(R, self.out_features)
        gWb = self.grads.reshape(self.in_features + 1, self.out_features)  # [dW; db], flat layout
        self.k.gemm(gWb, self._x, dy2, ta=True, accumulate=True, ones_row=True)
        self._check_grads()
        if not input_grad:
            return None
        dx = self._result("dx", (R, self.in_features))
        self.k.gemm(dx, dy2, self.W, tb=True)
        self._check_grads(dx)
        dx = dx.reshape(self._shape)
        return dx.copy_to_host() if host_in else dx


@dataclass(frozen=True)
class GridTables:
    """A :class:`CudaGridLSTM`'s T x depth wavefront on the device (``diag_off`` also on the host)
    and the row tables of its gathers (``wavefront_cuda.gather_rows``, ``out[r] = in[src[r]]``)
    for a batch of B, R = n_cells·B rows:

    ``to_time`` x (B, T, D) → time-major (T·B, D); ``to_batch`` back; ``top`` the top blocks'
    depth output from ``h`` (R, 2D) read as (2R, D) rows; ``biases`` the gate pre-activations
    ``act`` (R, 8D) read as (2R, 4D) rows from ``[b_time; b_depth]`` (levels rows each: the
    row's depth level, or 0 when ``tied``); ``da_time`` / ``da_depth`` the columns 0:4D / 4D:8D
    of ``dact`` (R, 10D) read as (5R, 2D) rows, as (2R, 2D) rows; ``level_rows`` (untied) the
    rows of each depth level."""

    diag_off_host: np.ndarray
    n_cells: int
    max_diag_cells: int
    diag_off: DeviceArray
    parent: DeviceArray
    child: DeviceArray
    perm: DeviceArray
    to_time: DeviceArray
    to_batch: DeviceArray
    top: DeviceArray
    biases: DeviceArray
    da_time: DeviceArray
    da_depth: DeviceArray
    level_rows: tuple = ()


@table_cache  # device memory, bounded as the host tables
def grid_tables(T: int, L: int, B: int, tied: bool = True) -> GridTables:
    """Build (and cache) the :class:`GridTables` of a T x L grid and batch B."""
    from numba import cuda

    from .grid import index_dtype, wavefront
    wf = wavefront((T, L))
    R = wf.n_cells * B
    it = index_dtype(5 * R)
    t, b = np.divmod(np.arange(T * B), B)          # time-major row t·B + b
    bb, tt = np.divmod(np.arange(B * T), T)        # batch-major row b·T + t
    top = wf.inv_perm[np.arange(T) * L + L - 1]
    r, i = np.divmod(np.arange(2 * R), 2)
    level = np.zeros(R, int) if tied else np.repeat(wf.perm % L, B)  # of each row
    rows = dict(to_time=b * T + t, to_batch=tt * B + bb, top=2 * (top[tt] * B + bb) + 1,
                biases=level[r] + i * (1 if tied else L), da_time=5 * r + i, da_depth=5 * r + 2 + i)

    def dev(a):
        return cuda.to_device(np.ascontiguousarray(a, dtype=it))
    per_level = () if tied else tuple(dev(np.nonzero(level == lv)[0]) for lv in range(L))
    return GridTables(np.asarray(wf.diag_off), wf.n_cells, wf.max_diag_cells,
                      *(cuda.to_device(np.ascontiguousarray(a)) for a in (wf.diag_off, wf.parent, wf.child,
                                                                          wf.perm)),
                      **{k: dev(v) for k, v in rows.items()}, level_rows=per_level)


class CudaGridLSTM(DeviceLayer):
    """Device twin of :class:`mdnumba.layers.GridLSTM2D`: ``forward(x)`` (B, T, D) → the top
    blocks' depth output (B, T, D); backward accumulates the weight gradients (two GEMMs per
    transform, and depth level when the weights are not ``tied``) and returns dL/dx. Parameters
    ``U_time | U_depth | b_time | b_depth`` in one flat buffer (the host layout)."""

    def __init__(self, hidden: int, layers: int, params: np.ndarray,
                 dtype: npt.DTypeLike = config.DEFAULT_DTYPE, *, tied: bool = True):
        self.hidden, self.depth = check_positive_int(hidden, "hidden"), check_positive_int(layers, "layers")
        self.tied = check_flag(tied, "tied")
        self.levels, D = 1 if self.tied else self.depth, self.hidden
        self._init_buffers(params, dtype, self.levels * (16 * D * D + 8 * D),
                           f"hidden={D}, layers={layers}, tied={tied}")
        self._saved: dict | None = None

    _SAVED = ("x", "act", "h", "c")

    @property
    def out_channels(self) -> int:
        """As the host layer's: ``hidden``."""
        return self.hidden

    def _bind(self) -> None:
        D, S = self.hidden, self.levels
        n, nb = 8 * D * D * S, 4 * D * S
        for buf, pre in ((self.params, ""), (self.grads, "d")):
            setattr(self, pre + "U_time", buf[:n].reshape(S, 2 * D, 4 * D))
            setattr(self, pre + "U_depth", buf[n:2 * n].reshape(S, 2 * D, 4 * D))
            setattr(self, pre + "b_time", buf[2 * n:2 * n + nb].reshape(S, 4 * D))
            setattr(self, pre + "b_depth", buf[2 * n + nb:].reshape(S, 4 * D))
        self.biases = self.params[2 * n:].reshape(2 * S, 4 * D)  # [b_time; b_depth]

    @classmethod
    def from_layer(cls, layer: GridLSTM2D) -> CudaGridLSTM:
        """A device copy of a host :class:`mdnumba.layers.GridLSTM2D`."""
        from .layers import GridLSTM2D
        _check_host_layer(cls, layer, GridLSTM2D, "GridLSTM2D")
        return cls(layer.hidden, layer.depth, layer.params.data, layer.dtype, tied=layer.tied)

    def forward(self, x: HostOrDevice, *, save: bool = True) -> HostOrDevice:
        """The top blocks' output for ``x`` (B, T, D); ``save=False``: the two-plane sweep, nothing
        kept for backward. NumPy or device, as ``x``."""
        from .kernels import gridlstm_cuda as g
        save, D, L = check_flag(save, "save"), self.hidden, self.depth
        xd, host_in = self._input(x, "x", 3, D, f"(batch, time, hidden={D})")
        self._check_weights()
        B, T = xd.shape[:2]
        t = grid_tables(T, L, B, self.tied)
        self._saved = None
        xt, y = self._ws("x", (T * B, D)), self._result("y", (B, T, D))
        self.k.gather_rows(xt, xd.reshape(B * T, D), t.to_time)
        if save:
            R = t.n_cells * B
            act, h, c = self._ws("act", (R, 8 * D)), self._ws("h", (R, 2 * D)), self._ws("c", (R, 2 * D))
            self.k.gather_rows(act.reshape(2 * R, 4 * D), self.biases, t.biases)
            g.grid_forward(h, c, act, xt, self.U_time, self.U_depth, t.diag_off, t.parent, t.perm, L, B, D,
                           diag_off_host=t.diag_off_host)
            self.k.gather_rows(y.reshape(B * T, D), h.reshape(2 * R, D), t.top)
            self._saved = dict(B=B, T=T)
        else:
            slots = 2 * t.max_diag_cells
            h, c = self._ws("ih", (slots * B, 2 * D)), self._ws("ic", (slots * B, 2 * D))
            act, out = self._ws("iact", (slots * B, 8 * D)), self._ws("out", (T * B, D))
            lp, lperm = self._ws("lp", (slots, 2), t.parent.dtype), self._ws("lperm", (slots,), t.perm.dtype)
            g.grid_infer(out, h, c, act, lp, lperm, xt, self.U_time, self.U_depth, self.b_time, self.b_depth,
                         t.diag_off, t.parent, t.perm, L, B, D, diag_off_host=t.diag_off_host)
            self.k.gather_rows(y.reshape(B * T, D), out, t.to_batch)
            self._saved = dict(inference=True)
        return y.copy_to_host() if host_in else y

    def backward(self, dh: HostOrDevice, input_grad: bool = True) -> HostOrDevice | None:
        """``dU += zᵀ da``, ``db += 1ᵀ da`` for both transforms; dL/dx (None with ``input_grad=False``)."""
        from .kernels import gridlstm_cuda as g
        input_grad = check_flag(input_grad, "input_grad")
        sv, D, L, w = check_saved(self._saved), self.hidden, self.depth, self._work
        B, T = sv["B"], sv["T"]
        t = grid_tables(T, L, B, self.tied)
        R = t.n_cells * B
        dhd, host_in = self._input(dh, "dh", 3, D, f"(batch, time, hidden={D})")
        check_shape(dhd, (B, T, D), "dh")
        dact, dc = self._ws("dact", (R, 10 * D)), self._ws("dc", (R, 2 * D))
        dx, dtop = self._ws("dx", (T * B, D)), self._ws("dtop", (T * B, D))
        self.k.gather_rows(dtop, dhd.reshape(B * T, D), t.to_time)
        g.grid_backward(dact, dc, dx, dtop, w["act"], w["c"], self.U_time, self.U_depth, t.diag_off, t.parent,
                        t.child, t.perm, L, B, D, diag_off_host=t.diag_off_host)
        zt, zd = self._ws("zt", (R, 2 * D)), self._ws("zd", (R, 2 * D))
        g.gather_operands(zt, zd, w["h"], w["x"], t.parent, t.perm, L, B, D)
        da = self._ws("da", (R, 4 * D))
        for z, cols, dU, db in ((zt, t.da_time, self.dU_time, self.db_time),
                                (zd, t.da_depth, self.dU_depth, self.db_depth)):
            self.k.gather_rows(da.reshape(2 * R, 2 * D), dact.reshape(5 * R, 2 * D), cols)
            self._weight_grads(dU, db, z, da, t.level_rows)
        self._check_grads()
        if not input_grad:
            return None
        out = self._result("dx_out", (B, T, D))
        self.k.gather_rows(out.reshape(B * T, D), dx, t.to_batch)
        self._check_grads(out)
        return out.copy_to_host() if host_in else out

    def _weight_grads(self, dU, db, z, da, level_rows: tuple) -> None:
        """``dU[lv] += zᵀ da``, ``db[lv] += 1ᵀ da`` over the rows of each depth level (all rows,
        level 0, when tied; else gathered into workspaces first, as the host layer does)."""
        R, ones = z.shape[0], self._work.get("ones")
        if ones is None or ones.shape[0] != R:  # filled once per size, not at every backward
            ones = self._ws("ones", (R, 1))
            self.k.fill(ones.reshape(R), 1.0)
        for lv, rows in enumerate(level_rows or [None]):
            if rows is None:
                zr, dr = z, da
            else:
                m = rows.size
                zr, dr = self._ws("zr", z.shape)[:m], self._ws("dr", da.shape)[:m]
                self.k.gather_rows(zr, z, rows)
                self.k.gather_rows(dr, da, rows)
            self.k.gemm(dU[lv], zr, dr, ta=True, accumulate=True)
            self.k.gemm(db[lv:lv + 1], ones[:zr.shape[0]], dr, ta=True, accumulate=True)


class CudaEmbedding(DeviceLayer):
    """Device twin of :class:`mdnumba.charlm.Embedding`: ``forward(ids) = W[ids]``; backward adds
    the rows of ``dy`` into ``dW`` in the CPU's order (the same sums). ``W (V, D)`` is the flat
    buffer. Host ids are checked as the host layer checks them, device ids are not."""

    def __init__(self, vocab: int, dim: int, params: np.ndarray, dtype: npt.DTypeLike = config.DEFAULT_DTYPE):
        self.vocab, self.dim = check_positive_int(vocab, "vocab"), check_positive_int(dim, "dim")
        self._init_buffers(params, dtype, self.vocab * self.dim, f"vocab={vocab}, dim={dim}")
        self._ids = None

    def _bind(self) -> None:
        self.W, self.dW = (a.reshape(self.vocab, self.dim) for a in (self.params, self.grads))

    @classmethod
    def from_layer(cls, layer: Embedding) -> CudaEmbedding:
        """A device copy of a host :class:`mdnumba.charlm.Embedding`."""
        from .charlm import Embedding
        _check_host_layer(cls, layer, Embedding, "mdnumba.charlm.Embedding")
        return cls(*layer.params["W"].shape, layer.params.data, layer.dtype)

    def forward(self, ids: HostOrDevice, *, copy_input: bool = True) -> HostOrDevice:
        """``W[ids]`` (``ids`` (...) integers, out (..., D)); NumPy or device, as ``ids``; device
        ``ids`` are copied for backward unless ``copy_input=False`` (as :meth:`CudaLinear.forward`)."""
        from .charlm import check_ids
        copy_input, host_in = check_flag(copy_input, "copy_input"), not is_device_array(ids)
        idd = self.k.as_device(check_ids(ids, self.vocab)) if host_in else contiguous_device_array(ids, "ids")
        if not np.issubdtype(np.dtype(idd.dtype), np.integer):
            raise TypeError(f"Embedding expects integer ids, got a device array of {idd.dtype}")
        self._check_weights()
        if not host_in and copy_input:  # (host ids: a fresh upload)
            idd = self._kept_copy("ids", idd)
        self._ids, self._shape = idd.reshape(idd.size), np.shape(ids) if host_in else tuple(idd.shape)
        out = self._result("y", (idd.size, self.dim))
        self.k.gather_rows(out, self.W, self._ids)
        out = out.reshape(self._shape + (self.dim,))
        return out.copy_to_host() if host_in else out

    def saved_bytes(self) -> int:
        """Device bytes of the ids kept for backward."""
        return 0 if self._ids is None else self._ids.nbytes

    def backward(self, dy: HostOrDevice) -> None:
        """``dW[ids] += dy`` (repeated ids add up); the ids have no gradient."""
        from .kernels.charlm_cuda import scatter_add_rows
        if self._ids is None:
            raise missing_activations(run="forward(ids)")
        want = self._shape + (self.dim,)
        dyd, _ = self._input(dy, "dy", len(want), self.dim, "(the output's shape)")
        check_shape(dyd, want)
        scatter_add_rows(self.dW, self._ids, dyd.reshape(self._ids.size, self.dim))
        self._check_grads()


class CudaBlockSubsample(OnTheDevice):
    """Device twin of :class:`mdnumba.stack.BlockSubsample`: each way is one row gather whose
    index table comes from applying the host op to row numbers."""

    def __init__(self, block: int, ndim: int = 2):
        from .stack import BlockSubsample
        self.k = _kernels()
        self.host = BlockSubsample(block, ndim)
        self._tables: dict = {}
        self._shape: tuple | None = None

    def out_channels(self, in_channels: int) -> int:
        """As :meth:`mdnumba.stack.BlockSubsample.out_channels`."""
        return self.host.out_channels(in_channels)

    def out_sizes(self, sizes: npt.ArrayLike) -> np.ndarray:
        """As :meth:`mdnumba.stack.BlockSubsample.out_sizes`."""
        return self.host.out_sizes(sizes)

    def _table(self, shape: tuple):
        """(gather for forward, gather for backward, output shape) for input ``shape``."""
        if shape not in self._tables:
            from numba import cuda

            from .grid import index_dtype
            self.host._check_input(shape)  # as the host op (the row numbers below have 1 channel)
            n = int(np.prod(shape[:-1]))
            rows = np.arange(n, dtype=index_dtype(n)).reshape(shape[:-1] + (1,))
            src = self.host._to_blocks(rows)                # the host op on the row numbers
            out_shape = src.shape[:-1] + (src.shape[-1] * shape[-1],)
            src = src.reshape(-1)
            inv = np.argsort(src).astype(src.dtype)
            self._tables[shape] = (cuda.to_device(src), cuda.to_device(inv), out_shape)
        return self._tables[shape]

    def _device(self, x: HostOrDevice, name: str) -> DeviceArray:
        """``x`` on the device: a CUDA array as it is (C-contiguous: the gather reads it as rows),
        a NumPy one copied there (no masked values: as the host op's); floating point either way,
        and a NumPy ``dy`` finite (a CUDA one is not read for that, as the layers' are not)."""
        if not is_device_array(x):
            arr = as_array(x, name, f"(batch, {self.host.ndim} grid axes, channels)")
            if name == "dy":
                check_gradient(arr, name)
            else:
                check_floating(arr, name, None)
            return self.k.as_device(arr)
        xd = contiguous_device_array(x, name)
        check_floating(xd, name, None)
        return xd

    def _gather(self, xd, index, shape: tuple):
        """Rows of ``C`` = input channels: ``out[r] = xd[index[r]]``, ``out`` of ``shape``."""
        from numba import cuda
        C = self._shape[-1]
        out = cuda.device_array(shape, dtype=xd.dtype)
        self.k.gather_rows(out.reshape(out.size // C, C), xd.reshape(xd.size // C, C), index)
        return out

    def forward(self, x: HostOrDevice) -> DeviceArray:
        """Blocks of cells → channels on the device (NumPy or device in, device array out)."""
        xd = self._device(x, "x")
        src, _, out_shape = self._table(tuple(xd.shape))  # checks the shape: a refused x changes nothing
        self._shape = tuple(xd.shape)
        return self._gather(xd, src, out_shape)

    def backward(self, dy: HostOrDevice, input_grad: bool = True) -> DeviceArray | None:
        """The inverse gather (None with ``input_grad=False``)."""
        input_grad = check_flag(input_grad, "input_grad")
        if self._shape is None:
            raise missing_activations()
        if not input_grad:
            return None
        _, inverse, out_shape = self._table(self._shape)
        check_shape(dy, out_shape)  # the gather would read past a smaller dy
        return self._gather(self._device(dy, "dy"), inverse, self._shape)


class _DeviceOptimizer(OnTheDevice):
    """Device ``step`` for :class:`~mdnumba.optim.Adam` and :class:`~mdnumba.optim.RMSprop`: the
    gradient norm, the clip scale and the update stay on the GPU (``stats = [norm, scale]``)."""

    def __init__(self, modules, **kw):
        from .kernels import optim_cuda
        require_cuda()
        self.k = optim_cuda
        #: layer sizes when ``modules`` keeps every layer in one flat buffer (a DeviceModel): the
        #: norm and the update then run once over it, the state is still saved per layer
        self._sizes = [m.size for m in modules.layers] if self._is_flat(modules) else None
        #: the step count t on the device, two entries (``optim_cuda._step_count``): ``steps[t % 2] == t``
        self.steps = optim_cuda.step_counter()
        super().__init__(modules, **kw)
        self.stats = optim_cuda.scratch(3)
        #: zero the gradients in the update kernel (the device trainer's zero_grad, no launch)
        self.clear_grads = False
        self.partials = optim_cuda.scratch(len(self.buffers) * optim_cuda.REDUCE_BLOCKS)

    @property
    def t(self) -> int:
        """Steps taken (Adam's bias correction, checkpoints). The update kernels count them on the
        device as well, so that a step's launch arguments do not change with it: setting ``t``
        (``load_state_dict``) sets the device's count too."""
        return self._t

    @t.setter
    def t(self, value: int) -> None:
        self._t = check_count(value, "t")
        self.k.set_step_count(self.steps, self._t)

    def _apply(self, norm) -> None:
        """Advance t and update every buffer (``norm``: where the kernels find the clip scale); the
        kernels take t from :attr:`steps` (its entry ``t % 2`` before this step)."""
        parity = self._t % 2
        self._t += 1
        b1, b2 = self.betas
        for (p, g), m, v in zip(self.buffers, self.m, self.v):
            self._update(p, g, m, v, self.lr, b1, b2, self.eps, self.steps, parity, norm)

    @staticmethod
    def _fill_zero(g) -> None:
        from .kernels.wavefront_cuda import fill
        fill(g, 0.0)

    @staticmethod
    def _is_flat(modules) -> bool:
        return hasattr(modules, "layers") and hasattr(modules, "grads")

    @staticmethod
    def _collect(modules) -> list:
        """(params, grads) of a DeviceModel (its flat buffers), of a device layer, or of each of a
        list of them (or of ``modules.layers``); TypeError for anything else, e.g. host layers."""
        if _DeviceOptimizer._is_flat(modules):
            return [(modules.params, modules.grads)]
        layers = getattr(modules, "layers", [modules] if hasattr(modules, "params") else modules)
        try:
            layers = list(layers)
        except TypeError:  # not iterable: refused below
            layers = [layers]
        pairs = [(getattr(m, "params", None), getattr(m, "grads", None)) for m in layers]
        if not pairs or not all(is_device_array(p) and is_device_array(g) for p, g in pairs):
            raise TypeError("a device optimiser takes device layers (CudaLSTM, CudaLinear, ...), a "
                            "DeviceModel or a list of them; for host layers, device='cuda' ones "
                            "included, use mdnumba.Adam or mdnumba.RMSprop")
        return pairs

    def _state(self) -> dict:
        """As the host optimiser's: host arrays, one pair of moments per layer."""
        state = super()._state()
        if self._sizes:
            cut = np.cumsum(self._sizes)[:-1]
            state["m"], state["v"] = np.split(state["m"][0], cut), np.split(state["v"][0], cut)
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output (per-layer moments, as the host optimiser saves them)."""
        state = read_state(state)
        if self._sizes:
            check_state_count(state, len(self._sizes))
            # each layer's, as the host optimiser checks them (not only the joined length)
            check_state_shapes(list(state["m"]) + list(state["v"]), [(n,) for n in self._sizes] * 2)
            state = dict(state, m=[np.concatenate([np.ravel(a) for a in state["m"]])],
                         v=[np.concatenate([np.ravel(a) for a in state["v"]])])
        super().load_state_dict(state)

    @staticmethod
    def _as_1d(a):
        """Device buffers are 1-D already (flat ``params``/``grads``)."""
        return a

    @staticmethod
    def _zeros_like(p):
        from numba import cuda
        return cuda.to_device(np.zeros(p.shape, p.dtype))

    @staticmethod
    def _to_host(a) -> np.ndarray:
        return a.copy_to_host()

    @staticmethod
    def _assign(dst, src) -> None:
        dst.copy_to_device(np.ascontiguousarray(src))

    def grad_norm(self) -> float:
        """Global L2 norm of all gradients (one device→host copy)."""
        self.k.global_norm(self.stats, self.partials, [g for _, g in self.buffers], self.clip_norm,
                           self.stats, 2)
        return float(self.stats.copy_to_host()[0])

    def step(self, sync: bool = True, record: tuple[DeviceArray, int] | None = None) -> float | None:
        """One update, all on the device (two launches per buffer: sums of squares, then the
        update, which finishes the norm itself); ``record=(device array, slot)`` also stores
        the norm there. With :attr:`clear_grads` the update also zeroes the gradients.

        ``sync``: return the pre-clipping norm (one device→host copy) and raise
        :class:`~mdnumba.optim.NonFiniteGradientError` if it is not finite (then nothing was
        updated). Without ``sync`` nothing is copied and a non-finite norm leaves the parameters
        and moments as they were, but the step count ``t`` (on the host, which has not seen the
        norm) still counts the step: read the norms (``record``) before going on, as the
        trainer does, which stops the run at such a step.
        """
        grads = [g for _, g in self.buffers]
        self.k.sumsq_partials(self.partials, grads)
        rec, slot = _checked_record(record) if record is not None else (self.stats, 2)
        self._apply(self.k.NormArgs(self.partials, float(self.clip_norm or 0.0), self.stats, rec, int(slot),
                                    self.clear_grads))  # (partials: one block of sums per buffer)
        if not sync:
            return None
        norm = float(self.stats.copy_to_host()[0])
        if not math.isfinite(norm):
            self.t -= 1
            raise nonfinite_gradient(self.clip_norm)
        return norm


def _checked_record(record: object) -> tuple[DeviceArray, int]:
    """``record`` of :meth:`_DeviceOptimizer.step` if it is (a 1-D device array, a slot in it),
    else ValueError (the update kernel would write past the array, or into a host copy of it)."""
    rec, slot = record if isinstance(record, tuple) and len(record) == 2 else (None, None)
    if not (is_device_array(rec) and len(rec.shape) == 1 and is_int_in(slot, 0, rec.shape[0])):
        raise ValueError(f"record must be (a 1-D device array, a slot in [0, its length)), got {record!r}")
    return rec, int(slot)


class CudaAdam(_DeviceOptimizer, Adam):
    """:class:`mdnumba.optim.Adam` on device buffers (``modules``: objects with flat device
    ``params`` and ``grads``, e.g. :class:`CudaLSTM`, or a :class:`DeviceModel`'s ``layers``)."""

    def _update(self, *args) -> None:
        self.k.adam_update(*args)


class CudaRMSprop(_DeviceOptimizer, RMSprop):
    """:class:`mdnumba.optim.RMSprop` on device buffers."""

    def _update(self, *args) -> None:
        self.k.rmsprop_update(*args)


#: device twins of :data:`mdnumba.optim.OPTIMIZERS`
DEVICE_OPTIMIZERS = {"adam": CudaAdam, "rmsprop": CudaRMSprop}


# ------------------------------------------------------------------ layer dispatch
_LAYER_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state_for(layer) -> CudaLSTM:
    st = _LAYER_STATE.get(layer)
    if st is None:
        st = _LAYER_STATE[layer] = CudaLSTM.from_layer(layer)
        st.checked = True
    return st


def layer_forward(layer: WavefrontLSTM, x: HostOrDevice, state: tuple | None = None,
                  save: bool = True, sizes: object = None) -> HostOrDevice:
    """``WavefrontLSTM.forward`` on the GPU: upload params, run; NumPy or device ``h`` (as ``x``)."""
    return _state_for(layer).forward(x, state, save=save, sizes=sizes, upload=layer.params.data)


def _saved_state(layer: WavefrontLSTM, what: str = "backward()") -> CudaLSTM:
    st = _LAYER_STATE.get(layer)
    if st is None or st._saved is None:
        raise missing_activations(what)
    return st


def layer_backward(layer: WavefrontLSTM, dh: HostOrDevice, input_grad: bool = True,
                   final_state_grad: tuple | None = None) -> HostOrDevice | None:
    """``WavefrontLSTM.backward`` on the GPU: returns dx (NumPy or device, as ``dh``; None with
    ``input_grad=False``) and adds the gradients to the host ``layer.grads``."""
    st = _saved_state(layer)
    st.zero_grad()
    dx = st.backward(dh, input_grad, final_state_grad)
    layer.grads.data[...] += st.grads_to_host()
    return dx


def layer_bytes(layer: WavefrontLSTM, saved: bool) -> int:
    """Device bytes a ``device="cuda"`` layer keeps between calls: the activations saved for
    backward (``saved``; none after ``forward(x, save=False)``) or every workspace; 0 before a
    forward and after :func:`layer_free`."""
    st = _LAYER_STATE.get(layer)
    if st is None or st._saved is None:
        return 0
    return st.saved_bytes() if saved else st.workspace_bytes()


def layer_free(layer: WavefrontLSTM) -> None:
    """Drop a ``device="cuda"`` layer's device copy (weights, activations, workspaces)."""
    _LAYER_STATE.pop(layer, None)


def layer_final_state(layer: WavefrontLSTM) -> tuple:
    """``LSTM1D.final_state`` of a ``device="cuda"`` layer."""
    return _saved_state(layer, "final_state()").final_state()


def layer_state_grad(layer: WavefrontLSTM) -> tuple:
    """``LSTM1D.initial_state_grad`` of a ``device="cuda"`` layer."""
    st = _LAYER_STATE.get(layer)
    if st is None:  # no forward yet
        raise RuntimeError(NO_STATE_GRAD)
    return st.initial_state_grad()
