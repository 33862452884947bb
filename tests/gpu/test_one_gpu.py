"""What one GPU can check (skipped without CUDA): bf16 actor steps, CUDA-IPC weight handles, the Future-KL scan.

``tools/gpu_check.sh`` runs these on a node with one GPU and a stock PyTorch image (no Transformer
Engine, apex or SGLang needed); the multi-GPU tests beside them skip there with their reason.
``ipc_roundtrip`` is also the check's ``ipc_handles`` step (on a CPU machine with shared memory).
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.dist import test_actor as A

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPEN = """
import hashlib, json, sys, torch
from megatron_fipo.rollout.sglang_weights import deserialize_named_tensors
named = deserialize_named_tensors(sys.stdin.read())
print(json.dumps({n: [str(t.device), str(t.dtype), list(t.shape),
                      hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()]
                  for n, t in named}))
"""


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def ipc_roundtrip(device: str, seed: int = 0) -> dict:
    """A bucket of weights (several dtypes and shapes, a one-element and an odd-sized tensor among them) made
    here on ``device``, serialized as the weight sync sends it to a server (CUDA-IPC handles on a GPU, shared
    memory on a CPU), opened by another process: every tensor's bytes, dtype, shape and device must agree."""
    from megatron_fipo.rollout.sglang_weights import bucket_payload

    g = torch.Generator().manual_seed(seed)
    bucket = [("model.embed_tokens.weight", torch.randn(1000, 64, generator=g).to(torch.bfloat16)),
              ("model.layers.0.self_attn.q_proj.bias", torch.randn(64, generator=g)),
              ("model.layers.0.mlp.up_proj.weight", torch.randn(129, 63, generator=g).to(torch.bfloat16)),
              ("model.norm.weight", torch.randn(1, generator=g)),
              ("lm_head.weight", torch.randn(1000, 64, generator=g).half())]
    bucket = [(n, t.to(device)) for n, t in bucket]
    payload, keep = bucket_payload(bucket)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    opened = subprocess.run([sys.executable, "-c", OPEN], input=payload, capture_output=True, text=True,
                            env=env, timeout=120)
    del keep  # alive until the other process has read the tensors
    if opened.returncode != 0:
        raise RuntimeError(f"the receiving process failed: {opened.stderr[-2000:]}")
    got = json.loads(opened.stdout.strip().splitlines()[-1])
    mismatched = [n for n, t in bucket
                  if got.get(n) != [str(t.device), str(t.dtype), list(t.shape), _digest(t)]]
    return dict(device=device, tensors=len(bucket), bytes=sum(t.numel() * t.element_size() for _, t in bucket),
                payload_chars=len(payload), bit_exact=not mismatched and sorted(got) == sorted(n for n, _ in bucket),
                mismatched=mismatched)


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_cuda_ipc_handles_open_bit_exact_in_another_process():
    result = ipc_roundtrip(f"cuda:{torch.cuda.current_device()}")
    assert result["bit_exact"], result


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_future_kl_scan_on_gpu_matches_float64():
    """The O(T) scan on the GPU, fp32, against the float64 recurrence; awkward lengths and packed rows included."""
    from megatron_fipo.algo.future_kl import discounted_suffix_sum

    gamma = 2 ** (-1 / 32)
    for seed, (rows, t) in enumerate([(1, 1), (3, 33), (4, 257), (2, 20480), (64, 4097)]):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(rows, t, generator=g, dtype=torch.float64)
        ref = torch.zeros_like(x)
        acc = torch.zeros(rows, dtype=torch.float64)
        for i in range(t - 1, -1, -1):
            acc = x[:, i] + gamma * acc
            ref[:, i] = acc
        got = discounted_suffix_sum(x.float().cuda(), gamma).double().cpu()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    cu = torch.tensor([0, 1, 1, 300, 5000])
    x = torch.randn(5000, generator=torch.Generator().manual_seed(9))
    packed = discounted_suffix_sum(x.cuda(), gamma, cu_seqlens=cu.cuda()).cpu()
    rows = [discounted_suffix_sum(x[a:b][None], gamma)[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()) if b > a]
    torch.testing.assert_close(packed, torch.cat(rows), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_actor_bf16_on_one_gpu_follows_fp32():
    """Two FIPO steps of the tiny actor (local spec unless Transformer Engine is installed) in bf16 against the
    same in fp32 on the same GPU, from the same initial weights."""
    A.check_bf16_follows_fp32()
