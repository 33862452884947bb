"""Feed every request our engine sends to the pinned SGLang's own request classes, in a scratch environment.

Run::

    .venv/bin/python tools/sglang_request_check.py [--json report.json] [--requests requests.json]

tests/unit/test_sglang_schema.py checks field names against the wheel's source. This goes one
step further and runs SGLang's code on the bodies, as its HTTP server would:

* ``/generate``: then ``normalize_batch_and_arguments()`` of that ``GenerateReqInput``, and
  ``SamplingParams(**body["sampling_params"])`` with ``normalize(None)`` and ``verify(vocab_size)``
  (the checks SGLang's tokenizer manager makes before a request is scheduled);
* every route with a request class (``GenerateReqInput``, ``PauseGenerationReqInput``, the
  weight-update classes, ...): the body validated by pydantic with the schema SGLang gives the
  class, as FastAPI does for the route (types, required fields);
* query parameters (``/flush_cache?timeout=300``): their ``Query`` constraint (a float >= 0) and
  the ``FlushCacheReqInput`` they become.

SGLang cannot be installed on a CPU machine, and its ``io_struct`` imports modules that need GPU
packages. So the wheel (tools/sglang_pin.txt, in build/wheels/) is unpacked into
``build/sglang_check/`` and imported from there, with four small wheels it needs and the CPU lock
does not carry (``msgspec``, ``orjson``, ``pybase64``, ``pyzmq``; tools/sglang_check_pin.txt,
downloaded with hashes by tools/bootstrap.sh into build/wheels/sglang_check/, about 1.3 MB) put on
the path of a child process; three imports that only GPU code needs (the top-level ``sglang``
package's client API, ``sglang.srt.utils``' package ``__init__`` and ``schedule_batch``, and
``triton``) are replaced by empty stand-ins in that child. The request classes, ``SamplingParams``
and the weight-version code are SGLang's own. Cost: unpacking once (about 130 MB on disk, a few
seconds), then about 5 s a run. Exit status 1 and one line per refused request when any is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import sglang_wheel  # noqa: E402

SCRATCH = os.path.join(ROOT, "build", "sglang_check")
DEP_WHEELS = os.path.join(ROOT, "build", "wheels", "sglang_check")
DEP_PIN = os.path.join(ROOT, "tools", "sglang_check_pin.txt")
# modules replaced by stand-ins in the child: GPU kernels, and package __init__s that import them
STUBBED = ("sglang", "sglang.srt.managers.schedule_batch", "triton")
# what the request classes' annotations use from a stubbed module: read from SGLang's source
TYPE_ALIASES = {"sglang.srt.managers.schedule_batch": ("ReturnHiddenStatesMode", "SamplingLogprobsMode", "Modality")}
VOCAB_SIZE = 151_936  # Qwen2's; SamplingParams.verify checks token ids against it


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def prepare(wheel: str) -> tuple[str, str]:
    """``(the unpacked wheel, the installed dependencies)`` under build/sglang_check/, made once per wheel."""
    src = os.path.join(SCRATCH, "src-" + _sha256(wheel)[:16])
    if not os.path.isdir(src):
        tmp = src + ".tmp"
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp, [n for n in zf.namelist() if n.startswith("sglang/")])
        os.replace(tmp, src)
    with open(DEP_PIN, encoding="utf-8") as fh:
        pin = fh.read()
    deps = os.path.join(SCRATCH, "deps-" + hashlib.sha256(pin.encode()).hexdigest()[:16])
    if not os.path.isdir(deps):
        if not os.path.isdir(DEP_WHEELS):
            raise SystemExit(f"sglang_request_check: no wheels in {DEP_WHEELS}: run bash tools/bootstrap.sh")
        tmp = deps + ".tmp"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--require-hashes",
                        "--find-links", DEP_WHEELS, "--target", tmp, "-r", DEP_PIN], check=True)
        os.replace(tmp, deps)
    return src, deps


# ------------------------------------------------------------------ the child: SGLang's code on the bodies
def _install_stand_ins(src: str) -> None:
    import importlib.abc
    import importlib.machinery
    import types

    class Empty(types.ModuleType):
        """Any attribute is an empty class (what io_struct imports from the stubbed modules is never used
        by the request classes' validation)."""

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            value = type(name, (), {})
            setattr(self, name, value)
            return value

    class StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name not in STUBBED:
                return None
            where = os.path.join(src, *name.split("."))
            spec = importlib.machinery.ModuleSpec(name, self, is_package=os.path.isdir(where))
            if os.path.isdir(where):  # a package: its submodules are SGLang's own files
                spec.submodule_search_locations = [where]
            return spec

        def create_module(self, spec):
            return Empty(spec.name)

        def exec_module(self, module):
            if module.__spec__.submodule_search_locations:
                module.__path__ = list(module.__spec__.submodule_search_locations)
            if module.__name__ in TYPE_ALIASES:  # the type aliases request fields are annotated with, SGLang's own
                _exec_aliases(module, os.path.join(src, *module.__name__.split(".")) + ".py",
                              TYPE_ALIASES[module.__name__])

    sys.meta_path.insert(0, StandIns())


def _exec_aliases(module, path: str, names) -> None:
    """Run the module-level statements of ``path`` that define ``names``: ``Name = <typing expression>``
    and ``from <module> import Name`` (re-exports)."""
    import ast
    import typing

    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    statements = [n for n in tree.body if isinstance(n, ast.Assign) and len(n.targets) == 1
                  and isinstance(n.targets[0], ast.Name) and n.targets[0].id in names]
    for node in tree.body:  # names the module re-exports: imported from their own (light) modules
        if isinstance(node, ast.ImportFrom) and any(a.name in names for a in node.names):
            statements.append(ast.copy_location(
                ast.ImportFrom(node.module, [a for a in node.names if a.name in names], node.level), node))
    namespace = {name: getattr(typing, name) for name in typing.__all__}
    exec(compile(ast.Module(body=statements, type_ignores=[]), path, "exec"), namespace)
    for name in names:
        setattr(module, name, namespace[name])



def check_requests(requests, wheel: dict) -> list[dict]:
    """Each ``(route, method, body)`` through SGLang's classes: ``{"route", "class", "ok", "error"}``."""
    import urllib.parse

    from pydantic import TypeAdapter
    from sglang.srt.managers import io_struct
    from sglang.srt.sampling.sampling_params import SamplingParams

    out = []
    for route, _method, body in requests:
        path, _, query = route.partition("?")
        cls_name = wheel["routes"].get(path, (set(), None))[1]
        row = {"route": route, "class": cls_name, "ok": True, "error": ""}
        try:
            for key, value in urllib.parse.parse_qsl(query):  # FastAPI's Query(..., ge=0.0) of the route
                if float(value) < 0:
                    raise ValueError(f"query parameter {key}={value} must be >= 0")
            if path == "/flush_cache":  # the handler builds the request from its query parameter
                io_struct.FlushCacheReqInput(timeout_s=float(dict(urllib.parse.parse_qsl(query)).get("timeout", 0)))
            if cls_name is not None:  # the body as FastAPI reads it: pydantic, with SGLang's schema for the class
                req = TypeAdapter(getattr(io_struct, cls_name)).validate_python(body or {})
            if path == "/generate":  # what the tokenizer manager does next
                req.normalize_batch_and_arguments()
                params = SamplingParams(**body.get("sampling_params", {}))
                params.normalize(None)
                params.verify(VOCAB_SIZE)
        except Exception as err:  # SGLang refuses the request: the reason, as its server would give it
            row.update(ok=False, error=f"{type(err).__name__}: {err}")
        out.append(row)
    return out


def _child(src: str, requests_file: str, wheel_file: str) -> int:
    _install_stand_ins(src)
    with open(requests_file, encoding="utf-8") as fh:
        requests = json.load(fh)
    with open(wheel_file, encoding="utf-8") as fh:
        wheel = json.load(fh)
    print(json.dumps(check_requests(requests, wheel)))
    return 0


def run_check(requests=None, wheel_path: str | None = None) -> list[dict]:
    """The report of ``check_requests`` over ``requests`` (default: every request of the engine)."""
    import tempfile

    wheel_path = wheel_path or sglang_wheel.wheel_path()
    src, deps = prepare(wheel_path)
    parsed = sglang_wheel.read_wheel(wheel_path)
    requests = sglang_wheel.engine_requests() if requests is None else requests
    with tempfile.TemporaryDirectory() as tmp:
        req_file, wheel_file = os.path.join(tmp, "requests.json"), os.path.join(tmp, "wheel.json")
        with open(req_file, "w", encoding="utf-8") as fh:
            json.dump(requests, fh)
        with open(wheel_file, "w", encoding="utf-8") as fh:
            json.dump({"routes": {r: [sorted(m), c] for r, (m, c) in parsed["routes"].items()}}, fh)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([deps, src])}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", src, req_file, wheel_file],
                              capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"sglang_request_check: the child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        return _child(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", help="a JSON list of [route, method, body] to check instead of the engine's")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    requests = None
    if args.requests:
        with open(args.requests, encoding="utf-8") as fh:
            requests = json.load(fh)
    report = run_check(requests)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
    refused = [r for r in report if not r["ok"]]
    for r in report:
        print(f"{'ok' if r['ok'] else 'REFUSED':>7}  {r['route']:<40} {r['class'] or '-':<38} {r['error']}")
    print(f"{len(report) - len(refused)} of {len(report)} requests accepted by SGLang's own classes")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
