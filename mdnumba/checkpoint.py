"""Checkpoints: one ``checkpoint.npz`` (arrays + JSON metadata), written atomically.

The file is written to a temporary name in the same folder, flushed to disk and
renamed over the old one, so a crash never leaves a half-written checkpoint.
A readable ``config.json`` copy of the metadata sits beside it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import tempfile
import tokenize
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

FORMAT = "mdnumba-checkpoint-1"
CHECKPOINT = "checkpoint.npz"
CONFIG_JSON = "config.json"
#: the suffix of :func:`atomic_write_bytes`' temporary files
TEMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match the model."""


class FolderInUseError(RuntimeError):
    """Another process is training in a run folder (it holds :func:`run_folder_lock`)."""


class CheckpointChangedError(RuntimeError):
    """A run folder's checkpoint changed since a trainer loaded or saved it (another trainer
    saved there): the older trainer would write its run over the newer one."""


def checkpoint_stamp(folder: Path) -> tuple[int, int, int] | None:
    """``(inode, mtime in ns, size)`` of ``folder``'s checkpoint, None where there is none: each
    save is a new file (renamed over the old), so a save by anyone changes it."""
    try:
        st = os.stat(Path(folder) / CHECKPOINT)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


#: run folders this process holds locked: resolved path -> [descriptor, depth]
_LOCKED: dict[Path, list[int]] = {}


