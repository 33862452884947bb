"""Megatron <-> HF weight bridge: a declarative Qwen2 mapping table and the streams built on it.

Owns ``qwen2_mapping`` (names and tensor transforms, both directions from one table),
``hf_import`` (HF safetensors -> this rank's Megatron parameters) and ``hf_export``
(Megatron parameters -> full HF tensors in byte-bounded buckets, HF checkpoint writing).
Must not import megatron or megatron_fipo.mcore: it works on tensors and names and receives
process groups as arguments.
"""
