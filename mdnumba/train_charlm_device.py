"""Device-resident char-LM training (``--task char-lm --device cuda``).

:class:`DeviceCharLM` mirrors a :class:`mdnumba.charlm.CharLM` with device layers
(:class:`~mdnumba.backend_cuda.CudaEmbedding`, one :class:`~mdnumba.backend_cuda.CudaLSTM`
per LSTM1D layer or a :class:`~mdnumba.backend_cuda.CudaGridLSTM`,
:class:`~mdnumba.backend_cuda.CudaLinear`) in one flat parameter buffer.
:class:`DeviceCharLMTrainer` runs :class:`mdnumba.train_charlm.CharLMTrainer`'s steps in
blocks of ``cfg.sync_every``:

1. the block's windows are drawn on the host with the run's RNG, in the CPU trainer's order
   (so the very windows a CPU run trains on), and uploaded in one copy; the seeds of its
   dropout masks, one integer per mask, are drawn with them and passed to the kernels as
   arguments: the GPU draws the CPU's masks from them (:mod:`mdnumba.kernels.dropout`);
2. each step runs embedding, dropout, the LSTM sweeps, readout, softmax cross-entropy
   (:func:`mdnumba.kernels.charlm_cuda.softmax_xent`), backward and the optimiser on the
   device, its loss block sums and gradient norm landing in a device record; the
   validation the CPU trainer runs after some steps (the first, every ``EVAL_EVERY``-th, the
   last) runs there too, on validation windows uploaded once;
3. after the block one copy brings the record back and the host logs every step.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._validate import check_flag, check_shape, is_device_array, is_int_in, missing_activations
from .backend_cuda import (
    CudaEmbedding,
    CudaGridLSTM,
    CudaLinear,
    CudaLSTM,
    HostOrDevice,
    kept_buffer,
    require_cuda,
)
from .charlm import BITS_PER_NAT, CharLM, check_ids, check_ids_shape
from .kernels.dropout import draw_seed
from .stack import check_not_refused_midway, run_tracked
from .train import EVAL_SEED, TrainConfig
from .train_charlm import CharLMTrainer
from .train_device import DeviceResident, FlatDeviceGroup


@dataclass
class _CharBlock:
    """A block's training windows ``x``, ``y`` (n, B, T) int32 and its steps' dropout mask seeds
    (n lists, one seed per dropout; empty without dropout), drawn on the host; ``states[i]``:
    the RNG state before step ``start + i + 1`` (``states[-1]``: after the last)."""

    start: int
    states: list
    x: np.ndarray
    y: np.ndarray
    seeds: list


class DeviceCharLM(FlatDeviceGroup):
    """A :class:`~mdnumba.charlm.CharLM` on the GPU (stacked or grid).
    ``forward(ids, seeds)`` takes NumPy ids (NumPy logits out) or device ids (device out);
    ``seeds`` (one per dropout, :func:`mdnumba.kernels.dropout.draw_seed`) applies the host
    model's dropout with the masks of those seeds (the host's masks for the same seeds), None none."""

    def __init__(self, host: CharLM, *, reuse_outputs: bool = False):
        require_cuda()
        self.host = host
        self.reuse_outputs = check_flag(reuse_outputs, "reuse_outputs")
        self.embed = CudaEmbedding.from_layer(host.embed)
        self.cores = [CudaGridLSTM.from_layer(host.core)] if host.kind == "grid" else \
            [CudaLSTM.from_layer(layer) for layer in host.core.layers]
        self.head = CudaLinear.from_layer(host.head)
        self.layers = [self.embed, *self.cores, self.head]
        self.dtype = self.head.dtype
        self.p = host.drops[0].p  # the dropout rate
        self._flat_buffers()
        self._work: dict = {}
        self._seeds = None
        self._saved: bool | None = None  # whether the last forward saved activations (None: none yet)
        self._refused_at: int | None = None  # the last forward failed partway (stack.refused_midway)

    def forward(self, ids: HostOrDevice, seeds: list | None = None, *, save: bool = True,
                copy_input: bool = True) -> HostOrDevice:
        """Logits (B, T, V) for ids (B, T); ``save=False`` keeps no activations (sampling). A forward
        that fails after the embedding ran refuses ``backward`` until one runs through. Device
        ids are copied for backward unless ``copy_input=False`` (:meth:`CudaEmbedding.forward`)."""
        save, host_in = check_flag(save, "save"), not is_device_array(ids)
        copy_input = check_flag(copy_input, "copy_input") and not host_in  # uploaded here: the model's own
        check_ids_shape(ids)
        seeds = self._checked_seeds(seeds)
        if host_in:
            ids = self.head.k.as_device(np.ascontiguousarray(check_ids(ids, self.embed.vocab)))

        def rest(h):
            for i, core in enumerate(self.cores, 1):
                h = self._dropout(i, core.forward(h, save=save), seeds)
            return self.head.forward(h, copy_input=False)  # h: the model's own
        def first():
            return self._dropout(0, self.embed.forward(ids, copy_input=copy_input), seeds)
        y = run_tracked(self, self.embed, first, rest)
        self._seeds, self._saved = seeds, save
        return y.copy_to_host() if host_in else y

    def backward(self, dlogits: HostOrDevice) -> None:
        """Accumulate every layer's gradients from ``dlogits`` (B, T, V) of the last forward."""
        if not self._saved:
            raise missing_activations(inference=self._saved is not None, run="forward(ids)")
        check_not_refused_midway(self)
        V = self.head.out_features
        d, _ = self.head._input(dlogits, "dlogits", 3, V, f"(batch, time, vocab={V})")
        check_shape(d, self.head._shape[:-1] + (V,), "dlogits")  # the head would name it dy
        d = self.head.backward(d)
        for i in range(len(self.cores), 0, -1):
            d = self.cores[i - 1].backward(self._dropout(i, d, self._seeds, "d"))
        self.embed.backward(self._dropout(0, d, self._seeds, "d"))

    def _checked_seeds(self, seeds: object) -> list | None:
        """``seeds`` as a list: None or empty (no dropout), or one integer in [0, 2**64) per dropout."""
        n = len(self.cores) + 1
        if seeds is None or (isinstance(seeds, (list, tuple)) and not seeds):
            return None
        listed = isinstance(seeds, (list, tuple, np.ndarray))
        if not (listed and len(seeds) == n and all(is_int_in(s, 0, 2**64) for s in seeds)):
            raise ValueError(f"seeds must be None or {n} integers in [0, 2**64), one per dropout (as "
                             f"mdnumba.kernels.dropout.draw_seed draws them), got {seeds!r}")
        return list(seeds)

    def _dropout(self, i: int, x, seeds, kind: str = ""):
        """Dropout ``i`` with the mask of ``seeds[i]`` on ``x`` (a forward's output, or with
        ``kind`` "d" a gradient), into a buffer of its own; ``x`` itself without seeds."""
        if not seeds:
            return x
        from .kernels.charlm_cuda import dropout
        out = kept_buffer(self._work, kind + str(i), x.shape, self.dtype)
        dropout(out, x, seeds[i], self.p)
        return out

    def __repr__(self) -> str:
        return (f"DeviceCharLM({self.host.kind}, layers={self.host.layers[1:-1]!r}, "
                f"vocab={self.embed.vocab})")


