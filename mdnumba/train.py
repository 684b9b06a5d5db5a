"""Training loop (no Click here): config, one step, logging, checkpoints, resume, evaluate."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import signal
import sys
import threading
import time
import tracemalloc
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import memory
from ._validate import NonFiniteError, as_array, check_array, check_count, check_positive_int
from .checkpoint import (
    CHECKPOINT,
    CONFIG_JSON,
    CheckpointChangedError,
    CheckpointError,
    atomic_write_bytes,
    checkpoint_stamp,
    load_checkpoint,
    named_os_errors,
    remove_temp_files,
    run_folder_lock,
    save_checkpoint,
)
from .kernels.cell import CELLS
from .kernels.gemm import count_nonfinite
from .kernels.wavefront import schedule_as_batch
from .losses import LOSSES, sigmoid
from .memory import require_memory
from .microbench import step_bytes
from .models import MODELS, build_model
from .optim import OPTIMIZERS, NonFiniteGradientError, NonFiniteUpdateError
from .tasks import TASKS, get_task
from .tasks.binary_addition import AdditionBatch
from .tasks.diagonal import DiagonalBatch

LOG = "log.tsv"
#: the files a run writes into its folder (besides the CLI's plots)
RUN_FILES = (CHECKPOINT, CONFIG_JSON, LOG)
#: the plots the CLI writes into a run's folder; `train --overwrite` removes them with RUN_FILES
PLOTS = ("loss.png", "predictions.png")


def set_aside_log(stamp: str = "*") -> str:
    """The name of a log copied aside (another header, unreadable rows),
    ``log.unreadable-<stamp>.tsv``; with ``stamp="*"``, the glob of every such copy."""
    return f"{Path(LOG).stem}.unreadable-{stamp}{Path(LOG).suffix}"


#: spawn keys of a run's random streams under its seed (:func:`run_stream`): the training
#: batches (and char-lm dropout) and the batches of :meth:`Trainer.evaluate`
DATA_STREAM, EVAL_STREAM = 1, 2
#: the default seed of :meth:`Trainer.evaluate` and ``mdnumba evaluate`` (a char-LM's validation
#: windows, the same at every evaluation)
EVAL_SEED = 12345
#: the settings ``train --resume`` and ``Trainer.load`` may change (the step size too, e.g. to
#: continue from the checkpoint a diverged run keeps with a lower learning rate or clipping);
#: the others define the run and must match it
RESUME_OVERRIDES = ("steps", "device", "sync_every", "checkpoint_every", "data", "lr", "clip_norm")
#: with the default --checkpoint-every, a run also saves once this long has passed since its
#: last checkpoint (a run of very many steps would otherwise go hours without one)
CHECKPOINT_SECONDS = 600.0


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Yield a "was Ctrl-C pressed?" callable. In the main thread the first SIGINT only sets
    that flag and a second raises KeyboardInterrupt; SIGTERM (``kill``, ``timeout``, a batch
    scheduler ending the job) counts as a Ctrl-C. A signal ignored when the run starts stays
    ignored (a shell script's background job ignores SIGINT, so that Ctrl-C in the script's
    terminal does not reach it). Elsewhere (no signal handler possible) Ctrl-C raises
    KeyboardInterrupt as usual and the flag stays False."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    pressed: list[bool] = []
    handled = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN]

    def on_signal(signum, frame) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = "Ctrl-C" if signal.SIGINT in handled else what  # (an ignored SIGINT stays so)
        # stderr's reader may be gone (`2>&1 | tee`: Ctrl-C stops tee too), or stderr closed or
        # None (pythonw): the step and the save must still happen, so the message is best effort
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.write(f"\n{what}: finishing this step, then saving a checkpoint ({again} "
                             "again stops at once without saving)\n")
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        yield lambda: bool(pressed)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _alternatives(hint: object) -> tuple:
    """The types a :class:`TrainConfig` setting may have: a union's members (``str | None``),
    else the annotation itself (``tuple[int, ...]`` too)."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _of_type(value: object, kind: object) -> bool:
    """Whether ``value`` is a valid ``kind`` setting of :class:`TrainConfig`."""
    if kind is type(None):
        return value is None
    if kind in (int, float):  # a bool is an int to Python, not a count or a rate to a user
        numbers = (int, np.integer) if kind is int else (int, float, np.integer, np.floating)
        return isinstance(value, numbers) and not isinstance(value, (bool, np.bool_))
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    if typing.get_origin(kind) is tuple:  # tuple[int, ...]
        return isinstance(value, tuple) and all(_of_type(v, typing.get_args(kind)[0]) for v in value)
    return isinstance(value, kind)


def _type_name(kind: object) -> str:
    """``kind`` as an error message says it."""
    if kind is type(None):
        return "None"
    if typing.get_origin(kind) is tuple:
        return f"a tuple of {typing.get_args(kind)[0].__name__}"
    return kind.__name__


