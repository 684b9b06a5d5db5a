"""The ``mdnumba`` command group. Thin: parses options, calls the library, prints."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import click

from mdnumba.checkpoint import TRAIN_COMMAND, CheckpointError, MissingCheckpointError
from mdnumba.info import collect_info
from mdnumba.kernel_cache import FirstCompile
from mdnumba.kernels.cell import CELLS
from mdnumba.models import MODELS
from mdnumba.tasks import TASKS
from mdnumba.train import EVAL_SEED

#: default run folders of train and compare: replaced without --overwrite (they hold "the latest")
DEFAULT_OUT, COMPARE_OUT = Path("runs/latest"), Path("runs/compare")


def _sizes(ctx, param, value):
    """Parse ``8,16`` into a tuple of ints."""
    if not value:
        return ()
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _folder(ctx, param, value: str | None) -> Path | None:
    """A run folder option as a Path; an empty one (``--out ""``, e.g. an unset shell variable)
    is refused rather than taken as the current folder."""
    if value is None:
        return None
    if not str(value).strip():
        raise click.BadParameter("is empty; give a folder (. for the current one)")
    try:
        kind = "" if not Path(value).exists() or Path(value).is_dir() else \
            "a file" if Path(value).is_file() else "not a folder"
    except OSError as exc:  # a name too long, a folder on the way this user may not enter
        raise click.BadParameter(f"{value}: {exc.strerror or exc}") from None
    if kind:
        run = " (the run folder, which holds checkpoint.npz)" if param.name != "out" else ""
        raise click.BadParameter(f"{value} is {kind}; give a folder{run}")
    return Path(value)


def _write_probe(folder: Path) -> None:
    """Create and remove a file in ``folder``: OSError where that fails."""
    fd, probe = tempfile.mkstemp(dir=folder)
    os.close(fd)
    os.unlink(probe)


def _refuse_dangling(out: Path, what: str) -> None:
    """A symlink ``out`` (``what``: how the message names it) to a folder that does not exist."""
    if out.is_symlink() and not out.exists():
        raise click.UsageError(f"{what} {out} is a symlink to {os.readlink(out)}, which does not "
                               "exist; create that folder or remove the link")


def _refuse_unwritable_out(out: Path) -> None:
    """A run folder ``out`` that could not be made or written to, refused before the probe steps
    compile the kernels, and without creating anything yet (they may still refuse the run):
    the folder, or the one it would be made in, must take a file."""
    _refuse_dangling(out, "--out")
    where = out.absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        if not where.is_dir():
            raise NotADirectoryError(20, f"{where} is not a folder")
        _write_probe(where)
    except OSError as exc:
        msg = f"--out {out} is not writable ({exc.strerror}); choose another folder"
        raise click.UsageError(msg) from None


def _check_writable(out: Path, resume: bool = False) -> None:
    """Create ``out`` and prove we can write there, before any training starts (``resume``:
    ``out`` is the run folder of ``--resume``, which cannot move)."""
    from mdnumba.train import LOG, refuse_folders_for_files
    _refuse_dangling(out, "the run folder" if resume else "--out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_probe(out)
    except OSError as exc:
        fix = ("copy the run folder somewhere writable and resume that copy" if resume
               else "choose another folder")
        msg = f"{'the run folder' if resume else '--out'} {out} is not writable ({exc.strerror}); {fix}"
        raise click.UsageError(msg) from None
    if not resume:  # a new run's files: _check_fresh
        return
    try:
        refuse_folders_for_files(out)
    except IsADirectoryError as exc:
        raise click.UsageError(str(exc)) from None
    if (out / LOG).exists():
        try:
            (out / LOG).open("a").close()
        except OSError as exc:
            raise click.UsageError(f"{out / LOG} is not writable ({exc.strerror}); fix its permissions "
                                   "(the run appends to it)") from None


def _say_compiling() -> None:
    """The notice for a command that compiles kernels, which otherwise shows nothing for tens of
    seconds: at its first kernel that no cache holds (every one with MDNUMBA_CACHE=0)."""
    from mdnumba import config
    why = ("the first run on this machine takes about a minute; later ones load them from the cache"
           if config.CACHE else "MDNUMBA_CACHE=0: every run compiles them")
    click.echo(f"compiling the kernels ({why})", err=True)


def _require_device(device: str) -> None:
    """Fail before any work when ``--device cuda`` cannot run here, saying what to do."""
    if device == "cuda":
        from mdnumba.backend_cuda import cuda_hint, cuda_unavailable_reason
        reason = cuda_unavailable_reason()
        if reason is not None:
            hint = cuda_hint(reason).replace("device='cpu'", "--device cpu")
            raise click.UsageError(f"--device cuda is not available: {reason}; {hint}")


class _Progress:
    """Progress bar callback showing step, loss and steps/s. When the reader of stdout goes
    away (``mdnumba train | head``) it stops the run as a first Ctrl-C does, so the steps
    done are saved, instead of the write error ending it unsaved."""

    def __init__(self, bar, trainer, every_s: float = 0.5):
        self.bar, self.trainer, self.t0, self.s0 = bar, trainer, time.perf_counter(), trainer.step
        self.every_s, self.last, self.closed = every_s, 0.0, False

    def __call__(self, step: int, m: dict) -> None:
        if self.closed:
            return
        now = time.perf_counter()
        try:
            if now - self.last >= self.every_s:  # a new label redraws (or, off a TTY, prints a line)
                self.last = now
                rate = (step - self.s0) / max(now - self.t0, 1e-9)
                extra = f" {m['chars_per_s']:.0f} chars/s" if "chars_per_s" in m else ""
                self.bar.label = f"step {step} loss {m['loss']:.4f} {rate:.1f} steps/s{extra}"
            self.bar.update(1)
        except BrokenPipeError:
            self.closed = True
            _silence_stdout()
            self.trainer.request_stop()


def _silence_stdout() -> None:
    """Point stdout at the null device once its reader is gone, so that later writes (the
    progress bar's last, Python's flush at exit) do not fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (e.g. captured in tests)
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def _run_with_progress(trainer, resume: str | None = None) -> None:
    """``trainer.run`` under a progress bar; a stop (Ctrl-C, a closed stdout, a failed write)
    says which checkpoint is kept and how to go on: ``resume``, or ``--resume`` of the run."""
    from mdnumba.charlm import CorpusError
    gentler = "" if resume else f"; --resume {trainer.out} goes on from it with a new --lr or --clip-norm"
    resume = resume or f"continue with --resume {trainer.out}"
    remaining = trainer.cfg.steps - trainer.step
    with click.progressbar(length=remaining, label="training", show_pos=True) as bar:
        progress = _Progress(bar, trainer)
        try:
            trainer.run(progress)
        except KeyboardInterrupt:
            if progress.closed:
                raise click.ClickException(f"stdout was closed: stopped at step {trainer.step}; "
                                           f"checkpoint in {trainer.out} ({resume})") from None
            if trainer.saved_step is None:
                raise click.ClickException(f"interrupted at step {trainer.step}; no checkpoint "
                                           "was saved yet") from None
            raise click.ClickException(f"interrupted at step {trainer.step}; checkpoint of step "
                                       f"{trainer.saved_step} in {trainer.out} ({resume})") from None
        except FloatingPointError as exc:
            raise click.ClickException(f"{exc}{gentler if trainer.saved_step is not None else ''}") from None
        except CorpusError as exc:  # a resumed char-lm run whose text is gone
            raise click.UsageError(str(exc)) from None
        except BrokenPipeError:  # the reader of stdout went away: the command group's to handle
            raise
        except OSError as exc:  # a full disk, a log or checkpoint that cannot be written
            then = (resume if trainer.saved_step is not None else
                    f"start the run again (--overwrite: {trainer.out} holds its first files)")
            kept = ("no checkpoint was saved yet" if trainer.saved_step is None else
                    f"the checkpoint of step {trainer.saved_step} is kept")
            raise click.ClickException(
                f"could not write {exc.filename or 'to ' + str(trainer.out)} ({exc.strerror or exc}) at "
                f"step {trainer.step}; {kept}. Free disk space or fix the permissions, then {then}") from None


