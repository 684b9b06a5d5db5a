"""Device-resident training (``--device cuda``): model, gradients, optimiser moments and
task batches live on the GPU.

:class:`DeviceModel` mirrors a host model of :mod:`mdnumba.models` (its stack of
MD-LSTM / LSTM layers and the Linear readout) with the device layers of
:mod:`mdnumba.backend_cuda`. :class:`DeviceTrainer` runs the training loop of
:class:`mdnumba.train.Trainer` on it in blocks of ``cfg.sync_every`` steps:

1. the block's batches are drawn on the host with the run's RNG (the same batches
   as a CPU run) and uploaded once (one copy per run of equal shapes); in
   :meth:`~mdnumba.train.Trainer.run` they were drawn while the GPU ran the block
   before (:attr:`DeviceTrainer.prefetch`), so the GPU does not wait for them;
2. each step runs forward, loss (:func:`~mdnumba.kernels.optim_cuda.sigmoid_loss`),
   backward and the optimiser on the device, writing its gradient norm and its loss's
   block sums into slots of a device array and gathering the few probabilities its
   metrics need (:attr:`mdnumba.tasks.Task.probe`) — 11 kernel launches for the ``md``
   model, nothing copied;
3. after the block one copy brings norms, loss sums and probes back, the host
   finishes the mean losses, and the task's metrics are computed exactly as on the CPU.

So there is no host round trip inside a block. Checkpoints download parameters
and moments (they are written at block ends).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._validate import check_array, check_flag, is_device_array, missing_activations
from .backend_cuda import (
    DEVICE_OPTIMIZERS,
    CudaLinear,
    CudaLSTM,
    HostOrDevice,
    OnTheDevice,
    contiguous_device_array,
    kept_buffer,
    kept_view,
    require_cuda,
)
from .layers import WavefrontLSTM
from .models import RecurrentReadout, check_dlogits
from .stack import LayerGroup, backward_stages, check_not_refused_midway, run_tracked
from .train import TrainConfig, Trainer


@dataclass
class _HostBlock:
    """A block's task batches drawn on the host: ``states[i]`` is the RNG state before the
    batch of step ``start + i + 1`` (``states[-1]``: after the last); ``index``/``offsets``: the
    probe plan (:meth:`DeviceTrainer._probe_plan`); ``x``/``y``: the batches stacked for upload."""

    start: int
    batches: list
    states: list[dict]
    index: np.ndarray
    offsets: np.ndarray
    x: list[np.ndarray]
    y: list[np.ndarray]


class FlatDeviceGroup(LayerGroup, OnTheDevice):
    """Device layers (``layers``) whose parameters and gradients are slices of one flat device
    ``params`` and ``grads`` buffer: one launch zeroes every gradient, and the optimiser runs once
    over it (checkpoints and optimiser states still see them layer by layer)."""

    reuse_outputs = False
    dtype: np.dtype

    def _flat_buffers(self) -> None:
        """Move every layer's parameters and gradients into the flat buffers (gradients zeroed)
        and pass it :attr:`reuse_outputs`."""
        from numba import cuda
        n = sum(layer.size for layer in self.layers)
        self.params, self.grads = cuda.device_array(n, self.dtype), cuda.device_array(n, self.dtype)
        off = 0
        for layer in self.layers:
            layer.rebind(self.params[off:off + layer.size], self.grads[off:off + layer.size])
            layer.reuse_outputs = self.reuse_outputs
            off += layer.size
        self.zero_grad()

    def zero_grad(self) -> None:
        """Set every gradient to zero (one launch)."""
        self.layers[0].k.fill(self.grads, 0.0)

    @property
    def n_params(self) -> int:
        """Number of parameters (the entries of the flat device ``params`` buffer)."""
        return self.params.size


class DeviceResident:
    """What the device trainers share (before the trainer class in their bases): the device
    optimisers, updates that zero the gradients, blocks of ``cfg.sync_every`` steps (a
    ``train_step`` is a block of one), checkpoint hooks for device layers (``model.layers``) and
    the block drawn ahead (``_draw(start, n, state)`` of a subclass returns a block with ``start``
    and ``states``, the RNG state before each of its steps and after the last)."""

    optimizers = DEVICE_OPTIMIZERS
    #: draw the next block's batches while the GPU runs this one (False: after the sync)
    prefetch = True
    _ahead = None  # the next block, drawn ahead

    def __init__(self, cfg: TrainConfig, out: Path | None = None, **kw):
        super().__init__(cfg, out, **kw)
        from numba import cuda

        from .kernels import optim_cuda
        self.k, self._cuda = optim_cuda, cuda
        self.sync_every = int(cfg.sync_every)
        self.opt.clear_grads = True  # the update zeroes the gradients: no zero_grad launch per step
        self._staging: dict = {}  # name -> device buffer a block uploads into (_staged)
        self._views: dict = {}  # kept_view's store for the steps' views of them (_view)

    def _staged(self, name: str, host: np.ndarray | None = None, shape: tuple = (), dtype=np.float64):
        """The device buffer ``name`` holding a copy of ``host`` (or, without it, of ``shape`` and
        ``dtype``, uninitialised), kept from block to block while its shape and dtype hold: each
        block's steps then launch on the same memory, so their launches repeat their arguments
        and run prepared (:mod:`mdnumba.kernels.launch`; a block's new arrays went through
        numba-cuda at every step). A copy into it waits for the launches before it (the default
        stream), and each block ends with a sync anyway."""
        if host is not None:
            shape, dtype = host.shape, host.dtype
        old = self._staging.get(name)
        buf = kept_buffer(self._staging, name, shape, dtype)
        if buf is not old:  # the views of the old buffer go with it (a shorter block leaves some unused)
            self._views = {key: kept for key, kept in self._views.items() if key[0] != name}
        if host is not None:
            buf.copy_to_device(host)
        return buf

    def _view(self, name: str, key: object, index: int | tuple[int, int]):
        """``_staged(name)[index]`` for step ``key`` of a block, made once (:func:`kept_view`)."""
        return kept_view(self._views, (name, key), self._staging[name], index)

    def train_step(self) -> dict[str, float]:
        """One step (a block of one: syncs with the host)."""
        return self._train_block(1)[0]

    def _host_params(self) -> list[np.ndarray]:
        return [layer.params_to_host() for layer in self.model.layers]

    def _set_params(self, k: int, values: np.ndarray) -> None:
        self.model.layers[k].set_params(values)

    def _take_prefetched(self, start: int, n: int):
        """The prefetched block if it is the one asked for (same start, size and RNG state);
        it is used at most once."""
        draw, self._ahead = self._ahead, None
        if draw is not None and (draw.start, len(draw.states) - 1) == (start, n) \
                and draw.states[0] == self.rng.bit_generator.state:
            return draw
        return None

    def _block(self, start: int, n: int):
        """The block of steps ``start+1 .. start+n``: the one drawn ahead, else drawn now."""
        return self._take_prefetched(start, n) or self._draw(start, n, self.rng.bit_generator.state)

    def _draw_ahead(self, draw, done: int, ahead: int) -> None:
        """After a block's launches (``done`` of its steps run): draw the next block's ``ahead``
        steps now, while the GPU works (with :attr:`prefetch`, and only after a whole block)."""
        if done == len(draw.states) - 1 and ahead > 0 and self.prefetch:
            self._ahead = self._draw(self.step, ahead, draw.states[done])


class DeviceModel(FlatDeviceGroup):
    """A host model's stages on the GPU: ``forward``/``backward`` take NumPy arrays (NumPy out)
    or device arrays (device out). ``layers`` are the parametrised device layers, in the
    host model's order (checkpoints and optimisers see the same layout)."""

    def __init__(self, host: RecurrentReadout, *, reuse_outputs: bool = False):
        require_cuda()
        if not isinstance(host, RecurrentReadout):
            raise TypeError(f"DeviceModel takes an mdnumba.models model (mdnumba.models.build_model), got "
                            f"{type(host).__name__}; a single layer runs on the GPU with device='cuda' or "
                            "its twin in mdnumba.backend_cuda")
        self.host = host
        #: results (logits, dx) written into buffers kept between calls, each valid until the next
        #: call (the trainer's, which consumes them within the step); else new arrays each call
        self.reuse_outputs = check_flag(reuse_outputs, "reuse_outputs")
        stages = getattr(host.recurrent, "stages", [host.recurrent])
        self.stages = [self._device_stage(s) for s in stages]
        self.readout = CudaLinear.from_layer(host.readout)
        self.layers = [s for s in self.stages if hasattr(s, "params")] + [self.readout]
        self.dtype = self.readout.dtype
        self._flat_buffers()
        self._in_shape: tuple | None = None
        self._inference = False  # the last forward had save=False
        self._refused_at: int | None = None  # the last forward failed partway (stack.refused_midway)

    @staticmethod
    def _device_stage(stage):
        if isinstance(stage, WavefrontLSTM):
            return CudaLSTM.from_layer(stage)
        raise TypeError(f"{type(stage).__name__} has no device-resident model twin; run it with "
                        "device='cuda' on the layer instead")

    def forward(self, x: HostOrDevice, *, save: bool = True) -> HostOrDevice:
        """Logits of the host model's shape; saves what backward needs on the device (with
        ``save=False`` the recurrent layers run their two-plane sweep and ``backward`` is refused)."""
        k = self.readout.k
        host_in = not is_device_array(x)
        if host_in:
            x = check_array(x, "x", np.ndim(x), None, self.dtype, "(batch, grid axes.., channels)")
        xd = k.as_device(x) if host_in else contiguous_device_array(x, "x")  # reshaped below
        inference = not check_flag(save, "save")

        def run(stage, h):
            return stage.forward(h, save=save) if isinstance(stage, CudaLSTM) else stage.forward(h)

        def rest(h):
            for stage in self.stages[1:]:
                h = run(stage, h)
            return h, self.readout.forward(h, copy_input=False)  # h: the recurrent layer's own

        first = self.stages[0]  # a forward failing past it is recorded (as the host model's)
        h, y = run_tracked(self, first, lambda: run(first, self.host._to_recurrent(xd)), rest)
        # set once every stage ran: a refused x changes nothing
        self._in_shape, self._inference, self._h_shape = tuple(xd.shape), inference, tuple(h.shape)
        y = y.reshape(self._in_shape[:-1] + (self.readout.out_features,))
        return y.copy_to_host() if host_in else y

    def backward(self, dlogits: HostOrDevice, input_grad: bool = True) -> HostOrDevice | None:
        """Back-propagate dL/dlogits; returns dL/dx (NumPy or device, as ``dlogits``), or None
        with ``input_grad=False`` (the first stage then skips it)."""
        input_grad = check_flag(input_grad, "input_grad")
        if self._in_shape is None or self._inference:
            raise missing_activations(inference=self._in_shape is not None)
        check_not_refused_midway(self)
        k = self.readout.k
        host_in = not is_device_array(dlogits)
        d = check_dlogits(dlogits, self._in_shape[:-1] + (self.readout.out_features,), self.dtype,
                          values=host_in)  # as the host model checks it
        d = k.as_device(d) if host_in else contiguous_device_array(d, "dlogits")  # reshaped below
        if np.dtype(d.dtype) != self.dtype:  # a CUDA array's (the readout would call it dy)
            raise TypeError(f"dlogits on the device has dtype {d.dtype}, the model uses {self.dtype}; "
                            "convert it first")
        d = self.readout.backward(d.reshape(self._h_shape[:-1] + (self.readout.out_features,)))
        d = backward_stages(self.stages, d, input_grad)
        if d is None:
            return None
        d = d.reshape(self._in_shape)
        return d.copy_to_host() if host_in else d

    def __repr__(self) -> str:
        return f"DeviceModel({self.host!r})"


