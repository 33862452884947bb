"""Every ``from megatron_fipo... import name`` in the repository names something that exists.

A lazy import inside a function (the launcher's, a benchmark's, a tool's) fails only when that
function runs: a name removed from a module once broke the Slurm job's start and only the slow
launcher tests noticed. This reads every Python file of the repository with ``ast`` and checks
each imported name against the target module's top-level definitions (or a submodule of a
package), and each ``module.name`` use of an imported project module likewise, without importing
anything.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = "megatron_fipo"
SKIP_DIRS = {".venv", "build", "dist", ".git", "__pycache__"}


def _sources():
    return sorted(p for p in REPO.rglob("*.py")
                  if not SKIP_DIRS & set(p.relative_to(REPO).parts) and not p.name.startswith("."))


def _module_path(module: str) -> pathlib.Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _top_level_names(path: pathlib.Path) -> set[str]:
    """Names a module defines at its top level (including inside top-level if/try blocks)."""
    names: set[str] = set()
    body = list(ast.parse(path.read_text(), filename=str(path)).body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            body.extend(node.body)
            body.extend(getattr(node, "orelse", []))
            body.extend(getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                body.extend(handler.body)
    return names


def _ours(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def _unresolved(path: pathlib.Path) -> list[str]:
    """Imported names that do not exist, and ``alias.attr`` uses of an imported project module
    (``from megatron_fipo.mcore import groups as G`` ... ``G.init_distributed``) naming nothing in it."""
    problems = []
    tree = ast.parse(path.read_text(), filename=str(path))
    modules = {}  # local name -> project module it is bound to (anywhere in the file)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update({a.asname: a.name for a in node.names if a.asname and _ours(a.name)})
        if not isinstance(node, ast.ImportFrom) or node.level or not node.module or not _ours(node.module):
            continue
        target = _module_path(node.module)
        if target is None:
            problems.append(f"line {node.lineno}: no module {node.module}")
            continue
        defined = _top_level_names(target)
        for alias in node.names:
            if _module_path(f"{node.module}.{alias.name}"):
                modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif alias.name != "*" and alias.name not in defined:
                problems.append(f"line {node.lineno}: {node.module} has no {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            module = modules[node.value.id]
            if node.attr not in _top_level_names(_module_path(module)) and not _module_path(f"{module}.{node.attr}"):
                problems.append(f"line {node.lineno}: {module} has no {node.attr}")
    return problems


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_project_imports_resolve(path):
    assert not _unresolved(path), f"{path.relative_to(REPO)}: {_unresolved(path)}"


def test_checker_catches_a_missing_name(tmp_path):
    source = tmp_path / "user.py"
    source.write_text("def f():\n    from megatron_fipo.plan import format_plan, no_such_name\n"
                      "    from megatron_fipo.config import hf_model\n"
                      "    from megatron_fipo.no_such_module import x\n"
                      "    return hf_model.read_hf_config, hf_model.no_such_function\n")
    assert _unresolved(source) == ["line 2: megatron_fipo.plan has no no_such_name",
                                   "line 4: no module megatron_fipo.no_such_module",
                                   "line 5: megatron_fipo.config.hf_model has no no_such_function"]
