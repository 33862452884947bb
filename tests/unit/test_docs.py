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


# ---------------------------------------------------------------- docs/verl.md names only what exists
VERL_PAGE = ROOT / "docs" / "verl.md"
BACKTICKED = re.compile(r"`([^`]+)`")
OUR_KEY = re.compile(r"(?:algo|rollout)\.[a-z_]+")  # verl's keys start with algorithm. / actor_rollout_ref.
OUR_METRIC = re.compile(r"(?:train|rollout|time|eval|perf)/[A-Za-z0-9_@]+")


def _column_names(text: str, column: str = "ours") -> list[str]:
    """The backticked names in the ``column`` column ("ours", "verl") of every table of ``text``
    whose header has an "ours" column."""
    names, col = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            col = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if col is None:
            col = cells.index(column) if "ours" in cells and column in cells else -1
        elif col >= 0 and not set(line) <= set("|-: "):
            names += BACKTICKED.findall(cells[col])
    return names


def _config_key_exists(name: str) -> bool:
    import dataclasses

    from megatron_fipo.config import schema
    from megatron_fipo.config.checks import ROLLOUT_CORRECTIONS

    key, _, value = name.partition("=")
    section, _, field = key.strip().partition(".")
    sections = {f.name: f.default_factory for f in dataclasses.fields(schema.Config)}
    if section not in sections or field not in {f.name for f in dataclasses.fields(sections[section])}:
        return False
    return key != "algo.rollout_correction" or not value or value.strip() in ROLLOUT_CORRECTIONS


def _package_source() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "megatron_fipo").rglob("*.py"))


def _metric_exists(name: str, src: str) -> bool:
    """``name`` is logged: literally, as ``f"{prefix}<rest>"``, through an f-string template, as a ``train/``
    actor / loss key (``train.loop`` adds the prefix) or as ``eval/<avg|cons|pass>@N`` (``algo/metrics.py``)."""
    prefix, _, rest = name.partition("/")
    if f'"{name}"' in src or re.search(r"\}" + re.escape(rest) + '"', src):
        return True
    if prefix == "train" and re.search(rf'"{re.escape(rest)}"|\b{re.escape(rest)}=', src):
        return True
    if prefix == "eval" and re.fullmatch(r"[a-z]+@N", rest):
        return f'"{rest[:-2]}"' in src and "@{k}" in src
    for template in re.findall(r'f"([a-z_]+/[^"]*\{[^"]*)"', src):
        if re.fullmatch(r"[a-z_]+/\{[^}]*\}", template):  # f"eval/{k}": the whole name is a placeholder
            continue
        pattern = "[A-Za-z0-9_]+".join(re.escape(part) for part in re.split(r"\{[^}]*\}", template))
        if re.fullmatch(pattern, name):
            return True
    return False


def test_verl_page_names_only_real_keys_and_metrics():
    text = VERL_PAGE.read_text(encoding="utf-8")
    src = _package_source()
    ours, everywhere = _column_names(text), BACKTICKED.findall(text)
    keys = {m.group(0) if "=" not in t else t for t in everywhere if (m := OUR_KEY.match(t))}
    keys |= {t for t in ours if "/" not in t}
    # every metric-shaped name outside the verl column (verl also logs perf/... and train/num_gen_batches)
    metrics = {t for t in ours if "/" in t} | ({t for t in everywhere if OUR_METRIC.fullmatch(t)}
                                              - set(_column_names(text, "verl")))
    assert len(keys) >= 8 and len(metrics) >= 25, f"the page's tables lost their names: {keys}, {metrics}"
    unknown = sorted(k for k in keys if not _config_key_exists(k))
    assert not unknown, f"docs/verl.md names config keys that do not exist: {unknown}"
    missing = sorted(m for m in metrics if not _metric_exists(m, src))
    assert not missing, f"docs/verl.md names metrics the package does not log: {missing}"


def test_verl_page_checks_can_fail():
    src = _package_source()
    assert _config_key_exists("algo.correction_bounds") and _config_key_exists("algo.rollout_correction=geo_mis")
    assert not _config_key_exists("algo.correction_bound") and not _config_key_exists("algo.rollout_correction=seq_k1")
    assert not _config_key_exists("algorithm.rollout_is")
    for real in ("train/pg_clipfrac", "train/lr", "rollout/logprob_diff_mean", "rollout/trained_length_mean",
                 "eval/pass@N", "time/step_s"):
        assert _metric_exists(real, src), real
    for fake in ("train/pg_clipfrac_nope", "rollout/logprob_nope", "eval/best@N", "eval/anything", "perf/throughput"):
        assert not _metric_exists(fake, src), fake
    table = "| verl | ours | notes |\n|---|---|---|\n| `a/b` | `train/x`, `algo.y=1` | `z` |\n"
    assert _column_names(table) == ["train/x", "algo.y=1"] and _column_names(table, "verl") == ["a/b"]