def run_stream(seed: int, key: int) -> np.random.Generator:
    """The generator of stream ``key`` (:data:`DATA_STREAM`, :data:`EVAL_STREAM`) under ``seed``:
    ``default_rng(SeedSequence(seed, spawn_key=(key,)))``, what ``SeedSequence(seed).spawn``
    gives its child ``key``. Its numbers are independent of every stream an integer seed gives
    the models' initial weights (``default_rng(s)`` and ``SeedSequence([s, k])`` for any ``s`` and
    ``k``) and of the other keys', so no run's batches are drawn from the numbers of its own or
    another seed's weights, and no evaluation repeats a run's training batches."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))


def refuse_folders_for_files(folder: Path) -> None:
    """IsADirectoryError if a folder stands where a resumed run in ``folder`` writes its log or
    config (each replaced by a renamed temp file as the run goes)."""
    for name in (LOG, CONFIG_JSON):
        if (Path(folder) / name).is_dir():
            raise IsADirectoryError(f"{Path(folder) / name} is a folder, where the run writes its {name}; "
                                    "move that folder away")


class IgnoredSettingsError(ValueError):
    """Settings a run would ignore (:meth:`TrainConfig.inapplicable`); ``ignored``: name -> why."""

    def __init__(self, ignored: dict[str, str], message: str):
        super().__init__(message)
        self.ignored = ignored


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in the checkpoint."""

    model: str = "md"
    task: str = "diagonal"
    size: int = 8
    batch: int = 16
    hidden: int = 16
    lr: float = 1e-2
    steps: int = 1000
    seed: int = 0
    loss: str | None = None      # None: the task's (bce for binary-addition, else mse)
    clip_norm: float | None = None
    curriculum: tuple[int, ...] = field(default_factory=tuple)
    checkpoint_every: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    cell: str = "graves"
    directions: int = 1
    layers: int = 1
    data: str | None = None      # char-lm: the UTF-8 text file
    seq_len: int = 50            # char-lm: characters per training window
    optimizer: str = "adam"
    dropout: float = 0.0         # char-lm: on the non-recurrent connections
    tie_depth: bool = True       # char-lm grid: one weight set for every depth level
    sync_every: int = 50         # cuda: steps between host syncs (losses/metrics read back)
    curriculum_steps: int | None = None  # steps the curriculum phases span (None: steps)

    def __post_init__(self) -> None:
        if self.loss is None:
            self.loss = TASKS[self.task].loss if self.task in TASKS else "mse"
        # the other forms callers give: sizes as a list (JSON too) or array, a Path, a NumPy dtype,
        # NumPy numbers (which the checkpoint's JSON could not hold: as Python's)
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), np.generic):
                setattr(self, f.name, getattr(self, f.name).item())
        if isinstance(self.curriculum, (list, tuple, np.ndarray)):
            self.curriculum = tuple(v.item() if isinstance(v, np.generic) else v for v in self.curriculum)
        if isinstance(self.data, os.PathLike):
            self.data = os.fspath(self.data)
        if isinstance(self.dtype, np.dtype) or (isinstance(self.dtype, type)
                                                and issubclass(self.dtype, np.generic)):
            self.dtype = np.dtype(self.dtype).name

    def check_model_fits_task(self) -> None:
        """ValueError naming the models of ``task`` (and the tasks of ``model``) if it has not
        ``model``."""
        task = get_task(self.task)
        if self.model not in task.models:
            fits = [name for name, t in TASKS.items() if self.model in t.models]
            other = f", or --task {' / '.join(fits)}, which takes {self.model!r}" if fits else ""
            what = (f"does not fit task {self.task!r};" if fits
                    else f"is no model of any task; for task {self.task!r}")
            raise ValueError(f"model {self.model!r} {what} use --model "
                             f"{' / '.join(task.models)}{other}")

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting and what is allowed (TypeError for a
        value of the wrong type, e.g. a hand-edited checkpoint's ``"hidden": 3.0``)."""
        self._check_types()
        self.check_model_fits_task()
        self._refuse_ignored()
        task = get_task(self.task)
        checks = [(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {sorted(OPTIMIZERS)}"),
                  (0 <= self.dropout < 1, "--dropout must lie in [0, 1)"),
                  (self.seq_len >= 1, "--seq-len must be >= 1"),
                  (self.sync_every >= 1, "--sync-every must be >= 1")]
        if self.task == "char-lm":
            checks.append((bool(self.data), "--task char-lm needs --data FILE (a UTF-8 text file)"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        task.check_size(self.size)
        sizes = list(self.curriculum) + [self.size]
        if self.curriculum and (self.curriculum[0] < task.min_size
                                or any(a >= b for a, b in zip(sizes, sizes[1:]))):
            raise ValueError(f"curriculum sizes must increase from >= {task.min_size} to below --size "
                             f"{self.size} (smaller sizes first), got {','.join(map(str, self.curriculum))}")
        phases = len(self.curriculum) + 1
        if self.curriculum and self.curriculum_span < phases:
            raise ValueError(f"--steps {self.steps} is too few for {phases} curriculum phases "
                             f"({','.join(map(str, sizes))}): give at least one step per phase")
        checks = [(self.batch >= 1, f"--batch must be >= 1, got {self.batch}"),
                  (self.hidden >= 1, f"--hidden must be >= 1, got {self.hidden}"),
                  (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
                  (0 < self.lr < np.inf, f"--lr must be a finite number > 0, got {self.lr}"),
                  (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
                  (self.loss in LOSSES, f"--loss must be one of {sorted(LOSSES)}"),
                  (self.clip_norm is None or 0 < self.clip_norm < np.inf,
                   f"--clip-norm must be a finite number > 0, got {self.clip_norm}"),
                  (self.checkpoint_every >= 0,
                   f"--checkpoint-every must be >= 0, got {self.checkpoint_every}"),
                  (self.dtype in ("float32", "float64"), "--dtype must be float32 or float64"),
                  (self.device in ("cpu", "cuda"), "--device must be cpu or cuda"),
                  (self.cell in CELLS, f"--cell must be one of {sorted(CELLS)}"),
                  (self.layers >= 1, f"--layers must be >= 1, got {self.layers}"),
                  (self.curriculum_steps is None or self.curriculum_steps >= 1,
                   "curriculum_steps must be >= 1")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        ndim = MODELS[self.model].ndim if self.model in MODELS else 1
        if self.directions not in (1, 2 ** ndim):
            raise ValueError(f"--directions must be 1 or {2 ** ndim} for model {self.model!r} "
                             f"(every corner of its {ndim}-D grid), got {self.directions}")

    def _check_types(self) -> None:
        """TypeError for the first setting whose value is not of its annotated type (bools are
        not numbers here; ints are floats)."""
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), _alternatives(hints[f.name])
            if not any(_of_type(value, kind) for kind in allowed):
                raise TypeError(f"setting {f.name} must be {' or '.join(map(_type_name, allowed))}, "
                                f"got {value!r}")

    def ignored(self) -> dict[str, str]:
        """The settings away from their defaults that this run ignores, with the reason
        (:meth:`inapplicable`). ``sync_every`` is not counted: a run trained on a GPU keeps its
        own when resumed on the CPU."""
        plain = TrainConfig(model=self.model, task=self.task)
        names = [f.name for f in dataclasses.fields(self) if f.name != "sync_every"]
        return self.inapplicable(k for k in names if getattr(self, k) != getattr(plain, k))

    def without_ignored(self) -> TrainConfig:
        """A copy with the settings this run ignores (:meth:`ignored`) at their defaults."""
        plain = TrainConfig(model=self.model, task=self.task)
        return dataclasses.replace(self, **{k: getattr(plain, k) for k in self.ignored()})

    def _refuse_ignored(self) -> None:
        """:class:`IgnoredSettingsError` for the settings this run would ignore (:meth:`ignored`;
        the CLI refuses such options as they are given)."""
        ignored = self.ignored()
        if ignored:
            raise IgnoredSettingsError(ignored, "not used by this run, leave at their defaults: " + ", ".join(
                f"{k}={getattr(self, k)!r} ({why})" for k, why in ignored.items()))

    def inapplicable(self, names: Iterable[str]) -> dict[str, str]:
        """Of the settings ``names`` (e.g. those given on the command line), the ones this
        run ignores, with the reason: ``{"dropout": "char-lm only", ...}``."""
        charlm = self.task == "char-lm"
        why = {k: "char-lm only" for k in ("data", "seq_len", "dropout") if not charlm}
        why.update({k: "not for char-lm" for k in ("size", "curriculum", "loss", "cell", "directions")
                    if charlm})
        if self.model != "grid":
            why["tie_depth"] = "char-lm --model grid only"
        if self.device != "cuda":
            why["sync_every"] = "--device cuda only"
        return {k: why[k] for k in names if k in why}

    def size_at(self, step: int) -> int:
        """Training size at ``step`` (0-based): equal phases over curriculum + [size] that
        span ``curriculum_steps`` (set when a resumed run's steps are extended, so that the
        extension trains at ``size``)."""
        sizes = list(self.curriculum) + [self.size]
        return sizes[min(len(sizes) - 1, step * len(sizes) // self.curriculum_span)]

    @property
    def curriculum_span(self) -> int:
        """Steps the curriculum phases (and the last one, at ``size``) span: ``curriculum_steps``,
        else ``steps``."""
        return self.curriculum_steps or self.steps


class Trainer:
    """Owns model, optimiser, data RNG and step counter; saves/restores all of them."""

    #: the optimisers ``cfg.optimizer`` names (the device trainer uses their GPU twins)
    optimizers = OPTIMIZERS
    #: steps per :meth:`_train_block` call (the device trainer's host sync interval)
    sync_every = 1
    #: binary addition at every batch's full ``size`` instead of a length drawn up to it (the
    #: memory probes of :func:`step_memory`, which must size the longest batch)
    full_length = False

    def __init__(self, cfg: TrainConfig, out: Path | None = None):
        cfg.validate()
        self.cfg, self.out = cfg, Path(out) if out is not None else None
        self.task = get_task(cfg.task)
        self.model = self._build_model()
        self.opt = self.optimizers[cfg.optimizer](self.model, lr=cfg.lr, clip_norm=cfg.clip_norm)
        self.rng = run_stream(cfg.seed, DATA_STREAM)
        self.step = 0
        self.saved_step: int | None = None  # the step of the newest checkpoint in ``out``
        self._owns_out = False  # whether ``out``'s run files are this run's (:meth:`_claim_out`)
        self._stamp: tuple | None = None  # of ``out``'s checkpoint as this trainer left it
        self._interrupted: Callable[[], bool] = lambda: False  # Ctrl-C, set by :meth:`run`
        self._stop = False

    def _build_model(self):
        """The model of ``self.cfg`` (and the loss it trains with); subclass hook."""
        cfg = self.cfg
        self.loss_fn = LOSSES[cfg.loss]
        return build_model(cfg.model, in_channels=self.task.in_channels, hidden=cfg.hidden,
                           seed=cfg.seed, dtype=np.dtype(cfg.dtype), cell=cfg.cell,
                           directions=cfg.directions, layers=cfg.layers, device=cfg.device)

    # ---------------------------------------------------------------- steps
    def sample_batch(self, rng: np.random.Generator, size: int) -> DiagonalBatch | AdditionBatch:
        """One batch of the task; binary addition varies its length per batch, up to ``size``
        (always ``size`` with :attr:`full_length`)."""
        if self.task.name == "binary-addition" and not self.full_length:
            size = int(rng.integers(1, size + 1))
        return self.task.sample(rng, self.cfg.batch, size, np.dtype(self.cfg.dtype))

    def train_step(self) -> dict[str, float]:
        """Sample, forward, loss, backward, Adam; return the step's metrics."""
        t0 = time.perf_counter()
        batch = self.sample_batch(self.rng, self.cfg.size_at(self.step))
        logits = self._forward(batch.x)
        loss, dlogits, prob = self._loss(logits, batch.y)
        self.model.zero_grad()
        self._backward(dlogits, input_grad=False)  # parameter gradients only
        self._optimizer_step()
        self.step += 1
        metrics = self.task.metrics(prob, loss, batch)
        metrics["time"] = time.perf_counter() - t0
        return metrics

    def _forward(self, *args):
        """``model.forward(*args)`` on a training batch (finite by construction): a layer that
        finds NaN/inf in its input found the activations of the layer before diverged."""
        try:
            return self.model.forward(*args)
        except NonFiniteError:
            if self.step and self._weights_overflowed():  # the last update did it
                raise self._diverged("the weights", self.step, update=True) from None
            raise self._diverged("the activations", self.step + 1) from None

    def _weights_overflowed(self, params: list[np.ndarray] | None = None) -> bool:
        """Whether a weight (of ``params``, by default :meth:`_host_params`) is NaN or infinite:
        an update of finite gradients with a huge learning rate can overflow one."""
        return any(count_nonfinite(p) for p in (self._host_params() if params is None else params))

    def _backward(self, *args, **kw) -> None:
        """``model.backward(...)``; a layer whose cell state overflowed in forward (its gradients
        would be NaN), or whose gradients overflowed in backward, stops the run with
        :meth:`_diverged`'s advice."""
        try:
            self.model.backward(*args, **kw)
        except NonFiniteGradientError:
            raise self._diverged("the gradients", self.step + 1) from None
        except NonFiniteError:
            raise self._diverged("the cell state", self.step + 1) from None

    def _optimizer_step(self) -> None:
        """``opt.step()``; non-finite gradients, or an update that would overflow the weights, stop
        the run with :meth:`_diverged`'s advice."""
        try:
            self.opt.step()
        except NonFiniteUpdateError:
            raise self._diverged("the weights or moments", self.step + 1, "would become",
                                 update=True) from None
        except FloatingPointError:
            raise self._diverged("the gradients", self.step + 1) from None

    def _loss(self, logits: np.ndarray, y: np.ndarray) -> tuple:
        """``loss_fn(logits, y)`` of a training step; NaN logits (which the loss refuses) or a
        NaN/inf loss stop the run with :meth:`_diverged`'s advice."""
        try:
            out = self.loss_fn(logits, y)
        except NonFiniteError:
            raise self._diverged("the loss", self.step + 1) from None
        self._check_loss(out[0], self.step + 1)
        return out

    def _check_loss(self, loss: float, step: int) -> None:
        if not np.isfinite(loss):
            raise self._diverged("the loss", step)

    def _diverged(self, what: str, step: int, became: str = "became", *,
                  update: bool = False) -> FloatingPointError:
        """The error for a run whose ``what`` ``became`` NaN/inf at ``step`` (``update``: by the
        optimiser's update of finite gradients, which no cell bounds): which checkpoint is kept and
        what to change (the settings that help, of those not in use). Before any update (the
        initial weights, e.g. the memory probe's steps) the learning rate plays no part: the
        advice is then the cell, the dtype's range and the grid's size."""
        cfg = self.cfg
        grid = cfg.model in ("md", "md3d")
        fresh = self.step == 0 and not update
        tips = [] if fresh else ["lower --lr"] + ([] if cfg.clip_norm else ["set --clip-norm"])
        if cfg.cell == "graves" and grid and not update:
            tips.append("use --cell stable (bounded state on large grids)")
        if fresh:
            tips += ["use --dtype float64 (a wider range)"] * (cfg.dtype == "float32") + \
                ["give a smaller --size"] * grid
        tips = tips or ["lower --lr"]
        when = ", before any update" if fresh else ""
        kept = "" if self.saved_step is None else f" (the checkpoint of step {self.saved_step} is kept)"
        advice = ", ".join(tips[:-1]) + (" or " if len(tips) > 1 else "") + tips[-1]
        return FloatingPointError(f"{what} {became} NaN or infinite at step {step}{when}{kept}; {advice}")

    def _train_block(self, n: int, ahead: int = 0) -> list[dict[str, float]]:
        """Run up to ``n`` steps and return their metrics (the device trainer reads the GPU
        once per block); a Ctrl-C (see :meth:`run`) ends the block after the current step.
        ``ahead``: the size of the block that follows (the device trainer draws its batches
        while the GPU runs this one)."""
        out = []
        while len(out) < n and not self._stop_requested():
            out.append(self.train_step())
        return out

    def run(self, on_step: Callable[[int, dict], None] | None = None) -> None:
        """Train to ``cfg.steps``, logging every step; checkpoint periodically, at the end
        and on Ctrl-C, then re-raise KeyboardInterrupt. In the main thread Ctrl-C lets the
        current step finish, so that the checkpoint resumes bit-identically; a second
        Ctrl-C stops at once and saves nothing (the last periodic checkpoint stays)."""
        self._stop = False
        self._claim_out()
        lock = contextlib.nullcontext() if self.out is None else run_folder_lock(self.out)
        with lock, _deferred_interrupt() as self._interrupted:
            self._check_not_superseded()
            self._run(on_step)

    def _check_not_superseded(self) -> None:
        """:class:`CheckpointChangedError` if ``out``'s checkpoint is no longer the one this
        trainer loaded or last saved (none, for a new run): another trainer saved there since,
        and this one would write its older run over the newer one's checkpoint and log."""
        if self.out is None or not self._owns_out:
            return
        stamp = checkpoint_stamp(self.out)
        if stamp is None or stamp == self._stamp:  # none (deleted by hand: nothing to write over)
            return
        what = "a checkpoint this trainer did not write" if self._stamp is None else \
            "another checkpoint than the one this trainer loaded or saved"
        raise CheckpointChangedError(f"{self.out} now holds {what}: another trainer saved its run there "
                                     f"since; load it again (Trainer.load({str(self.out)!r})) to go on "
                                     "from there")

    def _claim_out(self) -> None:
        """Refuse to write into an ``out`` that holds another run's files (a checkpoint, config or
        log this trainer did not load): a new trainer never replaces a run. A trainer made by
        :meth:`load` continues the run of its folder. A folder that does not exist is made."""
        if self.out is None:
            return
        if self._owns_out:
            refuse_folders_for_files(self.out)  # a loaded run's, replaced as it goes
            return
        if self.out.exists() and not self.out.is_dir():
            raise NotADirectoryError(f"the output folder {self.out} is a file; give a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        present = [name for name in RUN_FILES if (self.out / name).exists()]
        if present:
            files = ", ".join(present)
            if CHECKPOINT in present:
                raise FileExistsError(f"{self.out} already holds a run; continue it with Trainer.load("
                                      f"{str(self.out)!r}), or choose another output folder, or delete "
                                      f"{files} there first (CLI: --resume or --overwrite)")
            raise FileExistsError(f"{self.out} holds {files}, which the run would write over; choose "
                                  "another output folder, or delete them first (CLI: --overwrite)")
        self._owns_out = True

    def request_stop(self) -> None:
        """End :meth:`run` after the current step as a first Ctrl-C does (the steps done are
        saved, then KeyboardInterrupt); e.g. ``on_step`` when the reader of its output is gone."""
        self._stop = True

    def _stop_requested(self) -> bool:
        return self._stop or self._interrupted()

    def _run(self, on_step: Callable[[int, dict], None] | None) -> None:
        """The loop of :meth:`run`: blocks of steps that end at checkpoints."""
        every = self._checkpoint_every()
        log, stopped, saved_at = self._open_log(), False, time.monotonic()
        try:
            while self.step < self.cfg.steps and not stopped:
                start = self.step
                n = self._block_size(start)
                for step, m in enumerate(self._train_block(n, self._block_size(start + n)), start + 1):
                    self._check_loss(m["loss"], step)
                    if log:
                        with named_os_errors(log.name):
                            log.write(self._log_line(step, m))
                    if on_step:
                        on_step(step, m)
                stopped = self.step - start < n  # the block was cut short by Ctrl-C
                overdue = not self.cfg.checkpoint_every and time.monotonic() - saved_at >= CHECKPOINT_SECONDS
                if self.out and (stopped or overdue or self.step % every == 0):
                    with named_os_errors(log.name):
                        log.flush()
                    self.save()
                    saved_at = time.monotonic()
        finally:  # an exception inside a step (a second Ctrl-C) saves nothing
            if log:
                log.close()
        if self.out and self.saved_step != self.step:
            self.save()
        if stopped:
            raise KeyboardInterrupt

    def _checkpoint_every(self) -> int:
        """Steps between checkpoints: ``--checkpoint-every``, by default steps/10 (and then also
        after every block that ends :data:`CHECKPOINT_SECONDS` after the last save)."""
        return self.cfg.checkpoint_every or max(1, self.cfg.steps // 10)

    def _block_size(self, start: int) -> int:
        """Steps in the block of :meth:`run` that starts after step ``start``: up to
        ``sync_every``, ending at the last step and (with an output folder) at checkpoints."""
        n = min(self.sync_every, self.cfg.steps - start)
        if self.out:
            every = self._checkpoint_every()
            n = min(n, every - start % every)
        return n

    # ------------------------------------------------------------- logging
    def _columns(self) -> list[str]:
        return ["step", "loss", "time"] + [c for c in self.task.columns if c != "loss"]

    def _extra_meta(self) -> dict:
        """Checkpoint metadata beyond config, step, optimizer step and RNG (subclass hook)."""
        return {}

    def _log_line(self, step: int, m: dict) -> str:
        vals = [str(step)] + [f"{m[c]:.6g}" for c in self._columns()[1:]]
        return "\t".join(vals) + "\n"

    def _open_log(self):
        """Open the TSV log for appending, keeping (rewritten atomically) its whole rows up to
        the current step: rows newer than the checkpoint go (a resume after a crash writes them
        again), and so does a last row without its newline (cut short by a crash). A log with
        other unreadable rows or another header (whose rows all go) is copied aside first, and
        a resumed run without its log says so (warnings)."""
        if self.out is None:
            return None
        path, columns = self.out / LOG, self._columns()
        remove_temp_files(self.out, RUN_FILES)  # of a process killed mid-write
        raw = path.read_bytes() if path.exists() else b""
        old = raw.decode(errors="replace")
        rows = old.split("\n")[1:-1]
        header = "\t".join(columns) + "\n"
        same = old.startswith(header)
        whole = [(r, int(fields[0])) for r, fields in zip(rows, (r.split("\t") for r in rows))
                 if len(fields) == len(columns) and fields[0].isdecimal()]
        keep = [r for r, step in whole if same and step <= self.step]
        text = header + "".join(r + "\n" for r in keep)
        if old and (len(whole) < len(rows) or not same):
            self._keep_unreadable_log(path, raw, len(rows) - len(whole), same)
        elif not old and self.step:
            warnings.warn(f"{path} is missing or empty: the log restarts at step {self.step + 1}",
                          stacklevel=4)  # at run()'s caller
        last = max((step for _, step in whole if step <= self.step), default=0)
        if same and old and last < self.step:  # the log is flushed before every checkpoint
            warnings.warn(f"{path} ends at step {last}, the checkpoint is of step {self.step}: "
                          f"steps {last + 1} to {self.step} have no rows (files of two runs?)",
                          stacklevel=4)
        atomic_write_bytes(path, lambda fh: fh.write(text.encode()))
        return path.open("a")

    def _keep_unreadable_log(self, path: Path, old: bytes, bad_rows: int, same_header: bool) -> None:
        """Copy a log that has another header or unreadable rows (not written by this run as
        it is: edited, or from another run) aside before :meth:`_open_log` keeps only its rows
        that fit (none under another header), and say so."""
        spare = path.with_name(set_aside_log(time.strftime('%Y%m%d-%H%M%S')))
        atomic_write_bytes(spare, lambda fh: fh.write(old))
        what = f"{bad_rows} unreadable row{'s' * (bad_rows != 1)}" if same_header else "another header"
        kept = "the rows that fit this run" if same_header else "no rows"
        warnings.warn(f"{path} had {what}: it continues with {kept}; the old file is kept as "
                      f"{spare.name}", stacklevel=5)  # at run()'s caller

    # --------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """Write weights, Adam moments, RNG state and config atomically to ``out``."""
        if self.out is None:
            raise ValueError("this trainer has no output folder to save to; create it with "
                             "make_trainer(cfg, out=...) (CLI: --out DIR)")
        self._claim_out()
        self._check_not_superseded()
        params = self._host_params()
        if self._weights_overflowed(params):  # a checkpoint that could not be loaded: keep the last
            raise self._diverged("the weights", self.step, update=True)
        arrays = {f"param_{k}": p for k, p in enumerate(params)}
        state = self.opt.state_dict()
        for k, (m, v) in enumerate(zip(state["m"], state["v"])):
            arrays[f"adam_m_{k}"], arrays[f"adam_v_{k}"] = m, v
        meta = {"config": dataclasses.asdict(self.cfg), "step": self.step, "adam_t": state["t"],
                "rng": self.rng.bit_generator.state, **self._extra_meta()}
        path = save_checkpoint(self.out, arrays, meta)
        self.saved_step, self._stamp = self.step, checkpoint_stamp(self.out)
        return path

    def _host_params(self) -> list[np.ndarray]:
        """Every parametrised layer's flat parameters as host arrays, in checkpoint order."""
        return [layer.params.data for layer in self.model.layers]

    def _set_params(self, k: int, values: np.ndarray) -> None:
        """Overwrite layer ``k``'s flat parameters."""
        self.model.layers[k].params.data[...] = values

    @classmethod
    def load(cls, folder: Path, *, read_text: bool = True, **overrides) -> Trainer:
        """Rebuild a trainer (of the class its task needs) from ``folder``; ``overrides`` may
        change e.g. ``steps``. ``read_text=False``: a char-LM run keeps to its checkpoint's
        vocabulary and does not read its text (enough to sample). Only the settings of
        :data:`RESUME_OVERRIDES` may be overridden (None: not overridden; the others are the
        checkpoint's), and ``steps`` only beyond the run's step."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        other = sorted(set(overrides) - set(RESUME_OVERRIDES))
        if other:
            raise TypeError(f"Trainer.load may override only {', '.join(RESUME_OVERRIDES)}, got "
                            f"{', '.join(other)}: a run's other settings are its checkpoint's (train a new "
                            "run for other ones)")
        stamp = checkpoint_stamp(folder)  # before reading: a save in between is then seen as one
        arrays, meta = load_checkpoint(folder)
        cfg = _checkpoint_config(folder, meta, overrides)
        _check_config_copy(folder, meta)
        step = _checkpoint_step(folder, meta)
        cfg.validate()  # the overrides' own errors (say --lr) before whether --steps continues the run
        if "steps" in overrides:
            check_continues(folder, step, cfg.steps)
        tr = make_trainer(cfg, folder, restore=meta, read_text=read_text)
        try:
            n = len(tr.model.layers)
            for k, want in enumerate(tr._host_params()):
                src = arrays[f"param_{k}"]
                if src.shape != want.shape:
                    raise CheckpointError(f"checkpoint in {folder} does not match its config: layer {k} "
                                          f"has parameters of shape {src.shape}, the model built from the "
                                          f"config {want.shape} (was config or checkpoint edited?); start a "
                                          "new run")
                if not np.issubdtype(src.dtype, np.floating):
                    raise CheckpointError(f"checkpoint in {folder} is damaged: layer {k}'s weights are "
                                          f"{src.dtype}, not floating point; start a new run")
                with np.errstate(over="ignore"):
                    src = src.astype(want.dtype)  # e.g. float64 values beyond float32 become inf
                if not np.isfinite(src).all():  # training never saves them (save() refuses)
                    raise CheckpointError(
                        f"checkpoint in {folder} is damaged: layer {k}'s weights hold NaN or "
                        f"infinite values (in {want.dtype}); delete it or use another run folder")
                tr._set_params(k, src)
            tr.opt.load_state_dict({"t": meta["adam_t"], "m": [arrays[f"adam_m_{k}"] for k in range(n)],
                                    "v": [arrays[f"adam_v_{k}"] for k in range(n)]})
            tr.rng.bit_generator.state = _checked_rng_state(meta["rng"], tr.rng.bit_generator.state)
            tr.step = tr.saved_step = step
            tr._owns_out, tr._stamp = True, stamp
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # Overflow: e.g. the RNG state
            raise _damaged(folder, exc) from None
        return tr

    # ------------------------------------------------------------ predict
    def predict(self, x: np.ndarray, batch: int | None = None, name: str = "x") -> np.ndarray:
        """The model's output probabilities σ(logits) for inputs ``x`` laid out as the task's
        (batch, grid axes.., channels), in chunks of ``batch`` items (default: the run's
        ``--batch``), each a ``forward(save=False)``. Integer and boolean inputs are cast to the
        run's dtype as they are (no scaling); errors as the layers' (shape, NaN/inf), naming the
        input ``name``."""
        x = as_array(x, name, f"{self.task.layout} of the {self.task.name} task")
        if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
            x = x.astype(self.cfg.dtype)
        x = check_array(x, name, self.task.ndim + 2, self.task.in_channels, np.dtype(self.cfg.dtype),
                        f"{self.task.layout} of the {self.task.name} task")
        n = check_positive_int(self.cfg.batch if batch is None else batch, "batch")
        return np.concatenate([sigmoid(self.model.forward(x[i:i + n], save=False))
                               for i in range(0, x.shape[0], n)])

    # ------------------------------------------------------------ evaluate
    def evaluate(self, size: int | None = None, batches: int = 10, seed: int = EVAL_SEED, *,
                 save: bool = False) -> dict:
        """Mean metrics over ``batches`` fresh batches at ``size`` (default cfg.size), drawn from
        ``run_stream(seed, EVAL_STREAM)``, which no run trains on.
        ``save=True`` evaluates with the training forward (the same numbers): right after
        training it reuses the training's buffers and compiled kernels, where the saving-free
        forward's sweep would first compile (13 of the 51 s of a first ``mdnumba train --model
        md --size 8``)."""
        size = self.cfg.size if size is None else size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
            raise TypeError(f"size must be an integer, got {size!r}")
        self.task.check_size(size)
        rng, batches = run_stream(seed, EVAL_STREAM), check_positive_int(batches, "batches")
        cfg = self.cfg
        require_memory(eval_estimate(cfg, size), f"a batch of {cfg.batch} at size {size} needs about",
                       EVAL_PARTS[cfg.device], margin=ESTIMATE_MARGIN)
        totals: dict[str, float] = {}
        for _ in range(batches):
            batch = self.task.sample(rng, self.cfg.batch, size, np.dtype(self.cfg.dtype))
            loss, _, prob = self.loss_fn(self.model.forward(batch.x, save=save), batch.y)
            for k, v in self.task.metrics(prob, loss, batch).items():
                totals[k] = totals.get(k, 0.0) + v / batches
        return totals


#: bounds of the integers in a PCG64 state other than the 128-bit ``state`` and ``inc``
_RNG_INT_TOP = {"has_uint32": 2, "uinteger": 2 ** 32}


def _checked_rng_state(state: object, like: object, where: str = "RNG state", key: str = "") -> object:
    """``state`` if it has ``like``'s layout (a fresh generator's state) with integers in
    range (0 ≤ n < 2**128, :data:`_RNG_INT_TOP`), else ValueError: NumPy 1.x wraps a negative
    one with only a warning, and every version takes any ``has_uint32``."""
    if isinstance(like, dict):
        if not isinstance(state, dict) or state.keys() != like.keys():
            raise ValueError(f"{where} is not laid out as a {like.get('bit_generator')} state")
        for k, value in like.items():
            _checked_rng_state(state[k], value, f"{where} {k!r}", k)
    elif isinstance(like, int):
        top = _RNG_INT_TOP.get(key, 2 ** 128)
        if type(state) is not int or not 0 <= state < top:
            raise ValueError(f"{where} must be an integer from 0 to {top - 1}, got {state!r}")
    elif state != like:
        raise ValueError(f"{where} is {state!r}, not {like!r}")
    return state


def _check_config_copy(folder: Path, meta: dict) -> None:
    """CheckpointError if the folder's ``config.json`` (the readable copy written with each
    checkpoint) describes another run than ``checkpoint.npz``: a checkpoint copied in from
    another run's folder would else be trained on, its log appended to this run's. Settings
    a resume may change (:data:`RESUME_OVERRIDES`) are not compared, and an unreadable copy
    is ignored (the next save rewrites it)."""
    try:
        copy = json.loads((Path(folder) / CONFIG_JSON).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not isinstance(copy, dict):
        return
    ignore = (*RESUME_OVERRIDES, "curriculum_steps")
    differ = [f"{k}: {meta['config'].get(k)!r} in {CHECKPOINT}, {copy.get(k)!r} in {CONFIG_JSON}"
              for k in sorted(set(meta["config"]) | set(copy))
              if k not in ignore and meta["config"].get(k) != copy.get(k)]
    if differ:
        raise CheckpointError(f"{CHECKPOINT} and {CONFIG_JSON} in {folder} belong to different runs "
                              f"({'; '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''}): was the "
                              "checkpoint copied from another run? Put back this run's own checkpoint, "
                              f"or delete {CONFIG_JSON} and log.tsv (this run's log, whose rows would be "
                              "kept up to the checkpoint's step) to use the checkpoint as it is")


def _damaged(folder: Path, exc: Exception) -> CheckpointError:
    """The error for a checkpoint whose contents raised ``exc`` as they were read back."""
    what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
    return CheckpointError(f"checkpoint in {folder} is incomplete, damaged or from another version "
                           f"({what}); start a new run")


def _checkpoint_step(folder: Path, meta: dict) -> int:
    """The step a checkpoint was saved at, or a :class:`CheckpointError`."""
    try:
        return check_count(meta.get("step"), "its step")
    except (TypeError, ValueError) as exc:
        raise _damaged(folder, exc) from None


def check_continues(folder: Path, step: int, steps: int) -> None:
    """ValueError unless ``steps`` goes beyond ``step``, that of the run in ``folder``."""
    if step >= steps:
        raise ValueError(f"the run in {folder} is at step {step}; --steps must be > {step} to continue it")


def _checkpoint_config(folder: Path, meta: dict, overrides: dict) -> TrainConfig:
    """The checkpoint's config (a :class:`CheckpointError` if it is not a valid one) with
    ``overrides`` applied; extending a curriculum run's steps keeps its phases where they were."""
    raw = meta.get("config")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(raw, dict) or set(raw) - known:
        extra = sorted(set(raw) - known) if isinstance(raw, dict) else "not a mapping"
        raise CheckpointError(f"checkpoint in {folder} has a config this mdnumba version does not "
                              f"know ({extra}); use the version that wrote it or start a new run")
    try:  # settings the run ignored (an older version took them) are left at their defaults
        cfg = TrainConfig(**raw)
        cfg._check_types()  # a hand-edited value of the wrong type is damage, even if ignored
        cfg = cfg.without_ignored()
        cfg.validate()
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint in {folder} holds an invalid config ({exc}); "
                              "start a new run") from None
    span = cfg.curriculum_span
    if cfg.curriculum and overrides.get("steps", span) < span:
        raise ValueError(f"--steps {overrides['steps']} would end the run in {folder} inside its "
                         f"curriculum, whose phases span {span} steps (it would never train at --size "
                         f"{cfg.size}); give --steps >= {span}")
    if cfg.curriculum and "steps" in overrides and cfg.curriculum_steps is None:
        overrides["curriculum_steps"] = cfg.steps
    return dataclasses.replace(cfg, **overrides)


def step_memory(cfg: TrainConfig) -> int:
    """Estimated peak bytes of the host arrays one training step of ``cfg`` allocates (batch,
    activations, gradients, scratch; not the parameters and optimiser moments, allocated
    before), at its full size: ``m(1) + (B - 1)·(m(2) - m(1))`` from probe steps at batch 1
    and 2 on throwaway CPU trainers (NumPy reports its allocations to tracemalloc; they grow
    linearly with the batch), after an untraced one at batch 1 (the kernels compile there, and
    compiling allocates too). Above 3 layers the probes have 2 and 3 layers, and the estimate
    grows by the third one's share per layer (the layers above the first are alike), so a deep
    stack is sized in the time of a shallow one. The probes' sweeps take the schedule of the full
    batch (:func:`~mdnumba.kernels.wavefront.schedule_as_batch`): those the run compiles anyway."""
    def probe(batch: int, layers: int) -> Trainer:
        trainer = make_trainer(dataclasses.replace(cfg, batch=batch, layers=layers, steps=1, curriculum=(),
                                                   device="cpu"))
        trainer.full_length = True
        return trainer

    depths = (cfg.layers,) if cfg.layers <= 3 else (2, 3)
    with schedule_as_batch(cfg.batch):
        probe(1, depths[0]).train_step()
        full = [_batch_estimate(probe, layers, cfg.batch) for layers in depths]
    return full[0] + (cfg.layers - depths[0]) * max(full[-1] - full[0], 0)


def _batch_estimate(probe, layers: int, batch: int) -> int:
    """:func:`step_memory` at one depth: ``m(1) + (B - 1)·(m(2) - m(1))`` for ``B = batch``, the
    traced peaks ``m(b)`` of a step of ``probe(b, layers)``."""
    peaks = []
    tracing = tracemalloc.is_tracing()  # e.g. python -X tracemalloc: keep it going
    for b in (1, 2):
        trainer = probe(b, layers)
        gc.collect()  # the last probe's buffers go now, not (lowering the count) during the step
        tracemalloc.start()
        tracemalloc.reset_peak()
        try:
            before = tracemalloc.get_traced_memory()[0]
            trainer.train_step()
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
        finally:
            if not tracing:
                tracemalloc.stop()
    return peaks[0] + (batch - 1) * max(peaks[1] - peaks[0], 0)


#: what :func:`~mdnumba.microbench.step_bytes` counts, as the memory errors say it
FLOOR_PARTS = "(input, saved activations, their gradients)"


def step_floor(cfg: TrainConfig) -> int | None:
    """At least what a training step of ``cfg`` holds, known without running one: its first
    layer's :func:`~mdnumba.microbench.step_bytes` at the full batch and size (None for char-lm,
    whose steps take a window of ``seq_len`` characters whatever the settings)."""
    if cfg.task == "char-lm":
        return None
    task, layer = get_task(cfg.task), MODELS[cfg.model]
    return step_bytes(layer.ndim, cfg.size**task.ndim, cfg.batch, cfg.hidden, task.in_channels,
                      cfg.directions, np.dtype(cfg.dtype).itemsize)


def check_step_memory(cfg: TrainConfig) -> None:
    """MemoryError if a CPU training step of ``cfg`` needs more memory than is available: Linux
    would hand it out (overcommit) and then end the process without a message when it is used.
    A step whose :func:`step_floor` is too much already is refused before any probe step runs
    (the probes keep the grid: on a 2048x2048 one they took 10 GiB before refusing)."""
    if cfg.device != "cpu" or memory.available_memory() is None:
        return
    floor = step_floor(cfg)
    if floor is not None:
        require_memory(floor, "a training step needs at least", FLOOR_PARTS)
    require_memory(step_memory(cfg), "a training step needs about", margin=ESTIMATE_MARGIN)


#: the room :func:`check_step_memory` asks beyond :func:`step_memory`'s estimate (within 10% in the
#: tests; an md3d step at batch 10**6 estimated at 21.4 GiB reached 22.7 GiB of resident memory with
#: 23 GiB available, and Linux ended it without a message)
ESTIMATE_MARGIN = 1.2


#: what :meth:`Trainer.evaluate`'s memory check counts, per device (on cuda: the host's batch)
EVAL_PARTS = {"cpu": "(its input, the outputs of two layers, the loss's arrays)",
              "cuda": "(its input and the loss's arrays, on the host)"}
#: bytes per cell and batch item of an evaluation's readout and loss: logits, targets,
#: probabilities, the loss's temporaries and the metrics' masks (one output per cell)
EVAL_OUTPUT_BYTES = 24


def eval_estimate(cfg: TrainConfig, size: int) -> int:
    """About what :meth:`Trainer.evaluate` holds for a batch at ``size``: per cell and batch item
    its input, :data:`EVAL_OUTPUT_BYTES`, and on the CPU the outputs of two consecutive layers
    (the saving-free forward keeps no more) and an int64 per direction (the layers' skew
    tables). tracemalloc's peaks (1-2 layers, 1-4 directions, 2D and 3D, binary addition, mse
    and bce) were within −3% and +27% of it."""
    task = get_task(cfg.task)
    values, tables = task.in_channels, 0
    if cfg.device == "cpu":
        values, tables = values + cfg.hidden * cfg.directions * min(cfg.layers, 2), 8 * cfg.directions
    per_cell = np.dtype(cfg.dtype).itemsize * values + tables + EVAL_OUTPUT_BYTES
    return cfg.batch * int(size)**task.ndim * per_cell


def make_trainer(cfg: TrainConfig, out: str | os.PathLike | None = None, restore: dict | None = None,
                 read_text: bool = True) -> Trainer:
    """The trainer for ``cfg``: :class:`Trainer`, the device-resident one for ``device="cuda"``
    (:class:`mdnumba.train_device.DeviceTrainer`) or the char-LM one (on cuda its device-resident
    twin, :class:`mdnumba.train_charlm_device.DeviceCharLMTrainer`);
    ``restore`` is the metadata of a checkpoint being resumed (the char-LM trainer takes its
    vocabulary and last validation metrics; ``read_text=False``: it does not read the text)."""
    if cfg.task == "char-lm":
        from .train_charlm import CharLMTrainer, restored_state
        vocab, val = restored_state(restore or {}, out)
        cls = CharLMTrainer
        if cfg.device == "cuda":
            from .train_charlm_device import DeviceCharLMTrainer as cls
        return cls(cfg, out, vocab=vocab, val=val, read_text=read_text)
    if cfg.device == "cuda":
        from .train_device import DeviceTrainer
        return DeviceTrainer(cfg, out)
    return Trainer(cfg, out)
