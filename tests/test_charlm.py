"""Char-level LM pieces: corpus errors, embedding, dropout, softmax loss, RMSprop, models, CLI."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from gradcheck import assert_grad_close, numeric_grad
from mdnumba.cli.main import main

from mdnumba import reference as ref
from mdnumba.charlm import CharLM, Corpus, CorpusError, Dropout, Embedding, sample_text, softmax_xent
from mdnumba.optim import RMSprop
from mdnumba.train import TrainConfig, Trainer, make_trainer

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture
def textfile(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def test_softmax_xent_gradient(rng):
    z = rng.standard_normal((2, 3, 5))
    t = rng.integers(0, 5, (2, 3))
    loss, dz, p = softmax_xent(z, t)
    np.testing.assert_allclose(p.sum(-1), 1.0)
    assert_grad_close(dz, numeric_grad(lambda: softmax_xent(z, t)[0], z), name="dz")


def test_embedding_backward_uses_the_forwards_ids_not_the_callers_array():
    """A loader that refills its ids buffer between forward and backward must not move the
    gradient to other rows."""
    emb, ids = Embedding(5, 2, dtype=np.float64), np.array([[1, 2]])
    emb.forward(ids)
    ids[...] = 4
    emb.backward(np.ones((1, 2, 2)))
    assert emb.grads.W[[1, 2]].all() and not emb.grads.W[[0, 3, 4]].any()


def test_embedding_backward_adds_repeated_ids(rng):
    emb = Embedding(4, 3, dtype=np.float64)
    ids = np.array([[1, 1, 3]])
    w = rng.standard_normal((1, 3, 3))
    emb.forward(ids)
    emb.backward(w)
    assert_grad_close(emb.grads.W, numeric_grad(lambda: float(np.sum(w * emb.forward(ids))), emb.params.W))
    with pytest.raises(ValueError, match=r"integer ids in \[0, 4\), got ids from -1 to 4"):
        emb.forward(np.array([4, -1]))
    with pytest.raises(TypeError, match=r"integer ids in \[0, 4\), got dtype float64"):
        emb.forward(np.array([1.0]))
    emb.forward(ids)
    with pytest.raises(ValueError, match=r"dy must have shape \(1, 3, 3\)"):
        emb.backward(np.ones((3, 3)))


def test_dropout_masks_are_activations(rng):
    """CharLM's dropout masks count in saved_bytes, go with free_buffers and stay out of copies,
    like the layers' activations."""
    import copy
    import pickle
    lm = CharLM("stacked", vocab=5, hidden=3, layers=1, dropout=0.5, dtype=np.float64)
    ids = rng.integers(0, 5, (2, 6))
    lm.forward(ids, rng)
    masks = sum(d._mask.nbytes for d in lm.drops)
    assert masks and lm.saved_bytes() >= masks
    for twin in (copy.deepcopy(lm), pickle.loads(pickle.dumps(lm))):
        assert all(d._mask is None for d in twin.drops)
    lm.free_buffers()
    assert all(d._mask is None for d in lm.drops) and lm.saved_bytes() == 0


def test_models_take_any_numpy_seed():
    """A Generator or SeedSequence seed (as the layers take), or None: one stream for every
    part; the same SeedSequence twice gives the same model."""
    from mdnumba.models import build_model
    a, b = (build_model("md", hidden=2, seed=np.random.SeedSequence(5)) for _ in range(2))
    np.testing.assert_array_equal(a.readout.params.data, b.readout.params.data)
    build_model("snake", hidden=2, seed=None)
    lm = CharLM("stacked", vocab=5, hidden=3, layers=2, seed=np.random.default_rng(1))
    assert not np.array_equal(lm.layers[1].params.W[:, :3], lm.layers[2].params.W[:, :3])


def test_dropout_scales_and_masks(rng):
    d = Dropout(0.5)
    x = np.ones((1000,))
    y = d.forward(x, rng)
    assert set(np.unique(y)) <= {0.0, 2.0} and 0.4 < (y == 0).mean() < 0.6
    np.testing.assert_array_equal(d.backward(np.ones_like(x)), y)
    assert d.forward(x, None) is x
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)


def test_rmsprop_matches_reference(rng):
    p, g = rng.standard_normal(6), rng.standard_normal(6)
    opt = RMSprop([(p, g)], lr=0.1, rho=0.9)
    want, v = p.copy(), np.zeros(6)
    for _ in range(3):
        opt.step()
        want, v = ref.rmsprop_step(want, g, v, 0.1, 0.9, 1e-8)
    np.testing.assert_allclose(p, want, rtol=1e-12)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("kind,tied", [("grid", True), ("grid", False), ("stacked", True)])
def test_model_gradients_finite_differences(kind, tied, dropout, rng):
    """backward == finite differences of forward; with dropout the masks are held fixed (the
    same seed on every call), so the embedding's gradient goes through its mask too. The grid
    model with weights tied along depth and with a set per level."""
    model = CharLM(kind, vocab=5, hidden=3, layers=2, dropout=dropout, seed=1, dtype=np.float64,
                   tied=tied)
    x, y = rng.integers(0, 5, (2, 4)), rng.integers(0, 5, (2, 4))

    def forward():
        return model.forward(x, np.random.default_rng(7) if dropout else None)

    def loss():
        return softmax_xent(forward(), y)[0]
    model.zero_grad()
    model.backward(softmax_xent(forward(), y)[1])
    for layer in model.layers:
        for name in layer.layout.shapes:
            assert_grad_close(layer.grads[name], numeric_grad(loss, layer.params[name]),
                              name=f"{type(layer).__name__}.{name}")