def _print_metrics(metrics: dict) -> None:
    for k, v in metrics.items():
        click.echo(f"{k:>14}: {v:.6g}")


#: what a command that runs out of memory may shrink (train and compare: the model and batch)
SHRINK = {"evaluate": "a smaller --size (the batch is the run's)", "sample": "a smaller --length",
          "bench": "a smaller --size, --batch or --hidden", "predict": "a smaller INPUT or --batch"}

#: CUresult CUDA_ERROR_OUT_OF_MEMORY (numba-cuda raises CudaAPIError with it as ``code``)
CUDA_ERROR_OUT_OF_MEMORY = 2


def _out_of_memory(exc: Exception) -> str | None:
    """"out of memory" or "GPU out of memory" for the two ways an allocation fails, else None."""
    if isinstance(exc, MemoryError):
        return "out of memory"
    code = getattr(exc, "code", None)
    if type(exc).__name__ == "CudaAPIError" and getattr(code, "value", code) == CUDA_ERROR_OUT_OF_MEMORY:
        return "GPU out of memory"
    return None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (e.g. the library's notes on a resumed run's log) as one line on stderr."""
    click.echo(f"warning: {message}", err=True)


class _Group(click.Group):
    """The command group; running out of host or GPU memory (e.g. ``--hidden 100000``) is an
    error message that says what to shrink, not a traceback, and a reader of stdout that went
    away (``mdnumba sample RUN | head -c 100``) ends the command quietly."""

    def invoke(self, ctx: click.Context):
        try:
            with warnings.catch_warnings(), FirstCompile(_say_compiling).watching():
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except BrokenPipeError:
            _silence_stdout()
            ctx.exit(1)
        except Exception as exc:
            from mdnumba.checkpoint import CheckpointChangedError, FolderInUseError
            if isinstance(exc, (FolderInUseError, CheckpointChangedError)):
                raise click.ClickException(str(exc)) from None
            what = _out_of_memory(exc)
            if what is None:
                raise
            shrink = SHRINK.get(ctx.invoked_subcommand,
                                "a smaller --hidden, --batch, --size (char-lm: --seq-len) or --layers")
            raise click.ClickException(f"{what} ({exc}); use {shrink}") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mdnumba", prog_name="mdnumba")
def main() -> None:
    """mdnumba: multi-dimensional LSTMs with hand-written Numba kernels."""


@main.command()
def info() -> None:
    """Show versions, CPU threads and whether CUDA is usable."""
    for key, value in collect_info().items():
        click.echo(f"{key:>18}: {value}")


def _train_options(f):
    opts = [
        click.option("--model", type=click.Choice(sorted(MODELS) + ["grid", "stacked"]), default="md",
                     show_default=True, help="grid/stacked: char-lm models"),
        click.option("--task", type=click.Choice(sorted(TASKS)), default="diagonal", show_default=True),
        click.option("--size", type=int, default=8, show_default=True,
                     help="image side (diagonal, >= 4), volume side (diagonal3d, >= 4) or number "
                          "of bits (binary-addition); not used by char-lm"),
        click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True,
                     help="examples per step (char-lm: windows of --seq-len characters)"),
        click.option("--hidden", type=click.IntRange(min=1), default=16, show_default=True,
                     help="units per recurrent layer and scan direction (grid: per block)"),
        click.option("--lr", type=float, default=1e-2, show_default=True,
                     help="learning rate of --optimizer (> 0)"),
        click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True),
        click.option("--loss", type=click.Choice(["mse", "bce"]), default=None,
                     help="on the sigmoid readout  [default: bce for binary-addition, else mse]"),
        click.option("--clip-norm", type=float, default=None,
                     help="rescale the gradients when their global norm exceeds this (> 0; default: "
                          "no clipping)"),
        click.option("--curriculum", callback=_sizes, default="", metavar="SIZES",
                     help="increasing sizes below --size to train on first, e.g. 8,16 (equal phases, "
                          "then --size)"),
        click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
                     show_default=True),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="cuda: model, gradients, optimiser and batches live on the GPU "
                          "(@cuda.jit kernels; needs mdnumba[cuda])"),
        click.option("--sync-every", type=click.IntRange(min=1), default=50, show_default=True,
                     help="cuda: steps between host syncs (losses and metrics are read back then)"),
        click.option("--cell", type=click.Choice(list(CELLS)), default="graves",
                     show_default=True, help="stable: Leifert et al. 2016, bounded state on large grids"),
        click.option("--directions", type=int, default=1, show_default=True,
                     help="scan directions per layer: 1 or 2**ndim (4 for md, 8 for md3d, 2 for 1D)"),
        click.option("--layers", type=click.IntRange(min=1), default=1, show_default=True,
                     help="stacked recurrent layers (grid: depth of the grid)"),
        click.option("--data", type=click.Path(path_type=str), default=None,
                     help="char-lm: a UTF-8 text file"),
        click.option("--seq-len", type=click.IntRange(min=1), default=50, show_default=True,
                     help="char-lm: characters per training window"),
        click.option("--optimizer", type=click.Choice(["adam", "rmsprop"]), default="adam",
                     show_default=True, help="adam (β 0.9, 0.999) or rmsprop (char-rnn's: ρ 0.95, "
                                             "no bias correction)"),
        click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0,
                     show_default=True, help="char-lm: dropout on the non-recurrent connections"),
        click.option("--tie-depth/--no-tie-depth", default=True, show_default=True,
                     help="char-lm grid: share the weights of all depth levels"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value(v: object) -> str:
    """An option's value as it is typed (``8,16`` for a curriculum; ``none`` for no curriculum)."""
    return (",".join(map(str, v)) or "none") if isinstance(v, tuple) else str(v)


