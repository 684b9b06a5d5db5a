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


def int_list(low: int, high: int):
    """An argparse type: a comma list of integers, each in [low, high]."""
    def parse(value: str) -> list[int]:
        try:
            items = [int(v) for v in value.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a comma list of integers") from None
        wrong = [n for n in items if not low <= n <= high]
        if wrong:
            raise argparse.ArgumentTypeError(f"each must be in [{low}, {high}], got {wrong[0]}")
        return items
    return parse


def choice_list(choices: tuple[str, ...]):
    """An argparse type: a comma list of some of ``choices``, in the order given."""
    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",")]
        wrong = [v for v in items if v not in choices]
        if wrong:
            raise argparse.ArgumentTypeError(f"{wrong[0]!r} is not one of {', '.join(choices)}")
        return items
    return parse


def positive_float(value: str) -> float:
    """A budget in seconds: a finite number > 0."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return x


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