def test_a_corpus_and_a_model_name_arguments_of_the_wrong_kind(textfile):
    """Bytes made a vocabulary of integers that failed at decoding; a negative batch was NumPy's
    "negative dimensions"; an int rng with dropout an AttributeError (without, silently no
    dropout); a stacked model took tied=False, and a corpus an empty vocabulary."""
    with pytest.raises(TypeError, match=r"^text must be a str, got bytes \(decode bytes first"):
        Corpus.from_text(b"hello world, hello world")
    corpus = Corpus.from_file(textfile)
    for batch in (-1, 0):
        with pytest.raises(ValueError, match="batch must be"):
            corpus.batch(np.random.default_rng(0), "train", batch, 5)
    with pytest.raises(ValueError, match=r"^tied=False applies to the grid model only"):
        CharLM("stacked", corpus.vocab_size, 4, 1, tied=False)  # was ignored
    with pytest.raises(CorpusError, match=r"^the vocabulary is empty"):
        Corpus.from_vocab([])
    for dropout in (0.5, 0.0):
        model = CharLM("stacked", corpus.vocab_size, 4, 1, dropout=dropout)
        with pytest.raises(TypeError, match=r"^rng must be a numpy.random.Generator .* or None, got int$"):
            model.forward(np.zeros((1, 3), int), rng=3)


def test_corpus_errors(tmp_path, textfile):
    with pytest.raises(CorpusError, match="does not exist"):
        Corpus.from_file(tmp_path / "missing.txt")
    (tmp_path / "bin").write_bytes(b"abc\0def")
    with pytest.raises(CorpusError, match="binary"):
        Corpus.from_file(tmp_path / "bin")
    (tmp_path / "latin").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="not valid UTF-8 .*; convert it, e.g. iconv -f latin1 -t utf-8"):
        Corpus.from_file(tmp_path / "latin")
    (tmp_path / "bom").write_bytes("\ufeffabcab".encode())  # a byte-order mark is not a character
    assert Corpus.from_file(tmp_path / "bom").vocab == list("abc")
    (tmp_path / "empty").write_text("")
    with pytest.raises(CorpusError, match=f"--data {tmp_path / 'empty'} is empty; give a file"):
        Corpus.from_file(tmp_path / "empty")
    corpus = Corpus.from_file(textfile)
    with pytest.raises(CorpusError, match=r"--seq-len 500 .*; use a longer text \(or, training a new run, a "
                                          r"shorter --seq-len\)$"):  # evaluate has no --seq-len
        corpus.check_seq_len(500)
    with pytest.raises(CorpusError, match="mismatch.*give the run's own text .*or train a new run"):
        Corpus.from_text("xyz!", vocab=corpus.vocab)  # not "resume": evaluate --data says it too
    assert corpus.decode(corpus.encode("the dog")) == "the dog"


@pytest.mark.parametrize("kind", ["grid", "stacked"])
def test_models_learn_a_repetitive_text(kind, textfile):
    tr = make_trainer(TrainConfig(model=kind, task="char-lm", data=str(textfile), hidden=16, layers=2,
                                  seq_len=16, batch=16, lr=1e-2, steps=300))
    before = tr.evaluate(batches=2)["val_bpc"]
    tr.run()
    after = tr.evaluate(batches=2)["val_bpc"]
    assert after < 0.35 * before, (before, after)


def test_cli_char_lm_train_resume_sample(tmp_path, textfile):
    runner = CliRunner()
    args = ["train", "--task", "char-lm", "--model", "grid", "--data", str(textfile), "--layers", "2",
            "--hidden", "6", "--seq-len", "10", "--batch", "4", "--optimizer", "rmsprop",
            "--dropout", "0.25", "--checkpoint-every", "2", "--no-tie-depth"]
    full = runner.invoke(main, args + ["--steps", "4", "--out", str(tmp_path / "full")])
    assert full.exit_code == 0, full.output
    # the closing validation is the log's last one (it was of 5 batches, the log's of 4: two numbers)
    assert "on validation text (4 batches, as log.tsv's last row; `mdnumba evaluate` takes 20" in full.output
    closing = float(re.search(r"val_loss: (\S+)", full.output).group(1))
    last = (tmp_path / "full" / "log.tsv").read_text().splitlines()[-1].split("\t")
    assert closing == pytest.approx(float(last[4]), rel=1e-5)
    part = runner.invoke(main, args + ["--steps", "2", "--out", str(tmp_path / "part")])
    assert part.exit_code == 0, part.output
    res = runner.invoke(main, ["train", "--resume", str(tmp_path / "part"), "--steps", "4"])
    assert res.exit_code == 0, res.output
    a, b = np.load(tmp_path / "full" / "checkpoint.npz"), np.load(tmp_path / "part" / "checkpoint.npz")
    for key in a.files:
        if key != "meta":
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    res = runner.invoke(main, ["sample", str(tmp_path / "full"), "--length", "30", "--prime", "the "])
    assert res.exit_code == 0 and res.output.startswith("the ") and len(res.output.strip()) >= 30
    drawn = {t: runner.invoke(main, ["sample", str(tmp_path / "full"), "--length", "60", "--seed", "3",
                                     *(["--temperature", t] if t else [])]).output for t in ("", "0.8", "1")}
    assert drawn[""] == drawn["0.8"] != drawn["1"]  # the documented default
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 6)))
    res = runner.invoke(main, ["predict", str(tmp_path / "full"), str(tmp_path / "x.npy"), "--out",
                               str(tmp_path / "p.npy")])
    assert res.exit_code == 2 and "a char-lm run generates text: use `mdnumba sample`" in res.output
    assert "vocabulary" in runner.invoke(main, ["sample", str(tmp_path / "full"), "--prime", "XYZ"]).output
    textfile.write_text("completely different text with Q and Z! " * 40)
    res = runner.invoke(main, ["train", "--resume", str(tmp_path / "full"), "--steps", "6"])
    assert res.exit_code == 2 and "vocabulary mismatch" in res.output


