"""Character-level language modelling: corpus, embedding, dropout, softmax loss, grid/stacked models.

Kalchbrenner et al. 2015 compare a 2D Grid LSTM (time x depth, weights tied along
depth) with a stacked LSTM on next-character prediction; the grid here is depth prioritised
(:class:`mdnumba.layers.GridLSTM2D`), as in the public Torch reproduction. Both
models here share the head: ``Embedding(V, D)`` → dropout → recurrent core →
dropout → ``Linear(D, V)`` → softmax; dropout acts on the non-recurrent connections
only (training mode: a generator is passed to ``forward``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from . import config
from ._validate import (
    check_array,
    check_finite_params,
    check_grads,
    check_positive_int,
    check_shape,
    missing_activations,
    part_seed,
    seeded_rng,
    shared_seed,
)
from .kernels.dropout import draw_seed, keep_mask, threshold
from .kernels.gemm import scatter_add_rows
from .layers import GridLSTM2D, Linear
from .losses import checked_logits
from .params import OwnsParams, ParamLayout, one_thread_at_a_time
from .stack import LayerGroup, check_not_refused_midway, mdlstm_stack, run_tracked


class CorpusError(ValueError):
    """The text file cannot serve as a corpus (missing, binary, empty, too short, wrong vocabulary)."""


@dataclass
class Corpus:
    """A text as int32 character ids with its vocabulary and a train/validation split
    (both empty for :meth:`from_vocab`: enough to encode, decode and sample)."""

    vocab: list
    train: np.ndarray
    val: np.ndarray
    source: str = "the text"   # where the text came from, for messages
    unread: bool = False       # a vocabulary only, by choice (:meth:`from_vocab`), not for want of the text

    def __post_init__(self) -> None:
        if len(set(self.vocab)) < len(self.vocab):  # encode would map a character to its last id
            text = "".join(map(str, self.vocab))
            raise CorpusError(f"a vocabulary holds each character once, got {text!r}")

    @classmethod
    def from_text(cls, text: str, val_fraction: float = 0.1, vocab: list | None = None) -> Corpus:
        """Split ``text`` (last ``val_fraction`` for validation); ``vocab`` (e.g. from a
        checkpoint) must cover every character, else :class:`CorpusError`."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__} (decode bytes first, e.g. "
                            "raw.decode('utf-8'))")
        if not text:
            raise CorpusError("the text is empty; give a file with some text in it")
        if not 0 < val_fraction < 1:
            raise CorpusError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        chars = sorted(set(text))
        if vocab is None:
            vocab = chars
        elif set(chars) - set(vocab):
            extra = "".join(sorted(set(chars) - set(vocab)))[:20]
            raise CorpusError(f"vocabulary mismatch: the text has characters the model does not know "
                              f"({extra!r}); give the run's own text (or one using only its characters), "
                              "or train a new run on this one")
        index = {ch: k for k, ch in enumerate(vocab)}
        ids = np.fromiter((index[ch] for ch in text), dtype=np.int32, count=len(text))
        cut = int(len(ids) * (1 - val_fraction))
        if not 0 < cut < len(ids):
            raise CorpusError(f"the text has {len(ids)} character(s): too short to split into training "
                              f"and validation text (the last {val_fraction:.0%}); give a longer text")
        return cls(list(vocab), ids[:cut], ids[cut:])

    @classmethod
    def from_file(cls, path: str | Path, val_fraction: float = 0.1, vocab: list | None = None) -> Corpus:
        """Read a UTF-8 text file with clear errors for missing, binary or empty files."""
        path = Path(path)
        if not path.is_file():
            raise CorpusError(f"--data {path} does not exist or is not a file")
        raw = path.read_bytes()
        if b"\0" in raw[:1 << 20]:
            raise CorpusError(f"--data {path} looks binary (NUL bytes); give a UTF-8 text file")
        try:
            text = raw.decode("utf-8-sig")  # a byte-order mark is not text: not a character to learn
        except UnicodeDecodeError as exc:
            raise CorpusError(f"--data {path} is not valid UTF-8 ({exc.reason} at byte "
                              f"{exc.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None
        if not text:
            raise CorpusError(f"--data {path} is empty; give a file with some text in it")
        corpus = cls.from_text(text, val_fraction, vocab)
        corpus.source = str(path)
        return corpus

    @classmethod
    def from_vocab(cls, vocab: list, source: str = "the text", unread: bool = False) -> Corpus:
        """A corpus without text (a checkpoint's vocabulary when its text file is gone, or was
        not to be read: ``unread``): encodes, decodes and samples; :meth:`batch` says to give
        the text."""
        if not len(vocab):
            raise CorpusError("the vocabulary is empty; give the characters the model knows (its "
                              "checkpoint's vocabulary)")
        empty = np.zeros(0, dtype=np.int32)
        return cls(list(vocab), empty, empty.copy(), source, unread)

    @property
    def vocab_size(self) -> int:
        """Number of characters in the vocabulary."""
        return len(self.vocab)

    def check_seq_len(self, seq_len: int) -> None:
        """Both splits must hold at least one window of ``seq_len + 1`` characters."""
        shortest = min(len(self.train), len(self.val))
        if seq_len + 1 > shortest:
            raise CorpusError(f"--seq-len {seq_len} needs at least {seq_len + 1} characters in the "
                              f"train and validation splits (the last 10% of the text), the shorter "
                              f"has {shortest}; use a longer text (or, training a new run, a shorter "
                              "--seq-len)")

    def require_text(self) -> None:
        """Raise :class:`CorpusError` for a corpus without text (see :meth:`from_vocab`)."""
        if not len(self.train):
            if self.unread:
                raise CorpusError(f"{self.source} was not read (loaded with read_text=False); load the "
                                  "run with read_text=True, the default")
            raise CorpusError(f"{self.source} is not available (moved or deleted?); pass --data FILE "
                              "(the run's text, or one with the same characters)")

    def batch(self, rng: np.random.Generator, split: str, batch: int,
              seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Random windows: inputs ``x`` (B, T) and next-character targets ``y`` (B, T)."""
        self.require_text()
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.check_seq_len(check_positive_int(seq_len, "seq_len"))
        ids = self.train if split == "train" else self.val
        start = rng.integers(0, len(ids) - seq_len, size=check_positive_int(batch, "batch"))
        idx = start[:, None] + np.arange(seq_len + 1)
        win = ids[idx]
        return win[:, :-1], win[:, 1:]

    def encode(self, text: str, what: str = "the text") -> np.ndarray:
        """``text`` as vocabulary ids; CorpusError naming ``what`` and the characters the model
        does not know (in the order typed) otherwise."""
        index = {ch: k for k, ch in enumerate(self.vocab)}
        missing = "".join(dict.fromkeys(ch for ch in text if ch not in index))
        if missing:
            known = "".join(self.vocab)
            raise CorpusError(f"{what} has characters not in the model's vocabulary: {missing[:20]!r} (it "
                              f"knows {known[:60]!r}{'...' if len(known) > 60 else ''})")
        return np.array([index[ch] for ch in text], dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of vocabulary ids ``ids`` (the inverse of :meth:`encode`)."""
        V, ids = len(self.vocab), list(ids)
        bad = [k for k in ids if isinstance(k, bool) or not isinstance(k, (int, np.integer))
               or not 0 <= k < V]
        if bad:
            raise ValueError(f"decode takes vocabulary ids, integers in [0, {V}), got {bad[0]!r}")
        return "".join(self.vocab[int(k)] for k in ids)


def check_ids(ids: npt.ArrayLike, vocab: int) -> np.ndarray:
    """``ids`` as an integer array of vocabulary ids in [0, ``vocab``), else TypeError/ValueError."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"Embedding expects integer ids in [0, {vocab}), got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"Embedding expects integer ids in [0, {vocab}), got ids from {ids.min()} to "
                         f"{ids.max()}")
    return ids


def check_ids_shape(ids: object) -> None:
    """ValueError unless ``ids`` (host or device) has shape (batch, time), no axis empty: checked
    before the embedding, since past it the recurrent core would name the embedded ids."""
    shape = np.shape(ids)
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"ids must have shape (batch, time), no axis empty, got {shape}")


class Embedding(OwnsParams):
    """Lookup table ``W (V, D)``: ``forward(ids)`` → ``W[ids]``; backward scatter-adds into ``dW``."""

    _BUFFERS = {"_ids": lambda: None}
    _FIXED = OwnsParams._FIXED + ("vocab",)

    def __init__(self, vocab: int, dim: int, seed: int = 0, dtype: npt.DTypeLike = config.DEFAULT_DTYPE):
        vocab, dim = check_positive_int(vocab, "vocab"), check_positive_int(dim, "dim")
        self.vocab = vocab
        self.layout = ParamLayout({"W": (vocab, dim)})
        self.dtype = config.resolve_dtype(dtype)
        self.params, self.grads = self.layout.new(self.dtype), self.layout.new(self.dtype)
        self.params["W"][...] = seeded_rng(seed).normal(0, 0.1, (vocab, dim))
        self._ids: np.ndarray | None = None

    @one_thread_at_a_time
    def forward(self, ids: np.ndarray) -> np.ndarray:
        """``W[ids]`` for integer ``ids`` in [0, V); keeps a copy of the ids for backward."""
        check_finite_params(self.params)
        ids = check_ids(ids, self.params["W"].shape[0])
        self._ids = ids.copy()  # backward's own: the caller may reuse its array
        return self.params["W"][ids]

    @one_thread_at_a_time
    def backward(self, dy: np.ndarray) -> None:
        """``dW[ids] += dy`` (repeated ids add up); the ids have no gradient."""
        if self._ids is None:
            raise missing_activations(run="forward(ids)")
        want = self._ids.shape + self.params["W"].shape[1:]
        check_shape(dy, want)
        dy = check_array(dy, "dy", len(want), want[-1], self.dtype, "(the output's shape)")  # NaN, dtype
        scatter_add_rows(self.grads["W"], self._ids.reshape(-1), dy.reshape(-1, dy.shape[-1]))
        check_grads(self.grads.data, self.dtype)


class Dropout:
    """Inverted dropout: training (a generator given) zeroes with probability p and scales by 1/(1−p).
    The mask is counter-based (:mod:`mdnumba.kernels.dropout`): one seed drawn from the generator
    per forward, so the device trainer draws the same mask on the GPU from that seed."""

    def __init__(self, p: float):
        threshold(p)  # checks p
        self.p = float(p)
        self._mask: np.ndarray | None = None
        self._shape: tuple | None = None  # of the last forward's x (backward's dy)

    @one_thread_at_a_time
    def forward(self, x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """``x`` with dropout applied when ``rng`` is given (training) and p > 0, else ``x`` itself."""
        self._shape = np.shape(x)
        if rng is None or self.p == 0:
            self._mask = None
            return x
        keep = keep_mask(np.shape(x), draw_seed(rng), self.p)
        self._mask = keep.astype(x.dtype) / np.asarray(1 - self.p, x.dtype)
        return x * self._mask

    @one_thread_at_a_time
    def backward(self, dy: np.ndarray) -> np.ndarray:
        """``dy`` through the last forward's mask (``dy`` itself when none was applied)."""
        if self._shape is not None:
            check_shape(dy, self._shape)  # a mask would broadcast over another shape
        return dy if self._mask is None else dy * self._mask

    def free_buffers(self) -> None:
        """Drop the mask (backward's activations)."""
        self._mask = None

    def saved_bytes(self) -> int:
        """Bytes of the mask kept for backward (0 without one)."""
        return 0 if self._mask is None else self._mask.nbytes

    def __getstate__(self) -> dict:
        """Copies carry no mask, as the layers' copies carry no activations."""
        return dict(vars(self), _mask=None)


def softmax_xent(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy (nats) of ``softmax(logits)`` against int ``targets``; returns
    ``(L, dL/dlogits = (p − onehot)/n, p)``. ``L`` from the log-softmax
    ``z_t − max z − log Σ exp(z − max z)``, exact however unlikely the target."""
    logits, t = checked_logits(logits, "logits", infinite=False), np.asarray(targets)
    if logits.ndim < 1:
        raise ValueError(f"logits must have a vocabulary axis (the last), got the scalar {logits!r}")
    V = logits.shape[-1]
    if t.shape != logits.shape[:-1] or not t.size:
        raise ValueError(f"targets must have the logits' shape without the vocabulary axis, "
                         f"{logits.shape[:-1]}, and hold some, got {t.shape}")
    if t.dtype == bool or not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"targets must be integer ids in [0, {V}), got dtype {t.dtype}")
    if t.min() < 0 or t.max() >= V:  # -1 would wrap
        raise ValueError(f"targets must be integer ids in [0, {V}), got {t.dtype} "
                         f"from {t.min()} to {t.max()}")
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    total = p.sum(axis=-1, keepdims=True)  # in [1, vocab]: its log is exact enough
    p /= total
    flat = p.reshape(-1, p.shape[-1])
    t = t.reshape(-1)
    n = t.size
    log_p = z.reshape(flat.shape)[np.arange(n), t] - np.log(total).reshape(-1)
    loss = float(-np.mean(log_p))
    grad = flat.copy()
    grad[np.arange(n), t] -= 1.0
    dtype = logits.dtype if np.issubdtype(logits.dtype, np.floating) else np.float64  # of int logits
    return loss, (grad / n).reshape(p.shape).astype(dtype), p


class CharLM(LayerGroup):
    """``grid`` (one GridLSTM2D of depth ``layers``, weights ``tied`` along depth or not) or
    ``stacked`` (``layers`` LSTM1D) between an embedding and a softmax readout; dropout
    ``dropout`` on the non-recurrent connections."""

    def __init__(self, kind: str, vocab: int, hidden: int, layers: int, dropout: float = 0.0,
                 seed: int = 0, dtype: npt.DTypeLike = config.DEFAULT_DTYPE, tied: bool = True,
                 device: str = "cpu"):
        if kind not in ("grid", "stacked"):
            raise ValueError(f"char-lm model must be 'grid' or 'stacked', got {kind!r}")
        if kind == "stacked" and not tied:
            raise ValueError("tied=False applies to the grid model only (its weights along depth); a "
                             "stacked model's layers have weights of their own: leave it out")
        for value, name in ((vocab, "vocab"), (hidden, "hidden"), (layers, "layers")):
            check_positive_int(value, name)
        self.kind = kind
        seed = shared_seed(seed)
        self.embed = Embedding(vocab, hidden, seed=seed, dtype=dtype)
        if kind == "grid":
            self.core = GridLSTM2D(hidden, layers, seed=part_seed(seed, 1), dtype=dtype, tied=tied,
                                   device=device)
            core_layers, self.drops = [self.core], [Dropout(dropout), Dropout(dropout)]
        else:
            self.core = mdlstm_stack(1, hidden, hidden, layers=layers, seed=part_seed(seed, 1), dtype=dtype,
                                     device=device)
            core_layers, self.drops = self.core.layers, [Dropout(dropout) for _ in range(layers + 1)]
        self.head = Linear(hidden, vocab, seed=part_seed(seed, 2), dtype=dtype)
        self.layers = [self.embed] + list(core_layers) + [self.head]
        self._refused_at: int | None = None  # the last forward failed partway (stack.refused_midway)

    def _cores(self) -> list:
        return [self.core] if self.kind == "grid" else list(self.core.layers)

    def free_buffers(self) -> None:
        """:meth:`LayerGroup.free_buffers`, and the dropout masks."""
        super().free_buffers()
        for drop in self.drops:
            drop.free_buffers()

    def saved_bytes(self) -> int:
        """Bytes of the activations kept for backward: the layers' and the dropout masks."""
        return super().saved_bytes() + sum(drop.saved_bytes() for drop in self.drops)

    def workspace_bytes(self) -> int:
        """Bytes of every buffer kept between calls: the layers' (saved + scratch) and the dropout masks."""
        return super().workspace_bytes() + sum(drop.saved_bytes() for drop in self.drops)

    @one_thread_at_a_time
    def forward(self, ids: np.ndarray, rng: np.random.Generator | None = None, *,
                save: bool = True) -> np.ndarray:
        """Logits (B, T, V) for ids (B, T); ``rng`` switches dropout on (training); ``save=False``:
        the recurrent core and the readout keep no activations (evaluation, sampling). A forward
        that fails after the embedding ran refuses ``backward`` until one runs through."""
        def rest(e: np.ndarray) -> np.ndarray:
            h = self.drops[0].forward(e, rng)
            for core, drop in zip(self._cores(), self.drops[1:]):
                h = drop.forward(core.forward(h, save=save), rng)
            return self.head.forward(h, save=save)
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), which "
                            f"draws the dropout masks, or None, got {type(rng).__name__}")
        check_ids_shape(ids)
        return run_tracked(self, self.embed, lambda: self.embed.forward(ids), rest)

    @one_thread_at_a_time
    def backward(self, dlogits: np.ndarray) -> None:
        """Accumulate the gradients of every layer from ``dlogits`` (B, T, V) of the last forward."""
        check_not_refused_midway(self)
        dh = self.head.backward(dlogits)
        for core, drop in reversed(list(zip(self._cores(), self.drops[1:]))):
            dh = core.backward(drop.backward(dh))
        self.embed.backward(self.drops[0].backward(dh))



def sample_text(model: CharLM, corpus: Corpus, length: int, temperature: float,
                rng: np.random.Generator | int | None, prime: str = "", window: int = 50) -> str:
    """Return ``prime`` and ``length`` characters generated after it: softmax(logits/temperature)
    sampling, each step conditioned on the last ``window`` characters. Without a prime the
    text starts from a character drawn uniformly from the vocabulary, shown as the first of
    the ``length`` (so every character shown is conditioned only on those before it).
    ``rng``: a ``np.random.Generator``, or a seed for one (an int >= 0; None: unseeded)."""
    return "".join(iter_sample(model, corpus, length, temperature, rng, prime, window))


def iter_sample(model: CharLM, corpus: Corpus, length: int, temperature: float,
                rng: np.random.Generator | int | None, prime: str = "", window: int = 50) -> Iterator[str]:
    """:func:`sample_text` piece by piece: the prime (or the random first character), then each
    generated character as soon as it is drawn (``mdnumba sample`` prints them as they come).
    A bad temperature, prime, rng or a model of another vocabulary raises here, before the
    first piece."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)):
        raise TypeError(f"--temperature must be a number, got {temperature!r}")
    if not 0 < temperature < np.inf:  # inf would sample uniformly, ignoring the model
        raise ValueError(f"--temperature must be a finite number > 0, got {temperature}")
    check_positive_int(window, "window")
    vocab = getattr(getattr(model, "embed", None), "vocab", corpus.vocab_size)  # CharLM, DeviceCharLM
    if vocab != corpus.vocab_size:
        raise ValueError(f"the model's vocabulary has {vocab} characters, the corpus's {corpus.vocab_size}; "
                         "sample with the corpus the model was trained on (its checkpoint's vocabulary)")
    if not isinstance(rng, np.random.Generator):
        rng = seeded_rng(rng, "rng (a np.random.Generator, or a seed for one)")
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < (0 if prime else 1):
        why = "" if prime else " (without a prime the random first character is the first of them)"
        raise ValueError(f"--length must be an integer >= {0 if prime else 1}{why}, got {length!r}")
    if not prime:
        prime, length = corpus.decode([int(rng.integers(corpus.vocab_size))]), length - 1
    ids = list(corpus.encode(prime, "--prime"))
    return _sampled(model, corpus, ids, prime, length, temperature, rng, window)


def _sampled(model, corpus, ids, prime, length, temperature, rng, window) -> Iterator[str]:
    """The generator of :func:`iter_sample` (``ids``: the prime's, extended as it samples)."""
    yield prime
    for _ in range(length):
        logits = model.forward(np.array([ids[-window:]], dtype=np.int32), save=False)[0, -1]
        logits = logits.astype(np.float64)
        with np.errstate(over="ignore"):  # shifted first: a tiny temperature gives -inf, not inf - inf
            p = np.exp((logits - logits.max()) / temperature)
        nxt = int(rng.choice(len(p), p=p / p.sum()))
        ids.append(nxt)
        yield corpus.decode([nxt])


BITS_PER_NAT = 1.0 / math.log(2.0)
