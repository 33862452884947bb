"""Build an embedded CPU demo: a character tokenizer, problems and a briefly warmed-up tiny Qwen2.

Usage: python tools/make_demo.py [--task addition|longtail] [--out DIR] [--seed 0] [--force]

Tasks: ``addition`` (the default, ``megatron_fipo/data/demo_task.py``, written to ``build/demo``):
``"37+58="`` -> ``"Answer: 95"``; ``longtail`` (``megatron_fipo/data/longtail_task.py``, written to
``build/demo_longtail``): remainders by repeated subtraction written out step by step, response
lengths long-tailed (16 to about 350 tokens).

Writes ``OUT/base`` (HF model + tokenizer), ``OUT/train.jsonl``, ``OUT/test.jsonl`` and
``OUT/demo_info.json`` with the base model's held-out accuracy (greedy and sampled at
temperature 1, measured with the CPU rollout engine); for ``longtail`` also the sampled accuracy
by step count and the length distribution of the sampled responses (median, p90, max,
max / median). Reuses a complete ``OUT`` built with the same arguments.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# task -> (default output directory, module, generation cap of the accuracy check, minutes to build on 2 cores)
TASKS = {"addition": ("build/demo", "megatron_fipo.data.demo_task", 16, "about half a minute to 2 minutes"),
         "longtail": ("build/demo_longtail", "megatron_fipo.data.longtail_task", 384, "about 5 to 6 minutes")}
STEP_BUCKETS = ((1, 3), (4, 9), (10, 19), (20, 10 ** 9))


def base_accuracy(base_dir: str, rows: list, n: int = 4, *, encode=None, max_new_tokens: int = 16,
                  lengths: bool = False) -> dict:
    """Held-out accuracy of the model in ``base_dir``: greedy and sampled (T = 1), ``n`` samples each.

    ``encode(tokenizer, row)`` gives a row's prompt ids first (the addition demo's ``encode_pair``
    by default). ``lengths`` adds the sampled responses' length distribution and the sampled
    accuracy by the rows' ``extra_info.steps``.
    """
    from transformers import AutoTokenizer

    from megatron_fipo.algo.rewards import dapo_math_reward
    from megatron_fipo.rollout.cpu_engine import CPUEngine
    from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams

    if encode is None:
        from megatron_fipo.data.demo_task import encode_pair as encode
    tok = AutoTokenizer.from_pretrained(base_dir)
    engine = CPUEngine(base_dir, max_batch_rows=256)
    out = {}
    for name, extra in (("base_acc_greedy", {"top_k": 1}), ("base_acc_sampled", {})):
        print(f"demo: measuring the base model's held-out accuracy ({name[9:]}, {len(rows)} x {n})",
              file=sys.stderr, flush=True)
        requests = [GenerationRequest(tuple(encode(tok, r)[0]), SamplingParams(
            n=n, max_new_tokens=max_new_tokens, seed=1000 * i, stop_token_ids=(tok.eos_token_id,), **extra))
            for i, r in enumerate(rows)]
        groups = engine.generate(requests)
        acc = [dapo_math_reward(tok.decode(s.token_ids, skip_special_tokens=True),
                                r["reward_model"]["ground_truth"]).acc
               for group, r in zip(groups, rows) for s in group]
        out[name] = round(sum(acc) / len(acc), 4)
        if lengths and name == "base_acc_sampled":
            out.update(sampled_lengths([len(s.token_ids) for group in groups for s in group],
                                       [s.finish_reason == "stop" for group in groups for s in group]))
            out["base_acc_sampled_by_steps"] = by_steps(acc, [r["extra_info"]["steps"] for r in rows for _ in range(n)])
    engine.shutdown()
    return out


def sampled_lengths(lengths: list, stopped: list) -> dict:
    """Median, p90, mean, max and max / median of response lengths (tokens); the max of those that
    ended with the stop token, and the share cut at the length cap."""
    ranked = sorted(lengths)
    median = (ranked[(len(ranked) - 1) // 2] + ranked[len(ranked) // 2]) / 2
    return {"sampled_len_median": median, "sampled_len_p90": ranked[int(0.9 * (len(ranked) - 1))],
            "sampled_len_mean": round(sum(ranked) / len(ranked), 1), "sampled_len_max": ranked[-1],
            "sampled_len_max_over_median": round(ranked[-1] / median, 2),
            "sampled_len_max_stopped": max((n for n, s in zip(lengths, stopped) if s), default=0),
            "sampled_truncated_frac": round(1 - sum(stopped) / len(stopped), 4)}


def by_steps(acc: list, steps: list) -> dict:
    """Mean accuracy per step-count bucket (``STEP_BUCKETS``), with the bucket's sample count."""
    out = {}
    for lo, hi in STEP_BUCKETS:
        got = [a for a, s in zip(acc, steps) if lo <= s <= hi]
        if got:
            name = f"{lo}-{hi}" if hi < 10 ** 9 else f"{lo}+"
            out[name] = {"acc": round(sum(got) / len(got), 4), "samples": len(got)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="addition")
    parser.add_argument("--out", default=None, help="output directory (build/demo or build/demo_longtail)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT is complete")
    args = parser.parse_args(argv)
    default_out, module_name, max_new_tokens, duration = TASKS[args.task]
    out_dir = args.out or default_out
    task = importlib.import_module(module_name)
    evaluate = functools.partial(base_accuracy, encode=task.encode_pair, max_new_tokens=max_new_tokens,
                                 lengths=args.task == "longtail")

    start = time.perf_counter()
    print(f"demo: building {out_dir} (reused if complete; {duration} on 2 cores)", file=sys.stderr, flush=True)
    info = task.build_demo(out_dir, seed=args.seed, force=args.force, evaluate=evaluate, progress=True)
    print(json.dumps({"out": out_dir, "seconds": round(time.perf_counter() - start, 1),
                      **{k: v for k, v in info.items() if k != "spec"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
