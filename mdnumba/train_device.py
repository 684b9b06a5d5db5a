"""Device-resident training (``--device cuda``): model, gradients, optimiser moments and
task batches live on the GPU.

:class:`DeviceModel` mirrors a host model of :mod:`mdnumba.models` (its stack of
MD-LSTM / LSTM layers and the Linear readout) with the device layers of
:mod:`mdnumba.backend_cuda`. :class:`DeviceTrainer` runs the training loop of
:class:`mdnumba.train.Trainer` on it in blocks of ``cfg.sync_every`` steps:

1. the block's batches are drawn on the host with the run's RNG (the same batches
   as a CPU run) and uploaded once (one copy per run of equal shapes);
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

import time
from pathlib import Path

import numpy as np

from ._validate import check_array, check_shape
from .backend_cuda import DEVICE_OPTIMIZERS, CudaLinear, CudaLSTM, HostOrDevice, require_cuda
from .layers import WavefrontLSTM
from .models import RecurrentReadout
from .stack import LayerGroup, backward_stages
from .train import TrainConfig, Trainer


class DeviceModel(LayerGroup):
    """A host model's stages on the GPU: ``forward``/``backward`` take NumPy arrays (NumPy out)
    or device arrays (device out). ``layers`` are the parametrised device layers, in the
    host model's order (checkpoints and optimisers see the same layout)."""

    def __init__(self, host: RecurrentReadout):
        require_cuda()
        self.host = host
        stages = getattr(host.recurrent, "stages", [host.recurrent])
        self.stages = [self._device_stage(s) for s in stages]
        self.readout = CudaLinear.from_layer(host.readout)
        self.layers = [s for s in self.stages if hasattr(s, "params")] + [self.readout]
        self.dtype = self.readout.dtype
        self._flat_buffers()
        self._in_shape: tuple | None = None

    def _flat_buffers(self) -> None:
        """One flat ``params`` and ``grads`` buffer for the whole model, each layer a slice (one
        launch zeroes every gradient; the optimiser runs once over it)."""
        from numba import cuda
        n = sum(layer.size for layer in self.layers)
        self.params, self.grads = cuda.device_array(n, self.dtype), cuda.device_array(n, self.dtype)
        off = 0
        for layer in self.layers:
            layer.rebind(self.params[off:off + layer.size], self.grads[off:off + layer.size])
            layer.reuse_outputs = True  # each result is consumed within the step
            off += layer.size
        self.zero_grad()

    def zero_grad(self) -> None:
        """Set every gradient to zero (one launch)."""
        self.readout.k.fill(self.grads, 0.0)

    @staticmethod
    def _device_stage(stage):
        if isinstance(stage, WavefrontLSTM):
            return CudaLSTM.from_layer(stage)
        raise TypeError(f"{type(stage).__name__} has no device-resident model twin; run it with "
                        "device='cuda' on the layer instead")

    @property
    def n_params(self) -> int:
        return self.params.size

    def forward(self, x: HostOrDevice) -> HostOrDevice:
        """Logits of the host model's shape; saves what backward needs on the device."""
        k = self.readout.k
        host_in = not k.is_device_array(x)
        if host_in:
            x = check_array(x, "x", np.ndim(x), None, self.dtype, "(batch, grid axes.., channels)")
        xd = k.as_device(x)
        self._in_shape = tuple(xd.shape)
        h = self.host._to_recurrent(xd)
        for stage in self.stages:
            h = stage.forward(h)
        self._h_shape = tuple(h.shape)
        y = self.readout.forward(h)
        y = y.reshape(self._in_shape[:-1] + (self.readout.out_features,))
        return y.copy_to_host() if host_in else y

    def backward(self, dlogits: HostOrDevice, input_grad: bool = True) -> HostOrDevice | None:
        """Back-propagate dL/dlogits; returns dL/dx (NumPy or device, as ``dlogits``), or None
        with ``input_grad=False`` (the first stage then skips it)."""
        if self._in_shape is None:
            raise RuntimeError("backward() called before forward(); run forward(x) first")
        k = self.readout.k
        check_shape(dlogits, self._in_shape[:-1] + (self.readout.out_features,), "dlogits")
        host_in = not k.is_device_array(dlogits)
        d = k.as_device(np.ascontiguousarray(dlogits, self.dtype) if host_in else dlogits)
        d = self.readout.backward(d.reshape(self._h_shape[:-1] + (self.readout.out_features,)))
        d = backward_stages(self.stages, d, input_grad)
        if d is None:
            return None
        d = d.reshape(self._in_shape)
        return d.copy_to_host() if host_in else d

    def __repr__(self) -> str:
        return f"DeviceModel({self.host!r})"


