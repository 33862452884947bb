"""A mini-batch as one rank runs it: packed once, cut for context parallelism once, reused by every pass.

Owns ``RankMicroBatch`` (one packed micro-batch as this rank feeds it to the model: the whole
micro-batch, or its CP-local share, with one advantage per sequence and, once prepared, the old
and rollout log-probs of this rank's tokens), ``PreparedMiniBatch`` (a mini-batch's micro-batches with its
old log-probs and trainer-vs-rollout mismatch sums), ``plan`` (samples -> micro-batches under the
token budget, the count agreed over the pipeline; sequences padded by ``conventions.cp_alignment``).

The old log-probs are computed on exactly the micro-batches and CP-local layout of the update
that consumes them and stay there: no gather over CP, no unpacking into samples, no second plan.

Only megatron_fipo.mcore imports megatron (not this module). Collectives take explicit groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_fipo.algo.mismatch import MAX_KEYS as MISMATCH_MAX_KEYS
from megatron_fipo.algo.mismatch import logprob_mismatch_sums
from megatron_fipo.config.conventions import cp_alignment
from megatron_fipo.data.packing import PackedBatch, pack_samples, plan_micro_batches
from megatron_fipo.mcore.context_parallel import CPMicroBatch, shard_micro_batch
from megatron_fipo.mcore.update_guard import agree_any


@dataclass
class RankMicroBatch:
    """One packed micro-batch as this rank runs it."""

    view: PackedBatch | CPMicroBatch
    """What this rank feeds the model: the packed micro-batch, or its CP-local share (``view.full``)."""
    advantages: torch.Tensor
    """``[S]`` float32, one per packed sequence (packing order); the loss broadcasts it over tokens."""
    old_logp: Optional[torch.Tensor] = None
    """``[view.num_tokens]`` float32 log-probs of this rank's tokens under the pre-update policy
    (label positions; set by ``Actor.prepare`` on the pipeline's last stage, None elsewhere)."""
    rollout_logp: Optional[torch.Tensor] = None
    """``[view.num_tokens]`` float32 log-probs of this rank's tokens under the rollout engine (zero
    outside the response; set with ``old_logp``): the rollout correction's ``pi_rollout``."""

    @property
    def full(self) -> PackedBatch:
        """The whole packed micro-batch (all CP ranks' tokens)."""
        return self.view.full if isinstance(self.view, CPMicroBatch) else self.view

    def model_inputs(self, dev: torch.device, *, pad_multiple: int, use_te: bool):
        """``(tokens [1, n], position_ids [1, n], attention mask or None, PackedSeqParams or None)`` for GPTModel.

        Under CP: the layout's THD inputs. Otherwise the packed tokens padded to ``pad_multiple``
        (sequence parallelism splits them over TP), with TE's THD params, or on the local spec an
        explicit block-diagonal causal mask.
        """
        if isinstance(self.view, CPMicroBatch):  # this CP rank's share: Megatron's load-balanced THD layout
            return self.view.model_inputs(dev)
        batch = self.view
        n, pad = batch.num_tokens, (-batch.num_tokens) % pad_multiple
        tokens = torch.nn.functional.pad(batch.tokens, (0, pad)).unsqueeze(0).to(dev)
        positions = torch.cat([batch.position_ids, torch.arange(pad)]).unsqueeze(0).to(dev)
        cu = batch.cu_seqlens.to(torch.int64)
        if pad:
            cu = torch.cat([cu, torch.tensor([n + pad])])
        if use_te:
            from megatron.core.packed_seq_params import PackedSeqParams

            cu32 = cu.to(device=dev, dtype=torch.int32)
            longest = int((cu[1:] - cu[:-1]).max())
            return tokens, positions, None, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu32, cu_seqlens_kv=cu32,
                                                            max_seqlen_q=longest, max_seqlen_kv=longest)
        seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])
        idx = torch.arange(n + pad)
        masked = (seg.unsqueeze(0) != seg.unsqueeze(1)) | (idx.unsqueeze(0) > idx.unsqueeze(1))
        return tokens, positions, masked.view(1, 1, n + pad, n + pad).to(dev), None

    def local(self, full_values: torch.Tensor) -> torch.Tensor:
        """``[N]`` per-position values of the whole micro-batch -> this rank's ``[view.num_tokens]``."""
        return self.view.layout.shard(full_values) if isinstance(self.view, CPMicroBatch) else full_values


