"""config: YAML + dotted overrides, unknown keys, cross-field validation, round trip."""
import pytest

from megatron_fipo.config.schema import Config, from_dict, load_config, save_config, to_dict, validate

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


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config("/nonexistent/x.yaml")
    with pytest.raises(ValueError, match="is a directory"):
        load_config(str(tmp_path))


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
    for kwargs in (Config().algo.loss_kwargs(), Config().loss_kwargs()):  # the trainer calls Config.loss_kwargs
        assert set(kwargs) <= set(params)
        assert all(params[k].default == v for k, v in kwargs.items())  # the config defaults are the recipe's


def _sections():
    from megatron_fipo.config.schema import Config

    return Config().model, Config().parallel


def test_optim_section_maps_onto_actor_settings():
    import dataclasses

    from megatron_fipo.config.schema import OptimConfig
    from megatron_fipo.mcore.actor import ActorSettings

    assert issubclass(ActorSettings, OptimConfig)  # one definition of the optim settings and their defaults
    actor_fields = {f.name: f.default for f in dataclasses.fields(ActorSettings)}
    optim_fields = {f.name: f.default for f in dataclasses.fields(OptimConfig)}
    assert {k: actor_fields[k] for k in optim_fields} == optim_fields
    settings = ActorSettings.from_sections(OptimConfig(lr=0.25, max_tokens_per_micro_batch=77), *_sections())
    assert (settings.lr, settings.max_tokens_per_micro_batch) == (0.25, 77)


def test_actor_settings_from_config_sections_ignore_unknown_fields():
    import dataclasses

    from megatron_fipo.config.schema import Config, OptimConfig
    from megatron_fipo.mcore.actor import ActorSettings

    cfg = Config()
    settings = ActorSettings.from_sections(cfg.optim, cfg.model, cfg.parallel)
    assert settings.max_tokens_per_micro_batch == cfg.optim.max_tokens_per_micro_batch
    assert settings.params_dtype == cfg.model.params_dtype
    Extended = dataclasses.make_dataclass("Extended", [("future_knob", int, 3)], bases=(OptimConfig,), frozen=True)
    assert ActorSettings.from_sections(Extended(lr=0.5), cfg.model, cfg.parallel).lr == 0.5  # no TypeError


@pytest.mark.parametrize("override, match", [
    ("parallel.tp=0", "parallel.tp must be >= 1, got 0"),
    ("parallel.pp=0", "parallel.pp must be >= 1, got 0"),
    ("parallel.cp=0", "parallel.cp must be >= 1, got 0"),
    ("parallel.cp=-2", "parallel.cp must be >= 1, got -2"),
    ("parallel.vpp=0", "parallel.vpp must be >= 2 or null, got 0"),
    ("parallel.vpp=-1", "parallel.vpp must be >= 2 or null, got -1"),
])
def test_zero_layout_sizes_are_errors_not_zero_division(override, match):
    for world, hf in ((4, HF), (4, None), (None, HF)):
        with pytest.raises(ValueError, match=match):
            validate(load_config(None, OK + [override]), world_size=world, hf_config=hf)


@pytest.mark.parametrize("world", [0, -8])
def test_world_size_must_be_positive(world):
    with pytest.raises(ValueError, match=f"world size must be >= 1, got {world}"):
        validate(load_config(None, OK), world_size=world, hf_config=HF)


