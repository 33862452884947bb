"""The CPU view of torch (``CPU_TORCH``) that replaces ``torch`` inside CUDA-hard-coding megatron modules.

Owns: ``CPU_TORCH``, a read-only view of torch that forwards everything to torch except that
``cuda.current_device()`` answers the CPU device, ``cuda.synchronize()`` does nothing and tensor
factories map ``device="cuda"`` (or a CUDA index / ``torch.device``) to the CPU and drop
``pin_memory``. Must not import: megatron (this module patches nothing itself; the area modules
name the upstream modules whose ``torch`` it replaces) or anything from megatron_fipo.
Departs from upstream: torch itself is never modified, so code outside the patched megatron
modules (transformers, the tests, our own code) keeps seeing the real ``torch.cuda``.
"""
from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch

_CPU = torch.device("cpu")
_FACTORIES = (
    "arange", "empty", "empty_like", "full", "full_like", "ones", "ones_like",
    "rand", "randn", "randint", "tensor", "zeros", "zeros_like", "as_tensor",
)


def _cpu_device(device):
    """Map any CUDA device spec (``"cuda"``, ``"cuda:1"``, an index, a torch.device) to CPU."""
    if isinstance(device, int) or (device is not None and torch.device(device).type == "cuda"):
        return _CPU
    return device


def _cpu_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs an accelerator; irrelevant without one
        return fn(*args, **kwargs)

    return factory


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as seen by the patched modules: the current device is the CPU."""

    def __init__(self):
        super().__init__("torch.cuda")

    @staticmethod
    def current_device():
        return _CPU

    @staticmethod
    def synchronize(device=None):  # CPU ops are synchronous
        return None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by the patched modules (see the module docstring)."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


CPU_TORCH = _CpuTorch()
