"""Named public model shapes: ``plan --hf-config qwen2.5-32b`` without the model on disk.

Each preset is the architecture part of the published ``config.json`` of a Qwen2 / Qwen2.5 base
model (an instruct variant has the same sizes; only ``max_position_embeddings`` may differ, which
``plan`` does not use; the math models are not included). ``tests/unit/test_hf_presets.py``
checks each against the published parameter counts (total and non-embedding). Standard library
only, like ``config.hf_model`` (whose reader and check ``read_config_or_preset`` uses).
"""
from __future__ import annotations

import difflib

_COMMON = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
           "attention_dropout": 0.0, "initializer_range": 0.02, "rope_theta": 1000000.0,
           "use_sliding_window": False, "torch_dtype": "bfloat16"}


def _shape(hidden, inter, layers, heads, kv, vocab, max_pos, tie, eps):
    return {**_COMMON, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "max_position_embeddings": max_pos, "tie_word_embeddings": tie, "rms_norm_eps": eps}


PRESETS: dict[str, dict] = {
    "qwen2-0.5b": _shape(896, 4864, 24, 14, 2, 151936, 131072, True, 1e-6),
    "qwen2-1.5b": _shape(1536, 8960, 28, 12, 2, 151936, 131072, True, 1e-6),
    "qwen2-7b": _shape(3584, 18944, 28, 28, 4, 152064, 131072, False, 1e-6),
    "qwen2-72b": _shape(8192, 29568, 80, 64, 8, 152064, 131072, False, 1e-5),
    "qwen2.5-0.5b": _shape(896, 4864, 24, 14, 2, 151936, 32768, True, 1e-6),
    "qwen2.5-1.5b": _shape(1536, 8960, 28, 12, 2, 151936, 131072, True, 1e-6),
    "qwen2.5-3b": _shape(2048, 11008, 36, 16, 2, 151936, 32768, True, 1e-6),
    "qwen2.5-7b": _shape(3584, 18944, 28, 28, 4, 152064, 131072, False, 1e-6),
    "qwen2.5-14b": _shape(5120, 13824, 48, 40, 8, 152064, 131072, False, 1e-5),
    "qwen2.5-32b": _shape(5120, 27648, 64, 40, 8, 152064, 131072, False, 1e-5),
    "qwen2.5-72b": _shape(8192, 29568, 80, 64, 8, 152064, 131072, False, 1e-5),
}


def preset_name(text: str) -> str | None:
    """The preset ``text`` names (case-insensitive, a trailing ``/`` or an ``org/`` prefix ignored), else None."""
    key = str(text).strip().rstrip("/").rsplit("/", 1)[-1].lower()
    return key if key in PRESETS else None


def looks_like_name(text: str) -> bool:
    """True when ``text`` reads as a model name (``qwen...``) rather than a path."""
    return str(text).strip().rstrip("/").rsplit("/", 1)[-1].lower().startswith("qwen")


def preset(text: str) -> dict:
    """A copy of the named preset's config; ``ValueError`` (one line: the known names, a close match) if unknown."""
    name = preset_name(text)
    if name is None:
        key = str(text).strip().rstrip("/").rsplit("/", 1)[-1].lower()
        close = difflib.get_close_matches(key, PRESETS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ValueError(f"unknown model {text!r}: known shapes are {', '.join(PRESETS)}{hint} "
                         f"(or pass the model's config.json)")
    return dict(PRESETS[name])


def parameter_counts(config: dict) -> tuple[int, int]:
    """(total, non-embedding) parameters of a Qwen2 shape: QKV biases, SwiGLU MLP, RMSNorms; lm_head unless tied."""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, v = config["num_attention_heads"], config["vocab_size"]
    kv_dim = config.get("num_key_value_heads", heads) * (h // heads)
    layer = (h * h + h) + 2 * (h * kv_dim + kv_dim) + h * h + 3 * h * i + 2 * h
    body = n * layer + h
    embed = v * h * (1 if config.get("tie_word_embeddings") else 2)
    return body + embed, body


def read_config_or_preset(path: str) -> dict:
    """``config.json`` of an HF model directory (or the file itself), validated by ``config.hf_model``;
    or, where no such path exists, a named public shape (``qwen2.5-32b``): what ``plan`` and ``convert``'s
    ``--hf-config`` accept."""
    import os

    from megatron_fipo.config import hf_model

    if not os.path.exists(path) and looks_like_name(path):
        config = preset(path)
        hf_model.check_hf_config(config, path)
        return config
    return hf_model.read_hf_config(path, hint=": pass --hf-config with a config.json of the model or a known "
                                              f"shape ({', '.join(PRESETS)})")
