"""rollout.sglang_engine against tests/fake_sglang_server.py (SGLang's HTTP endpoints and schemas, on CPU).

The fake server really deserializes the weight payloads and really joins the gloo weight-update
group, recording a checksum of every tensor each TP rank received; its samples depend on those
weights, so a sync that did not arrive shows.
"""
import hashlib
import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import torch

from megatron_fipo.rollout.engine import EngineError, GenerationRequest, SamplingParams
from megatron_fipo.rollout.sglang_engine import SGLangEngine
from megatron_fipo.rollout.sglang_weights import serialize_named_tensors, tcp_gloo_group
from megatron_fipo.rollout.sglang_server import request, server_argv
from tests.helpers import reused_buffer_buckets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE = [sys.executable, os.path.join(REPO, "tests", "fake_sglang_server.py")]


def _engine(tmp_path, *extra, **kw):
    kw.setdefault("startup_timeout", 60)
    return SGLangEngine("tiny-model", launch_cmd=FAKE + list(extra), log_dir=str(tmp_path / "logs"),
                        group_factory=tcp_gloo_group, **kw)


def _state(engine, i):
    return request(engine.urls[i] + "/fake_state", timeout=10)


def _sha(t):
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def _children():
    return [p for p in psutil.Process().children(recursive=True) if "fake_sglang_server" in " ".join(p.cmdline())]


def _requests(seed=1, n=3, stop=()):
    return [GenerationRequest((1, 2, L), SamplingParams(n=n, max_new_tokens=6, seed=seed, stop_token_ids=stop))
            for L in range(4)]


def test_payload_round_trip_in_another_process():
    buf = torch.randn(20)
    named = [("w", buf[:6].view(2, 3)), ("b", buf[6:10]), ("x", buf[10:])]
    payload = serialize_named_tensors(named)
    code = ("import sys, json; sys.path.insert(0, %r)\n"
            "from megatron_fipo.rollout.sglang_weights import deserialize_named_tensors\n"
            "out = deserialize_named_tensors(sys.stdin.read())\n"
            "print(json.dumps([[n, t.tolist(), str(t.dtype), list(t.shape), t.untyped_storage().data_ptr()] "
            "for n, t in out]))" % REPO)
    proc = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True, timeout=120)
    got = json.loads(proc.stdout)
    assert [(n, s) for n, _, _, s, _ in got] == [("w", [2, 3]), ("b", [4]), ("x", [10])]
    for (n, t), (_, values, dtype, _, _) in zip(named, got):
        assert torch.equal(torch.tensor(values), t) and dtype == "torch.float32"
    assert len({ptr for *_, ptr in got}) == 1  # the bucket's views share one storage (one handle)


def test_server_argv_pass_through():
    assert server_argv({"mem_fraction_static": 0.7, "enable_memory_saver": True, "x": False, "l": [1, 2]}) == \
        ["--mem-fraction-static", "0.7", "--enable-memory-saver", "--l", "1", "2"]


def test_generation_and_colocated_sync(tmp_path):
    with _engine(tmp_path, replicas=2, tp_size=2) as eng:
        first = eng.generate(_requests(), progress=True)
        assert all(_state(eng, i)["requests"] > 0 for i in range(2))  # spread over both replicas
        for group in first:
            assert len(group) == 3
            for s in group:
                assert len(s.token_ids) == len(s.logprobs) == 6 and s.finish_reason == "length"
                assert s.weight_version == 0 and all(lp <= 0 for lp in s.logprobs)
        again = eng.generate(_requests())
        assert [s.token_ids for g in again for s in g] == [s.token_ids for g in first for s in g]
        assert [s.token_ids for g in eng.generate(_requests(seed=2)) for s in g] != \
            [s.token_ids for g in first for s in g]
        stopped = [s for g in eng.generate(_requests(stop=tuple(range(50)))) for s in g]
        assert all(s.finish_reason == "stop" and s.token_ids[-1] < 50 for s in stopped if len(s.token_ids) < 6)
        tensors = [(f"layer{i}.weight", torch.randn(3, 5) + i) for i in range(9)]
        eng.update_weights(reused_buffer_buckets(tensors, 64, fill=-7.0), version=5)
        for i in range(2):
            state = _state(eng, i)
            assert state["weight_version"] == "5" and state["flushes"] == 1
            assert state["sessions"] == 1 and not state["session_open"]  # one begin ... end session per sync
            for rank in ("0", "1"):
                assert state["checksums"][rank] == {n: _sha(t) for n, t in tensors}
        after = eng.generate(_requests())
        assert all(s.weight_version == 5 for g in after for s in g)
        assert [s.token_ids for g in after for s in g] != [s.token_ids for g in first for s in g]
        eng.release()
        assert _state(eng, 0)["released"]
        eng.resume()
        assert not _state(eng, 1)["released"] and eng.health()["ok"]
    assert not _children()
    with pytest.raises(EngineError, match="shut down"):
        eng.generate(_requests())


