"""The import direction of the architecture: algo <- parallel <- {mcore, bridge} <- trainer <- cli.

Parses every module's imports (top-level and lazy ones inside functions) with ``ast`` and checks
them against the allowed layers, and that megatron / sglang / transformer-engine are imported
only where the architecture says.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "megatron_fipo"

# package -> project packages it may import (besides itself)
ALLOWED = {
    "algo": set(),
    "parallel": {"conventions", "algo"},
    "mcore": {"conventions", "algo", "parallel", "data", "hf_config"},  # packing and micro-batch planning live in data/
    "bridge": {"conventions", "algo", "parallel", "hf_config"},
    "rollout": {"algo", "bridge"},
    "data": {"algo"},
    "experience": {"algo", "rollout", "data"},  # the trainer's rollout phase (rank 0); data: its typed hand-off
    "tracking": set(),
    "services": {"algo", "rollout", "data", "config", "experience", "tracking"},  # rank 0's rollout side
    "weight_sync": {"conventions", "bridge", "rollout"},  # actor -> engine / HF directory
    "rollout_ahead": {"experience", "rollout"},  # rank 0's producer thread (max_staleness >= 1)
    "trainer_setup": {"conventions", "algo", "parallel", "mcore", "bridge", "rollout", "data", "config", "experience",
                      "tracking", "hf_config", "services", "weight_sync", "rollout_ahead"},
    "trainer": {"conventions", "algo", "parallel", "mcore", "bridge", "rollout", "data", "config", "experience",
                "trainer_setup", "hf_config", "services", "weight_sync", "rollout_ahead"},
    "config": {"config_checks", "conventions"},
    "config_checks": {"conventions"},  # config's validation: stdlib only, reads the config by attribute
    "conventions": set(),  # rules every layer applies the same way (CP alignment, dtype names): stdlib only
    "hf_config": set(),  # config.json reading: stdlib only, importable by every layer
    "plan": {"conventions", "config", "hf_config"},
    "convert": {"conventions", "algo", "parallel", "mcore", "bridge", "data", "hf_config"},
    "evaluation": {"conventions", "algo", "rollout", "data", "config", "experience", "services", "convert",
                   "hf_config"},
    "cli": {"conventions", "algo", "parallel", "mcore", "bridge", "rollout", "data", "trainer", "config", "convert",
            "plan", "evaluation"},
    "__main__": {"cli"},
    "__init__": set(),
}
# third-party roots -> the only places that may import them
RESTRICTED = {
    "megatron": ("mcore",),
    "transformer_engine": ("mcore",),
    "sglang": ("rollout/sglang_engine.py",),
    "torch.distributed": ("parallel", "mcore", "bridge", "rollout", "trainer", "trainer_setup", "weight_sync", "cli",
                          "convert"),
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
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "megatron_fipo" and len(parts) > 1:
            target = parts[1]
            assert target == layer or target in ALLOWED[layer], f"{rel} imports {name}: {layer} may not import {target}"
        for root, places in RESTRICTED.items():
            if name == root or name.startswith(root + "."):
                ok = any(rel == p or rel.startswith(p + "/") or layer == p for p in places)
                assert ok, f"{rel} imports {name}, which only {places} may import"


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
