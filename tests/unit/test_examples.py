"""The cluster recipes in examples/: the paper's settings, their plans at the intended world sizes, and
the plan figures quoted in their comments (which must not go stale)."""
import json
import os
import re

import pytest

from megatron_fipo.cli import main
from megatron_fipo.config.schema import load_config, to_dict, validate
from megatron_fipo.plan import format_plan, plan

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
QWEN25_7B = dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, vocab_size=152064,
                 num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
QWEN25_32B = dict(hidden_size=5120, num_hidden_layers=64, intermediate_size=27648, vocab_size=152064,
                  num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False)
# recipe -> (model shapes, intended training world sizes)
RECIPES = {"qwen2.5-32b-fipo.yaml": (QWEN25_32B, (128,)), "qwen2.5-32b-dapo.yaml": (QWEN25_32B, (128,)),
           "qwen2.5-7b-fipo.yaml": (QWEN25_7B, (8, 16))}


def _path(name):
    return os.path.join(EXAMPLES, name)


def _hf_dir(tmp_path, shapes):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", **shapes}))
    return str(tmp_path)


def test_32b_recipe_is_the_papers():
    c = load_config(_path("qwen2.5-32b-fipo.yaml"))
    assert (c.train.prompts_per_step, c.rollout.n, c.train.mini_batch_prompts) == (512, 16, 64)
    assert (c.rollout.max_prompt_length, c.rollout.max_response_length, c.algo.overlong_buffer) == (2048, 20480, 4096)
    assert (c.optim.lr, c.algo.clip_low, c.algo.clip_high, c.algo.dual_clip_c, c.algo.decay_rate) == \
        (1e-6, 0.2, 0.28, 10.0, 32.0)
    assert c.algo.use_influence and c.algo.future_kl_clip_high_only and c.algo.future_kl_clip_ratio == 0.2  # [1.0, 1.2]
    assert c.algo.drop_filter
    assert (c.optim.warmup_steps, c.optim.weight_decay, c.optim.clip_grad) == (10, 0.1, 1.0)
    assert (c.rollout.temperature, c.rollout.top_p, c.eval.n, c.eval.top_p) == (1.0, 1.0, 32, 0.7)
    assert c.model.params_dtype == "bfloat16" and c.rollout.engine == "sglang" and c.parallel.cp == 2


def test_dapo_baseline_differs_only_in_the_influence_weight_and_the_drop_filter():
    fipo, dapo = (to_dict(load_config(_path(f"qwen2.5-32b-{a}.yaml"))) for a in ("fipo", "dapo"))
    assert fipo["algo"].pop("use_influence") is True and dapo["algo"].pop("use_influence") is False
    assert fipo["algo"].pop("drop_filter") is True and dapo["algo"].pop("drop_filter") is False
    assert fipo["train"].pop("run_dir") != dapo["train"].pop("run_dir")
    assert fipo == dapo


def _readme_overrides(pattern: str) -> list[str]:
    text = " ".join(open(os.path.join(EXAMPLES, "..", "README.md"), encoding="utf-8").read().split())
    found = re.search(pattern, text)
    assert found, f"README.md no longer documents the overrides matching {pattern!r}"
    return found.group(1).split()


def test_readme_grpo_settings_turn_the_drop_filter_off():
    """README: "`<dapo>` is DAPO; add `<more>` for GRPO". GRPO keeps every response token (no sequence dropped)."""
    import torch

    from megatron_fipo.algo.losses import fipo_policy_loss

    grpo = _readme_overrides(r"`([^`]*)` is DAPO") + _readme_overrides(r"add `([^`]*)` for GRPO")
    kw = load_config(None, grpo).algo.loss_kwargs()
    assert kw["use_influence"] is False and kw["clip_high"] == kw["clip_low"]
    assert kw["drop_filter"] is False or kw["dual_clip_c"] is None  # off, or nothing dual-clipped to count
    logp = torch.log(torch.tensor([[12.0, 12.0, 1.0]], dtype=torch.float64))  # the review's case: A = -1, r > c twice
    out = fipo_policy_loss(logp, torch.zeros(1, 3, dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64),
                           torch.ones(1, 3), **kw)
    assert out.dropped_sequences.tolist() == [False] and out.sums["kept_tokens"].item() == 3


