"""The actor's weights as HF tensors: streamed to the rollout engine after every update, or written as an HF model.

Owns ``WeightSync``: what the HF bridge needs to name this rank's parameters (architecture,
layer offsets, spec), the one bucket buffer every sync reuses, the weight version the engine
holds, and the two uses of the export stream (``push`` to the engine, ``export_hf`` to a
directory). Only the ranks of the exporting model-parallel group (data-parallel and context-
parallel rank 0) run the stream; the others wait at the barrier. Refusing non-finite weights is
the caller's (``trainer_setup.Run``), before either call.

Must not import: megatron, the trainer. The engine is duck-typed (``update_weights(stream,
version)`` and ``weight_version``).
"""
from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_fipo.bridge.hf_export import drain, export_hf_state, save_hf_checkpoint
from megatron_fipo.conventions import hf_dtype_name, torch_dtype
from megatron_fipo.rollout.engine import EngineError


class WeightSync:
    """One rank's side of the actor -> engine weight stream (see the module docstring)."""

    def __init__(self, actor, groups, arch, hf_config: dict, *, params_dtype: str, bucket_mb: int, version: int = 0):
        self.actor, self.groups, self.arch, self.hf_config = actor, groups, arch, hf_config
        self.offsets, self.spec = actor.bridge_layout()
        self.dtype = torch_dtype(params_dtype)
        self.bucket_bytes = bucket_mb << 20
        self.buffer: Optional[torch.Tensor] = None
        self.version = version
        """The weight version the engine holds (the training step that produced it)."""

    @property
    def exports(self) -> bool:
        """This rank takes part in the export stream's collectives."""
        return self.groups.dp_rank == 0 and self.groups.cp_rank == 0

    def _stream(self, dtype: torch.dtype, bucket_bytes: int, reuse_buffer: Any = False):
        return export_hf_state(self.actor.named_local_parameters(), self.arch, groups=self.groups,
                               layer_offsets=self.offsets, dtype=dtype, bucket_bytes=bucket_bytes, spec=self.spec,
                               reuse_buffer=reuse_buffer)

    def push(self, engine, version: int) -> float:
        """Stream the weights to ``engine`` (global rank 0's; None elsewhere) as ``version``; returns seconds.
        Collective over the world."""
        start = time.perf_counter()
        if self.exports:
            if self.buffer is None:  # one buffer for every bucket of every sync
                device = next(p for _, p in self.actor.named_local_parameters()).device
                self.buffer = torch.empty(self.bucket_bytes // self.dtype.itemsize, dtype=self.dtype, device=device)
            stream = self._stream(self.dtype, self.bucket_bytes, reuse_buffer=self.buffer)
            if engine is not None:
                engine.update_weights(stream, version)
                if engine.weight_version != version:
                    raise EngineError(f"the engine reports weight version {engine.weight_version} after syncing "
                                      f"{version}")
            else:
                drain(stream)  # the other ranks of the group take part in the collectives
        dist.barrier(group=self.groups.world)
        self.version = version
        return time.perf_counter() - start

    def export_hf(self, out_dir: str, tokenizer_source: str) -> None:
        """Write an HF model directory (in the HF config's dtype) from global rank 0. Collective over the world."""
        if self.exports:
            buckets = self._stream(torch_dtype(hf_dtype_name(self.hf_config)), 512 << 20)
            if self.groups.rank == 0:
                save_hf_checkpoint(buckets, out_dir, self.hf_config, tokenizer_source)
            else:
                drain(buckets)
        dist.barrier(group=self.groups.world)
