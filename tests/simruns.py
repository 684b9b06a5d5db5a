"""The ``sim_*`` cases of tests/test_cuda.py in ``python -m pytest`` subprocesses, and the
subprocesses of other slow tests (``@pytest.mark.background``), started with the session.

``NUMBA_ENABLE_CUDASIM`` must be set before ``numba.cuda`` is first imported, so the simulator
cases run in subprocesses. conftest.py starts them when the session starts (:func:`start`), once
tests/warmup.py has compiled the CPU kernels they and the suite share: they are pure Python on
one core each, and overlap the rest of the suite. A slow test that runs a subprocess of its
own (the tile tests at the other vector width, the GPU scripts' smoke run) is marked
``@pytest.mark.background``: its subprocess starts with them, and the test reads what it gave
(the ``background_run`` fixture). The tests that wait for these runs go last (conftest.py
orders them).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
import warmup

#: concurrent processes for the simulator cases (pure Python, one core each) and for ptxcheck
SHARDS = max(2, min(4, os.cpu_count() or 1))
#: concurrent processes for the cases on a real GPU: each compiles its kernels (NVVM, one core)
#: while the GPU time-slices between them; the lent machines have 16 cores, and at 4 shards the
#: first GPU runs reached only part of the cases in their 270 s, at 8 the H100 run of 2026-12-06
#: 196 of 219 in 230 s (shards cut while compiling): 12 leave 4 cores to the rest
GPU_SHARDS = max(SHARDS, min(12, (os.cpu_count() or 1) * 3 // 4))
#: the other MDNUMBA_CUDA_ROWS_PER_THREAD values test_simulator_other_rows_per_thread runs, each
#: with its other settings: MDNUMBA_CUDA_UNROLL (1: no unrolled steps; 3: the sums' lengths leave
#: remainders); with 1 row the cell math on global memory for every N (MDNUMBA_CUDA_CELL_REGISTERS=0),
#: with 3 rows every layer in the staged layout with 2 units per slice (the sweep cases run flat,
#: sliced and staged there: their own layouts); the item layout's cells per thread as the rows, the
#: tensor layout's backward n-tiles per warp (MDNUMBA_CUDA_TENSOR_TILES) too
OTHER_ROWS = {1: {"MDNUMBA_CUDA_UNROLL": "1", "MDNUMBA_CUDA_CELL_REGISTERS": "0",
                  "MDNUMBA_CUDA_ITEM_ROWS": "1", "MDNUMBA_CUDA_TENSOR_TILES": "1"},
              3: {"MDNUMBA_CUDA_UNROLL": "3", "MDNUMBA_CUDA_LAYOUT": "staged",
                  "MDNUMBA_CUDA_SLICE_UNITS": "2", "MDNUMBA_CUDA_ITEM_ROWS": "3",
                  "MDNUMBA_CUDA_TENSOR_TILES": "3"}}
#: the cases the OTHER_ROWS runs select (-k)
OTHER_ROWS_CASES = ("sweep_kernels or sliced_sweeps or item_sweeps or tensor_sweeps or "
                    "layer_matches_reference")
#: the launch path each OTHER_ROWS run leaves out of the cases that take both: the rows, the
#: unrolled steps and the cell math are device functions both paths' kernels call, and the main
#: runs take both paths (this halves the two runs' 400 s of CI time)
OTHER_ROWS_LEAVE_OUT = {1: "cooperative", 3: "per-diagonal"}
TIMEOUT = 1200
#: the tests of tests/test_cuda.py that read the simulator runs' reports or records: those that
#: read the run of every case ("all"), and those that read the others
ALL_CASES_TESTS = ("test_simulator", "test_kernels_compile_for_gpu",
                   "test_every_kernel_is_launched_in_both_dtypes")
WAITING_TESTS = ALL_CASES_TESTS + ("test_simulator_other_rows_per_thread",
                                   "test_simulator_skipping_a_sweep_stage")
#: the MDNUMBA_CUDA_SKIP stages test_simulator_skipping_a_sweep_stage runs its case with, each in
#: a simulator run of its own; and that case
SKIP_RUNS = ("sum", "cell")
SKIP_CASE = "sweep_stages_as_configured"
_CASES_FILE = Path(__file__).with_name("test_cuda.py")
#: environment of a case run (:class:`CaseRun`): a file of the case names a run before this one
#: reported (left out: :func:`leave_out_done`), a file a case that lost the CUDA context is named
#: in (conftest.py's ``pytest_runtest_makereport``), and a case to fail and report the context
#: lost in (a test of the restart, under the simulator)
CASES_DONE, CASES_LOST = "MDNUMBA_CASES_DONE", "MDNUMBA_CASES_LOST"
CASES_INJECT_LOSS = "MDNUMBA_CASES_INJECT_LOSS"
#: fresh processes a case run may go on in after cases that lost the CUDA context
CASE_RESTARTS = 3


def in_simulator() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


class Background:
    """A subprocess started now, its output (stdout and stderr) in ``out``: :meth:`wait` waits up
    to :data:`TIMEOUT` s for it and fails the test that waits if it is still going."""

    def __init__(self, cmd: list[str], env: dict, out: Path, cwd: Path = _CASES_FILE.parents[1]):
        self.cmd, self.out = cmd, out
        with open(out, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{' '.join(self.cmd)} still going after {TIMEOUT} s:\n{self.output()[-6000:]}")

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def stop(self, grace: float = 0.0) -> None:
        """Kill the subprocess if it is still going, after ``grace`` s to end by itself (a run cut
        by SIGINT, which its process group got too, then writes its report)."""
        if grace and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class CaseRun:
    """A ``python -m pytest`` subprocess running the sim_* cases (all, those ``-k select``, or
    shard ``i/k`` of them), started at once so that the runs overlap; :meth:`report` waits.
    Under the simulator the launches' argument types go to ``tmp_dir/launches.pkl``. A run that
    ``watches`` the CUDA context (on a GPU) stops after a case that lost it, naming the case in
    ``tmp_dir/lost.txt``; :meth:`go_on` starts the cases it did not reach in a fresh process.
    ``done``: names of cases to leave out."""

    def __init__(self, tmp_dir: Path, simulator: bool, env_extra: dict | None = None,
                 select: str | None = None, watch: bool = False, done: frozenset = frozenset(),
                 restarts: int = 0):
        self.xml = tmp_dir / "report.xml"
        self.launches = tmp_dir / "launches.pkl"
        self.lost = tmp_dir / "lost.txt"
        self.settings = dict(simulator=simulator, env_extra=env_extra, select=select, watch=watch)
        self.done, self.restarts = done, restarts
        env = dict(os.environ)
        if simulator:  # one numba thread: the runs share the cores
            env.update(NUMBA_ENABLE_CUDASIM="1", MDNUMBA_THREADS_PER_BLOCK="8", NUMBA_NUM_THREADS="1",
                       MDNUMBA_PTX_RECORD=str(self.launches))
        if watch:
            env[CASES_LOST] = str(self.lost)
        if done:
            (tmp_dir / "done.txt").write_text("\n".join(sorted(done)))
            env[CASES_DONE] = str(tmp_dir / "done.txt")
        env.update(env_extra or {})
        # on a GPU each case's name and outcome as it ends (-v): a run cut short keeps them
        cmd = [sys.executable, "-m", "pytest", str(_CASES_FILE), "-q" if simulator else "-v", "-p",
               "no:cacheprovider", "-o", "python_functions=sim_*", f"--junitxml={self.xml}"] + \
            (["-k", select] if select else [])
        self.run = Background(cmd, env, tmp_dir / "output.txt")
        self._report = None

    def report(self) -> dict[str, tuple[str, str]]:
        """name -> (state, message) of every case the run reported. A GPU run killed before it
        wrote its report (cut while a kernel never ended: SIGINT waits for it) still gives what its
        output listed (:func:`_parse_listed`), not a failure of every shard's cases."""
        if self._report is None:
            rc = self.run.wait()
            if self.xml.exists():
                self._report = _parse_report(self.xml)
            else:
                self._report = {} if self.settings["simulator"] else _parse_listed(self.run.output())
                if not self._report:
                    pytest.fail(f"case run produced no report (rc={rc}):\n{self.run.output()[-6000:]}")
        return self._report

    def stop(self, grace: float = 0.0) -> None:
        self.run.stop(grace)

    def go_on(self, tmp_dir: Callable[[], Path]) -> CaseRun | None:
        """After :meth:`report`: where a case lost the CUDA context, a run of the cases this one
        did not reach, in a fresh process and folder ``tmp_dir()`` (at most :data:`CASE_RESTARTS`
        times); else None."""
        if not self.lost.exists() or self.restarts >= CASE_RESTARTS:
            return None
        return CaseRun(tmp_dir(), **self.settings, done=self.done | frozenset(self.report()),
                       restarts=self.restarts + 1)