def _setting(k: str, v: object) -> str:
    """Option ``k`` with value ``v`` as typed: ``--size 8``, a flag ``--tie-depth`` / ``--no-tie-depth``."""
    if isinstance(v, bool):
        return _option(k) if v else "--no-" + _option(k)[2:]
    return f"{_option(k)} {_value(v)}"


def _config(given: dict | None = None, **kw):
    """The TrainConfig of the options ``kw``: a UsageError for an invalid one, or for options
    in ``given`` (those typed on the command line) that this run would ignore."""
    from mdnumba.train import TrainConfig
    cfg = TrainConfig(**kw)
    try:  # first: with --model grid, --data is ignored because --task char-lm is missing
        cfg.check_model_fits_task()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _refuse_inapplicable(cfg, given or {})  # then: an ignored option need not be valid
    try:
        cfg.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return cfg


def _refuse_inapplicable(cfg, given: dict) -> None:
    _refuse_unused(cfg.inapplicable(given), given)


def _refuse_unused(unused: dict[str, str], given: dict) -> None:
    """A UsageError naming the options (setting -> why) that the run would ignore, if any, a flag
    as it was ``given`` (``--no-tie-depth``)."""
    def typed(k: str) -> str:
        return _setting(k, given[k]) if isinstance(given.get(k), bool) else _option(k)
    if unused:
        raise click.UsageError("not used by this run, leave out: " + ", ".join(
            f"{typed(k)} ({why})" for k, why in unused.items()))


def _is_default_folder(out: Path, default: Path) -> bool:
    """Whether ``out`` names the command's ``default`` folder: the same name in the same parent
    folder (reached by any path), and not a symlink (with ``runs/latest -> md8`` neither
    ``--out runs/md8`` nor ``runs/latest`` is the default: the named run is replaced only with
    ``--overwrite``)."""
    return (out.name == default.name and out.parent.resolve() == default.parent.resolve()
            and not default.is_symlink())


