"""The benchmark reports' verdicts (bench/ is not a package: imported from its folder).

The benchmarks themselves are not tests (speed is measured, not asserted); what is tested here
is that a report states the issues' targets from the numbers it measured, on made-up timings,
and that quick runs of bench/inference.py, padded.py, lstm1d.py and shapes.py write their tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_cpu  # noqa: E402
import bench_gpu  # noqa: E402

T = bench_cpu.Timing


def gpu_result(cfg: str, coop: float | None, diag: float | None, torch: float | None,
               check: dict | None = None) -> dict:
    train = {k: T([v, 2 * v]) for k, v in (("coop", coop), ("diag", diag), ("torch", torch)) if v}
    res = {"cfg": bench_gpu.parse_config(cfg), "train": train, "forward": {}, "sweeps": {},
           "dispatch": {}, "paths": []}
    # every device path matched the CPU kernels before it was timed (a smoke run's figures)
    res["path_check"] = {k: {"forward_max_abs": 3e-8, "grad_max_rel": 2e-7} for k in train if k != "torch"}
    if torch:  # the PyTorch baseline's parity check (a smoke run's figures)
        res["check"] = check or {"forward_max_abs": 1.5e-8, "grad_max_rel": 1.1e-7}
    return res


@pytest.mark.parametrize("check", [{"forward_max_abs": 1e-2, "grad_max_rel": 1e-7},
                                   {"forward_max_abs": 1e-8, "grad_max_rel": float("nan")}])
def test_gpu_target_needs_a_baseline_that_matches(check):
    """PyTorch's time says nothing when it computed something else (or NaN): no verdict."""
    (line,) = bench_gpu.targets([gpu_result("32", 1.0, None, 60.0, check)])
    assert "**BASELINE MISMATCH" in line and "met" not in line


@pytest.mark.parametrize(("coop", "diag", "torch", "verdict"), [
    (1.0, 2.0, 50.0, "50.0x (target ≥ 50x): **met**"),      # exactly the target
    (1.0, 2.0, 49.0, "49.0x (target ≥ 50x): **NOT met**"),
    (None, 1.0, 60.0, "(per-diagonal) = 60.0x"),               # no cooperative launch
    (2.0, 1.0, 60.0, "(per-diagonal) = 60.0x"),               # the faster path counts
])
def test_gpu_target_32(coop, diag, torch, verdict):
    (line,) = bench_gpu.targets([gpu_result("32", coop, diag, torch)])
    assert line.startswith("- train step at 32x32 B64 D64: PyTorch / mdnumba")
    assert verdict in line


def test_gpu_target_counts_only_device_paths_that_matched_the_cpu():
    """A device path whose output or gradients differ from the CPU kernels' (or were not checked)
    does not count for the targets, however fast; the report lists every check, a mismatch in bold."""
    res = gpu_result("32", 2.0, 1.0, 60.0)
    res["path_check"]["diag"] = {"forward_max_abs": 0.5, "grad_max_rel": 2e-7}
    (line,) = bench_gpu.targets([res])
    assert "(cooperative) = 30.0x" in line
    report = bench_gpu.render({"GPU": "test"}, [res], quick=True)
    assert "| 32x32 B64 D64 | per-diagonal | 5.0e-01 | 2.0e-07 | **MISMATCH** | – |" in report
    assert "| 32x32 B64 D64 | cooperative | 3.0e-08 | 2.0e-07 | ok | – |" in report
    res["first_call"] = {"coop": 41.26}  # its first forward and backward, compiling its kernels
    assert "| 32x32 B64 D64 | cooperative | 3.0e-08 | 2.0e-07 | ok | 41.3 |" in \
        bench_gpu.render({"GPU": "test"}, [res], quick=True)
    del res["path_check"]["coop"]
    assert bench_gpu.targets([res]) == []


