"""CLI commands through Click's CliRunner: happy paths, bad options, resume, corrupt checkpoints."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mdnumba.cli.main import _say_compiling as SAY_COMPILING  # before conftest silences it
from mdnumba.cli.main import main

from mdnumba.checkpoint import load_checkpoint


@pytest.fixture
def runner():
    return CliRunner()


def train(runner, out, *extra):
    args = ["train", "--model", "md", "--size", "5", "--batch", "4", "--hidden", "4",
            "--steps", "6", "--checkpoint-every", "3", "--out", str(out), *extra]
    return runner.invoke(main, args)


def test_info(runner):
    res = runner.invoke(main, ["info"])
    assert res.exit_code == 0, res.output
    assert "numba" in res.output and "cuda" in res.output
    from mdnumba import config
    if config.CACHE:  # where the kernels are cached, per fastmath setting
        assert "exact" in res.output or "fastmath" in res.output
    assert f"malloc tuning: {config.MALLOC_TUNING}" in res.output
    assert f"cpu register tiles: {config.VECTOR_BYTES}-byte vectors" in res.output


def test_info_says_when_the_cuda_sweeps_skip_a_stage(monkeypatch):
    """``mdnumba info`` is where MDNUMBA_CUDA_SKIP (a timing diagnostic: wrong results) shows."""
    from mdnumba import config, info
    monkeypatch.setattr(config, "CUDA_SKIP", ("sum", "cell"))
    assert info.cuda_sweep_settings().endswith(
        "; DIAGNOSTIC: the sweeps skip sum and cell, their results are wrong (MDNUMBA_CUDA_SKIP)")
    monkeypatch.setattr(config, "CUDA_SKIP", ())
    assert "DIAGNOSTIC" not in info.cuda_sweep_settings()
    from mdnumba.memory import format_bytes  # the unit info and the memory checks write sizes in
    assert (format_bytes(2**30), format_bytes(2**30 - 2**20)) == ("1.0 GiB", "1023 MiB")


def test_train_writes_log_and_checkpoint(runner, tmp_path):
    res = train(runner, tmp_path / "run")
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "run" / "log.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["step", "loss", "time", "relevant_loss", "second_x_acc"]
    assert [ln.split("\t")[0] for ln in lines[1:]] == [str(k) for k in range(1, 7)]
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["step"] == 6 and meta["config"]["size"] == 5
    assert not [p for p in os.listdir(tmp_path / "run") if p.endswith(".tmp")]
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert modes["checkpoint.npz"] == modes["config.json"] == modes["log.tsv"], modes  # umask's


@pytest.mark.parametrize("extra", [[], ["--cell", "stable", "--directions", "4", "--layers", "2"],
                                   ["--model", "md3d", "--task", "diagonal3d", "--size", "4"]])
def test_resume_is_bit_identical(runner, tmp_path, extra):
    assert train(runner, tmp_path / "full", *extra).exit_code == 0
    res = train(runner, tmp_path / "part", "--steps", "3", *extra)
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["train", "--resume", str(tmp_path / "part"), "--steps", "6"])
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output
    full = np.load(tmp_path / "full" / "checkpoint.npz")
    part = np.load(tmp_path / "part" / "checkpoint.npz")
    for key in full.files:
        if key != "meta":
            np.testing.assert_array_equal(full[key], part[key], err_msg=key)

    def losses(d):
        return [ln.split("\t")[1] for ln in (tmp_path / d / "log.tsv").read_text().splitlines()[1:]]
    assert losses("full") == losses("part")


def test_evaluate_other_size(runner, tmp_path):
    assert train(runner, tmp_path / "run").exit_code == 0
    res = runner.invoke(main, ["evaluate", str(tmp_path / "run"), "--size", "9", "--batches", "2"])
    assert res.exit_code == 0, res.output
    assert "size 9" in res.output and "second_x_acc" in res.output
    for size in ("3", "0", "-2"):  # one message, the task's, for every size below its minimum
        res = runner.invoke(main, ["evaluate", str(tmp_path / "run"), "--size", size, "--batches", "2"])
        assert res.exit_code != 0, res.output
        assert f"--size (image side) must be >= 4, got {size}" in res.output, res.output


def test_predict_writes_the_models_probabilities(runner, tmp_path):
    """predict = σ(model.forward(x)) of the checkpoint's model, in any --batch chunks, integer
    inputs cast; --out is not replaced without --overwrite."""
    from mdnumba.losses import sigmoid
    from mdnumba.train import Trainer
    assert train(runner, tmp_path / "run").exit_code == 0
    x = np.random.default_rng(0).random((5, 6, 7, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    want = sigmoid(Trainer.load(tmp_path / "run").model.forward(x))
    for extra in ([], ["--batch", "2", "--overwrite"]):
        res = runner.invoke(main, ["predict", str(tmp_path / "run"), str(tmp_path / "x.npy"),
                                   "--out", str(tmp_path / "p.npy"), *extra])
        assert res.exit_code == 0, res.output
        assert "inputs (5, 6, 7, 1) -> probabilities (5, 6, 7, 1) float32" in res.output
        np.testing.assert_allclose(np.load(tmp_path / "p.npy"), want, rtol=1e-6)
    res = runner.invoke(main, ["predict", str(tmp_path / "run"), str(tmp_path / "x.npy"), "--out",
                               str(tmp_path / "p.npy")])
    assert res.exit_code == 2 and "exists; pass --overwrite" in res.output
    np.save(tmp_path / "b.npy", x > 0.5)
    res = runner.invoke(main, ["predict", str(tmp_path / "run"), str(tmp_path / "b.npy"), "--out",
                               str(tmp_path / "b_p.npy")])
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(np.load(tmp_path / "b_p.npy"),
                               Trainer.load(tmp_path / "run").predict((x > 0.5).astype(np.float32)))


def test_predict_refusals(runner, tmp_path, monkeypatch):
    assert train(runner, tmp_path / "run").exit_code == 0
    x = np.random.default_rng(0).random((2, 4, 4, 1))
    bad_nan = x.copy()
    bad_nan[0, 1, 1, 0] = np.nan
    files = {"x3.npy": x[..., 0], "x2c.npy": np.concatenate([x, x], -1), "nan.npy": bad_nan,
             "obj.npy": np.array([1, "a"], dtype=object), "empty.npy": x[:0],
             "s.npy": np.full((1, 4, 4, 1), "a"), "c.npy": np.zeros((1, 4, 4, 1), complex)}
    for name, arr in files.items():
        np.save(tmp_path / name, arr, allow_pickle=True)
    np.savez(tmp_path / "a.npz", x=x)
    (tmp_path / "t.npy").write_text("not numpy")
    raw = (tmp_path / "x3.npy").read_bytes()
    end = raw.index(b"}")  # the header's closing brace made an unclosed "(": a tokenize.TokenError
    (tmp_path / "damaged.npy").write_bytes(raw[:end] + b"(" + raw[end + 1:])
    (tmp_path / "x.npy").write_bytes((tmp_path / "x3.npy").read_bytes())
    run = str(tmp_path / "run")
    for case, (args, message) in enumerate([
            ([run, "x3.npy"], "INPUT must have 4 dimensions (batch, height, width, 1) of the diagonal task, "
                              "got shape (2, 4, 4)"),
            ([run, "x2c.npy"], "INPUT has 2 channels in its last axis, the layer expects 1"),
            ([run, "nan.npy"], "INPUT contains 1 NaN or infinite values"),
            ([run, "obj.npy"], "(not a .npy file, or one of Python objects, which mdnumba does not "
                               "unpickle)"),
            ([run, "t.npy"], "is not a readable .npy array of numbers"),
            ([run, "damaged.npy"], "is not a readable .npy array of numbers (an array header does not "
                                   "parse: TokenError)"),
            ([run, "empty.npy"], "INPUT has an empty axis"),
            ([run, "s.npy"], "INPUT must hold floating-point values"),  # loads without pickles
            ([run, "c.npy"], "INPUT must hold floating-point values"),
            ([run, "a.npz"], "is an .npz archive (arrays x); save the one to predict on"),
            ([run, "missing.npy"], "File 'missing.npy' does not exist"),
            ([run, "x.npy", "--batch", "0"], "--batch"),
            ([run, "x.npy", "--out", "no/p.npy"], "its folder no does not exist"),
            ([run, "x.npy", "--out", ""], "'--out': is empty"),
            ([run, "x.npy", "--out", "."], "is a directory"),
            ([run, "x.npy", "--out", "p.txt"], "p.txt does not end in .npy; the file is a NumPy array"),
            ([str(tmp_path / "none"), "x.npy"], "no checkpoint")]):
        out = ["--out", "p.npy"] if "--out" not in args else []
        cwd = tmp_path / f"case{case}"  # a folder of its own holding the inputs, as the working one
        cwd.mkdir()
        for f in tmp_path.glob("*.np?"):
            os.symlink(f, cwd / f.name)
        monkeypatch.chdir(cwd)
        res = runner.invoke(main, ["predict", *args, *out])
        assert res.exit_code in (1, 2) and message in res.output, (args, res.output)
        assert not os.path.exists("p.npy")
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)  # --overwrite's atomic rename would have put a file in the FIFO's place
    res = runner.invoke(main, ["predict", run, str(tmp_path / "x.npy"), "--out", str(fifo), "--overwrite"])
    assert res.exit_code == 2 and "is not a regular file" in res.output and fifo.is_fifo(), res.output
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    from mdnumba.train import RUN_FILES
    assert not any(name.endswith(".npy") for name in RUN_FILES)  # the suffix rule keeps them safe
    for name in RUN_FILES:  # the run's own files: not .npy
        res = runner.invoke(main, ["predict", run, str(tmp_path / "x.npy"), "--out",
                                   str(tmp_path / "run" / name), "--overwrite"])
        assert res.exit_code == 2 and f"{name} does not end in .npy" in res.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_evaluate_takes_20_batches_by_default(runner, tmp_path):
    """What train's closing line promises ("mdnumba evaluate takes 20 by default")."""
    assert train(runner, tmp_path / "run").exit_code == 0
    outs = [runner.invoke(main, ["evaluate", str(tmp_path / "run")] + extra).output
            for extra in ([], ["--batches", "20"], ["--batches", "5"])]
    assert outs[0] == outs[1] != outs[2], outs


