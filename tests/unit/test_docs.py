"""The project's docs/ exist wherever they are cited, and the files the docs name exist.

Every ``docs/<name>.md`` mentioned in a Python, YAML, shell or sbatch file, in README.md or in
docs/*.md must be a file of the repository; every file path that docs/*.md quotes in backticks
(``megatron_fipo/...``, ``tests/...``, ``algo/losses.py`` relative to the package, ...) too.
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", "build", "dist", "runs"}
DOC_REF = re.compile(r"docs/[A-Za-z0-9_./-]+?\.md")
QUOTED_PATH = re.compile(r"`([A-Za-z0-9_][A-Za-z0-9_./-]*\.(?:py|md|yaml|sh|sbatch|txt))`")


def _sources():
    for path in ROOT.rglob("*"):
        if any(part in SKIP_DIRS for part in path.relative_to(ROOT).parts) or not path.is_file():
            continue
        if path.suffix in {".py", ".yaml", ".yml", ".sh", ".sbatch"} or path.name == "README.md" \
                or (path.parent == ROOT / "docs" and path.suffix == ".md"):
            yield path


def test_docs_exist():
    assert {p.name for p in (ROOT / "docs").glob("*.md")} >= {"algorithm.md", "architecture.md", "dependencies.md"}


def test_every_cited_doc_exists():
    missing = []
    for path in _sources():
        for ref in set(DOC_REF.findall(path.read_text(encoding="utf-8", errors="replace"))):
            if not (ROOT / ref).is_file():
                missing.append(f"{path.relative_to(ROOT)} cites {ref}")
    assert not missing, "cited docs that do not exist:\n" + "\n".join(sorted(missing))


@pytest.mark.parametrize("doc", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_files_named_in_docs_exist(doc):
    missing = [name for name in set(QUOTED_PATH.findall(doc.read_text(encoding="utf-8")))
               if not ((ROOT / name).is_file() or (ROOT / "megatron_fipo" / name).is_file())]
    assert not missing, f"{doc.name} names files that do not exist: {sorted(missing)}"


def test_the_checks_can_fail(tmp_path):
    nope = "docs/" + "nope.md"  # not spelled out: this file is scanned too
    assert DOC_REF.findall(f"see ``{nope}`` and docs/algorithm.md.") == [nope, "docs/algorithm.md"]
    assert QUOTED_PATH.findall("`algo/losses.py` and `x.yaml` but not `a b.py`") == ["algo/losses.py", "x.yaml"]
