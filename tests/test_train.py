"""The training loop: Ctrl-C between steps, curriculum extension, non-finite losses, checkpoint configs."""

import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import warnings

import numpy as np
import pytest

import mdnumba.memory as memory
from mdnumba.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mdnumba.train import EVAL_STREAM, TrainConfig, Trainer, make_trainer, run_stream

KW = dict(size=5, batch=3, hidden=3, seed=1)


def assert_same_run(a: Trainer, b: Trainer) -> None:
    assert a.step == b.step and a.rng.bit_generator.state == b.rng.bit_generator.state
    for pa, pb in zip(a._host_params(), b._host_params()):
        np.testing.assert_array_equal(pa, pb)
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    assert sa["t"] == sb["t"]
    for ma, mb in zip(sa["m"] + sa["v"], sb["m"] + sb["v"]):
        np.testing.assert_array_equal(ma, mb)


def interrupt_at(monkeypatch, call: int, times: int = 1, sig=signal.SIGINT) -> None:
    """Press Ctrl-C (a real SIGINT, or send ``sig``) ``times`` times inside train step number
    ``call``, after its forward pass."""
    real, count = Trainer.train_step, {"n": 0}

    def step(self):
        count["n"] += 1
        if count["n"] == call:
            self.model.forward(self.sample_batch(np.random.default_rng(0), 5).x)
            for _ in range(times):
                signal.raise_signal(sig)
        return real(self)
    monkeypatch.setattr(Trainer, "train_step", step)


