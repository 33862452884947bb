"""evaluation: the default generation length fits the model's positions."""
import json
from types import SimpleNamespace

import pytest

from megatron_fipo.evaluation import DEFAULT_MAX_NEW_TOKENS, _max_new_tokens


def _model(tmp_path, positions):
    config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 192,
              "vocab_size": 24, "max_position_embeddings": positions}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def _items(*lengths):
    return [SimpleNamespace(prompt_ids=tuple(range(n))) for n in lengths]


def test_default_is_capped_by_the_model_positions(tmp_path, capsys):
    assert _max_new_tokens(None, _model(tmp_path, 64), _items(3, 8, 5)) == 56
    assert "generating at most 56 new tokens" in capsys.readouterr().err
    assert _max_new_tokens(None, _model(tmp_path, 131072), _items(2048)) == DEFAULT_MAX_NEW_TOKENS
    assert _max_new_tokens(None, str(tmp_path / "missing"), _items(8)) == DEFAULT_MAX_NEW_TOKENS


def test_explicit_length_is_kept_and_bad_ones_are_clear_errors(tmp_path):
    model = _model(tmp_path, 64)
    assert _max_new_tokens(16, model, _items(8)) == 16
    with pytest.raises(ValueError, match="--max-new-tokens must be >= 1"):
        _max_new_tokens(0, model, _items(8))
    with pytest.raises(ValueError, match="longest prompt fills the model's 64 positions"):
        _max_new_tokens(None, model, _items(64))


def _eval_args(*argv):
    from megatron_fipo.cli import build_parser

    return build_parser().parse_args(["eval", "--data", "x.jsonl", *argv])


def test_eval_defaults_are_the_trainers_with_a_config():
    """``eval --config`` samples as the trainer's held-out evaluation does (the demo: 16 new tokens, n=4, top-p 1)."""
    from megatron_fipo.config.schema import load_config
    from megatron_fipo.evaluation import DEFAULTS, resolve_settings
    from megatron_fipo.train.services import eval_settings

    cfg = load_config("examples/demo_cpu.yaml", [])
    got = resolve_settings(_eval_args("--model", "m", "--config", "examples/demo_cpu.yaml"))
    trainer = eval_settings(cfg)
    for key in ("n", "temperature", "top_p", "max_new_tokens", "seed"):
        assert got[key] == trainer[key], key
    assert got["max_new_tokens"] == 16 and got["n"] == 4 and got["top_p"] == 1.0
    assert got["max_prompt_tokens"] == cfg.rollout.max_prompt_length
    explicit = resolve_settings(_eval_args("--model", "m", "--config", "examples/demo_cpu.yaml",
                                           "--max-new-tokens", "8", "--n", "2"))
    assert explicit["max_new_tokens"] == 8 and explicit["n"] == 2 and explicit["top_p"] == 1.0
    assert resolve_settings(_eval_args("--model", "m")) == DEFAULTS


def test_megatron_checkpoint_as_model_points_to_checkpoint(tmp_path):
    from megatron_fipo.evaluation import is_megatron_checkpoint, run_eval

    run = tmp_path / "run"
    it = run / "checkpoints" / "iter_0000010"
    it.mkdir(parents=True)
    (it / "fipo_checkpoint.json").write_text("{}")
    (run / "hf").mkdir()
    (run / "hf" / "config.json").write_text("{}")
    for path in (run, run / "checkpoints", it):
        assert is_megatron_checkpoint(str(path))
        with pytest.raises(ValueError, match=rf"is a Megatron checkpoint.*pass it as --checkpoint {path}"):
            run_eval(_eval_args("--model", str(path)))
    assert not is_megatron_checkpoint(str(run / "hf")) and not is_megatron_checkpoint(str(tmp_path / "none"))