@pytest.mark.parametrize("extra,message", [
    ([], "needs --data FILE"),
    (["--data", "nope.txt"], "does not exist"),
    (["--data", "TEXT", "--seq-len", "5000"], "--seq-len 5000"),
    (["--data", "TEXT", "--model", "md"], "does not fit task"),
    (["--data", "TEXT", "--size", "12", "--cell", "stable"], "--size (not for char-lm), --cell (not"),
])
def test_cli_char_lm_bad_input(tmp_path, textfile, extra, message):
    extra = [str(textfile) if e == "TEXT" else e for e in extra]
    model = [] if "--model" in extra else ["--model", "stacked"]
    res = CliRunner().invoke(main, ["train", "--task", "char-lm", *model, "--out", str(tmp_path / "r"),
                                    *extra])
    assert res.exit_code == 2 and message in res.output, res.output


def test_char_lm_run_remembers_its_text_from_any_folder(tmp_path, textfile, monkeypatch):
    """The run stores the text's absolute path; without the text it still samples (the
    vocabulary is in the checkpoint), and training asks for --data."""
    runner = CliRunner()
    monkeypatch.chdir(textfile.parent)
    args = ["train", "--task", "char-lm", "--model", "stacked", "--data", textfile.name,
            "--hidden", "4", "--seq-len", "8", "--batch", "2", "--steps", "2", "--out", str(tmp_path / "r")]
    assert runner.invoke(main, args).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / textfile.name).write_text("other text entirely: xq")
    monkeypatch.chdir(elsewhere)
    res = runner.invoke(main, ["train", "--resume", str(tmp_path / "r"), "--steps", "3"])
    assert res.exit_code == 0, res.output
    with textfile.open("a") as fh:  # sample reads only the checkpoint
        fh.write("Ω€")
    res = runner.invoke(main, ["sample", str(tmp_path / "r"), "--length", "10"])
    assert res.exit_code == 0, res.output
    moved = tmp_path / "moved.txt"
    textfile.rename(moved)
    res = runner.invoke(main, ["sample", str(tmp_path / "r"), "--length", "10", "--prime", "the"])
    assert res.exit_code == 0 and res.output.startswith("the"), res.output
    res = runner.invoke(main, ["train", "--resume", str(tmp_path / "r"), "--steps", "4"])
    # the run's text, which the user did not pass as --data this time
    gone = f"the text {textfile} is not available (moved or deleted?); pass --data FILE"
    assert res.exit_code == 2 and gone in res.output.replace("\n", " "), res.output
    res = runner.invoke(main, ["evaluate", str(tmp_path / "r")])
    assert res.exit_code == 2 and "pass --data FILE" in res.output, res.output
    res = runner.invoke(main, ["evaluate", str(tmp_path / "r"), "--size", "9"])
    assert res.exit_code == 2 and "--size does not apply" in res.output, res.output
    moved.write_text(TEXT)
    res = runner.invoke(main, ["evaluate", str(tmp_path / "r"), "--data", str(moved)])
    assert res.exit_code == 0 and "val_bpc" in res.output, res.output
    res = runner.invoke(main, ["train", "--resume", str(tmp_path / "r"), "--steps", "4",
                               "--data", str(moved)])
    assert res.exit_code == 0, res.output


def test_char_lm_resumed_after_ctrl_c_logs_what_an_uninterrupted_run_logs(tmp_path, textfile, monkeypatch):
    """The validation metrics the log repeats between evaluations are in the checkpoint."""
    import signal

    from mdnumba.train_charlm import CharLMTrainer
    cfg = dict(model="stacked", task="char-lm", data=str(textfile), hidden=4, seq_len=8, batch=2,
               steps=60, checkpoint_every=60)
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
    make_trainer(TrainConfig(**cfg), tmp_path / "a").run()
    real = CharLMTrainer.train_step

    def step(self):
        if self.step == 29:
            signal.raise_signal(signal.SIGINT)
        return real(self)
    monkeypatch.setattr(CharLMTrainer, "train_step", step)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(TrainConfig(**cfg), tmp_path / "b").run()
    monkeypatch.undo()
    from mdnumba.train import Trainer
    tr = Trainer.load(tmp_path / "b")
    assert tr.step == 30
    tr.run()

    def logged(run):  # every column but the step time
        rows = [r.split("\t") for r in (tmp_path / run / "log.tsv").read_text().splitlines()]
        keep = [k for k, c in enumerate(rows[0]) if c not in ("time", "chars_per_s")]
        return [[r[k] for k in keep] for r in rows]
    assert logged("a") == logged("b")