def test_disaggregated_sync_through_a_gloo_group(tmp_path):
    tensors = [(f"p{i}", torch.randn(4, i + 1)) for i in range(5)] + [("half", torch.randn(7).to(torch.bfloat16))]
    with _engine(tmp_path, replicas=2, tp_size=2, mode="disaggregated") as eng:
        eng.update_weights(iter([tensors[:3], tensors[3:]]), version=2)
        eng.update_weights(iter([tensors]), version=3)  # the group is set up once
        for i in range(2):
            state = _state(eng, i)
            assert state["weight_version"] == "3" and state["sessions"] == 2 and not state["session_open"]
            for rank in ("0", "1"):
                assert state["checksums"][rank] == {n: hashlib.sha256(t.view(torch.int16).numpy().tobytes()
                                                                     if t.dtype == torch.bfloat16 else
                                                                     t.numpy().tobytes()).hexdigest()[:16]
                                                    for n, t in tensors}
    assert not _children()


def test_attached_servers_sync_at_the_routable_address(tmp_path):
    """Servers given by url (disaggregated rollout nodes) join the weight-sync group at this machine's
    address on the route to them (loopback here), not at the engine's launch host."""
    from megatron_fipo.rollout.sglang_weights import routable_address

    assert routable_address("http://127.0.0.1:1") == "127.0.0.1" == routable_address("localhost:2")
    with pytest.raises(ValueError, match="cannot read a host"):
        routable_address("http://:3")
    tensors = [("w", torch.randn(3, 2))]
    with _engine(tmp_path, replicas=1, tp_size=2, mode="disaggregated") as owner:
        attached = SGLangEngine("tiny-model", urls=owner.urls, tp_size=2, mode="disaggregated", host="192.0.2.1",
                                group_factory=tcp_gloo_group, startup_timeout=60)
        assert attached.sync_host == "127.0.0.1"  # not the (unreachable) launch host
        attached.update_weights(iter([tensors]), version=1)
        assert _state(owner, 0)["checksums"]["1"] == {"w": _sha(tensors[0][1])}
        attached.shutdown()
    assert not _children()


def test_dead_server_is_restarted_and_resynced(tmp_path):
    tensors = [("w", torch.randn(4))]
    with _engine(tmp_path, "--die-after-requests", "3", replicas=1, max_restarts=2, max_in_flight=1,
                 resync=lambda: (iter([tensors]), 4)) as eng:
        eng.update_weights(iter([tensors]), version=4)
        out = eng.generate([GenerationRequest((1,), SamplingParams(n=4, max_new_tokens=3, seed=0))])
        assert [len(s.token_ids) for s in out[0]] == [3, 3, 3, 3] and {s.weight_version for s in out[0]} == {4}
        assert eng.servers[0].restarts == 1
        state = _state(eng, 0)
        assert state["checksums"]["0"] == {"w": _sha(tensors[0][1])} and state["weight_version"] == "4"
    assert not _children()


@pytest.mark.parametrize("resync", [False, True])
def test_dead_server_fails_cleanly(tmp_path, resync):
    kw = dict(max_restarts=0) if resync else dict(max_restarts=1)
    start = time.monotonic()
    with _engine(tmp_path, "--die-after-requests", "2", replicas=1, max_in_flight=1, **kw) as eng:
        if not resync:  # a restart would bring back the base weights: refused without a resync callback
            eng.update_weights(iter([[("w", torch.ones(2))]]), version=1)
        with pytest.raises(EngineError, match="dying as asked"):
            eng.generate([GenerationRequest((1,), SamplingParams(n=4, max_new_tokens=2))])
    assert time.monotonic() - start < 60 and not _children()


def test_error_answers_and_unhealthy_servers(tmp_path):
    with _engine(tmp_path, "--fail-endpoint", "update_weights_from_tensor") as eng:
        with pytest.raises(EngineError, match="injected failure in update_weights_from_tensor"):
            eng.update_weights(iter([[("w", torch.ones(2))]]), version=1)
        assert eng.weight_version == 0
        assert not _state(eng, 0)["session_open"]  # closed after the failure: the next sync can begin
    with pytest.raises(EngineError, match="(?s)not healthy after 3 s.*GET /health HTTP/1.1\" 503"):
        _engine(tmp_path, "--never-healthy", startup_timeout=3)
    with pytest.raises(EngineError, match="exited with code"):
        _engine(tmp_path, "--no-such-required-arg-value", "--port")
    assert not _children()
    with pytest.raises(ValueError, match="mode"):
        SGLangEngine("m", mode="both")


def test_sigterm_of_the_trainer_kills_its_servers(tmp_path):
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from megatron_fipo.rollout.sglang_engine import SGLangEngine\n"
            "e = SGLangEngine('m', launch_cmd=%r, log_dir=%r, startup_timeout=60)\n"
            "print('ready', e.servers[0].proc.pid, flush=True)\n"
            "time.sleep(600)\n" % (REPO, FAKE, str(tmp_path / "logs")))
    trainer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = trainer.stdout.readline()
        assert line.startswith("ready"), line
        server = psutil.Process(int(line.split()[1]))
        trainer.terminate()
        assert trainer.wait(timeout=30) != 0
        psutil.wait_procs([server], timeout=15)
        assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    finally:
        trainer.kill()
