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