@pytest.mark.parametrize("override, match", [
    ("checkpoint.keep_last=0", "checkpoint.keep_last must be >= 1 or null"),
    ("eval.top_p=0", "eval.top_p must be in \\(0, 1\\]"),
    ("eval.temperature=-1", "eval.temperature must be > 0"),
    ("eval.temperature=0", "eval.temperature must be > 0"),
    ("eval.max_response_length=0", "eval.max_response_length must be >= 1 or null"),
    ("eval.max_problems=0", "eval.max_problems must be >= 1 or null"),
    ("rollout.top_p=0", "rollout.top_p must be in \\(0, 1\\]"),
    ("rollout.temperature=-1", "rollout.temperature must be > 0"),
    ("rollout.replicas=0", "rollout.replicas must be >= 1"),
    ("rollout.max_restarts=-1", "rollout.max_restarts must be >= 0"),
    ("rollout.cpu_max_batch_rows=0", "rollout.cpu_max_batch_rows must be >= 1"),
    ("rollout.stop_token_ids=[2,-1]", "rollout.stop_token_ids must be token ids"),
    ("rollout.launcher=[taskset,-c,1,python]", "rollout.launcher must be a list of strings"),
    ("rollout.stale_policy=skip", "rollout.stale_policy must be 'wait' or 'drop'"),
    ("rollout.oversample=0.9", "rollout.oversample must be >= 1, got 0.9"),
    ("rollout.oversample=1.25", "rollout.oversample=1.25 needs rollout.partial=true"),
    ("rollout.partial=true", "rollout.partial needs the SGLang engine"),
    ("rollout.partial=2", "rollout.partial must be true or false"),
    ("rollout.inflight_updates=true", "rollout.inflight_updates needs the SGLang engine"),
    ("optim.logprob_chunk_tokens=0", "optim.logprob_chunk_tokens must be >= 1"),
    ("optim.warmup_steps=-3", "optim.warmup_steps must be >= 0, got -3"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.lr=-1e-6", "optim.lr must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.clip_grad=-1", "optim.clip_grad must be >= 0"),
    ("optim.adam_beta1=1", "optim.adam_beta1 must be in \\[0, 1\\)"),
    ("optim.adam_beta2=-0.5", "optim.adam_beta2 must be in \\[0, 1\\)"),
    ("optim.adam_eps=0", "optim.adam_eps must be > 0"),
    ("algo.clip_low=1", "algo.clip_low must be in \\[0, 1\\)"),
    ("algo.future_kl_clip_ratio=1", "algo.future_kl_clip_ratio must be in \\[0, 1\\)"),
    ("algo.safety_thresh=0", "algo.safety_thresh must be > 0"),
    ("algo.overlong_penalty_factor=-1", "algo.overlong_penalty_factor must be >= 0"),
    ("algo.reward_fn=dapo", "algo.reward_fn must be one of"),
    ("train.reward_timeout_s=0", "train.reward_timeout_s must be > 0"),
    ("train.seed=-1", "train.seed must be >= 0"),
    ("data.seed=-1", "data.seed must be >= 0"),
    ("checkpoint.every_steps=-1", "checkpoint.every_steps must be >= 0"),
    ("checkpoint.resume=Auto", "checkpoint.resume='Auto': write 'auto'"),
    ("checkpoint.resume=NEVER", "checkpoint.resume='NEVER': write 'never'"),
    ("checkpoint.resume=", "checkpoint.resume must be 'auto', 'never' or a checkpoint directory"),
])
def test_meaningless_values_are_rejected(override, match):
    with pytest.raises(ValueError, match=match):
        validate(load_config(None, OK + [override]), world_size=1, hf_config=HF)


@pytest.mark.parametrize("overrides, match", [
    (["rollout.mode=colocated", "rollout.partial=true"], "rollout.inflight_updates needs rollout.mode=disaggregated"),
    (["rollout.mode=disaggregated", "rollout.partial=false"], "rollout.inflight_updates needs rollout.partial=true"),
])
def test_inflight_updates_need_disaggregated_partial_sglang(overrides, match):
    sglang = ["rollout.engine=sglang", "rollout.inflight_updates=true"]
    with pytest.raises(ValueError, match=match):
        validate(load_config(None, OK + sglang + overrides), world_size=1, hf_config=HF)
    ok = ["rollout.mode=disaggregated", "rollout.partial=true", "rollout.oversample=1.25", "rollout.max_staleness=1"]
    cfg = load_config(None, OK + sglang + ok)
    validate(cfg, world_size=1, hf_config=HF)
    assert cfg.loss_kwargs()["rollout_correction"] == "token_tis"
    partial_only = load_config(None, OK + ["rollout.engine=sglang", "rollout.partial=true"])
    assert partial_only.loss_kwargs()["rollout_correction"] == "token_tis"  # carried tokens are older


def test_every_numeric_field_has_a_range_rule():
    import dataclasses

    from megatron_fipo.config.schema import RANGES

    numeric = {f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
               for f in dataclasses.fields(s.default_factory()) if f.type.replace("Optional[", "").rstrip("]") in ("int", "float")}
    assert numeric == set(RANGES)


def test_reward_names_match_the_reward_registry():
    from megatron_fipo.algo.rewards import REWARD_FNS
    from megatron_fipo.config.schema import REWARD_NAMES

    assert set(REWARD_NAMES) == set(REWARD_FNS)


@pytest.mark.parametrize("text, value", [("1e-6", 1e-6), ("1E-6", 1e-6), ("5e-4", 5e-4), ("-2e+3", -2e3),
                                         (".5", 0.5), ("1e3", 1000.0), ("3", 3.0), ("1_000.5", 1000.5)])
def test_float_notations_in_overrides_and_yaml(tmp_path, text, value):
    assert load_config(None, [f"optim.lr={text}"]).optim.lr == value
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  lr: {text}\nmodel:\n  transformer_overrides:\n    layernorm_epsilon: {text}\n")
    cfg = load_config(str(path))
    assert cfg.optim.lr == value and cfg.model.transformer_overrides["layernorm_epsilon"] == value


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", ".NaN"])
def test_non_finite_numbers_are_rejected(text):
    with pytest.raises(ValueError, match="optim.lr must be a finite number"):
        load_config(None, [f"optim.lr={text}"])
    with pytest.raises(ValueError, match="rollout.temperature must be a finite number"):
        load_config(None, [f"rollout.temperature={text}"])


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("optim:\n  lr: 1\n  warmup_steps 3\n  x: [1\n")
    with pytest.raises(ValueError) as err:
        load_config(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}:") and "\n" not in message
    line, col = message[len(str(path)) + 1:].split(":")[:2]
    assert (int(line), int(col)) >= (3, 1)
    with pytest.raises(ValueError, match="override 'optim.lr=\\[1': "):
        load_config(None, ["optim.lr=[1"])


def test_non_utf8_config_file_names_the_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_bytes(b"optim:\n  lr: \xff\n")
    with pytest.raises(ValueError, match=f"{path}: not UTF-8 text"):
        load_config(str(path))


def test_deterministic_sglang_passes_its_server_flag():
    """rollout.deterministic adds SGLang's --enable-deterministic-inference (off by default); a contradiction
    with the pass-through argument and a non-boolean are refused."""
    from megatron_fipo.rollout.sglang_server import server_argv

    plain = load_config(None, OK + ["rollout.engine=sglang", "rollout.sglang.tp_size=2"])
    assert plain.rollout.deterministic is False
    assert "--enable-deterministic-inference" not in server_argv(plain.rollout.sglang_server_args()[1])
    cfg = load_config(None, OK + ["rollout.engine=sglang", "rollout.sglang.tp_size=2", "rollout.deterministic=true"])
    validate(cfg, world_size=1, hf_config=HF)
    tp, args = cfg.rollout.sglang_server_args()
    assert tp == 2 and server_argv(args) == ["--enable-deterministic-inference"]
    with pytest.raises(ValueError, match="contradicts rollout.sglang.enable_deterministic_inference=false"):
        validate(load_config(None, OK + ["rollout.deterministic=true",
                                         "rollout.sglang.enable_deterministic_inference=false"]),
                 world_size=1, hf_config=HF)
    with pytest.raises(ValueError, match="rollout.deterministic must be true or false"):
        validate(load_config(None, OK + ["rollout.deterministic=3"]), world_size=1, hf_config=HF)
