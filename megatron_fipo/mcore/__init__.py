"""Megatron-Core integration: the only package that imports ``megatron.*``.

Modules: ``groups`` (torch.distributed + model-parallel setup; the only caller of
``parallel_state`` getters), ``cpu_compat`` (the documented patches that let megatron-core
0.16.x run on CPU/gloo), ``model`` (Qwen2 TransformerConfig, layer spec, GPTModel chunks).
Importing this package imports neither megatron nor torch.distributed state; submodules import
megatron lazily.
"""