def test_predict_failing_write_keeps_the_old_out(runner, tmp_path, monkeypatch, trained_run):
    """--out is written atomically: a write that fails (a full disk) leaves the old file whole."""
    np.save(tmp_path / "x.npy", np.zeros((1, 4, 4, 1), np.float32))
    out = tmp_path / "p.npy"
    np.save(out, np.arange(3.0))
    before = out.read_bytes()

    def partial(file, arr, *a, **kw):  # starts writing, then the disk is full
        fh = open(file, "wb") if isinstance(file, (str, bytes)) or hasattr(file, "__fspath__") else file
        fh.write(b"\x93NUMPY")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "save", partial)
    res = runner.invoke(main, ["predict", str(trained_run), str(tmp_path / "x.npy"), "--out", str(out),
                               "--overwrite"])
    assert res.exit_code == 1 and "cannot write --out" in res.output, res.output
    assert out.read_bytes() == before


def test_predict_batch_reaches_the_forward(runner, tmp_path, monkeypatch, trained_run):
    """--batch 2 runs 5 inputs as 2, 2 and 1 (it bounds predict's memory)."""
    from mdnumba.train import Trainer
    np.save(tmp_path / "x.npy", np.zeros((5, 4, 4, 1), np.float32))
    layer = type(Trainer.load(trained_run).model)
    seen, real = [], layer.forward
    monkeypatch.setattr(layer, "forward",
                        lambda self, x, *a, **kw: seen.append(len(x)) or real(self, x, *a, **kw))
    res = runner.invoke(main, ["predict", str(trained_run), str(tmp_path / "x.npy"), "--out",
                               str(tmp_path / "p.npy"), "--batch", "2"])
    assert res.exit_code == 0, res.output
    assert seen == [2, 2, 1]


def _metrics(output: str) -> dict:
    """``name: value`` lines of a command's output."""
    return dict(re.findall(r"^ *(\w+): (\S+)$", output, re.M))


def test_evaluate_by_default_reproduces_trains_closing_metrics(runner, tmp_path):
    """Same seed (EVAL_SEED) as train's closing evaluation: same batches, same numbers."""
    res = train(runner, tmp_path / "run")
    assert res.exit_code == 0, res.output
    closing = _metrics(res.output)
    assert set(closing) == {"loss", "relevant_loss", "second_x_acc"}, res.output
    ev = runner.invoke(main, ["evaluate", str(tmp_path / "run"), "--batches", "5"])
    assert ev.exit_code == 0 and _metrics(ev.output) == closing, (res.output, ev.output)


def test_sample_of_a_run_that_is_not_char_lm_is_a_message(runner, trained_run):
    res = runner.invoke(main, ["sample", str(trained_run), "--length", "5"])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert "holds a diagonal run; sample needs a char-lm run" in res.output


def test_bench_passes_every_option_to_the_layer(runner, monkeypatch):
    import mdnumba.microbench as microbench
    seen, real = [], microbench.bench_layer
    monkeypatch.setattr(microbench, "bench_layer", lambda *a, **kw: seen.append((a, kw)) or real(*a, **kw))
    res = runner.invoke(main, ["bench", "--model", "md3d", "--size", "2", "--batch", "1", "--hidden", "2",
                               "--channels", "3", "--cell", "stable", "--dtype", "float64", "--repeats", "2"])
    assert res.exit_code == 0, res.output
    assert seen == [((3, 2), dict(batch=1, hidden=2, channels=3, directions=1, cell="stable",
                                  dtype="float64", device="cpu", repeats=2))]


def test_a_refused_overwrite_keeps_the_old_run(runner, tmp_path, monkeypatch):
    """--overwrite removes the old run only once the new one is sure to start: a run refused
    (here: its step does not fit in memory) leaves the old one as it was."""
    import mdnumba.memory
    run = tmp_path / "run"
    assert train(runner, run).exit_code == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    monkeypatch.setattr(mdnumba.memory, "available_memory", lambda: 0)
    res = train(runner, run, "--overwrite", "--hidden", "64")
    assert res.exit_code == 1 and "out of memory" in res.output, res.output
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_closed_stdout_ends_a_command_quietly_with_status_1(runner, monkeypatch):
    """`mdnumba info | head -1`: no traceback, and a failing status (the output was cut)."""
    import mdnumba.cli.main as cli

    def gone():
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(cli, "collect_info", gone)
    res = runner.invoke(main, ["info"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception


def test_an_interrupt_before_the_first_checkpoint_says_none_was_saved(runner, tmp_path, monkeypatch):
    from mdnumba.train import Trainer

    def interrupted(self, progress=None):
        self.step = 2
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "run", interrupted)
    res = train(runner, tmp_path / "run")
    assert res.exit_code == 1, res.output
    assert "interrupted at step 2; no checkpoint was saved yet" in res.output and "--resume" not in res.output


def test_predict_out_of_memory_names_predicts_own_options(runner, tmp_path, monkeypatch, trained_run):
    """Its advice names predict's options, not train's (--hidden, --size)."""
    from mdnumba.train import Trainer
    np.save(tmp_path / "x.npy", np.zeros((1, 4, 4, 1), np.float32))

    def oom(self, *a, **kw):
        raise MemoryError("Unable to allocate 9.00 GiB")
    monkeypatch.setattr(Trainer, "predict", oom)
    res = runner.invoke(main, ["predict", str(trained_run), str(tmp_path / "x.npy"), "--out",
                               str(tmp_path / "p.npy")])
    assert res.exit_code == 1 and "out of memory (Unable to allocate 9.00 GiB); use a smaller INPUT or " \
        "--batch" in res.output, res.output


def test_a_resume_without_matplotlib_trains_and_skips_its_plots(runner, tmp_path, monkeypatch):
    """The warning says the plots will not be redrawn: the run must not then fail drawing them."""
    import mdnumba.plotting
    run = tmp_path / "run"
    assert train(runner, run, "--plot").exit_code == 0
    monkeypatch.setattr(mdnumba.plotting, "matplotlib_problem",
                        lambda: "needs matplotlib: pip install 'mdnumba[plot]'")
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "7"])
    assert res.exit_code == 0 and "will not be redrawn" in res.output and "plots:" not in res.output, \
        res.output
    assert json.loads((run / "config.json").read_text())["step"] == 7


def test_a_resume_whose_log_cannot_be_appended_is_refused_before_training(runner, tmp_path, monkeypatch):
    import pathlib
    run = tmp_path / "run"
    assert train(runner, run).exit_code == 0
    real = pathlib.Path.open

    def read_only_log(self, mode="r", *a, **kw):
        if self.name == "log.tsv" and "a" in mode:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, mode, *a, **kw)
    monkeypatch.setattr(pathlib.Path, "open", read_only_log)
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "9"])
    assert res.exit_code == 2 and f"{run / 'log.tsv'} is not writable (Permission denied); fix its " \
        "permissions" in " ".join(res.output.split()), res.output
    assert json.loads((run / "config.json").read_text())["step"] == 6


def test_gpu_run_without_gpu_says_use_device_cpu(runner, tmp_path):
    """A run trained with --device cuda, reopened where CUDA is unusable, names the fix;
    --device cpu evaluates and resumes it on the CPU."""
    from mdnumba.backend_cuda import cuda_available
    from mdnumba.checkpoint import load_checkpoint, save_checkpoint
    if cuda_available():
        pytest.skip("CUDA is usable here")

    def as_if_trained_on_cuda(folder):
        arrays, meta = load_checkpoint(folder)
        meta["config"]["device"] = "cuda"
        save_checkpoint(folder, arrays, meta)
    run = tmp_path / "run"
    assert train(runner, run).exit_code == 0
    as_if_trained_on_cuda(run)
    for args in (["evaluate", str(run)], ["train", "--resume", str(run), "--steps", "8"]):
        res = runner.invoke(main, args)
        assert res.exit_code == 2, res.output
        assert "--device cpu" in res.output and "trained with --device cuda" in res.output
    res = runner.invoke(main, ["evaluate", str(run), "--device", "cpu", "--batches", "2"])
    assert res.exit_code == 0 and "second_x_acc" in res.output, res.output
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "8", "--device", "cpu"])
    assert res.exit_code == 0 and "resuming" in res.output, res.output
    assert load_checkpoint(run)[1]["step"] == 8
    np.save(tmp_path / "x.npy", np.zeros((1, 4, 4, 1), np.float32))
    res = runner.invoke(main, ["predict", str(run), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.npy"),
                               "--device", "cpu"])
    assert res.exit_code == 0, res.output
    (tmp_path / "t.txt").write_text("hello world, " * 40)
    lm = tmp_path / "lm"
    assert runner.invoke(main, ["train", "--task", "char-lm", "--model", "stacked", "--data",
                                str(tmp_path / "t.txt"), "--hidden", "4", "--seq-len", "8", "--batch", "2",
                                "--steps", "2", "--out", str(lm)]).exit_code == 0
    as_if_trained_on_cuda(lm)
    res = runner.invoke(main, ["sample", str(lm), "--length", "5", "--device", "cpu"])
    assert res.exit_code == 0, res.output


def test_corrupt_checkpoint_is_reported_and_kept(runner, tmp_path):
    assert train(runner, tmp_path / "run").exit_code == 0
    ck = tmp_path / "run" / "checkpoint.npz"
    ck.write_bytes(b"garbage")
    for args in (["evaluate", str(tmp_path / "run")], ["train", "--resume", str(tmp_path / "run")]):
        res = runner.invoke(main, args)
        assert res.exit_code != 0
        assert "corrupt" in res.output and "allow_pickle" not in res.output, res.output
    assert ck.read_bytes() == b"garbage"


def test_an_npz_that_is_no_checkpoint_is_named_so(runner, tmp_path):
    """A readable .npz of other arrays said "corrupt or unreadable ('meta')", a KeyError's text."""
    assert train(runner, tmp_path / "run").exit_code == 0
    ck = tmp_path / "run" / "checkpoint.npz"
    np.savez(ck, a=np.arange(3))
    res = runner.invoke(main, ["evaluate", str(tmp_path / "run")])
    assert res.exit_code == 1 and res.output == (
        f"Error: {ck} is not an mdnumba checkpoint (an .npz archive without the 'meta' entry every "
        "checkpoint has); delete it or use another run folder\n"), res.output


def test_missing_checkpoint(runner, tmp_path):
    res = runner.invoke(main, ["evaluate", str(tmp_path)])
    assert res.exit_code != 0 and "no checkpoint" in res.output


def test_mismatched_checkpoint(runner, tmp_path):
    assert train(runner, tmp_path / "run").exit_code == 0
    ck = tmp_path / "run" / "checkpoint.npz"
    data = dict(np.load(ck))
    data["param_0"] = data["param_0"][:-3]
    np.savez(ck, **data)
    res = runner.invoke(main, ["evaluate", str(tmp_path / "run")])
    assert res.exit_code != 0 and "parameters" in res.output