# ---------------------------------------------------------------- values, not just running
def test_softmax_xent_is_stable_for_large_logits():
    loss, dz, p = softmax_xent(np.array([[1000.0, 0.0, -5.0]]), np.array([0]))
    assert loss == pytest.approx(0.0, abs=1e-12) and np.isfinite(dz).all()
    loss, dz, _ = softmax_xent(np.array([[-1000.0, 0.0, 0.0]]), np.array([1]))
    assert loss == pytest.approx(np.log(2)) and np.isfinite(dz).all()
    # a target far below the rest: the loss is the logit gap (+ log 2), not cut at -log(1e-300)
    loss, dz, _ = softmax_xent(np.array([[0.0, 0.0, -1000.0]]), np.array([2]))
    assert loss == pytest.approx(1000.0 + np.log(2)) and np.isfinite(dz).all()


def test_softmax_xent_takes_integer_logits_and_names_what_it_refuses():
    """Integer logits gave an integer (all-zero) gradient; lists, a scalar, string or bool
    targets gave AttributeError, IndexError or NumPy's errors."""
    loss, dz, _ = softmax_xent(np.array([[0, 5, 1]]), np.array([0]))
    want = softmax_xent(np.array([[0.0, 5.0, 1.0]]), np.array([0]))
    assert loss == want[0] and dz.dtype == np.float64 and np.array_equal(dz, want[1])
    assert softmax_xent([[0.0, 5.0, 1.0]], [0])[0] == want[0]  # lists, as arrays
    for logits, targets, error, said in (
            (np.float32(1), np.array(0), ValueError, "^logits must have a vocabulary axis"),
            (None, [0], TypeError, "^logits must hold real numbers .* got dtype object$"),
            (np.zeros((1, 2), complex), [0], TypeError, "^logits must hold real numbers"),
            (np.zeros((1, 2)), np.array(["a"]), TypeError,
             r"^targets must be integer ids in \[0, 2\), got dtype <U1$"),
            (np.zeros((1, 2)), np.array([True]), TypeError, r"^targets must be integer ids .* dtype bool$")):
        with pytest.raises(error, match=said):
            softmax_xent(logits, targets)


class _StubLM:
    """Logits from a rule on the context: ``rule(context ids) -> logits of the next char``;
    records the context lengths it was given and whether it was asked to save activations."""

    def __init__(self, rule):
        self.rule, self.contexts, self.saves = rule, [], set()

    def forward(self, ids, *, save=True):
        self.contexts.append(ids.shape[1])
        self.saves.add(save)
        out = np.zeros(ids.shape + (5,))
        out[0, -1] = self.rule(ids[0])
        return out


def test_sampling_temperature_divides_the_logits():
    corpus = Corpus.from_vocab(list("abcde"))
    stub = _StubLM(lambda ids: np.array([2.0, 0, 0, 0, 0]))
    cold = sample_text(stub, corpus, 300, 0.1, np.random.default_rng(0), prime="a")
    assert cold == "a" * 301
    # a subnormal temperature: logits / T would be inf (and inf - inf NaN); it samples the argmax
    assert sample_text(stub, corpus, 5, 1e-320, np.random.default_rng(0), prime="a") == "a" * 6
    hot = sample_text(stub, corpus, 4000, 10.0, np.random.default_rng(0), prime="a")[1:]
    assert hot.count("a") / 4000 == pytest.approx(np.exp(0.2) / (np.exp(0.2) + 4), abs=0.03)
    for bad in (0.0, -1.0, np.inf, np.nan):  # inf would sample uniformly, ignoring the model
        with pytest.raises(ValueError, match="--temperature must be a finite number > 0"):
            sample_text(stub, corpus, 3, bad, np.random.default_rng(0), prime="a")
    for bad in ("0.8", True, np.array([0.5])):
        with pytest.raises(TypeError, match="^--temperature must be a number, got "):
            sample_text(stub, corpus, 3, bad, np.random.default_rng(0), prime="a")


def test_sampling_takes_a_generator_or_a_seed_and_a_model_of_the_corpus_vocabulary():
    """``rng`` may be a seed (the same text as its Generator); anything else, a seed the trainer's
    generate is given included, is named; a model of another vocabulary is refused before the
    first piece (it sampled silently, or failed in decode)."""
    from mdnumba.charlm import iter_sample
    corpus = Corpus.from_text("hello world " * 5)
    model = CharLM("stacked", corpus.vocab_size, 3, 1)
    assert sample_text(model, corpus, 9, 1.0, 7, prime="he") == \
        sample_text(model, corpus, 9, 1.0, np.random.default_rng(7), prime="he")
    for bad in ("x", -1, 1.5):
        match = (r"^rng \(a np.random.Generator, or a seed for one\) must be an integer >= 0 or None, "
                 rf"got {bad!r}")
        with pytest.raises((TypeError, ValueError), match=match):
            iter_sample(model, corpus, 5, 1.0, bad, prime="he")
    for vocab in (corpus.vocab_size - 3, corpus.vocab_size + 3):
        with pytest.raises(ValueError, match=f"the model's vocabulary has {vocab} characters, the corpus's "
                                             f"{corpus.vocab_size}; sample with the corpus the model"):
            iter_sample(CharLM("grid", vocab, 3, 1), corpus, 5, 1.0, 0, prime="he")