def test_7b_recipe_uses_the_symmetric_influence_clip():
    c = load_config(_path("qwen2.5-7b-fipo.yaml"))
    assert c.algo.use_influence and not c.algo.future_kl_clip_high_only and c.algo.future_kl_clip_ratio == 0.2
    assert c.algo.drop_filter  # FIPO keeps the release's sequence-drop filter
    big = load_config(_path("qwen2.5-32b-fipo.yaml"))
    assert (c.rollout.max_response_length, c.algo.decay_rate, c.optim.lr) == \
        (big.rollout.max_response_length, big.algo.decay_rate, big.optim.lr)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_plan_at_their_world_sizes(name, tmp_path, capsys):
    shapes, worlds = RECIPES[name]
    hf = _hf_dir(tmp_path, shapes)
    config = load_config(_path(name))
    validate(config, world_size=worlds[0], hf_config=shapes)  # train's own checks pass (paths are placeholders)
    for world in worlds:
        assert main(["plan", "--config", _path(name), "--world-size", str(world), "--hf-config", hf, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["world"] == world and report["warnings"] == []
        assert report["memory_gib"]["total"] < 80 and report["colocated_rollout"]["total_gib"] < 80
        assert report["colocated_rollout"]["rollout_gpus"] == world  # every GPU of every node generates


@pytest.mark.parametrize("name", ["qwen2.5-32b-fipo.yaml", "qwen2.5-7b-fipo.yaml"])
def test_plan_output_quoted_in_the_recipe_is_current(name):
    shapes, worlds = RECIPES[name]
    text = open(_path(name), encoding="utf-8").read()
    quoted = {line[len("#   "):] for line in text.splitlines() if line.startswith("#   ")}
    printed = format_plan(plan(load_config(_path(name)), worlds[0], shapes)).splitlines()
    for line in printed:
        if not line.startswith(("first node", " ")):
            assert line in quoted, f"{name}: the comment does not quote the current plan line {line!r}"


@pytest.mark.parametrize("override, message", [
    ("parallel.tp=16", "does not divide the model's 40 attention heads"),
    ("parallel.pp=3", "not a multiple of tp*pp*cp"),
    ("parallel.cp=32", "not a multiple of tp*pp*cp"),
    ("optim.max_tokens_per_micro_batch=20000", "must hold one full sequence"),
    ("rollout.servers_per_node=3", "3 server(s) per node x rollout.sglang.tp_size 4 = 12 GPUs, but a node has 8"),
    ("rollout.replicas=3", "colocated SGLang servers run on every node; set rollout.servers_per_node"),
])
def test_impossible_layouts_fail_with_a_clear_message(override, message, tmp_path, capsys):
    hf = _hf_dir(tmp_path, QWEN25_32B)
    assert main(["plan", "--config", _path("qwen2.5-32b-fipo.yaml"), "--world-size", "128", "--hf-config", hf,
                 override]) == 2
    assert message in capsys.readouterr().err


def test_plan_warns_when_colocated_sglang_does_not_fit():
    config = load_config(_path("qwen2.5-32b-fipo.yaml"), ["rollout.sglang.mem_fraction_static=0.9"])
    warnings = plan(config, 128, QWEN25_32B)["warnings"]
    assert any("exceeds the GPU; use mem_fraction_static <= 0.82" in w for w in warnings), warnings
    unset = load_config(_path("qwen2.5-32b-fipo.yaml"), ["rollout.sglang={tp_size: 4}"])
    assert any("set rollout.sglang.mem_fraction_static" in w for w in plan(unset, 128, QWEN25_32B)["warnings"])