def test_gpu_parts_that_broke_a_process_are_skipped_at_later_configs(monkeypatch):
    """A part that hung or lost the CUDA context at one config (a layout's kernel faulting on a
    GPU) is not run again at the next ones: each try would cost a restart of the benchmark, and a
    hang its time limit. A part a process before this one began is not run again either."""
    monkeypatch.setitem(bench_gpu._RUN, "broken", {})
    first, second = (bench_gpu.new_result(bench_gpu.parse_config(c)) for c in ("32", "256"))
    assert bench_gpu._starting(first, "cooperative tensor")
    assert not bench_gpu._starting(first, "cooperative tensor")  # begun: after a restart, not again
    bench_gpu._broken(first, "cooperative tensor", "lost the CUDA context")
    assert bench_gpu._starting(second, "cooperative flat")
    assert not bench_gpu._starting(second, "cooperative tensor")
    assert second["paths"] == ["cooperative tensor: SKIPPED (it lost the CUDA context at 32x32 B64 D64)"]


def test_gpu_paths_are_not_timed_twice(monkeypatch):
    """The item layout's weights and tiles fit a block's shared memory at 32x32 D64 and not at
    128x128 D64 or 256x256 D128 (an H100's 227 KiB); the default layout (auto) runs both sweeps in
    the tensor layout at D >= 64. There the item and tensor paths are not timed (they would time
    the flat layout or the default path again, before PyTorch), and the report says why."""
    from mdnumba.kernels import wavefront_cuda
    monkeypatch.setattr(wavefront_cuda, "_item_shared_limit", lambda: 227 * 1024)
    monkeypatch.setattr(wavefront_cuda, "DEFAULT_LAYOUT", "auto")
    monkeypatch.setitem(bench_gpu._RUN, "broken", {})
    timed = []

    def time_path(res, key, *args):
        timed.append((res["cfg"].label, key))
        res["paths"].append(f"{key}: timed")
    monkeypatch.setattr(bench_gpu, "_device_path", time_path)
    paths = [p for p in bench_gpu.DEVICE_PATHS if p[0] in ("item", "tensor")]
    results = {c: bench_gpu.new_result(bench_gpu.parse_config(c)) for c in ("32", "128", "256", "8x8x4x32")}
    for res in results.values():
        bench_gpu._time_device_paths(res, paths, None, None, 1.0)
    assert sorted(timed) == [("32x32 B64 D64", "item"), ("8x8 B4 D32", "item"), ("8x8 B4 D32", "tensor")]
    for c in ("32", "128", "256"):
        assert ("cooperative tensor: not timed: the default layout (auto) runs both sweeps in the tensor "
                "layout at this size (cooperative)") in results[c]["paths"]
    for c in ("128", "256"):
        (line,) = [p for p in results[c]["paths"] if p.startswith("item")]
        assert line.startswith("item: not timed: its forward sweep would run in the flat layout")
        assert "over the 232448 B of shared memory" in line
    assert bench_gpu.item_misfit(bench_gpu.parse_config("32")) == ""
    assert "backward sweep" in bench_gpu.item_misfit(bench_gpu.parse_config("56x56x4x64"))
    monkeypatch.setattr(wavefront_cuda, "DEFAULT_LAYOUT", "flat")  # MDNUMBA_CUDA_LAYOUT=flat
    assert bench_gpu.timed_elsewhere(bench_gpu.parse_config("32"), "tensor") == ""


def test_gpu_step_parts():
    """The default path's train step against its sweeps and weight-gradient GEMM timed alone, the
    rest what is left; a config without them has no row."""
    res = gpu_result("32", 0.006, None, 0.04)
    res["sweeps"]["cooperative"] = {"forward": T([0.0015]), "backward": T([0.0034])}
    res["gemm"] = T([0.0004, 0.0005])
    head, _, row = bench_gpu.parts_table([res, gpu_result("256", 0.1, None, None)])
    assert head.startswith("| config | train step ms | forward sweep ms | backward sweep ms |")
    assert row == "| 32x32 B64 D64 | 6 | 1.5 | 3.4 | 0.4 | 0.7 | – |"
    res["gemm_tiled"] = T([0.0009])  # the same GEMM on FP32 FMAs, beside the step's
    assert bench_gpu.parts_table([res])[2] == "| 32x32 B64 D64 | 6 | 1.5 | 3.4 | 0.4 | 0.7 | 0.9 |"