def _refuse_occupied(out: Path, overwrite: bool, default: Path, resumable: bool = True) -> list[str]:
    """Refuse to train over the run in ``out`` unless ``--overwrite`` (or ``out`` is the
    command's ``default`` folder, whose name says it holds the latest run); return the run's
    files there. It only reads, and locks ``out`` for the command (:func:`_hold_folder`): the
    commands ask it first, before their probe steps compile the kernels (a minute, the first
    time), and :func:`_check_fresh` again. ``resumable``: whether the command can continue it
    (compare cannot)."""
    from mdnumba.checkpoint import CHECKPOINT
    from mdnumba.train import PLOTS, RUN_FILES
    _hold_folder(out)  # nothing is read or removed while another process trains there
    present = [name for name in RUN_FILES + PLOTS if (out / name).exists()]
    if present and not (overwrite or _is_default_folder(out, default)):
        if CHECKPOINT not in present:  # e.g. a project folder with a config.json of its own
            raise click.UsageError(f"{out} holds {', '.join(present)}, which the run would write over; "
                                   "replace them with --overwrite, or choose another --out")
        resume = f"continue it with --resume {out}, " if resumable else ""
        raise click.UsageError(f"{out} already holds a run; {resume}replace it with --overwrite, "
                               "or choose another --out")
    return present


def _refuse_out(out: Path, overwrite: bool, default: Path, resumable: bool = True) -> None:
    """The refusals of a new run's folder ``out`` that only read (:func:`_refuse_occupied`,
    :func:`_refuse_unwritable_out`), asked before the probe steps compile the kernels."""
    _refuse_occupied(out, overwrite, default, resumable)
    _refuse_unwritable_out(out)


def _hold_folder(folder: Path) -> None:
    """Lock the run folder ``folder``, if it exists, until the command ends
    (:func:`mdnumba.checkpoint.run_folder_lock`): one another process trains in is refused
    before anything there is read, removed or written."""
    from mdnumba.checkpoint import run_folder_lock
    if folder.is_dir():
        click.get_current_context().with_resource(run_folder_lock(folder))


def _check_fresh(out: Path, overwrite: bool, default: Path, resumable: bool = True) -> None:
    """:func:`_refuse_occupied`, then the old run's files go, so that none of it is left beside
    the new one."""
    from mdnumba.train import set_aside_log
    present = _refuse_occupied(out, overwrite, default, resumable)
    if not present:
        return
    for name in present:
        try:
            (out / name).unlink()
        except OSError as exc:  # e.g. a folder of that name
            raise click.UsageError(f"cannot replace {out / name} ({exc.strerror}); move it away") from None
    for spare in out.glob(set_aside_log()):  # the old run's log, set aside
        spare.unlink()


#: the table ``compare`` writes into its folder (its models' runs lie in sub-folders)
SUMMARY = "summary.tsv"


def _check_fresh_comparison(out: Path, overwrite: bool, models: tuple) -> list[str] | None:
    """``compare`` into ``out``: refuse a folder holding a ``train`` run, and one holding an
    earlier comparison unless ``--overwrite`` (or the default folder); return the models of
    that comparison (None if there is none) for :func:`_remove_old_comparison`: only names of
    ``models`` (the task's), the sub-folders compare writes: a table edited to name
    ``../other`` or an absolute path must not have that run removed."""
    from mdnumba.checkpoint import CHECKPOINT
    if (out / CHECKPOINT).exists():
        raise click.UsageError(f"{out} holds a run of `mdnumba train` ({CHECKPOINT}); choose another "
                               "--out for compare")
    if not (out / SUMMARY).exists():
        return None
    if not (overwrite or _is_default_folder(out, COMPARE_OUT)):
        raise click.UsageError(f"{out} already holds a comparison ({SUMMARY}); replace it with "
                               "--overwrite, or choose another --out")
    for name in (SUMMARY, "compare.png"):  # checked before any old run is removed
        if (out / name).exists() and not (out / name).is_file():
            raise click.UsageError(f"cannot replace {out / name}: it is not a file; move it away")
    try:
        rows = (out / SUMMARY).read_text(errors="replace").splitlines()[1:]
    except OSError as exc:
        raise click.UsageError(f"cannot read {out / SUMMARY} ({exc.strerror or exc}); move it away") from None
    return [name for name in (row.split("\t")[0] for row in rows) if name in models]


def _remove_old_comparison(out: Path, old: list | None, names: list) -> None:
    """Once the new comparison is ready to start: remove the earlier one's (``old``: its models;
    None: there is none) table and plot, and the runs of its models not compared again, so that
    no stale run is left beside the new table."""
    if old is None:
        return
    for name in old:
        if name not in names and (out / name).is_dir() and not (out / name).is_symlink():
            _check_fresh(out / name, True, COMPARE_OUT / name, resumable=False)
            with contextlib.suppress(OSError):  # not empty: files of the user's own stay
                (out / name).rmdir()
    for name in (SUMMARY, "compare.png"):
        (out / name).unlink(missing_ok=True)