def test_texts_too_short_to_split_and_texts_not_read_say_so(tmp_path, textfile):
    """A one-character text had an empty training split, which batch() called a text "not
    available (moved or deleted?)"; so did a run loaded with read_text=False, its text in place.
    A trainer's generate names its seed."""
    for text, held_out in (("a", 0.1), ("ab", 0.6)):  # no character left to train on
        with pytest.raises(CorpusError, match=f"the text has {len(text)} character.*too short to split"):
            Corpus.from_text(text, held_out)
    assert len(Corpus.from_text("ab").train) == len(Corpus.from_text("ab").val) == 1
    cfg = TrainConfig(task="char-lm", model="stacked", data=str(textfile), hidden=3, seq_len=4, batch=2,
                      steps=2)
    make_trainer(cfg, tmp_path).run()
    unread = Trainer.load(tmp_path, read_text=False)
    unread_text = r"was not read \(loaded with read_text=False\); load the run with read_text=True, " \
                  "the default$"
    with pytest.raises(CorpusError, match=f"the text {textfile} {unread_text}"):
        unread.evaluate()
    with pytest.raises(ValueError, match="^seed must be an integer >= 0 or None, got -1"):
        unread.generate(5, 1.0, seed=-1)


def test_a_prime_outside_the_vocabulary_is_named_with_what_the_model_knows():
    corpus = Corpus.from_vocab(list("abcde"))
    stub = _StubLM(lambda ids: np.zeros(5))
    with pytest.raises(CorpusError, match=r"--prime has characters not in the model's vocabulary: 'THE' "
                                          r"\(it knows 'abcde'\)"):
        sample_text(stub, corpus, 3, 1.0, np.random.default_rng(0), prime="aTHEa")


def test_sampling_without_a_prime_shows_the_character_it_starts_from():
    corpus = Corpus.from_vocab(list("abcde"))
    stub = _StubLM(lambda ids: 50.0 * np.eye(5)[(ids[-1] + 1) % 5])  # next = last + 1
    text = sample_text(stub, corpus, 7, 1.0, np.random.default_rng(3))
    first = "abcde"[np.random.default_rng(3).integers(5)]
    assert len(text) == 7 and text[0] == first
    assert all("abcde".index(b) == ("abcde".index(a) + 1) % 5 for a, b in zip(text, text[1:]))


def test_a_sample_length_below_its_first_character_is_refused():
    """Without a prime the random first character is the first of ``length``: 0 gave it anyway,
    and a negative length gave the prime alone."""
    corpus = Corpus.from_vocab(list("abcde"))
    stub = _StubLM(lambda ids: np.zeros(5))
    for length, prime in ((0, ""), (-2, ""), (-1, "ab"), (2.5, "ab")):
        with pytest.raises(ValueError, match=f"^--length must be an integer >= {0 if prime else 1}"):
            sample_text(stub, corpus, length, 1.0, np.random.default_rng(0), prime=prime)
    assert sample_text(stub, corpus, 0, 1.0, np.random.default_rng(0), prime="ab") == "ab"


def test_the_language_model_helpers_refuse_what_they_cannot_use(rng):
    """Found by a review: a target of -1 wrapped to the last class (a wrong loss), a NaN dy went
    into the embedding's gradient, a vocabulary with a character twice encoded it as its last
    id, decode(-1) gave the last character, and sizes, splits and windows went unchecked."""
    from mdnumba import NonFiniteError
    lg = rng.standard_normal((2, 3, 4))
    for targets in ([[-1, 1, 2], [3, 0, 1]], [[4, 1, 2], [3, 0, 1]], np.zeros((3, 2), int),
                    np.zeros((2, 0), int)):
        with pytest.raises(ValueError, match="^targets must"):
            softmax_xent(lg, np.asarray(targets))
    with pytest.raises(TypeError, match="^targets must be integer ids"):  # a value of the wrong type
        softmax_xent(lg, np.zeros((2, 3)))
    emb = Embedding(5, 3, dtype=np.float64)
    emb.forward(np.array([[1, 2]]))
    with pytest.raises(NonFiniteError, match="^dy contains 1 NaN"):
        emb.backward(np.array([[[np.nan, 0, 0], [0, 0, 0]]]))
    emb.backward([[[1.0, 0, 0], [0, 0, 0]]])  # array-likes as everywhere
    assert emb.grads.W[1, 0] == 1.0
    for make, match in ((lambda: Embedding(0, 3), "vocab must be"), (lambda: Embedding(3, 0), "dim must be"),
                        (lambda: CharLM("grid", 2.5, 3, 2), "vocab must be"),
                        (lambda: CharLM("stacked", 5, -1, 2), "hidden must be")):
        with pytest.raises((TypeError, ValueError), match=match):
            make()
    with pytest.raises(CorpusError, match="each character once, got 'abca'"):
        Corpus.from_vocab(list("abca"))
    corpus = Corpus.from_text("abcdefghij" * 3)
    for ids in ([-1], [1.7], [10], [True]):
        with pytest.raises(ValueError, match=r"^decode takes vocabulary ids, integers in \[0, 10\)"):
            corpus.decode(ids)
    assert corpus.decode(iter([0, 1])) == "ab"
    for split, seq_len, match in (("valid", 2, "split must be"), ("train", -1, "seq_len must be"),
                                  ("val", 3, "needs at least 4 characters")):
        with pytest.raises(ValueError, match=match):
            corpus.batch(rng, split, 2, seq_len)
    with pytest.raises(ValueError, match="window must be"):
        sample_text(_StubLM(lambda ids: np.zeros(10)), corpus, 3, 1.0, rng, prime="ab", window=0)
    drop = Dropout(0.5)
    drop.forward(np.ones((2, 3)), rng)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3\)"):
        drop.backward(np.ones(3))
    for kind in ("stacked", "grid"):  # ids, not the embedded ids the recurrent core would name
        for ids, shape in ((np.array([0, 1]), r"\(2,\)"), (np.zeros((0, 3), int), r"\(0, 3\)"),
                           (np.zeros((2, 0), int), r"\(2, 0\)"), (np.zeros((1, 2, 3), int), r"\(1, 2, 3\)")):
            with pytest.raises(ValueError, match=rf"^ids must have shape \(batch, time\), no axis empty, "
                                                 rf"got {shape}$"):
                CharLM(kind, 5, 3, 1).forward(ids)


