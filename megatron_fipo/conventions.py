"""Rules several layers must apply identically, in one place: the CP alignment and the dtype names.

Stdlib only (torch is imported lazily by ``torch_dtype``), so the config validation, which must
not import torch, the CP layout math, the actor and the bridge all read the same definition.
"""
from __future__ import annotations

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


def torch_dtype(name: str):
    """``"bfloat16"`` -> ``torch.bfloat16`` (one of ``DTYPE_NAMES``); ValueError otherwise."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPE_NAMES)}")
    import torch

    return getattr(torch, name)


def hf_dtype_name(hf_config: dict) -> str:
    """The dtype an HF ``config.json`` declares for its weights (float32 when it declares none)."""
    return hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
