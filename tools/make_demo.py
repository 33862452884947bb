"""Build the embedded CPU demo: a character tokenizer, addition problems and a briefly warmed-up tiny Qwen2.

Usage: python tools/make_demo.py [--out build/demo] [--seed 0] [--force]

Writes ``OUT/base`` (HF model + tokenizer), ``OUT/train.jsonl``, ``OUT/test.jsonl`` and
``OUT/demo_info.json`` with the base model's held-out accuracy (greedy and sampled at
temperature 1, measured with the CPU rollout engine). Reuses a complete ``OUT`` built with the
same arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def base_accuracy(base_dir: str, rows: list, n: int = 4) -> dict:
    """Held-out accuracy of the model in ``base_dir``: greedy and sampled (T = 1), ``n`` samples each."""
    from transformers import AutoTokenizer

    from megatron_fipo.algo.rewards import dapo_math_reward
    from megatron_fipo.data.demo_task import encode_pair
    from megatron_fipo.rollout.cpu_engine import CPUEngine
    from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams

    tok = AutoTokenizer.from_pretrained(base_dir)
    engine = CPUEngine(base_dir, max_batch_rows=256)
    out = {}
    for name, extra in (("base_acc_greedy", {"top_k": 1}), ("base_acc_sampled", {})):
        print(f"demo: measuring the base model's held-out accuracy ({name[9:]}, {len(rows)} x {n})",
              file=sys.stderr, flush=True)
        requests = [GenerationRequest(tuple(encode_pair(tok, r)[0]), SamplingParams(
            n=n, max_new_tokens=16, seed=1000 * i, stop_token_ids=(tok.eos_token_id,), **extra))
            for i, r in enumerate(rows)]
        acc = [dapo_math_reward(tok.decode(s.token_ids, skip_special_tokens=True), r["reward_model"]["ground_truth"]).acc
               for group, r in zip(engine.generate(requests), rows) for s in group]
        out[name] = round(sum(acc) / len(acc), 4)
    engine.shutdown()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="build/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT is complete")
    args = parser.parse_args(argv)
    from megatron_fipo.data.demo_task import build_demo

    start = time.perf_counter()
    print(f"demo: building {args.out} (reused if complete; about half a minute to 2 minutes on 2 cores)",
          file=sys.stderr, flush=True)
    info = build_demo(args.out, seed=args.seed, force=args.force, evaluate=base_accuracy, progress=True)
    print(json.dumps({"out": args.out, "seconds": round(time.perf_counter() - start, 1),
                      **{k: v for k, v in info.items() if k != "spec"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