def restarted_report(runs: list[CaseRun], tmp_dir: Callable[[], Path]) -> dict[str, tuple[str, str]]:
    """The merged report of ``runs`` (:func:`merged_report`), each read as soon as it ends and
    going on at once in a fresh process (:meth:`CaseRun.go_on`, in a new folder ``tmp_dir()``)
    where a case lost the CUDA context; those runs are added to ``runs`` (to be stopped with them)."""
    report, pending, deadline = {}, list(runs), time.monotonic() + TIMEOUT
    while pending:
        ended = [run for run in pending if run.run.proc.poll() is not None]
        if not ended and time.monotonic() < deadline:
            time.sleep(0.2)
            continue
        for run in ended or pending[:1]:  # past the deadline: report() waits, then fails the test
            pending.remove(run)
            report.update(run.report())
            more = run.go_on(tmp_dir)
            if more is not None:
                runs.append(more)
                pending.append(more)
    return report


def reported(runs: list[CaseRun]) -> dict[str, tuple[str, str]]:
    """What ``runs``, ended, reported; a run that left no report is left out (after a cut)."""
    report = {}
    for run in runs:
        with contextlib.suppress(pytest.fail.Exception):
            report.update(run.report())
    return report


def cuda_context_alive() -> bool:
    """:func:`mdnumba.backend_cuda.cuda_context_alive`, but never where ``MDNUMBA_CASES_INJECT_LOSS``
    is set (a test of the restart)."""
    from mdnumba.backend_cuda import cuda_context_alive as alive
    return not os.environ.get(CASES_INJECT_LOSS) and alive()


