"""CPU compatibility layer: lets megatron-core 0.16.x run on gloo without CUDA.

Owns: the list of patches (``PATCHES``), ``apply_cpu_patches()``, ``cpu_patches_applied()``,
``check_patch_targets()`` and ``local_layer_spec()``: the one entry point of this package. The
patches live by upstream area: ``layers`` (model construction and forward), ``pipeline``
(schedules and p2p), ``optimizer`` (DDP buffers, optimizer, clipping), ``checkpointing``
(dist_checkpointing save), ``rng`` (RNG tracker, recomputation), ``norm`` (the local spec's
norm); ``cpu_torch`` is the CPU view of torch and ``registry`` the ``Patch`` record and its
application. Must not import: anything from megatron_fipo outside mcore/. Imports megatron.* lazily.

Scope: GPTModel with the local layer spec, ``get_forward_backward_func`` schedules
(no-pipelining, 1F1B, interleaved, variable sequence lengths), Megatron
``DistributedDataParallel``, ``get_megatron_optimizer`` (torch AdamW, fp32), gradient clipping and
``dist_checkpointing`` save/load; also the distributed optimizer (training) and tied embeddings
across pipeline stages. Each patch replaces one name of one upstream module:

* ``torch`` in modules whose code hard-codes CUDA (``torch.cuda.current_device()`` used as a
  device, ``device="cuda"``, ``torch.cuda.synchronize()``) becomes ``CPU_TORCH``: a read-only view
  of torch that forwards everything to torch except that ``cuda.current_device()`` answers the
  CPU device, ``cuda.synchronize()`` does nothing and tensor factories map ``device="cuda"`` to
  the CPU and drop ``pin_memory``. torch itself is never modified, so code outside the listed
  megatron modules (transformers, the tests, our own code) keeps seeing the real torch.cuda.
* module-level functions/classes swapped for CPU versions: gradient clipping (asserts
  ``'torch.cuda.FloatTensor'``), the RNG tracker class (CPU generator states), the norm class of
  the local spec (refuses sequence parallelism), tagged pipeline p2p (gloo matches untagged
  messages in posting order, which swaps activations and gradients at pp = 2 with vpp).
* three methods replaced in their class: the p2p shape exchange (variable lengths), and two
  wrappers that, only while upstream's method runs, make ``Parameter.type()`` report CUDA type
  names (distributed optimizer) or ``Tensor.cuda()`` return its CPU tensor (tied embeddings).

Context parallelism needs no patch: the local spec's attention (which asserts cp == 1) is
replaced by ``mcore.context_parallel.AllGatherCPAttention``. Not covered: the fp16/bf16
mixed-precision optimizers. Distributed-optimizer checkpoints go through ``mcore.checkpoint``.

All patches are no-ops when CUDA is available. Each ``Patch`` names the upstream functions that
contain the CUDA-only code and a marker string from each one's source; ``check_patch_targets()``
reports upstream renames/removals, and fixes (then the patch should be dropped).
"""
from __future__ import annotations

import torch

from megatron_fipo.mcore.cpu_compat import checkpointing, layers, norm, optimizer, pipeline, rng
from megatron_fipo.mcore.cpu_compat.cpu_torch import CPU_TORCH
from megatron_fipo.mcore.cpu_compat.norm import SequenceParallelTorchNorm
from megatron_fipo.mcore.cpu_compat.registry import Patch, apply_patches, check_targets, patches_applied

__all__ = ["CPU_TORCH", "PATCHES", "Patch", "SequenceParallelTorchNorm", "apply_cpu_patches",
           "check_patch_targets", "cpu_patches_applied", "local_layer_spec"]

PATCHES: tuple[Patch, ...] = (layers.PATCHES + pipeline.PATCHES + optimizer.PATCHES + checkpointing.PATCHES
                              + rng.PATCHES + norm.PATCHES)


def apply_cpu_patches() -> bool:
    """Apply every patch in ``PATCHES`` once. A no-op (returns False) when CUDA is available.

    Returns:
        True when the patches are (now) in place.

    Raises:
        AttributeError: a patch target no longer exists in the installed megatron-core.
    """
    if torch.cuda.is_available():
        return False
    apply_patches(PATCHES)
    return True


def local_layer_spec(config):
    """Upstream ``get_gpt_layer_local_spec`` for ``config`` (norm type, qk-norm), CPU patches applied.

    With the patches, its norms are ``SequenceParallelTorchNorm`` (so sequence parallelism
    works with the local spec, including the block's final norm).

    Args:
        config: a ``TransformerConfig``.

    Returns:
        ``ModuleSpec`` of one transformer layer.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    apply_cpu_patches()
    return get_gpt_layer_local_spec(normalization=config.normalization,
                                    qk_layernorm=config.qk_layernorm)


def cpu_patches_applied() -> bool:
    """True once ``apply_cpu_patches()`` has replaced every target."""
    return patches_applied(PATCHES)


def check_patch_targets(patches: tuple[Patch, ...] | None = None) -> list[str]:
    """Check that every patch still has something to patch in the installed megatron-core.

    Args:
        patches: the patches to check (default ``PATCHES``).

    Returns:
        one message per missing module, attribute or site, or site whose source lost the
        marker (upstream renamed, removed or fixed it); empty when all is well.
    """
    return check_targets(PATCHES if patches is None else patches)