def _check_memory(trainer) -> None:
    """Refuse a CPU run whose training step would not fit in the available memory (a
    MemoryError: the command group says what to shrink) before it starts. Its probe steps
    read a char-lm run's text: a resumed run whose text is gone says so first, as training
    would; a probe step that diverges (the graves cell's state overflowing on a large grid)
    stops with the divergence advice."""
    from mdnumba.charlm import CorpusError
    from mdnumba.train import check_step_memory
    try:
        if hasattr(trainer, "corpus"):
            trainer.corpus.require_text()
        check_step_memory(trainer.cfg)
    except CorpusError as exc:
        raise click.UsageError(str(exc)) from None
    except FloatingPointError as exc:
        raise click.ClickException(f"a probe step (batch 1) diverged: {exc}") from None


def _make_trainer(out: Path, cfg):
    from mdnumba.charlm import CorpusError
    from mdnumba.train import make_trainer
    _require_device(cfg.device)
    try:
        trainer = make_trainer(cfg, out)  # reads a char-lm text: its errors come before mkdir
    except (CorpusError, ValueError) as exc:  # e.g. a model too large to address
        raise click.UsageError(str(exc)) from None
    _check_memory(trainer)
    _check_writable(out)
    return trainer


def _plot_problem() -> str | None:
    """Why no plot can be drawn here (:func:`mdnumba.plotting.matplotlib_problem`), or None."""
    from mdnumba.plotting import matplotlib_problem
    return matplotlib_problem()


def _require_matplotlib(what: str) -> None:
    """Refuse ``what`` (an option asking for plots) before training where none can be drawn."""
    problem = _plot_problem()
    if problem:
        raise click.UsageError(f"{what} {problem}, or leave it out (--no-plot)")


def _resume_plots(folder: Path, plot: bool, explicit: bool) -> bool:
    """Whether ``train --resume`` redraws the run's plots: as asked (``explicit``), or by default
    where the run has any (a warning where it cannot: they would go stale without a word).
    Refuses, before training, a plot's name taken by something other than a file."""
    from mdnumba.train import PLOTS
    if not explicit:
        had = [name for name in PLOTS if (folder / name).exists()]
        problem = _plot_problem() if had else None
        if problem:
            click.echo(f"warning: {', '.join(had)} will not be redrawn: plotting {problem}", err=True)
        plot = bool(had) and problem is None
    for name in PLOTS if plot else ():
        if (folder / name).exists() and not (folder / name).is_file():
            raise click.UsageError(f"cannot write the plot {folder / name}: it is not a file; move it "
                                   "away, or leave out the plots (--no-plot)")
    return plot


#: batches of the evaluation train prints at its end, and evaluate's default
FINAL_BATCHES, EVALUATE_BATCHES = 5, 20


@main.command()
@_train_options
@click.option("--out", type=click.Path(), callback=_folder, default=DEFAULT_OUT,
              show_default=True, help="run folder: log.tsv, checkpoint.npz, config.json, PNGs")
@click.option("--overwrite", is_flag=True,
              help="replace the run in --out (runs/latest is replaced without it)")
@click.option("--resume", type=click.Path(), callback=_folder, default=None,
              help="continue the run in this folder (bit-identical on the same device; on another, up "
                   "to the order of sums); only --steps (to extend it), "
                   "--device, --sync-every, --checkpoint-every, --data, --lr and --clip-norm may change")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0,
              help="steps between checkpoints (0: every steps/10, and at least every 10 minutes)")
@click.option("--plot/--no-plot", default=False, show_default=True,
              help="write loss and prediction PNGs (a resumed run redraws those it has)")
@click.pass_context
def train(ctx: click.Context, out: Path, overwrite: bool, resume: Path | None, checkpoint_every: int,
          plot: bool, **kw: Any) -> None:
    """Train a model on a task; writes log.tsv and a checkpoint.

    Models by --task: diagonal: md, horizontal, snake; diagonal3d: md3d; binary-addition: lstm;
    char-lm (needs --data FILE): grid, stacked.
    """
    kw["checkpoint_every"] = checkpoint_every
    given = {k: v for k, v in kw.items() if ctx.get_parameter_source(k).name != "DEFAULT"}
    if plot:
        _require_matplotlib("--plot")
    if resume is not None:
        if overwrite or ctx.get_parameter_source("out").name != "DEFAULT":
            raise click.UsageError("--resume continues the run in its own folder; leave out "
                                   "--out and --overwrite")
        _hold_folder(resume)
        plot = _resume_plots(resume, plot, ctx.get_parameter_source("plot").name != "DEFAULT")
        trainer = _resume_run(resume, given)
    else:
        cfg = _config(given, **kw)
        if (out / SUMMARY).exists():
            raise click.UsageError(f"{out} holds the runs of `mdnumba compare` ({SUMMARY}); choose "
                                   "another --out")
        _refuse_out(out, overwrite, DEFAULT_OUT)
        trainer = _make_trainer(out, cfg)
        _check_fresh(out, overwrite, DEFAULT_OUT)
    _run_with_progress(trainer)
    click.echo(f"done: {trainer.step} step{'s' * (trainer.step != 1)}; log {trainer.out / 'log.tsv'}, "
               f"checkpoint {trainer.out / 'checkpoint.npz'}")
    if trainer.cfg.task == "char-lm":  # the windows of the log's last validation: its numbers
        batches = trainer.EVAL_BATCHES
        data = f"validation text ({batches} batches, as log.tsv's last row"
    else:
        batches = FINAL_BATCHES
        data = f"fresh data ({batches} batches"
    click.echo(f"on {data}; `mdnumba evaluate` takes {EVALUATE_BATCHES} by default):")
    _print_metrics(trainer.evaluate(batches=batches, save=True))  # kernels compiled already
    if plot:
        _plot_run(trainer)


