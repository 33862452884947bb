"""CPU patches for ``tensor_parallel.random``: the RNG states tracker and activation recomputation.

Patches (``PATCHES``), in ``megatron.core.tensor_parallel.random``:
* ``CudaRNGStatesTracker`` -> a subclass whose named states are CPU generator states (upstream
  stores CUDA generator states; ``torch.cuda.get_rng_state`` fails without CUDA).
  ``model_parallel_cuda_manual_seed`` then adds the data-, model- and expert-parallel states
  exactly as upstream does (same seed offsets).
* ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` -> the CPU default generator's state:
  activation recomputation (``CheckpointFunction``) saves and restores the generator state.
Must not import: megatron at module level, anything from megatron_fipo outside ``mcore.cpu_compat``.
"""
from __future__ import annotations

import contextlib

import torch

from megatron_fipo.mcore.cpu_compat.registry import patch, same


def _make_cpu_rng_tracker(base: type) -> type:
    """Subclass upstream's ``CudaRNGStatesTracker`` so that named states are CPU generator states.

    ``model_parallel_cuda_manual_seed`` then adds the data-, model- and expert-parallel states
    exactly as upstream does (same seed offsets), and ``fork(name)`` swaps the CPU default
    generator's state in and out, which is what upstream does with the CUDA generator.
    """

    class CpuRNGStatesTracker(base):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            orig_state, orig_name = torch.get_rng_state(), self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    CpuRNGStatesTracker.__qualname__ = CpuRNGStatesTracker.__name__
    return CpuRNGStatesTracker


PATCHES = (
    patch("tensor_parallel.random", "CudaRNGStatesTracker", ["CudaRNGStatesTracker.add"],
          "torch.cuda.get_rng_state()",
          "the tracker stores CUDA generator states (torch.cuda.get_rng_state fails without CUDA)",
          _make_cpu_rng_tracker),
    patch("tensor_parallel.random", "_get_cuda_rng_state", ["_get_cuda_rng_state"], "torch.cuda.random.get_rng_state",
          "activation recomputation (CheckpointFunction) saves the CUDA generator state", same(
              lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())),
    patch("tensor_parallel.random", "_set_cuda_rng_state", ["_set_cuda_rng_state"], "_lazy_call",
          "activation recomputation restores the CUDA generator state before recomputing", same(
              lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))),
)
