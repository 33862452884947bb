"""Benchmark: the actor's training throughput (tokens/s) and model FLOPs utilisation on one device.

Run::

    python benchmarks/actor_throughput.py [--preset qwen2.5-1.5b] [--micro-batch-tokens 8192]
        [--micro-batches 4] [--sequence-tokens 2048] [--steps 3] [--dtype bfloat16]
        [--peak-tflops X] [--tiny] [--json out.json]

A Qwen2 actor of a named shape (``config/hf_presets.py``) with random weights, one process
(tp = pp = 1), trained with the FIPO loss: each step is one mini-batch of ``micro-batches`` packed
micro-batches of ``micro-batch-tokens`` tokens (sequences of ``sequence-tokens``: a 1/8 prompt
and the rest response), forward + backward + optimizer step (``Actor.train_step``; the old
log-probs are given, so no extra forward pass). One warm-up step, then ``steps`` timed steps
(``torch.cuda.synchronize`` around each on a GPU); the figure is the median step.

Model FLOPs per step, as in Megatron's and PaLM's MFU: 3x the forward's (forward + backward,
activation recompute not counted): per token ``2 * (matmul parameters)`` (attention projections,
MLP, LM head; the embedding lookup is free) plus, per layer, ``4 * hidden * (keys the token
attends to)`` for QK^T and AV (causal: position + 1). MFU = model FLOPs / step time / the device's
peak dense bf16 FLOPs (a table of NVIDIA data-centre GPUs by name; ``--peak-tflops`` for others;
none on a CPU).

Without Transformer Engine the local layer spec materialises each micro-batch's attention scores,
so selective recompute of the core attention is on (memory: one layer's scores, not all of them).
``--tiny`` is a 2-layer model with 512-token micro-batches for CPUs and the test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Peak dense bf16 tensor-core TFLOP/s (no sparsity) by device-name fragment, most specific first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0),
                    ("H100", 989.0), ("H800", 989.0), ("H20", 148.0), ("B200", 2250.0), ("B100", 1750.0),
                    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0))
TINY = dict(architectures=["Qwen2ForCausalLM"], hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=2048, max_position_embeddings=4096,
            tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6, hidden_act="silu")


def peak_tflops(device_name: str) -> float | None:
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment.lower() in device_name.lower():
            return tflops
    return None


def model_flops(arch, sequence_lengths) -> float:
    """Training model FLOPs (3x forward) of one pass over sequences of these lengths."""
    h, hd, L = arch.hidden_size, arch.head_dim, arch.num_layers
    q, kv = arch.num_heads * hd, arch.num_kv_heads * hd
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * arch.ffn_hidden_size
    matmul = L * per_layer + h * arch.vocab_size  # the LM head (tied or not, it is a matmul)
    tokens = sum(sequence_lengths)
    attended = sum(n * (n + 1) // 2 for n in sequence_lengths)  # causal keys, summed over tokens
    forward = 2 * matmul * tokens + L * 4 * q * attended
    return 3.0 * forward


def _mini_batch(arch, micro_batches: int, micro_tokens: int, seq_tokens: int, seed: int):
    from megatron_fipo.data.batches import MiniBatch

    g = torch.Generator().manual_seed(seed)
    per_micro = max(1, micro_tokens // seq_tokens)
    prompt = max(1, seq_tokens // 8)
    prompts, responses = [], []
    for _ in range(micro_batches * per_micro):
        ids = torch.randint(0, arch.vocab_size, (seq_tokens,), generator=g).tolist()
        prompts.append(ids[:prompt])
        responses.append(ids[prompt:])
    adv = torch.randn(len(prompts), generator=g)
    old = [-torch.rand(len(r), generator=g) * 3 - 8.0 for r in responses]  # ~ log(1 / vocab): ratios near 1
    return MiniBatch(prompts, responses, adv, old), old, [seq_tokens] * len(prompts)


def run(preset: str = "qwen2.5-1.5b", micro_batch_tokens: int = 8192, micro_batches: int = 4,
        sequence_tokens: int = 2048, steps: int = 3, dtype: str = "bfloat16", peak: float | None = None,
        tiny: bool = False) -> dict:
    from megatron_fipo.config.hf_presets import PRESETS
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor, ActorSettings
    from megatron_fipo.mcore.model import Qwen2Arch, use_transformer_engine

    G.single_process_env()
    groups = G.init_distributed(tp=1, pp=1, seed=1)
    try:
        arch = Qwen2Arch.from_hf(TINY if tiny else PRESETS[preset])
        te = use_transformer_engine()
        recompute = {} if te else {"recompute_granularity": "selective"}
        settings = ActorSettings(lr=1e-6, warmup_steps=0, max_tokens_per_micro_batch=micro_batch_tokens,
                                 params_dtype=dtype, recompute=recompute)
        actor = Actor(arch, groups, settings)
        params = sum(p.numel() for _, p in actor.named_local_parameters())
        cuda = torch.cuda.is_available()
        times, metrics = [], {}
        for step in range(steps + 1):
            mb, old, lengths = _mini_batch(arch, micro_batches, micro_batch_tokens, sequence_tokens, seed=step)
            prepared = actor.prepare(mb, old_logp=old)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            metrics = actor.train_step(prepared, {"decay_rate": 32.0})
            if cuda:
                torch.cuda.synchronize()
            if step:  # the first step warms up (allocator, compiled fusions, optimizer state)
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        tokens = sum(lengths)
        flops = model_flops(arch, lengths)
        device = torch.cuda.get_device_name() if cuda else "cpu"
        peak = peak if peak is not None else (peak_tflops(device) if cuda else None)
        out = dict(device=device, shape="tiny" if tiny else preset, parameters=params, dtype=dtype,
                   transformer_engine=te, recompute=recompute.get("recompute_granularity", "none"),
                   micro_batch_tokens=micro_batch_tokens, micro_batches=int(metrics.get("micro_batches", 0)),
                   tokens_per_step=tokens, step_s=round(step_s, 4), step_s_all=[round(t, 4) for t in times],
                   tokens_per_s=round(tokens / step_s, 1), model_tflops_per_step=round(flops / 1e12, 3),
                   achieved_tflops=round(flops / step_s / 1e12, 2), peak_bf16_tflops=peak,
                   mfu=round(flops / step_s / (peak * 1e12), 4) if peak else None,
                   loss=metrics.get("loss"), grad_norm=metrics.get("grad_norm"), skipped=metrics.get("skipped"))
        if cuda:
            out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return out
    finally:
        G.destroy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen2.5-1.5b")
    p.add_argument("--micro-batch-tokens", type=int, default=8192)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--sequence-tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense bf16 TFLOP/s")
    p.add_argument("--tiny", action="store_true", help="2 layers, 512-token micro-batches (CPUs, the test)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.tiny and a.micro_batch_tokens == 8192:
        a.micro_batch_tokens, a.sequence_tokens = 512, 128
    out = run(a.preset, a.micro_batch_tokens, a.micro_batches, a.sequence_tokens, a.steps, a.dtype,
              a.peak_tflops, a.tiny)
    mfu = f"{out['mfu']:.1%}" if out["mfu"] is not None else "n/a (no peak figure for this device)"
    print(f"actor throughput on {out['device']}: {out['shape']} ({out['parameters'] / 1e9:.3f} B parameters, "
          f"{out['dtype']}, TE {'on' if out['transformer_engine'] else 'off'}), {out['tokens_per_step']} tokens "
          f"per step in {out['micro_batches']} micro-batches: {out['step_s']:.3f} s per step, "
          f"{out['tokens_per_s']:.0f} tokens/s, {out['achieved_tflops']} TFLOP/s, MFU {mfu}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