def _resume_run(folder: Path, given: dict):
    """Load the run in ``folder`` for ``train --resume`` with the explicitly ``given`` options:
    those of :data:`mdnumba.train.RESUME_OVERRIDES` apply, the others must equal the run's settings."""
    from mdnumba.train import RESUME_OVERRIDES, check_continues
    overrides = {k: v for k, v in given.items() if k in RESUME_OVERRIDES}
    try:
        trainer = _load_run(folder, **overrides)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _refuse_inapplicable(trainer.cfg, given)  # before "differs": such an option fits no run like it
    for k, v in given.items():
        have = getattr(trainer.cfg, k)
        if k not in RESUME_OVERRIDES and have != v:
            raise click.UsageError(f"{_setting(k, v)} differs from the run in {folder} "
                                   f"({_setting(k, have) if isinstance(have, bool) else _value(have)}); "
                                   "--resume continues a run as it was (it may change only "
                                   f"{', '.join(map(_option, RESUME_OVERRIDES))}); start a new run "
                                   "with --out for other settings")
    try:
        check_continues(folder, trainer.step, trainer.cfg.steps)  # a finished run, no --steps given
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _check_writable(folder, resume=True)  # before the probe steps compile the kernels
    _check_memory(trainer)
    click.echo(f"resuming {folder} at step {trainer.step} of {trainer.cfg.steps}")
    return trainer


def _load_run(folder: Path, **overrides):
    """``Trainer.load`` with overrides (e.g. device); a run trained on a GPU that this machine
    cannot use says to pass ``--device cpu``; an override the run ignores is named as an option."""
    from mdnumba.backend_cuda import CudaUnavailableError
    from mdnumba.train import IgnoredSettingsError, Trainer
    try:
        return Trainer.load(folder, **overrides)
    except IgnoredSettingsError as exc:
        _refuse_unused(exc.ignored, overrides)
    except CudaUnavailableError as exc:
        msg = str(exc).replace("device='cuda'", "--device cuda").replace("device='cpu'", "--device cpu")
        if not overrides.get("device"):
            msg = f"{folder} was trained with --device cuda: {msg}"
        raise click.UsageError(msg) from None


def _plot_run(trainer) -> None:
    from mdnumba.plotting import plot_curves, plot_predictions, read_log
    try:
        cols = [c for c in trainer.task.columns if "loss" in c]
        paths = [plot_curves({trainer.cfg.model: read_log(trainer.out / "log.tsv")}, cols,
                             trainer.out / "loss.png", f"{trainer.cfg.model} on {trainer.cfg.task}")]
        if trainer.task.name == "diagonal":
            import numpy as np
            batch = trainer.sample_batch(np.random.default_rng(99), trainer.cfg.size)
            prob = trainer.loss_fn(trainer.model.forward(batch.x, save=False), batch.y)[2]
            paths.append(plot_predictions(batch.x, batch.y, prob, trainer.out / "predictions.png"))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("plots: " + ", ".join(str(p) for p in paths))


@main.command()
@click.argument("run", type=click.Path(), callback=_folder)
@click.option("--length", type=click.IntRange(min=1), default=500, show_default=True,
              help="characters to generate after --prime (without one: including the random first)")
@click.option("--temperature", type=float, default=0.8, show_default=True,
              help="> 0: below 1 more likely characters, above 1 more random")
@click.option("--prime", default="", help="text to start from (characters of the vocabulary; "
                                         "default: one drawn at random, printed as the first)")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="run on this device instead of the one RUN was trained on")