def test_ctrl_c_finishes_the_step_and_saves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 3)
    tr = make_trainer(TrainConfig(steps=8, checkpoint_every=8, **KW), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    assert tr.step == 3 and tr.saved_step == 3
    assert len((tmp_path / "log.tsv").read_text().splitlines()) == 1 + 3
    monkeypatch.undo()
    clean = make_trainer(TrainConfig(steps=3, **KW))
    clean.run()
    assert_same_run(Trainer.load(tmp_path), clean)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@contextlib.contextmanager
def ignoring(sig):
    """``sig`` ignored inside (as a shell script's background job starts with SIGINT)."""
    before = signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(sig, before)


def test_with_sigint_ignored_the_message_names_the_signal_that_stops(tmp_path, monkeypatch, capfd):
    with ignoring(signal.SIGINT):
        interrupt_at(monkeypatch, 2, sig=signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            make_trainer(TrainConfig(steps=5, checkpoint_every=5, **KW), tmp_path).run()
    assert "(SIGTERM again stops at once without saving)" in capfd.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ignored_at_the_start_stays_ignored(tmp_path, monkeypatch, sig):
    """A background job of a shell script starts with SIGINT ignored: the run neither stops
    nor saves early on it, and leaves it ignored."""
    with ignoring(sig):
        interrupt_at(monkeypatch, 3, sig=sig)
        tr = make_trainer(TrainConfig(steps=5, checkpoint_every=5, **KW), tmp_path)
        tr.run()
        assert tr.step == 5 and tr.saved_step == 5
        assert signal.getsignal(sig) is signal.SIG_IGN


def test_sigterm_saves_like_ctrl_c(tmp_path, monkeypatch, capfd):
    """kill / timeout / a scheduler ending the job: the step finishes and a checkpoint is saved."""
    before = signal.getsignal(signal.SIGTERM)
    interrupt_at(monkeypatch, 3, sig=signal.SIGTERM)
    tr = make_trainer(TrainConfig(steps=8, checkpoint_every=8, **KW), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    assert tr.step == 3 and tr.saved_step == 3
    assert "SIGTERM: finishing this step, then saving a checkpoint" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


class _BrokenPipe:
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("stderr", [_BrokenPipe(), None])
def test_ctrl_c_saves_when_stderr_is_gone(tmp_path, monkeypatch, stderr):
    """`mdnumba train 2>&1 | tee log`: Ctrl-C stops tee too, and the handler's message then
    meets a broken pipe (or there is no stderr: pythonw); the step must still finish and be
    saved."""
    interrupt_at(monkeypatch, 3)
    monkeypatch.setattr(sys, "stderr", stderr)
    tr = make_trainer(TrainConfig(steps=8, checkpoint_every=8, **KW), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    assert tr.step == 3 and tr.saved_step == 3


def test_a_config_takes_the_forms_python_callers_give(tmp_path):
    """A list or array of curriculum sizes, a Path, a NumPy dtype and a NumPy bool are the
    settings they stand for (the type checks of hand-edited checkpoints must not refuse them)."""
    cfg = TrainConfig(size=8, curriculum=[4], dtype=np.dtype("float64"))
    cfg.validate()
    assert cfg.curriculum == (4,) and cfg.dtype == "float64"
    assert TrainConfig(size=8, curriculum=np.array([4]), dtype=np.float32).dtype == "float32"
    lm = TrainConfig(task="char-lm", model="grid", data=tmp_path / "t.txt", tie_depth=np.bool_(False))
    lm.validate()
    assert lm.data == str(tmp_path / "t.txt") and lm.tie_depth is False


def test_a_config_refuses_settings_its_run_would_ignore():
    """The CLI refused them as given; in Python they were ignored without a word. A GPU run's
    sync_every stays allowed on the CPU (a resumed run keeps it)."""
    for kw, said in ((dict(dropout=0.3), "dropout=0.3 (char-lm only)"),
                     (dict(tie_depth=False), "tie_depth=False (char-lm --model grid only)"),
                     (dict(task="char-lm", model="stacked", data="t.txt", cell="stable", tie_depth=False),
                      "cell='stable' (not for char-lm), tie_depth=False (char-lm --model grid only)")):
        with pytest.raises(ValueError, match=rf"^not used by this run, leave at their defaults: "
                                             rf"{re.escape(said)}$"):
            TrainConfig(**kw).validate()
    TrainConfig(sync_every=10).validate()
    cfg = TrainConfig(dropout=0.3, tie_depth=False, lr=0.5).without_ignored()  # an older checkpoint's
    assert (cfg.dropout, cfg.tie_depth, cfg.lr) == (0.0, True, 0.5) and not cfg.ignored()


@pytest.mark.parametrize("model,said", [
    ("foo", "model 'foo' is no model of any task; for task 'diagonal' use --model md / horizontal / snake"),
    ("lstm", "model 'lstm' does not fit task 'diagonal'; use --model md / horizontal / snake, or --task "
             "binary-addition, which takes 'lstm'")])
def test_a_model_of_no_task_is_named_so(model, said):
    """A name no task has (only the CLI's choices refused it) said it "does not fit" the task."""
    with pytest.raises(ValueError, match=f"^{re.escape(said)}$"):
        TrainConfig(model=model).validate()


@pytest.mark.parametrize("files,held", [
    (("checkpoint.npz", "config.json", "log.tsv"), "already holds a run; continue it with Trainer.load("
                                                   "'{}')"),
    (("config.json",), "holds config.json, which the run would write over; choose another output folder"),
    (("log.tsv",), "holds log.tsv, which the run would write over")])
def test_a_new_trainer_never_writes_over_the_files_of_another_run(tmp_path, files, held):
    """The CLI refuses without --overwrite; the Python API refuses too, before its first step,
    and says how to continue the run instead (where there is a checkpoint to continue from);
    nothing in the folder changes."""
    make_trainer(TrainConfig(steps=2, **KW), tmp_path).run()
    for name in {"checkpoint.npz", "config.json", "log.tsv"} - set(files):
        (tmp_path / name).unlink()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = make_trainer(TrainConfig(steps=3, **dict(KW, hidden=2)), tmp_path)
    for write in (other.run, other.save):
        with pytest.raises(FileExistsError, match="^" + re.escape(f"{tmp_path} {held.format(tmp_path)}")):
            write()
    assert other.step == 0 and {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    if "checkpoint.npz" in files:
        Trainer.load(tmp_path, steps=3).run()  # the run itself continues
        steps = [r.split("\t")[0] for r in (tmp_path / "log.tsv").read_text().splitlines()[1:]]
        assert steps == ["1", "2", "3"]


def test_a_trainer_makes_its_output_folder(tmp_path):
    """``make_trainer(cfg, out=DIR)`` makes a DIR that does not exist (with its parents), as the CLI
    does, for run() and for save(); a DIR that is a file is refused, saying so."""
    make_trainer(TrainConfig(steps=2, **KW), str(tmp_path / "runs" / "a")).run()
    assert (tmp_path / "runs" / "a" / "checkpoint.npz").is_file()
    make_trainer(TrainConfig(steps=2, **KW), tmp_path / "b" / "c").save()
    assert (tmp_path / "b" / "c" / "checkpoint.npz").is_file()
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError, match="output folder .*f is a file; give a folder"):
        make_trainer(TrainConfig(steps=2, **KW), tmp_path / "f").run()


def test_load_overrides_only_what_a_resume_may_change(tmp_path):
    """``Trainer.load(folder, **overrides)`` as ``train --resume``: another setting (e.g. hidden,
    which the checkpoint's weights would then be blamed for not matching, or dtype, silently
    changed) is refused before anything is read; steps not beyond the run's step (a run() that
    would do nothing) too; a file given for the run folder is named as such."""
    make_trainer(TrainConfig(steps=3, **KW), tmp_path).run()
    for bad, named in (({"hidden": 4}, "hidden"), ({"dtype": "float64", "cell": "stable"}, "cell, dtype"),
                       ({"model": "md3d", "steps": 9}, "model")):
        for folder in (tmp_path, tmp_path / "no run here"):  # refused before the checkpoint is read
            with pytest.raises(TypeError, match=f"may override only steps, device, .* got {named}: a run's "
                                                "other settings are its checkpoint's"):
                Trainer.load(folder, **bad)
    for steps in (2, 3):
        with pytest.raises(ValueError, match="is at step 3; --steps must be > 3 to continue it"):
            Trainer.load(tmp_path, steps=steps)
    with pytest.raises(ValueError, match="^--lr must be a finite number > 0, got -1"):  # its own error first
        Trainer.load(tmp_path, steps=2, lr=-1.0)
    assert Trainer.load(tmp_path, steps=4).cfg.steps == 4 and Trainer.load(tmp_path).step == 3
    # the step size may change (continuing a diverged run's kept checkpoint more gently); None: unchanged
    gentler = Trainer.load(tmp_path, steps=5, lr=1e-3, clip_norm=1.0, hidden=None)
    assert (gentler.cfg.lr, gentler.cfg.clip_norm, gentler.cfg.hidden) == (1e-3, 1.0, KW["hidden"])
    assert (gentler.opt.lr, gentler.opt.clip_norm) == (1e-3, 1.0)  # the optimiser's, not only the config's
    gentler.run()
    assert Trainer.load(tmp_path).cfg.lr == 1e-3
    with pytest.raises(CheckpointError, match=r"checkpoint.npz is a file; give the run's folder \(the one "):
        Trainer.load(tmp_path / "checkpoint.npz")


def test_resume_drops_log_rows_cut_short(tmp_path):
    """A crash can leave a last row without its newline: resume keeps whole rows only, so the
    log holds each step once and still plots, and says nothing (it is what a crash leaves)."""
    from mdnumba.plotting import read_log
    make_trainer(TrainConfig(steps=4, **KW), tmp_path).run()
    log = tmp_path / "log.tsv"
    log.write_text(log.read_text() + "5\t0.1")  # a row cut short (no newline)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        Trainer.load(tmp_path, steps=6).run()
    assert [r.split("\t")[0] for r in log.read_text().splitlines()[1:]] == ["1", "2", "3", "4", "5", "6"]
    np.testing.assert_array_equal(read_log(log)["step"], np.arange(1, 7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz", "config.json", "log.tsv"]


@pytest.mark.parametrize("edit,what", [
    (lambda text: text.replace("\n2\t", "\nnot a row\n2\t"), "1 unreadable row"),
    (lambda text: text.replace("\n3\t", "\n3\t0.5\n3\t"), "1 unreadable row"),  # too few fields
    (lambda text: text.replace("\n2\t", "\n\u00b2\t"), "1 unreadable row"),  # a digit, not a decimal
    (lambda text: "step\tloss\n" + text.split("\n", 1)[1], "another header"),
])
def test_resume_keeps_a_log_it_cannot_read_and_says_so(tmp_path, edit, what):
    """A log edited, or from another run: its readable rows continue, the old file is kept aside."""
    make_trainer(TrainConfig(steps=4, **KW), tmp_path).run()
    log = tmp_path / "log.tsv"
    old = edit(log.read_text())
    log.write_text(old)
    with pytest.warns(UserWarning, match=f"log.tsv had {what}: .* kept as log.unreadable-"):
        Trainer.load(tmp_path, steps=5).run()
    [spare] = tmp_path.glob("log.unreadable-*.tsv")
    assert spare.read_text() == old
    assert log.read_text().splitlines()[-1].split("\t")[0] == "5"


def test_resume_without_its_log_says_where_the_log_restarts(tmp_path):
    make_trainer(TrainConfig(steps=4, **KW), tmp_path).run()
    (tmp_path / "log.tsv").unlink()
    with pytest.warns(UserWarning, match="log.tsv is missing or empty: the log restarts at step 5"):
        Trainer.load(tmp_path, steps=5).run()


def test_a_log_that_ends_before_the_checkpoint_says_which_steps_it_lacks(tmp_path):
    """A checkpoint of a later step beside a run's log (files of two runs of the same settings):
    the rows between went missing without a word."""
    for run, steps in (("a", 4), ("b", 6)):
        (tmp_path / run).mkdir()
        make_trainer(TrainConfig(steps=steps, **KW), tmp_path / run).run()
    (tmp_path / "a" / "checkpoint.npz").write_bytes((tmp_path / "b" / "checkpoint.npz").read_bytes())
    with pytest.warns(UserWarning, match="log.tsv ends at step 4, the checkpoint is of step 6: steps 5 "
                                         "to 6 have no rows"):
        Trainer.load(tmp_path / "a", steps=7).run()


def test_a_trainer_whose_checkpoint_another_one_replaced_refuses_to_write_over_it(tmp_path):
    """A trainer loaded before another one trained the run further wrote its older run over the
    newer checkpoint and cut the log back to its own steps, without a word."""
    from mdnumba.checkpoint import CheckpointChangedError
    make_trainer(TrainConfig(steps=3, **KW), tmp_path).run()
    stale = Trainer.load(tmp_path, steps=6)
    Trainer.load(tmp_path, steps=8).run()
    newer = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    said = rf"^{re.escape(str(tmp_path))} now holds another checkpoint than the one this trainer loaded"
    for call in (stale.run, stale.save):
        with pytest.raises(CheckpointChangedError, match=said):
            call()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == newer
    again = Trainer.load(tmp_path, steps=9)
    again.run()  # its own saves do not count
    assert again.step == 9 and Trainer.load(tmp_path).step == 9


def test_a_loaded_run_whose_log_or_config_is_a_folder_is_refused_before_training(tmp_path):
    """The CLI refused it; Trainer.load(...).run() trained, rewrote the checkpoint, then raised
    IsADirectoryError's traceback."""
    make_trainer(TrainConfig(steps=2, **KW), tmp_path).run()
    before = (tmp_path / "checkpoint.npz").read_bytes()
    for name in ("log.tsv", "config.json"):
        (tmp_path / name).rename(tmp_path / "kept")
        (tmp_path / name).mkdir()
        with pytest.raises(IsADirectoryError, match=f"{name} is a folder, where the run writes its {name}"):
            Trainer.load(tmp_path, steps=4).run()
        assert (tmp_path / "checkpoint.npz").read_bytes() == before
        (tmp_path / name).rmdir()
        (tmp_path / "kept").rename(tmp_path / name)
    tr = make_trainer(TrainConfig(steps=2, **KW))
    said = r"^size must be an integer, got|^--size \(image side\) must be >= 4, got 0"
    for size in (4.5, "8", 0):
        with pytest.raises((TypeError, ValueError), match=said):
            tr.evaluate(size, batches=1)


def test_numpy_numbers_in_a_config_are_saved_as_python_ones(tmp_path):
    """np.float32/np.int64/np.bool_ settings (from np.arange, a parameter grid) passed validate()
    and trained, then the checkpoint's JSON failed at the first save, leaving a log that blocked
    a second try."""
    cfg = TrainConfig(**dict(KW, size=np.int64(5), lr=np.float32(0.01), curriculum=np.array([4]),
                             steps=np.int64(4), tie_depth=np.bool_(True)))
    assert type(cfg.size) is int and type(cfg.lr) is float and cfg.curriculum == (4,)
    assert type(cfg.curriculum[0]) is int and type(cfg.tie_depth) is bool
    make_trainer(cfg, tmp_path).run()
    assert Trainer.load(tmp_path).cfg == cfg


@pytest.mark.parametrize("every,kept", [(1, True), (100, False)])
def test_an_update_that_overflows_the_weights_is_not_saved(tmp_path, every, kept):
    """Finite gradients times lr 1e38 overflow float32 weights: a checkpoint of them could not be
    loaded. The optimiser refuses that update (the device trainer's runs on: it stops at the
    step's checkpoint or the next forward); the run stops at that step, and the checkpoint kept loads.
    The advice is the learning rate's and the clipping's: no cell bounds an update."""
    tr = make_trainer(TrainConfig(steps=20, lr=1e38, checkpoint_every=every, **KW), tmp_path)
    with pytest.raises(FloatingPointError, match=r"^the weights or moments would become NaN or infinite at "
                                                 r"step \d+") as err:
        tr.run()
    assert all(np.isfinite(p).all() for p in tr._host_params())  # refused before it was written
    step = int(re.match(r"\D*(\d+)", str(err.value)).group(1))
    assert step < 20 and (f"(the checkpoint of step {step - 1} is kept)" in str(err.value)) == kept
    assert str(err.value).endswith("; lower --lr or set --clip-norm")  # not the graves cell's --cell stable
    if kept:
        assert Trainer.load(tmp_path).step == step - 1


def test_a_checkpoint_copied_from_another_run_is_refused(tmp_path):
    """checkpoint.npz and config.json of different runs: refused, naming the settings that
    differ; without config.json the checkpoint loads as it is. A config.json other in the
    settings a resume may change (a crash between the two writes) is no conflict."""
    for run in "ab":
        (tmp_path / run).mkdir()
    make_trainer(TrainConfig(steps=1, **KW), tmp_path / "a").run()
    make_trainer(TrainConfig(steps=1, **dict(KW, hidden=2, cell="stable")), tmp_path / "b").run()
    (tmp_path / "b" / "checkpoint.npz").write_bytes((tmp_path / "a" / "checkpoint.npz").read_bytes())
    with pytest.raises(CheckpointError, match=r"belong to different runs \(cell: 'graves' in checkpoint.npz, "
                       r"'stable' in config.json; hidden: 3 in checkpoint.npz, 2 in config.json\).*delete "
                       r"config.json and log.tsv"):
        Trainer.load(tmp_path / "b")
    copy = tmp_path / "a" / "config.json"
    own = copy.read_text()
    for key, value in (("seed", 7), ("batch", 2), ("dtype", "float64"), ("optimizer", "rmsprop")):
        meta = json.loads(own)  # each setting that makes a run another is compared, not only some
        meta["config"][key] = value
        copy.write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match=rf"belong to different runs \({key}: "):
            Trainer.load(tmp_path / "a")
    copy.write_text(own)
    for unreadable in ('{"config": [1]}', "{", ""):  # ignored: the next save rewrites it
        (tmp_path / "b" / "config.json").write_text(unreadable)
        assert Trainer.load(tmp_path / "b").cfg.hidden == 3
    (tmp_path / "b" / "config.json").unlink()
    assert Trainer.load(tmp_path / "b").cfg.hidden == 3
    copy = tmp_path / "a" / "config.json"
    copy.write_text(copy.read_text().replace('"steps": 1', '"steps": 7'))
    assert Trainer.load(tmp_path / "a").cfg.steps == 1


def test_second_ctrl_c_stops_inside_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 6, times=2)
    tr = make_trainer(TrainConfig(steps=8, checkpoint_every=2, **KW), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    assert tr.step == 5 and tr.saved_step == 4
    monkeypatch.undo()
    clean = make_trainer(TrainConfig(steps=4, **KW))
    clean.run()
    assert_same_run(Trainer.load(tmp_path), clean)


def test_extending_a_curriculum_run_trains_the_extension_at_full_size(tmp_path):
    cfg = TrainConfig(steps=4, curriculum=(4,), **KW)
    assert [cfg.size_at(s) for s in range(4)] == [4, 4, 5, 5]
    make_trainer(cfg, tmp_path).run()
    tr = Trainer.load(tmp_path, steps=10)
    assert tr.cfg.curriculum_steps == 4
    assert [tr.cfg.size_at(s) for s in range(10)] == [4, 4] + [5] * 8
    tr.run()
    again = Trainer.load(tmp_path, steps=12)  # a second extension keeps the original phases
    assert again.cfg.curriculum_steps == 4 and again.cfg.size_at(3) == 5


def test_sync_every_is_inapplicable_where_nothing_reads_it():
    """Only the device trainers sync in blocks (every model and task on cuda)."""
    def why(**kw):
        return TrainConfig(**kw).inapplicable(["sync_every"]).get("sync_every")
    assert why() == "--device cuda only" and why(device="cuda") is None
    for model, tied in (("stacked", True), ("grid", True), ("grid", False)):
        assert why(task="char-lm", model=model, device="cuda", tie_depth=tied) is None


def test_a_resume_cannot_end_a_run_inside_its_curriculum(tmp_path):
    """--steps below the phases' span would train every step at a curriculum size and report
    the final evaluation at --size, which the run never saw."""
    cfg = TrainConfig(steps=40, curriculum=(4,), **KW)
    tr = make_trainer(cfg, tmp_path)
    tr.train_step()
    tr.save()
    match = r"--steps 30 would end the run in .* inside its curriculum, whose phases span 40 steps \(it "
    with pytest.raises(ValueError, match=match + r"would never train at --size 5\); give --steps >= 40"):
        Trainer.load(tmp_path, steps=30)
    assert Trainer.load(tmp_path, steps=40).cfg.size_at(39) == 5


@pytest.mark.parametrize("layers,broken,what", [
    (1, -1, "loss"),  # the readout: logits NaN
    (1, 0, "activations"),  # the MD-LSTM: the readout's input NaN
    (2, 0, "activations"),  # the second MD-LSTM's input NaN
])
def test_a_diverging_model_stops_before_backward_with_advice(layers, broken, what, monkeypatch):
    import mdnumba.layers
    monkeypatch.setattr(mdnumba.layers, "check_finite_params", lambda params: None)
    monkeypatch.setattr(Trainer, "_weights_overflowed", lambda self, params=None: False)
    tr = make_trainer(TrainConfig(steps=5, layers=layers, **KW))
    tr.model.layers[broken].params.data[...] = np.nan  # stands in for a layer whose output diverged
    advice = r"use --cell stable \(bounded state on large grids\), use --dtype float64 \(a wider range\)"
    with pytest.raises(FloatingPointError, match=f"the {what} became NaN or infinite at step 1, before "
                                                 f"any update; {advice} or give a smaller --size$"):
        tr.run()


def test_an_overflowing_cell_state_stops_the_run_at_backward_with_advice():
    """Forget gates summing to ~2 double the graves state per diagonal: at 72x72 it overflows
    float32 while h = o·tanh(c) stays finite; backward refuses (its gradients would be NaN)."""
    tr = make_trainer(TrainConfig(steps=3, size=72, batch=1, hidden=2, seed=1))
    layer = tr.model.layers[0]
    layer.params.U = 0.0
    layer.params.b[2:6] = 10.0  # f_up, f_left ≈ 1
    with pytest.raises(FloatingPointError, match=r"^the cell state became NaN or infinite at step 1, "
                                                 r"before any update; use --cell stable"):
        tr.run()


def test_gradients_that_overflow_in_backward_stop_the_run_with_advice():
    """A loss gradient too large for float32 once backward has summed it: the layer's refusal
    (NonFiniteGradientError, a NonFiniteError) is the gradients', not the cell state's."""
    tr = make_trainer(TrainConfig(steps=3, **KW))
    loss_fn = tr.loss_fn

    def huge(logits, y):
        loss, dlogits, prob = loss_fn(logits, y)
        return loss, np.full_like(dlogits, np.finfo(np.float32).max), prob
    tr.loss_fn = huge
    with pytest.raises(FloatingPointError, match=r"^the gradients became NaN or infinite at step 1, "
                                                 r"before any update; use --cell stable \("):
        tr.run()


def test_non_finite_gradients_name_the_step_the_kept_checkpoint_and_unused_remedies(tmp_path):
    tr = make_trainer(TrainConfig(steps=6, checkpoint_every=2, clip_norm=1.0, cell="stable", **KW), tmp_path)
    real = tr.model.backward

    def backward(*args, **kw):  # NaN gradients from step 3 on
        real(*args, **kw)
        if tr.step >= 2:
            tr.model.layers[0].grads.data[0] = np.nan
    tr.model.backward = backward
    with pytest.raises(FloatingPointError, match=r"^the gradients became NaN or infinite at step 3 "
                                                 r"\(the checkpoint of step 2 is kept\); lower --lr$"):
        tr.run()


def test_a_missing_checkpoint_says_what_to_train_and_pickles_whole(tmp_path):
    """The error names the folder and the command to train there (another one on request, as
    ``mdnumba sample`` asks a char-lm run), and survives a trip between processes."""
    import pickle

    from mdnumba.checkpoint import MissingCheckpointError
    with pytest.raises(MissingCheckpointError) as err:
        load_checkpoint(tmp_path)
    assert err.value.folder == tmp_path and str(err.value) == (
        f"no checkpoint at {tmp_path / 'checkpoint.npz'}; train first with `mdnumba train --out {tmp_path}`")
    again = pickle.loads(pickle.dumps(err.value.suggesting("mdnumba train --task char-lm")))
    assert isinstance(again, MissingCheckpointError) and again.folder == tmp_path
    assert str(again).endswith(f"train first with `mdnumba train --task char-lm --out {tmp_path}`")


def test_save_refuses_non_finite_weights_and_keeps_the_last_checkpoint(tmp_path):
    """The device trainer's update is not refused as the CPU optimiser's is: the save's own check
    keeps the last good checkpoint (one of infinite weights would load as damaged)."""
    tr = make_trainer(TrainConfig(steps=2, **KW), tmp_path)
    tr.run()
    good = (tmp_path / "checkpoint.npz").read_bytes()
    tr.model.layers[0].params.data[0] = np.inf  # what an overflowing device update leaves
    with pytest.raises(FloatingPointError, match=r"^the weights became NaN or infinite at step 2 "
                                                 r"\(the checkpoint of step 2 is kept\)"):
        tr.save()
    assert (tmp_path / "checkpoint.npz").read_bytes() == good and Trainer.load(tmp_path).step == 2


def test_a_resumed_run_knows_its_checkpoint_is_kept(tmp_path, monkeypatch):
    """After --resume, divergence at the first new step names the loaded checkpoint as kept."""
    make_trainer(TrainConfig(steps=2, **KW), tmp_path).run()
    tr = Trainer.load(tmp_path, steps=4)
    assert tr.saved_step == tr.step == 2
    monkeypatch.setattr(Trainer, "_weights_overflowed", lambda self, params=None: False)
    tr.model.layers[0].params.data[...] = np.nan  # stands in for activations that overflow
    with pytest.raises(FloatingPointError, match=r"at step 3 \(the checkpoint of step 2 is kept\)"):
        tr.run()


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(hidden=-5), "invalid config.*--hidden must be >= 1"),
    (lambda c: c.update(colour="red"), r"does not know \(\['colour'\]\)"),
    (lambda c: c.update(size="big"), "invalid config"),
])
def test_bad_checkpoint_configs_are_checkpoint_errors(tmp_path, edit, match):
    make_trainer(TrainConfig(steps=1, **KW), tmp_path).run()
    arrays, meta = load_checkpoint(tmp_path)
    edit(meta["config"])
    save_checkpoint(tmp_path, arrays, meta)
    with pytest.raises(CheckpointError, match=match):
        Trainer.load(tmp_path)


def test_evaluate_needs_a_batch():
    """batches=0 returned {} (no metrics), as if evaluated."""
    tr = make_trainer(TrainConfig(steps=1, **KW))
    for bad in (0, -3):
        with pytest.raises(ValueError, match="batches must be"):
            tr.evaluate(batches=bad)


def test_the_seed_chooses_the_data_and_evaluate_has_its_own():
    """Different seeds train on different batches; evaluate draws from its own RNG (the same
    numbers every call, the training stream untouched) at the size it is given."""
    def first_batch(seed):
        tr = make_trainer(TrainConfig(**dict(KW, seed=seed)))
        return tr.sample_batch(tr.rng, 5).x
    np.testing.assert_array_equal(first_batch(1), first_batch(1))
    assert not np.array_equal(first_batch(1), first_batch(2))
    tr = make_trainer(TrainConfig(**KW))
    state = tr.rng.bit_generator.state
    assert tr.evaluate(batches=2) == tr.evaluate(batches=2)
    assert tr.rng.bit_generator.state == state
    assert tr.evaluate(size=9, batches=2) != tr.evaluate(batches=2)
    assert tr.evaluate(batches=2, save=True) == tr.evaluate(batches=2)  # train's closing one


def test_binary_addition_trains_on_every_length_up_to_size():
    tr = make_trainer(TrainConfig(model="lstm", task="binary-addition", size=4, batch=2, hidden=2))
    assert {tr.sample_batch(tr.rng, 4).x.shape[1] for _ in range(200)} == {2, 3, 4, 5}  # bits + carry


def test_checkpoint_every_reaches_the_trainer(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from mdnumba.cli.main import main
    saved = []
    real = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self: saved.append(self.step) or real(self))
    res = CliRunner().invoke(main, ["train", "--size", "5", "--batch", "2", "--hidden", "2", "--steps", "6",
                                    "--checkpoint-every", "4", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert saved == [4, 6]


def test_blocks_end_at_checkpoints_and_at_the_last_step(tmp_path, monkeypatch):
    """Blocks of ``sync_every`` steps (the device trainer's) are cut at every checkpoint (with
    an output folder) and at the last step; ``run`` passes each block the size of the next."""
    cfg = TrainConfig(size=4, batch=2, hidden=2, steps=10, checkpoint_every=4)
    blocks = []
    real = Trainer._train_block
    monkeypatch.setattr(Trainer, "sync_every", 3)
    monkeypatch.setattr(Trainer, "_train_block",
                        lambda self, n, ahead=0: blocks.append((n, ahead)) or real(self, n, ahead))
    make_trainer(cfg, tmp_path).run()
    assert blocks == [(3, 1), (1, 3), (3, 1), (1, 2), (2, 0)]  # checkpoints at 4, 8, 10
    blocks.clear()
    make_trainer(cfg).run()
    assert blocks == [(3, 3), (3, 3), (3, 1), (1, 0)]


def test_checkpoint_files_are_atomic_typed_and_get_the_umasks_mode(tmp_path):
    from mdnumba.checkpoint import CHECKPOINT, atomic_write_bytes
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(ZeroDivisionError):
        atomic_write_bytes(target, lambda fh: (fh.write(b"half"), 1 / 0))
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    for meta, said in (('{"format": "someone-else-1"}', "'someone-else-1'"), ('{"step": 1}', "None")):
        np.savez(tmp_path / CHECKPOINT, meta=np.array(meta))  # a foreign .npz, or one without a format
        with pytest.raises(CheckpointError, match=rf"not an mdnumba-checkpoint-1 file \(format={said}\)"):
            load_checkpoint(tmp_path)
    for content in (b"", b"hello", b"\x93NUMPY"):  # empty, text, a .npy's start: said so, not numpy's words
        (tmp_path / CHECKPOINT).write_bytes(content)
        with pytest.raises(CheckpointError, match=r"is corrupt or not a checkpoint \(not an \.npz archive\)"):
            load_checkpoint(tmp_path)
    old = os.umask(0o002)
    try:
        save_checkpoint(tmp_path, {"a": np.zeros(2)}, {"step": 1})
        # refused before writing: the good checkpoint stays (a "meta" array was overwritten by the
        # metadata; an object array was written, then unreadable without pickles)
        objects = np.array({"t": 1}, dtype=object)
        for arrays, exc, match in (({"meta": np.zeros(1)}, ValueError, "may not be named 'meta'"),
                                   ({"o": objects}, TypeError, "'o' holds Python objects")):
            with pytest.raises(exc, match=match):
                save_checkpoint(tmp_path, arrays, {"step": 2})
            assert load_checkpoint(tmp_path)[1]["step"] == 1
    finally:
        os.umask(old)
    assert (tmp_path / CHECKPOINT).stat().st_mode & 0o777 == 0o664


def test_an_atomic_write_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
    """The rename lives in the folder's entries: without the folder's fsync a power cut may undo
    it (the old file comes back, or none). A folder that cannot be synced is no error."""
    import stat

    from mdnumba.checkpoint import atomic_write_bytes
    synced, renamed, real_sync, real_replace = [], [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append((stat.S_ISDIR(os.fstat(fd).st_mode),
                                                                 os.fstat(fd).st_size)), real_sync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((os.path.dirname(a), str(b))),
                                                     real_replace(a, b)))
    atomic_write_bytes(tmp_path / "f.bin", lambda fh: fh.write(b"new"))
    assert (tmp_path / "f.bin").read_bytes() == b"new"
    assert [d for d, _ in synced] == [False, True] and synced[0][1] == 3  # flushed before the sync
    assert renamed == [(str(tmp_path), str(tmp_path / "f.bin"))]  # a temp file beside it: atomic

    def refuse(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
    monkeypatch.setattr(os, "fsync", refuse)
    atomic_write_bytes(tmp_path / "f.bin", lambda fh: fh.write(b"newer"))
    assert (tmp_path / "f.bin").read_bytes() == b"newer"


@pytest.mark.parametrize("kw", [dict(size=24, hidden=8), dict(model="md", directions=4, layers=2, size=8,
                                                              cell="stable", hidden=4),
                                dict(model="md3d", task="diagonal3d", size=6, hidden=4),
                                dict(size=24, hidden=8, layers=5),
                                dict(model="md", directions=4, layers=5, size=8, cell="stable", hidden=4)])
def test_step_memory_extrapolates_the_batch(kw):
    """The estimate from batch-1 and batch-2 probes (with 2 and 3 layers for a deeper stack)
    matches the traced first step (the one that allocates the workspace kept between steps;
    NumPy reports its allocations to tracemalloc) of a run at batch 12, and needs no curriculum
    to see the full size."""
    import tracemalloc

    from mdnumba.train import step_memory
    cfg = TrainConfig(batch=12, steps=4, curriculum=(4,) if kw["size"] > 4 else (), **kw)
    estimate = step_memory(cfg)  # also compiles
    tr = make_trainer(TrainConfig(batch=12, steps=4, **kw))
    tracemalloc.start()
    tr.train_step()
    real = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # within 10%: which caches earlier code filled moves both by a few percent
    assert real > 2**19 and abs(estimate - real) < 0.1 * real, (estimate, real)


@pytest.mark.parametrize("kw,size", [(dict(hidden=16, loss="bce"), 96),
                                     (dict(directions=4, layers=3, hidden=4), 64),
                                     (dict(model="md3d", task="diagonal3d", size=4, hidden=4), 20),
                                     (dict(model="lstm", task="binary-addition", size=6, hidden=8), 20000)])
def test_the_evaluation_memory_estimate_covers_its_peak(kw, size):
    """``mdnumba evaluate --size`` is refused unless :func:`eval_estimate` fits, with the room
    the training step's estimate gets: its traced peak lies within that room (the input and
    first layer's output it counted before were exceeded by ~1.5x: Linux ended such runs
    without a message), and the estimate is no more than 30% above it."""
    import tracemalloc

    from mdnumba.train import ESTIMATE_MARGIN, eval_estimate
    tr = make_trainer(TrainConfig(batch=8, steps=1, **dict(dict(size=8), **kw)))
    tr.evaluate(batches=1)  # compiles
    tracemalloc.start()
    tr.evaluate(size, batches=1)
    real = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    estimate = eval_estimate(tr.cfg, size)
    assert real > 2**20 and 0.75 * estimate < real < ESTIMATE_MARGIN * estimate, (estimate, real)


def test_step_memory_under_a_tracing_started_before():
    """With tracemalloc already on (python -X tracemalloc) and memory already traced, the
    estimate is the same and the tracing keeps going."""
    import tracemalloc

    from mdnumba.train import step_memory
    cfg = TrainConfig(size=16, batch=8, hidden=8, steps=2)
    step_memory(cfg)  # the first call in a process also fills caches (grid tables)
    alone = step_memory(cfg)
    tracemalloc.start()
    try:
        held = np.ones(2**20)  # 8 MiB traced before the probes
        assert step_memory(cfg) == pytest.approx(alone, rel=0.02) and tracemalloc.is_tracing()
        del held
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kw", [dict(), dict(size=6, directions=4, cell="stable", layers=2),
                                dict(model="md3d", task="diagonal3d", size=5),
                                dict(model="horizontal"), dict(model="snake", directions=2),
                                dict(model="lstm", task="binary-addition", size=30, directions=2)])
def test_step_floor_is_a_lower_bound_of_the_estimate(kw):
    """The floor (no step run) of every model kind is below the probes' estimate, but not far:
    the saved activations and their gradients are most of a step."""
    from mdnumba.train import step_floor, step_memory
    cfg = TrainConfig(**{**dict(size=12, batch=6, hidden=8, steps=2), **kw})
    floor, estimate = step_floor(cfg), step_memory(cfg)
    assert 0.25 * estimate < floor < estimate, (floor, estimate)


def test_a_step_beyond_its_floor_is_refused_without_a_probe(monkeypatch):
    """A grid whose floor is more than the machine has is refused at once: the probes keep the
    grid, and on a 2048x2048 one they took 10 GiB before the refusal."""
    import mdnumba.train as train
    cfg = TrainConfig(size=2048, batch=16, hidden=16, steps=2)
    floor = train.step_floor(cfg)
    assert floor == 4 * 16 * 2048**2 * (1 + 2 * 7 * 16)
    monkeypatch.setattr(train, "step_memory", lambda cfg: pytest.fail("probed"))
    monkeypatch.setattr(memory, "available_memory", lambda: floor - 1)
    with pytest.raises(MemoryError, match=r"^a training step needs at least 56.2 GiB \(input, saved "
                                          r"activations, their gradients\), this machine has 56.2 GiB"):
        train.check_step_memory(cfg)


def test_binary_addition_is_probed_at_its_full_length():
    """Its batches draw a length up to --size: the probes take the full one, so the estimate does
    not depend on the seed's draw (it did: up to 2.2x apart)."""
    from mdnumba.train import step_memory
    estimates = [step_memory(TrainConfig(model="lstm", task="binary-addition", size=60, batch=8,
                                         hidden=8, seed=seed, steps=2)) for seed in range(5)][1:]
    assert max(estimates) < 1.02 * min(estimates), estimates


def test_available_memory_reads_memavailable(monkeypatch):
    import io

    meminfo = "MemTotal:       16000000 kB\nMemFree:          100000 kB\nMemAvailable:    5000000 kB\n"
    monkeypatch.setattr(memory, "open", lambda *a, **k: io.StringIO(meminfo), raising=False)
    assert memory.available_memory() == 5000000 * 1024
    monkeypatch.setattr(memory, "open", lambda *a, **k: io.StringIO("MemTotal: 1 kB\n"), raising=False)
    assert memory.available_memory() is None


def test_check_step_memory_refuses_what_does_not_fit(monkeypatch):
    import mdnumba.train as train
    cfg = TrainConfig(size=16, batch=64, hidden=8, steps=2)
    need, floor = train.step_memory(cfg), train.step_floor(cfg)
    assert floor < need
    monkeypatch.setattr(memory, "available_memory", lambda: (floor + need) // 2)
    with pytest.raises(MemoryError, match=r"^a training step needs about \d+ MiB \(with 20% room for the "
                                          r"estimate's error: \d+ MiB\), this machine has \d+ MiB "):
        train.check_step_memory(cfg)
    monkeypatch.setattr(memory, "available_memory", lambda: need * 2)
    train.check_step_memory(cfg)
    monkeypatch.setattr(train, "step_memory", lambda cfg: 1000)
    monkeypatch.setattr(train, "step_floor", lambda cfg: 1000)
    monkeypatch.setattr(memory, "available_memory", lambda: 1200)  # exactly fits, with the margin
    train.check_step_memory(cfg)
    monkeypatch.setattr(memory, "available_memory", lambda: 1199)  # the estimate fits, not its margin
    with pytest.raises(MemoryError, match="needs about 0 MiB .with 20% room"):
        train.check_step_memory(cfg)
    monkeypatch.setattr(memory, "available_memory", lambda: None)  # not Linux: no check
    train.check_step_memory(cfg)
    with pytest.raises(MemoryError, match=r"^x needs 8.59e\+9 GiB, more than a process can address$"):
        memory.require_memory(2**63, "x needs")  # but what no process can hold
    monkeypatch.setattr(memory, "available_memory", lambda: 1)
    train.check_step_memory(TrainConfig(size=16, batch=64, hidden=8, steps=2, device="cuda"))  # GPU: its own


def test_checkpoints_every_tenth_of_the_steps_by_default(tmp_path):
    """``--checkpoint-every 0`` (the default): every steps/10 steps."""
    tr = make_trainer(TrainConfig(steps=20, **KW), tmp_path)
    saved, real = [], tr.save
    tr.save = lambda: (saved.append(tr.step), real())
    tr.run()
    assert saved == list(range(2, 21, 2))


def test_a_non_finite_loss_in_a_block_stops_the_run():
    """The run checks every step's loss of a block (the device trainer's come back unchecked)."""
    tr = make_trainer(TrainConfig(steps=4, **KW))
    real = tr._train_block

    def block(n, ahead=0):
        metrics = real(n, ahead)
        metrics[-1]["loss"] = float("nan")
        return metrics
    tr._train_block = block
    with pytest.raises(FloatingPointError, match=r"^the loss became NaN or infinite at step [1-4]"):
        tr.run()


@pytest.mark.parametrize("seconds,explicit,want", [
    (1e9, 0, list(range(3, 31, 3))), (0.0, 0, list(range(1, 31))), (0.0, 5, list(range(5, 31, 5)))])
def test_default_checkpoints_also_come_by_time(tmp_path, monkeypatch, seconds, explicit, want):
    """With the default --checkpoint-every (steps/10) a run also saves after a step that ends
    CHECKPOINT_SECONDS after the last save; an explicit --checkpoint-every is kept exactly."""
    import mdnumba.train as train_mod
    monkeypatch.setattr(train_mod, "CHECKPOINT_SECONDS", seconds)
    saved, real = [], Trainer.save

    def save(self):
        saved.append(self.step)
        return real(self)
    monkeypatch.setattr(Trainer, "save", save)
    make_trainer(TrainConfig(steps=30, checkpoint_every=explicit, **KW), tmp_path).run()
    assert saved == want


def test_damaged_checkpoint_metadata_or_compression_is_a_checkpoint_error(tmp_path):
    """Metadata that is valid JSON but not an object, and damaged deflate data (np.savez_compressed),
    are CheckpointErrors (they were an AttributeError and a zlib.error)."""
    import zipfile

    save_checkpoint(tmp_path, {"a": np.zeros(2)}, {"step": 1})
    path = tmp_path / "checkpoint.npz"
    np.savez(path, meta=np.array("[1, 2]"))
    with pytest.raises(CheckpointError, match="its metadata is a JSON list, not an object"):
        load_checkpoint(tmp_path)
    np.savez_compressed(path, meta=np.array('{"format": "x"}'), a=np.arange(4096.0))
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("a.npy")
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + 40:start + 80] = b"\xff" * 40  # inside a.npy's compressed data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(tmp_path)


def test_every_flipped_or_cut_byte_of_a_checkpoint_is_a_checkpoint_error_or_harmless(tmp_path):
    """Each byte of a checkpoint's first array header, of its zip directory and a sample of the
    rest flipped, and the file cut at many lengths: loading raises CheckpointError or gives the
    saved arrays back unchanged (a flipped date or version field). Flipped bytes raised
    tokenize.TokenError (an npy header) and NotImplementedError (zipfile) before."""
    arrays = {"a": np.arange(2000.0), "b": np.arange(7, dtype=np.float32)}  # a > one zip read
    save_checkpoint(tmp_path, arrays, {"step": 1})
    path = tmp_path / "checkpoint.npz"
    saved = path.read_bytes()
    n = len(saved)
    flips = [*range(160), *range(n - 400, n), *range(160, n - 400, 97)]
    for damaged in [saved[:p] + bytes([saved[p] ^ 0xFF]) + saved[p + 1:] for p in flips] + \
            [saved[:p] for p in range(0, n, 61)]:
        path.write_bytes(damaged)
        try:
            got, meta = load_checkpoint(tmp_path)
        except CheckpointError as exc:
            assert "(('" not in str(exc) and len(str(exc)) < 400, exc  # a short reason in words
            continue
        assert meta["step"] == 1 and got.keys() == arrays.keys()
        for k in arrays:
            np.testing.assert_array_equal(got[k], arrays[k])


def test_a_folder_named_like_the_checkpoint_is_named_so(tmp_path):
    (tmp_path / "checkpoint.npz").mkdir()
    with pytest.raises(CheckpointError, match="checkpoint.npz is a folder .*, not a checkpoint; move it"):
        load_checkpoint(tmp_path)


def test_a_failed_config_copy_leaves_the_previous_checkpoint(tmp_path):
    """config.json is written first: if it fails, checkpoint.npz is still the previous step (what
    the error message says is kept), and the error names config.json, not the hidden temp file."""
    save_checkpoint(tmp_path, {"a": np.zeros(2)}, {"step": 1})
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()  # the rename over it fails
    with pytest.raises(OSError) as err:
        save_checkpoint(tmp_path, {"a": np.ones(2)}, {"step": 2})
    assert err.value.filename == str(tmp_path / "config.json")
    arrays, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 1 and not arrays["a"].any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz", "config.json"]  # no temp files


def test_evaluate_averages_its_batches_drawn_from_its_seed():
    """evaluate's metrics are the means over ``batches`` batches drawn from run_stream(seed,
    EVAL_STREAM) (not the last batch's, nor their sum)."""
    tr = make_trainer(TrainConfig(steps=1, **KW))
    rng, per_batch = run_stream(7, EVAL_STREAM), []
    for _ in range(3):
        batch = tr.task.sample(rng, tr.cfg.batch, tr.cfg.size, np.dtype(tr.cfg.dtype))
        loss, _, prob = tr.loss_fn(tr.model.forward(batch.x, save=False), batch.y)
        per_batch.append(tr.task.metrics(prob, loss, batch))
    got = tr.evaluate(batches=3, seed=7)
    assert got == pytest.approx({k: np.mean([m[k] for m in per_batch]) for k in per_batch[0]}, rel=1e-6)


def test_batches_are_drawn_from_streams_of_their_own():
    """A run's training batches and its evaluation's come from streams no initial weights are
    drawn from. Before, a run's first batch was drawn from the numbers of its first layer's
    weights (``default_rng(seed)`` for both: x = 0.1 (W + s) / 2s), seed s's readout weights
    from seed s+1's batch numbers, and ``evaluate(seed=12345)`` (the CLI's default) scored a run
    of ``--seed 12345`` on its own first training batches."""
    runs = [make_trainer(TrainConfig(steps=1, **dict(KW, seed=s))) for s in (0, 1, 12345)]
    runs.append(make_trainer(TrainConfig(steps=1, layers=2, **KW)))  # layer 1: SeedSequence([1, 1])
    weights = [w.ravel() for tr in runs for layer in tr.model.layers for _, w in layer.params.items()
               if w.size >= 8 and w.std() > 0]  # (not the constant biases)
    firsts = [tr.sample_batch(tr.rng, tr.cfg.size).x for tr in runs]  # each run's first training batch
    for tr, first in zip(runs, firsts):
        noise = first.ravel()
        for w in weights:  # an affine function of the weights (|r| = 1) before
            n = min(w.size, noise.size)
            assert abs(np.corrcoef(noise[:n], w[:n])[0, 1]) < 0.99, (tr.cfg.seed, n)
    drawn, tr = [], runs[2]  # --seed 12345
    real = tr.task.sample
    tr.task = dataclasses.replace(tr.task, sample=lambda *a: drawn.append(real(*a)) or drawn[-1])
    tr.evaluate(batches=1, seed=tr.cfg.seed)
    assert not np.array_equal(drawn[0].x, firsts[2])


def test_the_log_holds_each_steps_metrics_to_six_digits(tmp_path):
    """log.tsv's row of a step holds the metrics ``on_step`` got, column by column, to 6
    significant digits."""
    seen = []
    make_trainer(TrainConfig(steps=3, **KW), tmp_path).run(lambda step, m: seen.append((step, m)))
    header, *rows = [r.split("\t") for r in (tmp_path / "log.tsv").read_text().splitlines()]
    assert [int(r[0]) for r in rows] == [step for step, _ in seen] == [1, 2, 3]
    for row, (_, m) in zip(rows, seen):
        for name, text in zip(header[1:], row[1:], strict=True):
            assert float(text) == pytest.approx(m[name], rel=5e-6), name


def test_a_checkpoint_reads_no_pickles(tmp_path):
    """An object array in checkpoint.npz (a pickle: loading it could run code) is refused as a
    corrupt checkpoint, never unpickled."""
    np.savez(tmp_path / "checkpoint.npz", meta=np.array('{"format": "mdnumba-checkpoint-1"}'),
             o=np.array([{"t": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(tmp_path)


def test_an_atomic_write_through_a_symlink_replaces_its_target(tmp_path):
    """A run file that is a symlink (e.g. to another disk) stays one: the new contents go to
    its target."""
    from mdnumba.checkpoint import atomic_write_bytes
    (tmp_path / "disk").mkdir()
    target, link = tmp_path / "disk" / "f.bin", tmp_path / "f.bin"
    target.write_bytes(b"old")
    link.symlink_to(target)
    atomic_write_bytes(link, lambda fh: fh.write(b"new"))
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "f.bin"]  # no temp file left
