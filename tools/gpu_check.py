"""The GPU node check's runner (``tools/gpu_check.sh``): install from a wheelhouse, run each step time-boxed, report.

Standard library only: it runs in the node's Python before anything is installed. The install is
done here; every other step is ``tools/gpu_check_steps.py STEP`` in a child process of the node's
Python with the scratch install and the repository on ``PYTHONPATH``, killed with its process group
when its time box (or the check's whole budget) runs out. A step writes its result file (status
``pass`` / ``fail`` / ``skip``, a reason, figures); a step that dies without one is a failure with
the tail of its output as the reason.

Writes ``OUT/report.json`` (every step's status, reason, seconds and figures), ``OUT/check.log``
(one line per step plus the last lines of each failing step's output) and ``OUT/logs/STEP.log``
(each step's output, its last 256 KiB): well under 16 MiB in all. Exit status 0 when no step failed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = {  # name: (time box in seconds, what it proves)
    "install": (120, "the wheelhouse installs with no index into a scratch target, hashes checked, and imports"),
    "environment": (60, "torch sees the GPU; which of Transformer Engine, apex and SGLang are present"),
    "gpu_tests": (200, "the @pytest.mark.gpu tests one GPU can run (the rest skip with their reason)"),
    "demo_bf16": (240, "the demo through the whole stack in bf16 on the GPU; step 1 against the same run on CPU"),
    "ipc_handles": (60, "weight-sync handles made by one process open in another, bit-exact"),
    "future_kl": (90, "Future-KL: our O(T) scan against the released O(T^2) algorithm at B=64, T=20480"),
    "actor_throughput": (180, "training tokens/s and MFU of a Qwen2.5-1.5B-shaped actor (bf16, 8k-token micro-batches)"),
}
LOG_TAIL_BYTES = 256 * 1024
REPORT_LIMIT = 16 * 1024 * 1024


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 8192))
            return "\n".join(fh.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def _trim(path: str) -> None:
    """Keep a log's last LOG_TAIL_BYTES."""
    if os.path.exists(path) and os.path.getsize(path) > LOG_TAIL_BYTES:
        with open(path, "rb") as fh:
            fh.seek(-LOG_TAIL_BYTES, os.SEEK_END)
            data = fh.read()
        with open(path, "wb") as fh:
            fh.write(b"[... earlier output cut ...]\n" + data)


def run_child(cmd: list, *, log: str, timeout: float, env: dict, cwd: str) -> tuple[int | None, float]:
    """Run ``cmd`` in its own session, output to ``log``; kill its whole process group at ``timeout``.
    Returns (exit status or None when killed, seconds)."""
    start = time.monotonic()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the step's children too (servers, ranks)
            except ProcessLookupError:
                pass
            proc.wait()
    return rc, time.monotonic() - start


# ----------------------------------------------------------------------------------------- install
IMPORT_CHECK = r"""
import importlib.util, json, os, sys, sysconfig
out = {"python": sys.version.split()[0], "not_imported": {}}
have = {m: importlib.util.find_spec(m) is not None for m in ("torch", "sympy", "pytest")}
import psutil, antlr4  # noqa: F401 - they need nothing of the image's
out["psutil"] = psutil.__version__
if have["sympy"]:
    from math_verify import parse, verify
    out["math_verify"] = bool(verify(parse("$\\frac{1}{2}$"), parse("$0.5$")))
else:
    out["not_imported"]["math_verify"] = "needs sympy (torch's dependency), absent in this Python"
if have["pytest"]:
    import pytest_timeout  # noqa: F401
else:
    out["not_imported"]["pytest_timeout"] = "needs pytest, absent in this Python"
spec = importlib.util.find_spec("megatron.core")
out["megatron_core_path"] = os.path.dirname(spec.origin)
ext = sysconfig.get_config_var("EXT_SUFFIX")
helpers = os.path.join(out["megatron_core_path"], "datasets")
out["megatron_core_extension"] = [f for f in os.listdir(helpers) if f.startswith("helpers_cpp")]
assert any(f.endswith(ext) for f in out["megatron_core_extension"]), ("no extension for this Python", ext)
if have["torch"]:
    import megatron.core
    out["megatron_core"] = megatron.core.__version__
else:
    out["megatron_core"] = "not imported: this Python has no torch (its extension matches the interpreter)"
print(json.dumps(out))
"""


def install(wheels: str, site: str, python: str, log: str, timeout: float) -> dict:
    """pip install the wheelhouse with no index into ``site``; check hashes, the Python, and imports."""
    manifest_path = os.path.join(wheels, "manifest.json")
    if not os.path.exists(manifest_path):
        return {"status": "fail", "reason": f"{wheels} has no manifest.json (build it with tools/gpu_wheelhouse.sh)"}
    manifest = json.load(open(manifest_path))
    for f in manifest["files"]:
        path = os.path.join(wheels, f["file"])
        if not os.path.exists(path) or hashlib.sha256(open(path, "rb").read()).hexdigest() != f["sha256"]:
            return {"status": "fail", "reason": f"{f['file']}: missing or not the file the wheelhouse listed"}
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if version != manifest["python"]:
        return {"status": "fail", "reason": f"the wheelhouse is for Python {manifest['python']}, this node's is "
                                            f"{version}: build it with --python-version {version}"}
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PIP_INDEX_URL", None)
    rc, secs = run_child([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--require-hashes",
                          "--find-links", wheels, "--target", site, "-r", os.path.join(wheels, "requirements.txt")],
                         log=log, timeout=timeout, env=env, cwd=REPO)
    if rc != 0:
        return {"status": "fail", "reason": f"pip install failed: {_tail(log, 5)}"}
    check = subprocess.run([python, "-c", IMPORT_CHECK], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=site), timeout=120)
    if check.returncode != 0:
        return {"status": "fail", "reason": "imports from the scratch install failed: " + check.stderr[-800:]}
    figures = json.loads(check.stdout.strip().splitlines()[-1])
    if not figures["megatron_core_path"].startswith(os.path.realpath(site)) and \
            not figures["megatron_core_path"].startswith(site):
        return {"status": "fail", "reason": f"megatron.core came from {figures['megatron_core_path']}, not the "
                                            "scratch install", "figures": figures}
    figures.update(wheels=len(manifest["files"]), wheelhouse_bytes=manifest["total_bytes"], pip_s=round(secs, 1))
    return {"status": "pass", "reason": "", "figures": figures}