def test_gpu_targets_both_configs_and_missing_parts():
    res = [gpu_result("32", 1.0, None, 10.0), gpu_result("128", 1.0, None, 99.0),
           gpu_result("256", 1.0, None, 20.0)]
    lines = bench_gpu.targets(res)
    assert len(lines) == 2 and "NOT met" in lines[0] and "256x256 B8 D128" in lines[1]
    assert "20.0x (target ≥ 20x): **met**" in lines[1]
    assert bench_gpu.targets([gpu_result("32", 1.0, 1.0, None)]) == []       # no PyTorch
    assert bench_gpu.targets([gpu_result("8x8x4x16", 1.0, 1.0, 9.0)]) == []  # no target
    assert bench_gpu.targets([gpu_result("32", None, None, 60.0)]) == []   # neither path ran
    report = bench_gpu.render({"GPU": "test"}, [gpu_result("32", 1.0, None, None)], quick=True)
    assert "## Targets (issue 5)\n\n- (not measured in this run" in report
    report = bench_gpu.render({"GPU": "test"}, [gpu_result("32", 1.0, None, 60.0)], quick=True)
    assert "## Targets (issue 5)\n\n- train step at 32x32 B64 D64: PyTorch / mdnumba (cooperative) = " \
           "60.0x (target ≥ 50x): **met**\n" in report


def test_gpu_layout_columns_and_sync_floors_at_the_sweeps_grids():
    """The flat and sliced layouts' train steps are target candidates and columns with their own
    PyTorch ratios next to the default layout's; the per-diagonal table gives the grid-sync floor
    at the largest grid and at the sweeps' own grids (read from the paths taken)."""
    res = gpu_result("32", 2.0, None, 60.0)
    res["train"]["sliced"], res["train"]["flat"] = T([1.0, 1.5]), T([3.0, 3.5])
    res["path_check"]["sliced"] = res["path_check"]["flat"] = res["path_check"]["coop"]
    assert "(cooperative sliced) = 60.0x" in bench_gpu.targets([res])[0]
    table = bench_gpu.speed_table([res], "train", ("coop", "flat", "sliced", "torch"))
    assert table[0].startswith("| config | mdnumba GPU cooperative ms | mdnumba GPU cooperative flat ms | "
                               "mdnumba GPU cooperative sliced ms |")
    assert table[0].endswith("| PyTorch / coop | PyTorch / flat | PyTorch / sliced |")
    assert table[2].endswith("| 30.0x | 20.0x | 60.0x |")
    res["paths"] = ["cooperative (train): cooperative (396 blocks x 128 threads, 63 hyperplanes), weights in "
                    "global memory", "cooperative sliced (train): cooperative (264 blocks x 128 threads, 63 "
                    "hyperplanes), weights in shared memory, 8 slices of 8 units x 33 blocks"]
    grids = bench_gpu.coop_grids(res["paths"])
    assert grids == ((396, 128), (264, 128))
    res["floors"] = {"blocks": 2112, "sync_us": 8.72, "launch_us": 28.7,
                     "at_grids": {(264, 128): 2.5, (396, 128): 3.25}}
    row = bench_gpu.diagonal_table([res])[2]
    assert "| 8.72 (2112); 2.50 (264x128); 3.25 (396x128) | 28.70 |" in row, row


