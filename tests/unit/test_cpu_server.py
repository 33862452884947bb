"""rollout.cpu_server, the SGLang-protocol CPU server, driven through ``SGLangEngine`` as the trainer drives SGLang.

Every server is a subprocess (``ServerProcess``, killed when its fixture or test ends) serving a
tiny random HF Qwen2. The naive reference is ``CPUEngine`` in this process: sample ``j`` of a
request must equal ``CPUEngine.generate`` of the same prompt with ``SamplingParams(seed=seed + j,
n=1)`` (tokens and finish reason exactly, log-probs within 1e-5: the server decodes concurrent
requests in one batch), before and after weight updates that reach
the server by shared memory (``update_weights_from_tensor``) and by gloo broadcasts
(``update_weights_from_distributed``) and reach the reference by ``CPUEngine.update_weights``.
The engine's own payloads exercise the schema: the server refuses fields it does not implement.
Pause / continue / abort are driven over HTTP here; their interleavings with the decode loop are
tested in this process by tests/unit/test_cpu_batcher.py.
"""
import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from megatron_fipo.rollout.cpu_engine import CPUEngine
from megatron_fipo.rollout.cpu_server_weights import RequestError, load_named_tensors
from megatron_fipo.rollout.engine import EngineError, GenerationRequest, SamplingParams
from megatron_fipo.rollout.sglang_engine import SGLangEngine
from megatron_fipo.rollout.sglang_weights import serialize_named_tensors, tcp_gloo_group
from megatron_fipo.rollout.sglang_server import ServerProcess, free_port, post_checked, request
from tests.helpers import reused_buffer_buckets
from tests.hf_tiny import tiny_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER = [sys.executable, "-m", "megatron_fipo.rollout.cpu_server"]
NORM = "model.norm.weight"
# (prompt, sampling settings): plain, nucleus + temperature, top-k, and half the vocabulary as stop tokens
PROMPTS = [((5, 6, 7), {}), ((9,), dict(temperature=0.7, top_p=0.9)), ((11, 12, 13, 14, 15, 16), dict(top_k=20)),
           ((2, 3), dict(stop_token_ids=tuple(range(0, 201, 2))))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_hf_model(str(tmp_path_factory.mktemp("hf")), seed=5)


@pytest.fixture(scope="module")
def reference(model_dir):
    return CPUEngine(model_dir)


def _start(model_dir, log_dir, *args, tp=2) -> ServerProcess:
    port = free_port()
    server = ServerProcess(SERVER + ["--model-path", model_dir, "--host", "127.0.0.1", "--port", str(port),
                                     "--tp-size", str(tp), *args], f"http://127.0.0.1:{port}",
                           os.path.join(log_dir, f"cpu_server_{port}.log"), env={"PYTHONPATH": REPO})
    server.start()
    return server


def _healthy_server(model_dir, tmp_path_factory):
    server = _start(model_dir, str(tmp_path_factory.mktemp("logs")))
    try:
        server.wait_healthy(180)
        yield server.url
    finally:
        server.kill()


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    """A server holding the base weights (its tests leave them so)."""
    yield from _healthy_server(model_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def sync_server(model_dir, tmp_path_factory):
    """A server for the weight-update tests (each sends a whole state dict)."""
    yield from _healthy_server(model_dir, tmp_path_factory)


def _requests(seed, n=3):
    return [GenerationRequest(prompt, SamplingParams(n=n, max_new_tokens=6, seed=seed + 100 * i, **kw))
            for i, (prompt, kw) in enumerate(PROMPTS)]


def _per_sample(engine, requests):
    """The reference: each sample as its own n=1 request seeded ``seed + j`` (what the server answers)."""
    return [[engine.generate([GenerationRequest(r.prompt_ids, dataclasses.replace(r.params, n=1, seed=r.params.seed + j))])[0][0]
             for j in range(r.params.n)] for r in requests]


def _key(groups):
    return [(s.token_ids, s.logprobs, s.finish_reason) for g in groups for s in g]


def _expect(groups):
    """``_key`` of the expected samples as the batching server must match them: tokens and finish reasons
    exactly, log-probs within 1e-5 (requests decoded together change the fp32 rounding, not the draws)."""
    return [(tokens, pytest.approx(logprobs, abs=1e-5), reason) for tokens, logprobs, reason in _key(groups)]


def _stats(url):
    return request(url + "/fipo_stats", timeout=30)


def _perturbed(model_dir, seed):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(seed)
    return {n: p.detach() + 0.05 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


def _updated_reference(model_dir, named, version):
    ref = CPUEngine(model_dir)
    ref.update_weights(iter([list(named.items())]), version)
    return ref


def _error_of(url, payload):
    with pytest.raises(urllib.error.HTTPError) as err:
        request(url, payload, timeout=60)
    assert err.value.code == 400
    return json.loads(err.value.read().decode())


def _sources(url):
    return {(r["tp_rank"], r["name"]): r for r in _stats(url)["weight_sources"]}


# ---------------------------------------------------------------------------------------------- generation
def test_generate_equals_the_cpu_engine_one_by_one_and_concurrently(served, model_dir, reference):
    one = SGLangEngine(model_dir, urls=[served], tp_size=2, max_in_flight=1)
    many = SGLangEngine(model_dir, urls=[served], tp_size=2, max_in_flight=12)
    outs = []
    for seed in (0, 7):
        reqs = _requests(seed)
        expected = _expect(_per_sample(reference, reqs))
        assert _key(one.generate(reqs)) == expected
        assert _key(many.generate(reqs)) == expected  # 12 requests in flight at once: the same answers
        outs.append(_key(_per_sample(reference, reqs)))
    assert outs[0] != outs[1]
    assert {reason for _, _, reason in outs[0] + outs[1]} == {"stop", "length"}


def test_answer_schema_and_refusals(served, reference):
    """The fields the server returns are SGLang's; what it does not implement is an error, not ignored."""
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 4, "stop_token_ids": [],
                "sampling_seed": 3}
    out = request(served + "/generate", {"input_ids": [5, 6, 7], "sampling_params": sampling,
                                         "return_logprob": True}, timeout=60)
    assert set(out) == {"output_ids", "meta_info"}
    meta = out["meta_info"]
    assert set(meta) == {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
                         "weight_version", "weight_versions", "output_token_logprobs", "e2e_latency"}
    assert meta["weight_versions"] == [{"version": "default", "start": 0, "end": 4}]
    ref = reference.generate([GenerationRequest((5, 6, 7), SamplingParams(max_new_tokens=4, seed=3))])[0][0]
    assert meta["output_token_logprobs"] == [[lp, t, None] for lp, t in zip(ref.logprobs, ref.token_ids)]
    assert out["output_ids"] == ref.token_ids
    assert (meta["finish_reason"], meta["prompt_tokens"], meta["completion_tokens"], meta["weight_version"]) == \
        ({"type": "length", "length": 4}, 3, 4, "default")
    plain = request(served + "/generate", {"input_ids": [5, 6, 7], "sampling_params": sampling}, timeout=60)
    assert "output_token_logprobs" not in plain["meta_info"] and plain["output_ids"] == ref.token_ids
    for body, match in [
        ({"input_ids": [5], "sampling_params": {"min_new_tokens": 2}}, "min_new_tokens"),
        ({"input_ids": [5], "sampling_params": {"top_k": 0}}, "top_k must be -1"),
        ({"input_ids": [5], "sampling_params": {"n": 2}}, "n must be 1"),
        ({"input_ids": [5], "sampling_params": {"temperature": 0}}, "temperature"),
        ({"input_ids": [[5], [6]]}, "no batches"),
        ({"text": "hi"}, "input_ids only"),
        ({"input_ids": [10_000]}, "outside the vocabulary"),
    ]:
        assert match in _error_of(served + "/generate", body)["error"]["message"]
    info = request(served + "/get_model_info", timeout=30)
    assert info["is_generation"] is True and info["weight_version"] == "default"
    assert set(info) == {"model_path", "tokenizer_path", "is_generation", "preferred_sampling_params",
                         "weight_version"}


def test_a_refused_request_is_reported_at_once_with_the_servers_words(served, model_dir):
    """A 4xx from /generate is not retried (the same request would be refused again) and its message reaches
    the user: here a token outside the vocabulary."""
    engine = SGLangEngine(model_dir, urls=[served], tp_size=2, max_restarts=5)
    before = _stats(served)["requests"]
    with pytest.raises(EngineError, match=r"refused the request \(HTTP 400\): .*outside the vocabulary"):
        engine.generate([GenerationRequest((5, 10_000), SamplingParams(max_new_tokens=2, seed=1))])
    assert _stats(served)["requests"] - before == 1  # asked once, not 3 + max_restarts times


def test_prefix_cache_counts_one_prefill_per_prompt(served, model_dir):
    eng = SGLangEngine(model_dir, urls=[served], tp_size=2)
    prompt = (21, 22, 23, 24, 25)
    group = [GenerationRequest(prompt, SamplingParams(n=8, max_new_tokens=2, seed=1))]
    assert request(served + "/flush_cache", {}, timeout=30) == "Cache flushed.\n"  # SGLang answers text
    before = _stats(served)
    assert before["cached_prompts"] == 0
    eng.generate(group)
    once = _stats(served)
    assert once["requests"] - before["requests"] == 8
    assert once["prefill_tokens"] - before["prefill_tokens"] == len(prompt)  # 8 samples, one prefill
    assert once["cached_tokens"] - before["cached_tokens"] == 7 * len(prompt)
    eng.generate(group)
    twice = _stats(served)
    assert (twice["prefill_tokens"], twice["cached_tokens"] - once["cached_tokens"]) == \
        (once["prefill_tokens"], 8 * len(prompt))
    post_checked(served + "/flush_cache", {}, timeout=30, what="flush_cache")
    eng.generate(group)
    assert _stats(served)["prefill_tokens"] - twice["prefill_tokens"] == len(prompt)


def test_release_gates_generate_and_empties_the_cache(served, model_dir):
    eng = SGLangEngine(model_dir, urls=[served], tp_size=2)
    req = [GenerationRequest((5, 6), SamplingParams(n=2, max_new_tokens=3, seed=4))]
    before = _expect(eng.generate(req))
    eng.release()
    try:
        stats = _stats(served)
        assert stats["released"] and stats["cached_prompts"] == 0
        message = _error_of(served + "/generate", {"input_ids": [5, 6]})["error"]["message"]
        assert "released" in message
    finally:
        eng.resume()
    assert not _stats(served)["released"] and _key(eng.generate(req)) == before


def _wait_stats(url, ok, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not ok(_stats(url)["batcher"]):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {_stats(url)['batcher']}"
        time.sleep(0.02)


def test_pause_continue_and_abort_over_http(model_dir, reference, tmp_path):
    """A server launched with ``--max-running 2 --decode-step-ms 20``: abort one request by rid, retract the
    running ones (the flush is allowed then), continue: the others finish with the uninterrupted tokens;
    a pause in abort mode queues a new request until continue; the batcher's counters in /fipo_stats."""
    server = _start(model_dir, str(tmp_path), "--max-running", "2", "--decode-step-ms", "20", tp=1)
    bodies = [{"input_ids": [5, 6, k], "return_logprob": True, "rid": f"h{k}",
               "sampling_params": {"max_new_tokens": 60, "sampling_seed": k}} for k in range(3)]
    try:
        server.wait_healthy(180)
        url = server.url
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(request, url + "/generate", b, timeout=300) for b in bodies]
            _wait_stats(url, lambda b: b["running_batch"] == 2 and b["waiting"] == 1 and b["tokens"] >= 6,
                        "two running requests and one waiting")
            assert request(url + "/abort_request", {"rid": "h2"}, timeout=30) is None  # an empty 200, as SGLang
            _wait_stats(url, lambda b: (b["running_batch"], b["waiting"]) == (2, 0), "the two others running")
            assert request(url + "/pause_generation", {"mode": "retract"}, timeout=30) == {
                "message": "Generation paused successfully.", "status": "ok"}
            _wait_stats(url, lambda b: (b["paused"], b["running_batch"]) == ("retract", 0), "the retraction")
            assert request(url + "/flush_cache", {}, timeout=30) == "Cache flushed.\n"
            assert request(url + "/continue_generation", {}, timeout=30)["status"] == "ok"
            answers = {b["rid"]: f.result(timeout=300) for b, f in zip(bodies, futures)}
            for b in bodies:
                meta = answers[b["rid"]]["meta_info"]
                if meta["finish_reason"]["type"] == "abort":
                    continue
                ref = reference.generate([GenerationRequest(tuple(b["input_ids"]), SamplingParams(
                    max_new_tokens=60, seed=b["sampling_params"]["sampling_seed"]))])[0][0]
                assert answers[b["rid"]]["output_ids"] == ref.token_ids and meta["id"] == b["rid"]
                assert [lp for lp, _, _ in meta["output_token_logprobs"]] == pytest.approx(ref.logprobs, abs=1e-5)
            assert [r for r, a in answers.items() if a["meta_info"]["finish_reason"]["type"] == "abort"] == ["h2"]

            request(url + "/pause_generation", {"mode": "abort"}, timeout=30)
            late = pool.submit(request, url + "/generate", {"input_ids": [7], "sampling_params": {
                "max_new_tokens": 3, "sampling_seed": 1}}, timeout=300)
            _wait_stats(url, lambda b: b["waiting"] == 1, "the late request to queue")
            assert not late.done()
            request(url + "/continue_generation", {}, timeout=30)
            assert len(late.result(timeout=300)["output_ids"]) == 3
        assert "mode must be one of" in _error_of(url + "/pause_generation", {"mode": "later"})["error"]["message"]
        stats = _stats(url)["batcher"]
        assert (stats["max_running"], stats["decode_step_ms"], stats["aborted"], stats["retracted"]) == (2, 20.0, 1, 2)
        assert stats["max_batch"] == 2 and stats["decode_steps"] > 0 and stats["paused_s"] > 0
    finally:
        server.kill()


# ---------------------------------------------------------------------------------------------- weights
def test_colocated_update_lands_and_names_its_source(sync_server, model_dir, reference):
    named = _perturbed(model_dir, seed=1)
    eng = SGLangEngine(model_dir, urls=[sync_server], tp_size=2)
    eng.update_weights(reused_buffer_buckets(named.items(), 20_000), version=1)
    reqs = _requests(3)
    got = _key(eng.generate(reqs))
    assert got == _expect(_per_sample(_updated_reference(model_dir, named, 1), reqs))
    assert got != _key(_per_sample(reference, reqs))  # the update changed the samples
    stats = _stats(sync_server)
    assert (stats["weight_version"], stats["pending_update"]) == ("1", None)
    sources = _sources(sync_server)
    assert set(sources) == {(rank, name) for rank in (0, 1) for name in named}
    assert {(r["via"], r["pid"], r["weight_version"]) for r in sources.values()} == {("tensor", os.getpid(), "1")}


CHILD = """
import json, os, sys, torch
from megatron_fipo.rollout.sglang_weights import serialize_named_tensors
values = torch.tensor(json.loads(sys.stdin.readline()), dtype=torch.float32)
print(os.getpid(), serialize_named_tensors([(sys.argv[1], values)]), flush=True)
sys.stdin.readline()  # keep the shared memory alive until the test is done
"""


def test_per_rank_payloads_record_their_process_and_must_agree(sync_server, model_dir):
    named = _perturbed(model_dir, seed=2)
    child = subprocess.Popen([sys.executable, "-c", CHILD, NORM], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
    try:
        child.stdin.write(json.dumps(named[NORM].tolist()) + "\n")
        child.stdin.flush()
        child_pid, child_payload = child.stdout.readline().split()
        url = sync_server + "/update_weights_from_tensor"
        begin = sync_server + "/begin_weight_update"
        assert "begin_weight_update() and end_weight_update()" in _error_of(url, {
            "serialized_named_tensors": [serialize_named_tensors([(NORM, named[NORM].clone())])] * 2})["message"]
        post_checked(begin, {}, timeout=60, what="begin_weight_update")  # updates run inside a session
        assert "already open" in _error_of(begin, {})["message"]

        def post(payloads, version="7"):
            return post_checked(url, {"serialized_named_tensors": payloads, "load_format": None,
                                      "flush_cache": False, "weight_version": version}, timeout=60,
                                what="update_weights_from_tensor")

        # TP rank 0's copy of the norm comes from this process, TP rank 1's from the child
        assert "still to come" in post([serialize_named_tensors([(NORM, named[NORM].clone())]), child_payload])["message"]
        assert _stats(sync_server)["pending_update"] == {"weight_version": "7", "missing": len(named) - 1}
        assert "part-way" in _error_of(sync_server + "/generate", {"input_ids": [5]})["error"]["message"]
        rest = [(n, t) for n, t in named.items() if n != NORM]
        assert "complete" in post([serialize_named_tensors(rest)] * 2)["message"]  # one string for both ranks
        sources = _sources(sync_server)
        assert sources[(0, NORM)]["pid"] == os.getpid() and sources[(1, NORM)]["pid"] == int(child_pid) != os.getpid()
        assert {r["pid"] for key, r in sources.items() if key[1] != NORM} == {os.getpid()}
        assert _stats(sync_server)["weight_version"] == "7"
        out = request(sync_server + "/generate", {"input_ids": [5, 6], "sampling_params": {
            "max_new_tokens": 5, "sampling_seed": 9}, "return_logprob": True}, timeout=60)
        ref = _updated_reference(model_dir, named, 7).generate(
            [GenerationRequest((5, 6), SamplingParams(max_new_tokens=5, seed=9))])[0][0]
        assert out["output_ids"] == ref.token_ids and out["meta_info"]["weight_version"] == "7"

        # disagreeing ranks, a missing rank, an unknown weight: error answers that load nothing
        norm = named[NORM]
        for payloads, match in [
            ([serialize_named_tensors([(NORM, norm.clone())]), serialize_named_tensors([(NORM, norm + 1)])],
             "TP rank 1 received a different 'model.norm.weight'"),
            ([serialize_named_tensors([(NORM, norm.clone())]),
              serialize_named_tensors([("model.embed_tokens.weight", named["model.embed_tokens.weight"].clone())])],
             "the same names"),
            ([serialize_named_tensors([(NORM, norm.clone())])], "one element per TP rank"),
            ([serialize_named_tensors([("model.extra.weight", norm.clone())])] * 2, "unknown weight"),
        ]:
            with pytest.raises(EngineError, match=match):
                post(payloads, version="8")
        stats = _stats(sync_server)
        assert stats["weight_version"] == "7" and stats["pending_update"] is None and stats["session_open"]
    finally:
        child.stdin.close()
        child.wait(timeout=30)
        request(sync_server + "/end_weight_update", {}, timeout=60)
    assert not _stats(sync_server)["session_open"]
    assert "no weight-update session" in _error_of(sync_server + "/end_weight_update", {})["message"]


def test_disaggregated_update_over_gloo(sync_server, model_dir):
    named = _perturbed(model_dir, seed=3)
    eng = SGLangEngine(model_dir, urls=[sync_server], tp_size=2, mode="disaggregated", group_factory=tcp_gloo_group)
    eng.update_weights(reused_buffer_buckets(named.items(), 20_000), version=4)
    reqs = _requests(5)
    assert _key(eng.generate(reqs)) == _expect(_per_sample(_updated_reference(model_dir, named, 4), reqs))
    sources = _sources(sync_server)
    assert set(sources) == {(rank, name) for rank in (0, 1) for name in named}
    masters = {(r["via"], r["master"], r["weight_version"]) for r in sources.values()}
    assert len(masters) == 1 and masters.pop()[:3:2] == ("distributed", "4")
    assert next(iter(sources.values()))["master"].startswith("127.0.0.1:")


# ---------------------------------------------------------------------------------------------- failures
def test_failure_knobs_and_sglang_arguments(model_dir, tmp_path):
    launch = SERVER + ["--fail-endpoint", "update_weights_from_tensor", "--die-after-requests", "3"]
    eng = SGLangEngine(model_dir, launch_cmd=launch, tp_size=2, log_dir=str(tmp_path / "logs"), max_restarts=0,
                       max_in_flight=1, startup_timeout=180, server_args={"mem_fraction_static": 0.7,
                                                                          "enable_memory_saver": True})
    with eng:
        with pytest.raises(EngineError, match="injected failure in update_weights_from_tensor"):
            eng.update_weights(iter([[(NORM, torch.ones(64))]]), version=1)
        assert eng.weight_version == 0
        eng.generate([GenerationRequest((5,), SamplingParams(n=2, max_new_tokens=2, seed=0))])
        with pytest.raises(EngineError, match="dying as asked"):  # the third request
            eng.generate([GenerationRequest((5,), SamplingParams(n=1, max_new_tokens=2, seed=0))])
        log = eng.servers[0].tail(200)
    assert "ignoring ['--base-gpu-id', '0', '--mem-fraction-static', '0.7', '--enable-memory-saver']" in log

    server = _start(model_dir, str(tmp_path), "--never-healthy", tp=1)
    try:
        deadline = time.monotonic() + 180
        while "cpu-sglang: serving" not in server.tail() and server.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError, match="503"):
            request(server.url + "/health", timeout=30)
        with pytest.raises(EngineError, match="not healthy after 1 s"):
            server.wait_healthy(1)
    finally:
        server.kill()


def test_payload_reader_names_the_process_and_refuses_foreign_objects():
    import base64
    import pickle

    named = load_named_tensors(serialize_named_tensors([("a", torch.arange(4.0)), ("b", torch.ones(2, 3))]))
    assert [(n, t.tolist(), pid) for n, t, pid in named] == \
        [("a", [0.0, 1.0, 2.0, 3.0], os.getpid()), ("b", [[1.0] * 3] * 2, os.getpid())]
    for obj, match in [([("x", os.system)], "unexpected object"), ({"a": 1}, "list of"),
                       ([("x", torch.ones(2))], "unexpected object torch._utils")]:  # a tensor pickled by value
        with pytest.raises(RequestError, match=match):
            load_named_tensors(base64.b64encode(pickle.dumps(obj)).decode())
    with pytest.raises(RequestError, match="not base64"):
        load_named_tensors("%%%")


# ---------------------------------------------------------------------------------------------- routing
def test_routing_over_real_model_servers(model_dir, reference, tmp_path):
    """Three CPU servers (tp 1) behind one ``SGLangEngine``: at n=8 the samples equal the reference with 1, 2
    and 3 servers, and the servers' own prefill counters show each prompt prefilled once per round (the
    old per-sample round-robin, replayed with ``_sample(k % 3, ...)``: once per server it reached)."""
    servers = [_start(model_dir, str(tmp_path), tp=1) for _ in range(3)]
    try:
        for s in servers:
            s.wait_healthy(180)
        urls = [s.url for s in servers]
        requests = _requests(11, n=8)
        expected = _expect(_per_sample(reference, requests))
        for k in (1, 2, 3):
            assert _key(SGLangEngine(model_dir, urls=urls[:k]).generate(requests)) == expected, k
        eng = SGLangEngine(model_dir, urls=urls)
        prompt_tokens = sum(len(r.prompt_ids) for r in requests)

        def prefill_of(run):
            for url in urls:
                request(url + "/flush_cache", {}, timeout=30)
            before = sum(_stats(url)["prefill_tokens"] for url in urls)
            run()
            return sum(_stats(url)["prefill_tokens"] for url in urls) - before

        routed = prefill_of(lambda: eng.generate(requests))
        round_robin = prefill_of(lambda: [eng._sample(k % 3, requests[ri], ri, j) for k, (ri, j) in enumerate(
            (ri, j) for ri in range(len(requests)) for j in range(8))])
        assert routed == prompt_tokens and round_robin == 3 * prompt_tokens
        print(f"prefill tokens per round at n=8 on 3 CPU servers: round-robin {round_robin}, prompt-affine "
              f"{routed} (ratio {round_robin / routed:.2f})")
    finally:
        for s in servers:
            s.kill()
