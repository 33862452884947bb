"""rollout.cpu_batcher, the CPU server's continuous-batching decode loop, through ``CPUServer.handle`` in this process.

The reference of every sample is ``CPUEngine.generate`` of the same request alone (tokens exactly,
log-probs within 1e-5: the batch shapes change fp32 rounding only). Requests run in threads, as
the HTTP front runs them; interleavings are made with ``--decode-step-ms`` (steps long enough to
pause between) and by polling the batcher's live requests, never by timed assertions. The
weight-version spans are checked against the pinned SGLang wheel's own ``weight_versions.py``,
executed here with a stand-in for ``msgspec`` (not installed), and against hand-worked cases.
"""
import builtins
import random
import sys
import time
import types
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from megatron_fipo.rollout.cpu_accounting import PrefixCache, version_spans, versions_meta
from megatron_fipo.rollout.cpu_engine import CPUEngine
from megatron_fipo.rollout.cpu_server import CPUServer
from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams
from megatron_fipo.rollout.sglang_weights import serialize_named_tensors
from tests.hf_tiny import tiny_hf_model

pytestmark = pytest.mark.timeout(600)
STOP_EVEN = list(range(0, 201, 2))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_hf_model(str(tmp_path_factory.mktemp("hf")), seed=5)


@pytest.fixture(scope="module")
def reference(model_dir):
    return CPUEngine(model_dir)


@pytest.fixture
def make_server(model_dir):
    servers = []

    def make(**kw):
        servers.append(CPUServer(model_dir, **kw))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def pool():
    executor = ThreadPoolExecutor(16)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)  # a failed test's requests end when its servers close


def _body(prompt, seed, max_new, rid=None, **sampling):
    body = {"input_ids": list(prompt), "return_logprob": True,
            "sampling_params": dict(max_new_tokens=max_new, sampling_seed=seed, **sampling)}
    return body if rid is None else dict(body, rid=rid)


def _alone(reference, body):
    sp = dict(body["sampling_params"])
    params = SamplingParams(max_new_tokens=sp.pop("max_new_tokens"), seed=sp.pop("sampling_seed"),
                            top_k=max(sp.pop("top_k", -1), 0), stop_token_ids=tuple(sp.pop("stop_token_ids", ())), **sp)
    return reference.generate([GenerationRequest(tuple(body["input_ids"]), params)])[0][0]


def _ok(future):
    code, answer = future.result(timeout=300)
    assert code == 200, answer
    return answer


def _logprobs(answer):
    return [lp for lp, _, _ in answer["meta_info"]["output_token_logprobs"]]


def _assert_prefix_of_alone(answer, alone, whole=True):
    n = len(answer["output_ids"])
    assert answer["output_ids"] == alone.token_ids[:n]
    assert _logprobs(answer) == pytest.approx(alone.logprobs[:n], abs=1e-5)
    if whole:
        assert n == len(alone.token_ids)
        assert answer["meta_info"]["finish_reason"]["type"] == alone.finish_reason


