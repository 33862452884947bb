"""``megatron-fipo plan``: the rank layout and a per-GPU memory estimate of a config, without GPUs.

Owns ``rank_layout`` (Megatron's default ``tp-cp-dp-pp`` rank order) and ``estimate_memory`` (a
first-order model: parameters, gradients, optimizer state, activations of the in-flight
micro-batches, the chunked log-prob buffers) and ``plan`` (validation + report). Imports only the
``config`` package: it must run on a laptop.

The estimate is an upper-bound style budget for planning, not a measurement: bf16 weights, fp32
gradients (``grad_reduce_in_fp32``), fp32 main weights + Adam moments sharded over the data- and
context-parallel ranks (Megatron's distributed optimizer shards over ``dp * cp``), activations per
Korthikanti et al. (sequence parallel, flash attention: ``34 * T * h / tp`` bytes per layer
without recompute, ``2 * T * h`` with full recompute) for the micro-batches in flight on the first pipeline stage. With colocated SGLang
rollouts every node's GPUs also hold the servers' static memory while the actor's weights,
gradients and optimizer state stay resident: ``plan`` adds that check for every node, and reports
the GPUs that generate and the bytes a node-local weight sync moves into each node.
"""
from __future__ import annotations

from typing import Any, Mapping

from megatron_fipo.config.conventions import cp_alignment, servers_per_node
from megatron_fipo.config.schema import Config, validate

GiB = float(1 << 30)


