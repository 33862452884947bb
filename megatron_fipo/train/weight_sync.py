"""The actor's weights as HF tensors: streamed to the rollout engine after every update, or written as an HF model.

Owns ``WeightSync``: what the HF bridge needs to name this rank's parameters (architecture,
layer offsets, spec), the one bucket buffer every sync reuses, the weight version the engine
holds, and the two uses of the export stream (``push`` to the engine, ``export_hf`` to a
directory). Refusing non-finite weights is the caller's (``train.run.Run``), before either call.

Two ways to feed the engine:

* Funnel (the in-process CPU engine, disaggregated or attached SGLang servers): the ranks of the
  exporting model-parallel group (data- and context-parallel rank 0) run the stream and global
  rank 0 hands it to the engine; the others wait at the barrier.
* By stage (disaggregated SGLang servers with pp > 1, ``stage_engine`` given on each stage's
  exporting tensor-parallel rank 0): global rank 0 opens the servers' update sessions, then each
  pipeline stage in turn broadcasts its own layers (``bridge.hf_export.export_hf_stage``) over its
  own weight-update group with the servers; no layer is relayed through rank 0.
* Node-local (colocated SGLang servers on every node, ``nodes`` given): every rank runs
  ``bridge.hf_export.export_hf_node_local`` (tensor-parallel gathers inside nodes, each stage
  crossing into a node once), serializes its copy of each bucket for the server TP rank on its
  GPU, and the node's first rank posts them to its own servers (``node_engine``). Nothing of
  one node's servers comes from another node's processes.

Must not import: megatron, the trainer. The engines are duck-typed: ``update_weights(stream,
version)`` and ``weight_version`` (funnel), ``begin_update`` / ``push_tensor_payloads`` /
``send_stage`` / ``finish_update`` / ``abort_update`` / ``adopt_version`` (``SGLangEngine``).
"""
from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_fipo.bridge.hf_export import (
    drain,
    export_hf_node_local,
    export_hf_stage,
    export_hf_state,
    save_hf_checkpoint,
)
from megatron_fipo.config.conventions import hf_dtype_name, torch_dtype
from megatron_fipo.rollout.engine import EngineError
from megatron_fipo.rollout.sglang_weights import bucket_payload


