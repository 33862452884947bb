"""Benchmark: bytes on disk, peak memory and time of ``megatron-fipo convert`` at a real model size.

Run::

    python benchmarks/convert_memory.py [--work /tmp/convmem] [--code DIR ...] [--cases abcd]
                                        [--json out.json] [--keep] [--quick]

A random-weight HF model of the Qwen2.5-0.5B shape (``config.hf_presets.PRESETS["qwen2.5-0.5b"]``:
hidden 896, ffn 4864, 24 layers, 14 heads, 2 kv heads, vocab 151936, tied embeddings) is built
with ``transformers`` in bfloat16 and saved with ``save_pretrained`` (safetensors) under
``--work`` (reused when already there; no network). Each conversion then runs as its own process
(``python -m megatron_fipo convert ...``, one process, tp = pp = 1), one after the other:

    (a) ``--from-hf HF --to-mcore CKPT``              (dtype: the HF config's, bfloat16)
    (b) (a) with ``--verify``
    (c) ``--from-mcore CKPT --to-hf OUT --dtype bfloat16``   (CKPT: the output of (a))
    (d) (c) with ``--verify``

Per conversion: bytes on disk of the output, wall time, and peak resident memory: ``ru_maxrss`` of
the process (``os.wait4``: nothing to install), and the peaks of ``RssAnon`` (memory the process
allocated) and ``RssFile`` (pages of mapped files, e.g. mmapped safetensors: page cache the
kernel may drop, counted in RSS while mapped) sampled from ``/proc/PID/status`` every 20 ms, and
the peak PSS of the process tree (``smaps_rollup``; includes forked checkpoint writers, shared
pages counted once).
(The model is built in a child and this process imports no torch: a child's ``ru_maxrss`` starts
from its parent's RSS at the fork.) ``floor``: the RSS of a process that only imports what a conversion imports (torch, Megatron-Core,
transformers), the fixed cost under every figure.

The bound checked (issue 24): peak <= 1.3 x the model in the output dtype + one export bucket
(512 MiB) + the floor; ``--verify`` may add one float32 copy of the model (the HF reference runs
in float32). Ratios are also printed without the floor.

``--code DIR`` (repeatable) runs the conversions with another checkout of the code
(``PYTHONPATH=DIR``, cwd DIR), e.g. a worktree of the commit before model-only checkpoints::

    git worktree add --detach /tmp/convmem/before 68cab91
    python benchmarks/convert_memory.py --code /tmp/convmem/before --code . --json convmem.json

Outputs are deleted once measured (``--keep`` keeps them). ``--quick``: a tiny model in a
temporary directory and cases (a) and (d) only (a smoke test of both directions and of
``--verify``; its figures mean nothing). Figures are reported, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BUCKET_BYTES = 512 << 20  # export_hf_state's default bucket
CASES = {"a": ("to-mcore", False), "b": ("to-mcore", True), "c": ("to-hf", False), "d": ("to-hf", True)}
QUICK_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256)
FLOOR_IMPORTS = ("import torch, transformers, megatron.core; from megatron_fipo.mcore import actor; "
                 "from megatron_fipo import convert")


def model_config(quick: bool) -> dict:
    from megatron_fipo.config.hf_presets import PRESETS

    config = dict(PRESETS["qwen2.5-0.5b"])
    if quick:
        config.update(QUICK_SHAPE)
    return config


def build_hf_model(out_dir: str, config: dict, seed: int = 0) -> str:
    """A random-weight bfloat16 ``Qwen2ForCausalLM`` of ``config`` saved (safetensors) in ``out_dir``;
    reused when ``out_dir`` already holds one of the same config (a ``.built`` marker)."""
    marker = os.path.join(out_dir, ".built")
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as fh:
            if json.load(fh) == config:
                return out_dir
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shutil.rmtree(out_dir, ignore_errors=True)
    torch.manual_seed(seed)
    hf_config = Qwen2Config(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no float32 copy of the model here either
    try:
        model = Qwen2ForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: randomise, as real weights are
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.config.dtype = torch.bfloat16  # config.json's dtype: what convert's default output dtype is read from
    model.save_pretrained(out_dir)  # safetensors, one file (as the published 0.5B model)
    del model
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as fh:  # transformers 5 writes "dtype"
        saved = json.load(fh)
    said = saved.get("torch_dtype", saved.get("dtype"))
    if said != "bfloat16":
        raise RuntimeError(f"{out_dir}/config.json does not say bfloat16: {said}")
    with open(marker, "w", encoding="utf-8") as fh:
        json.dump(config, fh)
    return out_dir


def hf_parameters(hf_dir: str) -> int:
    """Number of parameters in the safetensors files of ``hf_dir`` (read from their JSON headers: no torch
    in this process, whose RSS every child's ``ru_maxrss`` starts from)."""
    total = 0
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            with open(os.path.join(hf_dir, f), "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            for k, v in header.items():
                if k != "__metadata__":
                    n = 1
                    for d in v["shape"]:
                        n *= d
                    total += n
    return total


def du(path: str) -> int:
    """Bytes of the regular files under ``path`` (apparent sizes)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
               if not os.path.islink(os.path.join(d, f)))


def _status_kib(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            text = fh.read()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out or None


def _pss(pid: int) -> tuple:
    """(Pss_Anon, Pss_File) bytes of ``pid`` (``smaps_rollup``; pages shared with forked children split)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            text = fh.read()
    except OSError:
        return 0, 0
    got = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("Pss_Anon", "Pss_File"):
            got[key] = int(value.split()[0]) * 1024
    return got.get("Pss_Anon", 0), got.get("Pss_File", 0)


def _descendants(pid: int) -> list:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children", encoding="ascii") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def measure(cmd: list, *, cwd: str, env: dict, log_prefix: str, interval: float = 0.02) -> dict:
    """Run ``cmd`` as a child process; its wall time, exit code, ``ru_maxrss`` (bytes: the process's
    own peak, or a reaped descendant's if larger), the peaks of VmRSS / RssAnon / RssFile sampled
    from /proc (with RssAnon / RssFile at the VmRSS peak), and the peak of the process tree's
    proportional set size (PSS, anon + file, summed over the process and the processes it forked,
    e.g. checkpoint writers: shared pages counted once; sampled every 5th poll)."""
    peaks = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0, "RssFile": 0, "anon_at_peak": 0, "file_at_peak": 0, "tree_pss": 0,
             "tree_pss_anon": 0, "tree_pss_file": 0, "max_processes": 1}
    with open(f"{log_prefix}.out", "w") as out, open(f"{log_prefix}.err", "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        done = threading.Event()

        def poll():
            tick = 0
            while not done.is_set():
                s = _status_kib(proc.pid)
                if s and "VmRSS" in s:
                    if s["VmRSS"] > peaks["VmRSS"]:
                        peaks.update(VmRSS=s["VmRSS"], anon_at_peak=s.get("RssAnon", 0),
                                     file_at_peak=s.get("RssFile", 0))
                    peaks["VmHWM"] = max(peaks["VmHWM"], s.get("VmHWM", 0))
                    peaks["RssAnon"] = max(peaks["RssAnon"], s.get("RssAnon", 0))
                    peaks["RssFile"] = max(peaks["RssFile"], s.get("RssFile", 0))
                    kids = _descendants(proc.pid)
                    peaks["max_processes"] = max(peaks["max_processes"], 1 + len(kids))
                    if tick % 5 == 0 or kids:
                        anon = file = 0
                        for pid in [proc.pid] + kids:
                            a, f = _pss(pid)
                            anon, file = anon + a, file + f
                        peaks["tree_pss_anon"] = max(peaks["tree_pss_anon"], anon)
                        peaks["tree_pss_file"] = max(peaks["tree_pss_file"], file)
                        peaks["tree_pss"] = max(peaks["tree_pss"], anon + file)
                tick += 1
                done.wait(interval)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            done.set()
            poller.join()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    with open(f"{log_prefix}.out", encoding="utf-8") as fh:
        stdout = fh.read()
    report = None
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                report = json.loads(line)
                break
            except ValueError:
                pass
    return {"returncode": proc.returncode, "wall_s": wall, "max_rss": usage.ru_maxrss * 1024,
            "sampled_peak_rss": peaks["VmRSS"], "vm_hwm": peaks["VmHWM"], "peak_rss_anon": peaks["RssAnon"], "peak_rss_file": peaks["RssFile"],
            "rss_anon_at_peak": peaks["anon_at_peak"], "rss_file_at_peak": peaks["file_at_peak"],
            "peak_tree_pss": peaks["tree_pss"], "peak_tree_pss_anon": peaks["tree_pss_anon"],
            "peak_tree_pss_file": peaks["tree_pss_file"], "max_processes": peaks["max_processes"], "report": report}


def code_env(code: str) -> dict:
    env = dict(os.environ, PYTHONPATH=code, PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def check_code(code: str) -> str:
    """The short commit of checkout ``code`` (and that ``megatron_fipo`` is imported from it)."""
    where = "import megatron_fipo, os; print(os.path.realpath(megatron_fipo.__file__))"
    found = subprocess.run([sys.executable, "-c", where],
                           cwd=code, env=code_env(code), capture_output=True, text=True, check=True).stdout.strip()
    if not found.startswith(os.path.realpath(code) + os.sep):
        raise RuntimeError(f"--code {code}: megatron_fipo is imported from {found}, not from there")
    rev = subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", code, "status", "--porcelain", "--untracked-files=no", "megatron_fipo"],
                           capture_output=True, text=True).stdout.strip()
    return (rev.stdout.strip() or os.path.basename(os.path.realpath(code))) + ("+dirty" if dirty else "")


def run_code(code: str, hf_dir: str, work: str, cases: str, keep: bool) -> dict:
    """Cases ``cases`` (and the import floor) with the checkout ``code``; outputs under ``work``."""
    env, results = code_env(code), {}
    os.makedirs(work, exist_ok=True)
    py = [sys.executable, "-m", "megatron_fipo", "convert"]
    results["floor"] = measure([sys.executable, "-c", FLOOR_IMPORTS], cwd=code, env=env,
                               log_prefix=os.path.join(work, "floor"))
    ckpt = os.path.join(work, "mcore_a")
    for case in cases:
        direction, verify = CASES[case]
        if direction == "to-mcore":
            out = ckpt if case == "a" else os.path.join(work, f"mcore_{case}")
            cmd = py + ["--from-hf", hf_dir, "--to-mcore", out]
        else:
            if not os.path.isdir(ckpt):  # (c) / (d) read (a)'s checkpoint
                row = measure(py + ["--from-hf", hf_dir, "--to-mcore", ckpt], cwd=code, env=env,
                              log_prefix=os.path.join(work, "a"))
                results["a"] = {**row, "output_bytes": du(ckpt) if os.path.isdir(ckpt) else 0}
            out = os.path.join(work, f"hf_{case}")
            cmd = py + ["--from-mcore", ckpt, "--to-hf", out, "--dtype", "bfloat16"]
        cmd += ["--verify"] if verify else []
        shutil.rmtree(out, ignore_errors=True)
        row = measure(cmd, cwd=code, env=env, log_prefix=os.path.join(work, case))
        row["output_bytes"] = du(out) if os.path.isdir(out) else 0
        row["command"] = " ".join(["megatron-fipo convert"] + cmd[len(py):])
        results[case] = row
        if row["returncode"]:
            with open(os.path.join(work, f"{case}.err"), encoding="utf-8", errors="replace") as fh:
                row["stderr_tail"] = fh.read()[-2000:]
        if not keep and out != ckpt:
            shutil.rmtree(out, ignore_errors=True)
    if not keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    return results


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def bounds(model_bytes: int, params: int, floor: int) -> dict:
    base = 1.3 * model_bytes + BUCKET_BYTES
    return {"plain": base + floor, "verify": base + 4 * params + floor}


def summarize(result: dict) -> list:
    """Printable rows; adds each row's ratios and bound check to ``result`` in place."""
    model_bytes, params = result["model"]["bytes_in_output_dtype"], result["model"]["parameters"]
    lines = [f"{'code':<14} {'case':<5} {'disk GB':>7} {'maxRSS GB':>9} {'anon GB':>7} {'file GB':>7} "
             f"{'PSS GB':>6} {'wall s':>6} {'RSS/model':>9} {'-floor':>6} {'anon-floor':>10} {'bound GB':>8}  ok"]
    for label, runs in result["runs"].items():
        fl = runs["floor"]
        floor, floor_anon = fl["max_rss"], fl["peak_rss_anon"]
        limit = bounds(model_bytes, params, floor)
        lines.append(f"{label:<14} {'floor':<5} {'':>7} {_gb(floor):>9} {_gb(floor_anon):>7} "
                     f"{_gb(fl['peak_rss_file']):>7} {_gb(fl['peak_tree_pss']):>6} {fl['wall_s']:>6.1f}")
        for case in "abcd":
            if case not in runs:
                continue
            row = runs[case]
            row["peak_over_model"] = row["max_rss"] / model_bytes
            row["peak_minus_floor_over_model"] = (row["max_rss"] - floor) / model_bytes
            row["anon_minus_floor_over_model"] = (row["peak_rss_anon"] - floor_anon) / model_bytes
            row["bound_bytes"] = limit["verify" if CASES[case][1] else "plain"]
            row["bound_met"] = row["returncode"] == 0 and row["max_rss"] <= row["bound_bytes"]
            status = "yes" if row["bound_met"] else ("FAILED" if row["returncode"] else "no")
            lines.append(f"{label:<14} {case:<5} {_gb(row['output_bytes']):>7} {_gb(row['max_rss']):>9} "
                         f"{_gb(row['peak_rss_anon']):>7} {_gb(row['peak_rss_file']):>7} "
                         f"{_gb(row['peak_tree_pss']):>6} {row['wall_s']:>6.1f} {row['peak_over_model']:>9.2f} "
                         f"{row['peak_minus_floor_over_model']:>6.2f} {row['anon_minus_floor_over_model']:>10.2f} "
                         f"{_gb(row['bound_bytes']):>8}  {status}")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="scratch directory (default /tmp/convmem; --quick: a temporary one)")
    parser.add_argument("--code", action="append", help="checkout to run the conversions with (repeatable; "
                        "default: this one)")
    parser.add_argument("--cases", help="which of a, b, c, d to run (default all; --quick: ad)")
    parser.add_argument("--json")
    parser.add_argument("--keep", action="store_true", help="keep the converted outputs")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--build-hf", metavar="DIR", help=argparse.SUPPRESS)  # the child that builds the model
    args = parser.parse_args(argv)
    if args.build_hf:
        build_hf_model(args.build_hf, model_config(args.quick))
        return {}
    requested = args.cases or ("ad" if args.quick else "abcd")
    if set(requested) - set(CASES):
        parser.error("--cases takes letters of abcd")
    cases = "".join(c for c in "abcd" if c in requested)
    temp = tempfile.mkdtemp(prefix="convmem-") if args.quick and not args.work else None
    work = os.path.abspath(temp or args.work or "/tmp/convmem")
    try:
        config = model_config(args.quick)
        hf_dir = os.path.join(work, "hf-quick" if args.quick else "hf-qwen2.5-0.5b")
        # built in a child: a child's ru_maxrss starts from its parent's RSS at the fork, so this
        # process never holds torch or a model
        subprocess.run([sys.executable, os.path.abspath(__file__), "--build-hf", hf_dir]
                       + (["--quick"] if args.quick else []), check=True)
        params = hf_parameters(hf_dir)
        result = {"model": {"shape": "quick" if args.quick else "qwen2.5-0.5b", "config": config,
                            "parameters": params, "hf_bytes": du(hf_dir), "output_dtype": "bfloat16",
                            "bytes_in_output_dtype": 2 * params},
                  "bucket_bytes": BUCKET_BYTES, "cpus": os.cpu_count(), "runs": {}}
        for code in [os.path.abspath(c) for c in (args.code or [ROOT])]:
            label = check_code(code)
            print(f"running {cases} with {code} ({label}) ...", flush=True)
            result["runs"][label] = run_code(code, hf_dir, os.path.join(work, label), cases, args.keep)
        lines = summarize(result)
        m = result["model"]
        print(f"model: {m['shape']}, {params:,} parameters, {_gb(m['bytes_in_output_dtype'])} GB in bfloat16; "
              f"bound: 1.3 x model + {BUCKET_BYTES >> 20} MiB bucket + floor (--verify: + float32 copy)")
        print("\n".join(lines))
        failed = [f"{label}/{c}" for label, runs in result["runs"].items() for c, r in runs.items()
                  if r["returncode"]]
        print(f"Summary: {len(result['runs'])} checkout(s) x cases {cases}; "
              + (f"FAILED: {', '.join(failed)}" if failed else "all conversions succeeded") + "; bound met: "
              + ", ".join(f"{label}/{c}={'yes' if r['bound_met'] else 'no'}" for label, runs in result["runs"].items()
                          for c, r in runs.items() if c != "floor"))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=2)
        return result
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