def test_sampling_conditions_on_the_last_window_characters():
    corpus = Corpus.from_vocab(list("abcde"))
    stub = _StubLM(lambda ids: 50.0 * np.eye(5)[(ids[-1] + 1) % 5])  # next = last + 1
    text = sample_text(stub, corpus, 12, 1.0, np.random.default_rng(0), prime="ab", window=3)
    assert text == "abcdeabcdeabcd"
    assert max(stub.contexts) == 3 and stub.saves == {False}  # sampling keeps no activations


def test_batches_are_windows_and_next_character_targets():
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    corpus = Corpus.from_text(alphabet * 8)
    x, y = corpus.batch(np.random.default_rng(0), "train", 6, 7)
    assert x.shape == y.shape == (6, 7)
    np.testing.assert_array_equal(y, (x + 1) % 26)   # the character after each input
    np.testing.assert_array_equal(np.diff(x, axis=1) % 26, 1)   # contiguous windows


def test_the_last_tenth_is_held_out():
    corpus = Corpus.from_text("a" * 90 + "b" * 10)
    assert len(corpus.train) == 90 and corpus.decode(corpus.val) == "b" * 10


def _splitmix64(seed: int, i: int) -> int:
    """SplitMix64's (i+1)-th output from ``seed`` in Python integers (the oracle)."""
    m = 2**64 - 1
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_dropout_masks_are_counter_based_splitmix64():
    """Element i of a mask is kept iff u_i = (top 53 bits of SplitMix64's (i+1)-th output) / 2^53
    >= p, exactly (the CUDA twin draws the same mask from the same seed); one seed draw per mask;
    the uniforms look uniform and uncorrelated, and other seeds give other masks."""
    from mdnumba.kernels.dropout import draw_seed, keep_mask, threshold
    seed, p = 0xDEADBEEF12345, 0.3
    keep = keep_mask((50, 40), seed, p)
    u = np.array([(_splitmix64(seed, i) >> 11) / 2.0**53 for i in range(2000)])
    np.testing.assert_array_equal(keep.reshape(-1), u >= p)
    assert int(threshold(0.0)) == 0 and int(threshold(0.5)) == 2**52  # p = 0 keeps everything
    rng, again = np.random.default_rng(3), np.random.default_rng(3)
    assert draw_seed(rng) == np.uint64(again.integers(2**63))  # a single draw from the stream
    big = keep_mask((400_000,), draw_seed(rng), 0.5)
    assert big.mean() == pytest.approx(0.5, abs=0.005)
    lag = np.corrcoef(big[:-1], big[1:])[0, 1]
    assert abs(lag) < 0.01, lag
    assert (keep_mask((1000,), seed + 1, p) != keep_mask((1000,), seed, p)).mean() > 0.3


def test_dropout_keeps_an_element_whose_uniform_equals_the_rate():
    """The boundary of ``u_i >= p``: at p = u_i exactly element i is kept (``>=``, not ``>``), at
    p half a step of 2^-53 above u_i it is dropped (the threshold is ``ceil(p·2^53)``, not the
    floor). The random masks above almost never draw a u_i this close to p."""
    from mdnumba.kernels.dropout import keep_mask, threshold
    seed = 0xDEADBEEF12345
    bits = [_splitmix64(seed, i) >> 11 for i in range(64)]
    i = next(k for k, b in enumerate(bits) if 0 < b < 2**52)  # then (b + 1/2) / 2^53 is a float64
    b = bits[i]
    at, above = b / 2.0**53, (b + 0.5) / 2.0**53
    assert int(threshold(at)) == b and int(threshold(above)) == b + 1
    assert keep_mask((i + 1,), seed, at)[i]
    assert not keep_mask((i + 1,), seed, above)[i]