class WeightSync:
    """One rank's side of the actor -> engine weight stream (see the module docstring)."""

    def __init__(self, actor, groups, arch, hf_config: dict, *, params_dtype: str, bucket_mb: int, version: int = 0,
                 nodes=None, node_engine=None, by_stage: bool = False, stage_engine=None):
        self.actor, self.groups, self.arch, self.hf_config = actor, groups, arch, hf_config
        self.nodes, self.node_engine = nodes, node_engine
        """Node-local mode: ``parallel.nodes.NodeGroups``, and on each node's first rank the engine that
        owns the node's servers (``SGLangEngine.push_tensor_payloads``)."""
        self.by_stage, self.stage_engine = by_stage, stage_engine
        """By-stage mode: every rank knows it; each stage's sender holds an engine of its own group."""
        self.feeds_a_server = nodes is not None and nodes.place.local < _serving_ranks(nodes, node_engine)
        """Node-local mode: this rank's GPU holds a server TP rank (the node's first ``servers x tp`` GPUs)."""
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

    def _buffer(self) -> torch.Tensor:
        if self.buffer is None:  # one buffer for every bucket of every sync
            device = next(p for _, p in self.actor.named_local_parameters()).device
            self.buffer = torch.empty(self.bucket_bytes // self.dtype.itemsize, dtype=self.dtype, device=device)
        return self.buffer

    def push(self, engine, version: int) -> float:
        """Stream the weights to ``engine`` (global rank 0's; None elsewhere) as ``version``; returns seconds.
        Collective over the world. Node-local mode feeds every node's servers, then tells ``engine``."""
        start = time.perf_counter()
        if self.nodes is not None or self.by_stage:
            if self.nodes is not None:
                self._push_node_local(version)
            else:
                self._push_by_stage(engine, version)
            dist.barrier(group=self.groups.world)
            if engine is not None:
                engine.adopt_version(version)
            self.version = version
            return time.perf_counter() - start
        if self.exports:
            stream = self._stream(self.dtype, self.bucket_bytes, reuse_buffer=self._buffer())
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

    def _push_node_local(self, version: int) -> None:
        """Every rank serializes each bucket for the server TP rank on its GPU; the node's first rank posts
        the node's payloads to its servers and tells the node's ranks how it went (so all raise together)."""
        nodes, engine = self.nodes, self.node_engine
        stream = export_hf_node_local(self.actor.named_local_parameters(), self.arch, groups=self.groups, nodes=nodes,
                                      layer_offsets=self.offsets, dtype=self.dtype, bucket_bytes=self.bucket_bytes,
                                      spec=self.spec, reuse_buffer=self._buffer())
        self._agree(lambda: engine.begin_update())
        try:
            for bucket in stream:
                mine, held = bucket_payload(bucket) if self.feeds_a_server else (None, None)
                payloads = [None] * len(nodes.ranks) if nodes.is_leader else None
                dist.gather_object(mine, payloads, dst=nodes.leader, group=nodes.group)
                self._agree(lambda: engine.push_tensor_payloads(
                    [payloads[i * engine.tp_size:(i + 1) * engine.tp_size] for i in range(len(engine.urls))], version))
                del held  # the node's servers have loaded the bucket (the _agree above)
        except BaseException:
            if engine is not None:
                engine.abort_update()
            raise
        self._agree(lambda: engine.finish_update(version))

    def _push_by_stage(self, driver, version: int) -> None:
        """Rank 0 (the driver) opens the sessions; stage by stage, the stage's exporting TP group gathers its
        layers and its sender broadcasts them to the servers; the driver closes the sessions."""
        g = self.groups
        device = self._buffer().device

        def everywhere(call, here: bool) -> None:
            _raise_if_any_failed(_attempt(call) if here else None, g.world, device)

        everywhere(lambda: driver.begin_update(), driver is not None)
        try:
            for stage in range(g.pp_size):
                if g.pp_rank == stage and self.exports:
                    stream = export_hf_stage(self.actor.named_local_parameters(), self.arch, groups=g,
                                             layer_offsets=self.offsets, dtype=self.dtype,
                                             bucket_bytes=self.bucket_bytes, spec=self.spec,
                                             reuse_buffer=self._buffer())
                    sender = self.stage_engine
                    everywhere(lambda: sender.send_stage(stream, version) if sender is not None else drain(stream),
                               True)
                else:
                    everywhere(None, False)
        except BaseException:
            if driver is not None:
                driver.abort_update()
            raise
        everywhere(lambda: driver.finish_update(version), driver is not None)

    def _agree(self, call) -> None:
        """Run ``call`` on the node's first rank; if it fails on any node, every rank of the world raises."""
        status = [_attempt(call) if self.nodes.is_leader else None]
        dist.broadcast_object_list(status, src=self.nodes.leader, group=self.nodes.group)
        _raise_if_any_failed(status[0], self.groups.world, self._buffer().device,
                             where=f"node {self.nodes.place.node}'s ")

    def export_hf(self, out_dir: str, tokenizer_source: str) -> None:
        """Write an HF model directory (in the HF config's dtype) from global rank 0. Collective over the world."""
        if self.exports:
            buckets = self._stream(torch_dtype(hf_dtype_name(self.hf_config)), 512 << 20)
            if self.groups.rank == 0:
                save_hf_checkpoint(buckets, out_dir, self.hf_config, tokenizer_source)
            else:
                drain(buckets)
        dist.barrier(group=self.groups.world)


def _serving_ranks(nodes, node_engine) -> int:
    """How many of the node's ranks feed a server TP rank: ``servers x tp`` (the node's first rank knows)."""
    counts = [len(node_engine.urls) * node_engine.tp_size if nodes.is_leader else 0]
    dist.broadcast_object_list(counts, src=nodes.leader, group=nodes.group)
    return counts[0]


def _attempt(call) -> Optional[str]:
    """``call()``; its error as text, or None."""
    try:
        call()
    except Exception as err:  # noqa: BLE001 - reported to every rank by _raise_if_any_failed
        return f"{type(err).__name__}: {err}"
    return None


def _raise_if_any_failed(error: Optional[str], group, device, where: str = "") -> None:
    """``EngineError`` on every rank of ``group`` if any rank's part failed (a rank that went on alone would
    wait forever in the next collective)."""
    failed = torch.tensor([0.0 if error is None else 1.0], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if failed.item():
        raise EngineError(f"{where}weight sync to the rollout servers failed: {error}" if error else
                          "weight sync to the rollout servers failed on another rank")
