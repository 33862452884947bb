"""Every collective of the trainer and the checkpoint code names its process group.

A collective on the implicit default group works until a second set of groups (e.g. per-node
weight syncs) runs next to it; then ranks pair up the wrong calls and hang. This parses the
modules with ``ast`` and fails on a ``dist.<collective>(...)`` call without ``group=``.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "megatron_fipo"
MODULES = ["train/loop.py", "train/run.py", "train/weight_sync.py", "train/services.py", "mcore/checkpoint.py",
           "mcore/checkpoint_state.py", "convert.py",
           "mcore/checkpoint_integrity.py",
           "mcore/micro_batches.py", "mcore/actor.py", "parallel/nodes.py", "bridge/hf_export.py"]
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "scatter_object_list", "gather_object", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "barrier", "all_to_all", "scatter", "gather", "monitored_barrier"}


def _ungrouped(source: str) -> list:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed") and not any(k.arg == "group" for k in node.keywords):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("module", MODULES)
def test_every_collective_names_its_group(module):
    path = ROOT / module
    if not path.exists():  # a module split or renamed: update MODULES
        pytest.fail(f"{module} is gone: list its replacement here")
    assert _ungrouped(path.read_text()) == [], f"{module}: collectives on the implicit default group"


def test_checker_catches_a_default_group_call():
    assert _ungrouped("import torch.distributed as dist\ndist.barrier()\n")
    assert _ungrouped("import torch\ntorch.distributed.broadcast_object_list(x, src=0)\n")
    assert not _ungrouped("import torch.distributed as dist\ndist.barrier(group=g)\n")