class DeviceCharLMTrainer(DeviceResident, CharLMTrainer):
    """:class:`~mdnumba.train_charlm.CharLMTrainer` with model, gradients, optimiser moments,
    windows and masks on the GPU; the host syncs once every ``cfg.sync_every`` steps. Same
    windows, masks, log and checkpoints as the CPU trainer."""

    def __init__(self, cfg: TrainConfig, out: Path | None = None, **kw):
        super().__init__(cfg, out, **kw)
        from .kernels import charlm_cuda
        self.ck = charlm_cuda
        self._dz: dict = {}
        self._val_windows: tuple | None = None

    def _build_model(self) -> DeviceCharLM:
        return DeviceCharLM(super()._build_model(), reuse_outputs=True)

    def _train_block(self, n: int, ahead: int = 0) -> list[dict[str, float]]:
        """Up to ``n`` steps on the device, one sync; Ctrl-C ends the block after the current
        step, the RNG left after the steps done (a checkpoint resumes exactly)."""
        t0, start, RB = time.perf_counter(), self.step, self.k.REDUCE_BLOCKS
        draw = self._block(start, n)
        x, y = draw.x, draw.y
        self._staged("x", x)
        self._staged("y", y)
        evals = self._eval_plan(start, n)
        E = self.EVAL_BATCHES
        # [norms | loss sums | val sums]
        record = self._staged("record", shape=(n * (1 + RB) + len(evals) * E * RB,))
        for i in range(n):
            if self._stop_requested():
                break
            logits = self.model.forward(self._view("x", i, i), draw.seeds[i], copy_input=False)  # staged
            dz = self._dz_like(logits)
            self.ck.softmax_xent(dz, self._view("record", i, (n + i * RB, n + (i + 1) * RB)), logits,
                                 self._view("y", i, i))
            self.model.backward(dz)
            self.opt.step(sync=False, record=(record, i))
            self.step += 1
            if i in evals:
                self._device_eval(record, n * (1 + RB) + evals[i][0] * E * RB)
        done = self.step - start
        self.rng.bit_generator.state = draw.states[done]
        self._draw_ahead(draw, done, ahead)
        rec = record.copy_to_host()  # waits for the GPU
        per_step = (time.perf_counter() - t0) / max(done, 1)
        rows = []
        for i in range(done):
            loss = self.k.mean_loss(rec[n + i * RB:n + (i + 1) * RB], y[i].size)
            self._check_loss(loss, start + i + 1)
            if not np.isfinite(rec[i]):
                raise self._diverged("the gradients", start + i + 1)
            val = self._val
            if i in evals:
                slot, stored = evals[i]
                val = self._val_metrics(rec[n * (1 + RB) + slot * E * RB:], y[0].size)
                if stored:
                    self._val = val
            rows.append({"loss": loss, "bpc": loss * BITS_PER_NAT, **val, "time": per_step,
                         "chars_per_s": x[i].size / per_step})
        return rows

    def _draw(self, start: int, n: int, state: dict) -> _CharBlock:
        """Steps ``start+1 .. start+n``'s windows and dropout mask seeds, drawn from a copy of the
        run's RNG set to ``state`` in the CPU trainer's order (``self.rng`` is not touched)."""
        cfg, rng = self.cfg, copy.deepcopy(self.rng)
        rng.bit_generator.state = state
        drops = len(self.model.host.drops) if cfg.dropout else 0
        xs, ys, seeds, states = [], [], [], [state]
        for _ in range(n):
            x, y = self.corpus.batch(rng, "train", cfg.batch, cfg.seq_len)
            xs.append(x)
            ys.append(y)
            seeds.append([draw_seed(rng) for _ in range(drops)])
            states.append(rng.bit_generator.state)
        return _CharBlock(start, states, np.array(xs, dtype=np.int32), np.array(ys, dtype=np.int32), seeds)

    def _eval_plan(self, start: int, n: int) -> dict[int, tuple[int, bool]]:
        """``{i: (slot, stored)}``: after step ``start+i+1`` the CPU trainer evaluates (its first
        step, every EVAL_EVERY-th, the last: that one is not kept for the next rows)."""
        plan, have = {}, bool(self._val)
        for i in range(n):
            keep = self._evaluates_after(start + i + 1, have)
            if keep is not None:
                plan[i], have = (len(plan), keep), have or keep
        return plan

    def _device_eval(self, record, at: int) -> None:
        """The validation of :meth:`evaluate` (its fixed windows, forward with save=True), loss
        block sums into ``record[at:]``."""
        if self._val_windows is None:
            wins = self._validation_windows(EVAL_SEED, self.EVAL_BATCHES)
            self._val_windows = tuple(self._cuda.to_device(np.array(w, dtype=np.int32)) for w in zip(*wins))
        RB, (xs, ys) = self.k.REDUCE_BLOCKS, self._val_windows
        for j in range(self.EVAL_BATCHES):
            logits = self.model.forward(xs[j], copy_input=False)  # the trainer's, kept
            self.ck.softmax_xent(self._dz_like(logits), record[at + j * RB:at + (j + 1) * RB], logits, ys[j])

    def _val_metrics(self, sums: np.ndarray, size: int) -> dict[str, float]:
        """:meth:`evaluate`'s metrics from :meth:`_device_eval`'s block sums."""
        RB = self.k.REDUCE_BLOCKS
        return self._validation_metrics(float(np.mean([self.k.mean_loss(sums[j * RB:(j + 1) * RB], size)
                                                       for j in range(self.EVAL_BATCHES)])))

    def _dz_like(self, logits):
        """The device dL/dlogits buffer of ``logits``' shape (kept per shape)."""
        return kept_buffer(self._dz, tuple(logits.shape), logits.shape, self.model.dtype)