def leave_out_done(config, items: list) -> None:
    """Leave out the cases a run before this one reported (``MDNUMBA_CASES_DONE``), and make the
    case ``MDNUMBA_CASES_INJECT_LOSS`` names fail (a test of the restart)."""
    done = os.environ.get(CASES_DONE)
    if done:
        names = set(Path(done).read_text().splitlines())
        config.hook.pytest_deselected(items=[it for it in items if it.name in names])
        items[:] = [it for it in items if it.name not in names]
    inject = os.environ.get(CASES_INJECT_LOSS)
    for it in items:
        if it.name == inject:
            it.runtest = lambda: pytest.fail(f"a loss of the CUDA context injected by {CASES_INJECT_LOSS}")


def _parse_listed(output: str) -> dict[str, tuple[str, str]]:
    """The cases a ``pytest -v`` run's output lists as ended, and the one it started last without
    an end (killed while it ran: failed); for a run that wrote no report."""
    cases = {}
    for name, outcome in re.findall(r"::(sim_\S+) (PASSED|FAILED|ERROR|SKIPPED)", output):
        cases[name] = ("passed", "") if outcome == "PASSED" else \
            ("skipped", "") if outcome == "SKIPPED" else ("failed", "its report was lost: see the output")
    started = re.findall(r"::(sim_\S+) *$", output.rstrip("\n").rsplit("\n", 1)[-1])
    for name in started:
        cases[name] = ("failed", "killed while it ran (a kernel that never ended?)")
    return cases


