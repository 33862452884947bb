"""config: YAML + dotted overrides, unknown keys, cross-field validation, round trip."""
import pytest

from megatron_fipo.config import Config, from_dict, load_config, save_config, to_dict, validate

HF = dict(num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=8)
OK = ["model.hf_path=m", "data.train_files=[a.jsonl]", "rollout.max_prompt_length=64",
      "rollout.max_response_length=128", "algo.overlong_buffer=32", "train.prompts_per_step=8",
      "train.mini_batch_prompts=4", "rollout.n=4"]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("parallel:\n  tp: 2\nalgo:\n  use_influence: true\n  dual_clip_c: 10\n")
    cfg = load_config(str(path), ["parallel.pp=2", "algo.use_influence=false", "algo.dual_clip_c=null",
                                  "rollout.sglang.mem_fraction_static=0.7", "data.train_files=x.parquet"])
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert cfg.algo.use_influence is False and cfg.algo.dual_clip_c is None
    assert cfg.rollout.sglang == {"mem_fraction_static": 0.7}
    assert cfg.data.train_files == ("x.parquet",)
    assert isinstance(cfg.algo.decay_rate, float)


def test_round_trip(tmp_path):
    cfg = load_config(None, OK + ["parallel.vpp=2", "parallel.pp=2"])
    save_config(cfg, str(tmp_path / "r.yaml"))
    assert load_config(str(tmp_path / "r.yaml")) == cfg
    assert from_dict(to_dict(Config())) == Config()


@pytest.mark.parametrize("override, match", [
    ("paralel.tp=2", "did you mean 'parallel'"),
    ("parallel.tpp=2", "did you mean 'parallel.tp'"),
    ("parallel.tp=two", "parallel.tp must be an integer"),
    ("algo.use_influence=1", "must be true or false"),
    ("rollout.temperature=hot", "must be a number"),
    ("parallel", "section.key=value"),
    ("parallel.tp.x=1", "parallel.tp must be an integer"),
    ("model.hf_path=null", "must not be null"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_missing_file():
    with pytest.raises(ValueError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


def test_valid_config_passes():
    assert validate(load_config(None, OK), world_size=4, hf_config=HF) == []
    # context parallel layouts are accepted: (tp, cp, dp) = (2, 2, 1) and (1, 4, 1)
    assert validate(load_config(None, OK + ["parallel.tp=2", "parallel.cp=2"]), world_size=4, hf_config=HF) == []
    assert validate(load_config(None, OK + ["parallel.cp=4"]), world_size=4, hf_config=HF) == []


@pytest.mark.parametrize("overrides, world, match", [
    (["parallel.tp=3"], 4, "not a multiple of tp\\*pp\\*cp"),
    (["parallel.tp=16"], 16, "does not divide the model's 8 attention heads"),
    (["parallel.pp=3"], 3, "do not split into pp\\*vpp"),
    (["parallel.vpp=2"], 4, "vpp needs parallel.pp >= 2"),
    (["parallel.cp=3", "rollout.max_prompt_length=3", "rollout.max_response_length=2",
      "optim.max_tokens_per_micro_batch=5"], 3, "padded to a multiple of 6 for context parallelism = 6"),
    (["train.mini_batch_prompts=3"], 4, "multiple of train.mini_batch_prompts"),
    (["rollout.n=3", "train.mini_batch_prompts=1", "train.prompts_per_step=1"], 4, "does not split over 4"),
    (["rollout.engine=vllm"], 1, "rollout.engine"),
    (["rollout.mode=disaggregated"], 1, "engine=cpu runs colocated only"),
    (["algo.overlong_buffer=1000"], 1, "overlong_buffer"),
    (["optim.max_tokens_per_micro_batch=100"], 1, "must hold one full"),
    (["model.hf_path="], 1, "model.hf_path is required"),
])
def test_cross_field_errors(overrides, world, match):
    with pytest.raises(ValueError, match=match):
        validate(load_config(None, OK + overrides), world_size=world, hf_config=HF)


def test_all_errors_listed_and_warnings():
    with pytest.raises(ValueError) as err:
        validate(load_config(None, OK + ["parallel.tp=3", "rollout.top_p=2"]), world_size=4)
    assert "tp*pp*cp" in str(err.value) and "top_p" in str(err.value)
    warns = validate(load_config(None, OK + ["parallel.sequence_parallel=true", "rollout.n=1"]), world_size=1)
    assert any("sequence_parallel" in w for w in warns) and any("rollout.n=1" in w for w in warns)


def test_loss_kwargs_match_the_loss_signature():
    import inspect

    from megatron_fipo.algo.losses import fipo_policy_loss

    params = inspect.signature(fipo_policy_loss).parameters
    kwargs = Config().algo.loss_kwargs()
    assert set(kwargs) <= set(params)
    assert all(params[k].default == v for k, v in kwargs.items())  # the config defaults are the recipe's


def test_optim_section_maps_onto_actor_settings():
    import dataclasses

    from megatron_fipo.config import OptimConfig
    from megatron_fipo.mcore.actor import ActorSettings

    actor_fields = {f.name for f in dataclasses.fields(ActorSettings)}
    assert {f.name for f in dataclasses.fields(OptimConfig)} <= actor_fields  # trainer passes optim.* through
