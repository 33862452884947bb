"""The pinned SGLang wheel, read without importing sglang, and the requests our engine sends it.

Shared by tests/unit/test_sglang_schema.py (field names, every run, standard library only) and
tools/sglang_request_check.py (SGLang's own request classes, in a scratch environment). Owns
``wheel_path`` (the wheel of tools/sglang_pin.txt in build/wheels/, hash-checked), ``read_wheel``
(its routes, request classes' fields, ``SamplingParams``, the ``/generate`` JSON contract and
its metadata), the parsers (``class_fields``, ``http_routes``, ``query_params``), the checker
(``body_problems``, ``request_problems``) and ``engine_requests``: ``(route, method, body)`` of
every request of the engine, the bodies from its own builders. A route may carry a query string
(``/flush_cache?timeout=300``); its parameters must be the route's ``Query`` parameters.
"""
from __future__ import annotations

import ast
import base64
import glob
import hashlib
import os
import re
import sys
import urllib.parse
import zipfile
from collections.abc import Mapping
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import image_check  # noqa: E402

WHEELS = os.path.join(ROOT, "build", "wheels")
SOURCES = {"http": "sglang/srt/entrypoints/http_server.py", "io": "sglang/srt/managers/io_struct.py",
           "sampling": "sglang/srt/sampling/sampling_params.py", "contract": "sglang/api/v1/api_types.py"}

Fields = dict[str, bool]  # field name -> required (no default)


class WheelMissing(RuntimeError):
    """The pinned wheel is not in build/wheels/ (tools/bootstrap.sh downloads it)."""