def sample(run: Path, length: int, temperature: float, prime: str, seed: int, device: str | None) -> None:
    """Generate text from RUN's char-lm checkpoint."""
    from mdnumba.charlm import CorpusError
    try:
        trainer = _load_run(run, device=device, read_text=False)
        if trainer.cfg.task != "char-lm":
            raise click.UsageError(f"{run} holds a {trainer.cfg.task} run; sample needs a char-lm run")
        pieces = trainer.iter_generate(length, temperature, seed=seed, prime=prime)
        for piece in pieces:  # as they come: a long --length shows its progress
            click.echo(piece, nl=False)
        click.echo()
    except MissingCheckpointError as exc:  # a run to train first: a char-lm one
        raise click.ClickException(str(exc.suggesting(f"{TRAIN_COMMAND} --task char-lm --model grid "
                                                      "--data FILE"))) from None
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    except (CorpusError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None


def _out_npy(ctx, param, value: str) -> Path:
    """A .npy file to write as a Path; an empty one is refused (it would name the current folder), and
    another suffix (the file holds numpy.save's format whatever its name says): so never a run's
    own file (``mdnumba.train.RUN_FILES``, none a .npy; a test keeps it so)."""
    if not value.strip():
        raise click.BadParameter("is empty; give the file to write")
    if Path(value).suffix.lower() != ".npy":
        raise click.BadParameter(f"{value} does not end in .npy; the file is a NumPy array (numpy.save's "
                                 "format): give a .npy name")
    return Path(value)


def _read_npy(path: Path):
    """The array in the .npy file ``path`` (no pickles), or a UsageError saying what to fix."""
    import numpy as np

    from mdnumba.checkpoint import read_error_text
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # a damaged header raises more than OSError/ValueError (tokenize.TokenError)
        raise click.UsageError(f"INPUT {path} is not a readable .npy array of numbers "
                               f"({read_error_text(exc)}); write one with numpy.save(path, x)") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        names = ", ".join(data.files)
        data.close()
        raise click.UsageError(f"INPUT {path} is an .npz archive (arrays {names}); save the one to "
                               "predict on with numpy.save(path, x)")
    return data


@main.command()
@click.argument("run", type=click.Path(), callback=_folder)
@click.argument("input", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(dir_okay=False), callback=_out_npy, required=True,
              help=".npy file for the probabilities (written atomically)")
@click.option("--overwrite", is_flag=True, help="replace --out if it exists")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="inputs per forward (default: the run's --batch)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="run on this device instead of the one RUN was trained on")
def predict(run: Path, input: Path, out: Path, overwrite: bool, batch: int | None,
            device: str | None) -> None:
    """Apply RUN's model to the inputs in INPUT (.npy, laid out as its task's: e.g. (batch, height,
    width, 1) for the diagonal task) and write the output probabilities to --out (.npy)."""
    from mdnumba.checkpoint import atomic_write_bytes
    if out.exists() and not overwrite:
        raise click.UsageError(f"--out {out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_file():  # a FIFO, a device: the atomic rename would replace it
        raise click.UsageError(f"--out {out} is not a regular file; give a .npy file's path")
    if not out.parent.is_dir():
        raise click.UsageError(f"--out {out}: its folder {out.parent} does not exist")
    try:  # before the kernels compile and the model runs
        _write_probe(out.parent)
    except OSError as exc:
        raise click.UsageError(f"--out {out}: its folder {out.parent} is not writable ({exc.strerror}); "
                               "choose another --out") from None
    x = _read_npy(input)
    try:
        trainer = _load_run(run, device=device, read_text=False)
        prob = trainer.predict(x, batch, name="INPUT")
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    import numpy as np
    try:
        atomic_write_bytes(out, lambda fh: np.save(fh, prob))
    except OSError as exc:
        raise click.ClickException(f"cannot write --out {out} ({exc.strerror or exc})") from None
    click.echo(f"{trainer.cfg.model} ({trainer.cfg.task}, step {trainer.step}): inputs {x.shape} -> "
               f"probabilities {prob.shape} {prob.dtype}, written to {out}")


@main.command()
@click.argument("run", type=click.Path(), callback=_folder)
@click.option("--size", type=int, default=None,
              help="evaluate at another size (diagonal tasks: >= 4)")
@click.option("--batches", type=click.IntRange(min=1), default=EVALUATE_BATCHES, show_default=True,
              help="batches of the run's --batch size to average over")
@click.option("--seed", type=click.IntRange(min=0), default=EVAL_SEED, show_default=True,
              help="seeds the generated batches (char-lm: which validation windows)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="run on this device instead of the one RUN was trained on")
@click.option("--data", type=click.Path(path_type=str), default=None,
              help="char-lm: validate on this text (default: the run's)")
def evaluate(run: Path, size: int | None, batches: int, seed: int, device: str | None,
             data: str | None) -> None:
    """Reload RUN's checkpoint and report metrics on fresh data (char-lm: validation text)."""
    try:
        trainer = _load_run(run, device=device, data=data)
        metrics = trainer.evaluate(size=size, batches=batches, seed=seed)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    cfg = trainer.cfg
    where = "" if cfg.task == "char-lm" else f"size {size or cfg.size}, "
    trained = "" if cfg.task == "char-lm" else f" at size {cfg.size}"
    click.echo(f"{cfg.model} on {cfg.task} ({where}trained {trainer.step} steps{trained})")
    _print_metrics(metrics)


@main.command()
@click.option("--task", type=click.Choice(["diagonal"]), default="diagonal", show_default=True)
@click.option("--models", default="md,horizontal,snake", show_default=True,
              help="comma-separated, from md, horizontal, snake")
@click.option("--size", type=int, default=8, show_default=True, help="image side (>= 4)")
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--hidden", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=float, default=1e-2, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--out", type=click.Path(), callback=_folder, default=COMPARE_OUT,
              show_default=True, help="one run folder per model, summary.tsv, compare.png")
@click.option("--overwrite", is_flag=True,
              help="replace runs already in --out (runs/compare is replaced without it)")
@click.option("--plot/--no-plot", default=True,
              help="write compare.png (needs matplotlib; by default only if it is installed)")
@click.pass_context
def compare(ctx: click.Context, task: str, models: str, out: Path, overwrite: bool, plot: bool,
            **kw: int | float) -> None:
    """Train several models with the same seed and plot their curves together."""
    names = [m.strip() for m in models.split(",") if m.strip()]
    bad = [m for m in names if m not in TASKS[task].models]
    if bad or not names:
        raise click.UsageError(f"--models: {bad or models!r} not valid for {task}; "
                               f"choose from {list(TASKS[task].models)}")
    if len(set(names)) < len(names):
        raise click.UsageError(f"--models {models}: each model once")
    plot = plot and (ctx.get_parameter_source("plot").name != "DEFAULT" or _plot_problem() is None)
    if plot:
        _require_matplotlib("--plot")
    configs = {name: _config(model=name, task=task, **kw) for name in names}
    _check_writable(out)
    old = _check_fresh_comparison(out, overwrite, TASKS[task].models)  # before the models' folders
    for name in names:
        _refuse_out(out / name, overwrite, COMPARE_OUT / name, resumable=False)
    trainers = {name: _make_trainer(out / name, cfg) for name, cfg in configs.items()}
    for name in names:
        _check_fresh(out / name, overwrite, COMPARE_OUT / name, resumable=False)
    _remove_old_comparison(out, old, names)  # the last refusal is behind: the new one starts
    rows = []
    for name in names:
        click.echo(f"== {name}")
        trainer = trainers[name]
        _run_with_progress(trainer, f"compare cannot resume: run it again with --overwrite, or continue "
                                    f"this model alone with `mdnumba train --resume {trainer.out}`")
        rows.append((name, trainer.evaluate(batches=10, save=True)))
    cols = list(rows[0][1])
    table = "model\t" + "\t".join(cols) + "\n" + "".join(
        name + "\t" + "\t".join(f"{m[c]:.4g}" for c in cols) + "\n" for name, m in rows)
    click.echo(table)
    from mdnumba.checkpoint import atomic_write_bytes  # at call time, as predict's
    try:
        atomic_write_bytes(out / SUMMARY, lambda fh: fh.write(table.encode()))
    except OSError as exc:
        raise click.ClickException(f"cannot write {out / SUMMARY} ({exc.strerror or exc}); the "
                                   f"models' runs are saved in their folders under {out}") from None
    if plot:
        from mdnumba.plotting import plot_curves, read_log
        try:
            path = plot_curves({n: read_log(out / n / "log.tsv") for n in names},
                               ["loss", "relevant_loss"], out / "compare.png",
                               f"{task} {kw['size']}x{kw['size']}")
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"plot: {path}")
    elif ctx.get_parameter_source("plot").name == "DEFAULT":
        click.echo(f"no compare.png: plotting {_plot_problem()}")


#: ``mdnumba bench --model`` -> grid dimensions of its layer
BENCH_MODELS = {"lstm": 1, "md": 2, "md3d": 3}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


@main.command()
@click.option("--model", type=click.Choice(list(BENCH_MODELS)), default="md", show_default=True,
              help="the layer: lstm (1D), md (2D MD-LSTM), md3d (3D)")
@click.option("--size", type=click.IntRange(min=1), default=32, show_default=True,
              help="grid side (lstm: sequence length)")
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--hidden", type=click.IntRange(min=1), default=32, show_default=True,
              help="units per scan direction")
