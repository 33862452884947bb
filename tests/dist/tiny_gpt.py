"""A tiny Qwen2-shaped megatron-core GPTModel for multi-process CPU tests.

Builders only (no assertions): the config, the model chunks of this rank, a schedule run that
returns per-micro-batch loss sums, and the copy of a single-process (tp=pp=1) model's weights
into any (tp, pp, vpp) layout. Weight identity across layouts is achieved by copying, not by
seeding: the reference model is built once at (1, 1) and its full tensors are sliced into the
sharded model (fused QKV is grouped by query group, so a plain split along dim 0 is the TP shard;
SwiGLU's fused fc1 is [gate; up] and each half is split separately; pipeline stages are mapped by
each layer's global ``layer_number``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

VOCAB, HIDDEN, HEADS, GROUPS, FFN, MAX_LEN = 128, 64, 4, 2, 128, 64


def tiny_config(groups, num_layers=4, sequence_parallel=False, variable_seq_lengths=False):
    """TransformerConfig of the tiny model for the layout in ``groups`` (fp32, no dropout)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=HEADS,
        num_query_groups=GROUPS, ffn_hidden_size=FFN, kv_channels=HIDDEN // HEADS,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=1e-6, add_qkv_bias=True, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=groups.tp_size, pipeline_model_parallel_size=groups.pp_size,
        virtual_pipeline_model_parallel_size=groups.vpp_size,
        context_parallel_size=groups.cp_size, sequence_parallel=sequence_parallel,
        params_dtype=torch.float32, pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        # Fusions are CUDA kernels or torch.compile paths; off on CPU.
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False,
        # Config validation requires the alltoall dispatcher for variable lengths, even dense.
        variable_seq_lengths=variable_seq_lengths,
        moe_token_dispatcher_type="alltoall",
    )


def build_chunks(config, groups, seed=0, tied=False):
    """The GPTModel chunks of this rank (one per virtual stage), initialised from ``seed``.

    ``tied`` shares the input embedding with the output layer (Qwen2.5 0.5B-3B do).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(seed)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    stages = groups.vpp_size or 1
    chunks = []
    for stage in range(stages):
        chunks.append(GPTModel(
            config, spec, vocab_size=VOCAB, max_sequence_length=MAX_LEN,
            pre_process=groups.is_first_stage and stage == 0,
            post_process=groups.is_last_stage and stage == stages - 1,
            share_embeddings_and_output_weights=tied, position_embedding_type="rope",
            rotary_base=10000, vp_stage=stage if groups.vpp_size else None,
        ))
    return chunks


def make_batches(lengths, micro_batch_size=2, seed=123):
    """One micro-batch of random tokens/labels per entry of ``lengths`` (same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {"tokens": torch.randint(0, VOCAB, (micro_batch_size, s), generator=gen),
         "labels": torch.randint(0, VOCAB, (micro_batch_size, s), generator=gen)}
        for s in lengths
    ]


def _loss_func(mask, output_tensor):
    loss = (output_tensor.float() * mask).sum()
    tokens = mask.sum()
    return loss, tokens.to(torch.int), {"lm loss": torch.stack([loss.detach(), tokens.detach()])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    b, s = batch["tokens"].shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    output = model(batch["tokens"], position_ids, None, labels=batch["labels"])
    return output, functools.partial(_loss_func, torch.ones(b, s))


def run_schedule(chunks, batches, forward_only=False):
    """Forward(+backward) ``batches`` through ``get_forward_backward_func``.

    Returns:
        list of per-micro-batch mean token losses (float) on the last stage, [] elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    lengths = {b["tokens"].shape[1] for b in batches}
    iters = [iter(batches) for _ in chunks]
    out = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=max(lengths),
        micro_batch_size=batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )
    return [float(d["lm loss"][0] / d["lm loss"][1]) for d in out]


def full_weights(chunks):
    """Detached copies of a (tp=1, pp=1) model's parameters, keyed by name."""
    (model,) = chunks
    return {name: p.detach().clone() for name, p in _unwrap(model).named_parameters()}


def _unwrap(model):
    return getattr(model, "module", model)


def _global_name(model, name):
    """Map a local parameter name to the (1, 1) model's name (global layer index).

    With tied embeddings the last stage's ``output_layer.weight`` is the embedding's copy.
    """
    if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        layer = model.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
    return ".".join(parts)


def shard_of(full, param, name, tp_rank, tp_size):
    """The slice of full tensor ``full`` that ``param`` holds on TP rank ``tp_rank``."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):  # [gate; up] fused: shard each half
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim)[tp_rank], up.chunk(tp_size, dim)[tp_rank]], 0)
    return full.chunk(tp_size, dim)[tp_rank]


def load_full_weights(chunks, weights, groups):
    """Copy the (1, 1) model's ``weights`` into this rank's ``chunks`` (groups None: unsharded)."""
    tp_rank, tp_size = (0, 1) if groups is None else (groups.tp_rank, groups.tp_size)
    copied = 0
    with torch.no_grad():
        for chunk in chunks:
            model = _unwrap(chunk)
            for name, param in model.named_parameters():
                full = weights[_global_name(model, name)]
                param.copy_(shard_of(full, param, name, tp_rank, tp_size))
                copied += 1
    return copied


def max_weight_diff(chunks, weights, groups):
    """Largest |difference| between ``chunks``' parameters and the sharded ``weights``."""
    diff = 0.0
    for chunk in chunks:
        model = _unwrap(chunk)
        for name, param in model.named_parameters():
            full = weights[_global_name(model, name)]
            ref = shard_of(full, param, name, groups.tp_rank, groups.tp_size)
            diff = max(diff, float((param.detach() - ref).abs().max()))
    return diff


def max_param_diff(chunks_a, chunks_b):
    """Largest |difference| between same-named parameters of two models of the same layout."""
    diff = 0.0
    for a, b in zip(chunks_a, chunks_b):
        params_b = dict(_unwrap(b).named_parameters())
        for name, param in _unwrap(a).named_parameters():
            diff = max(diff, float((param.detach() - params_b[name].detach()).abs().max()))
    return diff
