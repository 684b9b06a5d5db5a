"""The GPU benchmark scripts run end to end under the CUDA simulator.

A lent GPU is rare and its time short, so ``bench/run_gpu.sh`` must work the first time it
meets one. Its ``--smoke`` mode runs every part once at tiny sizes: the probe
(``bench/gpu_probe.py``: can numba-cuda compile and run a kernel here?), the GPU test selection
(skipped without a GPU), ``bench_gpu.py`` (both sweep paths, the device trainer, the NumPy
API, PyTorch on CPU tensors when it is installed, the CPU), ``bench_family.py --device
cuda`` and ``charlm_gpu.py`` (the device-resident char-LM trainer); the benchmark scripts exit
non-zero in a smoke run when a part fails. Nothing is timed here: the numbers a simulator gives mean nothing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _simulated(**extra: str) -> dict[str, str]:
    """The environment of a ``bench/`` script run under the CUDA simulator: its launches under
    tests/simgrid.py (``tests/simsite/sitecustomize.py``; numba's own simulator takes minutes over
    a tensor-layout step), without the PTX recording of the session's test process."""
    path = os.pathsep.join([str(ROOT / "tests" / "simsite"), str(ROOT / "tests")]
                           + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=path, **extra)
    env.pop("MDNUMBA_PTX_RECORD", None)
    return env


def _smoke_run(folder: Path):
    """``bench/run_gpu.sh --smoke`` under the simulator, its files in ``folder/out``."""
    (folder / "out").mkdir()
    # CHARLM_S: the char-LM part's cap (90 s on a GPU) for its compiles on a CI machine's cores busy
    # with the simulator shards; BENCH_MAX_S and RUN_GPU_DEADLINE_S the same for the benchmark part
    # (300 and 570 s on a GPU): beside the other slow tests' runs (8 processes on 2 cores) it took
    # over 300 s
    # MDNUMBA_BENCH_INJECT: bench_gpu.py's first process fails a part after the default path's and
    # reports the CUDA context lost (as an illegal address does on a GPU), its second runs a part
    # that never ends: the run must go on in a fresh process each time and still fill every column
    env = _simulated(MDNUMBA_THREADS_PER_BLOCK="8", NUMBA_NUM_THREADS="1", OUT=str(folder / "out"),
                     PYTHONUNBUFFERED="1", CHARLM_S="240", BENCH_MAX_S="900", RUN_GPU_DEADLINE_S="1100",
                     MDNUMBA_BENCH_INJECT="lose,hang",
                     PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return ["bash", str(ROOT / "bench" / "run_gpu.sh"), "--smoke"], env


@pytest.mark.slow
@pytest.mark.background(command=_smoke_run, warm=True)
def test_run_gpu_smoke_under_the_simulator(background_run):
    """The smoke run (started with the session, after the kernel warm-up) filled every table."""
    rc, out = background_run.wait(), background_run.output()
    assert rc == 0, out[-6000:]
    assert [line for line in out.splitlines() if "FAILED" in line and "injected lose" not in line] == []
    assert "going on in a fresh process (restart 2 of 3)" in out, out[-6000:]
    for script in ("gpu_probe.py", "bench_gpu.py", "bench_family.py", "charlm_gpu.py"):  # tests/simsite
        assert f"{script}: launches under tests/simgrid.py" in out, (script, out[:3000])
    tmp_path = background_run.out.parent / "out"
    gpu = (tmp_path / "gpu.md").read_text()
    row = next(line for line in gpu.splitlines() if line.startswith("| 4x4 B1 D2 | **"))
    # cooperative (auto, flat, sliced, staged), item, cooperative tensor, per-diagonal, trainer,
    cells = row.split(" | ")[1:12]  # NumPy API, PyTorch, CPU
    has_torch = importlib.util.find_spec("torch") is not None
    filled = [c.startswith("**") for c in cells]
    assert filled == [True] * 9 + [has_torch, True], row
    assert "item (train): item (1 blocks x 8 threads" in gpu, gpu[-3000:]
    lost = "injected lose: FAILED (RuntimeError: a loss of the CUDA context injected by MDNUMBA_BENCH_INJECT)"
    assert f"- 4x4 B1 D2: {lost}; the CUDA context was lost" in gpu, gpu[-3000:]
    assert "- 4x4 B1 D2: injected hang: HUNG (still running after 4 s)" in gpu, gpu[-3000:]  # 2 s, doubled
    # for a process's first part
    assert "| 4x4 B1 D2 | item | " in gpu and "**MISMATCH**" not in gpu, gpu[-3000:]  # checked vs the CPU
    check = re.compile(r"\| 4x4 B1 D2 \| cooperative \| .* \| ok \| \d+\.\d \|$")  # its first call's seconds
    assert any(check.match(line) for line in gpu.splitlines()), gpu[-3000:]
    parts = gpu[gpu.index("## Where a train step goes"):].splitlines()
    assert any(line.startswith("| 4x4 B1 D2 | ") for line in parts), parts[:12]
    assert "cooperative sliced (train): cooperative" in gpu and "slices of" in gpu, gpu[-3000:]
    assert "cooperative staged (train): cooperative" in gpu and "rows staged in" in gpu, gpu[-3000:]
    assert "cooperative tensor (train): cooperative" in gpu and "tensor cores (3xTF32)" in gpu, gpu[-3000:]
    inference = gpu[gpu.index("## Inference"):].splitlines()
    row = next(line for line in inference if line.startswith("| 4x4 B1 D2 | **"))
    assert [c.startswith("**") for c in row.split(" | ")[1:7]] == [True] * 5 + [has_torch], row
    family = (tmp_path / "family_cuda.md").read_text()
    assert "2D 3x3 B1 D2, 4 directions" in family and "3D 2x2x2 B1 D2, 1 direction" in family
    assert "PyTorch failed" not in family if has_torch else True
    charlm = (tmp_path / "charlm_gpu.md").read_text()
    rows = [line for line in charlm.splitlines() if line.startswith("| ") and "per step" not in line]
    assert len(rows) == 6 and all(" | **" in line for line in rows), charlm  # 2 models x 3 trainers
    assert (tmp_path / "test_cuda.log").exists()
    probe = (tmp_path / "probe.log").read_text()
    assert "libdevice kernel: ok" in probe and "cooperative kernel: ok" in probe, probe
    # the device tool brings back at most 8 files, at most 2 folders down: all of them must come
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(tmp_path).parts) <= 3 for p in files), files
    assert (tmp_path / "test_cuda_tmp.tgz").exists()  # the test shards' reports, packed