def rank_layout(world: int, tp: int, pp: int, cp: int = 1, gpus_per_node: int = 8) -> list[dict]:
    """Parallel ranks of every global rank (Megatron's default order: tp fastest, then cp, dp, pp)."""
    dp = world // (tp * pp * cp)
    out = []
    for r in range(world):
        out.append({"rank": r, "node": r // gpus_per_node, "gpu": r % gpus_per_node, "tp": r % tp,
                    "cp": (r // tp) % cp, "dp": (r // (tp * cp)) % dp, "pp": r // (tp * cp * dp)})
    return out


def parameter_counts(hf: Mapping[str, Any]) -> dict:
    """Parameters of a Qwen2 model from its HF config: total, per transformer layer, embedding."""
    h, layers, ffn, vocab = hf["hidden_size"], hf["num_hidden_layers"], hf["intermediate_size"], hf["vocab_size"]
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads", hf["num_attention_heads"])
    hd = hf.get("head_dim") or h // heads
    attn = h * heads * hd + heads * hd + 2 * (h * kv * hd + kv * hd) + heads * hd * h
    layer = attn + 3 * h * ffn + 2 * h
    embed = vocab * h
    total = layers * layer + embed * (1 if hf.get("tie_word_embeddings") else 2) + h
    return {"total": total, "per_layer": layer, "embedding": embed}


def estimate_memory(config: Config, hf: Mapping[str, Any], world: int) -> dict:
    """Per-GPU bytes of the busiest training rank (first pipeline stage), in GiB, by component."""
    par, o = config.parallel, config.optim
    layers_per_stage = hf["num_hidden_layers"] / par.pp
    params, weights, grads, optimizer = _resident_bytes(config, hf, world, stage=0)
    tokens = o.max_tokens_per_micro_batch / par.cp
    h = hf["hidden_size"]
    full_recompute = config.model.recompute.get("recompute_granularity") == "full"
    per_layer = (2 * tokens * h) if full_recompute else 34 * tokens * h / par.tp
    activations = per_layer * layers_per_stage * par.pp  # 1F1B: pp micro-batches in flight on stage 0
    logits = min(o.logprob_chunk_tokens, tokens) * hf["vocab_size"] / par.tp * 4 * 3
    parts = {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": activations,
             "logprob_chunk": logits}
    out = {k: v / GiB for k, v in parts.items()}
    out["total"] = sum(out.values())
    out["params_per_gpu"] = params
    out["params_total"] = parameter_counts(hf)["total"]
    return out


def stage_parameters(hf: Mapping[str, Any], pp: int) -> list[float]:
    """Parameters each pipeline stage exports to HF (even layer split; embedding on the first stage, final
    norm and untied output layer on the last)."""
    counts = parameter_counts(hf)
    out = [hf["num_hidden_layers"] / pp * counts["per_layer"] for _ in range(pp)]
    out[0] += counts["embedding"]
    out[-1] += hf["hidden_size"] + (0 if hf.get("tie_word_embeddings") else counts["embedding"])
    return out


def node_sync_bytes(config: Config, hf: Mapping[str, Any], world: int, gpus_per_node: int) -> list[float]:
    """Bytes each node receives from other nodes per node-local weight sync: every stage it holds no rank
    of, once (``parallel.nodes.node_sync_plan``), in the serving dtype."""
    par = config.parallel
    itemsize = 2 if config.model.params_dtype == "bfloat16" else 4
    per_stage = [n * itemsize for n in stage_parameters(hf, par.pp)]
    layout = rank_layout(world, par.tp, par.pp, par.cp, gpus_per_node)
    nodes = -(-world // gpus_per_node)
    held = [{r["pp"] for r in layout if r["node"] == k} for k in range(nodes)]
    return [sum(b for s, b in enumerate(per_stage) if s not in held[k]) for k in range(nodes)]


def colocated_rollout(config: Config, hf: Mapping[str, Any], world: int, gpus_per_node: int,
                      gpu_gib: float) -> tuple:
    """``(summary or None, warnings)`` for colocated SGLang servers on every node's GPUs.

    During rollouts each actor rank keeps its weights, gradient buffer and optimizer shard
    (activations are freed) while each server holds ``mem_fraction_static`` of its GPUs (weights + KV
    cache). Checked for every node: the busiest GPU of each (its pipeline stage's resident memory).
    """
    ro, par = config.rollout, config.parallel
    if ro.engine != "sglang" or ro.mode != "colocated" or ro.urls:
        return None, []
    tp, args = ro.sglang_server_args()
    tp = int(tp)
    try:
        per_node = servers_per_node(ro.servers_per_node, tp, gpus_per_node)
    except ValueError as err:
        raise ValueError(f"colocated rollout: {err}") from None
    nodes = -(-world // gpus_per_node)
    layout = rank_layout(world, par.tp, par.pp, par.cp, gpus_per_node)
    resident = [_resident_gib(config, hf, world, stage) for stage in range(par.pp)]
    node_resident = [max(resident[r["pp"]] for r in layout if r["node"] == k) for k in range(nodes)]
    worst = max(range(nodes), key=lambda k: node_resident[k])
    weights = parameter_counts(hf)["total"] * 2 / tp / GiB  # bf16 serving weights per server GPU
    room = (gpu_gib - node_resident[worst]) / gpu_gib
    sync = node_sync_bytes(config, hf, world, gpus_per_node)
    out = {"rollout_gpus": nodes * per_node * tp, "training_gpus": world, "servers_per_node": per_node,
           "servers": nodes * per_node, "actor_resident_gib": round(node_resident[worst], 2),
           "sglang_weights_gib": round(weights, 2), "sync_gib_per_node": round(max(sync) / GiB, 2)}
    frac = args.get("mem_fraction_static")
    if frac is None:
        return out, [f"colocated SGLang: set rollout.sglang.mem_fraction_static (at most {room:.2f}: the actor "
                     f"keeps {node_resident[worst]:.1f} GiB per GPU during rollouts on node {worst})"]
    static = float(frac) * gpu_gib
    out.update(sglang_static_gib=round(static, 2), total_gib=round(node_resident[worst] + static, 2))
    warnings = []
    if node_resident[worst] + static > gpu_gib:
        warnings.append(f"colocated SGLang: actor {node_resident[worst]:.1f} GiB (node {worst}) + mem_fraction_static "
                        f"{frac} x {gpu_gib:.0f} GiB exceeds the GPU; use mem_fraction_static <= {room:.2f}")
    if weights >= static:
        warnings.append(f"colocated SGLang: {weights:.1f} GiB of weights per GPU leave no KV cache in "
                        f"mem_fraction_static {frac}; raise rollout.sglang.tp_size or the fraction")
    return out, warnings


def _resident_bytes(config: Config, hf: Mapping[str, Any], world: int, stage: int) -> tuple:
    """``(parameters, weight, gradient, optimizer-shard bytes)`` per GPU of pipeline ``stage``: bf16 or fp32
    weights, fp32 gradients, fp32 main weights + Adam moments sharded over dp x cp (what stays resident
    while colocated servers generate)."""
    par = config.parallel
    dp = world // (par.tp * par.pp * par.cp)
    params = stage_parameters(hf, par.pp)[stage] / par.tp
    bf16 = config.model.params_dtype == "bfloat16"
    return params, params * (2 if bf16 else 4), params * 4, params * (12 if bf16 else 8) / (dp * par.cp)


def _resident_gib(config: Config, hf: Mapping[str, Any], world: int, stage: int) -> float:
    """Weights + gradients + optimizer shard per GPU of pipeline ``stage``, in GiB."""
    return sum(_resident_bytes(config, hf, world, stage)[1:]) / GiB


def plan(config: Config, world: int, hf: Mapping[str, Any], *, gpus_per_node: int = 8,
         gpu_gib: float = 80.0) -> dict:
    """Validate the config for ``world`` ranks and the model; return the layout summary and memory estimate."""
    if gpus_per_node < 1 or not gpu_gib > 0:
        raise ValueError(f"--gpus-per-node must be >= 1, got {gpus_per_node}" if gpus_per_node < 1
                         else f"--gpu-gib must be > 0, got {gpu_gib:g}")
    warnings = validate(config, world_size=world, hf_config=hf, for_training=False)
    par = config.parallel
    dp = world // (par.tp * par.pp * par.cp)
    mem = estimate_memory(config, hf, world)
    layout = rank_layout(world, par.tp, par.pp, par.cp, gpus_per_node)
    if par.tp > gpus_per_node:
        warnings.append(f"tp={par.tp} spans more than one {gpus_per_node}-GPU node: tensor parallelism over "
                        "the inter-node network is slow")
    if mem["total"] > gpu_gib:
        warnings.append(f"estimated {mem['total']:.1f} GiB per GPU exceeds {gpu_gib:.0f} GiB: raise tp/pp/cp, "
                        "enable recompute, or lower optim.max_tokens_per_micro_batch")
    rollout, rollout_warnings = colocated_rollout(config, hf, world, gpus_per_node, gpu_gib)
    warnings += rollout_warnings
    return {"world": world, "nodes": -(-world // gpus_per_node), "tp": par.tp, "pp": par.pp, "cp": par.cp,
            "dp": dp, "vpp": par.vpp, "memory_gib": {k: round(v, 2) for k, v in mem.items()
                                                     if k not in ("params_per_gpu", "params_total")},
            "params_total_b": round(mem["params_total"] / 1e9, 3), "params_per_gpu_b": round(mem["params_per_gpu"] / 1e9, 3),
            "first_node": layout[:gpus_per_node], "colocated_rollout": rollout,
            "context_parallel": _context_parallel(config), "warnings": warnings}


def _context_parallel(config: Config) -> dict:
    """What CP does to a micro-batch: the padding, tokens per GPU, bytes of the distributed Future-KL scan."""
    par, budget = config.parallel, config.optim.max_tokens_per_micro_batch
    if par.cp == 1:
        return {}
    return {"pad_to": cp_alignment(par.cp, par.tp, par.sequence_parallel), "tokens_per_gpu": budget // par.cp,
            "micro_batch_tokens": budget, "scan_bytes_per_sequence": 8}


def format_plan(report: dict) -> str:
    """Human-readable report."""
    lines = [f"world {report['world']} ranks on {report['nodes']} node(s): tp={report['tp']} pp={report['pp']} "
             f"cp={report['cp']} dp={report['dp']}" + (f" vpp={report['vpp']}" if report["vpp"] else ""),
             f"model: {report['params_total_b']} B parameters, {report['params_per_gpu_b']} B per GPU",
             "memory per GPU (GiB, estimate): " + ", ".join(f"{k} {v}" for k, v in report["memory_gib"].items()),
             "first node:  rank  gpu  tp  cp  dp  pp"]
    cp = report.get("context_parallel")
    if cp:
        lines.insert(3, f"context parallel: sequences padded to multiples of {cp['pad_to']}; <= {cp['tokens_per_gpu']} "
                        f"tokens per GPU of a {cp['micro_batch_tokens']}-token micro-batch; Future-KL scan "
                        f"{cp['scan_bytes_per_sequence']} B per sequence per rank")
    ro = report.get("colocated_rollout")
    if ro:
        lines.insert(3, f"colocated SGLang on every node: {ro['rollout_gpus']} of {ro['training_gpus']} GPUs generate "
                        f"({ro['servers']} servers, {ro['servers_per_node']} per node); node-local weight sync "
                        f"{ro['sync_gib_per_node']} GiB into a node per sync")
        lines.insert(4, "colocated SGLang (GiB per GPU, busiest node): " + ", ".join(
            f"{k} {v}" for k, v in ro.items() if k.endswith("_gib") and k != "sync_gib_per_node"))
    for r in report["first_node"]:
        lines.append(f"             {r['rank']:4d} {r['gpu']:4d} {r['tp']:3d} {r['cp']:3d} {r['dp']:3d} {r['pp']:3d}")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
