"""CPU patches for model construction and forward: rotary embeddings, masks, TP layers, tied embeddings.

Patches (``PATCHES``), in ``megatron.core``:
* ``torch`` -> ``CPU_TORCH`` in ``models.common.embeddings.rotary_pos_embedding``
  (``RotaryEmbedding.__init__`` builds ``inv_freq`` on ``torch.cuda.current_device()``),
  ``transformer.utils`` (``get_default_causal_mask`` builds the mask with ``device="cuda"``),
  ``tensor_parallel.layers`` (weights and all-gather buffers on the current CUDA device) and
  ``tensor_parallel.mappings`` (sequence-parallel gather / reduce-scatter buffers, likewise).
* ``LanguageModule.setup_embeddings_and_output_layer``: with tied embeddings and pp > 1 the last
  stage's copy is moved with ``weight.data.cuda()`` before the all-reduce that initialises it;
  while that method runs, ``Tensor.cuda()`` returns the (CPU) tensor itself.
Must not import: megatron at module level, anything from megatron_fipo outside ``mcore.cpu_compat``.
"""
from __future__ import annotations

import torch

from megatron_fipo.mcore.cpu_compat.registry import CD, during, patch, torch_patch, with_method


def _stay_on_cpu(self, *args, **kwargs):
    """``Tensor.cuda()`` that returns the (CPU) tensor itself."""
    return self


PATCHES = (
    torch_patch("models.common.embeddings.rotary_pos_embedding", ["RotaryEmbedding.__init__"], CD,
                "inv_freq is created on torch.cuda.current_device() unless use_cpu_initialization"),
    torch_patch("transformer.utils", ["get_default_causal_mask"], 'device="cuda"',
                "the default causal mask (attention_mask=None) is built on cuda"),
    torch_patch("tensor_parallel.layers",
                ["ColumnParallelLinear.__init__", "LinearWithGradAccumulationAndAsyncCommunication"],
                CD, "weights/all-gather buffers are allocated on torch.cuda.current_device()"),
    torch_patch("tensor_parallel.mappings", ["_gather_along_first_dim", "_reduce_scatter_along_first_dim"],
                CD, "sequence-parallel gather/reduce-scatter buffers on torch.cuda.current_device()"),
    patch("models.common.language_module.language_module", "LanguageModule",
          ["LanguageModule.setup_embeddings_and_output_layer"], "weight.data.cuda()",
          "tied embeddings with pp > 1: the last stage's copy is moved with .cuda() before the "
          "all-reduce that initialises it",
          lambda cls: with_method(cls, "setup_embeddings_and_output_layer", during(
              cls.setup_embeddings_and_output_layer, torch.Tensor, "cuda", _stay_on_cpu))),
)
