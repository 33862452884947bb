"""Context parallelism on the Megatron side: CP micro-batches and CP attention for the local spec.

Owns ``CPMicroBatch`` / ``shard_micro_batch`` (one packed micro-batch cut with Megatron's
load-balanced layout, ``parallel.cp_layout``: tokens, labels already shifted inside each *full*
sequence, loss mask and per-token values, all sharded with the same indices, plus the THD
``PackedSeqParams`` that TE's CP attention and Megatron's THD RoPE read), ``AllGatherCPAttention``
and ``with_cp_attention`` (the local layer spec with that core attention).

Only megatron_fipo.mcore imports megatron. Must not import trainer, rollout or bridge.

``AllGatherCPAttention`` is the non-Transformer-Engine path (CPU, tests, GPUs without TE): it
all-gathers K and V over the CP group (backward: the gradient of the gathered K / V summed over
the group, each rank keeping its own tokens' share) and masks causally in *global* positions:
query and key tokens attend when they are in the same sequence, the key is not after the query,
and the key is a real token (not the padding that rounds a sequence up to ``2 * cp`` chunks).
Memory is ``O(t_local * T)`` per head, fine for tests; on GPU the TE spec's own CP attention
(p2p ring over the same THD layout) is used. Upstream's local ``DotProductAttention`` asserts
``context_parallel_size == 1``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_fipo.data.packing import PackedBatch
from megatron_fipo.parallel.cp_layout import CPLayout, layout_from_cu_seqlens, local_token_coordinates


@dataclass
class CPMicroBatch:
    """This CP rank's share of a packed micro-batch (all tensors ``[layout.num_local_tokens]``)."""

    full: PackedBatch
    layout: CPLayout
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    per_token: Dict[str, torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return self.layout.num_local_tokens

    def model_inputs(self, device: torch.device):
        """``(tokens [1, n], position_ids [1, n], attention_mask None, PackedSeqParams)`` for GPTModel."""
        from megatron.core.packed_seq_params import PackedSeqParams

        lay = self.layout
        real = lay.cu_seqlens.to(device=device, dtype=torch.int32)
        padded = lay.padded_cu_seqlens.to(device=device, dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real, cu_seqlens_q_padded=padded,
                                 cu_seqlens_kv_padded=padded, max_seqlen_q=lay.max_padded_length,
                                 max_seqlen_kv=lay.max_padded_length)
        return (self.tokens.unsqueeze(0).to(device), lay.local_positions.unsqueeze(0).to(device), None, params)

    def gather(self, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        """Every rank's ``[n]`` local values -> the full micro-batch's ``[N]`` per-position values."""
        parts = [torch.empty_like(local) for _ in range(self.layout.cp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return self.layout.unshard([p.cpu() for p in parts])


def shard_micro_batch(batch: PackedBatch, cp: int, cp_rank: int, *, align: Optional[int] = None) -> CPMicroBatch:
    """Cut a packed micro-batch for CP rank ``cp_rank`` (sequences padded to multiples of ``align``).

    Args:
        batch: the full micro-batch (labels shifted inside each sequence: ``data.packing``).
        cp, cp_rank: context-parallel size and this rank.
        align: pad each sequence to a multiple of this (default ``2 * cp``; ``2 * cp * tp`` under
            sequence parallelism).

    Returns:
        CPMicroBatch; padding tokens have token id 0, label 0 and loss mask 0.
    """
    layout = layout_from_cu_seqlens(batch.cu_seqlens, cp, cp_rank, align=align)
    return CPMicroBatch(full=batch, layout=layout, tokens=layout.shard(batch.tokens), labels=layout.shard(batch.labels),
                        loss_mask=layout.shard(batch.loss_mask),
                        per_token={k: layout.shard(v) for k, v in batch.per_token.items()})


class _GatherOverCP(torch.autograd.Function):
    """Concatenate every CP rank's tensor along dim 0 (rank order); backward: summed grad, own slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group), 0)[dist.get_rank(ctx.group)], None


class AllGatherCPAttention(torch.nn.Module):
    """Core attention of the local spec under context parallelism (same constructor as upstream's).

    A plain ``torch.nn.Module`` (it has no parameters; Megatron's default sharded state dict
    handles it), so importing this module does not import megatron.

    Expects THD inputs (``PackedSeqParams`` with ``cu_seqlens_q_padded``): query ``[t, np, hn]``,
    key / value ``[t, ng, hn]`` of this rank's tokens; returns ``[t, np * hn]``.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__()
        from megatron.core.process_groups_config import ProcessGroupCollection

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = pg_collection.cp
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention dropout {dropout} is not supported by the CP attention of the local spec "
                             "(RL training uses 0); use the Transformer Engine spec")
        if config.window_size is not None or config.apply_query_key_layer_scaling:
            raise ValueError("sliding-window attention / query-key layer scaling need the Transformer Engine spec under CP")
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            raise ValueError("AllGatherCPAttention needs packed THD inputs (PackedSeqParams with qkv_format='thd')")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by AllGatherCPAttention")
        padded = packed_seq_params.cu_seqlens_q_padded
        padded = packed_seq_params.cu_seqlens_q if padded is None else padded
        real = packed_seq_params.cu_seqlens_q
        cp, rank = dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
        allowed = _global_causal_mask(padded, real, cp, rank, query.device)
        keys = _GatherOverCP.apply(key, self.cp_group)
        values = _GatherOverCP.apply(value, self.cp_group)
        groups = query.shape[1] // keys.shape[1]
        if groups > 1:
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        compute = torch.promote_types(query.dtype, torch.float32)
        scores = torch.einsum("qhd,khd->hqk", query.to(compute), keys.to(compute)) * self.softmax_scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key (cannot occur for real tokens)
        out = torch.einsum("hqk,khd->qhd", probs, values.to(compute)).to(query.dtype)
        return out.reshape(out.shape[0], -1)


_LAST_MASK: list = []  # [(padded_cu, real_cu, cp, rank, device), mask]: every layer of a micro-batch reuses it


def _global_causal_mask(padded_cu: torch.Tensor, real_cu: torch.Tensor, cp: int, rank: int, device) -> torch.Tensor:
    """``[t_local, cp * t_local]`` bool: may this rank's query attend to each gathered key (rank-major)?

    Built once per micro-batch: the layers (and recomputation) of one forward see the same
    ``PackedSeqParams`` tensors, recognised by identity (the cache holds them, so an id is never reused).
    """
    if _LAST_MASK:
        (p, r, c, k, d), mask = _LAST_MASK
        if p is padded_cu and r is real_cu and (c, k, d) == (cp, rank, device):
            return mask
    mask = _causal_mask(padded_cu, real_cu, cp, rank).to(device)
    _LAST_MASK[:] = [(padded_cu, real_cu, cp, rank, device), mask]
    return mask


def _causal_mask(padded_cu: torch.Tensor, real_cu: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    real_lengths = (real_cu[1:] - real_cu[:-1]).to(torch.int64).cpu()
    q_seq, q_pos = local_token_coordinates(padded_cu, cp, rank)
    coords = [local_token_coordinates(padded_cu, cp, r) for r in range(cp)]
    k_seq = torch.cat([c[0] for c in coords])
    k_pos = torch.cat([c[1] for c in coords])
    k_real = k_pos < real_lengths[k_seq]
    return (q_seq.unsqueeze(1) == k_seq.unsqueeze(0)) & (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)) & k_real.unsqueeze(0)


def with_cp_attention(spec):
    """A copy of a local-spec ``ModuleSpec`` whose self-attention uses ``AllGatherCPAttention``."""
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = AllGatherCPAttention
    return spec
