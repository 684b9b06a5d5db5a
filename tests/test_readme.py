"""The README's NumPy examples (every ``python`` block before the GPU section, and those of the
command line's section) run as written, and the links of the README and docs/ resolve."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
CPU_BLOCKS = re.findall(r"```python\n(.*?)```", README.split("## GPU (CUDA)")[0]
                        + re.split(r"^## ", README.split("## Command line")[1], flags=re.M)[0], re.S)


def test_readme_has_cpu_examples():
    assert len(CPU_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(CPU_BLOCKS)))
def test_readme_example_runs(index, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where an example writes (a run folder)
    exec(compile(CPU_BLOCKS[index], f"README.md python block {index}", "exec"), {})
    assert capsys.readouterr().out  # every example prints what it shows


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _broken_links(doc: Path) -> list[str]:
    """Links of a Markdown file that name no file, or no heading of their file."""
    text = doc.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            heads = re.findall(r"^#+ (.*)$", file.read_text(), re.M)
            if anchor not in {_anchor(h) for h in heads}:
                broken.append(target)
    return broken


DOCS = ["README.md", "bench/README.md", *sorted(
    str(p.relative_to(Path(__file__).resolve().parents[1]))
    for p in (Path(__file__).resolve().parents[1] / "docs").glob("*.md"))]


def test_docs_exist():
    assert {"docs/gpu.md", "docs/cpu-speed.md", "docs/testing.md"} <= set(DOCS)


@pytest.mark.parametrize("doc", DOCS)
def test_links_resolve(doc):
    """Every ``](#anchor)``, ``](path)`` and ``](path#anchor)`` names an existing file and heading."""
    assert not _broken_links(Path(__file__).resolve().parents[1] / doc)


def test_broken_links_are_found(tmp_path):
    """The check itself: a missing file, a missing heading, in this file and in another."""
    (tmp_path / "other.md").write_text("## Real heading\n")
    doc = tmp_path / "doc.md"
    doc.write_text("# Top\n[a](#top) [b](#nowhere) [c](other.md#real-heading) [d](other.md#gone) "
                   "[e](missing.md) [f](https://example.org/x)\n")
    assert _broken_links(doc) == ["#nowhere", "other.md#gone", "missing.md"]


def test_every_dotted_name_of_the_docs_resolves_after_a_plain_import():
    """``mdnumba.train.Trainer.load``, ``mdnumba.losses.bce_logits``, …: each name the README and
    docs/ give resolves, attribute by attribute, after ``import mdnumba`` alone (in a fresh process:
    this one imported the submodules already); ``mdnumba.train`` and five others raised
    AttributeError there."""
    import subprocess
    import sys
    text = "".join((Path(__file__).resolve().parents[1] / doc).read_text() for doc in DOCS)
    names = sorted(set(re.findall(r"\bmdnumba(?:\.[A-Za-z_]\w*)+", text)))
    assert {"mdnumba.train.Trainer.load", "mdnumba.losses.bce_logits"} <= set(names)
    code = ("import functools, sys, mdnumba\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n"
            "        functools.reduce(getattr, name.split('.')[1:], mdnumba)\n"
            "    except AttributeError as exc:\n"
            "        print(name, exc)\n")
    res = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout == "", res.stdout + res.stderr
