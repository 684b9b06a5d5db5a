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


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_resolve():
    """Every ``](#anchor)`` names a heading and every relative ``](path)`` an existing file."""
    root = Path(__file__).resolve().parents[1]
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.*)$", README, re.M)}
    broken = [a for a in re.findall(r"\]\(#([^)]+)\)", README) if a not in anchors]
    broken += [f for f in re.findall(r"\]\(([^)#:]+)\)", README) if not (root / f).exists()]
    assert not broken