def test_cpu_targets():
    def res(cfg, md, pt):
        c = bench_cpu.Config(*cfg)
        return {"cfg": c, "train": {"mdnumba": T([md]), "torch": T([pt])},
                "forward": {"mdnumba": T([md]), "torch": T([3 * pt])}}
    lines = bench_cpu.targets([res((32, 32, 16, 32), 0.010, 0.050), res((8, 8, 16, 16), 0.0009, 0.1)])
    assert lines == [
        "- train at 32x32 B16 D32: PyTorch / mdnumba = 5.00x (target ≥ 10x): **NOT met**",
        "- forward at 32x32 B16 D32: PyTorch / mdnumba = 15.00x (target ≥ 5x): **met**",
        "- train step at 8x8 B16 D16: 0.9 ms (target ≤ 1 ms): **met**",
    ]


def test_inference_bench_quick(tmp_path):
    """bench/inference.py --quick runs and writes a row per shape with equal outputs (float64: the
    kernels the other tests compile, not a second set)."""
    import inference
    out = tmp_path / "inference.md"
    inference.main(["--quick", "--no-torch", "--dtype", "float64", "--out", str(out)])
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith(("| 2D", "| 3D", "| Grid LSTM"))]
    assert len(rows) == len(inference.QUICK)
    assert all(ln.rstrip(" |").endswith("| 0") for ln in rows), rows  # max abs difference


def test_padded_bench_quick(tmp_path):
    """bench/padded.py --quick runs and writes a row per case, each item equal to itself alone
    (float64: the kernels the other tests compile, not a second set)."""
    import padded
    out = tmp_path / "padded.md"
    padded.main(["--quick", "--dtype", "float64", "--out", str(out)])
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith(("| 1D", "| 2D"))]
    assert len(rows) == len(padded.QUICK)
    assert all(ln.rstrip(" |").endswith("| 0") for ln in rows), rows  # max abs difference


def test_lstm1d_bench_quick(tmp_path):
    """bench/lstm1d.py --quick runs and writes a row per shape (the PyTorch columns need torch)."""
    import lstm1d
    out = tmp_path / "lstm1d.md"
    lstm1d.main(["--quick", "--no-torch", "--out", str(out)])
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| T")]
    assert [ln.split(" |")[0] for ln in rows] == [f"| {c.label}" for c in lstm1d.QUICK]


def test_shapes_bench_quick(tmp_path):
    """bench/shapes.py --quick runs and writes a row per layer kind and hidden size, each compared
    with its kind's whole-tile size (1.00x for that one), and a row per batch size."""
    import shapes
    out = tmp_path / "shapes.md"
    shapes.main(["--quick", "--out", str(out)])
    rows = [ln.split(" | ") for ln in out.read_text().splitlines() if ln.startswith(("| LSTM1D", "| 2D"))]
    assert [(r[0], r[2]) for r in rows] == [("| LSTM1D T8", "3"), ("| LSTM1D T8", "4 (ref)"),
                                            ("| 2D 4x4", "3"), ("| 2D 4x4", "4 (ref)")]
    assert all(r[5] == "1.00x" and r[8] == "1.00x |" for r in rows if "(ref)" in r[2])
    rows = [ln.split(" | ") for ln in out.read_text().splitlines() if ln.startswith(("| 8x8", "| 4x4"))]
    assert [r[:3] for r in rows] == [["| 8x8", "B1", "4"], ["| 4x4", "B4", "4"]]
    assert rows[1][5] == "1.00x" and rows[1][8] == "1.00x |"  # the largest batch is the reference


def test_lstm1d_bench_torch_mapping():
    """The torch.nn.LSTM baseline computes LSTM1D's function: the gate reordering is right."""
    torch = pytest.importorskip("torch")
    import lstm1d
    fwd, grad = lstm1d.verify(torch, lstm1d.Case(5, 2, 3, 4))
    assert fwd < 1e-12 and grad < 1e-10