def test_dropout_rate_and_scale(rng):
    y = Dropout(0.2).forward(np.ones(100_000), rng)
    assert (y == 0).mean() == pytest.approx(0.2, abs=0.01) and set(np.unique(y)) == {0.0, 1.25}


def test_char_lm_trains_with_dropout_and_validates_on_the_held_out_text(textfile, monkeypatch):
    """Training windows come from the train split with dropout active; evaluation reads the
    validation split without dropout; bits per char = nats / ln 2."""
    calls = {"batch": [], "dropout": []}
    real_batch, real_drop = Corpus.batch, Dropout.forward

    def batch(self, rng, split, *a):
        calls["batch"].append(split)
        return real_batch(self, rng, split, *a)

    def drop(self, x, rng):
        calls["dropout"].append(rng is not None)
        return real_drop(self, x, rng)
    monkeypatch.setattr(Corpus, "batch", batch)
    monkeypatch.setattr(Dropout, "forward", drop)
    tr = make_trainer(TrainConfig(model="stacked", task="char-lm", data=str(textfile), hidden=4, layers=1,
                                  seq_len=8, batch=2, steps=1, dropout=0.5))
    m = tr.train_step()
    assert calls["batch"][0] == "train" and set(calls["batch"][1:]) == {"val"}
    n_drop = len(tr.model.drops)
    assert calls["dropout"][:n_drop] == [True] * n_drop and not any(calls["dropout"][n_drop:])
    assert m["bpc"] == pytest.approx(m["loss"] / np.log(2), rel=1e-12)
    ev = tr.evaluate(batches=2)
    assert ev["val_bpc"] == pytest.approx(ev["val_loss"] / np.log(2), rel=1e-12)


def test_cli_seeds_reach_sample_and_evaluate_and_tie_depth_is_the_default(tmp_path, textfile):
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(main, ["train", "--task", "char-lm", "--model", "grid", "--data", str(textfile),
                               "--hidden", "4", "--layers", "2", "--seq-len", "8", "--batch", "2",
                               "--steps", "2", "--out", str(run)])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["config"]["tie_depth"] is True

    def out(*args):
        r = runner.invoke(main, list(args))
        assert r.exit_code == 0, r.output
        return r.output
    sample = ["sample", str(run), "--length", "60", "--temperature", "3"]
    assert out(*sample, "--seed", "1") == out(*sample, "--seed", "1") != out(*sample, "--seed", "2")
    assert out("evaluate", str(run), "--seed", "1") == out("evaluate", str(run), "--seed", "1") \
        != out("evaluate", str(run), "--seed", "2")


def test_the_last_step_logs_a_fresh_validation(tmp_path, textfile):
    """Validation runs every EVAL_EVERY steps and at the last: the log's last val_loss is the
    trained model's, not one left from an earlier step."""
    tr = make_trainer(TrainConfig(model="stacked", task="char-lm", data=str(textfile), hidden=4, seq_len=8,
                                  batch=2, steps=3), tmp_path)
    assert tr.cfg.steps % tr.EVAL_EVERY
    tr.run()
    rows = [line.split("\t") for line in (tmp_path / "log.tsv").read_text().splitlines()]
    last = dict(zip(rows[0], rows[-1]))
    fresh = tr.evaluate(batches=tr.EVAL_BATCHES)["val_loss"]
    assert float(last["val_loss"]) == pytest.approx(fresh, rel=1e-5)
    assert tr.evaluate(batches=2, save=True) == tr.evaluate(batches=2)  # the run's own: saving forward


def test_a_steps_time_leaves_its_validation_out(textfile, monkeypatch):
    """The rows that validate logged a third of the real chars/s: their time counted it."""
    import time
    tr = make_trainer(TrainConfig(model="stacked", task="char-lm", data=str(textfile), hidden=4, seq_len=8,
                                  batch=2, steps=2))
    tr.train_step()  # compiles; step 2, the last, validates
    monkeypatch.setattr(tr, "evaluate", lambda **kw: (time.sleep(1.0), {"val_loss": 1.0, "val_bpc": 1.0})[1])
    m = tr.train_step()
    assert m["val_loss"] == 1.0 and m["time"] < 1.0 and m["chars_per_s"] == pytest.approx(16 / m["time"])
    with pytest.raises(ValueError, match="batches must be"):
        type(tr).evaluate(tr, batches=0)
    with pytest.raises(ValueError, match="--size does not apply to a char-lm run"):  # was ignored
        type(tr).evaluate(tr, size=16)


def test_a_run_extended_by_resume_logs_what_one_run_would(tmp_path, textfile, monkeypatch):
    """The last row's fresh validation is not carried on: 5 steps, resumed to 9, log the
    validation columns of 9 steps in one run (evaluations at steps 1, 4, 8), but for the row
    of step 5, where the first run ended."""
    from mdnumba.train import Trainer
    from mdnumba.train_charlm import CharLMTrainer
    monkeypatch.setattr(CharLMTrainer, "EVAL_EVERY", 4)
    cfg = dict(model="stacked", task="char-lm", data=str(textfile), hidden=4, seq_len=8, batch=2)

    def val_columns(run):
        rows = [line.split("\t") for line in (run / "log.tsv").read_text().splitlines()]
        return [[r[0]] + [v for name, v in zip(rows[0], r) if name.startswith("val")] for r in rows]
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    make_trainer(TrainConfig(**cfg, steps=9), tmp_path / "one").run()
    make_trainer(TrainConfig(**cfg, steps=5), tmp_path / "two").run()
    Trainer.load(tmp_path / "two", steps=9).run()
    one, two = val_columns(tmp_path / "one"), val_columns(tmp_path / "two")
    assert [r[0] for r in two] == [r[0] for r in one] and two[5] != one[5]
    assert two[:5] + two[6:] == one[:5] + one[6:]


