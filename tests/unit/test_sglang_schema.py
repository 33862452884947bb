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
``init_group_payload``, ``distributed_update_payload``, ``pause_payload``, ``flush_route``; the
other routes get ``{}``), and every route the engine names must be listed there. A body fails when
it sends a field the class does not have or leaves out one without a default; a query string when
it names a parameter the route does not take. The readers, the checker and the list of requests
live in ``tools/sglang_wheel.py``, shared with ``tools/sglang_request_check.py``, which goes
further: it feeds the same requests to SGLang's own classes (tests/unit/test_sglang_request_check.py).
"""
import ast
import os
import re
import sys
import zipfile

import pytest
import torch

from megatron_fipo.rollout import sglang_engine, sglang_stream, sglang_weights
from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams
from megatron_fipo.rollout.sglang_engine import generate_payload
from megatron_fipo.rollout.sglang_weights import distributed_update_payload, tensor_update_payload

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import image_check  # noqa: E402
import sglang_wheel  # noqa: E402
from sglang_wheel import (  # noqa: E402
    SOURCES,
    WheelMissing,
    body_problems,
    class_fields,
    http_routes,
    query_params,
    read_wheel,
    request_problems,
)


def _wheel_path() -> str:
    try:
        return sglang_wheel.wheel_path()
    except WheelMissing as err:
        pytest.fail(str(err))


@pytest.fixture(scope="module")
def wheel() -> dict:
    """The pinned wheel's parsed sources (``sglang_wheel.read_wheel``)."""
    return read_wheel(_wheel_path())


def sent() -> list:
    return sglang_wheel.engine_requests()


def test_every_request_of_the_engine_conforms_to_the_pinned_sglang(wheel):
    problems = [p for route, method, body in sent() for p in request_problems(wheel, route, method, body)]
    assert not problems, f"requests that SGLang {image_check.read_pin()[0]} would not read as meant:\n" + \
        "\n".join(problems)


def test_every_route_the_engine_names_is_checked():
    named = {n.value for module in (sglang_engine, sglang_weights, sglang_stream)
             for n in ast.walk(ast.parse(open(module.__file__, encoding="utf-8").read()))
             if isinstance(n, ast.Constant) and isinstance(n.value, str) and re.fullmatch(r"/[a-z_]+", n.value)}
    assert named == {route.partition("?")[0] for route, _, _ in sent()}


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
    assert request_problems(wheel, "/flush_cache?timeout_s=5", "POST", {}) == [
        "/flush_cache has no query parameter 'timeout_s'"]


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
    assert query_params('@app.post("/f")\nasync def f(timeout: float = Query(0.0, ge=0.0), b: int = 1): ...\n'
                        '@app.get("/g")\nasync def g(obj: Req): ...\n') == {"/f": {"timeout"}, "/g": set()}


def test_the_pinned_wheel_pins_the_torch_of_image_check_pairs(wheel):
    """tools/image_check.py's record of SGLang's torch is what the wheel's metadata says."""
    version = image_check.read_pin()[0]
    assert image_check.torch_pin(wheel["requires"]) == image_check.PAIRS["sglang"][version]


def test_a_missing_wheel_fails_and_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(sglang_wheel, "WHEELS", str(tmp_path))
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
