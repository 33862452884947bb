"""The requests rollout.sglang_engine sends, checked against the pinned SGLang release's own request classes.

SGLang's HTTP server drops request fields it does not know (its request structs are validated
with ``extra_behavior="ignore"``), so a field renamed upstream would silently stop doing anything;
a field it requires and we do not send fails only on a GPU. This test reads the pinned wheel
(``tools/sglang_pin.txt``; ``tools/bootstrap.sh`` downloads it into ``build/wheels/``) with
``zipfile`` and parses its source with ``ast``, never importing sglang:

* ``sglang/srt/entrypoints/http_server.py``: the routes, their HTTP methods and the request class
  each reads (its ``obj`` parameter);
* ``sglang/srt/managers/io_struct.py``: those classes' fields (base classes included), each with or
  without a default;
* ``sglang/srt/sampling/sampling_params.py``: ``SamplingParams``, what ``sampling_params`` may hold;
* ``sglang/api/v1/api_types.py``: the JSON contract ``/generate`` checks first (it refuses unknown
  sampling parameters outright).

The bodies come from the engine's own builders (``generate_payload``, ``tensor_update_payload``,
``init_group_payload``, ``distributed_update_payload``; the other routes get ``{}``), and every
route the engine names must be listed here. A body fails when it sends a field the class does not
have or leaves out one without a default.
"""
import ast
import glob
import hashlib
import os
import re
import sys
import zipfile
from collections.abc import Mapping
from typing import Optional

import pytest
import torch

