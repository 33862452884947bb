"""CPU patch for the local layer spec's norm: ``SequenceParallelTorchNorm`` (sequence parallelism without TE).

Patches (``PATCHES``), in ``megatron.core``: ``models.backends.WrappedTorchNorm`` (the norm of
``LocalSpecProvider.layer_norm``) and ``transformer.transformer_block.LayerNormImpl`` (the block's
final norm) -> ``SequenceParallelTorchNorm``, because upstream's ``WrappedTorchNorm`` asserts
``not config.sequence_parallel``.
Must not import: megatron at module level, anything from megatron_fipo outside ``mcore.cpu_compat``.
"""
from __future__ import annotations

import torch

from megatron_fipo.mcore.cpu_compat.registry import patch, same


class SequenceParallelTorchNorm:
    """Drop-in for upstream ``WrappedTorchNorm`` that also allows sequence parallelism.

    Builds ``torch.nn.RMSNorm`` or ``torch.nn.LayerNorm`` (per ``config.normalization``) and,
    under sequence parallelism, marks the parameters ``sequence_parallel = True`` so that
    ``finalize_model_grads`` all-reduces their gradients over the TP group, as it does for
    Transformer Engine's norms. Parameter names (``weight``, ``bias``) are upstream's; their dtype
    is ``config.params_dtype``, as TE's (upstream's torch norm is always float32).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError("zero-centered gamma / memory-efficient norm need TE or apex")
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization {config.normalization!r}: use RMSNorm or LayerNorm")
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


PATCHES = tuple(
    patch(module, attr, [site], attr, "WrappedTorchNorm asserts not config.sequence_parallel",
          same(SequenceParallelTorchNorm))
    for module, attr, site in [
        ("models.backends", "WrappedTorchNorm", "LocalSpecProvider.layer_norm"),
        ("transformer.transformer_block", "LayerNormImpl", "_get_block_submodules"),
    ]
)