@dataclass
class PreparedMiniBatch:
    """A mini-batch packed for this rank, with the old log-probs its update needs."""

    micro_batches: List[RankMicroBatch]
    """The plan shared by the old-log-prob pass and the update."""
    mismatch: Dict[str, torch.Tensor] = field(default_factory=dict)
    """This rank's ``algo.mismatch.logprob_mismatch_sums`` over its local response tokens (last
    pipeline stage; empty elsewhere): reduce over pipeline and data x context parallel ranks."""
    finite: bool = True
    """Whether this rank's old log-probs are all finite (agree over ranks before using them)."""

    def keep_old_logp(self, micro: RankMicroBatch, old_logp: torch.Tensor, rollout_logp: torch.Tensor) -> None:
        """Store a micro-batch's local old and rollout log-probs; add its mismatch sums and finiteness (response tokens)."""
        micro.old_logp, micro.rollout_logp = old_logp, rollout_logp
        mask = micro.view.loss_mask.bool()
        self.finite &= bool(torch.isfinite(old_logp[mask]).all())
        for key, value in logprob_mismatch_sums(old_logp, rollout_logp, mask).items():
            if key in self.mismatch:
                value = torch.maximum(self.mismatch[key], value) if key in MISMATCH_MAX_KEYS \
                    else self.mismatch[key] + value
            self.mismatch[key] = value


def plan(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], advantages: torch.Tensor, *,
         groups, max_tokens: int, sequence_parallel: bool) -> List[RankMicroBatch]:
    """Samples -> this rank's micro-batches under ``max_tokens`` (counting each sequence's CP padding).

    Every stage of a pipeline runs the same number of micro-batches (a MAX over ``groups.pp``), a
    multiple of ``pp`` under interleaving (filled with one-token micro-batches that learn nothing).
    """
    if len(prompts) != len(responses) or tuple(advantages.shape) != (len(prompts),):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses, advantages {tuple(advantages.shape)}")
    align = cp_alignment(groups.cp_size, groups.tp_size, sequence_parallel)
    lengths = [-(-(len(p) + len(r)) // align) * align for p, r in zip(prompts, responses)]
    count = torch.tensor([len(plan_micro_batches(lengths, max_tokens))])
    if groups.pp_size > 1:  # every stage of a pipeline must run the same micro-batches
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=groups.pp)
    count = int(count)
    if groups.vpp_size:  # interleaved 1F1B runs micro-batches in groups of pp
        count = -(-count // groups.pp_size) * groups.pp_size
    out = []
    for idx in plan_micro_batches(lengths, max_tokens, num_micro_batches=count):
        batch = pack_samples(prompts, responses, indices=idx) if idx else _filler_batch()
        view = shard_micro_batch(batch, groups.cp_size, groups.cp_rank, align=align) if groups.cp_size > 1 else batch
        adv = advantages[idx].float() if idx else torch.zeros(1)
        out.append(RankMicroBatch(view, adv))
    return out


def _filler_batch() -> PackedBatch:
    """A one-token micro-batch with nothing to learn (pads the count for interleaved pipelines)."""
    batch = pack_samples([[0]], [[]])
    batch.sample_index = []
    return batch


def all_finite(prepared: Sequence[PreparedMiniBatch], groups) -> bool:
    """Whether every rank's old log-probs are finite (``update_guard.agree_any`` over all ranks)."""
    return not agree_any([not all(p.finite for p in prepared)], groups, device())[0]


def reduce_mismatch(prepared: Sequence[PreparedMiniBatch], groups) -> Dict[str, float]:
    """The step's trainer-vs-rollout mismatch metrics (``algo.mismatch``) from every rank's local sums.

    Each token is counted once: on the last pipeline stage (the others add nothing), on the CP
    rank that owns it, and the tensor-parallel ranks (which hold the same values) are not summed.
    """
    from megatron_fipo.algo.mismatch import MAX_KEYS, SUM_KEYS, summarize_mismatch
    from megatron_fipo.parallel.metrics import reduce_metrics

    local = [p.mismatch for p in prepared if p.mismatch]
    sums = {k: sum(float(m[k]) for m in local) for k in SUM_KEYS} if local else {}
    maxes = {k: max(float(m[k]) for m in local) for k in MAX_KEYS} if local else {}
    sums, maxes, _ = reduce_metrics(sums, maxes, {}, sum_keys=SUM_KEYS, max_keys=MAX_KEYS, min_keys=(),
                                    groups=(groups.pp, groups.dp_cp), device=device())
    if not sums["tokens"]:  # nothing to compare (an empty step): the reduction's neutral max is -inf
        maxes = {k: 0.0 for k in MAX_KEYS}
    return summarize_mismatch({**sums, **maxes})


def merge_outputs(outputs) -> tuple:
    """Per-micro-batch loss outputs (``sums`` / ``maxes`` / ``mins``) -> this rank's totals / extremes."""
    sums: Dict[str, torch.Tensor] = {}
    maxes: Dict[str, torch.Tensor] = {}
    mins: Dict[str, torch.Tensor] = {}
    for out in outputs:
        for k, v in out["sums"].items():
            sums[k] = sums.get(k, 0.0) + float(v)
        for k, v in out["maxes"].items():
            maxes[k] = max(maxes.get(k, float("-inf")), float(v))
        for k, v in out["mins"].items():
            mins[k] = min(mins.get(k, float("inf")), float(v))
    return sums, maxes, mins


def device() -> torch.device:
    """Where this process's collective buffers and model inputs live."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
