"""NumPy-facing layers: arrays in, arrays out, ``forward`` and ``backward`` callable.

:class:`WavefrontLSTM` is the N-dimensional engine; :class:`MDLSTM2D` (images)
and :class:`LSTM1D` (sequences) are its public faces with fixed names.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from . import config
from ._validate import (
    FINAL_STATE_WITH_SIZES,
    INPUT_GRAD,
    NO_STATE_GRAD,
    SIZES_WITH_STATE,
    NonFiniteError,
    check_array,
    check_device,
    check_directions,
    check_finite_number,
    check_finite_params,
    check_flag,
    check_grads,
    check_not_scalar,
    check_positive_int,
    check_saved,
    check_shape,
    check_sizes,
    check_state,
    check_stateful,
    grid_layout,
    missing_activations,
    overflowed_state,
    seeded_rng,
)
from .grid import direction_tables, live_items, padding_edge, state_tables, wavefront
from .kernels.cell import cell_code
from .kernels.gemm import column_sums, count_nonfinite, matmul_at_b, matmul_rows
from .kernels.gridlstm import gather_operands as gather_grid_operands
from .kernels.simd import TILE_MIN_STEPS
from .kernels.wavefront import (
    seed_state,
    seed_state_grad,
    skew_rows,
    state_of_cell,
    take_state_grad,
    unskew_rows,
    wavefront_backward,
    wavefront_forward,
    wavefront_infer,
    weight_operands,
    zero_padding,
    zero_rows,
)
from .params import OwnsParams, ParamLayout, one_thread_at_a_time


class WavefrontLSTM(OwnsParams):
    """N-dimensional LSTM over a grid (Graves 2007), 1 or 2**N scan directions.

    Input ``(B, n_1, ..., n_N, C)``, output ``(B, n_1, ..., n_N, S*D)`` for S
    directions. Direction ``q`` (bit d of q set: the scan runs backwards along
    axis d) writes output channels ``q*D:(q+1)*D``; the directions have their own
    weights and are swept together, not one after another. Parameters in one
    flat buffer: ``W (C, G)``, ``U (D, N, G)`` (``U[:, d]`` acts on the parent
    along dimension d), ``b (G,)``, ``G = (N+3)*D`` gate columns; with S > 1 each
    gets a leading direction axis (``W (S, C, G)`` ...).

    ``cell``: "graves" (Graves 2007 without peepholes: ``[i | f_1..f_N | o | g]``, c = i·g + Σ f_d·c_d,
    h = o·tanh c), "stable" (Leifert et al. 2016: ``[i | f | l_1..l_{N-1} | o | g]``,
    c = i·g + f·Σ w_d·c_d with w = softmax(l, 0): a convex mix, bounded state) or
    "spatial" (Theis & Bethge 2015: graves with h = tanh(c·o)); equations in
    :mod:`mdnumba.kernels.cell`.

    Forget-gate biases start at ``forget_bias``; the default (None) is +1 for
    N = 1 and the stable cell, and ``−ln(N−1)`` for graves/spatial with N >= 2 (0 in
    2D), so that the N forget gates start at 1/N and sum to 1: with +1 in 2D each
    starts near 0.73, their sum 1.46 makes c grow ~1.46^k along diagonal k and a
    128x128 float32 grid overflows to inf at step 1 (measured); with 0 in 3D the
    sum 1.5 gave |c| ~ 6e8 at 16x16x16.
    """

    _BUFFERS = {"_saved": lambda: None, "_work": dict}
    _FIXED = OwnsParams._FIXED + ("ndim", "cell", "cell_code", "directions", "in_channels", "hidden")

    def __init__(self, ndim: int, in_channels: int, hidden: int, *, seed: int = 0,
                 dtype: npt.DTypeLike = config.DEFAULT_DTYPE, forget_bias: float | None = None,
                 device: str = "cpu", cell: str = "graves", directions: int = 1):
        self.ndim = check_positive_int(ndim, "ndim")
        self.cell, self.cell_code = cell, cell_code(cell)
        self.directions = check_directions(directions, self.ndim)
        self.device = check_device(device)
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.hidden = check_positive_int(hidden, "hidden")
        self.dtype = config.resolve_dtype(dtype)
        N, C, D = self.ndim, self.in_channels, self.hidden
        G = (N + 3) * D
        lead = (directions,) if directions > 1 else ()
        self.layout = ParamLayout({"W": lead + (C, G), "U": lead + (D, N, G), "b": lead + (G,)})
        self.params = self.layout.new(self.dtype)
        self.grads = self.layout.new(self.dtype)
        rng = seeded_rng(seed)
        scale = 1.0 / np.sqrt(C + N * D)
        for name in ("W", "U"):
            self.params[name][...] = rng.uniform(-scale, scale, self.layout.shapes[name])
        if forget_bias is None:  # graves/spatial: the N forget gates start summing to 1
            forget_bias = 1.0 if (N == 1 or cell == "stable") else -float(np.log(N - 1))
        forget_bias = check_finite_number(forget_bias, "forget_bias", self.dtype)
        n_forget = 1 if cell == "stable" else N
        self.params["b"][..., D:(1 + n_forget) * D] = forget_bias
        self._saved: dict | None = None
        self._work: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ API
    @property
    def out_channels(self) -> int:
        """Channels of the output: ``hidden`` units per scan direction (``directions * hidden``)."""
        return self.directions * self.hidden

    def forward(self, x: np.ndarray, *, save: bool = True, sizes: npt.ArrayLike | None = None) -> np.ndarray:
        """Run the forward sweep and save the activations needed by backward.

        ``x`` of any float dtype is cast to the layer's (``self.dtype``), in which the output
        comes back. With ``device="cuda"`` ``x`` may also be a CUDA array (numba device array or anything
        with ``__cuda_array_interface__``); the output is then a numba device array.
        ``save=False`` (inference) keeps nothing for backward: the sweep then holds two
        hyperplanes at a time instead of every cell's activations (the same output, a fraction of
        the memory), on the CPU and with ``device="cuda"``.
        ``sizes`` (batch, N) ints: a batch of items of different sizes, each padded at the end of
        every axis to ``x``'s grid; item b is ``x[b, :sizes[b][0], :sizes[b][1], ...]``. Every scan
        direction then starts at a corner of the item itself, so each item's output (and, in
        backward, its dx and gradients) is what it alone would give; the padding of ``x`` is not
        read, that of the output and dx is zero, and that of ``dh`` is ignored.
        """
        return self._forward(x, None, save, sizes)

    def backward(self, dh: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Return dL/dx for upstream ``dh`` = dL/dh (cast to the layer's dtype, as ``x``) and
        accumulate parameter grads; ``input_grad=False`` skips dL/dx (the layer reads the data)
        and returns None."""
        return self._backward(dh, input_grad, None)

    @one_thread_at_a_time
    def _forward(self, x, state, save=True, sizes=None):
        """:meth:`forward`; ``state = (h0, c0)`` (1D: :meth:`LSTM1D.forward`) or None (zero state,
        the tables of :func:`direction_tables`, of ``sizes`` if given); ``save=False``:
        :meth:`_forward_rolling`."""
        check_finite_params(self.params)
        save = check_flag(save, "save")
        if self.device == "cuda":
            from .backend_cuda import layer_forward
            return layer_forward(self, x, state, save, sizes)
        x = check_array(x, "x", self.ndim + 2, self.in_channels, self.dtype, self._layout_str())
        B, D, S = x.shape[0], self.hidden, self.directions
        dims, dense = x.shape[1:-1], x[..., 0].size
        if sizes is not None and state is not None:
            raise ValueError(SIZES_WITH_STATE)
        sizes = check_sizes(sizes, B, dims)
        if state is None:
            wf = wavefront(dims)
            tables, sweep = direction_tables(wf.dims, B, S, sizes), wf.diag_off
        else:
            h0, c0 = check_state(state, "state", B, S * D, self.dtype)
            wf, *tables = state_tables(dims[0], B, S)
            sweep = wf.diag_off[1:-1]  # cells 1..T; cell 0 holds (h0, c0)
        skew_src, unskew_src = tables
        self._saved = None  # from here on the workspaces no longer hold the last forward's
        if not save:
            return self._forward_rolling(x, wf, skew_src, None if state is None else (h0, c0), sizes)
        rows = wf.n_cells * B
        xs = self._workspace("xs", (S * rows, self.in_channels))
        skew_rows(xs, x.reshape(dense, 1, -1), skew_src, unskew_src, B)
        # zeroed when made: only the items' rows of a padded batch are ever written, and the
        # backward sweep multiplies the padding's rows (forget gates) by zeros: they must be finite
        act = self._workspace("act", (S * rows, self.layout.shapes["b"][-1]), zeroed=True)
        h = self._workspace("h", (S * rows, D))
        c = self._workspace("c", (S * rows, D))
        W, b = self._per_direction("W"), self._per_direction("b")
        live = None if sizes is None else np.flatnonzero(skew_src[0] >= 0)  # items' rows of a slab
        few = self.in_channels < TILE_MIN_STEPS  # then the sweep projects its rows itself
        if not few:
            for q in range(S):  # (a row is an item's in every direction or in none)
                sl = slice(q * rows, (q + 1) * rows)
                matmul_rows(act[sl], xs[sl], W[q], b[q], False, live)
        U = self.params["U"].reshape(S, D, -1)
        if state is not None:
            seed_state(h, c, act, h0, c0, B)
        items = None if sizes is None else live_items(dims, B, sizes)
        wavefront_forward(h, c, act, U, sweep, wf.parent, B, D, self.cell_code, items=items,
                          inputs=(xs, W, b) if few else None)
        if sizes is not None:  # the padding's cells, not swept: zero state
            zero_padding(h, c, skew_src)
        out = np.empty((dense, S, D), dtype=self.dtype)
        unskew_rows(out, h, skew_src, unskew_src)  # grid order, direction q in channels q*D:(q+1)*D
        try:
            self._check_state(out, output=True)
        except NonFiniteError:  # NaN gates (inf - inf): nothing saved to differentiate, and a
            self._work.pop("act", None)  # later padded batch skips the padding's rows, whose gates
            raise  # backward multiplies by 0: the buffer is made anew, zeroed
        self._saved = dict(xs=xs, act=act, c=c, h=h, wf=wf, batch=B, dims=dims, tables=tables,
                           stateful=state is not None, sizes=sizes, items=items, live=live)
        return out.reshape((B,) + dims + (S * D,))

    def _forward_rolling(self, x, wf, skew_src, state, sizes):
        """:meth:`forward` with ``save=False``: :func:`wavefront_infer` in buffers of two
        hyperplanes; keeps only the final state (1D, :meth:`LSTM1D.final_state`). The sweep
        writes the items' cells only: with ``sizes`` the output starts as zeros."""
        B, S, D = x.shape[0], self.directions, self.hidden
        slots = 2 * wf.max_diag_cells
        act = self._workspace("roll_act", (S * slots * B, self.layout.shapes["b"][-1]))
        h = self._workspace("roll_h", (S * slots * B, D))
        c = self._workspace("roll_c", (S * slots * B, D))
        lp = np.empty((slots, self.ndim), wf.parent.dtype)  # parents' slots
        first, last = (0, wf.n_diagonals) if state is None else (1, wf.n_diagonals - 1)
        if state is not None:
            seed_state(h, c, act, state[0], state[1], B)  # cell 0 (slot 0) holds (h0, c0)
        out = (np.empty if sizes is None else np.zeros)((x[..., 0].size, S, D), dtype=self.dtype)
        wavefront_infer(out, h, c, act, lp, x.reshape(-1, self.in_channels), skew_src,
                        self._per_direction("W"), self._per_direction("b"),
                        self.params["U"].reshape(S, D, -1), wf.diag_off, wf.parent, first, last,
                        B, D, self.cell_code, items=None if sizes is None else live_items(wf.dims, B, sizes))
        final = None
        if self.ndim == 1:  # the last swept cell is in slot (last - 1) % 2 (one cell per plane)
            final = np.empty((B, S * D), self.dtype), np.empty((B, S * D), self.dtype)
            state_of_cell(final[0], final[1], h, c, (last - 1) % 2, B)
        self._check_state(out, output=True)
        self._saved = dict(inference=True, final_state=final, sizes=sizes)
        return out.reshape(x.shape[:-1] + (S * D,))

    @one_thread_at_a_time
    def _backward(self, dh, input_grad, final_state_grad):
        """:meth:`backward`; after a forward from a state, ``final_state_grad = (dL/dh_T, dL/dc_T)``
        or None (zeros), and the initial state's gradient is kept (:meth:`LSTM1D.initial_state_grad`)."""
        input_grad = check_flag(input_grad, "input_grad")
        if self.device == "cuda":
            from .backend_cuda import layer_backward
            return layer_backward(self, dh, input_grad, final_state_grad)
        sv = self._require_saved(final_state_grad)
        wf, B, D, S = sv["wf"], sv["batch"], self.hidden, self.directions
        want = (B,) + sv["dims"] + (S * D,)
        dh = check_array(dh, "dh", self.ndim + 2, None, self.dtype, self._layout_str("D"))
        check_shape(dh, want, "dh")
        self._check_state(sv["c"])
        skew_src, unskew_src = sv["tables"]
        rows, dense = wf.n_cells * B, dh[..., 0].size
        dhs = self._workspace("dhs", (S * rows, D))
        skew_rows(dhs, dh.reshape(dense, S, D), skew_src, unskew_src, B)
        dact = self._workspace("dact", sv["act"].shape)
        dc = self._workspace("dc", sv["c"].shape)
        sweep, items, live = wf.diag_off, sv["items"], sv["live"]
        if items is not None:  # the padding's rows next to the items pass them zeros
            zero_rows(dact, dc, padding_edge(sv["dims"], B, sv["sizes"]), rows)
        if sv["stateful"]:
            dhT, dcT = (np.zeros((B, S * D), self.dtype),) * 2 if final_state_grad is None else \
                check_state(final_state_grad, "final_state_grad", B, S * D, self.dtype)
            seed_state_grad(dhs, dc, dact, dhT, dcT, B)
            sweep = wf.diag_off[:-1]  # cells T..0: the pad T+1 holds dL/dc_T
        wavefront_backward(dact, dc, dhs, sv["act"], sv["c"], self.params["U"].reshape(S, D, -1), sweep,
                           wf.parent, wf.child, B, D, self.cell_code, items=items)
        if sv["stateful"]:
            dh0, dc0 = np.empty((B, S * D), self.dtype), np.empty((B, S * D), self.dtype)
            take_state_grad(dh0, dc0, dhs, dc, dact, B)
            sv["state_grad"] = (dh0, dc0)
        self._weight_grads(dact, sv, live)
        check_grads(self.grads.data, self.dtype)
        if not input_grad:
            return None
        dxs = self._workspace("dxs", (S * rows, self.in_channels))
        dxs[...] = 0
        W = self._per_direction("W")
        for q in range(S):
            sl = slice(q * rows, (q + 1) * rows)
            matmul_rows(dxs[sl], dact[sl], np.ascontiguousarray(W[q].T), W[q, 0], True, live)  # (no bias)
        dx = np.empty((dense, 1, self.in_channels), dtype=self.dtype)
        unskew_rows(dx, dxs, skew_src, unskew_src)  # Σ_q unflip_q(dact_q W_qᵀ)
        check_grads(dx, self.dtype, INPUT_GRAD)
        return dx.reshape((B,) + sv["dims"] + (self.in_channels,))

    def saved_bytes(self) -> int:
        """Bytes held by the activations saved for backward (0 before forward; ``device="cuda"``:
        device memory)."""
        if self.device == "cuda":
            from .backend_cuda import layer_bytes
            return layer_bytes(self, saved=True)
        if self._saved is None or self._saved.get("inference"):  # forward(x, save=False) kept none
            return 0
        return sum(a.nbytes for a in self._saved_arrays())

    def _saved_arrays(self) -> list[np.ndarray]:
        """The arrays of the last forward's saved activations (workspaces and index tables)."""
        values = (self._saved or {}).values()
        arrays = [a for v in values for a in (v if isinstance(v, tuple) else (v,))]
        return [a for a in arrays if isinstance(a, np.ndarray)]

    def workspace_bytes(self) -> int:
        """Bytes of every buffer the layer keeps between calls (saved + scratch; 0 after
        :meth:`free_buffers`; ``device="cuda"``: device memory)."""
        if self.device == "cuda":
            from .backend_cuda import layer_bytes
            return layer_bytes(self, saved=False)
        if not self._saved:
            return 0
        work = {id(v) for v in self._work.values()}  # + the saved index tables, kept too
        return sum(v.nbytes for v in self._work.values()) + \
            sum(a.nbytes for a in self._saved_arrays() if id(a) not in work)

    def free_buffers(self) -> None:
        """:meth:`OwnsParams.free_buffers`; ``device="cuda"``: also the device copy of the layer,
        its activations and workspaces (made again by the next forward)."""
        super().free_buffers()
        if self.device == "cuda":
            from .backend_cuda import layer_free
            layer_free(self)

    # -------------------------------------------------------------- helpers
    def _require_saved(self, final_state_grad=None, what: str = "backward()") -> dict:
        """The saved activations of the last forward; RuntimeError before any (or after a
        ``forward(x, save=False)``), ValueError for a ``final_state_grad`` after a forward without
        ``state``."""
        check_stateful(check_saved(self._saved, what)["stateful"], final_state_grad)
        return self._saved

    def _check_state(self, c: np.ndarray, output: bool = False) -> None:
        """NonFiniteError if the forward's cell state ``c`` overflowed, or (``output``) its output
        h holds NaN/inf from such a state (:func:`overflowed_state`)."""
        bad = count_nonfinite(c)
        if bad:
            raise overflowed_state(self.cell, bad, output)

    def _weight_grads(self, dact: np.ndarray, sv: dict, live) -> None:
        """``[dW; dU; db] += zᵀ @ dact`` per direction, ``z = [xs | h of the parents | 1]``
        (:func:`weight_operands`): one GEMM that reads ``dact`` once, not three times (2D 32x32
        B64 D64: 30.8 -> 28.6 ms; 1D T200 B64 D256 train step 1.04x). With one direction the
        three are contiguous in the flat layout and the GEMM adds into them; else it sums into a
        scratch added to each. The padding's rows of a padded batch (not in ``live``) are left out."""
        wf, B, D, N, S, C = sv["wf"], sv["batch"], self.hidden, self.ndim, self.directions, self.in_channels
        rows, K = wf.n_cells * B, C + N * D + 1
        z = self._workspace("z", (dact.shape[0], K))
        weight_operands(z, sv["xs"], sv["h"], wf.parent, B, D, live)
        if S == 1:
            matmul_at_b(self.grads.data.reshape(K, -1), z, dact, live)
            return
        dz = np.empty((K, dact.shape[1]), self.dtype)
        dW, dU, db = (self._per_direction(n, self.grads) for n in ("W", "U", "b"))
        for q in range(S):
            sl = slice(q * rows, (q + 1) * rows)
            dz[...] = 0
            matmul_at_b(dz, z[sl], dact[sl], live)
            dW[q] += dz[:C]
            dU[q] += dz[C:K - 1].reshape(dU[q].shape)
            db[q] += dz[K - 1]

    def _per_direction(self, name: str, buf=None) -> np.ndarray:
        """View of parameter ``name`` with a leading direction axis (also when S = 1)."""
        view = (self.params if buf is None else buf)[name]
        return view if self.directions > 1 else view[None]

    def _layout_str(self, ch: str = "C") -> str:
        return grid_layout(self.ndim, ch)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(in={self.in_channels}, hidden={self.hidden}, "
                f"cell={self.cell!r}, directions={self.directions}, dtype={self.dtype.name})")


