"""The README's NumPy examples (every ``python`` block before the GPU section) run as written."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
CPU_BLOCKS = re.findall(r"```python\n(.*?)```", README.split("## GPU (CUDA)")[0], re.S)


def test_readme_has_cpu_examples():
    assert len(CPU_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(CPU_BLOCKS)))
def test_readme_example_runs(index, capsys):
    exec(compile(CPU_BLOCKS[index], f"README.md python block {index}", "exec"), {})
    assert capsys.readouterr().out  # every example prints what it shows
