"""Benchmark: how evenly a mini-batch's work is shared over data-parallel ranks, round-robin vs token-balanced.

Run::

    python benchmarks/dp_balance.py [--dps 4,8] [--seeds 8] [--prompts 64] [--n 16] [--hidden 5120]
                                    [--median 4000] [--sigma 0.8] [--truncated 0.08] [--json out.json] [--quick]

A training step waits for its slowest data-parallel rank, so the figure of merit is a mini-batch's
max rank cost / mean rank cost (1.0 = every rank finishes together; the trainer logs it as
``train/dp_cost_max_over_mean``). Cost per sample: ``data.balance.sample_cost`` (tokens plus causal
attention, ``L + L**2 / (20.2 h)``, at the 32B's ``h = 5120``).

Workload, the 32B recipe's mini-batch (``examples/qwen2.5-32b-fipo.yaml``: 64 prompts x 16
samples = 1,024 samples; dp = 4 there, world 128 / (tp 8 x pp 2 x cp 2)) with FIPO-like lengths:
one prompt length per group, uniform in [100, 2048]; response lengths lognormal (median
``--median`` 4,000, ``--sigma`` 0.8) clipped to [200, 20,480], and a fraction ``--truncated`` (8%)
at the 20,480-token cap (samples cut off by ``max_response_length``). Each seed draws a fresh
mini-batch.

Splits, on the same samples in the same run:

``round-robin``
    the split before this change: rank ``r`` gets positions ``r, r + dp, ...`` of the mini-batch.
``LPT``
    for reference: samples by decreasing cost, each onto the least-loaded rank.
``balanced``
    ``experience.split_step`` with costs: ``data.balance.balanced_partition`` (Karmarkar-Karp).

Reported per dp and seed: max / mean rank cost for each split, the balanced split's max / mean
counted in tokens only, the spread of sample counts per rank, and the time ``split_step`` takes
for the mini-batch (median of ``--repeats`` calls, ``time.perf_counter``). Summary: per dp, the
mean and worst max / mean over seeds and the ratio of the slowest rank's cost, round-robin /
balanced (the step's compute-time speed-up if ranks are compute-bound). Not modelled: packing into
micro-batches (per-micro-batch overheads, pipeline bubbles), communication. Target: balanced max /
mean <= 1.05, printed as met / MISSED; exit code 0 whatever the figures.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from megatron_fipo.data.balance import max_over_mean, sample_cost
from megatron_fipo.train.experience import split_step

TARGET = 1.05


def draw_mini_batch(rng: random.Random, prompts: int, n: int, *, median: float, sigma: float,
                    truncated: float, cap: int = 20480) -> list[tuple[int, int]]:
    """``prompts * n`` (prompt length, response length) pairs, ``n`` consecutive samples per prompt."""
    import math

    out = []
    for _ in range(prompts):
        prompt = rng.randint(100, 2048)
        for _ in range(n):
            resp = cap if rng.random() < truncated else min(max(int(rng.lognormvariate(math.log(median), sigma)), 200),
                                                            cap)
            out.append((prompt, resp))
    return out


def lpt(costs: list[float], k: int) -> list[list[int]]:
    """Longest processing time first: by decreasing cost, each sample onto the least-loaded rank."""
    loads, parts = [0.0] * k, [[] for _ in range(k)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(k), key=lambda r: (loads[r], r))
        loads[r] += costs[i]
        parts[r].append(i)
    return [sorted(p) for p in parts]


def measure(samples: list[tuple[int, int]], n: int, prompts: int, dp: int, hidden: int, repeats: int) -> dict:
    costs = [sample_cost(p, r, hidden) for p, r in samples]
    tokens = [float(p + r) for p, r in samples]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        (balanced,) = split_step(len(costs), n, prompts, dp, costs=costs)
        times.append(time.perf_counter() - start)
    (rr,) = split_step(len(costs), n, prompts, dp)
    totals = {name: [sum(costs[i] for i in part) for part in parts]
              for name, parts in (("round_robin", rr), ("lpt", lpt(costs, dp)), ("balanced", balanced))}
    return dict(
        max_over_mean={name: max(t) / (sum(t) / dp) for name, t in totals.items()},
        balanced_tokens_max_over_mean=max_over_mean(tokens, balanced),
        slowest_rr_over_balanced=max(totals["round_robin"]) / max(totals["balanced"]),
        samples_per_rank=[min(map(len, balanced)), max(map(len, balanced))],
        split_ms=statistics.median(times) * 1e3,
        mean_response=statistics.fmean(r for _, r in samples),
        capped_frac=sum(r == 20480 for _, r in samples) / len(samples),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dps", default="4,8")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--median", type=float, default=4000.0)
    parser.add_argument("--sigma", type=float, default=0.8)
    parser.add_argument("--truncated", type=float, default=0.08)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.repeats = 2, 1
    dps = [int(x) for x in args.dps.split(",")]
    print(f"mini-batch: {args.prompts} prompts x {args.n} samples = {args.prompts * args.n}; responses lognormal "
          f"(median {args.median:.0f}, sigma {args.sigma}) in [200, 20480] + {args.truncated:.0%} at the cap; "
          f"prompts 100-2048; cost L + L^2/(20.2 h), h = {args.hidden}")
    header = (f"{'dp':>3} {'seed':>4} {'mean resp':>9} {'capped':>6} | {'round-robin':>11} {'LPT':>7} {'balanced':>9} "
              f"{'(tokens)':>9} | {'slowest rr/bal':>14} {'samples/rank':>12} {'split ms':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for dp in dps:
        for seed in range(args.seeds):
            samples = draw_mini_batch(random.Random(seed), args.prompts, args.n, median=args.median,
                                      sigma=args.sigma, truncated=args.truncated)
            row = dict(dp=dp, seed=seed, **measure(samples, args.n, args.prompts, dp, args.hidden, args.repeats))
            rows.append(row)
            m = row["max_over_mean"]
            print(f"{dp:>3} {seed:>4} {row['mean_response']:>9.0f} {row['capped_frac']:>6.1%} | "
                  f"{m['round_robin']:>11.4f} {m['lpt']:>7.5f} {m['balanced']:>9.6f} "
                  f"{row['balanced_tokens_max_over_mean']:>9.6f} | {row['slowest_rr_over_balanced']:>13.3f}x "
                  f"{'%d-%d' % tuple(row['samples_per_rank']):>12} {row['split_ms']:>8.2f}")
    print("Summary (max rank cost / mean rank cost over seeds; the step waits for the slowest rank)")
    summary = {}
    for dp in dps:
        mine = [r for r in rows if r["dp"] == dp]
        s = {name: dict(mean=statistics.fmean(r["max_over_mean"][name] for r in mine),
                        worst=max(r["max_over_mean"][name] for r in mine)) for name in ("round_robin", "lpt", "balanced")}
        s["slowest_rr_over_balanced_mean"] = statistics.fmean(r["slowest_rr_over_balanced"] for r in mine)
        s["split_ms_max"] = max(r["split_ms"] for r in mine)
        s["target_met"] = s["balanced"]["worst"] <= TARGET
        summary[str(dp)] = s
        print(f"  dp={dp}: round-robin {s['round_robin']['mean']:.4f} (worst {s['round_robin']['worst']:.4f}), "
              f"LPT {s['lpt']['mean']:.5f} (worst {s['lpt']['worst']:.5f}), balanced {s['balanced']['mean']:.6f} "
              f"(worst {s['balanced']['worst']:.6f}); slowest rank round-robin / balanced "
              f"{s['slowest_rr_over_balanced_mean']:.3f}x; split <= {s['split_ms_max']:.1f} ms; "
              f"target balanced <= {TARGET}: {'met' if s['target_met'] else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(args=vars(args), results=rows, summary=summary), fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
