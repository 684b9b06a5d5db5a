"""The on-disk kernel cache recompiles when a kernel source it cannot see changes, and keeps
the fastmath and exact builds apart (mdnumba/kernel_cache.py)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import warmup

import mdnumba
from mdnumba import config
from mdnumba.kernel_cache import KernelCacheLocator

PROBE = """
import json, numpy as np
from mdnumba.kernels.gemm import column_sums
out = np.zeros(3)
column_sums(out, np.ones((5, 3)), None)
assert out.tolist() == [5.0, 5.0, 5.0]
print(json.dumps([sum(column_sums.stats.cache_hits.values()), sum(column_sums.stats.cache_misses.values())]))
"""


def test_kernels_use_the_locator():
    from mdnumba.kernels.wavefront import _sweep_forward
    if not config.env_flag("MDNUMBA_CACHE", True):
        pytest.skip("MDNUMBA_CACHE=0")
    assert config.CACHE, "this Numba's cache internals are not the ones kernel_cache.py knows"
    locator = _sweep_forward._cache._impl.locator
    assert isinstance(locator, KernelCacheLocator)
    assert locator.get_cache_path().endswith("fastmath" if config.FASTMATH else "exact")
    assert locator.get_source_stamp()[1] == KernelCacheLocator.digest != ""


@pytest.fixture
def package_copy(tmp_path):
    """A copy of the mdnumba package (no caches) and a run(**env) of PROBE against it, which
    returns (cache hits, cache misses) of the probed kernel."""
    src = Path(mdnumba.__file__).parent
    shutil.copytree(src, tmp_path / "mdnumba", ignore=shutil.ignore_patterns("__pycache__", "cli"))

    def run(**env):
        env = dict(os.environ, PYTHONPATH=str(tmp_path), NUMBA_CACHE_DIR=str(tmp_path / "cache"),
                   MDNUMBA_CACHE="1", **env)
        proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))
    return tmp_path / "mdnumba", run


def test_an_edit_of_another_kernel_file_recompiles(package_copy):
    """gemm.py is unchanged, cell.py (inlined by the sweeps, not by gemm) is edited: Numba alone
    would still load gemm's cached build; with the digest every kernel recompiles once."""
    package, run = package_copy
    assert run() == (0, 1)
    assert run() == (1, 0)
    with open(package / "kernels" / "cell.py", "a") as f:
        f.write("\n# an edit\n")
    assert run() == (0, 1)
    assert run() == (1, 0)


def test_the_digest_covers_every_kernel_source_and_config(tmp_path, monkeypatch):
    """An edit of any kernel file or of config.py (whose constants the kernels inline: tiles,
    vector widths, dtypes) changes the digest the cached builds are stamped with; another
    module's does not."""
    from mdnumba import kernel_cache
    shutil.copytree(Path(mdnumba.__file__).parent, tmp_path / "mdnumba",
                    ignore=shutil.ignore_patterns("__pycache__", "cli"))
    monkeypatch.setattr(kernel_cache, "_PACKAGE", tmp_path / "mdnumba")
    seen = [kernel_cache.sources_digest()]
    for name in ("kernels/gemm.py", "config.py", "layers.py"):
        with open(tmp_path / "mdnumba" / name, "a") as f:
            f.write("\n# an edit\n")
        seen.append(kernel_cache.sources_digest())
    assert len(set(seen[:3])) == 3 and seen[3] == seen[2], seen


def test_fastmath_and_exact_builds_are_cached_apart(package_copy):
    _, run = package_copy
    assert run(MDNUMBA_FASTMATH="0") == (0, 1)
    assert run(MDNUMBA_FASTMATH="1") == (0, 1)  # Numba alone: a hit on the exact build
    assert run(MDNUMBA_FASTMATH="1") == (1, 0)
    assert run(MDNUMBA_FASTMATH="0") == (1, 0)


def test_a_kernel_numba_cannot_cache_still_runs(tmp_path):
    """Numba refuses to cache a kernel with dynamic globals (e.g. a call of get_num_threads) with a
    warning; to say so it reads its locator's ``_py_file``, which the wrapping locator passes on
    (it raised AttributeError, and the kernel did not run)."""
    src = Path(mdnumba.__file__).parent
    shutil.copytree(src, tmp_path / "mdnumba", ignore=shutil.ignore_patterns("__pycache__", "cli"))
    with open(tmp_path / "mdnumba" / "kernels" / "gemm.py", "a") as f:
        f.write("\n\nimport numba\n\n\n@njit(**NJIT_OPTS)\ndef threads_probe():\n"
                "    return numba.get_num_threads()\n")
    probe = "from mdnumba.kernels.gemm import threads_probe\nprint(threads_probe())\n"
    env = dict(os.environ, PYTHONPATH=str(tmp_path), NUMBA_CACHE_DIR=str(tmp_path / "cache"),
               MDNUMBA_CACHE="1")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) >= 1
    assert "Cannot cache" in proc.stderr and "dynamic globals" in proc.stderr


def test_without_a_writable_cache_folder_kernels_compile_with_a_warning(package_copy):
    """A read-only install whose user has no writable home: Numba found no cache folder and
    refused every kernel at import (a RuntimeError from `import mdnumba`); now one warning, and
    kernels compile in the process. (As root no folder is read-only: files named like the
    folders make every one of Numba's folders unusable.)"""
    package, _ = package_copy
    for sub in (package, package / "kernels", package / "tasks"):
        (sub / "__pycache__").write_text("")
    blocked = package.parent / "blocked"
    blocked.write_text("")
    env = dict(os.environ, PYTHONPATH=str(package.parent), MDNUMBA_CACHE="1", HOME=str(blocked),
               XDG_CACHE_HOME=str(blocked / "cache"))
    env.pop("NUMBA_CACHE_DIR", None)
    info = "\nfrom mdnumba.info import collect_info\nprint(collect_info()['kernel cache'])"
    proc = subprocess.run([sys.executable, "-c", PROBE + info], cwd=package.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-2])[0] == 0  # compiled here (PROBE checks it ran)
    assert proc.stdout.strip().splitlines()[-1] == "off (no writable cache folder; set NUMBA_CACHE_DIR)"
    assert proc.stderr.count("no writable folder for the kernel cache") == 1, proc.stderr[-3000:]
    assert "set NUMBA_CACHE_DIR" in proc.stderr


