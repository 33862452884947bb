"""The node-local sync plan (``parallel.nodes``) and the figure ``megatron-fipo plan`` reports for it.

The plan is checked against its definition on random layouts: every node holding a stage has a
producer tensor-parallel group of that stage on the node, every other node receives the stage
exactly once from a producer on another node, and senders take turns. ``plan.node_sync_bytes``
(the formula printed by ``plan``) must equal the bytes of the runtime plan on Megatron's rank
order, for the 32B recipe's layout too.
"""
import random

import pytest

from megatron_fipo.config.schema import load_config
from megatron_fipo.parallel.nodes import RankPlace, cross_node_bytes, node_sync_plan
from megatron_fipo.plan import node_sync_bytes, rank_layout, stage_parameters
from tests.helpers import fresh_seeds

QWEN25_32B = dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                  intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False)


def _places(world, tp, pp, cp, per_node):
    return [RankPlace(r["rank"], r["node"], r["gpu"], r["pp"], r["tp"], r["dp"], r["cp"])
            for r in rank_layout(world, tp, pp, cp, per_node)]


def _random_layout(rng):
    while True:
        tp, pp, cp, dp = (rng.choice([1, 2, 4]) for _ in range(4))
        per_node = tp * rng.choice([1, 2, 4])
        world = tp * pp * cp * dp
        if world % per_node == 0 and world <= 128:
            return world, tp, pp, cp, per_node


@pytest.mark.parametrize("seed", fresh_seeds(6))
def test_plan_matches_its_definition(seed):
    rng = random.Random(seed)
    world, tp, pp, cp, per_node = _random_layout(rng)
    places = _places(world, tp, pp, cp, per_node)
    node_of = {p.rank: p.node for p in places}
    plans = node_sync_plan(places, tp)
    assert len(plans) == pp
    for stage, plan in enumerate(plans):
        holding = {p.node for p in places if p.pp == stage}
        assert set(plan.producers) == holding
        for node, ranks in plan.producers.items():
            members = [p for p in places if p.rank in ranks]
            assert len(members) == tp and {m.node for m in members} == {node} and {m.pp for m in members} == {stage}
        lacking = sorted({p.node for p in places} - holding)
        assert sorted(node_of[dst] for _, dst in plan.transfers) == lacking  # each lacking node once
        for src, dst in plan.transfers:
            assert src in {ranks[0] for ranks in plan.producers.values()} and node_of[src] != node_of[dst]
            assert plan.holders[node_of[dst]] == dst
        senders = [node_of[src] for src, _ in plan.transfers]
        if senders:  # turns: no producer node sends more than its share
            assert max(senders.count(n) for n in set(senders)) <= -(-len(lacking) // len(holding))


@pytest.mark.parametrize("seed", fresh_seeds(6))
def test_plan_command_figure_equals_the_runtime_plan(seed):
    rng = random.Random(seed)
    world, tp, pp, cp, per_node = _random_layout(rng)
    hf = dict(QWEN25_32B, num_hidden_layers=8 * pp)
    config = load_config(None, [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.cp={cp}",
                                "model.params_dtype=bfloat16"])
    places = _places(world, tp, pp, cp, per_node)
    stage_bytes = [n * 2 for n in stage_parameters(hf, pp)]
    runtime = cross_node_bytes(places, node_sync_plan(places, tp), stage_bytes)
    assert node_sync_bytes(config, hf, world, per_node) == [runtime[n] for n in sorted(runtime)]


def test_32b_recipe_moves_half_the_model_into_each_node():
    config = load_config("examples/qwen2.5-32b-fipo.yaml")
    per_node = node_sync_bytes(config, QWEN25_32B, 128, 8)
    stages = [n * 2 for n in stage_parameters(QWEN25_32B, 2)]
    assert len(per_node) == 16
    assert per_node[:8] == [stages[1]] * 8 and per_node[8:] == [stages[0]] * 8  # pp=2: nodes 0-7 stage 0
    assert sum(stages) == pytest.approx(32.764e9 * 2, rel=1e-3)


def test_tensor_parallel_group_across_nodes_is_refused():
    places = _places(8, 4, 1, 1, 2)  # tp=4 on 2-GPU nodes
    with pytest.raises(ValueError, match="spans nodes"):
        node_sync_plan(places, 4)