@click.option("--channels", type=click.IntRange(min=1), default=1, show_default=True, help="input channels")
@click.option("--directions", type=int, default=1, show_default=True,
              help="1 or 2**ndim (2 for lstm, 4 for md, 8 for md3d)")
@click.option("--cell", type=click.Choice(list(CELLS)), default="graves",
              show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True,
              help="timed calls of each (after one warm-up call)")
def bench(model: str, size: int, batch: int, hidden: int, channels: int, directions: int, cell: str,
          dtype: str, device: str, repeats: int) -> None:
    """Time one layer's forward, inference (forward keeping no activations) and train step
    (forward, backward without dL/dx: x is data, Adam) on this machine.

    For the side-by-side benchmarks against PyTorch see the repository's bench/ folder.
    """
    import numba

    from mdnumba.microbench import bench_layer
    _require_device(device)
    ndim = BENCH_MODELS[model]
    if directions not in (1, 2 ** ndim):
        raise click.BadParameter(f"must be 1 or {2 ** ndim} for --model {model} (every corner of its "
                                 f"{ndim}-D grid), got {directions}", param_hint="'--directions'")
    try:
        r = bench_layer(ndim, size, batch=batch, hidden=hidden, channels=channels, directions=directions,
                        cell=cell, dtype=dtype, device=device, repeats=repeats)
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    where = f"cpu, {numba.get_num_threads()} threads" if device == "cpu" else "cuda"
    grid = "x".join([str(size)] * ndim)
    click.echo(f"{model} {grid}, batch {batch}, hidden {hidden}, {directions} direction"
               f"{'s' if directions > 1 else ''}, {cell}, {dtype} ({where})")
    click.echo(f"  forward     {_ms(r.forward_s):>10}  (median {_ms(r.forward_median_s)}, "
               f"{r.cells / r.forward_s:.3g} grid cells/s)")
    click.echo(f"  inference   {_ms(r.inference_s):>10}  (median {_ms(r.inference_median_s)}; "
               f"forward(x, save=False): no activations kept)")
    click.echo(f"  train step  {_ms(r.step_s):>10}  (median {_ms(r.step_median_s)}; forward, backward, Adam)")
    click.echo(f"  first call  {r.first_s:>8.3g} s  (forward + step; compiles the kernels unless cached)")
    if r.path:
        click.echo(f"  sweep path  {r.path}")
    click.echo(f"  best of {r.repeats} call{'s each' if r.repeats > 1 else ''}")