class MDLSTM2D(WavefrontLSTM):
    """2D multi-dimensional LSTM (Graves 2007) over images.

    ``forward(x)``: ``x`` of shape (B, H, W, C) → (B, H, W, directions*hidden).
    ``backward(dh)`` → dL/dx, accumulating into ``grads``. ``directions=1`` scans
    from the top-left corner; ``directions=4`` adds the scans from the bottom-left
    (q=1), top-right (q=2) and bottom-right (q=3) corners, output channels
    ``q*hidden:(q+1)*hidden``. Named views (one direction): ``W (C, 5D)``,
    ``U_up (D, 5D)``, ``U_left (D, 5D)``, ``b (5D,)`` with gate blocks
    ``[i | f_up | f_left | o | g]`` (stable cell: ``[i | f | λ | o | g]``); ``U`` is
    both recurrent matrices. With 4 directions every view gains a leading axis of 4.
    ``cell`` is "graves", "stable" or "spatial" (see :class:`WavefrontLSTM`).
    """

    def __init__(self, in_channels: int, hidden: int, *, directions: int = 1, seed: int = 0,
                 dtype: npt.DTypeLike = config.DEFAULT_DTYPE, forget_bias: float | None = None,
                 device: str = "cpu", cell: str = "graves"):
        super().__init__(2, in_channels, hidden, seed=seed, dtype=dtype, forget_bias=forget_bias,
                         device=device, cell=cell, directions=directions)
        for buf in (self.params, self.grads):
            buf.add_alias("U_up", buf["U"][..., 0, :])
            buf.add_alias("U_left", buf["U"][..., 1, :])


