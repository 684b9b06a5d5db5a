"""Import-time glibc malloc tuning (mdnumba.config.tune_malloc): when it acts, and that it acts."""

import os
import platform
import subprocess
import sys

import pytest

from mdnumba.config import ConfigError, tune_malloc

GLIBC = platform.libc_ver()[0] == "glibc"
THRESHOLD_VARS = ("MDNUMBA_MALLOC_TUNING", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                  "GLIBC_TUNABLES")


@pytest.fixture
def clean_env(monkeypatch):
    for name in THRESHOLD_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("name, value, want", [
    ("MDNUMBA_MALLOC_TUNING", "0", "off (MDNUMBA_MALLOC_TUNING=0)"),
    ("MALLOC_TRIM_THRESHOLD_", "131072", "off (the environment sets glibc's thresholds)"),
    ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536", "off (the environment sets glibc's thresholds)"),
])
def test_malloc_tuning_stays_off_when_told_or_when_the_environment_chose(clean_env, name, value, want):
    clean_env.setenv(name, value)
    assert tune_malloc() == want


def test_malloc_tuning_flag_must_be_a_word(clean_env):
    clean_env.setenv("MDNUMBA_MALLOC_TUNING", "sometimes")
    with pytest.raises(ConfigError, match="MDNUMBA_MALLOC_TUNING='sometimes': use 1 or 0"):
        tune_malloc()


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_malloc_tuning_sets_both_thresholds_on_glibc(clean_env):
    clean_env.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")  # other tunables do not stop it
    assert tune_malloc() == "mmap threshold 256 MiB, trim threshold 512 MiB"


FAULTS = """
import resource, numpy as np, mdnumba
layer = mdnumba.MDLSTM2D(1, 32, dtype=np.float32)
x = np.ones((16, 32, 32, 1), np.float32)
def step():  # a 2 MiB output and loss gradient made afresh, as in training
    h = layer.forward(x)
    layer.backward(h / h.size, input_grad=False)
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not GLIBC or not sys.platform.startswith("linux"), reason="glibc's page faults")
def test_train_steps_fault_no_fresh_pages_in_when_tuned():
    """Without the tuning glibc hands the step's 2 MiB arrays back and faults them in anew
    (~1,150 faults a step measured, glibc 2.36); with it, none."""
    env = {k: v for k, v in os.environ.items() if k not in THRESHOLD_VARS}
    faults = {}
    for tuned in ("1", "0"):
        res = subprocess.run([sys.executable, "-c", FAULTS], env=dict(env, MDNUMBA_MALLOC_TUNING=tuned),
                             capture_output=True, text=True, check=True)
        faults[tuned] = float(res.stdout)
    if faults["0"] <= 200:
        pytest.skip(f"this C library reuses freed pages untuned too ({faults['0']} faults a step)")
    assert faults["1"] < 20, faults