def test_gpu_floors_table():
    """The train step's floors: its multiply-adds at the FP32 peak plus 2K grid syncs at the
    sweeps' grids (the cheapest), against the fastest device path and the target's step time;
    a dash for what the run did not measure (the simulator: no peak, no sync floor)."""
    res = gpu_result("32", 6.4e-3, 12e-3, 43e-3)
    res["peak"] = 1e13  # multiply-adds per second
    res["floors"] = {"blocks": 2112, "sync_us": 8.0, "launch_us": 18.0, "at_grids": {(396, 128): 2.5,
                                                                                      (392, 128): 2.0}}
    assert bench_gpu.step_multiply_adds(res["cfg"]) == 30 * 64 ** 2 * 32 * 32 * 64
    head, _, row = bench_gpu.floors_table([res])
    assert head.startswith("| config | multiply-adds per step | FP32 floor ms | grid-sync floor ms |")
    # 8.05 G / 1e13 = 0.805 ms; 2 x 63 x 2.0 µs = 0.252 ms; 43 ms / 50 = 0.86 ms
    assert row == "| 32x32 B64 D64 | 8.05 G | 0.805 | 0.252 | 1.06 | 6.4 | 17% | 0.86 | 123% |", row
    bare = gpu_result("8x8x4x16", 1e-3, None, None)
    assert bench_gpu.floors_table([bare])[2] == "| 8x8 B4 D16 | 0.00197 G | – | – | – | 1 | – | – | – |"
    assert "## Floors" in bench_gpu.render({"GPU": "test"}, [res], quick=True)


def test_bench_arguments_are_checked_before_the_run(tmp_path):
    """A --out that is a folder (or under a file) was a traceback once the benchmark's minutes
    were spent; --rounds 0, --repeats 0 or a --long-size of text failed at the end or mid-run."""
    import argparse

    from bench_args import out_path, positive_int, sizes
    assert out_path(str(tmp_path / "new" / "r.md")) == tmp_path / "new" / "r.md"  # made at the end
    with pytest.raises(argparse.ArgumentTypeError, match=r"is a folder; give the report's file, e\.g\. "):
        out_path(str(tmp_path))
    (tmp_path / "file").write_text("")
    with pytest.raises(argparse.ArgumentTypeError, match=r"file is not a writable folder$"):
        out_path(str(tmp_path / "file" / "r.md"))
    assert positive_int("3") == 3 and sizes("64,128") == [64, 128]
    for bad, said in (("0", "must be >= 1, got 0"), ("-1", "must be >= 1"), ("x", "'x' is not an integer")):
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            positive_int(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="'abc' is not an integer"):
        sizes("64,abc")