class DeviceTrainer(Trainer):
    """:class:`~mdnumba.train.Trainer` with everything on the GPU; the host syncs once every
    ``cfg.sync_every`` steps (and at checkpoints). Same batches, metrics, log and checkpoint
    format as the CPU trainer; ``cfg.optimizer`` picks :data:`DEVICE_OPTIMIZERS`."""

    optimizers = DEVICE_OPTIMIZERS

    def __init__(self, cfg: TrainConfig, out: Path | None = None):
        super().__init__(cfg, out)
        from numba import cuda

        from .kernels import optim_cuda
        self.k, self._cuda = optim_cuda, cuda
        self.sync_every = int(cfg.sync_every)
        self.opt.clear_grads = True  # the update zeroes the gradients: no zero_grad launch per step
        self._outputs: dict = {}

    def _build_model(self):
        return DeviceModel(super()._build_model())  # gradients start zeroed

    def _host_params(self) -> list[np.ndarray]:
        return [layer.params_to_host() for layer in self.model.layers]

    def _set_params(self, k: int, values: np.ndarray) -> None:
        self.model.layers[k].set_params(values)

    def train_step(self) -> dict[str, float]:
        """One step (a block of one: syncs with the host)."""
        return self._train_block(1)[0]

    # ------------------------------------------------------------ a block of steps
    def _train_block(self, n: int) -> list[dict[str, float]]:
        """Run up to ``n`` steps on the device and sync once; Ctrl-C (see :meth:`Trainer.run`)
        ends the block early and rewinds the RNG to the steps done, so a checkpoint resumes
        exactly."""
        t0 = time.perf_counter()
        start, rng_state = self.step, self.rng.bit_generator.state
        batches = [self.sample_batch(self.rng, self.cfg.size_at(start + i)) for i in range(n)]
        xs, ys = self._upload([b.x for b in batches]), self._upload([b.y for b in batches])
        index, offsets = self._probe_plan(batches)
        index_dev = self._cuda.to_device(index)
        probes = self._cuda.device_array(offsets[-1], dtype=self.model.dtype)
        RB = self.k.REDUCE_BLOCKS
        record = self.k.scratch(n * (1 + RB))  # [norm_0..norm_{n-1} | loss block sums, RB per step]
        for i in range(n):
            if self._stop_requested():
                break
            lo, hi = offsets[i], offsets[i + 1]
            self._device_step(xs[i], ys[i], record, i, record[n + i * RB:n + (i + 1) * RB],
                              (probes[lo:hi], index_dev[lo:hi]))
            self.step += 1
        if self.step - start < n:
            self.rng.bit_generator.state = rng_state
            for i in range(self.step - start):
                self.sample_batch(self.rng, self.cfg.size_at(start + i))
        done = self.step - start
        rec, values = record.copy_to_host(), probes.copy_to_host()
        per_step = (time.perf_counter() - t0) / max(done, 1)
        losses = [self.k.mean_loss(rec[n + i * RB:n + (i + 1) * RB], batches[i].y.size) for i in range(done)]
        return [self._metrics(batches[i], losses[i], rec[i], index[offsets[i]:offsets[i + 1]],
                              values[offsets[i]:offsets[i + 1]], start + i + 1, per_step)
                for i in range(done)]

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

    def _upload(self, arrays: list) -> list:
        """One host→device copy per run of equal-shape arrays; returns per-step device views."""
        out, i = [], 0
        while i < len(arrays):
            j = i
            while j < len(arrays) and arrays[j].shape == arrays[i].shape:
                j += 1
            stacked = self._cuda.to_device(np.stack(arrays[i:j]).astype(self.model.dtype, copy=False))
            out.extend(stacked[t] for t in range(j - i))
            i = j
        return out

    def _output_buffers(self, shape: tuple):
        """Device ``prob`` and ``dL/dlogits`` of ``shape`` (kept per shape)."""
        if shape not in self._outputs:
            new = self._cuda.device_array
            self._outputs[shape] = (new(shape, self.model.dtype), new(shape, self.model.dtype))
        return self._outputs[shape]
