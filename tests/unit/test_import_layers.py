"""The import direction of the architecture: config <- algo <- parallel <- {mcore, bridge} <- train <- commands.

Parses every module's imports (top-level and lazy ones inside functions) with ``ast`` and checks
them against the allowed layers (and, inside ``train/`` and ``config/``, the order of their
modules), that megatron / sglang / transformer-engine are imported only where the architecture
says, and that no module is over the 400-line budget.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "megatron_fipo"
MAX_LINES = 400  # the house's soft module budget (docs/architecture.md)

# layer (a package, or a module at the package root) -> project layers it may import (besides itself)
ALLOWED = {
    "config": set(),  # the rules every layer obeys: stdlib + PyYAML only, no project import
    "algo": set(),
    "parallel": {"config", "algo"},
    "mcore": {"config", "algo", "parallel", "data", "quiet_warnings"},  # packing and micro-batch planning live in data/
    "bridge": {"config", "algo", "parallel"},
    "rollout": {"algo", "bridge", "quiet_warnings"},
    "data": {"algo"},
    "train": {"config", "algo", "parallel", "mcore", "bridge", "rollout", "data"},  # one training run
    # the commands: the only importers of train/
    "plan": {"config"},
    "convert": {"config", "algo", "parallel", "mcore", "bridge", "data"},
    "evaluation": {"config", "algo", "rollout", "data", "train", "convert"},
    "cli": {"config", "algo", "parallel", "mcore", "bridge", "rollout", "data", "train", "convert", "plan",
            "evaluation"},
    "__main__": {"cli"},
    "__init__": set(),
    "quiet_warnings": set(),  # precise filters for third-party notices that say nothing to a user; stdlib only
}
# inside a layer package: module -> sibling modules it may import (a package absent here is not ordered)
INNER = {
    "config": {
        "conventions": set(),  # CP alignment, dtype names, optimizer settings
        "hf_model": set(),  # config.json reading
        "hf_presets": {"hf_model"},  # the published Qwen2 / Qwen2.5 shapes, by name; a config.json or a name
        "checks": {"conventions"},  # validation; reads the config by attribute
        "schema": {"checks", "conventions"},
    },
    "train": {
        "tracking": set(),
        "rundir": {"tracking"},  # what a run directory records and refuses (reads config only)
        "experience": set(),  # the rollout phase of one step (rank 0); data: its typed hand-off
        "ahead": {"experience"},  # rank 0's producer thread (max_staleness >= 1)
        "pool": {"experience"},  # rank 0's groups in flight (rollout.partial)
        "services": {"experience", "tracking"},  # rank 0's rollout side
        "weight_sync": set(),  # actor -> engine / HF directory
        "run": {"experience", "services", "weight_sync", "ahead", "pool", "tracking"},
        "loop": {"experience", "services", "weight_sync", "ahead", "pool", "run", "rundir"},
    },
}
# third-party roots -> the only places that may import them
RESTRICTED = {
    "megatron": ("mcore",),
    "transformer_engine": ("mcore",),
    "sglang": ("rollout/sglang_weights.py",),
    "torch.distributed": ("parallel", "mcore", "bridge", "rollout", "train/loop.py", "train/run.py",
                          "train/weight_sync.py", "cli", "convert"),
    "yaml": ("config",),  # the YAML dialect (1.2 floats) is read in one place
}


def _modules():
    return sorted(p for p in ROOT.rglob("*.py"))


def _layer(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the package
                base = list(path.relative_to(ROOT.parent).with_suffix("").parts[: -node.level])
                yield ".".join(base + ([node.module] if node.module else []))
            elif node.module:
                yield node.module
                for alias in node.names:  # "from torch import distributed"
                    yield f"{node.module}.{alias.name}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_respects_layers(path):
    layer = _layer(path)
    assert layer in ALLOWED, f"{path}: new top-level module or package {layer!r}: add it to ALLOWED"
    rel = str(path.relative_to(ROOT))
    inner = INNER.get(layer)
    me = path.relative_to(ROOT).parts[1].removesuffix(".py") if inner is not None else None
    if inner is not None and me != "__init__":
        assert me in inner, f"{rel}: new module in {layer}/: add it to INNER[{layer!r}]"
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "megatron_fipo" and len(parts) > 1:
            target = parts[1]
            assert target == layer or target in ALLOWED[layer], f"{rel} imports {name}: {layer} may not import {target}"
            if target == layer and inner is not None and len(parts) > 2 and parts[2] != me:
                assert parts[2] in inner.get(me, set()), f"{rel} imports {name}: {layer}.{me} may not import {parts[2]}"
        for root, places in RESTRICTED.items():
            if name == root or name.startswith(root + "."):
                ok = any(rel == p or rel.startswith(p + "/") or layer == p for p in places)
                assert ok, f"{rel} imports {name}, which only {places} may import"


def test_modules_within_line_budget():
    over = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not over, f"modules over the {MAX_LINES}-line budget (split them along their seams): {over}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_has_docstring(path):
    tree = ast.parse(path.read_text())
    if path.name == "__init__.py" and not tree.body:
        return
    assert ast.get_docstring(tree), f"{path}: every module opens with a docstring (house style)"


@pytest.mark.parametrize("source", ["import torch.distributed", "from megatron_fipo.mcore import x",
                                    "from ..mcore import x", "from megatron.core import parallel_state"])
def test_checker_catches_a_violation(tmp_path, monkeypatch, source):
    """The checker itself can fail: a fake algo module with one forbidden import."""
    fake_root = tmp_path / "megatron_fipo"
    (fake_root / "algo").mkdir(parents=True)
    bad = fake_root / "algo" / "bad.py"
    bad.write_text(f'"""doc"""\n{source}\n')
    monkeypatch.setitem(globals(), "ROOT", fake_root)
    with pytest.raises(AssertionError):
        test_module_respects_layers(bad)


@pytest.mark.parametrize("where, source", [
    ("config/schema.py", "from megatron_fipo.algo import losses"),  # config imports nothing of the project
    ("mcore/actor.py", "from megatron_fipo.train.run import Run"),  # train/ only from the commands
    ("train/experience.py", "from megatron_fipo.train.loop import Trainer"),  # upward inside train/
    ("config/checks.py", "from megatron_fipo.config.schema import Config"),  # upward inside config/
    ("train/services.py", "import torch.distributed"),  # rank 0's services hold no collectives
    ("train/newthing.py", "import os"),  # a train/ module the order does not know
])
def test_checker_catches_the_new_layers(tmp_path, monkeypatch, where, source):
    """The config/ and train/ rules can fail too."""
    bad = tmp_path / "megatron_fipo" / where
    bad.parent.mkdir(parents=True)
    bad.write_text(f'"""doc"""\n{source}\n')
    monkeypatch.setitem(globals(), "ROOT", tmp_path / "megatron_fipo")
    with pytest.raises(AssertionError):
        test_module_respects_layers(bad)