def _parse_report(xml: Path) -> dict[str, tuple[str, str]]:
    cases = {}
    for tc in ET.parse(xml).getroot().iter("testcase"):
        bad = [el for el in tc if el.tag in ("failure", "error")]
        skip = [el for el in tc if el.tag == "skipped"]
        if bad:
            cases[tc.get("name")] = ("failed", bad[0].text or bad[0].get("message", ""))
        else:
            cases[tc.get("name")] = ("skipped", skip[0].get("message", "")) if skip else ("passed", "")
    return cases


def merged_report(runs: list[CaseRun]) -> dict[str, tuple[str, str]]:
    report = {}
    for run in runs:
        report.update(run.report())
    return report


def _waiting(item) -> bool:
    return Path(item.path) == _CASES_FILE and getattr(item, "originalname", None) in WAITING_TESTS


def _background(item):
    """The test's ``@pytest.mark.background(command=..., warm=...)`` marker, or None (a keyword:
    a marker's lone callable argument would be taken for the function it marks)."""
    return item.get_closest_marker("background")


def waiting_last(items: list) -> None:
    """Move the tests that wait for the simulator runs or a background run to the end (stable
    otherwise)."""
    items.sort(key=lambda it: _waiting(it) or _background(it) is not None)


def start_background(item, tmp_path_factory) -> Background:
    """The subprocess of a test marked ``@pytest.mark.background(command=..., warm=False)``:
    ``command(folder)`` gives its command line and environment (``folder``: a fresh temporary
    folder, e.g. for its output files). ``warm=True``: it loads the CPU kernels tests/warmup.py
    compiles."""
    folder = tmp_path_factory.mktemp("background")
    cmd, env = _background(item).kwargs["command"](folder)
    return Background(cmd, env, folder / "output.txt")


def other_rows_selection(rows: int) -> str:
    """The ``-k`` expression of the OTHER_ROWS run with ``rows``: its cases, on its path."""
    return f"({OTHER_ROWS_CASES}) and not {OTHER_ROWS_LEAVE_OUT[rows]}"


def start(items: list, tmp_path_factory) -> dict:
    """Start every subprocess the selected ``items`` wait for, all at once: the simulator cases
    in SHARDS shards ("all"), the OTHER_ROWS runs (by rows), the SKIP_RUNS ("skip <stage>") and
    the background runs of slow tests (by node id), after tests/warmup.py has filled the kernel
    cache where they use it. None under the simulator itself."""
    if in_simulator():
        return {}
    wanted = [it for it in items if _waiting(it)]
    background = [it for it in items if _background(it) is not None]
    names = {it.originalname for it in wanted}
    runs = {}
    if wanted or any(_background(it).kwargs.get("warm") for it in background):
        warmup.fill_cache()  # the runs and the suite then load the CPU kernels they share
    if names & set(ALL_CASES_TESTS):
        runs["all"] = [CaseRun(tmp_path_factory.mktemp("cudasim"), simulator=True,
                               env_extra={"MDNUMBA_TEST_SHARD": f"{i}/{SHARDS}"}) for i in range(SHARDS)]
    for it in wanted:
        if it.originalname == "test_simulator_other_rows_per_thread":
            rows = it.callspec.params["rows"]
            runs[rows] = CaseRun(tmp_path_factory.mktemp(f"cudasim_rows{rows}"), simulator=True,
                                 env_extra={"MDNUMBA_CUDA_ROWS_PER_THREAD": str(rows), **OTHER_ROWS[rows]},
                                 select=other_rows_selection(rows))
    for stage in SKIP_RUNS if "test_simulator_skipping_a_sweep_stage" in names else ():
        runs[f"skip {stage}"] = CaseRun(tmp_path_factory.mktemp(f"cudasim_skip_{stage}"), simulator=True,
                                        env_extra={"MDNUMBA_CUDA_SKIP": stage}, select=SKIP_CASE)
    for it in background:
        runs[it.nodeid] = start_background(it, tmp_path_factory)
    return runs


def stop(runs: dict) -> None:
    for run in runs.pop("all", []) + list(runs.values()):
        run.stop()