class DeviceTrainer(DeviceResident, Trainer):
    """:class:`~mdnumba.train.Trainer` with everything on the GPU; the host syncs once every
    ``cfg.sync_every`` steps (and at checkpoints). Same batches, metrics, log and checkpoint
    format as the CPU trainer; ``cfg.optimizer`` picks :data:`DEVICE_OPTIMIZERS`."""

    def __init__(self, cfg: TrainConfig, out: Path | None = None):
        super().__init__(cfg, out)
        self._outputs: dict = {}

    def _build_model(self):
        # gradients start zeroed; every result is consumed within its step: buffers are kept
        return DeviceModel(super()._build_model(), reuse_outputs=True)

    # ------------------------------------------------------------ a block of steps
    def _train_block(self, n: int, ahead: int = 0) -> list[dict[str, float]]:
        """Run up to ``n`` steps on the device and sync once; Ctrl-C (see :meth:`Trainer.run`)
        ends the block early and leaves the RNG after the steps done, so a checkpoint resumes
        exactly. With ``ahead`` > 0 (and :attr:`prefetch`), the next block's ``ahead`` batches
        are drawn on the host after this block's launches, while the GPU works through them."""
        t0 = time.perf_counter()
        start = self.step
        draw = self._block(start, n)
        xs, ys = self._upload("x", draw.x), self._upload("y", draw.y)
        self._staged("index", draw.index)
        probes = self._staged("probes", shape=(int(draw.offsets[-1]),), dtype=self.model.dtype)
        RB, offsets = self.k.REDUCE_BLOCKS, draw.offsets
        # [norm_0..norm_{n-1} | loss block sums, RB per step]
        record = self._staged("record", shape=(n * (1 + RB),))
        for i in range(n):
            if self._stop_requested():
                break
            rows, sums = (int(offsets[i]), int(offsets[i + 1])), (n + i * RB, n + (i + 1) * RB)
            self._device_step(xs[i], ys[i], record, i, self._view("record", i, sums),
                              (self._view("probes", i, rows), self._view("index", i, rows)))
            self.step += 1
        done = self.step - start
        self.rng.bit_generator.state = draw.states[done]
        self._draw_ahead(draw, done, ahead)
        rec, values = record.copy_to_host(), probes.copy_to_host()  # waits for the GPU
        per_step = (time.perf_counter() - t0) / max(done, 1)
        batches, index = draw.batches, draw.index
        losses = [self.k.mean_loss(rec[n + i * RB:n + (i + 1) * RB], batches[i].y.size) for i in range(done)]
        return [self._metrics(batches[i], losses[i], rec[i], index[offsets[i]:offsets[i + 1]],
                              values[offsets[i]:offsets[i + 1]], start + i + 1, per_step)
                for i in range(done)]

    def _draw(self, start: int, n: int, state: dict) -> _HostBlock:
        """The batches of steps ``start+1 .. start+n``, drawn on the host from a copy of the RNG
        set to ``state`` (``self.rng`` itself is not touched), stacked for upload."""
        rng = copy.deepcopy(self.rng)
        rng.bit_generator.state = state
        batches, states = [], []
        for i in range(n):
            states.append(rng.bit_generator.state)
            batches.append(self.sample_batch(rng, self.cfg.size_at(start + i)))
        states.append(rng.bit_generator.state)
        index, offsets = self._probe_plan(batches)
        return _HostBlock(start, batches, states, index, offsets,
                          self._stack_runs([b.x for b in batches]), self._stack_runs([b.y for b in batches]))

    def _device_step(self, x, y, record, i: int, loss_sums, probe) -> None:
        """Forward, loss (block sums into ``loss_sums``, ``probe`` gathered), backward, optimiser
        (norm into ``record[i]``)."""
        logits = self.model.forward(x)
        prob, dz = self._output_buffers(tuple(logits.shape))
        self.k.sigmoid_loss(prob, dz, logits, y, self.cfg.loss, loss_sums, probe)
        self.model.backward(dz, input_grad=False)  # into zeroed gradients (see _build_model)
        self.opt.step(sync=False, record=(record, i))

    def _metrics(self, batch, loss: float, norm: float, index, values, step: int,
                 seconds: float) -> dict:
        """The task's metrics from the probed probabilities ``values`` at flat ``index``
        (placed into an otherwise empty array)."""
        if not np.isfinite(norm):
            raise self._diverged("the gradients", step)
        prob = np.zeros(batch.y.shape, dtype=values.dtype)
        prob.reshape(-1)[index] = values
        m = self.task.metrics(prob, float(loss), batch)
        m["time"] = seconds
        return m

    # ------------------------------------------------------------ helpers
    def _probe(self, batch) -> np.ndarray:
        """Flat indices of the probabilities the task's metrics read (all if it names none)."""
        if self.task.probe is None:
            return np.arange(batch.y.size)
        return self.task.probe(batch.y.shape, batch)

    def _probe_plan(self, batches):
        """(every step's probe indices, concatenated; offsets of each step's slice)."""
        idx = [self._probe(b) for b in batches]
        offsets = np.concatenate([[0], np.cumsum([len(i) for i in idx])]).astype(int)
        return np.concatenate(idx).astype(np.int64), offsets

    def _stack_runs(self, arrays: list) -> list[np.ndarray]:
        """Each run of equal-shape arrays stacked into one array of the model's dtype."""
        out, i = [], 0
        while i < len(arrays):
            j = i
            while j < len(arrays) and arrays[j].shape == arrays[i].shape:
                j += 1
            out.append(np.stack(arrays[i:j]).astype(self.model.dtype, copy=False))
            i = j
        return out

    def _upload(self, name: str, runs: list[np.ndarray]) -> list:
        """One host→device copy per stacked run, into kept buffers (:meth:`_staged`); returns
        per-step device views (:meth:`_view`)."""
        out = []
        for j, run in enumerate(runs):
            self._staged((name, j), run)
            out.extend(self._view((name, j), t, t) for t in range(len(run)))
        return out

    def _output_buffers(self, shape: tuple):
        """Device ``prob`` and ``dL/dlogits`` of ``shape`` (kept per shape)."""
        dtype = self.model.dtype
        return tuple(kept_buffer(self._outputs, (name, shape), shape, dtype) for name in ("prob", "dz"))
