"""Rules several layers must apply identically, in one place: the CP alignment, the dtype names and the
optimizer settings (the config's ``optim`` section, which ``mcore.actor.ActorSettings`` extends) and
how many colocated rollout servers a node runs (``plan`` and the trainer).

Stdlib only (torch is imported lazily by ``torch_dtype``), so the config validation, which must
not import torch, the CP layout math, the actor and the bridge all read the same definition.
"""
from __future__ import annotations

from dataclasses import dataclass

DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""Dtype names of HF checkpoints (``torch_dtype`` in ``config.json``, ``convert --dtype``), as torch spells them."""
PARAMS_DTYPES = ("float32", "bfloat16")
"""What ``model.params_dtype`` (the actor's parameters) may be."""


def cp_alignment(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """Under context parallelism every sequence is padded to a multiple of this many tokens; 1 without.

    Megatron's load-balanced layout splits each sequence into ``2 * cp`` equal chunks; with sequence
    parallelism each rank's share must also split over the ``tp`` ranks.
    """
    if cp <= 1:
        return 1
    return 2 * cp * (tp if sequence_parallel else 1)


def servers_per_node(configured, tp_size: int, gpus_per_node: int) -> int:
    """Colocated SGLang servers on each node: ``rollout.servers_per_node``, or as many as the node's GPUs
    hold at ``tp_size`` each; ValueError when they do not fit (server i uses GPUs ``[i*tp, (i+1)*tp)``)."""
    per_node = configured or gpus_per_node // tp_size
    if per_node < 1 or per_node * tp_size > gpus_per_node:
        raise ValueError(f"{per_node} server(s) per node x rollout.sglang.tp_size {tp_size} = {per_node * tp_size} "
                         f"GPUs, but a node has {gpus_per_node} GPUs")
    return per_node


def torch_dtype(name: str):
    """``"bfloat16"`` -> ``torch.bfloat16`` (one of ``DTYPE_NAMES``); ValueError otherwise."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPE_NAMES)}")
    import torch

    return getattr(torch, name)


def hf_dtype_name(hf_config: dict) -> str:
    """The dtype an HF ``config.json`` declares for its weights (float32 when it declares none)."""
    return hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"


@dataclass(frozen=True)
class OptimConfig:
    """The ``optim`` section: AdamW, warm-up, gradient clipping and the micro-batch token budgets."""

    lr: float = 1e-6
    warmup_steps: int = 10
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_tokens_per_micro_batch: int = 24576  # >= one full prompt + response; a whole micro-batch (each CP rank: 1/cp)
    logprob_chunk_tokens: int = 4096