# ----------------------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Check a GPU node from a wheelhouse (tools/gpu_check.sh).")
    p.add_argument("--wheels", required=True, help="the folder tools/gpu_wheelhouse.sh wrote")
    p.add_argument("--out", required=True, help="report folder (report.json, check.log, logs/)")
    p.add_argument("--cpu", action="store_true", help="a CPU machine: every step that does not need CUDA")
    p.add_argument("--only", default=None, help="comma-separated steps (default: all; install always runs)")
    p.add_argument("--budget-s", type=float, default=540.0, help="the whole check's time box (default 540 s)")
    p.add_argument("--scratch", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--box-scale", type=float, default=1.0, help="multiply every step's time box (a slow machine)")
    args = p.parse_args(argv)
    wanted = list(STEPS) if not args.only else ["install"] + [s for s in args.only.split(",") if s != "install"]
    unknown = [s for s in wanted if s not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {unknown}; steps: {', '.join(STEPS)}")
    start = time.monotonic()
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    scratch = args.scratch or tempfile.mkdtemp(prefix="fipo-gpu-check-")
    site = os.path.join(scratch, "site")
    os.makedirs(site, exist_ok=True)
    wheels = os.path.abspath(args.wheels)
    report = {"check": "megatron_fipo tools/gpu_check.sh", "mode": "cpu" if args.cpu else "gpu",
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "node": socket.gethostname(),
              "python": sys.version.split()[0], "platform": platform.platform(), "commit": _commit(),
              "budget_s": args.budget_s, "steps": []}
    log_path = os.path.join(args.out, "check.log")
    logfh = open(log_path, "w")

    def say(line: str) -> None:
        print(line, flush=True)
        logfh.write(line + "\n")
        logfh.flush()

    say(f"gpu_check: {report['mode']} mode, Python {report['python']}, commit {report['commit']}, "
        f"budget {args.budget_s:.0f} s, scratch {scratch}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, REPO]), PYTHONUNBUFFERED="1",
               FIPO_GPU_CHECK_SCRATCH=scratch, TOKENIZERS_PARALLELISM="false")
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        for name in wanted:
            box, proves = STEPS[name]
            box *= args.box_scale
            left = args.budget_s - (time.monotonic() - start)
            step_log = os.path.join(args.out, "logs", f"{name}.log")
            t0 = time.monotonic()
            if left < 10:
                result = {"status": "skip", "reason": f"no time left in the {args.budget_s:.0f} s budget"}
            elif name == "install":
                result = install(wheels, site, sys.executable, step_log, min(box, left))
            else:
                result = _run_step(name, step_log, min(box, left), box, env, scratch, args.cpu)
            _trim(step_log)
            result = {"step": name, "proves": proves, "status": result["status"], "reason": result.get("reason", ""),
                      "seconds": round(time.monotonic() - t0, 1), "figures": result.get("figures", {})}
            report["steps"].append(result)
            say(f"  {name:<17} {result['status']:<4} {result['seconds']:7.1f} s  {result['reason']}".rstrip())
            if result["status"] == "fail":
                say("    " + _tail(step_log).replace("\n", "\n    "))
            if name == "install" and result["status"] != "pass":
                say("gpu_check: nothing else can run without the install")
                break
    finally:
        report["seconds"] = round(time.monotonic() - start, 1)
        for status in ("pass", "fail", "skip"):
            report[status] = sum(s["status"] == status for s in report["steps"])
        with open(os.path.join(args.out, "report.json"), "w") as fh:
            json.dump(report, fh, indent=1)
        say(f"gpu_check: {report['pass']} passed, {report['fail']} failed, {report['skip']} skipped in "
            f"{report['seconds']:.0f} s; report {os.path.join(args.out, 'report.json')}")
        logfh.close()
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    if size > REPORT_LIMIT:
        print(f"gpu_check: the report folder holds {size} bytes, over 16 MiB", file=sys.stderr)
        return 1
    return 1 if report["fail"] else 0


def _run_step(name, log, timeout, box, env, scratch, cpu) -> dict:
    result_path = os.path.join(scratch, f"{name}.result.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    cmd = [sys.executable, os.path.join(REPO, "tools", "gpu_check_steps.py"), name, "--result", result_path,
           "--scratch", scratch] + (["--cpu"] if cpu else [])
    rc, secs = run_child(cmd, log=log, timeout=timeout, env=env, cwd=scratch)
    if rc is None:
        which = f"its {box:.0f} s time box" if timeout >= box else "the check's budget"
        return {"status": "fail", "reason": f"killed after {secs:.0f} s ({which})"}
    if not os.path.exists(result_path):
        return {"status": "fail", "reason": f"exited {rc} without a result: " + _tail(log, 3).replace("\n", " | ")}
    with open(result_path) as fh:
        result = json.load(fh)
    if rc != 0 and result.get("status") == "pass":
        result = dict(result, status="fail", reason=f"exited {rc} after writing a pass")
    return result


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
