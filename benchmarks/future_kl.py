"""Benchmark: FIPO Future-KL, released O(B*T^2) chunked matmul vs our O(B*T) scan vs cumsum.

Run::

    python benchmarks/future_kl.py [--batch 8] [--lengths 1024,2048,4096,8192,20480]
                                   [--repeats N] [--threads N] [--json out.json] [--quick]
                                   [--wait-idle SECONDS] [--no-memory] [--mem-isolation shared]

Three things are measured on the same ``[B, T]`` fp32 inputs (``gamma = 2 ** (-1/32)``), in the
same run:

``baseline``
    The released algorithm, re-written here from its description: ``logp`` carries grad,
    ``d = clamp(logp - old_logp, -20, 20)``, ``D = d * mask * (d <= log(10))``, then a Python
    loop over 128-column chunks, each building a dense ``[T, 128]`` decay block
    ``gamma ** distance.clamp(min=0) * (distance >= 0)`` and adding
    ``D[:, chunk] @ decay_block.T`` into ``future_kl``. O(B*T^2) work; because ``D`` requires
    grad, autograd saves every decay block (``ceil(T/128) * T * 128 * 4`` bytes). Time and memory
    are for the forward only, graph included (as in training): the peak is read while the
    result, and so the graph, is still alive.
``ours``
    The same ``D`` (computed under ``no_grad``: Future-KL is stop-grad), then
    ``megatron_fipo.algo.future_kl.discounted_suffix_sum(D, gamma)``. End to end, comparable with
    ``baseline``. ``ours scan`` is the scan call alone on a precomputed ``D``; that is what is
    compared with the floor.
``cumsum``
    The floor: ``torch.cumsum(D, dim=-1)`` on the same precomputed ``[B, T]`` fp32 tensor (same
    input, one output of the same size, one pass).

Wall time: ``time.perf_counter``. After warm-up, each repeat times a batch of ``inner`` back-to-back
calls (``inner`` chosen so a batch lasts >= ~20 ms; 1 for anything slower), the per-call time of a
repeat is batch time / inner, and the reported figure is the median over repeats. The kinds are
interleaved (each round times one batch of every kind that has repeats left), so a burst of
load from another process inflates all of them rather than one (the minimum
is printed and saved too: it is the figure least disturbed by other processes; with OpenMP
threads on every core, a concurrent process inflates small calls a lot, so run on an idle
machine; the load average at start is printed and a busy machine is flagged). The baseline is
slow at large T (seconds per call at T=20480), so it gets at most 3 repeats, fewer if a call
takes long (``--baseline-repeats`` overrides), and it is warmed up at ``min(T, 4096)``.
``torch.set_num_threads`` is set once (default: all cores available to the process) in the
parent and in every memory worker, and printed.

Peak memory: peak resident-set growth, measured in a fresh subprocess per measurement
(``--mem-isolation process``, the default). The worker

1. is started with ``MALLOC_MMAP_THRESHOLD_=4096 MALLOC_TRIM_THRESHOLD_=0 MALLOC_TOP_PAD_=0``:
   glibc then serves every allocation >= 4 KiB (every tensor that matters here) with its own
   ``mmap``, ``munmap``s it on free, and keeps no free slack at the heap top, so freed memory
   leaves the RSS at once and a later tensor cannot silently reuse already-resident pages
   (which would hide its growth; without these settings a 32 KiB tensor was seen to cost 0);
2. sets the thread count, builds the inputs, and does one warm-up call (same size; the baseline
   above T=4096 warms up at T=4096) so one-time costs (thread pools, BLAS buffers, the scan's
   cached decay matrices) are not counted, then drops its result;
3. writes ``5`` to ``/proc/self/clear_refs`` (resets the kernel's peak RSS, ``VmHWM``, to the
   current RSS), reads ``VmRSS`` from ``/proc/self/status``, makes the measured call, and reads
   ``VmHWM`` while the result (and for the baseline its autograd graph) is still alive.

Reported memory = ``VmHWM_after - VmRSS_before``: everything the call made resident at its
peak, beyond the inputs (which exist before the reset), output included. Precision: what is
still alive at the read is counted to the page (checked: a 16 KiB..64 MiB tensor reads as its
size + 4 KiB). A transient peak that is freed before the read can be *under*-reported by up to
``max(32, 2 * ncpu)`` pages per CPU (0.25 MiB on 2 CPUs): since Linux 6.2 the kernel records
``VmHWM`` at ``munmap`` from its approximate per-CPU RSS counters (measured here: a 256 KiB
tensor allocated and freed read as 44..212 KiB, 4 MiB as 3.91..4.02 MiB). So readings under
~0.5 MiB are rough, and the memory ratio baseline/ours is also given as a conservative lower
bound, ``baseline / (ours + that slack)``. Each run checks the method with a calibration worker
that allocates and fills a 64 MiB tensor (after allocating and freeing one of the same size)
and prints what was read. ``--mem-isolation shared`` (the ``--quick`` default) makes all the
measurements one after another in one worker (the calibration covers that too: it runs after
a freed allocation); it saves the ~2 s torch import per measurement.

Accuracy: for every T, ``F`` in float64 from an independent reference (the plain reverse
recurrence ``F_t = D_t + gamma * F_{t+1}``, a Python loop over t on float64 columns) is compared
with ours in fp32 and fp64 and with the baseline in fp32; errors are ``max |F - F_ref| / max
|F_ref|``. At the smallest T the fp64 reference is also checked against the baseline formula run
in float64.

Exit code 0 whatever the figures; targets (T=20480, B=8: baseline/ours >= 1000x time and >= 10x
memory; ours scan / cumsum <= 4x time) are printed as met / MISSED.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

try:
    from megatron_fipo.algo.future_kl import discounted_suffix_sum
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_fipo.algo.future_kl import discounted_suffix_sum

DECAY_RATE = 32.0
GAMMA = 2.0 ** (-1.0 / DECAY_RATE)
DUAL_CLIP_C = 10.0
CHUNK = 128  # column chunk of the released implementation
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 20480)
QUICK_LENGTHS = (256, 1024)
KINDS = ("baseline", "ours", "scan", "cumsum")
LABELS = {"baseline": "baseline", "ours": "ours", "scan": "ours scan", "cumsum": "cumsum"}
BASELINE_WARMUP_MAX_T = 4096
MIN_BATCH_SECONDS = 0.02
BASELINE_BUDGET_SECONDS = 30.0
CALIB_MIB = 64
# glibc: every allocation >= 4 KiB gets its own mmap (munmap on free), the heap top is trimmed
# at once and never padded, so freed memory is never silently reused without RSS growth.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}
MEM_FLOOR_MIB = 0.05  # below this a reading is noise: no ratio is formed with it
TARGET_T, TARGET_B = 20480, 8
TARGET_TIME_X, TARGET_MEM_X, TARGET_FLOOR_X = 1000.0, 10.0, 4.0


# --------------------------------------------------------------------------------------------
# the functions under comparison


def make_inputs(batch: int, length: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Synthetic micro-batch: log-probs with a small policy drift, some ratios above the dual
    clip, and right padding (each row's response length drawn in [T/2, T])."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + length * 31 + batch)
    old_logp = -torch.rand(batch, length, generator=g) * 3.0
    drift = 0.05 * torch.randn(batch, length, generator=g)
    spikes = torch.rand(batch, length, generator=g) < 1e-3  # r > c on ~0.1% of tokens
    drift = torch.where(spikes, torch.full_like(drift, 3.0), drift)
    logp = (old_logp + drift).requires_grad_(True)
    lengths = torch.randint(max(1, length // 2), length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    return {"logp": logp, "old_logp": old_logp, "mask": mask}


def masked_signal(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``D = d * mask * 1[d <= log(c)]`` with ``d = clamp(logp - old_logp, -20, 20)``."""
    d = torch.clamp(logp - old_logp, min=-20.0, max=20.0)
    return d * mask * (d <= math.log(DUAL_CLIP_C))