class MDLSTM3D(WavefrontLSTM):
    """3D multi-dimensional LSTM over volumes: (B, D1, D2, D3, C) → (B, D1, D2, D3, directions*hidden).

    Three neighbours (one step back along each axis), three forget gates
    (graves: blocks ``[i | f_1 | f_2 | f_3 | o | g]``), wavefront over the planes
    ``i + j + k = s``. ``directions`` is 1 or 8 (every corner). Views
    ``W (C, 6D)``, ``U (D, 3, 6D)``, ``b (6D,)``.
    """

    def __init__(self, in_channels: int, hidden: int, *, directions: int = 1, seed: int = 0,
                 dtype: npt.DTypeLike = config.DEFAULT_DTYPE, forget_bias: float | None = None,
                 device: str = "cpu", cell: str = "graves"):
        super().__init__(3, in_channels, hidden, seed=seed, dtype=dtype, forget_bias=forget_bias,
                         device=device, cell=cell, directions=directions)


class LSTM1D(WavefrontLSTM):
    """Plain LSTM over sequences: ``forward(x)`` with (B, T, C) → (B, T, directions*hidden).

    Named views ``W (C, 4D)``, ``U (D, 1, 4D)`` (alias ``U_rec (D, 4D)``),
    ``b (4D,)`` with gate blocks ``[i | f | o | g]``. ``directions=2`` is a
    bidirectional LSTM (second half of the channels reads the sequence backwards).
    ``cell``: "graves" (= "stable" in 1D: one neighbour) or "spatial" (h = tanh(c·o)).
    """

    def __init__(self, in_features: int, hidden: int, *, seed: int = 0,
                 dtype: npt.DTypeLike = config.DEFAULT_DTYPE, forget_bias: float | None = None,
                 device: str = "cpu", directions: int = 1, cell: str = "graves"):
        super().__init__(1, in_features, hidden, seed=seed, dtype=dtype, forget_bias=forget_bias,
                         device=device, directions=directions, cell=cell)
        for buf in (self.params, self.grads):
            buf.add_alias("U_rec", buf["U"][..., 0, :])

    def forward(self, x: np.ndarray, state: tuple | None = None, *, save: bool = True,
                sizes: npt.ArrayLike | None = None) -> np.ndarray:
        """:meth:`WavefrontLSTM.forward`, from the initial state ``state = (h0, c0)`` if given,
        each ``(batch, directions*hidden)`` (direction q in columns ``q*hidden:(q+1)*hidden``, as
        the output; a reversed scan starts at the last step), else from zeros. Continue a
        sequence with ``forward(x2, state=layer.final_state())`` (also with ``save=False``:
        streaming inference) with one direction: a reversed scan of a chunk starts at the chunk's
        end, so chunks of a bidirectional layer are not one sequence's scans. ``sizes``: the
        lengths of padded sequences, (batch,) (a reversed scan then starts at each sequence's own
        last step); not with ``state``."""
        return self._forward(x, state, save, sizes)

    def backward(self, dh: np.ndarray, input_grad: bool = True,
                 final_state_grad: tuple | None = None) -> np.ndarray | None:
        """:meth:`WavefrontLSTM.backward`. After a forward from a state it also takes
        ``final_state_grad = (dL/dh_T, dL/dc_T)`` (the gradient reaching :meth:`final_state`, e.g.
        from the next chunk's :meth:`initial_state_grad`; None: zeros) and computes the initial
        state's gradient, :meth:`initial_state_grad`."""
        return self._backward(dh, input_grad, final_state_grad)

    def final_state(self) -> tuple:
        """``(h_T, c_T)`` of the last forward, each ``(batch, directions*hidden)``: every scan's
        state after its last step (time 0 for a reversed scan). NumPy arrays, or device arrays
        after a forward of device arrays."""
        if self.device == "cuda":
            from .backend_cuda import layer_final_state
            return layer_final_state(self)
        if self._saved is not None and self._saved.get("sizes") is not None:
            raise RuntimeError(FINAL_STATE_WITH_SIZES)
        if self._saved is not None and self._saved.get("inference"):
            return tuple(a.copy() for a in self._saved["final_state"])
        sv = self._require_saved(what="final_state()")
        B, width = sv["batch"], self.out_channels
        hT, cT = np.empty((B, width), self.dtype), np.empty((B, width), self.dtype)
        state_of_cell(hT, cT, sv["h"], sv["c"], sv["wf"].n_cells - (2 if sv["stateful"] else 1), B)
        return hT, cT

    def initial_state_grad(self) -> tuple:
        """``(dL/dh0, dL/dc0)`` of the last backward, each ``(batch, directions*hidden)``; only
        after a forward that took ``state`` (for a zero state pass :meth:`zero_state`)."""
        if self.device == "cuda":
            from .backend_cuda import layer_state_grad
            return layer_state_grad(self)
        grad = (self._saved or {}).get("state_grad")
        if grad is None:
            raise RuntimeError(NO_STATE_GRAD)
        return grad[0].copy(), grad[1].copy()

    def zero_state(self, batch: int) -> tuple:
        """A zero initial state ``(h0, c0)`` for ``batch`` sequences (the default of forward)."""
        shape = (check_positive_int(batch, "batch"), self.out_channels)
        return np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)