# ---------------------------------------------------------------- reading the wheel
def class_fields(source: str) -> dict[str, Fields]:
    """Every class of a module -> its fields (annotated ones and ``__init__``'s parameters; those of its
    in-module bases first)."""
    own, bases = {}, {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases[node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]
        own[node.name] = {s.target.id: _required(s.value) for s in node.body
                          if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                          and not ast.unparse(s.annotation).startswith(("ClassVar", "typing.ClassVar"))}
        for init in (s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"):
            params = init.args.args[1:]  # a plain class (older SGLang's SamplingParams): its parameters
            with_default = len(init.args.defaults)
            own[node.name].update({a.arg: i < len(params) - with_default for i, a in enumerate(params)})
            own[node.name].update({a.arg: d is None for a, d in zip(init.args.kwonlyargs, init.args.kw_defaults)})

    def resolve(name: str) -> Fields:
        out: Fields = {}
        for base in (b for b in bases[name] if b in own):
            out.update(resolve(base))
        return {**out, **own[name]}

    return {name: resolve(name) for name in own}


def _required(value: Optional[ast.expr]) -> bool:
    """No default: no value, or ``field(...)`` / ``msgspec.field(...)`` without default(_factory)."""
    if value is None:
        return True
    if isinstance(value, ast.Call) and ast.unparse(value.func) in ("field", "dataclasses.field", "msgspec.field"):
        return not any(k.arg in ("default", "default_factory") for k in value.keywords)
    return False


def http_routes(source: str) -> dict[str, tuple[set, Optional[str]]]:
    """``route -> (HTTP methods, the class its request body is read into or None)`` of ``@app.<verb>``."""
    routes = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = next((n.id for arg in node.args.args + node.args.kwonlyargs if arg.arg == "obj" and arg.annotation
                     for n in ast.walk(arg.annotation) if isinstance(n, ast.Name) and n.id != "Annotated"), None)
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and ast.unparse(dec.func).startswith("app.") and dec.args
                    and isinstance(dec.args[0], ast.Constant)):
                continue
            verb = dec.func.attr
            methods = {verb.upper()} if verb != "api_route" else set(next(
                (ast.literal_eval(k.value) for k in dec.keywords if k.arg == "methods"), ["GET"]))
            routes[dec.args[0].value] = (methods, body)
    return routes


def query_params(source: str) -> dict[str, set]:
    """``route -> names of its query parameters`` (arguments whose default is ``Query(...)``)."""
    out = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        args = node.args.args[len(node.args.args) - len(node.args.defaults):]
        names = {a.arg for a, d in zip(args, node.args.defaults)
                 if isinstance(d, ast.Call) and ast.unparse(d.func) in ("Query", "fastapi.Query")}
        for dec in node.decorator_list:
            if (isinstance(dec, ast.Call) and ast.unparse(dec.func).startswith("app.") and dec.args
                    and isinstance(dec.args[0], ast.Constant)):
                out[dec.args[0].value] = names
    return out


def wheel_path(wheels: Optional[str] = None) -> str:
    """The pinned wheel in ``wheels`` (default ``WHEELS``), its sha256 checked against tools/sglang_pin.txt."""
    wheels = wheels or WHEELS
    version, hashes = image_check.read_pin()
    found = sorted(glob.glob(os.path.join(wheels, f"sglang-{version}-*.whl")))
    if not found:
        raise WheelMissing(f"the pinned SGLang wheel (sglang=={version}) is not in {wheels}: run bash tools/bootstrap.sh")
    with open(found[0], "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    if digest not in hashes:
        raise WheelMissing(f"{found[0]} has sha256 {digest}, not one of tools/sglang_pin.txt's: rerun bootstrap")
    return found[0]


def read_wheel(path: str) -> dict:
    """The wheel's parsed sources: ``routes``, ``query``, ``io``, ``sampling``, ``contract`` and ``requires``."""
    with zipfile.ZipFile(path) as zf:
        text = {key: zf.read(name).decode() for key, name in SOURCES.items()}
        metadata = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = re.findall(r"^Requires-Dist: (.+)$", zf.read(metadata).decode(), flags=re.M)
    return {"routes": http_routes(text["http"]), "query": query_params(text["http"]), "io": class_fields(text["io"]),
            "sampling": class_fields(text["sampling"])["SamplingParams"], "contract": class_fields(text["contract"]),
            "requires": requires}


# ---------------------------------------------------------------- the checker
def body_problems(body: Mapping, fields: Fields, what: str) -> list[str]:
    """A body's fields SGLang does not have, and SGLang's required fields the body leaves out."""
    return ([f"{what} sends {k!r}, which SGLang does not have" for k in sorted(set(body) - set(fields))]
            + [f"{what} leaves out {k!r}, which SGLang requires" for k, req in sorted(fields.items())
               if req and k not in body])


def request_problems(wheel: dict, route: str, method: str, body: Optional[Mapping]) -> list[str]:
    """Everything wrong with sending ``body`` to ``route`` (``/path`` or ``/path?query``) by ``method`` (None: no body)."""
    route, _, query = route.partition("?")
    if route not in wheel["routes"]:
        return [f"SGLang serves no {route}"]
    methods, cls = wheel["routes"][route]
    problems = [] if method in methods else [f"{route} does not take {method} (only {sorted(methods)})"]
    allowed = wheel["query"].get(route, set())
    problems += [f"{route} has no query parameter {k!r}" for k, _ in urllib.parse.parse_qsl(query) if k not in allowed]
    if cls is None:
        return problems + ([f"{route} reads no body, but {sorted(body)} is sent"] if body else [])
    if cls not in wheel["io"]:
        return problems + [f"{route} reads a {cls}, which is not a class of io_struct.py"]
    problems += body_problems(body or {}, wheel["io"][cls], f"{route} ({cls})")
    if route == "/generate":  # the JSON contract and the sampling parameters, checked before the class
        problems += body_problems(body, wheel["contract"]["GenerateRequest"], "/generate (contract)")
        sampling = body.get("sampling_params", {})
        problems += body_problems(sampling, wheel["sampling"], "/generate sampling_params (SamplingParams)")
        problems += body_problems(sampling, wheel["contract"]["SamplingParams"], "/generate sampling_params (contract)")
    return problems


# ---------------------------------------------------------------- what the engine sends
def engine_requests() -> list[tuple[str, str, Optional[dict]]]:
    """``(route, method, body)`` of every request of the engine, the bodies from its own builders."""
    import torch

    from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams
    from megatron_fipo.rollout.sglang_engine import generate_payload
    from megatron_fipo.rollout.sglang_stream import PAUSE_MODES, pause_payload
    from megatron_fipo.rollout.sglang_weights import (
        distributed_update_payload,
        flush_route,
        init_group_payload,
        tensor_update_payload,
    )

    bucket = [("model.embed_tokens.weight", torch.zeros(4, 2)),
              ("model.norm.weight", torch.zeros(2, dtype=torch.bfloat16))]
    seeded = GenerationRequest((1, 2, 3), SamplingParams(n=2, top_k=5, max_new_tokens=4, stop_token_ids=(3,), seed=7))
    return [("/generate", "POST", generate_payload(seeded, 1)),
            ("/generate", "POST", generate_payload(GenerationRequest((1,)), 0)),  # no seed, no top_k
            ("/begin_weight_update", "POST", {}),
            ("/update_weights_from_tensor", "POST",  # payloads are base64 (serialize_named_tensors)
             tensor_update_payload([base64.b64encode(b"rank0").decode(), base64.b64encode(b"rank1").decode()], 3)),
            ("/init_weights_update_group", "POST", init_group_payload("10.0.0.1", 29500, 1, 5, "nccl")),
            ("/update_weights_from_distributed", "POST", distributed_update_payload(bucket, 3)),
            ("/end_weight_update", "POST", {}),
            (flush_route(paused=True), "POST", {}),
            (flush_route(paused=False), "POST", {}),
            ("/release_memory_occupation", "POST", {}),
            ("/resume_memory_occupation", "POST", {}),
            ("/health", "GET", None),
            *[("/pause_generation", "POST", pause_payload(mode)) for mode in PAUSE_MODES],
            ("/continue_generation", "POST", {})]


