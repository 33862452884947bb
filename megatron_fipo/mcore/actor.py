"""The FIPO actor on Megatron-Core: log-probs of rollouts and FIPO optimizer steps.

Owns ``ActorSettings`` and ``Actor``: the Qwen2 model chunks of this rank wrapped in Megatron
``DistributedDataParallel``, ``get_megatron_optimizer`` (AdamW; the distributed optimizer on GPU)
with warm-up + constant lr through ``OptimizerParamScheduler``, forward-only per-token log-probs,
and ``train_step`` through ``get_forward_backward_func`` (no pipelining, 1F1B, interleaved) with
packed (THD) micro-batches planned by a token budget.

Only megatron_fipo.mcore imports megatron. Must not import trainer, rollout or bridge.

Loss normalisation: ``calculate_per_token_loss`` is on, so each micro-batch returns the *sum* of
its per-token FIPO losses and its kept-token count; Megatron's ``finalize_model_grads`` then
divides the accumulated gradients by the kept tokens summed over micro-batches, the pipeline's
last stage and the data(-context)-parallel group. The update is therefore the token-mean over the
global mini-batch, whatever the micro-batch split and the dp size.

Departs from upstream GPTModel usage: the output layer is bypassed (its forward returns the final
hidden states) and the log-probs are computed vocab-parallel, chunk by chunk over tokens, from its
weight (``parallel.vocab_parallel``), so full-vocabulary fp32 logits of a whole packed batch never
exist. The parameter names stay upstream's. Attention for packed sequences: TE's THD path
(``PackedSeqParams``) on GPU; on the local spec (CPU) an explicit block-diagonal causal mask (RoPE
is relative, so the global positions it uses give the same attention as per-sequence ones).

Context parallelism (``mcore.context_parallel``): each micro-batch is cut with Megatron's
load-balanced THD layout after packing (labels are shifted on the full sequences, so no chunk
boundary is wrong); every CP rank computes log-probs and the FIPO loss of its own tokens only
(``parallel.cp_loss``: Future-KL by the distributed scan, drop counts all-reduced over CP), and the
kept-token denominator is summed over data x context parallel by ``finalize_model_grads``.
``prepare`` packs and cuts a mini-batch once (``mcore.micro_batches``) and keeps its old log-probs
on the CP-local tokens the update reads; only ``compute_logprobs`` (evaluation, verification)
all-gathers per-token results over CP, since it returns whole samples.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_fipo.algo.losses import (CORRECTION_MAX_KEYS, CORRECTION_SUM_KEYS, MAX_KEYS, MIN_KEYS, SUM_KEYS,
                                       fipo_policy_loss, summarize_policy_metrics)
from megatron_fipo.config.conventions import DTYPE_NAMES, PARAMS_DTYPES, OptimConfig, torch_dtype
from megatron_fipo.data.batches import MiniBatch
from megatron_fipo.mcore import model as qwen2
from megatron_fipo.mcore.actor_checkpoints import CheckpointMethods
from megatron_fipo.mcore.context_parallel import CPMicroBatch
from megatron_fipo.mcore.micro_batches import PreparedMiniBatch, RankMicroBatch, merge_outputs, plan
from megatron_fipo.mcore.micro_batches import device as _device
from megatron_fipo.mcore.update_guard import guarded_step, nonfinite_tensors
from megatron_fipo.parallel.cp_loss import cp_policy_loss
from megatron_fipo.parallel.metrics import reduce_metrics
from megatron_fipo.parallel.vocab_parallel import chunked_token_logprobs

EXTRA_SUM_KEYS = ("entropy", "loss_sum")


def _unwrap(chunk):
    """The ``GPTModel`` of a chunk (DDP-wrapped when the actor is trainable)."""
    return getattr(chunk, "module", chunk)


@dataclass(frozen=True)
class ActorSettings(OptimConfig):
    """The config's ``optim`` settings (inherited: one definition, one set of defaults) plus the
    actor's precision, parallelism and model options. A run builds it with ``from_sections``."""

    params_dtype: str = "float32"  # "bfloat16" on GPU
    sequence_parallel: bool = False
    use_distributed_optimizer: Optional[bool] = None  # default: on with CUDA or bf16 parameters
    recompute: Mapping[str, Any] = field(default_factory=dict)
    transformer_overrides: Mapping[str, Any] = field(default_factory=dict)
    track_update_norm: bool = False  # keeps a copy of the local parameters during the step

    @classmethod
    def from_sections(cls, optim, model, parallel) -> "ActorSettings":
        """From a run config's ``optim``, ``model`` and ``parallel`` sections. ``optim`` is read by field
        name, so a config field the actor has no use for is left out instead of failing the run."""
        picked = {f.name: getattr(optim, f.name) for f in dataclasses.fields(OptimConfig)}
        return cls(**picked, params_dtype=model.params_dtype, sequence_parallel=parallel.sequence_parallel,
                   recompute=dict(model.recompute), transformer_overrides=dict(model.transformer_overrides))