def baseline_future_kl(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, gamma: float = GAMMA
) -> torch.Tensor:
    """The released chunked-matmul Future-KL (with autograd through ``D``)."""
    D = masked_signal(logp, old_logp, mask)
    return _baseline_from_signal(D, gamma)


def _baseline_from_signal(D: torch.Tensor, gamma: float) -> torch.Tensor:
    B, T = D.shape
    # fp32 exactly as released (python float ** int tensor -> default dtype); fp64 for the check
    base = gamma if D.dtype == torch.float32 else torch.tensor(gamma, dtype=D.dtype)
    future_kl = torch.zeros(B, T, dtype=D.dtype, device=D.device)
    rows = torch.arange(T, device=D.device)
    for j_start in range(0, T, CHUNK):
        j_end = min(T, j_start + CHUNK)
        j = torch.arange(j_start, j_end, device=D.device)
        distance = j[None, :] - rows[:, None]  # [T, Kb]
        decay_block = base ** distance.clamp(min=0) * (distance >= 0)
        future_kl += D[:, j_start:j_end] @ decay_block.T
    return future_kl


def ours_future_kl(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, gamma: float = GAMMA
) -> torch.Tensor:
    """Same ``D`` (stop-grad), then the O(T) scan."""
    with torch.no_grad():
        D = masked_signal(logp, old_logp, mask)
    return discounted_suffix_sum(D.detach(), gamma)