class Linear(OwnsParams):
    """Per-position affine map ``y = x @ W + b`` over the last axis (the readout).

    ``forward(x)`` with x of shape (..., in_features) → (..., out_features);
    ``backward(dy)`` → dL/dx, accumulating ``W (in, out)`` and ``b (out,)`` grads.
    """

    _BUFFERS = {"_x": lambda: None}
    _FIXED = OwnsParams._FIXED + ("in_features", "out_features")

    def __init__(self, in_features: int, out_features: int, *, seed: int = 0,
                 dtype: npt.DTypeLike = config.DEFAULT_DTYPE):
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_features = check_positive_int(out_features, "out_features")
        self.dtype = config.resolve_dtype(dtype)
        self.layout = ParamLayout({"W": (in_features, out_features), "b": (out_features,)})
        self.params = self.layout.new(self.dtype)
        self.grads = self.layout.new(self.dtype)
        scale = 1.0 / np.sqrt(in_features)
        self.params["W"][...] = seeded_rng(seed).uniform(-scale, scale, (in_features, out_features))
        self._x: np.ndarray | None = None
        self._inference = False  # the last forward had save=False

    @one_thread_at_a_time
    def forward(self, x: np.ndarray, *, save: bool = True) -> np.ndarray:
        """``y = x @ W + b`` on the last axis; ``save=False`` keeps no input for backward."""
        check_finite_params(self.params)
        save = check_flag(save, "save")
        given = x
        check_not_scalar(x, "x", "(..., in_features)")
        x = check_array(x, "x", max(np.ndim(x), 1), self.in_features, self.dtype, "(..., in_features)")
        x2 = x.reshape(-1, self.in_features)
        y = np.empty((x2.shape[0], self.out_features), dtype=self.dtype)
        matmul_rows(y, x2, self.params["W"], self.params["b"], False, None)
        if save and np.may_share_memory(x2, given):
            x2 = x2.copy()  # backward's own, not the caller's array
        self._x = x2 if save else None
        self._shape, self._inference = x.shape, not save
        return y.reshape(x.shape[:-1] + (self.out_features,))

    @property
    def out_channels(self) -> int:
        """Channels of the output (= ``out_features``; what a following stage takes)."""
        return self.out_features

    @one_thread_at_a_time
    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """``dW += xᵀ dy``, ``db += Σ dy``; return ``dx = dy Wᵀ`` (None with ``input_grad=False``)."""
        input_grad = check_flag(input_grad, "input_grad")
        if self._x is None:
            raise missing_activations(inference=self._inference)
        check_shape(dy, self._shape[:-1] + (self.out_features,))
        dy2 = check_array(dy, "dy", len(self._shape), self.out_features, self.dtype,
                          "(..., out_features)").reshape(-1, self.out_features)
        matmul_at_b(self.grads["W"], self._x, dy2, None)
        column_sums(self.grads["b"], dy2, None)
        check_grads(self.grads.data, self.dtype)
        if not input_grad:
            return None
        dx = np.zeros_like(self._x)
        matmul_rows(dx, dy2, np.ascontiguousarray(self.params["W"].T), self.params["b"], True, None)
        check_grads(dx, self.dtype, INPUT_GRAD)
        return dx.reshape(self._shape)

    def __repr__(self) -> str:
        return f"Linear(in={self.in_features}, out={self.out_features}, dtype={self.dtype.name})"


