"""Builders of tiny random HF Qwen2 checkpoints for the bridge tests (offline, fp32).

``tiny_hf_model(out_dir, **overrides)`` saves a random ``Qwen2ForCausalLM`` with
``save_pretrained`` and returns the directory; ``CASES`` are the shapes the tests cover (tied and
untied, GQA 4:2 and 8:1, vocabs not divisible by the tensor-parallel size).
"""
from __future__ import annotations

import os

BASE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, vocab_size=201, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=False, hidden_act="silu")
CASES = {
    "untied_gqa4to2": dict(),
    "tied_gqa4to2": dict(tie_word_embeddings=True, vocab_size=203),
    "tied_gqa8to1": dict(tie_word_embeddings=True, num_attention_heads=8, num_key_value_heads=1, vocab_size=150),
}


def tiny_hf_model(out_dir: str, seed: int = 0, **overrides) -> str:
    """Save a random tiny ``Qwen2ForCausalLM`` (fp32, safetensors) to ``out_dir``; returns it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**dict(BASE, **overrides))
    model = Qwen2ForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: randomise so mistakes show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir
