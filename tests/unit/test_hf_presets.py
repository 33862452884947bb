"""Named model shapes (``plan --hf-config qwen2.5-32b``) against the published parameter counts."""
import json

import pytest

from megatron_fipo.config import hf_presets
from megatron_fipo.config.hf_presets import PRESETS, parameter_counts
from megatron_fipo.config.hf_presets import read_config_or_preset as read_hf_config

# Published totals: the parameter counts of the released safetensors (billions, 3 significant digits).
TOTAL = {"qwen2-0.5b": 0.494, "qwen2-1.5b": 1.54, "qwen2-7b": 7.62, "qwen2-72b": 72.7,
         "qwen2.5-0.5b": 0.494, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09, "qwen2.5-7b": 7.62,
         "qwen2.5-14b": 14.8, "qwen2.5-32b": 32.8, "qwen2.5-72b": 72.7}
# Non-embedding counts as the model cards state them (billions); the cards round loosely (32B: "31.0B"
# where the released weights give 31.2B), so these are checked to 1.5 %.
NON_EMBEDDING = {"qwen2-0.5b": 0.36, "qwen2-1.5b": 1.31, "qwen2-72b": 70.21,
                 "qwen2.5-0.5b": 0.36, "qwen2.5-1.5b": 1.31, "qwen2.5-3b": 2.77, "qwen2.5-7b": 6.53,
                 "qwen2.5-14b": 13.1, "qwen2.5-32b": 31.0, "qwen2.5-72b": 70.0}


def _sig3(x: float) -> float:
    return float(f"{x:.3g}")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_matches_published_counts(name):
    total, body = parameter_counts(PRESETS[name])
    assert _sig3(total / 1e9) == TOTAL[name]
    if name in NON_EMBEDDING:
        assert body / 1e9 == pytest.approx(NON_EMBEDDING[name], rel=0.015)


def test_every_preset_is_checked():
    assert set(TOTAL) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_dumped_is_a_valid_config(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    file = tmp_path / "config.json"
    file.write_text(json.dumps(PRESETS[name]))
    ours = read_hf_config(str(file))
    theirs = transformers.Qwen2Config.from_pretrained(str(tmp_path))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "rms_norm_eps"):
        assert getattr(theirs, key) == ours[key] == PRESETS[name][key], key
    rope = getattr(theirs, "rope_parameters", None) or {"rope_theta": theirs.rope_theta}  # moved in transformers 5
    assert rope["rope_theta"] == ours["rope_theta"] == 1e6


def test_plan_reads_names_case_insensitively(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert read_hf_config("Qwen2.5-32B") == PRESETS["qwen2.5-32b"]
    assert read_hf_config("Qwen/Qwen2.5-7B-Instruct/".replace("-Instruct", "")) == PRESETS["qwen2.5-7b"]
    with pytest.raises(ValueError, match=r"known shapes are .*qwen2\.5-32b.*did you mean qwen2\.5-32b\?"):
        read_hf_config("qwen25-32b")


def test_a_directory_of_that_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen2.5-7B").mkdir()
    (tmp_path / "Qwen2.5-7B" / "config.json").write_text(json.dumps({**PRESETS["qwen2.5-7b"], "num_hidden_layers": 2}))
    assert read_hf_config("Qwen2.5-7B")["num_hidden_layers"] == 2
    assert hf_presets.preset_name("QWEN2.5-7B") == "qwen2.5-7b"


def test_convert_takes_a_shape_name_for_a_checkpoint_without_a_config(tmp_path, monkeypatch):
    """``convert --from-mcore CKPT --hf-config qwen2.5-0.5b``: the name stands for the config the checkpoint lacks."""
    from megatron_fipo import convert
    from megatron_fipo.mcore import checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint, "resolve_checkpoint", lambda path: ("iteration", path))
    monkeypatch.setattr(checkpoint, "read_checkpoint_meta", lambda path: {"extra": {}, "layout": {"tp": 1}})
    config, _tokenizer, path, layout = convert._mcore_source("iter_0000001", "Qwen2.5-0.5B", None)
    assert config == PRESETS["qwen2.5-0.5b"] and path == "iter_0000001" and layout == {"tp": 1}
    with pytest.raises(ValueError, match="pass --hf-config with the model's config.json or a known shape"):
        convert._mcore_source("iter_0000001", None, None)
