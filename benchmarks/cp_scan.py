"""Benchmark: bytes each CP rank sends for Future-KL, our distributed scan vs an all-gather of log-ratios.

Run::

    python benchmarks/cp_scan.py [--lengths 20480,7001+5003+3997+2501+1499+3001] [--cps 2,4,8]
                                 [--repeats N] [--json out.json] [--quick]

``--lengths`` lists micro-batches separated by commas; ``+`` packs several sequences into one
micro-batch (THD). The defaults are one 20480-token sequence (FIPO's longest response) and a
ragged pack of 6 sequences, 23002 tokens (a 24k-token micro-batch budget); ``--quick`` uses
``2048,700+1001+347``, cp = 2 and 5 repeats.

The two methods, run in ``cp`` real gloo processes on 127.0.0.1 (one per CP rank, started by
``tests/dist/launcher.py``: parent-hosted store on port 0, ``OMP_NUM_THREADS=1``, every process
killed on error or timeout), on the same fp32 per-token signal ``D`` (the log-ratio
``clamp(logp - old_logp)`` with the dual-clip filter, ``benchmarks/future_kl.py``'s synthetic
log-probs; every token is a response token), sharded by the load-balanced layout
(``parallel.cp_layout.build_cp_layout``, each sequence padded to a multiple of ``2 * cp``):

``ours``
    ``megatron_fipo.parallel.cp_scan.future_kl_cp``: local scan of the rank's two chunks per
    sequence, one all-gather of the chunks' discounted totals, carries folded in.
``gather``
    The peers' approach: ``all_gather`` of every rank's local log-ratios (all of its
    ``num_local_tokens``, padding included, as the sharded tensor is), reassembled into the full
    packed sequence with an index precomputed from the layout, then the single-process
    ``megatron_fipo.algo.future_kl.discounted_suffix_sum`` on the whole pack, on every rank.

Bytes are counted, not derived: in each worker the tensor collectives of ``torch.distributed``
(``all_gather``, ``all_gather_into_tensor``, ``all_reduce``, ``reduce_scatter_tensor``,
``all_to_all_single``, ``send``, ``isend``) are replaced by wrappers that record
``numel * element_size`` of the tensor the rank contributes (the ``tensor`` / ``input`` argument)
on every call, warm-up and timed, on every rank. The wrapped names are looked up by the code
under test at call time (``dist.all_gather``), so what is recorded is what it calls. Other
collectives (``broadcast``, ``reduce``, ``gather``, ``scatter``, ``reduce_scatter``,
``all_to_all``, ``batch_isend_irecv``) are wrapped too and recorded as unaccounted, which fails
the check. The figure is bytes sent per rank per micro-batch (one call); each call of a method
must send the same bytes on every rank. It is compared with the formulas
``cp_scan.scan_bytes_per_rank(layout, 4)`` (two fp32 totals per sequence) and, for the gather,
``num_local_tokens * 4``. What an all-gather delivers to each rank is ``cp - 1`` times what each
rank sends, for both methods alike, so the ratio is the same either way.

Time (secondary; gloo over loopback on a CPU, not NCCL over NVLink): after 3 warm-up calls of each,
``--repeats`` rounds each time one call of each method (the order alternates between rounds), each
call preceded by ``dist.barrier``; a call's time is the slowest rank's ``time.perf_counter``
interval (the call is done when every rank is), and the figure is the median over rounds (the
minimum is saved too). The gather's time covers the all-gather, the reassembly and the
full-pack scan; ours covers ``future_kl_cp``. With more processes than cores (cp = 8 on 2 cores)
the figures are oversubscribed and flagged; the load average is printed before and after.

Accuracy (a correctness property): ours against the gather's ``F`` sharded to the rank's tokens
(max abs difference over real tokens, all ranks), and both against ``discounted_suffix_sum`` on
the full pack in float64.

Exit code 1 if counted bytes differ from the formulas or the two ``F`` differ by more than
``1e-5 * max(1, max|F|)``; timings are reported, never judged.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python benchmarks/cp_scan.py`: tests/ and benchmarks/ live here
    sys.path.insert(0, ROOT)

from benchmarks.future_kl import GAMMA, make_inputs, masked_signal  # noqa: E402
from megatron_fipo.algo.future_kl import discounted_suffix_sum  # noqa: E402
from megatron_fipo.parallel.cp_layout import CPLayout, build_cp_layout  # noqa: E402
from megatron_fipo.parallel.cp_scan import future_kl_cp, scan_bytes_per_rank  # noqa: E402
from tests.dist.launcher import launch  # noqa: E402

DEFAULT_MICROBATCHES = ((20480,), (7001, 5003, 3997, 2501, 1499, 3001))
QUICK_MICROBATCHES = ((2048,), (700, 1001, 347))
DEFAULT_CPS, QUICK_CPS = (2, 4, 8), (2,)
DEFAULT_REPEATS, QUICK_REPEATS = 40, 5
WARMUP = 3
METHODS = ("ours", "gather")
ITEMSIZE = 4  # fp32 log-ratios and totals
F_TOL = 1e-5  # relative to max(1, max|F|)
LAUNCH_TIMEOUT = 900.0

# the argument holding what this rank contributes, per tensor collective we can account for
SENT_ARG = {"all_gather": "tensor", "all_gather_into_tensor": "input_tensor", "all_reduce": "tensor",
            "reduce_scatter_tensor": "input", "all_to_all_single": "input", "send": "tensor",
            "isend": "tensor"}
UNACCOUNTED = ("broadcast", "reduce", "gather", "scatter", "reduce_scatter", "all_to_all", "batch_isend_irecv")


# --------------------------------------------------------------------------------------------
# the two methods and the byte counter (worker side)


def gather_bytes_per_rank(layout: CPLayout, itemsize: int = ITEMSIZE) -> int:
    """Bytes one rank sends when all-gathering its local per-token log-ratios."""
    return layout.num_local_tokens * itemsize


def make_gather_future_kl(layout: CPLayout, gamma: float, group):
    """The peers' approach as a callable ``signal_local -> F`` on the full real packed sequence."""
    import torch.distributed as dist

    # slot in cat(all ranks' local tokens) of each real packed token, computed once
    order = torch.cat([layout.local_indices(r) for r in range(layout.cp)])
    slot = torch.empty_like(order)
    slot[order] = torch.arange(order.numel())
    source = slot[layout.padding_index]
    cu = layout.cu_seqlens

    def gather_future_kl(signal_local: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            parts = [torch.empty_like(signal_local) for _ in range(layout.cp)]
            dist.all_gather(parts, signal_local.contiguous(), group=group)
            return discounted_suffix_sum(torch.cat(parts)[source], gamma, cu_seqlens=cu)

    return gather_future_kl


def install_byte_counter(log: list) -> None:
    """Wrap torch.distributed's collectives to append ``(name, bytes sent or None)`` to ``log``."""
    import torch.distributed as dist

    for name in (*SENT_ARG, *UNACCOUNTED):
        original = getattr(dist, name)
        signature = inspect.signature(original)

        def counted(*args, _original=original, _name=name, _sig=signature, **kwargs):
            arg = SENT_ARG.get(_name)
            sent = None
            if arg is not None:
                t = _sig.bind(*args, **kwargs).arguments[arg]
                sent = t.numel() * t.element_size()
            log.append((_name, sent))
            return _original(*args, **kwargs)

        setattr(dist, name, functools.wraps(original)(counted))


def packed_signal(lengths) -> torch.Tensor:
    """``[sum(lengths)]`` fp32 ``D``, identical on every rank (seeded by the micro-batch's size)."""
    n = int(sum(lengths))
    inputs = make_inputs(1, n, seed=len(lengths))
    with torch.no_grad():
        return masked_signal(inputs["logp"].detach(), inputs["old_logp"], torch.ones(1, n)).reshape(n).contiguous()


def _worker(microbatches, gamma: float, repeats: int, warmup: int) -> list:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    log: list = []
    install_byte_counter(log)
    out = []
    for lengths in microbatches:
        layout = build_cp_layout(lengths, cp, rank)
        D = packed_signal(lengths)
        local = layout.shard(D).contiguous()
        gather = make_gather_future_kl(layout, gamma, group)
        fns = {"ours": lambda: future_kl_cp(local, gamma, layout, group), "gather": lambda: gather(local)}
        calls: Dict[str, list] = {m: [] for m in METHODS}
        times: Dict[str, list] = {m: [] for m in METHODS}
        result = {}
        for i in range(warmup + repeats):
            for m in (METHODS if i % 2 == 0 else METHODS[::-1]):
                dist.barrier(group=group)
                log.clear()
                t0 = time.perf_counter()
                result[m] = fns[m]()
                dt = time.perf_counter() - t0
                calls[m].append(list(log))
                if i >= warmup:
                    times[m].append(dt)
        log.clear()
        real = layout.local_is_real
        ours, theirs = result["ours"][real], layout.shard(result["gather"])[real]
        ref = layout.shard(discounted_suffix_sum(D.double(), gamma, cu_seqlens=layout.cu_seqlens))[real]
        out.append({
            "calls": calls, "times": times,
            "max_abs_diff": float((ours.double() - theirs.double()).abs().max()) if real.any() else 0.0,
            "max_abs_F": float(ref.abs().max()) if real.any() else 0.0,
            "err_fp64": {"ours": float((ours.double() - ref).abs().max()) if real.any() else 0.0,
                         "gather": float((theirs.double() - ref).abs().max()) if real.any() else 0.0},
        })
    dist.destroy_process_group()
    return out


# --------------------------------------------------------------------------------------------
# parent side


def _counted_bytes(per_rank: list, method: str):
    """Bytes per call, if every call on every rank sent the same and all were accounted; else None."""
    per_call = {sum(b for _, b in call) if all(b is not None for _, b in call) else None
                for r in per_rank for call in r["calls"][method]}
    return per_call.pop() if len(per_call) == 1 else None


def _row(lengths, cp: int, per_rank: list, cores: int) -> dict:
    layout = build_cp_layout(lengths, cp, 0)
    formula = {"ours": scan_bytes_per_rank(layout, ITEMSIZE), "gather": gather_bytes_per_rank(layout, ITEMSIZE)}
    counted = {m: _counted_bytes(per_rank, m) for m in METHODS}
    ops = {m: sorted({" + ".join(f"{name} {b} B" for name, b in call) for r in per_rank for call in r["calls"][m]})
           for m in METHODS}
    time_ms, time_min = {}, {}
    for m in METHODS:
        slowest = [max(ts) * 1e3 for ts in zip(*(r["times"][m] for r in per_rank))]
        time_ms[m], time_min[m] = statistics.median(slowest), min(slowest)
    max_abs_F = max(r["max_abs_F"] for r in per_rank)
    diff = max(r["max_abs_diff"] for r in per_rank)
    bytes_agree = all(counted[m] == formula[m] for m in METHODS)
    f_agree = diff <= F_TOL * max(1.0, max_abs_F)
    return {
        "lengths": list(lengths), "cp": cp, "num_sequences": layout.num_sequences, "num_tokens": layout.num_tokens,
        "num_local_tokens": layout.num_local_tokens,
        "bytes_per_rank": {m: {"counted": counted[m], "formula": formula[m], "collectives": ops[m]} for m in METHODS},
        "bytes_agree": bytes_agree,
        "bytes_ratio_gather_over_ours": (counted["gather"] / counted["ours"]) if bytes_agree and counted["ours"] else None,
        "time_ms": time_ms, "time_ms_min": time_min,
        "time_ratio_gather_over_ours": time_ms["gather"] / time_ms["ours"],
        "repeats": len(per_rank[0]["times"]["ours"]),
        "oversubscribed": cp > cores,
        "F_max_abs_diff": diff, "F_max_abs": max_abs_F, "F_agree": f_agree,
        "F_max_abs_err_vs_fp64": {m: max(r["err_fp64"][m] for r in per_rank) for m in METHODS},
    }


def _name(lengths) -> str:
    return str(lengths[0]) if len(lengths) == 1 else f"{len(lengths)} seqs, {sum(lengths)} tok"


def _fmt_bytes(b) -> str:
    return "n/a" if b is None else f"{b:,} B"


def _print_row(row: dict) -> None:
    b = row["bytes_per_rank"]
    print(f"\nmicro-batch {'+'.join(map(str, row['lengths']))} ({row['num_tokens']} tokens), cp={row['cp']}: "
          f"{row['num_local_tokens']} local tokens per rank"
          + ("  [OVERSUBSCRIBED: more processes than cores]" if row["oversubscribed"] else ""))
    for m in METHODS:
        print(f"  {m:<7} sent/rank {_fmt_bytes(b[m]['counted']):>12} counted, {_fmt_bytes(b[m]['formula']):>12} formula "
              f"({', '.join(b[m]['collectives']) or 'no collective'}); time {row['time_ms'][m]:8.3f} ms median "
              f"(min {row['time_ms_min'][m]:.3f}, {row['repeats']} repeats)")
    ratio = row["bytes_ratio_gather_over_ours"]
    print(f"  gather/ours: bytes {'n/a' if ratio is None else f'{ratio:,.0f}x'}, "
          f"time {row['time_ratio_gather_over_ours']:.2f}x; counted == formula: "
          f"{'yes' if row['bytes_agree'] else 'NO (MISMATCH)'}")
    e = row["F_max_abs_err_vs_fp64"]
    print(f"  F: max|ours - gather| = {row['F_max_abs_diff']:.2e} (max|F| = {row['F_max_abs']:.3g}, "
          f"{'ok' if row['F_agree'] else 'DIFFERENT'}); vs fp64: ours {e['ours']:.2e}, gather {e['gather']:.2e}")


def _print_summary(rows: List[dict]) -> None:
    print("\nSummary (bytes sent per rank per micro-batch, counted; time ms per call, gloo, median)")
    hdr = (f"{'micro-batch':>20} | {'cp':>2} | {'ours B':>8} | {'gather B':>10} | {'bytes x':>8} | "
           f"{'ours ms':>8} | {'gather ms':>9} | {'time x':>6} | {'max|dF|':>8} | note")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        b, t = r["bytes_per_rank"], r["time_ms"]
        ratio = r["bytes_ratio_gather_over_ours"]
        notes = [n for n, bad in (("oversubscribed", r["oversubscribed"]), ("BYTES MISMATCH", not r["bytes_agree"]),
                                  ("F DIFFERS", not r["F_agree"])) if bad]
        print(f"{_name(r['lengths']):>20} | {r['cp']:>2} | {b['ours']['counted'] or 0:>8,} | "
              f"{b['gather']['counted'] or 0:>10,} | {'n/a' if ratio is None else f'{ratio:,.0f}x':>8} | "
              f"{t['ours']:>8.3f} | {t['gather']:>9.3f} | {r['time_ratio_gather_over_ours']:>5.2f}x | "
              f"{r['F_max_abs_diff']:>8.1e} | {', '.join(notes)}")


def _parse_microbatches(s: str) -> List[tuple]:
    try:
        out = [tuple(int(v) for v in mb.split("+")) for mb in s.split(",") if mb.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad --lengths {s!r}: {e}") from None
    if not out or any(min(mb) < 1 for mb in out):
        raise argparse.ArgumentTypeError(f"bad --lengths {s!r}")
    return out


def _parse_cps(s: str) -> List[int]:
    out = [int(v) for v in s.split(",") if v.strip()]
    if not out or min(out) < 2:
        raise argparse.ArgumentTypeError(f"--cps needs context-parallel sizes >= 2, got {s!r}")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=_parse_microbatches, default=None,
                   help="micro-batches, comma-separated; '+' packs sequences (default "
                        + ",".join("+".join(map(str, mb)) for mb in DEFAULT_MICROBATCHES) + ")")
    p.add_argument("--cps", type=_parse_cps, default=None, help="context-parallel sizes (default 2,4,8)")
    p.add_argument("--repeats", type=int, default=None, help=f"timed rounds (default {DEFAULT_REPEATS}; --quick: {QUICK_REPEATS})")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--quick", action="store_true", help="T=2048 and a small pack, cp=2, few repeats (smoke test)")
    args = p.parse_args(argv)

    microbatches = args.lengths or list(QUICK_MICROBATCHES if args.quick else DEFAULT_MICROBATCHES)
    cps = args.cps or list(QUICK_CPS if args.quick else DEFAULT_CPS)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()
    print(f"CP Future-KL exchange benchmark: micro-batches {['+'.join(map(str, mb)) for mb in microbatches]}, "
          f"cp in {cps}, fp32, gamma={GAMMA:.6f}; gloo on 127.0.0.1, one process per CP rank, 1 thread each")
    print(f"torch {torch.__version__}, {cores} cores; load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + (" -- machine busy, timings inflated" if load[0] > 0.5 * cores else ""))
    report: dict = {"config": {"microbatches": [list(mb) for mb in microbatches], "cps": cps, "repeats": repeats,
                               "warmup": WARMUP, "gamma": GAMMA, "dtype": "float32", "backend": "gloo",
                               "torch": torch.__version__, "cores": cores, "load_average_at_start": list(load)},
                    "results": []}
    for cp in cps:
        t0 = time.perf_counter()
        per_rank = launch(_worker, cp, [list(mb) for mb in microbatches], GAMMA, repeats, WARMUP,
                          timeout=LAUNCH_TIMEOUT)
        print(f"\n[cp={cp}: {cp} processes, {time.perf_counter() - t0:.1f} s]")
        for i, mb in enumerate(microbatches):
            row = _row(mb, cp, [r[i] for r in per_rank], cores)
            report["results"].append(row)
            _print_row(row)
    _print_summary(report["results"])
    load = os.getloadavg()
    report["config"]["load_average_at_end"] = list(load)
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    ok = all(r["bytes_agree"] and r["F_agree"] for r in report["results"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