def _wait_for(condition, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _tokens_of(server, rid):
    return next((len(j.tokens) for j in server.batcher.live() if j.rid == rid), None)


def _post(server, route, body=None):
    code, answer = server.handle("POST", "/" + route, body or {})
    assert code == 200, answer
    return answer


# ---------------------------------------------------------------------------------------------- batching
def test_samples_do_not_depend_on_co_running_requests(make_server, reference, pool):
    """Eight requests of different lengths and settings arriving at different times, at most three running:
    each equals the same request run alone, and no step ran more than three."""
    server = make_server(max_running=3)
    bodies = [_body([(7 * i + j) % 150 + 1 for j in range(1 + 3 * i)], seed=11 * i, max_new=8 + 3 * i,
                    **[{}, dict(temperature=0.7, top_p=0.9), dict(top_k=20), dict(stop_token_ids=STOP_EVEN)][i % 4])
              for i in range(8)]
    futures = []
    for i, body in enumerate(bodies):
        futures.append(pool.submit(server.handle, "POST", "/generate", body))
        if i % 3 == 2:
            _wait_for(lambda: server.batcher.stats()["tokens"] > 4 * i, "some tokens")  # arrive mid-flight
    for body, future in zip(bodies, futures):
        _assert_prefix_of_alone(_ok(future), _alone(reference, body))
    stats = server.batcher.stats()
    assert 2 <= stats["max_batch"] <= 3
    assert stats["running_sum"] <= 3 * stats["decode_steps"]
    assert stats["tokens"] == sum(len(_alone(reference, b).token_ids) for b in bodies)


def test_decode_step_ms_is_a_floor_per_step(make_server, pool):
    server = make_server(max_running=8, decode_step_ms=25)
    start = time.monotonic()
    futures = [pool.submit(server.handle, "POST", "/generate", _body([5, 6, i + 1], seed=i, max_new=12))
               for i in range(8)]
    for future in futures:
        _ok(future)
    elapsed = time.monotonic() - start
    stats = server.stats({})["batcher"]
    assert stats["decode_step_ms"] == 25 and stats["decode_steps"] >= 11
    assert stats["decode_steps"] * 0.025 <= elapsed
    assert stats["running_sum"] / stats["decode_steps"] > 1  # the steps were shared
    assert stats["slot_utilisation"] == stats["running_sum"] / (8 * stats["decode_steps"])


# ---------------------------------------------------------------------------------------------- pause, abort
def test_pause_abort_answers_partial_outputs_and_queues_until_continue(make_server, reference, pool):
    server = make_server(max_running=2, decode_step_ms=20)
    bodies = [_body([3, 4, 5 + i], seed=i, max_new=150, rid=f"r{i}") for i in range(3)]
    futures = [pool.submit(server.handle, "POST", "/generate", b) for b in bodies[:2]]
    _wait_for(lambda: all((_tokens_of(server, f"r{i}") or 0) >= 3 for i in range(2)), "two running requests")
    futures.append(pool.submit(server.handle, "POST", "/generate", bodies[2]))
    _wait_for(lambda: server.batcher.stats()["waiting"] == 1, "a third request to queue")
    assert _post(server, "pause_generation", {"mode": "abort"}) == {"message": "Generation paused successfully.",
                                                                    "status": "ok"}
    answers = [_ok(f) for f in futures]
    for body, answer in zip(bodies[:2], answers[:2]):
        assert answer["meta_info"]["finish_reason"]["type"] == "abort"
        assert 3 <= answer["meta_info"]["completion_tokens"] == len(answer["output_ids"]) < 150
        _assert_prefix_of_alone(answer, _alone(reference, body), whole=False)
    assert answers[2]["output_ids"] == [] and answers[2]["meta_info"]["finish_reason"] == {
        "type": "abort", "message": "Abort in waiting queue"}  # it never ran (max_running 2)
    assert answers[2]["meta_info"]["weight_versions"] == [{"version": "default", "start": 0, "end": 0}]

    late = _body([9, 9], seed=3, max_new=5)
    future = pool.submit(server.handle, "POST", "/generate", late)  # paused: it waits, not refused
    _wait_for(lambda: server.batcher.stats()["waiting"] == 1, "the late request to queue")
    time.sleep(0.2)
    assert not future.done() and server.batcher.stats()["paused"] == "abort"
    assert _post(server, "continue_generation") == {"message": "Generation continued successfully.", "status": "ok"}
    _assert_prefix_of_alone(_ok(future), _alone(reference, late))
    stats = server.batcher.stats()
    assert (stats["aborted"], stats["pauses"], stats["paused"]) == (3, 1, None) and stats["paused_s"] >= 0.2


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_retract_and_in_place_then_continue_give_the_uninterrupted_tokens(make_server, reference, pool, mode):
    server = make_server(max_running=4, decode_step_ms=10)
    bodies = [_body([2 + i] * (1 + 2 * i), seed=20 + i, max_new=40, rid=f"q{i}", temperature=0.9) for i in range(3)]
    futures = [pool.submit(server.handle, "POST", "/generate", b) for b in bodies]
    _wait_for(lambda: all((_tokens_of(server, f"q{i}") or 0) >= 3 for i in range(3)), "three running requests")
    _post(server, "pause_generation", {"mode": mode})
    stats = server.batcher.stats()
    assert (stats["running_batch"], stats["waiting"]) == ((0, 3) if mode == "retract" else (3, 0))
    counts = [_tokens_of(server, f"q{i}") for i in range(3)]
    time.sleep(0.15)
    assert [_tokens_of(server, f"q{i}") for i in range(3)] == counts  # nothing ran while paused
    refusal = server.handle("POST", "/flush_cache", {})
    assert (refusal[0] == 200) == (mode == "retract")  # SGLang: no flush with a running batch (in_place)
    _post(server, "continue_generation")
    for body, future in zip(bodies, futures):
        answer = _ok(future)
        _assert_prefix_of_alone(answer, _alone(reference, body))
        assert answer["meta_info"]["weight_versions"] == [{"version": "default", "start": 0,
                                                           "end": len(answer["output_ids"])}]
    stats = server.batcher.stats()
    assert (stats["retracted"] > 0) == (stats["recomputed_tokens"] > 0) == (mode == "retract")
    assert server.writes_under_requests == 0


def test_abort_request_by_rid_prefix_and_all(make_server, reference, pool):
    server = make_server(max_running=4, decode_step_ms=15)
    bodies = {rid: _body([6, 7, k], seed=k, max_new=100, rid=rid)
              for k, rid in enumerate(["a-1", "b-1", "b-2"], start=1)}
    futures = {rid: pool.submit(server.handle, "POST", "/generate", b) for rid, b in bodies.items()}
    _wait_for(lambda: all((_tokens_of(server, r) or 0) >= 2 for r in bodies), "three running requests")
    assert server.handle("POST", "/abort_request", {"rid": "a-1"}) == (200, None)  # SGLang answers empty
    assert server.handle("POST", "/abort_request", {"rid": ""}) == (200, None)  # an empty rid matches nothing
    aborted = _ok(futures["a-1"])
    assert aborted["meta_info"]["finish_reason"]["type"] == "abort" and aborted["meta_info"]["id"] == "a-1"
    _assert_prefix_of_alone(aborted, _alone(reference, bodies["a-1"]), whole=False)
    assert {r for r in bodies if _tokens_of(server, r) is not None} == {"b-1", "b-2"}
    code, answer = server.handle("POST", "/generate", bodies["b-1"])
    assert code == 400 and "already running" in answer["error"]["message"]
    _post(server, "abort_request", {"rid": "b"})  # a prefix, as SGLang matches
    for rid in ("b-1", "b-2"):
        assert _ok(futures[rid])["meta_info"]["finish_reason"]["type"] == "abort"
    code, answer = server.handle("POST", "/abort_request", {"rid": "x", "finished_reason": None})
    assert code == 400 and "does not implement" in answer["error"]["message"]
    again = pool.submit(server.handle, "POST", "/generate", bodies["a-1"])
    _wait_for(lambda: (_tokens_of(server, "a-1") or 0) >= 1, "a new request")
    _post(server, "abort_request", {"abort_all": True})
    assert _ok(again)["meta_info"]["finish_reason"]["type"] == "abort"


def test_requests_queued_during_a_pause_run_after_continue(make_server, reference, pool):
    server = make_server(max_running=2)
    _post(server, "pause_generation", {"mode": "retract"})
    bodies = [_body([4, 5, 6], seed=s, max_new=6) for s in range(3)]
    futures = [pool.submit(server.handle, "POST", "/generate", b) for b in bodies]
    _wait_for(lambda: server.batcher.stats()["waiting"] == 3, "three queued requests")
    assert _post(server, "flush_cache") == "Cache flushed.\n"  # paused: the waiting queue does not block it
    assert not any(f.done() for f in futures)
    _post(server, "continue_generation")
    for body, future in zip(bodies, futures):
        _assert_prefix_of_alone(_ok(future), _alone(reference, body))


# ---------------------------------------------------------------------------------------------- weights in flight
def _perturbed(model_dir, seed):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _update(server, model, version):
    _post(server, "begin_weight_update")
    named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    out = _post(server, "update_weights_from_tensor", {"serialized_named_tensors": [serialize_named_tensors(named)],
                                                       "load_format": None, "flush_cache": True,
                                                       "weight_version": version})
    assert "complete" in out["message"]
    _post(server, "end_weight_update")


def _logp(logits, tokens, temperature):
    return torch.log_softmax(logits.float() / temperature, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()


@torch.no_grad()
def _full_forward(model, prompt, tokens, temperature):
    logits = model(torch.tensor([list(prompt) + tokens])).logits[0, len(prompt) - 1:-1]
    return _logp(logits, tokens, temperature)


@torch.no_grad()
def _stale_kv_forward(old, new, prompt, tokens, k, temperature):
    """Log-probs of ``tokens[k:]`` by ``new`` attending ``old``'s KV of prompt + ``tokens[:k - 1]`` (in_place)."""
    from transformers import DynamicCache

    seq, cut, cache = list(prompt) + tokens, len(prompt) + k - 1, DynamicCache()
    old(torch.tensor([seq[:cut]]), past_key_values=cache, use_cache=True)
    logits = new(torch.tensor([seq[cut:-1]]), position_ids=torch.arange(cut, len(seq) - 1)[None],
                 past_key_values=cache, use_cache=True).logits[0]
    return _logp(logits, tokens[k:], temperature)


@pytest.mark.parametrize("mode", ["in_place", "retract"])
def test_weight_update_while_paused_gives_spans_and_new_weights_logprobs(make_server, model_dir, pool, mode):
    from transformers import AutoModelForCausalLM

    old = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    new = _perturbed(model_dir, seed=1)
    server = make_server(max_running=4, decode_step_ms=15)
    _update(server, old, "v0")  # the base weights, named v0
    body = _body([8, 9, 10, 11], seed=3, max_new=30, rid="w", temperature=0.8)
    future = pool.submit(server.handle, "POST", "/generate", body)
    _wait_for(lambda: (_tokens_of(server, "w") or 0) >= 3, "three tokens")
    _post(server, "pause_generation", {"mode": mode})
    k = _tokens_of(server, "w")
    _update(server, new, "v1")
    assert server.writes_under_requests == 0  # paused: the in-flight path
    _post(server, "continue_generation")
    answer = _ok(future)
    tokens, n, meta = answer["output_ids"], len(answer["output_ids"]), answer["meta_info"]
    assert k < n and meta["weight_version"] == "v1"
    assert meta["weight_versions"] == [{"version": "v0", "start": 0, "end": k}, {"version": "v1", "start": k, "end": n}]
    got = _logprobs(answer)
    assert got[:k] == pytest.approx(_full_forward(old, body["input_ids"], tokens, 0.8)[:k], abs=1e-5)
    fresh = _full_forward(new, body["input_ids"], tokens, 0.8)[k:]  # new weights, KV recomputed
    stale = _stale_kv_forward(old, new, body["input_ids"], tokens, k, 0.8)  # new weights on the old KV
    assert max(abs(a - b) for a, b in zip(fresh, stale)) > 1e-3  # the two differ: the test can tell them apart
    assert got[k:] == pytest.approx(fresh if mode == "retract" else stale, abs=1e-5)
    assert server.batcher.stats()["version_events"] == 1


def test_weight_write_under_running_requests_counts(make_server, model_dir, pool):
    server = make_server(decode_step_ms=10)
    future = pool.submit(server.handle, "POST", "/generate", _body([5], seed=0, max_new=60, rid="u"))
    _wait_for(lambda: (_tokens_of(server, "u") or 0) >= 1, "a running request")
    _post(server, "begin_weight_update")
    assert server.stats({})["writes_under_requests"] == 1
    code, answer = server.handle("POST", "/flush_cache", {})
    assert code == 400 and "#running-req: 1" in answer["error"]["message"]
    _post(server, "end_weight_update")
    _post(server, "abort_request", {"abort_all": True})
    assert _ok(future)["meta_info"]["finish_reason"]["type"] == "abort"



def test_deferred_flush_waits_for_the_server_to_be_idle(make_server, pool):
    """``/flush_cache?timeout=S`` (SGLang's deferred flush): answered once nothing runs or waits, here after
    the running request is aborted; a 0 timeout is refused at once; a paused server with waiting
    (retracted) requests never becomes idle, so the deferred flush times out while a plain one succeeds."""
    server = make_server(decode_step_ms=10)
    future = pool.submit(server.handle, "POST", "/generate", _body([5], seed=0, max_new=200, rid="d"))
    _wait_for(lambda: (_tokens_of(server, "d") or 0) >= 1, "a running request")
    assert server.handle("POST", "/flush_cache", {})[0] == 400
    flushed = pool.submit(server.handle, "POST", "/flush_cache?timeout=60", {})
    time.sleep(0.05)
    assert not flushed.done()  # deferred, not refused
    flushes = server.flushes
    _post(server, "abort_request", {"abort_all": True})
    assert _ok(flushed) == "Cache flushed.\n" and server.flushes == flushes + 1
    assert _ok(future)["meta_info"]["finish_reason"]["type"] == "abort"

    future = pool.submit(server.handle, "POST", "/generate", _body([6], seed=1, max_new=200, rid="e"))
    _wait_for(lambda: (_tokens_of(server, "e") or 0) >= 1, "a running request")
    _post(server, "pause_generation", {"mode": "retract"})
    code, answer = server.handle("POST", "/flush_cache?timeout=0.2", {})
    assert code == 400 and answer["error"]["message"] == "Timed out waiting for idle state."
    assert server.handle("POST", "/flush_cache", {})[0] == 200  # SGLang flushes a paused server at once
    code, answer = server.handle("POST", "/flush_cache?wait=1", {})
    assert code == 400 and "no query parameter ['wait']" in answer["error"]["message"]
    _post(server, "continue_generation")
    _post(server, "abort_request", {"abort_all": True})
    assert _ok(future)["meta_info"]["finish_reason"]["type"] == "abort"


# ---------------------------------------------------------------------------------------------- accounting
def test_continuation_reports_the_cached_prefix(make_server, pool):
    server = make_server()
    prompt = [30, 31, 32, 33]
    first = _ok(pool.submit(server.handle, "POST", "/generate", _body(prompt, seed=1, max_new=5)))
    out = first["output_ids"]
    assert first["meta_info"]["cached_tokens"] == 0
    for tail, cached in [(out[:3], len(prompt) + 3), (out, len(prompt) + 4), ([199], len(prompt))]:
        answer = _ok(pool.submit(server.handle, "POST", "/generate", _body(prompt + tail, seed=2, max_new=1)))
        assert answer["meta_info"]["cached_tokens"] == cached, tail
    stats = server.stats({})
    assert stats["cached_tokens"] == 3 * len(prompt) + 7
    assert stats["prefill_tokens"] == len(prompt) + 0 + 1 + 1


def test_prefix_cache_is_a_longest_common_prefix_match():
    cache = PrefixCache()
    assert cache.prefill((1, 2, 3)) == 0 and cache.prefill((1, 2, 3)) == 3 and cache.prefill((1, 2, 4, 5)) == 2
    assert cache.match((1, 2, 4, 5, 6)) == 4 and cache.match((9,)) == 0 and cache.sequences == 2
    assert (cache.prefill_tokens, cache.cached_tokens) == (3 + 0 + 2, 0 + 3 + 2)
    cache.insert((1, 2))  # a prefix of a held sequence is a sequence of its own
    assert cache.sequences == 3
    cache.clear()
    assert cache.match((1, 2, 3)) == 0 and cache.sequences == 0


# ---------------------------------------------------------------------------------------------- spans vs SGLang
def _sglang_weight_versions(monkeypatch):
    """The pinned wheel's ``sglang/srt/utils/weight_versions.py``, executed with a stand-in ``msgspec.Struct``
    as a module of its own (registered in ``sys.modules`` for the test: dataclasses look it up)."""
    from tests.unit.test_sglang_schema import _wheel_path

    with zipfile.ZipFile(_wheel_path()) as zf:
        source = zf.read("sglang/srt/utils/weight_versions.py").decode()

    class Struct:
        def __init_subclass__(cls, **options):
            super().__init_subclass__()

        def __init__(self, **fields):
            self.__dict__.update(fields)

    stubs = {"msgspec": types.SimpleNamespace(Struct=Struct),
             "sglang.srt.utils.msgspec_utils": types.SimpleNamespace(msgspec_struct_pydantic_core_schema=None)}
    real = builtins.__import__

    def importer(name, *args, **kwargs):
        return stubs[name] if name in stubs else real(name, *args, **kwargs)

    module = types.ModuleType("pinned_sglang_weight_versions")
    module.__builtins__ = dict(vars(builtins), __import__=importer)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(source, "sglang/srt/utils/weight_versions.py", "exec"), module.__dict__)
    return vars(module)


def test_version_spans_equal_sglangs(monkeypatch):
    sg = _sglang_weight_versions(monkeypatch)
    rng = random.Random(0)
    for _ in range(2000):
        n_events, n = rng.randint(0, 4), rng.randint(0, 12)
        points = sorted(rng.randint(1, 14) for _ in range(n_events))
        events = [(rng.choice("abc"), p) for p in points]
        current, shown_n = rng.choice("abc"), rng.choice([n, max(n - 2, 0)])
        theirs = sg["compute_weight_version_spans"]([sg["WeightVersionEvent"](v, p) for v, p in events], current, n)
        ours = version_spans(events, current, n)
        assert [(s.version, s.start, s.end) for s in theirs] == [(s["version"], s["start"], s["end"]) for s in ours]
        meta: dict = {}
        sg["add_weight_versions_to_meta_info"](meta, theirs, shown_n)
        assert meta == versions_meta(ours, shown_n), (events, current, n, shown_n)


def test_version_spans_hand_worked():
    assert version_spans([], "default", 0) == [{"version": "default", "start": 0, "end": 0}]
    assert version_spans([("v0", 3)], "v1", 7) == [{"version": "v0", "start": 0, "end": 3},
                                                   {"version": "v1", "start": 3, "end": 7}]
    # two updates without a token between them: the middle version drew nothing
    assert version_spans([("v0", 3), ("v1", 3)], "v2", 5) == [{"version": "v0", "start": 0, "end": 3},
                                                              {"version": "v2", "start": 3, "end": 5}]
    # back to an earlier version right after it: one run
    assert version_spans([("v0", 2)], "v0", 4) == [{"version": "v0", "start": 0, "end": 4}]
    meta = versions_meta(version_spans([("v0", 2), ("v1", 4)], "v2", 6), 3)
    assert meta == {"weight_versions": [{"version": "v0", "start": 0, "end": 2},
                                        {"version": "v1", "start": 2, "end": 3}], "weight_version": "v1"}
