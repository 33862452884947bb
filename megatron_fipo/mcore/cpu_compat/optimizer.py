"""CPU patches for data-parallel gradient buffers, the optimizer and gradient clipping.

Patches (``PATCHES``), in ``megatron.core``:
* ``torch`` -> ``CPU_TORCH`` in ``distributed.param_and_grad_buffer`` (``_ParamAndGradBuffer``
  allocates param / grad buffers on the current CUDA device), ``optimizer.optimizer``
  (``FP32Optimizer._scale`` created with ``device='cuda'``), ``optimizer.clip_grads`` (the
  grad-norm / zero-count accumulators, likewise) and ``utils`` (the no-apex / no-TE
  ``local_multi_tensor_l2_norm`` returns its norm on cuda).
* ``optimizer.optimizer.clip_grad_by_total_norm_fp32`` -> ``_clip_grad_by_total_norm_fp32`` here:
  upstream asserts every gradient is a ``'torch.cuda.FloatTensor'``.
* ``DistributedOptimizer.__init__``: ``_build_model_and_main_param_groups`` raises TypeError
  unless ``param.type()`` is a ``torch.cuda.*`` name, so while ``__init__`` runs, a CPU
  parameter's no-argument ``type()`` names its CUDA twin.
Not covered: the fp16/bf16 mixed-precision optimizers.
Must not import: megatron at module level, anything from megatron_fipo outside ``mcore.cpu_compat``.
"""
from __future__ import annotations

import torch

from megatron_fipo.mcore.cpu_compat.registry import CD, during, patch, same, torch_patch, with_method


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Scale gradients in place by ``max_norm / (total_norm + 1e-6)`` when that is < 1.

    Same contract as upstream ``clip_grad_by_total_norm_fp32`` minus its assertion that every
    gradient is a ``torch.cuda.FloatTensor`` (a CPU fp32 grad is a ``torch.FloatTensor``).
    """
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            assert grad.dtype in (torch.float32, torch.bfloat16), grad.dtype
            to_local_if_dtensor(grad).detach().mul_(coeff)


def _cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
    """``Tensor.type()`` that names a CPU tensor's type as its CUDA twin (no-arg calls only)."""
    name = torch.Tensor.type(self, dtype, non_blocking, **kwargs)
    if dtype is None and not kwargs and self.device.type == "cpu":
        return name.replace("torch.", "torch.cuda.", 1)
    return name


PATCHES = (
    # Data-parallel gradient buffers and finalisation.
    torch_patch("distributed.param_and_grad_buffer", ["_ParamAndGradBuffer.__init__"], CD,
                "param/grad buffers are allocated on torch.cuda.current_device()"),
    # Optimizer and clipping.
    torch_patch("optimizer.optimizer", ["FP32Optimizer.__init__"], "device='cuda'",
                "FP32Optimizer._scale (and mixed-precision found_inf) are created on cuda"),
    torch_patch("optimizer.clip_grads", ["get_grad_norm_fp32", "count_zeros_fp32"], "device='cuda'",
                "the grad-norm / zero-count accumulators are created on cuda"),
    torch_patch("utils", ["local_multi_tensor_l2_norm"], 'device="cuda"',
                "the no-apex/no-TE l2-norm fallback returns its norm on cuda"),
    patch("optimizer.optimizer", "clip_grad_by_total_norm_fp32", ["clip_grad_by_total_norm_fp32"],
          "'torch.cuda.FloatTensor'", "asserts param.grad.type() == 'torch.cuda.FloatTensor'",
          same(_clip_grad_by_total_norm_fp32)),
    patch("optimizer.distrib_optimizer", "DistributedOptimizer",
          ["DistributedOptimizer._build_model_and_main_param_groups"], "'torch.cuda.FloatTensor'",
          "raises TypeError unless param.type() is a torch.cuda.* name",
          lambda cls: with_method(cls, "__init__", during(cls.__init__, torch.nn.Parameter, "type",
                                                          _cuda_named_type))),
)