def test_a_split_one_longer_than_the_window_gives_that_window():
    corpus = Corpus.from_text("abcdefghij" * 10)
    n = len(corpus.val) - 1
    corpus.check_seq_len(n)
    x, y = corpus.batch(np.random.default_rng(0), "val", 2, n)
    assert (x == corpus.val[None, :-1]).all() and (y == corpus.val[None, 1:]).all()


@pytest.mark.parametrize("kind,tied", [("grid", True), ("grid", False), ("stacked", True)])
def test_char_lm_forward_without_saving(kind, tied, rng):
    """``CharLM.forward(ids, save=False)`` (evaluation, sampling) gives the logits of
    ``forward(ids)`` bit for bit and keeps no activations: backward is then refused."""
    model = CharLM(kind, vocab=7, hidden=4, layers=2, seed=3, dtype=np.float64, tied=tied)
    ids = rng.integers(0, 7, (3, 6))
    logits = model.forward(ids)
    np.testing.assert_array_equal(model.forward(ids, save=False), logits)
    assert all(core.saved_bytes() == 0 for core in model._cores())
    with pytest.raises(RuntimeError, match="save=False"):
        model.backward(np.ones_like(logits))


def test_a_forward_that_failed_after_the_embedding_refuses_backward():
    """The embedding and core ran on the new ids, the head refused (NaN weights set by hand): the
    model holds two forwards' activations, so backward is refused before adding a gradient."""
    model = CharLM("grid", vocab=5, hidden=3, layers=2, dtype=np.float64)
    ids = np.array([[0, 1, 2, 3]])
    dlogits = np.ones(model.forward(ids).shape)
    w = model.head.params.W.copy()
    model.head.params.W[0, 0] = np.nan
    with pytest.raises(ValueError, match="weights W hold NaN"):
        model.forward(np.array([[4, 3, 2, 1]]))
    model.head.params.W = w
    with pytest.raises(RuntimeError, match=r"failed partway \(at stage 1\)"):
        model.backward(dlogits)
    assert not any(layer.grads.data.any() for layer in model.layers)
    with pytest.raises(ValueError):
        model.forward(np.array([[9]]))  # refused by the embedding's check: that changes nothing
    model.forward(ids)
    model.backward(dlogits)
    assert all(layer.grads.data.any() for layer in model.layers)


@pytest.mark.parametrize("restore,what", [
    ({"vocab": 5}, "its vocabulary is not a list of distinct characters"),
    ({"vocab": ["a", "a"]}, "its vocabulary"), ({"vocab": ["ab"]}, "its vocabulary"),
    ({"vocab": []}, "its vocabulary"),
    ({"vocab": ["a"], "val": "abc"}, "its validation metrics are not val_loss and val_bpc as finite numbers"),
    ({"vocab": ["a"], "val": {"val_loss": "x", "val_bpc": 1.0}}, "its validation metrics"),
    ({"vocab": ["a"], "val": {"val_loss": 1.0}}, "its validation metrics")])
def test_a_damaged_char_lm_checkpoint_state_is_refused_before_training(tmp_path, restore, what):
    """A vocabulary or validation metrics edited in a checkpoint: a CheckpointError before the
    trainer is built (a TypeError; or the run started and failed at its first log line)."""
    from mdnumba.checkpoint import CheckpointError
    cfg = TrainConfig(task="char-lm", model="grid", data=str(tmp_path / "absent.txt"))
    with pytest.raises(CheckpointError, match=f"checkpoint in {tmp_path} is damaged: {what}"):
        make_trainer(cfg, tmp_path, restore=restore)


def test_softmax_xent_is_the_mean_over_every_character():
    """L is the mean of −log p(target) over every (sequence, step): nats per character, which
    bpc divides by ln 2; not a sum over each sequence's steps (the gradient check holds either way)."""
    logits = np.random.default_rng(0).standard_normal((2, 3, 4))
    t = np.array([[0, 1, 2], [3, 0, 1]])
    loss, _, _ = softmax_xent(logits, t)
    log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    assert loss == pytest.approx(-np.mean(np.take_along_axis(log_p, t[..., None], -1)), rel=1e-12)


def test_batches_start_at_every_window_of_the_split():
    """The windows' starts cover the training split, the last window (ending at its last
    character) too."""
    import string
    corpus = Corpus.from_text(string.ascii_letters)  # every character once: an id gives its place
    place = {int(c): k for k, c in enumerate(corpus.train)}
    rng, starts = np.random.default_rng(0), set()
    for _ in range(40):
        x, _ = corpus.batch(rng, "train", 16, 5)
        starts.update(place[int(c)] for c in x[:, 0])
    assert starts == set(range(len(corpus.train) - 5))
