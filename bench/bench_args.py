"""argparse types the benchmarks share: checked as the command line is read, before a run of
minutes (a report that could not be written was a traceback at its end). No mdnumba import:
``threads.py`` sets the environment before mdnumba reads it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def out_path(value: str) -> Path:
    """``--out``: a report file whose folder exists or can be made, and is writable."""
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder; give the report's file, e.g. "
                                         f"{path / 'report.md'}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the nearest that exists: the report makes the rest
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {value}: {folder} is not a writable folder")
    return path


def sizes(value: str) -> list[int]:
    """A comma-separated list of grid sides, each an integer >= 1."""
    return [positive_int(v) for v in value.split(",")]


def positive_int(value: str) -> int:
    """A count of repeats or rounds: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n