from megatron_fipo.rollout import sglang_engine, sglang_stream, sglang_weights
from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams
from megatron_fipo.rollout.sglang_engine import generate_payload
from megatron_fipo.rollout.sglang_stream import PAUSE_MODES, pause_payload
from megatron_fipo.rollout.sglang_weights import (
    distributed_update_payload,
    init_group_payload,
    tensor_update_payload,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import image_check  # noqa: E402

WHEELS = os.path.join(ROOT, "build", "wheels")
SOURCES = {"http": "sglang/srt/entrypoints/http_server.py", "io": "sglang/srt/managers/io_struct.py",
           "sampling": "sglang/srt/sampling/sampling_params.py", "contract": "sglang/api/v1/api_types.py"}

Fields = dict[str, bool]  # field name -> required (no default)


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


def _wheel_path() -> str:
    version, hashes = image_check.read_pin()
    found = sorted(glob.glob(os.path.join(WHEELS, f"sglang-{version}-*.whl")))
    if not found:
        pytest.fail(f"the pinned SGLang wheel (sglang=={version}) is not in {WHEELS}: run bash tools/bootstrap.sh")
    with open(found[0], "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    assert digest in hashes, f"{found[0]} has sha256 {digest}, not one of tools/sglang_pin.txt's: rerun bootstrap"
    return found[0]


@pytest.fixture(scope="module")
def wheel() -> dict:
    """The pinned wheel's parsed sources: ``routes``, ``io``, ``sampling``, ``contract`` and ``requires``."""
    with zipfile.ZipFile(_wheel_path()) as zf:
        text = {key: zf.read(path).decode() for key, path in SOURCES.items()}
        metadata = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = re.findall(r"^Requires-Dist: (.+)$", zf.read(metadata).decode(), flags=re.M)
    return {"routes": http_routes(text["http"]), "io": class_fields(text["io"]),
            "sampling": class_fields(text["sampling"])["SamplingParams"], "contract": class_fields(text["contract"]),
            "requires": requires}


# ---------------------------------------------------------------- the checker
def body_problems(body: Mapping, fields: Fields, what: str) -> list[str]:
    """A body's fields SGLang does not have, and SGLang's required fields the body leaves out."""
    return ([f"{what} sends {k!r}, which SGLang does not have" for k in sorted(set(body) - set(fields))]
            + [f"{what} leaves out {k!r}, which SGLang requires" for k, req in sorted(fields.items())
               if req and k not in body])


def request_problems(wheel: dict, route: str, method: str, body: Optional[Mapping]) -> list[str]:
    """Everything wrong with sending ``body`` to ``route`` by ``method`` (None: no body)."""
    if route not in wheel["routes"]:
        return [f"SGLang serves no {route}"]
    methods, cls = wheel["routes"][route]
    problems = [] if method in methods else [f"{route} does not take {method} (only {sorted(methods)})"]
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
def sent() -> list[tuple[str, str, Optional[dict]]]:
    """``(route, method, body)`` of every request of the engine, the bodies from its own builders."""
    bucket = [("model.embed_tokens.weight", torch.zeros(4, 2)),
              ("model.norm.weight", torch.zeros(2, dtype=torch.bfloat16))]
    seeded = GenerationRequest((1, 2, 3), SamplingParams(n=2, top_k=5, max_new_tokens=4, stop_token_ids=(3,), seed=7))
    return [("/generate", "POST", generate_payload(seeded, 1)),
            ("/generate", "POST", generate_payload(GenerationRequest((1,)), 0)),  # no seed, no top_k
            ("/begin_weight_update", "POST", {}),
            ("/update_weights_from_tensor", "POST", tensor_update_payload(["payload-rank0", "payload-rank1"], 3)),
            ("/init_weights_update_group", "POST", init_group_payload("10.0.0.1", 29500, 1, 5, "nccl")),
            ("/update_weights_from_distributed", "POST", distributed_update_payload(bucket, 3)),
            ("/end_weight_update", "POST", {}),
            ("/flush_cache", "POST", {}),
            ("/release_memory_occupation", "POST", {}),
            ("/resume_memory_occupation", "POST", {}),
            ("/health", "GET", None),
            *[("/pause_generation", "POST", pause_payload(mode)) for mode in PAUSE_MODES],
            ("/continue_generation", "POST", {})]


def test_every_request_of_the_engine_conforms_to_the_pinned_sglang(wheel):
    problems = [p for route, method, body in sent() for p in request_problems(wheel, route, method, body)]
    assert not problems, f"requests that SGLang {image_check.read_pin()[0]} would not read as meant:\n" + \
        "\n".join(problems)


def test_every_route_the_engine_names_is_checked():
    named = {n.value for module in (sglang_engine, sglang_weights, sglang_stream)
             for n in ast.walk(ast.parse(open(module.__file__, encoding="utf-8").read()))
             if isinstance(n, ast.Constant) and isinstance(n.value, str) and re.fullmatch(r"/[a-z_]+", n.value)}
    assert named == {route for route, _, _ in sent()}


def test_the_checker_reports_renamed_fields(wheel):
    """A field renamed in SGLang, or in a body we send, is reported; so is a route renamed upstream."""
    tensor = tensor_update_payload(["p"], 1)
    fields = dict(wheel["io"]["UpdateWeightsFromTensorReqInput"])
    assert body_problems(tensor, fields, "t") == []
    renamed = {("named_tensors" if k == "serialized_named_tensors" else k): v for k, v in fields.items()}
    assert body_problems(tensor, renamed, "t") == ["t sends 'serialized_named_tensors', which SGLang does not have",
                                                   "t leaves out 'named_tensors', which SGLang requires"]
    optional = {("version" if k == "weight_version" else k): v for k, v in fields.items()}
    assert body_problems(tensor, optional, "t") == ["t sends 'weight_version', which SGLang does not have"]

    body = generate_payload(GenerationRequest((1,), SamplingParams(max_new_tokens=3)), 0)
    body["sampling_params"]["max_tokens"] = body["sampling_params"].pop("max_new_tokens")
    problems = request_problems(wheel, "/generate", "POST", body)
    assert "/generate sampling_params (SamplingParams) sends 'max_tokens', which SGLang does not have" in problems
    assert "/generate sampling_params (contract) sends 'max_tokens', which SGLang does not have" in problems

    meta = distributed_update_payload([("w", torch.zeros(1))], 1)
    meta["tensor_names"] = meta.pop("names")
    assert request_problems(wheel, "/update_weights_from_distributed", "POST", meta) == [
        "/update_weights_from_distributed (UpdateWeightsFromDistributedReqInput) sends 'tensor_names', "
        "which SGLang does not have",
        "/update_weights_from_distributed (UpdateWeightsFromDistributedReqInput) leaves out 'names', "
        "which SGLang requires"]
    routes = {("/begin_update" if k == "/begin_weight_update" else k): v for k, v in wheel["routes"].items()}
    assert request_problems({**wheel, "routes": routes}, "/begin_weight_update", "POST", {}) == [
        "SGLang serves no /begin_weight_update"]
    assert request_problems(wheel, "/flush_cache", "POST", {"timeout": 1}) == [
        "/flush_cache reads no body, but ['timeout'] is sent"]


def test_the_parsers_read_dataclasses_structs_and_routes():
    fields = class_fields("class Base(msgspec.Struct):\n    rid: Optional[str] = None\n"
                          "class Req(Base, kw_only=True):\n    names: List[str]\n    flush: bool = True\n"
                          "    k: ClassVar[int] = 1\n"
                          "@dataclass\nclass Gen:\n    a: int = field(default=1)\n    b: int = field(kw_only=True)\n"
                          "class Plain:\n    def __init__(self, x, y=1, *, z, w=None):\n        self.x = x\n")
    assert fields["Req"] == {"rid": False, "names": True, "flush": False}
    assert fields["Gen"] == {"a": False, "b": True}
    assert fields["Plain"] == {"x": True, "y": False, "z": True, "w": False}
    routes = http_routes('@app.api_route("/x", methods=["GET", "POST"])\n'
                         'async def x(obj: Annotated[Req, Body()]): ...\n'
                         '@app.post("/y")\n@app.get("/z")\nasync def y(timeout: float = 0.0): ...\n')
    assert routes == {"/x": ({"GET", "POST"}, "Req"), "/y": ({"POST"}, None), "/z": ({"GET"}, None)}


def test_the_pinned_wheel_pins_the_torch_of_image_check_pairs(wheel):
    """tools/image_check.py's record of SGLang's torch is what the wheel's metadata says."""
    version = image_check.read_pin()[0]
    assert image_check.torch_pin(wheel["requires"]) == image_check.PAIRS["sglang"][version]


def test_a_missing_wheel_fails_and_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "WHEELS", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="run bash tools/bootstrap.sh"):
        _wheel_path()


def test_the_cpu_servers_control_routes_and_bodies_are_sglangs(wheel):
    """rollout.cpu_server stands in for SGLang: its pause / continue / abort routes exist in the pinned
    http_server.py with the same methods and request classes, every body field it reads is a field of
    that class (``/generate``'s of ``GenerateReqInput``, ``rid`` included), its pause modes and default
    are ``PauseGenerationReqInput.mode``'s, and its pause / continue answers are SGLang's."""
    from megatron_fipo.rollout import cpu_batcher, cpu_server

    classes = {"pause_generation": "PauseGenerationReqInput", "continue_generation": "ContinueGenerationReqInput",
               "abort_request": "AbortReq", "generate": "GenerateReqInput"}
    problems = []
    for name, cls in classes.items():
        methods, body_class = wheel["routes"].get("/" + name, (set(), None))
        ours = set(cpu_server.ROUTES[name][0])
        if not ours <= methods:
            problems.append(f"/{name}: the CPU server takes {sorted(ours)}, SGLang {sorted(methods)}")
        if body_class != cls:
            problems.append(f"/{name} reads a {body_class} in SGLang, not a {cls}")
        fields = cpu_server.GENERATE_FIELDS if name == "generate" else cpu_server.CONTROL_FIELDS[name]
        problems += [f"/{name}: the CPU server reads {f!r}, which {cls} does not have"
                     for f in sorted(set(fields) - set(wheel["io"][cls]))]
    assert not problems, "\n".join(problems)
    assert "rid" in cpu_server.GENERATE_FIELDS and {"rid", "abort_all"} <= cpu_server.CONTROL_FIELDS["abort_request"]
    with zipfile.ZipFile(_wheel_path()) as zf:
        io_source = zf.read(SOURCES["io"]).decode()
        http_source = zf.read(SOURCES["http"]).decode()
    pause = next(n for n in ast.walk(ast.parse(io_source))
                 if isinstance(n, ast.ClassDef) and n.name == "PauseGenerationReqInput")
    mode = next(s for s in pause.body if isinstance(s, ast.AnnAssign) and s.target.id == "mode")
    assert ast.unparse(mode.annotation) == f"Literal[{', '.join(repr(m) for m in cpu_batcher.PAUSE_MODES)}]"
    assert ast.literal_eval(mode.value) == "abort"  # the CPU server's default too
    for answer in (cpu_server.PAUSED, cpu_server.CONTINUED):
        assert f'content={{"message": "{answer["message"]}", "status": "{answer["status"]}"}}' in http_source