def _flock(key: Path, folder: Path) -> int | None:
    """A descriptor of the folder ``key`` holding its exclusive ``flock``, or None where it
    cannot be locked; :class:`FolderInUseError` where another process holds it."""
    try:
        import fcntl
        fd = os.open(key, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if isinstance(exc, BlockingIOError):
            raise FolderInUseError(f"another process is training in {folder}; wait for it to end, "
                                   "or stop it (Ctrl-C saves its checkpoint) and resume then") from None
        return None
    return fd


@contextlib.contextmanager
def run_folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock (``flock``, advisory) on the existing folder ``folder`` while a run
    trains in it: :class:`FolderInUseError` if another process holds it (two runs writing one
    checkpoint and log would leave a log of one run beside the checkpoint of the other).
    Re-entrant within the process; the system releases it when the process ends, however.
    Where there is no ``flock`` (Windows) or the file system refuses it, nothing is locked."""
    key = Path(folder).resolve()
    held = _LOCKED.get(key)
    if held is None:
        fd = _flock(key, folder)
        if fd is None:
            yield
            return
        held = _LOCKED[key] = [fd, 0]
    held[1] += 1
    try:
        yield
    finally:
        held[1] -= 1
        if not held[1]:
            del _LOCKED[key]
            os.close(held[0])  # which releases the lock


def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, rename over ``path``, fsync the
    folder (so that the rename, too, outlives a power cut). An OSError without a file name (a
    write to a full disk), or the rename's (which names the hidden temp file), gets ``path`` as
    its name. A symlink stays one: its target is replaced."""
    path = Path(path).resolve() if Path(path).is_symlink() else Path(path)
    with named_os_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fchmod(fh.fileno(), 0o666 & ~_umask())  # mkstemp makes it 0600
                os.fsync(fh.fileno())
            try:
                os.replace(tmp, path)
            except OSError as exc:
                exc.filename, exc.filename2 = str(path), None
                raise
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """fsync ``folder``'s entries where the system allows it (not on Windows, nor on some
    network file systems: there the rename is as durable as they make it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def named_os_errors(path: Path) -> Iterator[None]:
    """Give an OSError raised inside without a file name (``write`` on a full disk) ``path``'s,
    so that the message can say which file could not be written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def remove_temp_files(folder: Path, names: tuple[str, ...]) -> None:
    """Remove what :func:`atomic_write_bytes` left of ``folder/name`` for each of ``names`` when
    its process was killed during a write (``.name.XXXX.tmp``: never read, but each as large as
    the file). Only one run writes a folder at a time."""
    for name in names:
        pattern = re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")
        for tmp in Path(folder).glob(f".{glob.escape(name)}.*{TEMP_SUFFIX}"):
            if pattern.fullmatch(tmp.name):  # mkstemp's 8 characters: not a user's own file
                with contextlib.suppress(OSError):
                    tmp.unlink()


def save_checkpoint(folder: Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write ``arrays`` and ``meta`` (JSON-serialisable) to ``folder/checkpoint.npz``. Refused
    before anything is written: an array named ``meta`` (the key of ``meta`` itself) and object
    arrays (:func:`load_checkpoint` reads no pickles, so the checkpoint would be unreadable)."""
    folder = Path(folder)
    if "meta" in arrays:
        raise ValueError("a checkpoint array may not be named 'meta' (it holds the metadata); rename it")
    for name, a in arrays.items():
        if np.asarray(a).dtype.hasobject:
            raise TypeError(f"checkpoint array {name!r} holds Python objects, which would not load back "
                            "(no pickles); give numeric or string arrays")
    meta = dict(meta, format=FORMAT)
    text = json.dumps(meta, indent=2, sort_keys=True)
    payload = dict(arrays, meta=np.array(text))
    # the readable copy first: if it cannot be written, the checkpoint is still the previous one
    # (what an error message says is kept); the other way round only the copy is newer
    atomic_write_bytes(folder / CONFIG_JSON, lambda fh: fh.write(text.encode()))
    atomic_write_bytes(folder / CHECKPOINT, lambda fh: np.savez(fh, **payload))
    return folder / CHECKPOINT


#: the command :class:`MissingCheckpointError` suggests for training, by default
TRAIN_COMMAND = "mdnumba train"


class MissingCheckpointError(CheckpointError):
    """A run folder without a checkpoint; the message says what to do, with ``train`` the command
    it suggests for training (:meth:`suggesting` another: ``mdnumba sample`` needs a char-lm run)."""

    def __init__(self, folder: Path, train: str = TRAIN_COMMAND):
        self.folder, self.train = Path(folder), train
        super().__init__(f"no checkpoint at {self.folder / CHECKPOINT}; {_missing_hint(self.folder, train)}")

    def __reduce__(self) -> tuple:  # pickled (e.g. from a worker process) with its arguments, not its text
        return type(self), (self.folder, self.train)

    def suggesting(self, train: str) -> MissingCheckpointError:
        """The same error, with ``train`` as the command it suggests."""
        return MissingCheckpointError(self.folder, train)


def _missing_hint(folder: Path, train: str) -> str:
    """What to do about a folder without a checkpoint: open the runs inside it (a ``compare``
    folder), put a moved checkpoint back (a run's ``config.json`` is there), or train there with
    the command ``train`` (``--overwrite`` if a run's files that training refuses to write over
    are there)."""
    from .train import PLOTS, RUN_FILES  # it imports this module
    runs = sorted(p.parent.name for p in folder.glob(f"*/{CHECKPOINT}")) if folder.is_dir() else []
    if runs:
        return f"it holds runs in its sub-folders {', '.join(runs)}: give one, e.g. {folder / runs[0]}"
    if (folder / CONFIG_JSON).is_file():  # a run's files without its checkpoint: moved away?
        return (f"if it was moved, put it back; `{train} --out {folder} --overwrite` starts "
                "a new run there instead, replacing this one's config.json and log")
    leftover = any((folder / name).exists() for name in RUN_FILES + PLOTS)
    return f"train first with `{train} --out {folder}{' --overwrite' if leftover else ''}`"


def read_error_text(exc: Exception) -> str:
    """The reason ``np.load(..., allow_pickle=False)`` failed, for a message: the exception's text,
    cut at 160 characters (zipfile's can quote kilobytes of the file); in words where that is
    numpy's advice to unpickle (not for a damaged or foreign file), a tuple
    (``tokenize.TokenError``: a .npy header that does not parse) or empty."""
    text = str(exc)
    if "pickle" in text:
        return "not a .npy file, or one of Python objects, which mdnumba does not unpickle"
    if isinstance(exc, (tokenize.TokenError, SyntaxError)):
        return f"an array header does not parse: {type(exc).__name__}"
    return (text if len(text) <= 160 else text[:160] + "...") or type(exc).__name__


def load_checkpoint(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Return ``(arrays, meta)`` from ``folder/checkpoint.npz`` or raise :class:`CheckpointError`."""
    path = Path(folder) / CHECKPOINT
    if Path(folder).is_file():
        raise CheckpointError(f"{folder} is a file; give the run's folder (the one that holds {CHECKPOINT})")
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is a folder (or another non-file), not a checkpoint; move it "
                              "away or use another run folder")
    if not path.is_file():
        raise MissingCheckpointError(folder)
    try:
        open(path, "rb").close()  # is_zipfile says False for a file it cannot read: not "corrupt"
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path} ({exc.strerror or exc}); give this user "
                              "read access to it") from None
    if not zipfile.is_zipfile(path):  # np.load would try to unpickle it and say allow_pickle
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint (not an .npz "
                              "archive); delete it or use another run folder")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta_text = arrays.pop("meta", None)
        meta = None if meta_text is None else json.loads(str(meta_text))
    except Exception as exc:  # zipfile's and numpy's readers raise many kinds on damaged bytes (a
        # flipped byte: BadZipFile, ValueError, NotImplementedError, tokenize.TokenError): whichever,
        # the file is unreadable, and the error says so with the reason
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({read_error_text(exc)}); "
                              "delete it or use another run folder") from None
    if meta_text is None:  # an .npz of something else
        raise CheckpointError(f"{path} is not an mdnumba checkpoint (an .npz archive without the "
                              "'meta' entry every checkpoint has); delete it or use another run folder")
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} is damaged: its metadata is a JSON "
                              f"{type(meta).__name__}, not an object; delete it or use another run folder")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an {FORMAT} file (format={meta.get('format')!r}): it was "
                              "not written by this version of mdnumba; train a new run")
    return arrays, meta