@pytest.mark.slow
def test_tune_gpu_times_the_sweeps_without_some_stages(tmp_path):
    """``bench/tune_gpu.py --layout flat,item --item-threads 8 --min-blocks 3 --variants
    memory-cell,neither`` under the simulator: one child process per layout and variant
    (MDNUMBA_CUDA_CELL_REGISTERS=0; MDNUMBA_CUDA_SKIP sum and cell: the other variants set the same
    variables), a row each with its layout and launch bound (no bound in the simulator), none
    failed."""
    env = _simulated(NUMBA_NUM_THREADS="1")
    out = tmp_path / "tune.md"
    args = ["--rows", "2", "--unroll", "8", "--tpb", "8", "--layout", "flat,item", "--item-threads", "8",
            "--min-blocks", "3", "--variants", "memory-cell,neither", "--configs", "4x4x1x2",
            "--quick", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "tune_gpu.py"), *args], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| 4x4 B1 D2 |")]
    want = [[layout, "3", variant] for layout in ("flat", "item 8") for variant in ("memory-cell", "neither")]
    assert [ln.split(" | ")[4:7] for ln in rows] == want, rows
    bold = ["**" in ln for ln in rows]  # only right results are candidates: one of the memory-cell rows
    assert sum(bold) == 1 and (bold[0] or bold[2]), rows
    assert all("FAILED" not in ln for ln in rows), rows
    assert ["cooperative" in ln for ln in rows] == [True] * 2 + [False] * 2, rows
    assert all("item (1 blocks x 8 threads" in ln for ln in rows[2:]), rows


def test_tune_gpu_kills_a_combination_that_hangs(monkeypatch):
    """A combination's child still running after ``COMBO_LIMIT_S`` (a kernel that never ends on a
    GPU) is killed, and its row says so: here a limit far below what a child takes to start."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import tune_gpu
    monkeypatch.setattr(tune_gpu, "COMBO_LIMIT_S", 0.2)
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    rows = tune_gpu.run_combo(2, 8, 8, "flat", "4x4x1x2", quick=True)
    assert [r["error"] for r in rows] == ["HUNG: still running after 0.2 s, killed"], rows
    assert "FAILED: HUNG" in tune_gpu.render(rows)


def _launch_host_run(folder: Path):
    """``bench/launch_host.py --only step,Adam`` at 2 repeats (no GPU: the driver calls stubbed,
    numba-cuda's dispatch and NVVM for real), its table in ``folder/launch_host.md``; ~20 s of
    NVVM compiles, so it runs with the session's background runs."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "MDNUMBA_PTX_RECORD")}
    return [sys.executable, str(ROOT / "bench" / "launch_host.py"), "--repeats", "2", "--only", "step,Adam",
            "--out", str(folder / "launch_host.md")], env


@pytest.mark.slow
@pytest.mark.background(command=_launch_host_run)
def test_launch_host_times_whole_steps_and_runs_them_prepared(background_run):
    """Every launch of the GPU benchmark's device train step and of a block of the device trainer's
    steps runs prepared once its keys are known (a launch whose arguments change from step to
    step, Adam's bias corrections or a block's new arrays, went through numba-cuda every time: 1
    of 9 and 3 of 11 a step before); the Adam launcher's fields are the kernel's (64: 7 per 1-D
    array, 1 per scalar: p, g, m, v, 4 scalars, the step count and its parity, the norm's 3
    arrays and 3 scalars)."""
    import ptxcheck
    if ptxcheck.missing_toolchain():
        pytest.skip(ptxcheck.missing_toolchain())
    rc = background_run.wait()
    assert rc == 0, background_run.output()[-6000:]
    table = (background_run.out.parent / "launch_host.md").read_text()
    rows = [ln.split(" | ") for ln in table.splitlines() if ln.startswith("| ")][1:]  # (header)
    assert [row[1] for row in rows] == ["9 (0)", "220 (0)", "1 (0)"], rows
    assert rows[2][0] == "| Adam update" and rows[2][2] == "64", rows
    assert all(row[-1].endswith("x |") for row in rows), rows