@pytest.mark.parametrize("job", warmup.JOBS)
def test_the_suites_kernel_warm_up_runs(job):
    """tests/warmup.py fills the cache before the session: if it broke, nothing would fail, the
    suite would only compile everything again (minutes), so its calls are run here too."""
    warmup.warm(job)


SPECIALISATIONS = """
import json, sys
import warmup
from numba.core import types
from numba.core.registry import CPUDispatcher

def plain(t):
    t = types.unliteral(t)
    return types.int64 if isinstance(t, types.Integer) else t

for kind in warmup.KINDS:
    warmup.warm("float32:" + kind)

again = []
for name, module in list(sys.modules.items()):
    for attr, f in vars(module).items():
        if name.startswith("mdnumba") and isinstance(f, CPUDispatcher) and f.__module__ == name:
            plain_sigs = [tuple(plain(t) for t in sig) for sig in f.signatures]
            if len(set(plain_sigs)) < len(plain_sigs):
                again.append([f"{name}.{attr}"] + [str(sig) for sig in f.signatures])
print(json.dumps(again))
"""


@pytest.mark.slow
def test_no_kernel_is_compiled_again_for_a_literal_or_an_integer_width(tmp_path):
    """Numba compiles a function once more for each literal argument it is called with from other
    compiled code (a constant 0, a loop variable's first value), where the value itself would do,
    and once more for an int32 where other calls pass an int64: each such specialisation cost a
    first run 1-2 s (a cold char-lm grid run 53 s, 40 s without them). The warm-up's calls,
    compiled from an empty cache, leave no function of mdnumba's with two signatures that are
    the same but for literals and the widths of integers."""
    proc = subprocess.run([sys.executable, "-c", SPECIALISATIONS], cwd=Path(warmup.__file__).parent,
                          env=dict(warmup.environment(), NUMBA_CACHE_DIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_the_warm_up_runs_as_the_session_starts_it():
    """As :func:`warmup.fill_cache` starts it: a process of its own, with its environment."""
    proc = subprocess.run(warmup.command(["float64:grid"]), cwd=warmup.ROOT, env=warmup.environment(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warm-up float64:grid:" in proc.stdout


def test_the_warm_up_takes_both_sweep_schedules():
    from mdnumba.grid import wavefront
    from mdnumba.kernels import wavefront as wfk
    small = wavefront((8, 8)).diag_off
    planes, blocks = warmup.schedules()
    with planes:
        assert wfk.batch_blocks(1, 16, small, None) == 0
        assert wfk.batch_blocks(1, 5, wavefront((9,)).diag_off, None) == 0
    with blocks:
        assert wfk.batch_blocks(1, 1, wavefront((20, 20)).diag_off, None) == 1
    assert wfk.batch_blocks(1, 1, small, None) == 0  # the settings are back


def test_a_failed_warm_up_is_a_warning_with_its_output(monkeypatch):
    if not config.CACHE:
        pytest.skip("no warm-up without the kernel cache")
    monkeypatch.setattr(warmup, "JOBS", ("float64:nosuchkind",))
    monkeypatch.delenv("MDNUMBA_TEST_WARMUP", raising=False)
    with pytest.warns(UserWarning, match=r"(?s)kernel warm-up float64:nosuchkind failed \(1\).*KeyError"):
        warmup.fill_cache(processes=1)


def _save_concurrently(folder: Path, slow_load) -> dict:
    """Two threads save one entry each into one index, both reading it before either writes."""
    import threading

    from numba.core.caching import IndexDataCacheFile
    index = IndexDataCacheFile(str(folder), "kernel-1.py311", "stamp")
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=lambda k=k: (barrier.wait(), index.save(k, f"code {k}")))
               for k in ("float32", "float64")]
    with slow_load():
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {k: index.load(k) for k in ("float32", "float64")}


def test_index_writes_are_locked_in_mdnumbas_folders(tmp_path, monkeypatch):
    """Numba reads, extends and writes back a function's cache index without a lock: of two
    processes (here threads) compiling one kernel at once, one entry was lost. In mdnumba's
    folders the write is locked and both stay, each with its own code."""
    import contextlib

    from numba.core import caching

    from mdnumba import kernel_cache
    if not config.CACHE or kernel_cache.fcntl is None:
        pytest.skip("no kernel cache, or no fcntl")
    real_load = caching.IndexDataCacheFile._load_index

    @contextlib.contextmanager
    def slow_load():
        def load(self):
            out = real_load(self)
            time.sleep(0.3)  # both threads hold the old index when the other writes
            return out
        with monkeypatch.context() as m:
            m.setattr(caching.IndexDataCacheFile, "_load_index", load)
            yield

    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    theirs.mkdir(), ours.mkdir()
    monkeypatch.setattr(kernel_cache, "_OUR_FOLDERS", {str(ours)})
    assert None in _save_concurrently(theirs, slow_load).values()  # the race, unlocked
    assert _save_concurrently(ours, slow_load) == {"float32": "code float32", "float64": "code float64"}
