"""Benchmark: the long-tailed demo, disaggregated, synchronous vs one step ahead vs in-flight + partial + over-sampling.

Run::

    python benchmarks/long_tail.py [--demo build/demo_longtail] [--steps 10] [--timed-last N] [--json out.json] [--quick]

Build the demo first (the first comment line of ``examples/demo_longtail_cpu.yaml`` gives the command).
Every setting trains that config in a fresh ``python -m megatron_fipo train`` process, one after the
other, disaggregated the way GPUs are: the trainer on core 0 with one thread, one SGLang-protocol
CPU server (``rollout.cpu_server``) on core 1 (``taskset``), whose decode steps take at least
``--decode-step-ms`` (default 40 ms: emulated GPU timing, a step costs about the same whatever the
batch up to the server's capacity). 40 ms is calibrated so that generation is about 60% of the
synchronous step here, as in the paper's setting (about 70%): on a quiet 2-core machine it measured
55% of the step at 20 ms, 59.5% at 35 ms and 61% at 40 ms (the trainer's share is fixed by its core).
Settings:

* ``sync``: ``rollout.max_staleness=0`` (each step generates its batch, then trains);
* ``ahead``: ``rollout.max_staleness=1`` (whole batches one step ahead);
* ``inflight``: ``max_staleness=1 inflight_updates=true partial=true oversample=1.25`` (the long tail
  carries over, weights are updated under running samples).

Reported per setting over steps 3..N (``--timed-last N``; default the last step), from ``metrics.jsonl``:
trained samples per second of step time and
the ratio to ``sync``; where a step's time goes (generation or the wait for it, old log-probs, the
update, the sync); decode-slot utilisation (the server's, from its decode steps: running requests
per step over its capacity); generated tokens per second; token ages; held-out Avg@4 at the start
and at the end of the run (equal steps); with the pool, the length distribution (mean, median,
90th percentile) of the samples trained against those generated, so a bias toward short answers
would show. The README's figures: ``--steps 30 --timed-last 10``. Figures are reported, not asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from staleness import REPO, summarize, train  # noqa: E402

SETTINGS = {
    "sync": (0, []),
    "ahead": (1, []),
    "inflight": (1, ["rollout.inflight_updates=true", "rollout.partial=true", "rollout.oversample=1.25"]),
}


def long_tail_summary(records: list[dict], n: int, first: int = 3, last: int | None = None) -> dict:
    """``staleness.summarize`` over steps ``first``..``last`` (default: every step), the long tail's own
    figures over the same steps, and the held-out Avg@4 of the whole run (start and end)."""
    last = max(r["step"] for r in records) if last is None else last
    window = [r for r in records if first <= r["step"] <= last]  # (summarize counts steps > 1 only)
    steps = [r for r in window if r["step"] >= first and "train/kept_groups" in r]
    out = summarize(window, n)
    avg = [r["eval/avg@4"] for r in records if "eval/avg@4" in r]
    out.update({"avg4_start": avg[0], "avg4_end": avg[-1], "avg4_rise": avg[-1] - avg[0], "first": first, "last": last})

    def mean(key):
        values = [r[key] for r in steps if key in r]
        return sum(values) / len(values) if values else float("nan")

    out.update({"sync_s": mean("time/sync_s"), "slot_util": mean("rollout/slot_util"),
                "generated_tokens_per_s": mean("perf/generated_tokens_per_s"),
                "token_age_mean": mean("rollout/token_age_mean"), "token_age_max": mean("rollout/token_age_max"),
                "partial_carried": mean("rollout/partial_carried"),
                "response_length_mean": mean("train/response_length_mean")})  # every sample scored in the step
    for kind in ("trained", "generated"):  # the pool's length distributions (absent for the round path)
        for stat in ("mean", "p50", "p90"):
            out[f"{kind}_length_{stat}"] = mean(f"rollout/{kind}_length_{stat}")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default=os.path.join(REPO, "build", "demo_longtail"), help="the built long-tail demo")
    ap.add_argument("--steps", type=int, default=10, help="steps per run (held-out Avg@4 at the start and the end)")
    ap.add_argument("--timed-last", type=int, default=None,
                    help="throughput over steps 3..THIS (default: every step; e.g. --steps 30 --timed-last 10)")
    ap.add_argument("--config", default="demo_longtail_cpu.yaml", help="the config in examples/ (and its demo)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--decode-step-ms", type=float, default=40.0,
                    help="the CPU server's emulated decode step (default 40: generation ~60%% of a synchronous step)")
    ap.add_argument("--max-running", type=int, default=64, help="the server's decode slots")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", default=None, help="keep every run's directory (metrics.jsonl, logs) under this one")
    ap.add_argument("--quick", action="store_true", help="4 steps on 16 held-out problems (a smoke test)")
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(args.demo, "base")):
        raise SystemExit(f"no demo model in {args.demo}: build it with the command on the first line of "
                         "examples/demo_longtail_cpu.yaml")
    steps, extra = (4, ["eval.max_problems=16"]) if args.quick else (args.steps, [])
    server = (f"taskset,-c,'1',{sys.executable},-m,megatron_fipo.rollout.cpu_server,--decode-step-ms,"
              f"'{args.decode_step_ms:g}'")  # the CPU server's own flag; its capacity is SGLang's argument:
    extra += ["rollout.engine=sglang", "rollout.mode=disaggregated", f"rollout.launcher=[{server}]",
              f"rollout.sglang.max_running_requests={args.max_running}", *args.set]
    import yaml

    with open(os.path.join(REPO, "examples", args.config), encoding="utf-8") as fh:
        n = int(yaml.safe_load(fh)["rollout"]["n"])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            k, more = SETTINGS[name]
            load = os.getloadavg()[0]  # other work on the machine skews the comparison: reported
            records = train(args.demo, os.path.join(args.keep or tmp, name), k, steps, extra + more, pinned=True,
                            config=args.config, label=name)
            results[name] = {**long_tail_summary(records, n, last=args.timed_last),
                             "load_before": load, "load_after": os.getloadavg()[0]}
    base = results[args.settings[0]]["samples_per_s"]
    print(f"\nSummary (long-tailed demo, trainer on core 0 / server on core 1 at {args.decode_step_ms:g} ms per "
          f"decode step; throughput over steps 3..{args.timed_last or steps}, Avg@4 at steps 0 and {steps})")
    print(f"{'setting':>9} {'samples/s':>10} {'ratio':>6} {'step s':>7} {'gen s':>6} {'wait s':>7} {'update s':>9} "
          f"{'sync s':>7} {'slots':>6} {'gen tok/s':>10} {'age':>5} {'Avg@4 start->end':>18}")
    for name, r in results.items():
        print(f"{name:>9} {r['samples_per_s']:>10.2f} {r['samples_per_s'] / base:>6.2f} {r['step_s']:>7.2f} "
              f"{r['generate_s']:>6.2f} {r['wait_rollout_s']:>7.2f} {r['train_s']:>9.2f} {r['sync_s']:>7.2f} "
              f"{r['slot_util']:>6.2f} {r['generated_tokens_per_s']:>10.1f} {r['token_age_mean']:>5.2f} "
              f"{r['avg4_start']:>8.4f} -> {r['avg4_end']:.4f}")
    print(f"\n{'setting':>9} {'trained len mean/p50/p90':>26} {'generated len mean/p50/p90':>28} {'scored len':>11}")
    for name, r in results.items():
        print(f"{name:>9} {r['trained_length_mean']:>10.1f} {r['trained_length_p50']:>7.1f} {r['trained_length_p90']:>7.1f} "
              f"{r['generated_length_mean']:>12.1f} {r['generated_length_p50']:>7.1f} {r['generated_length_p90']:>7.1f} "
              f"{r['response_length_mean']:>11.1f}")
    out = {"steps": steps, "timed_last": args.timed_last or steps, "decode_step_ms": args.decode_step_ms,
           "results": {name: {**r, "ratio": r["samples_per_s"] / base} for name, r in results.items()}}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1, default=float)
    return out


if __name__ == "__main__":
    main()