class GridLSTM2D(OwnsParams):
    """2D Grid LSTM (Kalchbrenner et al. 2015) over time x depth, depth prioritised.

    ``forward(x)``: ``x`` (B, T, hidden) is the depth input of the bottom blocks (e.g. an
    embedding); returns the top blocks' depth output (B, T, hidden). Every block (t, l)
    applies ``(h_T', m_T') = LSTM([h_T; h_L] U_time + b_time, m_T)`` and then
    ``(h_L', m_L') = LSTM([h_T'; h_L] U_depth + b_depth, m_L)`` (gates ``[i | f | o | g]``,
    ``m = f·m_prev + i·g``, ``h = o·tanh m``); ``(h_T', m_T')`` go to (t+1, l) and
    ``(h_L', m_L')`` to (t, l+1). Views: ``U_time``, ``U_depth`` (2D, 4D), ``b_time``,
    ``b_depth`` (4D,), shared by every depth level (``tied=True``, the paper's best
    set-up) or with a leading axis of ``layers`` (one set per level); forget biases
    start at ``forget_bias`` (+1). ``device="cuda"`` runs the two sweeps as CUDA kernels.
    """

    _BUFFERS = {"_saved": lambda: None, "_work": dict}
    _FIXED = OwnsParams._FIXED + ("hidden", "depth", "tied")

    def __init__(self, hidden: int, layers: int, *, seed: int = 0,
                 dtype: npt.DTypeLike = config.DEFAULT_DTYPE,
                 forget_bias: float = 1.0, tied: bool = True, device: str = "cpu"):
        self.device = check_device(device)
        self.hidden = check_positive_int(hidden, "hidden")
        self.depth = check_positive_int(layers, "layers")
        self.dtype = config.resolve_dtype(dtype)
        self.tied = check_flag(tied, "tied")
        D, lead = self.hidden, (() if tied else (self.depth,))
        self.layout = ParamLayout({"U_time": lead + (2 * D, 4 * D), "U_depth": lead + (2 * D, 4 * D),
                                   "b_time": lead + (4 * D,), "b_depth": lead + (4 * D,)})
        self.params = self.layout.new(self.dtype)
        self.grads = self.layout.new(self.dtype)
        rng = seeded_rng(seed)
        for name in ("U_time", "U_depth"):
            self.params[name][...] = rng.uniform(-1 / np.sqrt(2 * D), 1 / np.sqrt(2 * D),
                                                 self.layout.shapes[name])
        forget_bias = check_finite_number(forget_bias, "forget_bias", self.dtype)
        self.params["b_time"][..., D:2 * D] = forget_bias
        self.params["b_depth"][..., D:2 * D] = forget_bias
        self._saved: dict | None = None
        self._work: dict[str, np.ndarray] = {}

    @property
    def out_channels(self) -> int:
        """Channels of the output (= ``hidden``: the top blocks' depth output)."""
        return self.hidden

    @one_thread_at_a_time
    def forward(self, x: np.ndarray, *, save: bool = True) -> np.ndarray:
        """Sweep the T x depth grid; save what backward needs (``save=False``: inference, nothing
        kept for backward; the sweep holds only two anti-diagonals at a time)."""
        D, L = self.hidden, self.depth
        save = check_flag(save, "save")
        check_finite_params(self.params)
        x = check_array(x, "x", 3, D, self.dtype, f"(batch, time, hidden={D})")
        B, T = x.shape[:2]
        wf = wavefront((T, L))
        if not save:  # time-major
            return self._forward_rolling(np.ascontiguousarray(x.transpose(1, 0, 2)).reshape(T * B, D),
                                         wf, B, T)
        self._saved = None  # from here on the workspaces no longer hold the last forward's
        xt = self._workspace("x", (T * B, D))  # a copy: the caller may reuse x before backward
        xt.reshape(T, B, D)[...] = x.transpose(1, 0, 2)
        R = wf.n_cells * B
        level = np.repeat(wf.perm % L, B) if not self.tied else slice(None)  # depth level per row
        act = self._workspace("act", (R, 8 * D))
        act[:, :4 * D] = self.params["b_time"][level]
        act[:, 4 * D:] = self.params["b_depth"][level]
        h, c = self._workspace("h", (R, 2 * D)), self._workspace("c", (R, 2 * D))
        self._sweeps().grid_forward(h, c, act, xt, *self._U(), wf.diag_off, wf.parent, wf.perm, L, B, D)
        self._saved = dict(h=h, c=c, act=act, x=xt, wf=wf, B=B, T=T, level=level)
        top = wf.inv_perm[np.arange(T) * L + L - 1]
        return np.ascontiguousarray(h.reshape(-1, B, 2 * D)[top, :, D:].transpose(1, 0, 2))

    def _forward_rolling(self, xt: np.ndarray, wf, B: int, T: int) -> np.ndarray:
        """:meth:`forward` with ``save=False``: :func:`~mdnumba.kernels.gridlstm.grid_infer`, the
        same blocks in buffers of two anti-diagonals (at most ``min(T, depth)`` blocks each)."""
        D, L, slots = self.hidden, self.depth, 2 * wf.max_diag_cells
        h, c = np.empty((slots * B, 2 * D), self.dtype), np.empty((slots * B, 2 * D), self.dtype)
        act = np.empty((slots * B, 8 * D), self.dtype)
        lp, lperm = np.empty((slots, 2), wf.parent.dtype), np.empty(slots, wf.perm.dtype)
        out = np.empty((T * B, D), self.dtype)
        bt, bd = (self.params[n].reshape(-1, 4 * D) for n in ("b_time", "b_depth"))
        self._sweeps().grid_infer(out, h, c, act, lp, lperm, xt, *self._U(), bt, bd, wf.diag_off, wf.parent,
                                  wf.perm, L, B, D)
        self._saved = dict(inference=True)
        return np.ascontiguousarray(out.reshape(T, B, D).transpose(1, 0, 2))

    @one_thread_at_a_time
    def backward(self, dh: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """dL/dx for ``dh`` = dL/d(output) (None with ``input_grad=False``: the sweep computes
        it anyway, it is just not returned); accumulates the weight gradients."""
        input_grad = check_flag(input_grad, "input_grad")
        sv, D, L = check_saved(self._saved), self.hidden, self.depth
        wf, B, T = sv["wf"], sv["B"], sv["T"]
        dh = check_array(dh, "dh", 3, D, self.dtype, f"(batch, time, hidden={D})")
        check_shape(dh, (B, T, D), "dh")
        R = wf.n_cells * B
        dact, dc = self._workspace("dact", (R, 10 * D)), self._workspace("dc", (R, 2 * D))
        dx = self._workspace("dx", (T * B, D))
        dtop = self._workspace("dtop", (T * B, D))
        dtop.reshape(T, B, D)[...] = dh.transpose(1, 0, 2)
        self._sweeps().grid_backward(dact, dc, dx, dtop, sv["act"], sv["c"], *self._U(), wf.diag_off,
                                     wf.parent, wf.child, wf.perm, L, B, D)
        zt, zd = self._workspace("zt", (R, 2 * D)), self._workspace("zd", (R, 2 * D))
        gather_grid_operands(zt, zd, sv["h"], sv["x"], wf.parent, wf.perm, L, B, D)
        levels = [slice(None)] if self.tied else [np.nonzero(sv["level"] == lv)[0] for lv in range(L)]
        for z, lo, U, bias in ((zt, 0, "U_time", "b_time"), (zd, 4 * D, "U_depth", "b_depth")):
            for lv, rows in enumerate(levels):
                if self.tied:  # the GEMMs take contiguous rows
                    da, zr, gU, gb = self._workspace("da", (R, 4 * D)), z, self.grads[U], self.grads[bias]
                    np.copyto(da, dact[:, lo:lo + 4 * D])
                else:  # level lv's rows (copies)
                    da, zr = dact[rows, lo:lo + 4 * D], z[rows]
                    gU, gb = self.grads[U][lv], self.grads[bias][lv]
                matmul_at_b(gU, zr, da, None)
                column_sums(gb, da, None)
        check_grads(self.grads.data, self.dtype)
        if not input_grad:
            return None
        check_grads(dx, self.dtype, INPUT_GRAD)
        return dx.reshape(T, B, D).transpose(1, 0, 2).copy()  # a copy: dx is a workspace

    def _sweeps(self):
        """The sweep kernels: CPU, or their CUDA twins (arrays copied to the GPU and back; the
        weight-gradient GEMMs stay on the CPU)."""
        if self.device == "cuda":
            from .kernels import gridlstm_cuda
            return gridlstm_cuda
        from .kernels import gridlstm
        return gridlstm

    def _U(self) -> tuple[np.ndarray, np.ndarray]:
        """``U_time``, ``U_depth`` as (levels, 2D, 4D) for the kernels (levels = 1 when tied)."""
        D = self.hidden
        return tuple(self.params[n].reshape(-1, 2 * D, 4 * D) for n in ("U_time", "U_depth"))

    def __repr__(self) -> str:
        return (f"GridLSTM2D(hidden={self.hidden}, layers={self.depth}, tied={self.tied}, "
                f"dtype={self.dtype.name})")