class Actor(CheckpointMethods):
    """Qwen2 policy of this rank: forward-only log-probs and FIPO optimizer steps.

    Args:
        arch: the model architecture (``model.Qwen2Arch``).
        groups: ``ParallelGroups`` of this process (from ``groups.init_distributed``).
        settings: ``ActorSettings``.
        use_te: force the Transformer Engine (True) or local (False) spec; default: TE if usable.
        trainable: False builds the model chunks only, for weights that are loaded next (a
            conversion, a verification): no DDP wrapper, gradient buffers, optimizer or scheduler
            (``optimizer`` / ``scheduler`` are None, ``train_step`` is unusable), no random
            initialisation, and ``params_dtype`` may be any of ``DTYPE_NAMES``.
    """

    def __init__(self, arch: qwen2.Qwen2Arch, groups, settings: ActorSettings = ActorSettings(),
                 *, use_te: Optional[bool] = None, trainable: bool = True):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.arch, self.groups, self.settings = arch, groups, settings
        if settings.params_dtype not in (PARAMS_DTYPES if trainable else DTYPE_NAMES):
            raise ValueError(f"params_dtype must be one of {PARAMS_DTYPES}, got {settings.params_dtype!r}")
        dtype = torch_dtype(settings.params_dtype)
        # Weights that are loaded next need no random initialisation (on CPU it builds every full
        # weight in float32 first: 4 bytes per parameter of the whole layer, whatever the tp).
        init = {} if trainable else {"perform_initialization": False}
        self.config = qwen2.transformer_config(
            arch, tp=groups.tp_size, pp=groups.pp_size, vpp=groups.vpp_size, cp=groups.cp_size,
            sequence_parallel=settings.sequence_parallel, params_dtype=dtype, recompute=settings.recompute,
            overrides={"calculate_per_token_loss": True, **init, **settings.transformer_overrides})
        self.config.finalize_model_grads_func = finalize_model_grads
        self.use_te = qwen2.use_transformer_engine() if use_te is None else use_te
        chunks = qwen2.build_model_chunks(self.config, arch, groups, use_te=self.use_te)
        for chunk in chunks:
            if chunk.post_process:
                chunk.output_layer.forward = types.MethodType(qwen2.hidden_passthrough, chunk.output_layer)
        self.padded_vocab = qwen2.padded_vocab_size(arch.vocab_size, groups.tp_size)
        self.steps = 0
        if not trainable:
            self.chunks, self.optimizer, self.scheduler = chunks, None, None
            return
        # Default: on with CUDA, and for bf16 on CPU too (Megatron's non-distributed mixed-precision optimizer
        # accepts only CUDA tensors; the distributed one runs there through cpu_compat, same update at any dp).
        distributed = (torch.cuda.is_available() or dtype == torch.bfloat16) \
            if settings.use_distributed_optimizer is None else settings.use_distributed_optimizer
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed)
        # Upstream DDP / schedules read parallel_state (set up by groups.init_distributed) themselves:
        # their pg_collection argument wants expert-parallel groups a dense model does not have.
        self.chunks = [DistributedDataParallel(self.config, ddp_config, c) for c in chunks]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=settings.lr, min_lr=settings.lr, weight_decay=settings.weight_decay,
                            adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2,
                            adam_eps=settings.adam_eps, clip_grad=settings.clip_grad,
                            bf16=dtype == torch.bfloat16, params_dtype=dtype,
                            use_distributed_optimizer=distributed),
            self.chunks)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=settings.lr, min_lr=settings.lr,
            lr_warmup_steps=settings.warmup_steps, lr_decay_steps=settings.warmup_steps + 1,
            lr_decay_style="constant", start_wd=settings.weight_decay, end_wd=settings.weight_decay,
            wd_incr_steps=1, wd_incr_style="constant")

    # ------------------------------------------------------------------ public API
    def compute_logprobs(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                         *, with_entropy: bool = False) -> List[torch.Tensor] | tuple:
        """Per-response-token log-probs of the sampled tokens (forward only), on every rank.

        For evaluation and verification (whole samples, gathered over CP); training uses ``prepare``.

        Args:
            prompts, responses: token ids per sample (this data-parallel rank's samples).
            with_entropy: also return the per-token entropies.

        Returns:
            ``[tensor of len(response_i)]`` float32 (and the entropies when asked), identical on
            all ranks of this pipeline / tensor group.
        """
        mbs = self._plan(prompts, responses, torch.zeros(len(prompts)))
        outputs = self._forward_only(mbs)
        lengths = [len(r) for r in responses]
        logp, ent = [torch.zeros(0)] * len(prompts), [torch.zeros(0)] * len(prompts)
        if self.groups.is_last_stage:
            for mb, out in zip(mbs, outputs):
                lp, en = out["logp"], out["entropy"]
                if isinstance(mb.view, CPMicroBatch):  # whole samples: every CP rank's tokens
                    lp, en = mb.view.gather(lp, self.groups.cp), mb.view.gather(en, self.groups.cp)
                for i, a, b in zip(mb.full.sample_index, mb.full.response_values(lp.cpu()),
                                   mb.full.response_values(en.cpu())):
                    logp[i], ent[i] = a, b
        flat = self._from_last_stage(torch.cat([torch.cat(logp), torch.cat(ent)]) if self.groups.is_last_stage
                                     else None, 2 * sum(lengths))
        logp = list(torch.split(flat[:sum(lengths)], lengths))
        return (logp, list(torch.split(flat[sum(lengths):], lengths))) if with_entropy else logp

    def prepare(self, mini_batch: MiniBatch, *, old_logp: Optional[Sequence[torch.Tensor]] = None) -> PreparedMiniBatch:
        """Pack a mini-batch for this rank once and compute its old log-probs on that packing (forward only).

        Call it for every mini-batch of a step before the step's first ``train_step``: the old
        log-probs must come from the pre-update policy. They stay on this rank's (CP-local) tokens;
        the trainer-vs-rollout mismatch is summed over the same tokens (``micro_batches.reduce_mismatch``),
        and the rollout log-probs are kept beside them for the loss's rollout correction.

        Args:
            mini_batch: this data-parallel rank's samples of one mini-batch.
            old_logp: per-response-token log-probs to use instead of computing them (tests, a
                reference policy): placed on the same packing.
        """
        mbs = self._plan(mini_batch.prompts, mini_batch.responses, mini_batch.advantages)
        last = self.groups.is_last_stage
        if old_logp is None:
            local = [out["logp"].cpu() for out in self._forward_only(mbs)]
        else:
            local = [mb.local(mb.full.place([old_logp[i] for i in mb.full.sample_index])) for mb in mbs] if last else []
        prepared = PreparedMiniBatch(mbs)
        for mb, lp in zip(mbs, local):
            prepared.keep_old_logp(mb, lp, mb.local(mb.full.place([mini_batch.rollout_logp[i]
                                                                   for i in mb.full.sample_index])))
        return prepared

    def train_step(self, prepared: PreparedMiniBatch, loss_kwargs: Mapping[str, Any]) -> Dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch (``prepare``d: packing and old log-probs).

        Args:
            prepared: from ``prepare``, before any update of this step.
            loss_kwargs: keyword arguments of ``algo.losses.fipo_policy_loss`` (decay_rate, ...;
                ``Config.loss_kwargs()``). With a ``rollout_correction`` other than ``"none"`` the
                loss also gets the rollout log-probs ``prepare`` kept.

        Returns:
            Metrics of the whole mini-batch (reduced over pipeline and data-parallel ranks):
            policy-loss summaries (the rollout correction's only when it is on), ``loss`` (token-mean),
            ``entropy``, ``grad_norm``, ``lr``, ``update_norm`` (when tracked), ``micro_batches``,
            ``skipped`` (1.0 if no update was kept) and why: ``nonfinite_loss``, ``nonfinite_grad``
            (not applied), ``nonfinite_update`` (rolled back).
            A skipped step leaves parameters, optimizer state, lr schedule and ``steps`` as they were.
        """
        batches = prepared.micro_batches
        if self.groups.is_last_stage and any(mb.old_logp is None for mb in batches):
            raise ValueError("train_step needs a mini-batch from Actor.prepare (old log-probs missing)")
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        before = self._local_params() if self.settings.track_update_norm else None
        outputs = self._run_schedule(batches, mode="train", forward_only=False, loss_kwargs=dict(loss_kwargs))
        correcting = loss_kwargs.get("rollout_correction", "none") != "none"  # the same on every rank
        policy_sums = SUM_KEYS + (CORRECTION_SUM_KEYS if correcting else ())
        sums, maxes, mins = merge_outputs(outputs)
        sums, maxes, mins = reduce_metrics(
            sums, maxes, mins, sum_keys=policy_sums + EXTRA_SUM_KEYS,
            max_keys=MAX_KEYS + (CORRECTION_MAX_KEYS if correcting else ()), min_keys=MIN_KEYS,
            groups=(self.groups.pp, self.groups.dp_cp), device=_device())
        finite = torch.isfinite(torch.tensor([sums["loss_sum"], sums["entropy"]])).all().item()
        metrics = summarize_policy_metrics({k: sums[k] for k in policy_sums}, maxes, mins)
        tokens = max(sums["response_tokens"], 1.0)
        metrics.update(loss=sums["loss_sum"] / max(sums["kept_tokens"], 1.0), entropy=sums["entropy"] / tokens,
                       micro_batches=float(len(batches)), lr=float(self.optimizer.param_groups[0]["lr"]))
        metrics.update(nonfinite_loss=float(not finite), nonfinite_grad=0.0, nonfinite_update=0.0)
        if not finite:  # NaN / inf: drop the gradients, keep the weights
            self.optimizer.zero_grad()
            metrics.update(grad_norm=float("nan"), skipped=1.0)
            return self._untouched(metrics, before)
        # a non-finite gradient is not applied, a non-finite update is rolled back (mcore.update_guard)
        out = guarded_step(self.optimizer, [p for _, p in self.named_local_parameters()], self.groups, _device())
        metrics.update(grad_norm=out.grad_norm, nonfinite_grad=float(out.nonfinite_grad),
                       nonfinite_update=float(out.rolled_back))
        if out.nonfinite_grad or out.rolled_back:  # as if the step never ran: no lr schedule step either
            metrics["skipped"] = 1.0
            return self._untouched(metrics, before)
        self.scheduler.step(1)
        self.steps += 1
        metrics["skipped"] = 0.0 if out.stepped else 1.0
        if before is not None:
            metrics["update_norm"] = self._update_norm(before)
        return metrics

    def nonfinite_tensors(self, *, optimizer_state: bool = False) -> List[str]:
        """Names of this rank's non-finite parameters (and optimizer state); local, no collective."""
        return nonfinite_tensors(self.named_local_parameters(), self.optimizer, optimizer_state=optimizer_state)

    def bridge_layout(self) -> Tuple[List[int], str]:
        """What the HF bridge needs to name this rank's parameters: the global index of each local
        chunk's first layer (``layer_offsets``) and the layer spec's naming (``"te"`` or ``"mcore"``)."""
        offsets = [_unwrap(c).decoder.layers[0].layer_number - 1 for c in self.chunks]
        return offsets, "te" if self.use_te else "mcore"

    def named_local_parameters(self):
        """``(name, parameter)`` of this rank's model chunks (chunk index prefixed with vpp)."""
        for i, chunk in enumerate(self.chunks):
            prefix = f"chunk{i}." if len(self.chunks) > 1 else ""
            for name, p in _unwrap(chunk).named_parameters():
                yield prefix + name, p

    # ------------------------------------------------------------------ internals
    def _plan(self, prompts, responses, advantages) -> List[RankMicroBatch]:
        return plan(prompts, responses, advantages, groups=self.groups,
                    max_tokens=self.settings.max_tokens_per_micro_batch,
                    sequence_parallel=self.settings.sequence_parallel)

    def _forward_only(self, batches: List[RankMicroBatch]) -> list:
        """Local log-probs and entropies of each micro-batch (last pipeline stage; [] elsewhere)."""
        for chunk in self.chunks:
            chunk.eval()
        with torch.no_grad():
            outputs = self._run_schedule(batches, mode="logprob", forward_only=True)
        for chunk in self.chunks:
            chunk.train()
        return outputs

    def _run_schedule(self, batches, *, mode, forward_only, loss_kwargs=None):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        fb = get_forward_backward_func(pp_size=self.groups.pp_size, vp_size=self.groups.vpp_size)
        iterators = [iter(batches) for _ in self.chunks]
        step = functools.partial(self._forward_step, mode=mode, loss_kwargs=loss_kwargs or {})
        return fb(forward_step_func=step, data_iterator=iterators if len(self.chunks) > 1 else iterators[0],
                  model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                  num_microbatches=len(batches), seq_length=max(b.full.num_tokens for b in batches) + self._pad_multiple(),
                  micro_batch_size=1, forward_only=forward_only)

    def _pad_multiple(self) -> int:
        return self.groups.tp_size if self.settings.sequence_parallel else 1

    def _forward_step(self, data_iterator, model, *, mode, loss_kwargs):
        batch: RankMicroBatch = next(data_iterator)
        tokens, positions, mask, packed = batch.model_inputs(_device(), pad_multiple=self._pad_multiple(),
                                                             use_te=self.use_te)
        output = model(tokens, positions, mask, packed_seq_params=packed)
        return output, functools.partial(self._loss, batch, model, mode, loss_kwargs)

    def _loss(self, micro: RankMicroBatch, model, mode, loss_kwargs, output):
        """Log-probs (and the FIPO loss) of a micro-batch, or of this CP rank's share of one."""
        batch = micro.view
        module = getattr(model, "module", model)
        hidden = output[0, :batch.num_tokens]
        weight = module.shared_embedding_or_output_weight() if module.share_embeddings_and_output_weights \
            else module.output_layer.weight
        dev = hidden.device
        labels, mask = batch.labels.to(dev), batch.loss_mask.to(dev)
        logp, entropy = chunked_token_logprobs(
            hidden, weight, labels, vocab_start=self.groups.tp_rank * weight.shape[0], vocab_size=self.arch.vocab_size,
            group=self.groups.tp, chunk_tokens=self.settings.logprob_chunk_tokens, with_entropy=True,
            reduce_hidden_grad=not self.config.sequence_parallel)
        zero_tokens = torch.zeros((), dtype=torch.int, device=dev)
        if mode == "logprob":  # this rank's tokens only: prepare keeps them there
            logp, entropy = logp.detach(), entropy.detach()
            return logp.sum() * 0.0, zero_tokens, {"logp": logp, "entropy": entropy}
        # advantages: one per sequence, broadcast over its tokens by the loss's sequence index
        old_logp, advantages = micro.old_logp.to(dev), micro.advantages.to(dev)
        if loss_kwargs.get("rollout_correction", "none") != "none":  # pi_old / pi_rollout, a detached factor
            loss_kwargs = dict(loss_kwargs, rollout_logp=micro.rollout_logp.to(dev))
        if isinstance(batch, CPMicroBatch):
            out = cp_policy_loss(logp, old_logp, advantages, mask, layout=batch.layout, group=self.groups.cp,
                                 **loss_kwargs)
        else:
            out = fipo_policy_loss(logp, old_logp, advantages, mask, cu_seqlens=batch.cu_seqlens.to(dev), **loss_kwargs)
        loss_sum = out.per_token_loss.sum()
        sums = dict(out.sums, entropy=(entropy * mask).sum(dtype=torch.float64), loss_sum=loss_sum.detach().double())
        return loss_sum, out.sums["kept_tokens"].to(torch.int), {"sums": sums, "maxes": out.maxes, "mins": out.mins}

    def _from_last_stage(self, flat: Optional[torch.Tensor], numel: int) -> torch.Tensor:
        """Broadcast a float32 vector from the pipeline's last stage to its other stages."""
        if self.groups.pp_size == 1:
            return flat
        buf = flat.to(_device()) if flat is not None else torch.zeros(numel, dtype=torch.float32, device=_device())
        dist.broadcast(buf, src=self.groups.pp_global_ranks[-1], group=self.groups.pp)
        return buf.cpu()

    @staticmethod
    def _untouched(metrics: dict, before) -> dict:
        if before is not None:  # same keys in every mini-batch's metrics
            metrics["update_norm"] = 0.0
        return metrics

    def _local_params(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach().float().clone() for n, p in self.named_local_parameters()}

    def _update_norm(self, before: Dict[str, torch.Tensor]) -> float:
        """L2 norm of the parameter update over the whole model (TP-duplicated params counted once)."""
        total = torch.zeros((), dtype=torch.float64)
        for name, p in self.named_local_parameters():
            duplicated = not getattr(p, "tensor_model_parallel", False) and self.groups.tp_rank > 0
            # tied embeddings with pp > 1: the last stage holds a synchronised copy of the embedding
            duplicated |= name.endswith("output_layer.weight") and self.arch.tie_word_embeddings
            if not duplicated:
                total += (p.detach().float() - before[name]).double().pow(2).sum().cpu()
        total = total.to(_device())
        for group in (self.groups.tp, self.groups.pp):
            dist.all_reduce(total, group=group)
        return float(total.sqrt())
