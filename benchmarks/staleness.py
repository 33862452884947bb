"""Benchmark: the embedded demo trained synchronously (max_staleness 0) and one step ahead (1), side by side.

Run::

    python benchmarks/staleness.py [--demo build/demo] [--steps 30] [--ks 0 1] [--json out.json] [--quick]

Each setting trains the demo (``examples/demo_cpu.yaml``: its model, batch sizes and seed) in a fresh
``python -m megatron_fipo train`` process, one after the other on this machine, with the held-out
evaluation at the start and the end only (so the timed steps are training steps). Reported per
setting, from the run's ``metrics.jsonl``:

* throughput: trained samples (kept groups x ``rollout.n``) per second of step time, over every step
  but the first (the first has nothing to overlap with; the last step's closing evaluation is not
  counted); and the ratio to max_staleness 0;
* where a step's time goes: generation (of the batch it trains on, done ahead at k >= 1), the wait
  for that batch, old log-probs, the update;
* held-out Avg@4 before and after (200 problems, the demo's settings), and the rise;
* staleness: the mean age of the trained samples (weight versions).

Build the demo first (``python tools/make_demo.py``). Figures are reported, not asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(demo: str, run_dir: str, k: int, steps: int, extra: list, pinned: bool = False,
          config: str = "demo_cpu.yaml", label: str = "") -> list[dict]:
    """One demo run (``examples/<config>``) at ``rollout.max_staleness=k``; its metrics records."""
    label = label or f"k={k}"
    cmd = [sys.executable, "-m", "megatron_fipo", "train", "--config", os.path.join(REPO, "examples", config),
           f"model.hf_path={demo}/base", f"data.train_files=[{demo}/train.jsonl]", f"eval.files=[{demo}/test.jsonl]",
           f"train.run_dir={run_dir}", f"train.steps={steps}", f"rollout.max_staleness={k}", "eval.every_steps=0",
           "checkpoint.every_steps=0", "checkpoint.export_hf=false", "log.progress=false", "log.tensorboard=false",
           *extra]
    start = time.perf_counter()
    env = dict(os.environ)
    if pinned:  # the trainer's pool: core 0, one thread (the server's pool is core 1, see main)
        cmd, env["OMP_NUM_THREADS"] = ["taskset", "-c", "0", *cmd], "1"
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{label}: training failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    print(f"  {label}: {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def summarize(records: list[dict], n: int) -> dict:
    steps = [r for r in records if r["step"] > 1 and "train/kept_groups" in r]
    seconds = sum(r["time/step_s"] - r.get("time/eval_s", 0.0) for r in steps)
    samples = sum(r["train/kept_groups"] * n for r in steps)
    avg = [r["eval/avg@4"] for r in records if "eval/avg@4" in r]

    def mean(key):
        values = [r.get(key, 0.0) for r in steps]
        return sum(values) / max(len(values), 1)

    out = {"samples_per_s": samples / seconds, "timed_steps": len(steps), "step_s": mean("time/step_s"),
           "generate_s": mean("time/generate_s"), "wait_rollout_s": mean("time/wait_rollout_s"),
           "old_logp_s": mean("time/old_logp_s"), "train_s": mean("time/train_s"),
           "staleness_mean": mean("rollout/staleness_mean")}
    if avg:  # the held-out evaluations among the records
        out.update({"avg4_start": avg[0], "avg4_end": avg[-1], "avg4_rise": avg[-1] - avg[0]})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default=os.path.join(REPO, "build", "demo"), help="built demo (tools/make_demo.py)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--engine", choices=("cpu", "cpu-server"), default="cpu",
                    help="cpu: the in-process CPU engine (generation in a thread of the trainer); cpu-server: "
                         "disaggregated SGLang protocol, one CPU server process (rollout.cpu_server)")
    ap.add_argument("--pin", action="store_true",
                    help="with --engine cpu-server: two pools of one core each, as disaggregated GPUs are "
                         "(the trainer on core 0 with one thread, the server on core 1; taskset)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more config overrides for both runs (e.g. optim.max_tokens_per_micro_batch=1024)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="3 steps on 16 held-out problems (a smoke test)")
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(args.demo, "base")):
        raise SystemExit(f"no demo model in {args.demo}: run `python tools/make_demo.py` first")
    steps, extra = (3, ["eval.max_problems=16"]) if args.quick else (args.steps, [])
    extra += args.set
    if args.engine == "cpu-server":
        pin = "taskset,-c,'1'," if args.pin else ""
        extra += ["rollout.engine=sglang", "rollout.mode=disaggregated",
                  f"rollout.launcher=[{pin}{sys.executable},-m,megatron_fipo.rollout.cpu_server]"]
    elif args.pin:
        raise SystemExit("--pin needs --engine cpu-server (the in-process engine shares the trainer's cores)")
    n = 8  # the demo's rollout.n
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ks:
            results[k] = summarize(train(args.demo, os.path.join(tmp, f"k{k}"), k, steps, extra, args.pin), n)
    base = results[args.ks[0]]["samples_per_s"]
    print("\nSummary (the demo, 2 cores: trained samples per second over steps 2..N; held-out Avg@4)")
    print(f"{'k':>3} {'samples/s':>10} {'ratio':>6} {'step s':>7} {'gen s':>6} {'wait s':>7} {'old-logp s':>10} "
          f"{'update s':>9} {'Avg@4 start->end':>18} {'age':>5}")
    for k, r in results.items():
        print(f"{k:>3} {r['samples_per_s']:>10.2f} {r['samples_per_s'] / base:>6.2f} {r['step_s']:>7.2f} "
              f"{r['generate_s']:>6.2f} {r['wait_rollout_s']:>7.2f} {r['old_logp_s']:>10.2f} {r['train_s']:>9.2f} "
              f"{r['avg4_start']:>8.4f} -> {r['avg4_end']:.4f} {r['staleness_mean']:>5.2f}")
    out = {"steps": steps, "results": {str(k): {**r, "ratio": r["samples_per_s"] / base} for k, r in results.items()}}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
