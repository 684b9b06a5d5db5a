"""Training loop of the character-level language models (``--task char-lm``).

Reuses :class:`mdnumba.train.Trainer`'s run loop, TSV log, atomic checkpoints and
resume; only the data (a :class:`mdnumba.charlm.Corpus`), the model
(:class:`mdnumba.charlm.CharLM`), the loss (softmax cross-entropy) and the
metrics differ. The vocabulary is stored in the checkpoint; resuming with a text
that has other characters fails with a clear message.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ._validate import check_positive_int, seeded_rng
from .charlm import BITS_PER_NAT, CharLM, Corpus, iter_sample, softmax_xent
from .checkpoint import CheckpointError
from .train import EVAL_SEED, EVAL_STREAM, TrainConfig, Trainer, run_stream

#: the validation metrics a char-LM checkpoint keeps (:meth:`CharLMTrainer.evaluate`)
VAL_KEYS = ("val_loss", "val_bpc")


def _is_vocab(vocab: object) -> bool:
    """A non-empty list of distinct one-character strings."""
    return (isinstance(vocab, list) and bool(vocab) and len(set(map(str, vocab))) == len(vocab)
            and all(isinstance(ch, str) and len(ch) == 1 for ch in vocab))


def _is_metrics(val: object) -> bool:
    """``{}`` or :data:`VAL_KEYS` with finite numbers."""
    def finite(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))
    if not isinstance(val, dict):
        return False
    return not val or (sorted(val) == sorted(VAL_KEYS) and all(map(finite, val.values())))


def restored_state(meta: dict, folder: Path | None) -> tuple[list | None, dict]:
    """A char-LM checkpoint's vocabulary and last validation metrics, or :class:`CheckpointError`
    naming what is damaged (a damaged one failed with a TypeError, or once training had begun)."""
    vocab, val = meta.get("vocab"), meta.get("val") or {}
    if vocab is not None and not _is_vocab(vocab):
        bad = "its vocabulary is not a list of distinct characters"
    elif not _is_metrics(val):
        bad = f"its validation metrics are not {' and '.join(VAL_KEYS)} as finite numbers"
    else:
        return vocab, dict(val)
    raise CheckpointError(f"checkpoint in {folder} is damaged: {bad}; delete it or use another run folder")


class CharLMTrainer(Trainer):
    """Trainer for ``cfg.task == "char-lm"`` (models ``grid`` / ``stacked``)."""

    #: validation batches per evaluation and steps between evaluations
    EVAL_BATCHES, EVAL_EVERY = 4, 50

    def __init__(self, cfg: TrainConfig, out: Path | None = None, vocab: list | None = None,
                 val: dict | None = None, read_text: bool = True):
        self._vocab = vocab  # a resumed run's vocabulary (None: build it from the text)
        self._val: dict[str, float] = dict(val or {})  # the last validation metrics logged
        self._read_text = read_text or vocab is None
        super().__init__(cfg, out)

    def _build_model(self) -> CharLM:
        """Read the corpus (its absolute path goes into the config, so that a resumed run
        finds it from any folder; a resumed run whose text is gone keeps its vocabulary, to
        sample), then the grid or stacked model over its vocabulary."""
        cfg = self.cfg
        cfg.data = str(Path(cfg.data).expanduser().resolve())
        if not self._read_text or (self._vocab is not None and not Path(cfg.data).exists()):
            self.corpus = Corpus.from_vocab(self._vocab, source=f"the text {cfg.data}",  # the run's
                                            unread=not self._read_text)
        else:
            self.corpus = Corpus.from_file(cfg.data, vocab=self._vocab)
            self.corpus.check_seq_len(cfg.seq_len)
        self.loss_fn = softmax_xent
        return CharLM(cfg.model, self.corpus.vocab_size, cfg.hidden, cfg.layers, cfg.dropout,
                      seed=cfg.seed, dtype=np.dtype(cfg.dtype), tied=cfg.tie_depth, device=cfg.device)

    def train_step(self) -> dict[str, float]:
        """Random windows, forward with dropout, cross-entropy, backward, optimizer step."""
        t0 = time.perf_counter()
        x, y = self.corpus.batch(self.rng, "train", self.cfg.batch, self.cfg.seq_len)
        loss, dlogits, _ = self._loss(self._forward(x, self.rng if self.cfg.dropout else None), y)
        self.model.zero_grad()
        self._backward(dlogits)
        self._optimizer_step()
        self.step += 1
        dt = time.perf_counter() - t0  # the step's own time: not the validation below
        val, keep = self._val, self._evaluates_after(self.step, bool(self._val))
        if keep is not None:
            val = self.evaluate(batches=self.EVAL_BATCHES, save=True)
            if keep:
                self._val = val
        return {"loss": loss, "bpc": loss * BITS_PER_NAT, **val, "time": dt,
                "chars_per_s": x.size / dt}

    def predict(self, x: np.ndarray, batch: int | None = None, name: str = "x") -> np.ndarray:
        """Not for a language model: text comes from :meth:`generate` (``mdnumba sample``)."""
        raise ValueError("predict applies to the image and sequence tasks; a char-lm run generates "
                         "text: use `mdnumba sample` (Trainer.generate)")

    def _evaluates_after(self, step: int, have_val: bool) -> bool | None:
        """Whether the row of ``step`` evaluates (``have_val``: a row before it did): True for
        the first row and every EVAL_EVERY-th, whose metrics the next rows carry on; False for
        the last step's row, whose metrics are neither carried on nor saved (the rows after it
        in a run resumed with more --steps log what one run of that length would); None for
        no evaluation. The CPU and device trainers both follow it."""
        if not have_val or step % self.EVAL_EVERY == 0:
            return True
        return False if step == self.cfg.steps else None

    def _validation_windows(self, seed: int, batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The ``(x, y)`` windows of :meth:`evaluate`: ``batches`` of the run's batch and
        sequence length, drawn from the validation text with ``run_stream(seed, EVAL_STREAM)``."""
        rng = run_stream(seed, EVAL_STREAM)
        return [self.corpus.batch(rng, "val", self.cfg.batch, self.cfg.seq_len) for _ in range(batches)]

    @staticmethod
    def _validation_metrics(loss: float) -> dict[str, float]:
        """:meth:`evaluate`'s metrics of a mean validation loss (nats/char)."""
        return {"val_loss": loss, "val_bpc": loss * BITS_PER_NAT}

    def evaluate(self, size: int | None = None, batches: int = 10, seed: int = EVAL_SEED, *,
                 save: bool = False) -> dict:
        """Mean validation loss (nats/char) and bits per char over fixed random windows
        (``save`` as in :meth:`Trainer.evaluate`; :meth:`_validation_windows`). ``size`` is
        :meth:`Trainer.evaluate`'s, which a language model has none of: give None."""
        if size is not None:
            raise ValueError(f"--size does not apply to a char-lm run (its windows are --seq-len "
                             f"{self.cfg.seq_len} characters); leave it out")
        batches = check_positive_int(batches, "batches")
        losses = [softmax_xent(self.model.forward(x, save=save), y)[0]
                  for x, y in self._validation_windows(seed, batches)]
        return self._validation_metrics(float(np.mean(losses)))

    def generate(self, length: int, temperature: float, seed: int = 0, prime: str = "") -> str:
        """Generated text (see :func:`mdnumba.charlm.sample_text`)."""
        return "".join(self.iter_generate(length, temperature, seed, prime))

    def iter_generate(self, length: int, temperature: float, seed: int = 0, prime: str = "") -> Iterator[str]:
        """:meth:`generate` piece by piece (:func:`mdnumba.charlm.iter_sample`)."""
        return iter_sample(self.model, self.corpus, length, temperature, seeded_rng(seed),
                           prime, window=self.cfg.seq_len)

    def _extra_meta(self) -> dict:
        """The vocabulary and the validation metrics the log repeats until the next evaluation
        (a resumed run logs what an uninterrupted one would)."""
        return {"vocab": self.corpus.vocab, "val": self._val}
