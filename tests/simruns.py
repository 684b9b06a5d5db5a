"""The ``sim_*`` cases of tests/test_cuda.py in ``python -m pytest`` subprocesses.

``NUMBA_ENABLE_CUDASIM`` must be set before ``numba.cuda`` is first imported, so the simulator
cases run in subprocesses. conftest.py starts them when the session starts (:func:`start`), once
tests/warmup.py has compiled the CPU kernels they and the suite share: they are pure Python on
one core each, and overlap the rest of the suite. The tests that wait for their reports run
last (conftest.py orders them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import warmup

#: concurrent processes for the simulator cases (pure Python, one core each) and for ptxcheck
SHARDS = max(2, min(4, os.cpu_count() or 1))
#: the other MDNUMBA_CUDA_ROWS_PER_THREAD values test_simulator_other_rows_per_thread runs
OTHER_ROWS = (1, 3)
TIMEOUT = 1200
#: the tests of tests/test_cuda.py that read the simulator runs' reports
WAITING_TESTS = ("test_simulator", "test_simulator_other_rows_per_thread", "test_kernels_compile_for_gpu")
_CASES_FILE = Path(__file__).with_name("test_cuda.py")


def in_simulator() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


class CaseRun:
    """A ``python -m pytest`` subprocess running the sim_* cases (all, those ``-k select``, or
    shard ``i/k`` of them), started at once so that the runs overlap; :meth:`report` waits.
    Under the simulator the launches' argument types go to ``tmp_dir/launches.pkl``."""

    def __init__(self, tmp_dir: Path, simulator: bool, env_extra: dict | None = None,
                 select: str | None = None):
        self.xml, self.out = tmp_dir / "report.xml", tmp_dir / "output.txt"
        self.launches = tmp_dir / "launches.pkl"
        env = dict(os.environ)
        if simulator:  # one numba thread: the runs share the cores
            env.update(NUMBA_ENABLE_CUDASIM="1", MDNUMBA_THREADS_PER_BLOCK="8", NUMBA_NUM_THREADS="1",
                       MDNUMBA_PTX_RECORD=str(self.launches))
        env.update(env_extra or {})
        cmd = [sys.executable, "-m", "pytest", str(_CASES_FILE), "-q", "-p", "no:cacheprovider",
               "-o", "python_functions=sim_*", f"--junitxml={self.xml}"] + (["-k", select] if select else [])
        with open(self.out, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=_CASES_FILE.parents[1], env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
        self._report = None

    def report(self) -> dict[str, tuple[str, str]]:
        """name -> (state, message) of every case the run reported."""
        if self._report is None:
            try:
                rc = self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.stop()
                pytest.fail(f"case run still going after {TIMEOUT} s:\n{self.out.read_text()[-6000:]}")
            if not self.xml.exists():
                pytest.fail(f"case run produced no report (rc={rc}):\n{self.out.read_text()[-6000:]}")
            self._report = _parse_report(self.xml)
        return self._report

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


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


def waiting_last(items: list) -> None:
    """Move the tests that wait for the simulator runs to the end (stable otherwise)."""
    items.sort(key=_waiting)


def start(items: list, tmp_path_factory) -> dict:
    """Start every simulator run the selected ``items`` need, all at once: the cases in SHARDS
    shards ("all") and the OTHER_ROWS runs (by rows), after tests/warmup.py has filled the
    kernel cache. None under the simulator itself."""
    if in_simulator():
        return {}
    wanted = [it for it in items if _waiting(it)]
    names = {it.originalname for it in wanted}
    runs = {}
    if wanted:
        warmup.fill_cache()  # the runs and the suite then load the CPU kernels they share
    if names & {"test_simulator", "test_kernels_compile_for_gpu"}:
        runs["all"] = [CaseRun(tmp_path_factory.mktemp("cudasim"), simulator=True,
                               env_extra={"MDNUMBA_TEST_SHARD": f"{i}/{SHARDS}"}) for i in range(SHARDS)]
    for it in wanted:
        if it.originalname == "test_simulator_other_rows_per_thread":
            rows = it.callspec.params["rows"]
            runs[rows] = CaseRun(tmp_path_factory.mktemp(f"cudasim_rows{rows}"), simulator=True,
                                 env_extra={"MDNUMBA_CUDA_ROWS_PER_THREAD": str(rows)},
                                 select="sweep_kernels or layer_matches_reference")
    return runs


def stop(runs: dict) -> None:
    for run in runs.pop("all", []) + list(runs.values()):
        run.stop()