@pytest.mark.parametrize("script, argv, said", [
    ("tune_gpu", ["--layout", "nope"], "argument --layout: 'nope' is not one of auto, flat, sliced"),
    ("tune_gpu", ["--rows", "x"], "argument --rows: 'x' is not a comma list of integers"),
    ("tune_gpu", ["--tpb", "64,512"], r"argument --tpb: each must be in \[1, 256\], got 512"),
    ("tune_gpu", ["--min-blocks", "-1"], r"argument --min-blocks: each must be in \[0, 32\], got -1"),
    ("tune_gpu", ["--configs", "32,7"], r"argument --configs: '7' is neither one of"),
    ("tune_gpu", ["--variants", "full,bad"], "argument --variants: 'bad' is not one of full, memory-cell"),
    ("bench_gpu", ["--configs", "0x4x2x2"], "'0x4x2x2': H, W, B and D must each be >= 1"),
    ("profile_gpu", ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    ("charlm_gpu", ["--models", "stacked,nope"], "argument --models: 'nope' is not one of stacked, grid"),
    ("charlm_gpu", ["--budget", "nan"], "argument --budget: must be a finite number > 0"),
    ("charlm_gpu", ["--dropout", "1.5"], r"--dropout must lie in \[0, 1\)"),
    ("threads", ["--seconds", "0"], "argument --seconds: must be a finite number > 0, got 0"),
])
def test_bench_scripts_refuse_bad_arguments_before_the_run(capsys, script, argv, said):
    """Each was a traceback (or a FAILED row per combination of a tuning run, each after its
    child process's imports) once the script had started: now argparse's one-line error, before
    anything runs; the settings' ranges are mdnumba.config's (tune_gpu)."""
    import importlib
    import re
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and re.search(said, err), err


def test_gpu_parity_is_inclusive_and_needs_every_figure():
    """A check exactly at PARITY still matches; a check missing a figure (or none) does not."""
    assert bench_gpu.matches(dict(bench_gpu.PARITY))
    assert not bench_gpu.matches({"forward_max_abs": 1e-8})  # no gradient figure
    assert not bench_gpu.matches({}) and not bench_gpu.matches(None)


def test_gpu_target_only_at_the_issues_shapes():
    """A non-square config with the 32x32 config's H, B and D has no target."""
    assert bench_gpu.targets([gpu_result("32x64x64x64", 1.0, None, 60.0)]) == []


def test_gpu_speed_table_cpu_ratio_and_separator():
    """With every column, the CPU / coop ratio is last; the separator has a cell per column."""
    res = gpu_result("32", 2.0, None, 60.0)
    res["train"]["cpu"] = T([100.0])
    head, sep, row = bench_gpu.speed_table([res], "train")
    assert head.endswith("| PyTorch / tensor | CPU / coop |")
    assert row.endswith("| – | 50.0x |")
    assert sep.count("---") == head.count("|") - 1 == row.count("|") - 1


def test_gpu_diagonal_table_us_per_diagonal():
    """The sweeps' µs per anti-diagonal (K = 63 at 32x32); dashes where no floors were measured."""
    res = gpu_result("32", 2.0, None, None)
    res["sweeps"]["cooperative"] = {"forward": T([63 * 2e-6]), "backward": T([63 * 3e-6])}
    row = bench_gpu.diagonal_table([res])[2]
    # the cooperative column of each sweep, 7 paths each
    assert row.startswith("| 32x32 B64 D64 | 63 | 2.0 | – | – | – | – | – | – | 3.0 | "), row
    assert row.endswith("| – | – |")


def test_gpu_floors_without_the_sweeps_grids_and_a_faster_per_diagonal_path():
    """No sweep grid read from the paths taken: the sync floor at the largest grid; the fastest
    step is the per-diagonal path's where it is the fastest."""
    res = gpu_result("32", 12e-3, 6.4e-3, 43e-3)
    res["peak"] = 1e13
    res["floors"] = {"blocks": 2112, "sync_us": 2.0, "launch_us": 18.0, "at_grids": {}}
    row = bench_gpu.floors_table([res])[2]
    # 2 x 63 x 2.0 µs = 0.252 ms; fastest step 6.4 ms, per-diagonal
    assert row == "| 32x32 B64 D64 | 8.05 G | 0.805 | 0.252 | 1.06 | 6.4 | 17% | 0.86 | 123% |", row


def test_gpu_dispatch_table():
    """Host time of the launches against the step (and with prepared launches off), and the
    trainer's step with and without prefetch against its host batch sampling."""
    res = gpu_result("32", 2e-3, None, None)
    res["dispatch"]["coop"] = T([1.5e-3])
    res["dispatch_numba"] = {"coop": T([1.8e-3])}
    res["train"]["trainer"], res["train"]["trainer_no_prefetch"] = T([4e-3]), T([5e-3])
    res["sampling"] = T([1e-3])
    trainer = "| 32x32 B64 D64 | `train --device cuda`, prefetch"
    assert bench_gpu.dispatch_table([res])[2:] == [
        "| 32x32 B64 D64 | cooperative | 2 | 1.5 | 75% | 1.8 |",
        f"{trainer} on, as `run` (host batch sampling) | 4 | 1 | 25% | – |",
        f"{trainer} off (host batch sampling) | 5 | 1 | 20% | – |"]


def test_gpu_report_sections():
    """The quick banner only on a quick run; the PyTorch check's section; PyTorch in the
    inference table with its ratio."""
    res = gpu_result("32", 1e-3, None, 60e-3)
    res["inference"] = {"coop": T([1e-3]), "torch": T([4e-3])}
    quick = bench_gpu.render({"GPU": "test"}, [res], quick=True)
    full = bench_gpu.render({"GPU": "test"}, [res], quick=False)
    assert "**--quick or --smoke run" in quick and "**--quick or --smoke run" not in full
    assert "## PyTorch baseline check (before timing, same weights)" in full
    assert "| 32x32 B64 D64 | 1.5e-08 | 1.1e-07 |" in full
    inference = full.split("## Inference")[1].split("\n## ")[0]
    assert "| PyTorch GPU ms |" in inference and "| 4.0x | – | – | – |" in inference


def test_gpu_broken_part_is_said_skipped_once(monkeypatch):
    """A part broken at an earlier config, asked again at this one (a restart goes over the
    config's parts again), is said SKIPPED once."""
    monkeypatch.setitem(bench_gpu._RUN, "broken", {"item": "hung at 32x32 B64 D64"})
    res = bench_gpu.new_result(bench_gpu.parse_config("256"))
    assert not bench_gpu._starting(res, "item")
    assert not bench_gpu._starting(res, "item")
    assert res["paths"] == ["item: SKIPPED (it hung at 32x32 B64 D64)"] and res["begun"] == ["item"]


def test_gpu_configs_parsed():
    """The issue's three configs, in the order given, and HxWxBxD in either case."""
    assert [c.label for c in bench_gpu.config_list("32,128,256,8X8x4x16")] == [
        "32x32 B64 D64", "128x128 B16 D64", "256x256 B8 D128", "8x8 B4 D16"]


def test_cpu_targets_at_the_bounds_forward_and_without_torch():
    """Each CPU target met exactly at its bound; the forward ratio from the forward times; no
    ratio lines (and no error) where PyTorch was not run."""
    def res(cfg, train, fwd):  # (mdnumba, PyTorch) seconds
        return {"cfg": bench_cpu.Config(*cfg), "train": {"mdnumba": T([train[0]]), "torch": T([train[1]])},
                "forward": {"mdnumba": T([fwd[0]]), "torch": T([fwd[1]])}}
    lines = bench_cpu.targets([res((32, 32, 16, 32), (0.01, 0.1), (0.004, 0.02)),
                               res((8, 8, 16, 16), (0.001, 0.1), (0.001, 0.1))])
    assert lines == [
        "- train at 32x32 B16 D32: PyTorch / mdnumba = 10.00x (target ≥ 10x): **met**",
        "- forward at 32x32 B16 D32: PyTorch / mdnumba = 5.00x (target ≥ 5x): **met**",
        "- train step at 8x8 B16 D16: 1 ms (target ≤ 1 ms): **met**",
    ]
    no_torch = {"cfg": bench_cpu.Config(32, 32, 16, 32), "train": {"mdnumba": T([0.01])},
                "forward": {"mdnumba": T([0.004])}}
    assert bench_cpu.targets([no_torch]) == []


def test_gpu_floors_count_only_paths_that_matched_the_cpu():
    """The floors' fastest step, as the targets', is of the paths that matched the CPU kernels:
    a faster path that computed something else is not it."""
    res = gpu_result("32", 6.4e-3, 12e-3, 43e-3)
    res["path_check"]["coop"] = {"forward_max_abs": 1.0, "grad_max_rel": 1e-7}
    assert bench_gpu.fastest_path(res) == (12e-3, "per-diagonal")
    assert bench_gpu.floors_table([res])[2].split(" | ")[5] == "12"
    assert "(per-diagonal) = 3.6x" in bench_gpu.targets([res])[0]