@pytest.mark.parametrize("args,message", [
    (["--model", "resnet"], "'resnet' is not one of"),
    (["--task", "sudoku"], "'sudoku' is not one of"),
    (["--size", "3"], "--size (image side) must be >= 4, got 3"),
    (["--size", "0"], "--size (image side) must be >= 4, got 0"),  # the task's rule, not click's x>=1
    (["--task", "binary-addition", "--model", "lstm", "--size", "0"], "--size (bits) must be >= 1, got 0"),
    (["--batch", "0"], "0 is not in the range x>=1"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--clip-norm", "-1"], "--clip-norm must be a finite number > 0, got -1.0"),
    (["--steps", "0"], "0 is not in the range x>=1"),
    (["--model", "lstm"], "does not fit task"),
    (["--curriculum", "8,x"], "comma-separated integers"),
    (["--curriculum", "16"], "curriculum sizes must increase from >= 4 to below --size 8"),
    (["--curriculum", "8"], "curriculum sizes must increase"),
    (["--curriculum", "6,5"], "(smaller sizes first), got 6,5"),
    (["--curriculum", "4,4"], "curriculum sizes must increase"),
    (["--curriculum", "3,5"], "curriculum sizes must increase from >= 4"),
    (["--directions", "3"], "--directions must be 1 or 4"),
    (["--model", "md3d"], "does not fit task"),
    (["--cell", "lstm"], "'lstm' is not one of"),
    (["--layers", "0"], "0 is not in the range x>=1"),
    (["--seed", "-1"], "--seed"),
    (["--dropout", "0.5"], "not used by this run, leave out: --dropout (char-lm only)"),
    (["--seq-len", "9", "--data", "x.txt"], "--seq-len (char-lm only), --data (char-lm only)"),
    (["--sync-every", "9"], "--sync-every (--device cuda only)"),
    (["--no-tie-depth"], "out: --no-tie-depth (char-lm --model grid only)"),  # as typed (was --tie-depth)
    (["--tie-depth"], "leave out: --tie-depth (char-lm --model grid only)"),
    (["--task", "char-lm", "--model", "stacked", "--curriculum", "20"], "--curriculum (not for char-lm)"),
    (["--model", "grid", "--data", "x.txt"], "or --task char-lm, which takes 'grid'"),  # not "leave out"
    (["--out", ""], "Invalid value for '--out': is empty; give a folder"),  # not the current folder
    (["--resume", " "], "Invalid value for '--resume': is empty"),
])
def test_bad_options(runner, tmp_path, args, message):
    res = runner.invoke(main, ["train", "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not (tmp_path / "r" / "checkpoint.npz").exists()


def test_unwritable_out(runner, tmp_path, monkeypatch):
    """Said before the probe steps, where a first run compiles the kernels, creating nothing."""
    from mdnumba import train as train_module
    monkeypatch.setattr(train_module, "check_step_memory", lambda cfg: pytest.fail("probed"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = runner.invoke(main, ["train", "--out", str(blocker / "sub"), "--steps", "2"])
    assert res.exit_code == 2 and f"--out {blocker / 'sub'} is not writable (" in res.output, res.output

    def read_only(*args, **kw):
        raise PermissionError(13, "Read-only file system")
    monkeypatch.setattr("tempfile.mkstemp", read_only)
    for out in (tmp_path / "a" / "b", tmp_path):
        res = runner.invoke(main, ["train", "--out", str(out), "--steps", "2"])
        assert res.exit_code == 2, res.output
        assert f"--out {out} is not writable (Read-only file system); choose another folder" in res.output
    assert not (tmp_path / "a").exists()
    np.save(tmp_path / "x.npy", np.zeros((1, 4, 4, 1), np.float32))
    monkeypatch.setattr("mdnumba.cli.main._load_run", lambda *a, **kw: pytest.fail("loaded"))
    res = runner.invoke(main, ["predict", str(tmp_path), str(tmp_path / "x.npy"), "--out",
                               str(tmp_path / "p.npy")])
    assert res.exit_code == 2, res.output
    assert f"its folder {tmp_path} is not writable (Read-only file system)" in res.output


def test_out_as_a_dangling_symlink_is_named_so(runner, tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    res = runner.invoke(main, ["train", "--out", str(tmp_path / "link"), "--steps", "2"])
    assert res.exit_code == 2, res.output
    link, gone = tmp_path / "link", tmp_path / "gone"
    assert f"--out {link} is a symlink to {gone}, which does not exist" in res.output


def test_cuda_device_message(runner, tmp_path):
    res = runner.invoke(main, ["train", "--device", "cuda", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--device cpu" in res.output
    res = runner.invoke(main, ["bench", "--device", "cuda"])
    assert res.exit_code == 2 and "--device cpu" in res.output


@pytest.mark.parametrize("args,head", [
    (["--size", "3", "--batch", "2", "--hidden", "2"],
     "md 3x3, batch 2, hidden 2, 1 direction, graves, float32"),
    (["--model", "lstm", "--size", "4", "--directions", "2", "--dtype", "float64"],
     "lstm 4, batch 16, hidden 32, 2 directions, graves, float64"),
    (["--model", "md3d", "--size", "2", "--batch", "1", "--hidden", "2", "--cell", "stable",
      "--channels", "3"],
     "md3d 2x2x2, batch 1, hidden 2, 1 direction, stable, float32")])
def test_bench_reports_times(runner, args, head):
    res = runner.invoke(main, ["bench", *args, "--repeats", "2"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith(head) and "(cpu, " in lines[0]
    for what in ("forward", "inference", "train step"):
        ms = re.search(rf"^  {what} +([0-9.e+]+) ms  \(median ([0-9.e+]+) ms", res.output, re.M)
        assert ms and 0 < float(ms.group(1)) <= float(ms.group(2)), res.output
    assert lines[-1] == "  best of 2 calls each"


@pytest.mark.parametrize("args,message", [
    (["--directions", "3"], "Invalid value for '--directions': must be 1 or 4 for --model md"),
    (["--model", "lstm", "--directions", "4"], "must be 1 or 2 for --model lstm"),
    (["--repeats", "0"], "--repeats"),
    (["--model", "md4d"], "--model"),
    (["--size", "0"], "--size")])
def test_bench_bad_options(runner, args, message):
    res = runner.invoke(main, ["bench", *args])
    assert res.exit_code == 2 and message in res.output, res.output


def test_bench_refuses_a_layer_that_does_not_fit_in_memory(runner, monkeypatch):
    """Before allocating (Linux would hand the memory out, then kill the process, or another one,
    without a message): at least the input, the saved activations and their gradients."""
    import tracemalloc

    import mdnumba.memory
    from mdnumba.microbench import _cpu_calls, step_bytes
    monkeypatch.setattr(mdnumba.memory, "available_memory", lambda: 2**20)
    res = runner.invoke(main, ["bench", "--size", "64", "--batch", "16", "--hidden", "16"])
    assert res.exit_code == 1, res.output
    assert ("out of memory (a train step of this layer needs at least 56 MiB (input, saved activations, "
            "their gradients), this machine has 1 MiB available); use a smaller --size, --batch or "
            "--hidden") in res.output
    from mdnumba import WavefrontLSTM
    x = np.random.default_rng(0).random((2, 6, 6, 3), dtype=np.float32)
    step = _cpu_calls(WavefrontLSTM(2, 3, 4, directions=4), x)[2]
    tracemalloc.start()
    try:
        step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert step_bytes(2, 6 * 6, 2, 4, 3, 4, 4) < peak  # a lower bound: a fresh layer's first step


def test_bench_refuses_a_layer_whose_estimate_does_not_fit(runner, monkeypatch):
    """Above its floor, bench asks for :func:`step_estimate` with the training estimate's room:
    a step's traced peak was up to 1.7x the floor (an md3d bench at size 85 passed the floor's
    check, then Linux ended it without a message)."""
    import tracemalloc

    import mdnumba.memory
    from mdnumba.microbench import bench_layer, step_bytes, step_estimate
    shape = (3, 16**3, 2, 8, 3, 1, 4)
    assert step_estimate(*shape) > 1.3 * step_bytes(*shape)
    monkeypatch.setattr(mdnumba.memory, "available_memory", lambda: int(1.1 * step_bytes(*shape)))
    res = runner.invoke(main, ["bench", "--model", "md3d", "--size", "16", "--batch", "2", "--hidden", "8",
                               "--channels", "3"])
    assert res.exit_code == 1 and "out of memory (a train step of this layer needs about" in res.output, \
        res.output
    monkeypatch.undo()
    bench_layer(3, 4, batch=2, hidden=8, channels=3, repeats=1)  # compiles
    tracemalloc.start()
    try:
        bench_layer(3, 16, batch=2, hidden=8, channels=3, repeats=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 0.8 * step_estimate(*shape) < peak < 1.2 * step_estimate(*shape)


def test_bench_layer_result():
    from mdnumba.microbench import bench_layer
    r = bench_layer(2, 3, batch=2, hidden=2, channels=2, directions=4, repeats=3)
    assert r.cells == 2 * 9 and r.repeats == 3 and r.path is None
    assert 0 < r.forward_s <= r.forward_median_s and 0 < r.step_s <= r.step_median_s and r.first_s > 0
    assert 0 < r.inference_s <= r.inference_median_s
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        bench_layer(1, 3, batch=1, hidden=1, repeats=0)


def test_an_interrupted_compare_says_how_to_go_on(runner, tmp_path, monkeypatch):
    """compare has no --resume: the message says to run it again, or to train that model on."""
    from mdnumba.train import Trainer

    def interrupted(self, progress=None):
        self.step = self.saved_step = 1
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "run", interrupted)
    res = runner.invoke(main, ["compare", "--size", "4", "--batch", "2", "--hidden", "3", "--steps", "3",
                               "--out", str(tmp_path), "--no-plot"])
    assert res.exit_code == 1, res.output
    assert (f"interrupted at step 1; checkpoint of step 1 in {tmp_path / 'md'} (compare cannot resume: run "
            f"it again with --overwrite, or continue this model alone with `mdnumba train --resume "
            f"{tmp_path / 'md'}`)") in res.output.replace("\n", " ")


def test_compare_writes_summary(runner, tmp_path):
    res = runner.invoke(main, ["compare", "--size", "4", "--batch", "2", "--hidden", "3",
                               "--steps", "3", "--out", str(tmp_path), "--no-plot"])
    assert res.exit_code == 0, res.output
    summary = (tmp_path / "summary.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in summary[1:]] == ["md", "horizontal", "snake"]
    res = runner.invoke(main, ["compare", "--models", "md,lstm", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "not valid" in res.output


def test_compare_that_cannot_write_its_summary_says_so(runner, tmp_path, monkeypatch):
    """A full disk at the end: a message naming summary.tsv (not a traceback), the runs kept."""
    import mdnumba.checkpoint

    def full(path, write):
        if path.name == "summary.tsv":
            raise OSError(28, "No space left on device")
        return real(path, write)
    real = mdnumba.checkpoint.atomic_write_bytes
    monkeypatch.setattr(mdnumba.checkpoint, "atomic_write_bytes", full)
    res = runner.invoke(main, ["compare", "--size", "4", "--batch", "2", "--hidden", "3", "--steps", "2",
                               "--models", "md", "--out", str(tmp_path), "--no-plot"])
    assert res.exit_code == 1 and not isinstance(res.exception, OSError), res.output
    assert (f"cannot write {tmp_path / 'summary.tsv'} (No space left on device); the models' runs are "
            f"saved in their folders under {tmp_path}") in res.output
    assert (tmp_path / "md" / "checkpoint.npz").exists() and not (tmp_path / "summary.tsv").exists()


def test_plot(runner, tmp_path):
    res = train(runner, tmp_path / "run", "--plot")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "predictions.png").stat().st_size > 1000


def test_resume_redraws_the_runs_plots(runner, tmp_path):
    run = tmp_path / "run"
    assert train(runner, run, "--plot").exit_code == 0
    (run / "loss.png").write_bytes(b"old plot")
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "8"])
    assert res.exit_code == 0 and "plots: " in res.output, res.output
    assert (run / "loss.png").stat().st_size > 1000
    (run / "loss.png").write_bytes(b"old plot")
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "9", "--no-plot"])
    assert res.exit_code == 0 and (run / "loss.png").read_bytes() == b"old plot"  # as asked
    assert train(runner, tmp_path / "plain").exit_code == 0
    res = runner.invoke(main, ["train", "--resume", str(tmp_path / "plain"), "--steps", "8"])
    assert res.exit_code == 0 and "plots: " not in res.output  # a run without plots gets none
    add = tmp_path / "add"  # binary addition draws loss.png only
    res = runner.invoke(main, ["train", "--task", "binary-addition", "--model", "lstm", "--size", "4",
                               "--steps", "3", "--plot", "--out", str(add)])
    assert res.exit_code == 0 and not (add / "predictions.png").exists(), res.output
    (add / "loss.png").write_bytes(b"old plot")
    res = runner.invoke(main, ["train", "--resume", str(add), "--steps", "5"])
    assert res.exit_code == 0 and (add / "loss.png").stat().st_size > 1000, res.output


def test_binary_addition_cli(runner, tmp_path):
    res = runner.invoke(main, ["train", "--model", "lstm", "--task", "binary-addition", "--size", "4",
                               "--steps", "3", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "number_acc" in (tmp_path / "log.tsv").read_text().splitlines()[0]
    assert json.loads((tmp_path / "config.json").read_text())["config"]["loss"] == "bce"  # the task's


ADDITION = ["--task", "binary-addition", "--model", "lstm"]


@pytest.mark.parametrize("args,loss", [([], "mse"), (["--loss", "bce"], "bce"), (ADDITION, "bce"),
                                       (ADDITION + ["--loss", "mse"], "mse")])
def test_the_default_loss_is_the_tasks(runner, tmp_path, args, loss):
    """The diagonal task trains with the seed's MSE, binary addition with BCE."""
    res = runner.invoke(main, ["train", "--size", "4", "--steps", "1", "--out", str(tmp_path)] + args)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "config.json").read_text())["config"]["loss"] == loss


HOLD_FOLDER = """
import sys
from mdnumba.checkpoint import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_folder_another_process_trains_in_is_refused(runner, tmp_path):
    """Two runs resumed into one folder each trained on, and the folder ended with the checkpoint
    of one and the log of the other: a training process locks its folder (as ``HOLD_FOLDER``
    does), and a resume, an --overwrite or a ``Trainer.run`` there is refused before it reads
    or removes anything; once the other process has ended the resume goes on."""
    pytest.importorskip("fcntl")
    from mdnumba.checkpoint import FolderInUseError
    from mdnumba.train import Trainer
    run = tmp_path / "run"
    assert train(runner, run).exit_code == 0
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FOLDER, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        said = f"another process is training in {run}; wait for it to end, or stop it"
        for args in (["train", "--resume", str(run), "--steps", "9"],
                     ["train", "--overwrite", "--out", str(run)]):
            res = runner.invoke(main, args)
            assert res.exit_code == 1 and said in " ".join(res.output.split()), res.output
        with pytest.raises(FolderInUseError, match="another process is training in"):
            Trainer.load(run, steps=9).run()
        assert {p.name: p.read_bytes() for p in run.iterdir()} == files
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "9", "--no-plot"])
    assert res.exit_code == 0, res.output


def test_resume_refuses_options_that_would_change_the_run(runner, tmp_path):
    run = tmp_path / "run"
    assert train(runner, run).exit_code == 0
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "8", "--batch", "5"])
    assert res.exit_code == 2 and "--batch 5 differs from the run" in res.output, res.output
    assert "it may change only --steps, --device, --sync-every, --checkpoint-every, --data, --lr, " \
        "--clip-norm)" in res.output, res.output
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "4"])
    assert res.exit_code == 2 and "at step 6; --steps must be > 6" in res.output, res.output
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "8", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "leave out --out" in res.output, res.output
    assert json.loads((run / "config.json").read_text())["config"]["steps"] == 6
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "7", "--size", "5",
                               "--checkpoint-every", "1"])  # the run's own value is no change
    assert res.exit_code == 0 and "resuming" in res.output, res.output


def test_resume_with_unusable_cuda_names_the_option(runner, tmp_path):
    from mdnumba.backend_cuda import cuda_available
    if cuda_available():
        pytest.skip("CUDA is usable here")
    assert train(runner, tmp_path / "run").exit_code == 0
    res = runner.invoke(main, ["train", "--resume", str(tmp_path / "run"), "--steps", "8",
                               "--device", "cuda"])
    assert res.exit_code == 2 and "--device cuda is not available" in res.output, res.output
    assert "trained with" not in res.output


def test_train_refuses_to_overwrite_a_run(runner, tmp_path):
    run = tmp_path / "run"
    assert train(runner, run).exit_code == 0
    before = (run / "checkpoint.npz").read_bytes()
    res = train(runner, run, "--seed", "3")
    assert res.exit_code == 2 and "already holds a run; continue it with --resume" in res.output
    assert (run / "checkpoint.npz").read_bytes() == before
    res = train(runner, run, "--seed", "3", "--overwrite")
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["config"]["seed"] == 3


def test_train_refuses_to_write_over_files_that_are_not_a_run(runner, tmp_path):
    """A folder with its own config.json or log.tsv but no checkpoint: kept unless --overwrite."""
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "log.tsv").write_text("my notes")
    res = train(runner, out)
    assert res.exit_code == 2, res.output
    assert "holds config.json, log.tsv, which the run would write over" in " ".join(res.output.split())
    assert (out / "config.json").read_text() == '{"mine": true}'
    assert (out / "log.tsv").read_text() == "my notes"
    assert not (out / "checkpoint.npz").exists()
    res = train(runner, out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert "mine" not in (out / "config.json").read_text()


def test_default_out_is_replaced(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--size", "4", "--batch", "2", "--hidden", "2", "--steps", "2"]
    for seed in ("1", "2"):
        res = runner.invoke(main, args + ["--seed", seed])
        assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "runs/latest/config.json").read_text())["config"]["seed"] == 2


def test_plot_without_matplotlib_stops_before_training(runner, tmp_path, monkeypatch):
    import mdnumba.cli.main as cli
    monkeypatch.setattr(cli, "_plot_problem", lambda: "needs matplotlib: pip install 'mdnumba[plot]'")
    res = train(runner, tmp_path / "run", "--plot")
    assert res.exit_code == 2 and "--plot needs matplotlib" in res.output, res.output
    assert not (tmp_path / "run" / "log.tsv").exists()
    res = runner.invoke(main, ["compare", "--models", "md", "--size", "4", "--batch", "2", "--hidden", "2",
                               "--steps", "2", "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0 and "no compare.png: plotting needs matplotlib" in res.output, res.output


def test_a_matplotlib_that_fails_to_import_is_named_so(monkeypatch):
    """An installed matplotlib that failed to import was reported as missing ("pip install"),
    and only once the training was done."""
    import types

    from mdnumba.plotting import matplotlib_problem
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert matplotlib_problem() == "needs matplotlib: pip install 'mdnumba[plot]'"
    monkeypatch.setitem(sys.modules, "matplotlib", types.ModuleType("matplotlib"))  # a broken one
    assert matplotlib_problem().startswith("needs matplotlib, which is installed but failed to import "
                                           "(AttributeError: ")


def test_a_resume_that_cannot_redraw_its_plots_says_so_before_training(runner, tmp_path, monkeypatch):
    """Without matplotlib a resumed run's PNGs stayed those of the old step without a word; a
    folder in a PNG's place failed the command once the training was done."""
    import mdnumba.cli.main as cli
    run = tmp_path / "run"
    assert train(runner, run, "--plot").exit_code == 0
    with monkeypatch.context() as m:
        m.setattr(cli, "_plot_problem", lambda: "needs matplotlib: pip install 'mdnumba[plot]'")
        res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "7"])
    assert res.exit_code == 0 and "warning: loss.png, predictions.png will not be redrawn: plotting " \
        "needs matplotlib" in res.output, res.output
    (run / "loss.png").unlink()
    (run / "loss.png").mkdir()
    for plot in ([], ["--plot"]):
        res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "8", *plot])
        assert res.exit_code == 2 and f"cannot write the plot {run / 'loss.png'}: it is not a file" \
            in " ".join(res.output.split()), res.output
    assert json.loads((run / "config.json").read_text())["step"] == 7
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "8", "--no-plot"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("args,message", [
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--models", "md,md"], "each model once"),
    (["--seed", "-2"], "--seed"),
    (["--models", ","], "not valid"),
    (["--out", ""], "Invalid value for '--out': is empty"),
    (["--size", "2"], "--size (image side) must be >= 4, got 2"),  # train's own words
])
def test_compare_checks_options_before_creating_anything(runner, tmp_path, args, message):
    res = runner.invoke(main, ["compare", "--out", str(tmp_path / "cmp"), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert "==" not in res.output and not (tmp_path / "cmp").exists()


def test_compare_refuses_to_overwrite(runner, tmp_path):
    args = ["compare", "--models", "md", "--size", "4", "--batch", "2", "--hidden", "2", "--steps", "2",
            "--no-plot", "--out", str(tmp_path)]
    assert runner.invoke(main, args).exit_code == 0
    res = runner.invoke(main, args + ["--models", "md,horizontal"])
    assert res.exit_code == 2 and "already holds a comparison (summary.tsv)" in res.output, res.output
    assert not (tmp_path / "horizontal").exists()  # refused before the models' folders are made
    assert runner.invoke(main, args + ["--overwrite"]).exit_code == 0


def test_compare_overwrite_removes_no_run_its_table_names_outside_its_folder(runner, tmp_path):
    """An old summary.tsv names the runs --overwrite removes: one edited to name ../victim, an
    absolute path or a symlink had those runs deleted. Only the task's models, real sub-folders."""
    out = tmp_path / "cmp"
    args = ["--size", "4", "--batch", "2", "--hidden", "2", "--steps", "2", "--no-plot", "--out", str(out)]
    for victim in ("victim", "elsewhere", "linked"):
        assert train(runner, tmp_path / victim).exit_code == 0
    assert runner.invoke(main, ["compare", "--models", "md", *args]).exit_code == 0
    os.symlink(tmp_path / "linked", out / "snake")
    (out / "summary.tsv").write_text(f"model\tloss\nmd\t1\n../victim\t1\n{tmp_path / 'elsewhere'}\t1\n"
                                     "snake\t1\n")
    res = runner.invoke(main, ["compare", "--models", "horizontal", *args, "--overwrite"])
    assert res.exit_code == 0, res.output
    for victim in ("victim", "elsewhere", "linked"):
        assert (tmp_path / victim / "checkpoint.npz").is_file(), victim
    assert not (out / "md").exists()  # the old comparison's own run goes
    (out / "compare.png").mkdir()
    res = runner.invoke(main, ["compare", "--models", "md", *args, "--overwrite"])
    assert res.exit_code == 2 and f"cannot replace {out / 'compare.png'}: it is not a file" in res.output
    assert (out / "horizontal" / "checkpoint.npz").is_file()  # refused before the old runs went


def test_a_plot_that_cannot_be_written_is_named_and_the_run_kept(runner, tmp_path, monkeypatch):
    """A resumed run's loss.png that cannot be written after training (a full disk; a folder in
    its place was IsADirectoryError's traceback, and is now refused before training): an error
    naming it, the run's new checkpoint saved."""
    import errno

    from matplotlib.figure import Figure
    run = tmp_path / "run"
    assert train(runner, run, "--plot").exit_code == 0

    def full_disk(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", full_disk)
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "8"])
    said = f"Error: cannot write the plot {run / 'loss.png'} ("
    assert res.exit_code == 1 and said in res.output, res.output
    assert json.loads((run / "config.json").read_text())["step"] == 8


def test_a_folder_option_that_cannot_be_looked_at_is_named(runner, tmp_path):
    """A name too long (or a folder on the way the user may not enter) was an OSError's traceback;
    something that exists but is no folder (/dev/null) is named as such."""
    long = str(tmp_path / ("x" * 300))
    for args in (["train", "--out", long], ["evaluate", long], ["train", "--resume", long]):
        res = runner.invoke(main, args)
        assert res.exit_code == 2 and "File name too long" in res.output, (args, res.output)
    res = runner.invoke(main, ["evaluate", "/dev/null"])
    assert res.exit_code == 2 and "/dev/null is not a folder; give a folder (the run folder" in res.output


def test_an_unreadable_checkpoint_is_not_called_corrupt(runner, tmp_path, monkeypatch):
    """is_zipfile says False for a file it cannot open: the advice was to delete the checkpoint."""
    import builtins

    import mdnumba.checkpoint
    assert train(runner, tmp_path / "run").exit_code == 0

    def denied(path, *args, **kw):
        if str(path).endswith("checkpoint.npz"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kw)
    monkeypatch.setattr(mdnumba.checkpoint, "open", denied, raising=False)
    res = runner.invoke(main, ["evaluate", str(tmp_path / "run")])
    assert res.exit_code != 0 and "cannot read checkpoint" in res.output and "(Permission denied); give " \
        "this user read access" in res.output and "delete" not in res.output, res.output


def test_resume_of_a_finished_run_asks_for_more_steps(runner, tmp_path):
    assert train(runner, tmp_path / "run").exit_code == 0
    res = runner.invoke(main, ["train", "--resume", str(tmp_path / "run")])
    assert res.exit_code == 2 and "at step 6; --steps must be > 6" in res.output, res.output


def test_resume_messages_show_values_as_typed(runner, tmp_path):
    assert train(runner, tmp_path / "run", "--curriculum", "4").exit_code == 0
    res = runner.invoke(main, ["train", "--resume", str(tmp_path / "run"), "--steps", "9",
                               "--curriculum", "4,5"])
    assert res.exit_code == 2 and "--curriculum 4,5 differs from the run in" in res.output, res.output
    assert "(4); --resume" in res.output
    assert train(runner, tmp_path / "plain").exit_code == 0
    res = runner.invoke(main, ["train", "--resume", str(tmp_path / "plain"), "--steps", "9",
                               "--curriculum", "4"])
    assert res.exit_code == 2 and "--curriculum 4 differs from the run in" in res.output, res.output
    assert "(none); --resume" in res.output  # not "()"


def test_overwrite_removes_the_old_runs_files(runner, tmp_path):
    run = tmp_path / "run"
    assert train(runner, run).exit_code == 0
    (run / "predictions.png").write_bytes(b"old plot")
    (run / "loss.png").write_bytes(b"old plot")
    (run / "log.unreadable-20261203-120000.tsv").write_text("step\tloss\n")  # the old run's log set aside
    (run / "notes.txt").write_text("mine")  # not a run's file: kept
    res = runner.invoke(main, ["train", "--model", "md3d", "--task", "diagonal3d", "--size", "4",
                               "--batch", "2", "--hidden", "2", "--steps", "2", "--out", str(run),
                               "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (run / "predictions.png").exists() and not (run / "loss.png").exists()
    assert not list(run.glob("log.unreadable-*")) and (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "config.json").read_text())["config"]["model"] == "md3d"


def test_overwrite_of_a_folder_named_like_a_run_file_is_refused(runner, tmp_path):
    (tmp_path / "checkpoint.npz").mkdir()
    res = runner.invoke(main, ["train", "--out", str(tmp_path), "--overwrite", "--steps", "2"])
    assert res.exit_code == 2 and f"cannot replace {tmp_path / 'checkpoint.npz'}" in res.output


def test_the_default_out_given_explicitly_is_replaced_too(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--size", "4", "--batch", "2", "--hidden", "2", "--steps", "2", "--out", "runs/latest"]
    assert runner.invoke(main, args).exit_code == 0
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output


def test_compare_checks_every_run_folder_before_training(runner, tmp_path):
    (tmp_path / "horizontal").write_text("a file where a run folder should go")
    res = runner.invoke(main, ["compare", "--models", "md,horizontal", "--size", "4", "--batch", "2",
                               "--hidden", "2", "--steps", "2", "--no-plot", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "not writable" in res.output, res.output
    assert "==" not in res.output and not (tmp_path / "md" / "log.tsv").exists()


def test_a_text_error_creates_no_run_folder(runner, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    res = runner.invoke(main, ["train", "--task", "char-lm", "--model", "stacked", "--data", str(empty),
                               "--out", str(tmp_path / "lm")])
    assert res.exit_code == 2 and "empty" in res.output, res.output
    assert not (tmp_path / "lm").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished tiny run, for tests that damage copies of it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train(CliRunner(), run).exit_code == 0
    return run


def _edited_copy(run: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``run`` whose checkpoint went through ``edit(arrays, meta)``."""
    from mdnumba.checkpoint import load_checkpoint, save_checkpoint
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    arrays, meta = load_checkpoint(copy)
    edit(arrays, meta)
    save_checkpoint(copy, arrays, meta)
    return copy


@pytest.mark.parametrize("key,value", [("curriculum", 8), ("hidden", "many"), ("hidden", 3.0), ("size", 4.5),
                                       ("lr", True), ("steps", True), ("tie_depth", "x"), ("seed", -1)])
def test_a_hand_edited_checkpoint_config_is_reported(runner, tmp_path, trained_run, key, value):
    """Values of the wrong type too (they reached NumPy or the layers as raw TypeErrors)."""
    run = _edited_copy(trained_run, tmp_path, lambda arrays, meta: meta["config"].update({key: value}))
    for args in (["evaluate", str(run)], ["train", "--resume", str(run), "--steps", "9"]):
        res = runner.invoke(main, args)
        assert res.exit_code == 1 and "invalid config" in res.output, res.output
        assert f"{key} must be" in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("edit,message", [
    (lambda arrays, meta: meta.update(adam_t=10 ** 400), "optimizer state step t must be an integer"),
    (lambda arrays, meta: meta["rng"]["state"].update(state=-1), "damaged"),  # NumPy 1.x wrapped it
    (lambda arrays, meta: meta["rng"].update(has_uint32=-1),
     "damaged or from another version (RNG state 'has_uint32' must be an integer from 0 to 1, got -1)"),
    (lambda arrays, meta: meta["rng"].update(bit_generator="MT19937"),
     "(RNG state 'bit_generator' is 'MT19937', not 'PCG64')"),
    (lambda arrays, meta: meta["rng"].pop("uinteger"), "(RNG state is not laid out as a PCG64 state)"),
    (lambda arrays, meta: meta["rng"].update(uinteger=2 ** 32),
     "(RNG state 'uinteger' must be an integer from 0 to 4294967295, got 4294967296)"),
    (lambda arrays, meta: arrays.update(param_0=np.full(arrays["param_0"].shape, 1e39)),
     "layer 0's weights hold NaN or infinite values (in float32)"),  # finite in float64 only
    (lambda arrays, meta: arrays.update(param_0=arrays["param_0"][None]),
     "layer 0 has parameters of shape (1, 200), the model built from the config (200,)"),
])
def test_a_damaged_checkpoint_is_refused_before_any_step(runner, tmp_path, trained_run, edit, message):
    run = _edited_copy(trained_run, tmp_path, edit)
    log = (run / "log.tsv").read_text()
    for args in (["evaluate", str(run)], ["train", "--resume", str(run), "--steps", "9"]):
        res = runner.invoke(main, args)
        assert res.exit_code == 1 and message in res.output, res.output
    assert (run / "log.tsv").read_text() == log


def test_a_hand_edited_checkpoint_step_is_reported(runner, tmp_path):
    from mdnumba.checkpoint import load_checkpoint, save_checkpoint
    assert train(runner, tmp_path / "run").exit_code == 0
    arrays, meta = load_checkpoint(tmp_path / "run")
    meta["step"] = "abc"
    save_checkpoint(tmp_path / "run", arrays, meta)
    res = runner.invoke(main, ["evaluate", str(tmp_path / "run")])
    assert res.exit_code == 1 and "damaged" in res.output, res.output


def test_resume_and_evaluate_refuse_what_the_run_would_ignore(runner, tmp_path):
    run = tmp_path / "run"
    assert train(runner, run).exit_code == 0
    text = tmp_path / "t.txt"
    text.write_text("some text")
    for extra, message in ((["--sync-every", "5"], "--sync-every (--device cuda only)"),
                           (["--data", str(text)], "--data (char-lm only)"),
                           (["--dropout", "0.1"], "not used by this run, leave out: --dropout"),
                           (["--overwrite"], "leave out --out and --overwrite")):
        res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "8", *extra])
        assert res.exit_code == 2 and message in res.output, (extra, res.output)
    res = runner.invoke(main, ["evaluate", str(run), "--data", str(text)])
    assert res.exit_code == 2 and "not used by this run, leave out: --data (char-lm only)" in res.output, \
        res.output


def test_an_occupied_folder_is_refused_before_the_kernels_compile(runner, tmp_path, monkeypatch):
    """A run, a comparison's table or a model's run in the folder is refused before the memory
    probe's steps, where a first run compiles the kernels: a minute's wait, before, for a
    message about the folder."""
    from mdnumba import train as train_module
    run, cmp = tmp_path / "run", tmp_path / "cmp"
    assert train(runner, run).exit_code == 0
    (cmp / "md").mkdir(parents=True)
    for name in ("checkpoint.npz", "config.json", "log.tsv"):  # a compare cut short: no summary.tsv
        (cmp / "md" / name).write_bytes((run / name).read_bytes())

    def probe(cfg):
        raise AssertionError("probed")

    monkeypatch.setattr(train_module, "check_step_memory", probe)
    compare = ["compare", "--models", "snake,md", "--size", "4", "--no-plot", "--out", str(cmp)]
    for args, message in ((["train", "--out", str(run)], "already holds a run; continue it with --resume"),
                          (compare, f"{cmp / 'md'} already holds a run; replace it with --overwrite")):
        res = runner.invoke(main, args)
        assert res.exit_code == 2 and message in res.output, res.output
    (cmp / "summary.tsv").write_text("model\tloss\n")
    res = runner.invoke(main, ["train", "--out", str(cmp)])
    assert res.exit_code == 2 and "holds the runs of `mdnumba compare`" in res.output, res.output
    assert isinstance(train(runner, tmp_path / "new").exception, AssertionError)  # the probe: reached


def test_a_latest_symlink_does_not_make_a_named_run_replaceable(runner, tmp_path, monkeypatch):
    """runs/latest is replaced without asking, but not through a symlink to a named run, and
    the named run is not runs/latest because a symlink points there."""
    monkeypatch.chdir(tmp_path)
    assert train(runner, "runs/md8").exit_code == 0
    (tmp_path / "runs" / "latest").symlink_to("md8")
    weights = (tmp_path / "runs" / "md8" / "checkpoint.npz").read_bytes()
    for out in ("runs/md8", "runs/latest", "./runs/../runs/md8"):
        res = train(runner, out, "--seed", "5")
        assert res.exit_code == 2 and "already holds a run" in res.output, (out, res.output)
    assert (tmp_path / "runs" / "md8" / "checkpoint.npz").read_bytes() == weights


def test_runs_latest_is_the_default_by_any_path(runner, tmp_path, monkeypatch):
    """Reached through a symlinked working folder (the shell's $PWD is not getcwd()), given as
    an absolute or a relative path: runs/latest is replaced without asking."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    monkeypatch.chdir(tmp_path / "link")
    for out in ("runs/latest", str(tmp_path / "link" / "runs" / "latest"), "./runs/../runs/latest"):
        res = train(runner, out)
        assert res.exit_code == 0, (out, res.output)


def test_compare_replaces_its_default_folder(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["compare", "--models", "md", "--size", "4", "--batch", "2", "--hidden", "2", "--steps", "2",
            "--no-plot"]
    for _ in range(2):
        res = runner.invoke(main, args)
        assert res.exit_code == 0, res.output
    assert (tmp_path / "runs" / "compare" / "md" / "log.tsv").exists()


def test_checkpoint_with_non_finite_weights_is_damaged(runner, tmp_path):
    assert train(runner, tmp_path / "run").exit_code == 0
    ck = tmp_path / "run" / "checkpoint.npz"
    data = dict(np.load(ck))
    data["param_0"][3] = np.nan  # one is enough
    np.savez(ck, **data)
    for args in (["evaluate", str(tmp_path / "run")], ["train", "--resume", str(tmp_path / "run"),
                                                       "--steps", "9"]):
        res = runner.invoke(main, args)
        assert res.exit_code == 1, res.output
        assert "damaged: layer 0's weights hold NaN or infinite values" in res.output, res.output


@pytest.mark.parametrize("step", [-5, 2.5, True])
def test_checkpoint_with_a_bad_step_is_damaged(runner, tmp_path, step):
    """Resuming at a negative step would rewrite log.tsv from there: refused like other damage."""
    assert train(runner, tmp_path / "run").exit_code == 0
    ck = tmp_path / "run" / "checkpoint.npz"
    data = dict(np.load(ck))
    meta = json.loads(str(data["meta"]))
    data["meta"] = np.array(json.dumps(dict(meta, step=step)))
    np.savez(ck, **data)
    log = (tmp_path / "run" / "log.tsv").read_text()
    for args in (["evaluate", str(tmp_path / "run")], ["train", "--resume", str(tmp_path / "run"),
                                                       "--steps", "9"]):
        res = runner.invoke(main, args)
        assert res.exit_code == 1, res.output
        assert f"its step must be an integer in [0, 2**63), got {step!r}" in res.output, res.output
    assert (tmp_path / "run" / "log.tsv").read_text() == log


@pytest.mark.parametrize("hidden,code,message", [
    ("100000", 1, "out of memory (Unable to allocate"),                       # 373 GiB of weights
    ("1000000", 2, "parameters ({'W': (1, 5000000), 'U': (1000000, 2, 5000000)"),  # > 2**40
])
def test_a_model_too_large_is_a_message(runner, tmp_path, hidden, code, message):
    res = runner.invoke(main, ["train", "--hidden", hidden, "--steps", "1", "--out", str(tmp_path / "r")])
    assert res.exit_code == code and isinstance(res.exception, SystemExit), res.output
    assert message in res.output and ("smaller --hidden" in res.output or "smaller hidden" in res.output)
    assert not (tmp_path / "r").exists()


def test_evaluate_out_of_memory_names_its_own_options(runner, tmp_path):
    """Also at sizes whose batch NumPy cannot even describe (it says "array is too big" or "Maximum
    allowed dimension exceeded"), and for binary addition."""
    assert train(runner, tmp_path / "run").exit_code == 0
    assert train(runner, tmp_path / "add", "--task", "binary-addition", "--model", "lstm").exit_code == 0
    for run, size in (("run", "200000"), ("run", "3037000500"), ("run", str(10**20)), ("add", str(10**20))):
        res = runner.invoke(main, ["evaluate", str(tmp_path / run), "--size", size, "--batches", "1"])
        assert res.exit_code == 1 and f"out of memory (a batch of 4 at size {size} needs about" \
            in res.output, res.output
        assert "use a smaller --size (the batch is the run's)" in res.output and "--hidden" not in res.output


def test_a_step_that_would_not_fit_is_refused_before_training(runner, tmp_path, monkeypatch):
    """Linux would promise the memory and kill the run when it is touched, without a message."""
    import mdnumba.memory
    assert train(runner, tmp_path / "run").exit_code == 0
    monkeypatch.setattr(mdnumba.memory, "available_memory", lambda: 0)
    for args in (["train", "--out", str(tmp_path / "new"), "--hidden", "64", "--size", "16"],
                 ["train", "--resume", str(tmp_path / "run"), "--steps", "9"]):
        res = runner.invoke(main, args)
        assert res.exit_code == 1, res.output
        assert "Error: out of memory (a training step needs at least " in res.output  # its floor
        assert "this machine has 0 MiB available); use a smaller --hidden" in " ".join(res.output.split())
    assert not (tmp_path / "new").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["step"] == 6  # untouched


def test_gpu_out_of_memory_is_a_message(runner, tmp_path, monkeypatch):
    """numba-cuda's CudaAPIError with CUDA_ERROR_OUT_OF_MEMORY (a stand-in: no GPU here); its
    other errors stay errors with their traceback."""
    import enum

    import mdnumba.cli.main as cli

    class CUresult(enum.Enum):  # cuda-bindings' codes are enum members, not ints
        CUDA_ERROR_OUT_OF_MEMORY = 2
        CUDA_ERROR_ILLEGAL_ADDRESS = 700

    class CudaAPIError(Exception):
        def __init__(self, code, msg):
            super().__init__(code, msg)
            self.code = code

    class OtherError(CudaAPIError):
        pass

    def fail(error, code):
        def make(*args, **kw):
            raise error(code, "cuMemAlloc results in CUDA_ERROR_OUT_OF_MEMORY")
        return make
    for code in (2, CUresult.CUDA_ERROR_OUT_OF_MEMORY):
        monkeypatch.setattr(cli, "_make_trainer", fail(CudaAPIError, code))
        res = runner.invoke(main, ["train", "--steps", "1", "--out", str(tmp_path / "r")])
        assert res.exit_code == 1 and "Error: GPU out of memory (" in res.output, res.output
        assert "use a smaller --hidden, --batch, --size (char-lm: --seq-len) or --layers" in \
            " ".join(res.output.split())
    for error, code in ((CudaAPIError, 700), (CudaAPIError, CUresult.CUDA_ERROR_ILLEGAL_ADDRESS),
                        (OtherError, 2)):  # only numba-cuda's CudaAPIError, only that code
        monkeypatch.setattr(cli, "_make_trainer", fail(error, code))
        res = runner.invoke(main, ["train", "--steps", "1", "--out", str(tmp_path / "r")])
        assert isinstance(res.exception, error)


def test_unwritable_resume_folder_says_to_copy_it(runner, tmp_path, monkeypatch):
    """Before the probe steps, where a first run compiles the kernels."""
    from mdnumba import train as train_module
    assert train(runner, tmp_path / "run").exit_code == 0

    def read_only(*args, **kw):
        raise PermissionError(13, "Read-only file system")
    monkeypatch.setattr("tempfile.mkstemp", read_only)
    monkeypatch.setattr(train_module, "check_step_memory", lambda cfg: pytest.fail("probed"))
    res = runner.invoke(main, ["train", "--resume", str(tmp_path / "run"), "--steps", "9"])
    assert res.exit_code == 2, res.output
    assert f"the run folder {tmp_path / 'run'} is not writable (Read-only file system); copy the run" \
        in " ".join(res.output.split()), res.output
    assert "--out" not in res.output


def test_compare_over_a_run_does_not_suggest_resume(runner, tmp_path):
    args = ["compare", "--models", "md", "--size", "4", "--batch", "2", "--hidden", "2", "--steps", "2",
            "--no-plot", "--out", str(tmp_path)]
    assert runner.invoke(main, args).exit_code == 0
    res = runner.invoke(main, args)
    assert res.exit_code == 2 and "replace it with --overwrite, or choose another --out" in res.output
    assert "--resume" not in res.output


def test_done_line_counts_steps_and_the_metrics_say_what_they_are(runner, tmp_path):
    res = runner.invoke(main, ["train", "--model", "md", "--size", "4", "--batch", "2", "--hidden", "2",
                               "--steps", "1", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0 and "done: 1 step; log" in res.output, res.output
    assert "on fresh data (5 batches; `mdnumba evaluate` takes 20 by default):\n" in res.output


def test_a_closed_stdout_stops_training_with_the_steps_saved(tmp_path):
    """``mdnumba train | head``: once the reader is gone the run stops as on Ctrl-C, saving the
    steps done (before, the write error ended it without a checkpoint or a message)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mdnumba", "train", "--size", "4", "--batch", "2",
                             "--hidden", "2", "--steps", "1000000", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.read(1)  # training has started
    proc.stdout.close()
    try:
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Error: stdout was closed: stopped at step" in err, err
    step = json.loads((out / "config.json").read_text())["step"]
    assert f"stopped at step {step};" in err and 1 <= step < 1000000
    assert (out / "log.tsv").read_text().splitlines()[-1].split("\t")[0] == str(step)


def test_the_resume_help_names_what_a_resume_may_change(runner):
    from mdnumba.train import RESUME_OVERRIDES
    help_text = " ".join(runner.invoke(main, ["train", "--help"]).output.split()).replace("- ", "-")  # wraps
    listed = help_text.split("only --steps (to extend it), ")[1].split(" may change")[0]
    named = ["--steps"] + listed.replace(" and ", ", ").split(", ")
    assert sorted(named) == sorted("--" + k.replace("_", "-") for k in RESUME_OVERRIDES), listed


def test_a_diverged_run_goes_on_from_its_checkpoint_with_a_new_step_size(runner, tmp_path, monkeypatch):
    """The divergence message says that --resume takes a new --lr / --clip-norm, and it does
    (refused before as "differs from the run": only a new run could change them)."""
    from mdnumba.train import Trainer
    real = Trainer.train_step

    def train_step(self):
        if self.step == 4 and self.cfg.lr == 1e-2:  # the gradients of step 5 diverge at the run's lr
            raise self._diverged("the gradients", self.step + 1)
        return real(self)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    run = tmp_path / "run"
    res = train(runner, run)
    assert res.exit_code == 1, res.output
    assert f"the gradients became NaN or infinite at step 5 (the checkpoint of step 3 is kept); lower --lr" \
           f", set --clip-norm or use --cell stable (bounded state on large grids); --resume {run} goes on " \
           "from it with a new --lr or --clip-norm" in " ".join(res.output.split()), res.output
    res = runner.invoke(main, ["train", "--resume", str(run), "--lr", "1e-3", "--clip-norm", "1",
                               "--no-plot"])
    assert res.exit_code == 0, res.output
    saved = json.loads((run / "config.json").read_text())
    assert saved["step"] == 6 and (saved["config"]["lr"], saved["config"]["clip_norm"]) == (1e-3, 1.0)


def test_a_probe_step_that_diverges_gives_the_divergence_advice(runner, tmp_path):
    """The memory probe's step of a graves cell on a 512x512 grid overflows (its state grows
    along the diagonals): the run stops with the advice its own first step would give, not a
    traceback, and creates nothing."""
    res = runner.invoke(main, ["train", "--size", "512", "--batch", "1", "--hidden", "4", "--steps", "1",
                               "--out", str(tmp_path / "big")])
    assert res.exit_code == 1 and res.exception.__class__ is SystemExit, res.output
    assert ("a probe step (batch 1) diverged: the cell state became NaN or infinite at step 1, before any "
            "update; use --cell stable (bounded state on large grids), use --dtype float64 (a wider range) "
            "or give a smaller --size") in " ".join(res.output.split()), res.output
    assert not (tmp_path / "big").exists()


def test_model_task_mismatch_names_the_task(runner, tmp_path):
    res = runner.invoke(main, ["train", "--model", "grid", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    assert "use --model md / horizontal / snake, or --task char-lm, which takes 'grid'" in \
        " ".join(res.output.split())


def test_files_a_run_cannot_write_are_messages(runner, tmp_path, monkeypatch):
    """A log that cannot be appended to is refused before training; a write that fails during
    training (a full disk, a checkpoint that cannot be replaced) ends with what was kept."""
    run = tmp_path / "run"
    assert train(runner, run).exit_code == 0
    (run / "log.tsv").unlink()
    (run / "log.tsv").mkdir()  # cannot be opened for appending, even by root
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "9"])
    assert res.exit_code == 2 and f"{run / 'log.tsv'} is a folder, where the run writes its log.tsv" \
        in " ".join(res.output.split())
    (run / "log.tsv").rmdir()

    def disk_full(*args, **kw):
        raise OSError(28, "No space left on device", str(run / "checkpoint.npz"))
    monkeypatch.setattr("mdnumba.train.save_checkpoint", disk_full)
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "9"])
    assert res.exit_code == 1 and res.exception.__class__ is SystemExit, res.output
    assert (f"could not write {run / 'checkpoint.npz'} (No space left on device) at step 9; the "
            f"checkpoint of step 6 is kept. Free disk space or fix the permissions, then continue with "
            f"--resume {run}") in " ".join(res.output.split()), res.output
    monkeypatch.undo()

    def log_full(*args, **kw):  # a write to a full disk: an OSError without a file name
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("mdnumba.train.Trainer._log_line", log_full)
    res = runner.invoke(main, ["train", "--out", str(tmp_path / "new"), "--size", "5", "--steps", "3"])
    assert res.exit_code == 1, res.output
    assert (f"could not write {tmp_path / 'new' / 'log.tsv'} (No space left on device) at step 1; no "
            f"checkpoint was saved yet. Free disk space or fix the permissions, then start the run "
            f"again (--overwrite: {tmp_path / 'new'} holds its first files)") in " ".join(res.output.split())


def test_a_run_removes_the_temp_files_of_a_killed_write(runner, tmp_path):
    """kill -9 during a checkpoint write leaves ``.checkpoint.npz.XXXX.tmp`` (never read, as
    large as a checkpoint): the next run of the folder removes such files, and only those."""
    run = tmp_path / "run"
    assert train(runner, run).exit_code == 0
    stale = [run / ".checkpoint.npz.k1ll3d_8.tmp", run / ".config.json.a1b2c3d4.tmp",
             run / ".log.tsv.x_y_z_w_.tmp"]  # mkstemp's 8 characters
    mine = [run / ".notes.tmp", run / "checkpoint.npz.tmp", run / ".config.json.my backup.tmp"]
    for path in stale + mine:
        path.write_text("x")
    assert runner.invoke(main, ["train", "--resume", str(run), "--steps", "8"]).exit_code == 0
    assert [p.exists() for p in stale + mine] == [False] * len(stale) + [True] * len(mine)


def test_resume_reads_a_log_that_is_not_utf8(runner, tmp_path):
    run = tmp_path / "run"
    assert train(runner, run).exit_code == 0
    (run / "log.tsv").write_bytes(bytes(range(128, 256)))
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "8"])
    assert res.exit_code == 0, res.output
    assert [r.split("\t")[0] for r in (run / "log.tsv").read_text().splitlines()[1:]] == ["7", "8"]
    assert f"warning: {run / 'log.tsv'} had another header" in res.output  # one line, no source
    assert [p.read_bytes() for p in run.glob("log.unreadable-*.tsv")] == [bytes(range(128, 256))]


def test_missing_checkpoint_hints_lead_somewhere(runner, tmp_path):
    """A folder holding a run that stopped before its first checkpoint, and a compare folder."""
    run = tmp_path / "early"
    run.mkdir()
    (run / "log.tsv").write_text("step\tloss\n1\t0.5\n")
    res = runner.invoke(main, ["evaluate", str(run)])
    assert res.exit_code == 1 and f"train first with `mdnumba train --out {run} --overwrite`" in res.output
    (run / "log.tsv").rename(run / "notes.tsv")  # another file: train writes beside it, no --overwrite
    res = runner.invoke(main, ["evaluate", str(run)])
    assert res.exit_code == 1 and f"train first with `mdnumba train --out {run}`" in res.output, res.output
    res = runner.invoke(main, ["sample", str(run)])  # a run it can sample: a char-lm one (was a diagonal one)
    assert res.exit_code == 1 and "train first with `mdnumba train --task char-lm --model grid --data FILE " \
                                  f"--out {run}`" in res.output, res.output
    assert train(runner, tmp_path / "moved").exit_code == 0  # a run whose checkpoint was moved away
    (tmp_path / "moved" / "checkpoint.npz").rename(tmp_path / "checkpoint.npz")
    res = runner.invoke(main, ["evaluate", str(tmp_path / "moved")])
    assert res.exit_code == 1 and "if it was moved, put it back; `mdnumba train --out" in res.output
    args = ["compare", "--models", "md,snake", "--size", "4", "--batch", "2", "--hidden", "2",
            "--steps", "2", "--no-plot", "--out", str(tmp_path / "cmp")]
    assert runner.invoke(main, args).exit_code == 0
    res = runner.invoke(main, ["evaluate", str(tmp_path / "cmp")])
    assert res.exit_code == 1
    assert f"it holds runs in its sub-folders md, snake: give one, e.g. {tmp_path / 'cmp' / 'md'}" in \
        " ".join(res.output.split())


def test_a_folder_named_config_json_is_refused_before_a_resumed_run_trains(runner, tmp_path):
    """It stopped the run two steps in, advising permissions (log.tsv: the test below)."""
    assert train(runner, tmp_path / "run").exit_code == 0
    (tmp_path / "run" / "config.json").unlink()
    (tmp_path / "run" / "config.json").mkdir()
    res = runner.invoke(main, ["train", "--resume", str(tmp_path / "run"), "--steps", "9"])
    assert res.exit_code == 2 and f"{tmp_path / 'run' / 'config.json'} is a folder, where the run " \
        "writes its config.json; move that folder away" in " ".join(res.output.split()), res.output
    assert load_checkpoint(tmp_path / "run")[1]["step"] == 6  # nothing trained


def test_a_file_where_a_folder_belongs(runner, tmp_path):
    assert train(runner, tmp_path / "run").exit_code == 0
    ckpt = tmp_path / "run" / "checkpoint.npz"
    for args in (["evaluate", str(ckpt)], ["train", "--resume", str(ckpt)]):
        res = runner.invoke(main, args)
        assert res.exit_code == 2 and f"{ckpt} is a file; give a folder (the run folder, which holds " \
            "checkpoint.npz)" in " ".join(res.output.split()), res.output
    res = runner.invoke(main, ["train", "--out", str(ckpt)])
    assert res.exit_code == 2 and "is a file; give a folder" in res.output and "run folder" not in res.output


def test_resume_shows_flags_as_typed(runner, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 40)
    run = tmp_path / "grid"
    args = ["train", "--task", "char-lm", "--model", "grid", "--data", str(text), "--hidden", "4",
            "--layers", "2", "--seq-len", "8", "--batch", "2", "--steps", "2", "--out", str(run)]
    assert runner.invoke(main, args).exit_code == 0
    res = runner.invoke(main, ["train", "--resume", str(run), "--steps", "4", "--no-tie-depth"])
    assert res.exit_code == 2 and f"--no-tie-depth differs from the run in {run} (--tie-depth)" in \
        " ".join(res.output.split()), res.output


def test_curriculum_needs_a_step_per_phase(runner, tmp_path):
    res = runner.invoke(main, ["train", "--size", "16", "--curriculum", "4,8", "--steps", "2",
                               "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--steps 2 is too few for 3 curriculum phases (4,8,16)" in res.output


def test_checkpoint_with_integer_weights_is_refused(runner, tmp_path):
    from mdnumba.checkpoint import load_checkpoint, save_checkpoint
    run = tmp_path / "run"
    assert train(runner, run).exit_code == 0
    arrays, meta = load_checkpoint(run)
    arrays["param_0"] = arrays["param_0"].astype(np.int64)
    meta.pop("format")
    save_checkpoint(run, arrays, meta)
    res = runner.invoke(main, ["evaluate", str(run)])
    assert res.exit_code == 1 and "layer 0's weights are int64, not floating point" in res.output, res.output


def test_train_and_compare_folders_do_not_mix(runner, tmp_path):
    run, cmp = tmp_path / "run", tmp_path / "cmp"
    assert train(runner, run).exit_code == 0
    args = ["compare", "--size", "4", "--batch", "2", "--hidden", "2", "--steps", "2", "--no-plot"]
    res = runner.invoke(main, args + ["--out", str(run)])
    assert res.exit_code == 2 and "holds a run of `mdnumba train` (checkpoint.npz)" in res.output
    assert runner.invoke(main, args + ["--models", "md,snake", "--out", str(cmp)]).exit_code == 0
    res = train(runner, cmp)
    assert res.exit_code == 2 and "holds the runs of `mdnumba compare` (summary.tsv)" in res.output
    (cmp / "snake" / "notes.txt").write_text("mine")
    res = runner.invoke(main, args + ["--models", "horizontal", "--out", str(cmp), "--overwrite"])
    assert res.exit_code == 0, res.output
    # md's run is gone; snake's folder keeps only the user's own file
    assert sorted(p.name for p in cmp.iterdir()) == ["horizontal", "snake", "summary.tsv"]
    assert [p.name for p in (cmp / "snake").iterdir()] == ["notes.txt"]
    assert [r.split("\t")[0] for r in (cmp / "summary.tsv").read_text().splitlines()[1:]] == ["horizontal"]


def _compile_a_kernel():
    """Compile one of mdnumba's kernels for real: a fresh, uncached dispatcher of its function."""
    from numba import njit

    from mdnumba.kernels.gemm import _count_nonfinite
    njit(_count_nonfinite.py_func)(np.zeros(3))


def _listeners():
    from numba.core import event
    return len(event._registered["numba:compile"])


@pytest.mark.parametrize("compiles,cache,notice", [
    (2, True, "compiling the kernels (the first run on this machine takes about a minute; later ones "
              "load them from the cache)\n"),
    (1, False, "compiling the kernels (MDNUMBA_CACHE=0: every run compiles them)\n"),
    (0, True, None)])
def test_a_command_says_when_it_compiles_the_kernels(runner, tmp_path, monkeypatch, compiles, cache, notice):
    """The notice comes as a command starts compiling a kernel (a load from the cache is none;
    before, it came from a guess at what the cache held, which said nothing when only the other
    sweep schedule was cached), once; the listener goes with the command."""
    import mdnumba.cli.main as cli

    from mdnumba import config
    from mdnumba import train as train_module
    assert train(runner, tmp_path / "first", "--steps", "1").exit_code == 0  # this process has them
    monkeypatch.setattr(cli, "_say_compiling", SAY_COMPILING)  # conftest silences it
    monkeypatch.setattr(config, "CACHE", cache)
    probe = train_module.check_step_memory

    def probe_and_compile(cfg):
        for _ in range(compiles):
            _compile_a_kernel()
        return probe(cfg)

    monkeypatch.setattr(train_module, "check_step_memory", probe_and_compile)
    before = _listeners()
    res = train(runner, tmp_path / "run", "--steps", "1")
    assert res.exit_code == 0, res.output
    if notice:
        assert res.output.count("compiling") == 1 and notice in res.output, res.output
    else:
        assert "compiling" not in res.output
    assert _listeners() == before


def test_the_notice_is_for_mdnumbas_own_compiles_and_once():
    from types import SimpleNamespace

    from numba.core import event

    from mdnumba.kernel_cache import FirstCompile
    said = []
    first = FirstCompile(lambda: said.append(1))
    with first.watching():
        with event.trigger_event("numba:compile", data={"dispatcher": SimpleNamespace(py_func=_listeners)}):
            pass  # not mdnumba's
        assert said == []
        _compile_a_kernel()
        _compile_a_kernel()
    assert said == [1]
