"""Benchmark: the CPU rollout engine's sampling throughput vs HF ``model.generate`` on the same model.

Run::

    python benchmarks/cpu_engine.py [--prompts 32] [--n 4] [--new-tokens 128] [--repeats 3] [--json out.json] [--quick]

A random Qwen2 (hidden 256, 4 layers, 8 heads / 2 KV heads, vocab 2000; ``--quick`` shrinks it)
samples ``n`` responses of exactly ``--new-tokens`` tokens (no stop token) for prompts of 8-40
tokens. The baseline is ``model.generate(do_sample=True, output_scores=True)`` on the same
left-padded batch (scores requested so both produce per-token log-probs). Figures: generated
tokens per second, median of ``--repeats``, and the ratio ours / HF; reported, not asserted.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch


def build(quick: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    size = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=500) if quick else \
        dict(hidden_size=256, num_hidden_layers=4, intermediate_size=768, vocab_size=2000)
    return Qwen2ForCausalLM(Qwen2Config(num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                                        **size)).eval()


def ours(model, prompts, n, new_tokens) -> float:
    from megatron_fipo.rollout.cpu_engine import CPUEngine
    from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams

    engine = CPUEngine(model=model, max_batch_rows=len(prompts) * n)
    reqs = [GenerationRequest(tuple(p), SamplingParams(n=n, max_new_tokens=new_tokens, seed=i))
            for i, p in enumerate(prompts)]
    start = time.perf_counter()
    out = engine.generate(reqs)
    elapsed = time.perf_counter() - start
    assert sum(len(s.token_ids) for g in out for s in g) == len(prompts) * n * new_tokens
    return elapsed


def hf(model, prompts, n, new_tokens) -> float:
    rows = [p for p in prompts for _ in range(n)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=None, top_k=None, top_p=None)
    elapsed = time.perf_counter() - start
    assert out.sequences.shape[1] == width + new_tokens
    return elapsed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.n, args.new_tokens, args.repeats = 4, 2, 8, 1
    model = build(args.quick)
    rng = random.Random(0)
    prompts = [[rng.randrange(1, model.config.vocab_size) for _ in range(rng.randint(8, 40))]
               for _ in range(args.prompts)]
    tokens = args.prompts * args.n * args.new_tokens
    t_ours, t_hf = [], []
    for _ in range(args.repeats):  # alternate, so load changes hit both alike
        t_ours.append(ours(model, prompts, args.n, args.new_tokens))
        t_hf.append(hf(model, prompts, args.n, args.new_tokens))
    result = {"tokens": tokens, "ours_tokens_per_s": tokens / statistics.median(t_ours),
              "hf_tokens_per_s": tokens / statistics.median(t_hf),
              "speed_ratio_ours_over_hf": statistics.median(t_hf) / statistics.median(t_ours),
              "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))
    print(f"Summary: CPU engine {result['ours_tokens_per_s']:.0f} tokens/s, HF generate "
          f"{result['hf_tokens_per_s']:.0f} tokens/s, ratio {result['speed_ratio_ours_over_hf']:.2f}x "
          f"({tokens} tokens, {result['threads']} threads)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"results": result}, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
