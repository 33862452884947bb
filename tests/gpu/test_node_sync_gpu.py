"""The node-local weight sync on GPUs: NCCL, and CUDA-IPC handles per SGLang TP rank (skipped without CUDA).

The CPU tests (tests/dist/test_node_sync.py, tests/e2e/test_sglang_path.py) drive the same code
with gloo and shared memory. What only GPUs can show: with NCCL the node-local export gives every
rank the exact HF state on its own GPU, and the payload each rank serializes for the server TP
rank on its GPU holds CUDA-IPC handles that another process opens on that same device (rank r's
tensors on ``cuda:r``), so no SGLang TP rank reads another GPU's memory. Then the whole path
against a real SGLang server with tp_size 2, colocated on one node of two ranks: after the sync
the server's log-probs equal the actor's.
"""
import pytest
import torch

from tests.dist.launcher import launch
from tests.helpers import enough_gpus
from tests.hf_tiny import tiny_hf_model

OPEN = """
import sys, json, torch
from megatron_fipo.rollout.sglang_weights import deserialize_named_tensors
named = deserialize_named_tensors(sys.stdin.read())
print(json.dumps(sorted({t.device.index for _, t in named})))
"""


def _export_and_serialize(hf_dir):
    import glob
    import json
    import subprocess
    import sys

    import torch.distributed as dist
    from safetensors.torch import load_file

    from megatron_fipo.bridge.hf_export import export_hf_node_local
    from megatron_fipo.bridge.hf_import import load_hf_into_chunks
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor, ActorSettings
    from megatron_fipo.mcore.model import Qwen2Arch
    from megatron_fipo.parallel.nodes import NodeGroups
    from megatron_fipo.rollout.sglang_weights import serialize_named_tensors

    groups = G.init_distributed(tp=1, pp=2, seed=1)
    nodes = NodeGroups(groups, node=0)
    arch = Qwen2Arch.from_hf(hf_dir)
    actor = Actor(arch, groups, ActorSettings(max_tokens_per_micro_batch=64))
    offsets, spec = actor.bridge_layout()
    load_hf_into_chunks(hf_dir, actor.named_local_parameters(), arch, tp_rank=0, tp_size=1,
                        padded_vocab=actor.padded_vocab, layer_offsets=offsets, spec=spec)
    reference = {}
    for f in glob.glob(f"{hf_dir}/*.safetensors"):
        reference.update(load_file(f))
    got, devices = {}, set()
    for bucket in export_hf_node_local(actor.named_local_parameters(), arch, groups=groups, nodes=nodes,
                                       layer_offsets=offsets, dtype=torch.float32, bucket_bytes=1 << 20, spec=spec):
        payload = serialize_named_tensors(bucket)  # CUDA-IPC handles of this rank's GPU
        opened = subprocess.run([sys.executable, "-c", OPEN], input=payload, capture_output=True, text=True,
                                check=True)
        devices |= set(json.loads(opened.stdout))
        got.update({n: t.cpu() for n, t in bucket})
    exact = sorted(got) == sorted(reference) and all(torch.equal(got[k], reference[k]) for k in reference)
    rank, own = dist.get_rank(), torch.cuda.current_device()
    G.destroy()
    return dict(rank=rank, exact=exact, devices=sorted(devices), own=own)


@pytest.mark.gpu
@pytest.mark.timeout(900)
@pytest.mark.skipif(not enough_gpus(2), reason="needs 2 GPUs")
def test_node_local_export_with_nccl_and_ipc_handles_on_each_ranks_gpu(tmp_path):
    hf_dir = tiny_hf_model(str(tmp_path / "hf"), seed=4, num_hidden_layers=4)
    results = launch(_export_and_serialize, 2, hf_dir, timeout=600)
    for r in results:
        assert r["exact"], r
        assert r["devices"] == [r["own"]], r  # the handles open on the rank's own GPU


@pytest.mark.gpu
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not enough_gpus(2), reason="needs 2 GPUs")
def test_colocated_node_local_sync_into_real_sglang(tmp_path):
    """The demo config on one node of two ranks (pp=2), SGLang tp_size 2 colocated: step-1 mismatch ~ 1."""
    _demo_on_two_gpus_in_sync(tmp_path, "rollout.sglang={tp_size: 2, mem_fraction_static: 0.3, "
                              "enable_memory_saver: true, enable_weights_cpu_backup: true, dtype: float32}")


@pytest.mark.gpu
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not enough_gpus(2), reason="needs 2 GPUs")
def test_disaggregated_sync_by_stage_over_nccl_into_real_sglang(tmp_path):
    """pp=2 trainers and two real SGLang servers (GPUs 0-1, sharing them): each stage sends its own layers over
    its own NCCL weight-update group; after every sync the servers sample the trainer's weights."""
    _demo_on_two_gpus_in_sync(tmp_path, "rollout.mode=disaggregated", "rollout.replicas=2",
                              "rollout.sglang={tp_size: 1, mem_fraction_static: 0.3, dtype: float32}")


def _demo_on_two_gpus_in_sync(tmp_path, *rollout):
    """The demo at pp=2 on two ranks for 2 steps with real SGLang: the servers sample the trainer's weights."""
    for record in _demo_on_two_gpus(tmp_path, "train.steps=2", *rollout):
        assert record["rollout/token_mult_prob_error"] == pytest.approx(1.0, abs=1e-3)


def _demo_on_two_gpus(tmp_path, *overrides) -> list:
    """The demo at pp=2 on two ranks with real SGLang (SMALL_RUN sizes); its metrics records."""
    pytest.importorskip("sglang")
    from megatron_fipo.data.demo_task import build_demo
    from tests.helpers import DEMO_CONFIG, SMALL_RUN, demo_overrides, read_records, train_in_process

    demo = str(tmp_path / "demo")
    build_demo(demo)
    run = str(tmp_path / "run")
    launch(train_in_process, 2, DEMO_CONFIG, demo_overrides(
        demo, run, *SMALL_RUN, "parallel.pp=2", "checkpoint.export_hf=false", "rollout.engine=sglang", *overrides),
        timeout=1500)
    return read_records(run)


@pytest.mark.gpu
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not enough_gpus(2), reason="needs 2 GPUs")
def test_generation_ahead_with_real_sglang_disaggregated(tmp_path):
    """rollout.max_staleness=1 against two real SGLang servers: step s trains on the samples of the weights of
    step s - 2 (ages 0, 1, 1), step 1's samples come from the trainer's own weights, the default correction
    (token TIS) is on, and the run completes with every sync after the batch it may not overtake."""
    records = [r for r in _demo_on_two_gpus(
        tmp_path, "train.steps=3", "rollout.mode=disaggregated", "rollout.replicas=2", "rollout.max_staleness=1",
        "eval.every_steps=0", "rollout.sglang={tp_size: 1, mem_fraction_static: 0.3, dtype: float32}")
        if "train/loss" in r]
    assert [r["rollout/staleness_max"] for r in records] == [0.0, 1.0, 1.0]
    assert records[0]["rollout/token_mult_prob_error"] == pytest.approx(1.0, abs=1e-3)
    assert all("train/correction_weight_mean" in r for r in records)