def reference_fp64(D: torch.Tensor, gamma: float = GAMMA) -> torch.Tensor:
    """Independent float64 reference: the reverse recurrence, one column at a time."""
    D64 = D.detach().to(torch.float64)
    out = torch.empty_like(D64)
    acc = torch.zeros(D64.shape[0], dtype=torch.float64)
    for t in range(D64.shape[1] - 1, -1, -1):
        acc = D64[:, t] + gamma * acc
        out[:, t] = acc
    return out


def _signal(inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return masked_signal(inputs["logp"], inputs["old_logp"], inputs["mask"]).contiguous()


def _callable(kind: str, inputs: Dict[str, torch.Tensor], D: torch.Tensor) -> Callable[[], torch.Tensor]:
    if kind == "baseline":
        return lambda: baseline_future_kl(inputs["logp"], inputs["old_logp"], inputs["mask"], GAMMA)
    if kind == "ours":
        return lambda: ours_future_kl(inputs["logp"], inputs["old_logp"], inputs["mask"], GAMMA)
    if kind == "scan":
        return lambda: discounted_suffix_sum(D, GAMMA)
    if kind == "cumsum":
        return lambda: torch.cumsum(D, dim=-1)
    raise ValueError(kind)


# --------------------------------------------------------------------------------------------
# timing


def _prepare_timing(kind: str, inputs: Dict[str, torch.Tensor], D: torch.Tensor, repeats: int,
                    baseline_repeats: Optional[int]) -> dict:
    """Warm up one kind and size its timing: ``inner`` calls per repeat, ``n_rep`` repeats."""
    fn = _callable(kind, inputs, D)
    batch, length = D.shape
    if kind == "baseline" and length > BASELINE_WARMUP_MAX_T:
        w_inputs = make_inputs(batch, BASELINE_WARMUP_MAX_T)
        w_fn = _callable(kind, w_inputs, _signal(w_inputs))
        w_fn()
        t0 = time.perf_counter()
        w_fn()
        # estimate from the O(T^2) scaling; only used to size the repeat count
        t_call = (time.perf_counter() - t0) * (length / BASELINE_WARMUP_MAX_T) ** 2
        del w_inputs, w_fn
    else:
        fn()  # warm-up
        t_call = float("inf")
        for _ in range(3):  # min of a few: one scheduling hiccup must not set inner = 1
            t0 = time.perf_counter()
            out = fn()
            t_call = min(t_call, time.perf_counter() - t0)
            del out
    gc.collect()
    if kind == "baseline":
        n_rep = baseline_repeats or max(1, min(3, repeats, int(BASELINE_BUDGET_SECONDS / max(t_call, 1e-9))))
        inner = 1
    else:
        n_rep = repeats
        inner = max(1, min(100_000, math.ceil(MIN_BATCH_SECONDS / max(t_call, 1e-9))))
    return {"fn": fn, "n_rep": n_rep, "inner": inner, "times": [], "last": None}


def _time_length(batch: int, length: int, repeats: int, baseline_repeats: Optional[int]):
    """Time every kind at one length, interleaved: round ``r`` times one batch of each kind that
    still has repeats left, so a burst of load from other processes hits all kinds alike."""
    inputs = make_inputs(batch, length)
    D = _signal(inputs)
    plans = {k: _prepare_timing(k, inputs, D, repeats, baseline_repeats) for k in KINDS}
    for r in range(max(p["n_rep"] for p in plans.values())):
        for k in KINDS:
            p = plans[k]
            if r >= p["n_rep"]:
                continue
            fn, inner = p["fn"], p["inner"]
            out = None
            t0 = time.perf_counter()
            for _ in range(inner):
                out = fn()
            dt = time.perf_counter() - t0
            p["times"].append(dt / inner)
            p["last"] = out.detach()
            del out  # frees the baseline's graph outside the timed region
    timings = {k: {"seconds": statistics.median(p["times"]), "repeats": p["n_rep"], "inner": p["inner"],
                   "all": p["times"]} for k, p in plans.items()}
    return timings, {k: p["last"] for k, p in plans.items()}


# --------------------------------------------------------------------------------------------
# memory (worker side)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure_one(kind: str, batch: int, length: int) -> Dict[str, float]:
    gc.collect()
    if kind == "calib":
        n = CALIB_MIB * 2**20 // 4
        warm = torch.ones(n)
        del warm
        gc.collect()
        _reset_peak()
        before = _status_kib("VmRSS")
        x = torch.ones(n)
        peak = _status_kib("VmHWM")
        del x
        return {"mib": (peak - before) / 1024, "expected_mib": float(CALIB_MIB)}
    inputs = make_inputs(batch, length)
    D = _signal(inputs)
    if kind == "baseline" and length > BASELINE_WARMUP_MAX_T:
        w = make_inputs(batch, BASELINE_WARMUP_MAX_T)
        _callable(kind, w, _signal(w))()
        del w
    else:
        _callable(kind, inputs, D)()
    fn = _callable(kind, inputs, D)
    gc.collect()
    _reset_peak()
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")  # result (and graph) still alive
    out_mib = out.numel() * out.element_size() / 2**20
    del out
    gc.collect()
    return {"mib": (peak - before) / 1024, "output_mib": out_mib}


def _worker_main(spec: str, threads: int) -> int:
    """``spec``: ``kind:batch:length[,kind:batch:length...]``; prints one JSON list."""
    torch.set_num_threads(threads)
    res = []
    for item in spec.split(","):
        kind, b, t = item.split(":")
        res.append({"kind": kind, "batch": int(b), "length": int(t), **_measure_one(kind, int(b), int(t))})
    print("MEMRESULT " + json.dumps(res), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# memory (parent side)


def _run_workers(jobs: List[str], threads: int, isolation: str) -> List[dict]:
    env = dict(os.environ)
    env.update(MALLOC_ENV)
    env["OMP_NUM_THREADS"] = str(threads)
    groups = [[j] for j in jobs] if isolation == "process" else [jobs]
    results: List[dict] = []
    for group in groups:
        cmd = [sys.executable, os.path.abspath(__file__), "--_mem-worker", ",".join(group),
               "--threads", str(threads)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("MEMRESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory worker failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        results.extend(json.loads(lines[-1][len("MEMRESULT "):]))
    return results


# --------------------------------------------------------------------------------------------
# report


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (x.to(torch.float64) - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def _fmt_ms(s: float) -> str:
    ms = s * 1e3
    if ms >= 100:
        return f"{ms:,.0f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.4f}"


def _fmt_x(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}x" if x >= 100 else f"{x:.2f}x"


def _ratio(num_mib: float, den_mib: float) -> Optional[float]:
    """Memory ratio, or None when the denominator is below the measurement's resolution."""
    return num_mib / den_mib if den_mib >= MEM_FLOOR_MIB else None


def _hwm_slack_mib() -> float:
    """Most a freed transient peak can be under-reported (per-CPU RSS counter batching)."""
    ncpu = os.cpu_count() or 1
    return max(32, 2 * ncpu) * ncpu * os.sysconf("SC_PAGE_SIZE") / 2**20


def _parse_lengths(s: str) -> List[int]:
    out = [int(v) for v in s.split(",") if v.strip()]
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"bad --lengths {s!r}")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lengths", type=_parse_lengths, default=None,
                   help="comma-separated T values (default %s)" % ",".join(map(str, DEFAULT_LENGTHS)))
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 15; --quick: 1)")
    p.add_argument("--baseline-repeats", type=int, default=None,
                   help="timed repeats of the baseline (default: min(3, repeats), fewer if slow)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--mem-isolation", choices=("process", "shared"), default=None,
                   help="one subprocess per memory measurement (default) or one for all (--quick)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before timing, wait up to this long for the 1-min load average to fall below "
                        "half the thread count (other processes distort timings badly)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--quick", action="store_true", help="small lengths, 1 repeat (smoke test)")
    p.add_argument("--_mem-worker", dest="mem_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if args.mem_worker is not None:
        return _worker_main(args.mem_worker, threads)

    lengths = args.lengths or (list(QUICK_LENGTHS) if args.quick else list(DEFAULT_LENGTHS))
    repeats = args.repeats or (1 if args.quick else 15)
    isolation = args.mem_isolation or ("shared" if args.quick else "process")
    do_memory = not args.no_memory and sys.platform.startswith("linux")
    torch.set_num_threads(threads)
    B = args.batch

    print(f"FIPO Future-KL benchmark: B={B}, T in {lengths}, gamma=2^(-1/{DECAY_RATE:g})={GAMMA:.6f}, fp32")
    print(f"torch {torch.__version__}, torch.get_num_threads()={torch.get_num_threads()}, "
          f"cpus={os.cpu_count()}, python {platform.python_version()}, {platform.machine()}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        busy = load[0] > 0.5 * threads
        print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
              + (" -- WARNING: machine busy, timings will be inflated/noisy" if busy else " (idle)"))
    print(f"time: median of {repeats} repeats after warm-up (baseline: <= 3); "
          f"memory: peak RSS growth, {'one subprocess per measurement' if isolation == 'process' else 'one shared subprocess'}"
          f"{'' if do_memory else ' (SKIPPED)'}")

    report: dict = {
        "config": {"batch": B, "lengths": lengths, "gamma": GAMMA, "decay_rate": DECAY_RATE, "dtype": "float32",
                   "threads": torch.get_num_threads(), "repeats": repeats, "torch": torch.__version__,
                   "python": platform.python_version(), "cpu_count": os.cpu_count(),
                   "memory_method": ("peak RSS growth: VmHWM after - VmRSS before, VmHWM reset by "
                                     "clear_refs=5, glibc env " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
                                     + f", isolation={isolation}") if do_memory else None},
        "results": [],
    }
    report["config"]["load_average_at_start"] = list(load) if load else None

    mem: Dict[tuple, dict] = {}
    if do_memory:
        jobs = [f"calib:0:0"] + [f"{k}:{B}:{T}" for T in lengths for k in KINDS]
        t0 = time.perf_counter()
        for r in _run_workers(jobs, threads, isolation):
            mem[(r["kind"], r["length"])] = r
        calib = mem[("calib", 0)]
        ok = abs(calib["mib"] - CALIB_MIB) <= 0.05 * CALIB_MIB
        print(f"memory calibration: {CALIB_MIB} MiB tensor measured as {calib['mib']:.2f} MiB "
              f"({'ok' if ok else 'SUSPICIOUS'}); freed transients may read up to {_hwm_slack_mib():.2f} MiB low; "
              f"workers took {time.perf_counter() - t0:.1f} s")
        report["config"]["memory_transient_slack_mib"] = _hwm_slack_mib()
        report["config"]["memory_calibration_mib"] = calib["mib"]

    if args.wait_idle > 0 and hasattr(os, "getloadavg"):
        deadline = time.monotonic() + args.wait_idle
        while os.getloadavg()[0] > 0.5 * threads and time.monotonic() < deadline:
            time.sleep(10)
        load = os.getloadavg()
        report["config"]["load_average_at_timing_start"] = list(load)
        print(f"load average when timing starts: {load[0]:.2f}"
              + (" -- still busy" if load[0] > 0.5 * threads else " (idle)"))

    for T in lengths:
        row: dict = {"length": T, "batch": B, "time_ms": {}, "time_repeats": {}, "memory_mib": {}}
        timings, outs = _time_length(B, T, repeats, args.baseline_repeats)
        for k in KINDS:
            tm = timings[k]
            row["time_ms"][k] = tm["seconds"] * 1e3
            row.setdefault("time_ms_min", {})[k] = min(tm["all"]) * 1e3
            row["time_repeats"][k] = {"repeats": tm["repeats"], "inner": tm["inner"],
                                      "per_call_ms_each_repeat": [t * 1e3 for t in tm["all"]]}
            if do_memory:
                row["memory_mib"][k] = mem[(k, T)]["mib"]
        tms, mm = row["time_ms"], row["memory_mib"]
        row["ratios"] = {
            "baseline_over_ours_time": tms["baseline"] / tms["ours"],
            "ours_scan_over_cumsum_time": tms["scan"] / tms["cumsum"],
            "ours_over_cumsum_time": tms["ours"] / tms["cumsum"],
        }
        if do_memory:
            slack = _hwm_slack_mib()
            row["ratios"]["baseline_over_ours_memory"] = _ratio(mm["baseline"], mm["ours"])
            row["ratios"]["baseline_over_ours_memory_lower_bound"] = mm["baseline"] / (max(mm["ours"], 0.0) + slack)
            row["ratios"]["ours_scan_over_cumsum_memory"] = _ratio(mm["scan"], mm["cumsum"])
        row["baseline_saved_decay_blocks_mib"] = math.ceil(T / CHUNK) * T * CHUNK * 4 / 2**20

        # accuracy against an independent float64 reference
        inputs = make_inputs(B, T)
        D = _signal(inputs)
        ref = reference_fp64(D)
        acc = {
            "ours_fp32": _rel_err(outs["ours"], ref),
            "ours_scan_fp32": _rel_err(outs["scan"], ref),
            "ours_fp64": _rel_err(discounted_suffix_sum(D.double(), GAMMA), ref),
            "baseline_fp32": _rel_err(outs["baseline"], ref),
            "max_abs_F": ref.abs().max().item(),
        }
        assert outs["ours"].dtype == torch.float32 and not outs["ours"].requires_grad
        if T == min(lengths):
            acc["reference_vs_baseline_fp64"] = _rel_err(_baseline_from_signal(D.double(), GAMMA), ref)
        row["accuracy_rel_max_err"] = acc
        report["results"].append(row)
        _print_row(row, do_memory)

    _print_summary(report, do_memory)
    if load:
        report["config"]["load_average_at_end"] = list(os.getloadavg())
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _print_row(row: dict, do_memory: bool) -> None:
    T, B = row["length"], row["batch"]
    tms, mm, r, acc = row["time_ms"], row["memory_mib"], row["ratios"], row["accuracy_rel_max_err"]
    print(f"\nT={T}, B={B}")
    print(f"  {'':<10} {'time (ms)':>12} {'peak mem (MiB)':>15}  repeats x inner (median; min)")
    for k in KINDS:
        m = f"{mm[k]:>15.2f}" if do_memory else f"{'-':>15}"
        rep = row["time_repeats"][k]
        print(f"  {LABELS[k]:<10} {_fmt_ms(tms[k] / 1e3):>12} {m}  {rep['repeats']} x {rep['inner']}"
              f"   (min {_fmt_ms(row['time_ms_min'][k] / 1e3)} ms)")
    line = f"  baseline/ours: time {_fmt_x(r['baseline_over_ours_time'])}"
    if do_memory:
        line += (f", memory {_fmt_x(r['baseline_over_ours_memory'])} "
                 f"(>= {_fmt_x(r['baseline_over_ours_memory_lower_bound'])} allowing for the HWM slack)")
    line += (f"; baseline's saved decay blocks alone: {row['baseline_saved_decay_blocks_mib']:.1f} MiB")
    print(line)
    line = f"  ours scan/cumsum: time {_fmt_x(r['ours_scan_over_cumsum_time'])}"
    if do_memory:
        line += f", memory {_fmt_x(r['ours_scan_over_cumsum_memory'])}"
    line += f"; ours (D + scan)/cumsum: time {_fmt_x(r['ours_over_cumsum_time'])}"
    print(line)
    line = (f"  accuracy, max|F - F64| / max|F64| (max|F64| = {acc['max_abs_F']:.3g}): ours fp32 {acc['ours_fp32']:.2e}, "
            f"ours fp64 {acc['ours_fp64']:.2e}, baseline fp32 {acc['baseline_fp32']:.2e}")
    if "reference_vs_baseline_fp64" in acc:
        line += f"; fp64 reference vs baseline-in-fp64 {acc['reference_vs_baseline_fp64']:.2e}"
    print(line)


def _print_summary(report: dict, do_memory: bool) -> None:
    rows = report["results"]
    print("\nSummary (time ms / peak MiB; B=%d, %d threads)" % (report["config"]["batch"], report["config"]["threads"]))
    hdr = (f"{'T':>6} | {'baseline':>18} | {'ours':>16} | {'ours scan':>16} | {'cumsum':>16} | "
           f"{'base/ours t':>11} | {'base/ours mem':>13} | {'scan/cumsum t':>13} | {'ours err fp32':>13}")
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        tms, mm, r = row["time_ms"], row["memory_mib"], row["ratios"]

        def cell(k: str) -> str:
            m = f"{mm[k]:.2f}" if do_memory else "-"
            return f"{_fmt_ms(tms[k] / 1e3)} / {m}"

        mem_x = _fmt_x(r["baseline_over_ours_memory"]) if do_memory else "-"
        print(f"{row['length']:>6} | {cell('baseline'):>18} | {cell('ours'):>16} | {cell('scan'):>16} | "
              f"{cell('cumsum'):>16} | {_fmt_x(r['baseline_over_ours_time']):>11} | {mem_x:>13} | "
              f"{_fmt_x(r['ours_scan_over_cumsum_time']):>13} | {row['accuracy_rel_max_err']['ours_fp32']:>13.2e}")

    targets = {}
    tgt = [row for row in rows if row["length"] == TARGET_T and row["batch"] == TARGET_B]
    if tgt:
        r = tgt[0]["ratios"]
        targets["baseline_over_ours_time"] = (r["baseline_over_ours_time"], TARGET_TIME_X, r["baseline_over_ours_time"] >= TARGET_TIME_X)
        if do_memory:
            lb = r["baseline_over_ours_memory_lower_bound"]
            targets["baseline_over_ours_memory"] = (r["baseline_over_ours_memory"], TARGET_MEM_X, lb >= TARGET_MEM_X)
        print(f"\ntargets at T={TARGET_T}, B={TARGET_B}:")
        print(f"  baseline/ours time   {_fmt_x(r['baseline_over_ours_time'])} (>= {TARGET_TIME_X:g}x): "
              f"{'met' if targets['baseline_over_ours_time'][2] else 'MISSED'}")
        if do_memory:
            print(f"  baseline/ours memory {_fmt_x(r['baseline_over_ours_memory'])}, lower bound {_fmt_x(lb)} (>= {TARGET_MEM_X:g}x): "
                  f"{'met' if targets['baseline_over_ours_memory'][2] else 'MISSED'}")
    else:
        print(f"\n(T={TARGET_T}, B={TARGET_B} not in this run: speed-up targets not evaluated)")
    over = [(row["length"], row["ratios"]["ours_scan_over_cumsum_time"]) for row in rows
            if row["ratios"]["ours_scan_over_cumsum_time"] > TARGET_FLOOR_X]
    print(f"  ours scan/cumsum time <= {TARGET_FLOOR_X:g}x: "
          + ("met at every T" if not over else "MISSED at " + ", ".join(f"T={t} ({x:.1f}x)" for t, x in over)))
    targets["ours_scan_over_cumsum_time_missed_at"] = over
    report["targets"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in targets.items()}


if __name__ == "__main__":
    sys.exit(main())
