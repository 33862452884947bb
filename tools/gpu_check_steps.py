"""The steps of the GPU node check (``tools/gpu_check.sh``), one per run: ``gpu_check_steps.py STEP --result F``.

Each step writes ``{"status": "pass" | "fail" | "skip", "reason": ..., "figures": {...}}`` to its
result file and exits 0 (1 on a failure). ``--cpu`` runs a step on a CPU machine: what needs CUDA
uses its CPU substitute (bf16 actor on the CPU, shared memory instead of CUDA-IPC handles) or a
smaller shape, and the figures say so. The runner (``tools/gpu_check.py``) time-boxes each step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Step-1 metrics of the demo on the device (bf16) against the same run on CPU (fp32). The samples, rewards
# and lengths come from the same CPU rollout of the same base weights with the same seeds, so they are
# equal; what the actor computes differs by bf16 rounding. bf16 keeps 8 significand bits (relative
# rounding up to 2^-9 per operation); through the demo's layers a token's log-prob moves by up to a few
# 1e-2 (the bf16 GPU tests' 5e-2), and a step's metrics average ~1-2k tokens, so the averages move by
# far less. Tolerances: (relative, absolute), passing when either holds.
EXACT_KEYS = ("train/reward_mean", "train/acc_mean", "train/response_length_mean", "train/generated_samples",
              "train/kept_groups", "train/response_tokens")
CLOSE_KEYS = {"train/entropy": (0.05, 0.01), "train/loss": (0.25, 0.02), "train/grad_norm": (0.10, 0.02),
              "train/ppo_kl": (0.0, 0.005), "train/pg_clipfrac": (0.0, 0.02)}
BF16_LOGP_ABS_DIFF_MAX = 0.05  # mean |trainer bf16 log-prob - rollout fp32 log-prob| on the same weights


def _python_env(**extra) -> dict:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), REPO) if p)
    return env


# ------------------------------------------------------------------------------------------ environment
def environment(args) -> dict:
    import torch

    figures = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
               "cpus": os.cpu_count()}
    for name, module in (("transformers", "transformers"), ("megatron_core", "megatron.core"),
                         ("transformer_engine", "transformer_engine"), ("apex", "apex"), ("sglang", "sglang")):
        try:
            mod = __import__(module, fromlist=["__version__"])
            figures[name] = getattr(mod, "__version__", "present")
            if name == "megatron_core":
                figures["megatron_core_path"] = os.path.dirname(mod.__file__)
        except Exception as exc:  # absent, or present but broken: both are worth a line
            figures[name] = f"absent ({type(exc).__name__}: {str(exc)[:120]})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures.update(gpu=props.name, gpus=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                       memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                       nccl=torch.distributed.is_nccl_available())
    missing = [n for n in ("transformer_engine", "apex", "sglang") if str(figures[n]).startswith("absent")]
    note = f"without {', '.join(missing)}: the steps that need them skip" if missing else ""
    if args.cpu:
        return {"status": "pass", "reason": "CPU mode" + (f"; {note}" if note else ""), "figures": figures}
    if not torch.cuda.is_available():
        return {"status": "fail", "reason": "torch sees no GPU (torch.cuda.is_available() is False); on a CPU "
                                            "machine run with --cpu", "figures": figures}
    return {"status": "pass", "reason": note, "figures": figures}


# ------------------------------------------------------------------------------------------ gpu_tests
def gpu_tests(args) -> dict:
    xml = os.path.join(args.scratch, "gpu_tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", os.path.join(REPO, "tests", "gpu"), "-q", "-rA",
           "-p", "no:cacheprovider", f"--junitxml={xml}", f"--basetemp={os.path.join(args.scratch, 'pytest')}",
           "-o", "junit_family=xunit1"]
    proc = subprocess.run(cmd, cwd=REPO, env=_python_env(), text=True, capture_output=True)
    print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n")
    if not os.path.exists(xml):
        return {"status": "fail", "reason": f"pytest exited {proc.returncode} without a report: {proc.stderr[-300:]}"}
    tests = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, reason = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "failed", "skipped": "skipped"}[tag]
                reason = (node.get("message") or "").replace("\n", " ")[:300]
        tests.append({"test": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
                      "outcome": outcome, "seconds": round(float(case.get("time", 0)), 1), "reason": reason})
    counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "skipped")}
    figures = dict(counts, tests=tests)
    if not tests:
        return {"status": "fail", "reason": "no GPU test was collected", "figures": figures}
    if counts["failed"] or proc.returncode not in (0, 5):
        return {"status": "fail", "reason": f"{counts['failed']} of {len(tests)} failed", "figures": figures}
    if not counts["passed"]:
        reasons = sorted({t["reason"] for t in tests})
        return {"status": "skip", "reason": f"all {len(tests)} skipped: " + "; ".join(reasons)[:300], "figures": figures}
    return {"status": "pass", "reason": f"{counts['passed']} passed, {counts['skipped']} skipped (several GPUs, "
                                        "TE or SGLang)", "figures": figures}


# ------------------------------------------------------------------------------------------ demo_bf16
def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _train(run_dir: str, demo: str, device_env: dict, *overrides) -> tuple:
    from tests.helpers import DEMO_CONFIG, SMALL_RUN, demo_overrides

    # the e2e tests' small run, one optimizer step per training step with 8 samples per prompt
    cmd = [sys.executable, "-m", "megatron_fipo", "train", "--config", DEMO_CONFIG, *demo_overrides(
        demo, run_dir, *SMALL_RUN, "rollout.n=8", "train.mini_batch_prompts=8", *overrides)]
    t0 = time.monotonic()
    _say(f"$ {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=REPO, env=_python_env(**device_env), text=True, capture_output=True)
    print(f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"train exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or proc.stdout[-200:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return {r["step"]: r for r in records if r.get("step", 0) >= 1 and "train/reward_mean" in r}, \
        round(time.monotonic() - t0, 1)


def compare_step(device: dict, cpu: dict) -> list:
    """The differences between two step-1 records beyond ``EXACT_KEYS`` / ``CLOSE_KEYS``."""
    bad = []
    for key in EXACT_KEYS:
        if device.get(key) != cpu.get(key):
            bad.append(f"{key}: {device.get(key)} vs {cpu.get(key)} (must be equal)")
    for key, (rel, abs_) in CLOSE_KEYS.items():
        a, b = device.get(key), cpu.get(key)
        if a is None or b is None or not (abs(a - b) <= abs_ or abs(a - b) <= rel * abs(b)):
            bad.append(f"{key}: {a} vs {b} (tolerance rel {rel}, abs {abs_})")
    return bad


def demo_bf16(args) -> dict:
    import torch

    from megatron_fipo.data.demo_task import build_demo

    work = os.path.join(args.scratch, "demo_check")
    demo = os.environ.get("FIPO_GPU_CHECK_DEMO") or os.path.join(work, "demo")  # a built one is reused
    t0 = time.monotonic()
    _say("building the demo (its base model: 1,000 supervised steps, about 1 minute on 2 cores)")
    build_demo(demo)  # the tests' demo: a base model that half-knows the task, so step 1 has groups to train
    figures = {"demo_build_s": round(time.monotonic() - t0, 1)}
    on_gpu = torch.cuda.is_available() and not args.cpu
    figures["device"] = torch.cuda.get_device_name() if on_gpu else "cpu (bf16 actor: the CUDA run's substitute)"
    run = os.path.join(work, "bf16")
    records, figures["bf16_run_s"] = _train(run, demo, {}, "model.params_dtype=bfloat16", "train.steps=2",
                                            "checkpoint.every_steps=2", "checkpoint.export_hf=true")
    reference, figures["cpu_fp32_run_s"] = _train(os.path.join(work, "cpu_fp32"), demo, {"CUDA_VISIBLE_DEVICES": ""},
                                                  "model.params_dtype=float32", "train.steps=1",
                                                  "checkpoint.every_steps=0", "checkpoint.export_hf=false")
    if "train/loss" not in records.get(1, {}) or "train/loss" not in reference.get(1, {}):
        return {"status": "fail", "reason": "step 1 trained nothing to compare (no group with varying rewards): "
                                            "see the log", "figures": figures}
    keys = EXACT_KEYS + tuple(CLOSE_KEYS) + ("rollout/logprob_abs_diff", "rollout/token_mult_prob_error")
    figures["step1_bf16"] = {k: records[1].get(k) for k in keys}
    figures["step1_cpu_fp32"] = {k: reference[1].get(k) for k in keys}
    problems = compare_step(records[1], reference[1])
    checked = [(records[1], "step 1")]
    if "train/loss" in records.get(2, {}):  # step 2's rollouts come from the synced bf16 weights
        figures["step2_bf16"] = {k: records[2].get(k) for k in ("rollout/logprob_abs_diff",
                                                                 "rollout/token_mult_prob_error", "time/sync_s")}
        checked.append((records[2], "step 2 (after a weight sync)"))
    else:
        figures["step2_bf16"] = "trained nothing (no group with varying rewards); its weight sync ran"
    for rec, name in checked:
        if not rec.get("rollout/logprob_abs_diff", 1.0) <= BF16_LOGP_ABS_DIFF_MAX:
            problems.append(f"{name}: trainer vs rollout log-probs differ by {rec.get('rollout/logprob_abs_diff')} "
                            f"on average (bf16 rounding is below {BF16_LOGP_ABS_DIFF_MAX})")
    # the checkpoint back to HF, checked against the Megatron model by log-probs
    export = os.path.join(work, "export")
    cmd = [sys.executable, "-m", "megatron_fipo", "convert", "--from-mcore", os.path.join(run, "checkpoints"),
           "--to-hf", export, "--dtype", "bfloat16", "--verify"]
    t0 = time.monotonic()
    _say(f"$ {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=REPO, env=_python_env(), text=True, capture_output=True)
    print(f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}", flush=True)
    figures["export_verify_s"] = round(time.monotonic() - t0, 1)
    figures["export_verify"] = (proc.stdout.strip().splitlines() or [""])[-1][:300]
    if proc.returncode != 0:
        problems.append(f"convert --to-hf --verify exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    status = "fail" if problems else "pass"
    return {"status": status, "reason": "; ".join(problems)[:900], "figures": figures}


# ------------------------------------------------------------------------------------------ ipc_handles
def ipc_handles(args) -> dict:
    import torch

    from tests.gpu.test_one_gpu import ipc_roundtrip

    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda:0"
    figures = ipc_roundtrip(device)
    figures["transport"] = "CUDA-IPC handles" if device.startswith("cuda") else "shared memory (the CPU substitute)"
    if not figures["bit_exact"]:
        return {"status": "fail", "reason": f"tensors differ after the handles were opened: {figures['mismatched']}",
                "figures": figures}
    return {"status": "pass", "reason": figures["transport"], "figures": figures}


# ------------------------------------------------------------------------------------------ future_kl
def _timed(fn, repeats: int, sync) -> list:
    fn()  # warm-up (kernels, the scan's cached decay matrices, the allocator)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def future_kl(args) -> dict:
    import torch

    from benchmarks.future_kl import GAMMA, baseline_future_kl, make_inputs, masked_signal, ours_future_kl
    from megatron_fipo.algo.future_kl import discounted_suffix_sum

    cuda = torch.cuda.is_available() and not args.cpu
    batch, length = (64, 20480) if cuda else (8, 4096)
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    inputs = {k: v.detach().to(dev) for k, v in make_inputs(batch, length, seed=1).items()}
    inputs["logp"].requires_grad_(True)
    base = baseline_future_kl(inputs["logp"], inputs["old_logp"], inputs["mask"], GAMMA).detach()
    ours = ours_future_kl(inputs["logp"], inputs["old_logp"], inputs["mask"], GAMMA)
    with torch.no_grad():
        D = masked_signal(inputs["logp"], inputs["old_logp"], inputs["mask"])
    ref = discounted_suffix_sum(D.double(), GAMMA)  # the scan in float64: the reference both are held to
    scale = float(ref.abs().max())
    figures = {"device": torch.cuda.get_device_name() if cuda else "cpu", "batch": batch, "length": length,
               "max_abs_err_ours": float((ours.double() - ref).abs().max()) / scale,
               "max_abs_err_released": float((base.double() - ref).abs().max()) / scale}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_base = _timed(lambda: baseline_future_kl(inputs["logp"], inputs["old_logp"], inputs["mask"], GAMMA), 3, sync)
    mem_base = torch.cuda.max_memory_allocated() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_ours = _timed(lambda: ours_future_kl(inputs["logp"], inputs["old_logp"], inputs["mask"], GAMMA), 10, sync)
    mem_ours = torch.cuda.max_memory_allocated() if cuda else None
    figures.update(released_s=statistics.median(t_base), ours_s=statistics.median(t_ours),
                   speedup=statistics.median(t_base) / statistics.median(t_ours))
    if cuda:
        figures.update(released_peak_gib=round(mem_base / 2**30, 2), ours_peak_gib=round(mem_ours / 2**30, 3))
    bad = [k for k in ("max_abs_err_ours", "max_abs_err_released") if not figures[k] <= 1e-4]
    reason = f"B={batch} T={length}: released {figures['released_s'] * 1e3:.1f} ms, ours {figures['ours_s'] * 1e3:.2f} ms " \
             f"({figures['speedup']:.0f}x)"
    if bad:
        return {"status": "fail", "reason": f"{reason}; error over 1e-4 of the largest value: {bad}", "figures": figures}
    return {"status": "pass", "reason": reason, "figures": figures}


# ------------------------------------------------------------------------------------------ actor_throughput
def actor_throughput(args) -> dict:
    from benchmarks import actor_throughput as bench

    if args.cpu:
        figures = bench.run(tiny=True, micro_batch_tokens=512, sequence_tokens=128, micro_batches=2, steps=2)
        figures["note"] = "CPU: the tiny shape; the 1.5B shape needs a GPU"
    else:
        figures = bench.run()
    if figures["skipped"]:
        return {"status": "fail", "reason": "the optimizer step was skipped (non-finite)", "figures": figures}
    mfu = f", MFU {figures['mfu']:.1%}" if figures["mfu"] is not None else ""
    return {"status": "pass", "reason": f"{figures['shape']}: {figures['tokens_per_s']:.0f} tokens/s{mfu}",
            "figures": figures}


STEPS = {"environment": environment, "gpu_tests": gpu_tests, "demo_bf16": demo_bf16, "ipc_handles": ipc_handles,
         "future_kl": future_kl, "actor_throughput": actor_throughput}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--result", required=True)
    p.add_argument("--scratch", required=True)
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    try:
        result = STEPS[args.step](args)
    except Exception as exc:  # the step's own failure, written where the runner reads it
        import traceback

        traceback.print_exc()
        result = {"status": "fail", "reason": f"{type(exc).__name__}: {str(exc)[:600]}"}
    with open(args.result, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    return 1 if result["status"] == "fail" else 0


if __name__ == "__main__":
    sys.exit(main())
