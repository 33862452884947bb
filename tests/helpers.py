"""Plain builder functions shared by the tests (no fixture chains)."""

from __future__ import annotations

import contextlib
import math
import os
import random

import pytest
import torch


def fresh_seeds(n: int, base: int = 0) -> list[int]:
    """``n`` distinct seeds; a different set per test module via ``base``."""
    return [base * 1000 + i for i in range(n)]


def random_cu_seqlens(gen: torch.Generator, num_seqs: int, max_len: int, *, allow_empty: bool = True) -> torch.Tensor:
    """``[S + 1]`` int64 offsets of ``num_seqs`` random lengths in ``[0 or 1, max_len]``."""
    low = 0 if allow_empty else 1
    lengths = torch.randint(low, max_len + 1, (num_seqs,), generator=gen)
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])


def random_policy_batch(
    gen: torch.Generator,
    batch: int,
    length: int,
    *,
    dtype: torch.dtype = torch.float64,
    drift: float = 0.3,
    spike_prob: float = 0.05,
    empty_rows: int = 0,
) -> dict:
    """Random inputs for the policy loss on ``[B, T]`` padded rows.

    Log-ratios are ``N(0, drift)`` with a fraction ``spike_prob`` of tokens pushed above
    ``log(10)`` (ratios past the dual-clip threshold, which trigger the participation mask, the
    safety override and, twice in a negative sequence, the drop filter). Each row has a random
    response length (right padding); the first ``empty_rows`` rows have no response token.
    Advantages are per sequence, of both signs (and some zeros).
    """
    old = -torch.rand(batch, length, generator=gen, dtype=dtype) * 3.0
    delta = torch.randn(batch, length, generator=gen, dtype=dtype) * drift
    spikes = torch.rand(batch, length, generator=gen, dtype=dtype) < spike_prob
    delta = torch.where(spikes, math.log(10.0) + 0.1 + torch.rand(batch, length, generator=gen, dtype=dtype) * 3, delta)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[:empty_rows] = 0
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).to(dtype)
    adv = torch.randn(batch, generator=gen, dtype=dtype)
    adv[torch.rand(batch, generator=gen) < 0.1] = 0.0
    return {
        "logp": (old + delta).requires_grad_(True),
        "old_logp": old,
        "advantages": adv,
        "response_mask": mask,
    }


def installed_requirements(root: str, extras: tuple = ()) -> dict:
    """Every installed distribution ``root[extras]`` requires, transitively (``root`` itself only if something
    requires it), with markers evaluated for this interpreter: canonical name -> installed version."""
    from importlib import metadata

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = {}, [(root, extras)]
    while todo:
        name, extra = todo.pop()
        for spec in metadata.distribution(name).requires or ():
            req = Requirement(spec)
            if req.marker and not any(req.marker.evaluate({**default_environment(), "extra": e}) for e in ("",) + extra):
                continue
            key = canonicalize_name(req.name)
            if key in seen:
                continue
            seen[key] = metadata.version(req.name)
            todo.append((req.name, tuple(req.extras)))
    return seen


# ---------------------------------------------------------------------------------------------- actor tests
# The tiny Qwen2 and the batch shared by the actor tests (tests/dist/test_actor*.py, test_cp_actor.py,
# test_update_guard.py) and their GPU variants (tests/gpu/).
ACTOR_HF = dict(architectures=["Qwen2ForCausalLM"], hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, vocab_size=200, rms_norm_eps=1e-6, rope_theta=10000.0,
                max_position_embeddings=256, tie_word_embeddings=False, hidden_act="silu")
ACTOR_SETTINGS = dict(lr=1e-3, warmup_steps=0, weight_decay=0.01, clip_grad=1.0, adam_eps=1e-4, track_update_norm=True)
ACTOR_LOSS = dict(decay_rate=8.0)
BF16_SETTINGS = {"params_dtype": "bfloat16"}  # extra ActorSettings of the GPU tests


def actor_samples(seed: int = 0, n: int = 8) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` random (prompt, response) token-id lists for ``ACTOR_HF`` (prompts 1-6, responses 1-14 tokens)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(200) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    responses = [[rng.randrange(200) for _ in range(rng.randint(1, 14))] for _ in range(n)]
    return prompts, responses


def actor_long_tailed(seed: int = 5):
    """An ``experience.Experience`` of 3 groups x 4 samples for ``ACTOR_HF``, response lengths long-tailed.

    Responses are 1-14 tokens except samples 1 and 5 (150 and 200 tokens): round-robin over two
    data-parallel ranks gives both to rank 1, the balanced split one to each, with unequal sample
    counts. Advantages and rollout log-probs are placeholders (set them from the actor's log-probs).
    """
    from megatron_fipo.train.experience import Experience

    rng = random.Random(seed)
    lengths = [5, 150, 9, 3, 12, 200, 7, 2, 14, 6, 1, 11]
    prompts = [[rng.randrange(200) for _ in range(rng.randint(1, 6))] for _ in lengths]
    responses = [[rng.randrange(200) for _ in range(n)] for n in lengths]
    return Experience(prompts=prompts, responses=responses, rollout_logp=[torch.zeros(n) for n in lengths],
                      advantages=torch.zeros(len(lengths)), n=4)


def actor_per_sample(responses, logp, seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Old log-probs per token (``logp`` + N(0, 0.3) noise) and one random advantage per response."""
    gen = torch.Generator().manual_seed(seed)
    old = [lp + 0.3 * torch.randn(len(lp), generator=gen) for lp in logp]
    adv = torch.tensor([float(torch.randn((), generator=gen)) for _ in responses])
    return old, adv


def actor_prepare(actor, prompts, responses, per_sample, mine):
    """The samples ``mine`` as one mini-batch, packed by ``actor`` with the given old log-probs."""
    from megatron_fipo.data.batches import MiniBatch

    old, adv = per_sample
    mb = MiniBatch([prompts[i] for i in mine], [responses[i] for i in mine], adv[mine], [old[i] for i in mine])
    return actor.prepare(mb, old_logp=[old[i] for i in mine])


def enough_gpus(n: int) -> bool:
    """True when CUDA is available with at least ``n`` devices."""
    return torch.cuda.is_available() and torch.cuda.device_count() >= n


def check_bf16_layouts(results, ref, layouts) -> None:
    """Every rank's log-probs, losses and grad norms of each layout against the one-GPU run, at bf16 tolerances."""
    for rank_results in results:
        for layout, got in zip(layouts, rank_results):
            for a, b in zip(got["logp"], ref["logp"]):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=5e-2, msg=str(layout))
            for s, r in zip(got["steps"], ref["steps"]):
                assert s["loss"] == pytest.approx(r["loss"], rel=5e-2, abs=1e-2), layout
                assert s["grad_norm"] == pytest.approx(r["grad_norm"], rel=5e-2), layout


def alive_processes(procs: list) -> list:
    """The ``psutil.Process`` objects of ``procs`` still running (zombies, reaped or not, count as gone)."""
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def reused_buffer_buckets(named, buffer_elems: int, fill: float = float("nan")):
    """``[(name, tensor)]`` as buckets of views into one buffer of ``buffer_elems`` elements, as the weight
    bridge streams them: the buffer is overwritten with ``fill`` when the consumer asks for the next bucket,
    so a consumer that kept a view instead of copying it sees ``fill``."""
    named = list(named)
    biggest = max(t.numel() for _, t in named)
    if biggest > buffer_elems:
        raise ValueError(f"a tensor of {biggest} elements does not fit a buffer of {buffer_elems}")
    buffer = torch.empty(buffer_elems, dtype=named[0][1].dtype)
    bucket, used = [], 0
    for name, tensor in named:
        if bucket and used + tensor.numel() > buffer_elems:
            yield bucket
            buffer.fill_(fill)
            bucket, used = [], 0
        view = buffer[used:used + tensor.numel()].view(tensor.shape)
        view.copy_(tensor)
        bucket.append((name, view))
        used += tensor.numel()
    yield bucket


# ---------------------------------------------------------------------------------------------- end-to-end runs
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "examples", "demo_cpu.yaml")
SMALL_RUN = ["rollout.n=4", "train.prompts_per_step=8", "train.mini_batch_prompts=4", "eval.n=2",
             "eval.max_problems=16", "eval.every_steps=0", "eval.at_start=false", "log.progress=false",
             "log.tensorboard=false", "train.reward_workers=1", "checkpoint.every_steps=0"]
"""Overrides that shrink the demo to a few seconds per step (the e2e tests' runs)."""


def demo_overrides(demo, run_dir, *extra) -> list:
    """The demo config's paths pointed at a built demo (``tests/e2e/conftest.py``) and a run directory."""
    return [f"model.hf_path={demo}/base", f"data.train_files=[{demo}/train.jsonl]", f"eval.files=[{demo}/test.jsonl]",
            f"train.run_dir={run_dir}", *extra]


def train_in_process(config_path, overrides):
    """``trainer.train`` of the config (a ``tests/dist/launcher.launch`` worker)."""
    from megatron_fipo.config.schema import load_config
    from megatron_fipo.train.loop import train

    return train(load_config(config_path, overrides))


def read_records(run_dir) -> list:
    """The run's ``metrics.jsonl`` records."""
    from megatron_fipo.train.tracking import read_metrics

    return read_metrics(run_dir)


def communicate_all(procs: list, timeout: float) -> list:
    """Every process's output (each started in its own session); the groups of any still running when
    this returns or raises are SIGKILLed, so nothing is left behind."""
    import signal

    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def train_on_nodes(overrides, *, nproc_per_node: int, nnodes: int = 2, timeout: float = 900) -> list:
    """``torchrun --nnodes N --node-rank k --nproc-per-node P`` of the demo config for every k on this
    host (simulated nodes, one free port); requires every node to exit 0; returns their outputs."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
                               "--node-rank", str(k), "--nproc-per-node", str(nproc_per_node),
                               "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "megatron_fipo", "train", "--config", DEMO_CONFIG, *overrides],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
             for k in range(nnodes)]
    outs = communicate_all(procs, timeout)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


@contextlib.contextmanager
def trainer_after_first_checkpoint(cmd, run_dir, log, timeout: float = 600):
    """Starts ``cmd`` (a trainer; its own session, output to the file ``log``) and yields ``(proc, seen,
    tools)`` once ``run_dir``'s first checkpoint is complete: ``seen`` holds every descendant read from
    /proc until then (pid -> command line; update it with ``tools.descendants``), ``tools`` is
    ``tools/kill_stress.py``. On exit the trainer and every process seen are killed."""
    import importlib.util
    import subprocess
    import time

    spec = importlib.util.spec_from_file_location("kill_stress", os.path.join(REPO, "tools", "kill_stress.py"))
    tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tools)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen = {}
    try:
        marker = os.path.join(run_dir, "checkpoints", "iter_0000001", "fipo_checkpoint.json")
        deadline = time.time() + timeout
        while not os.path.exists(marker):
            assert proc.poll() is None and time.time() < deadline, open(log).read()[-3000:]
            seen.update(tools.descendants(proc.pid))
            time.sleep(0.2)
        seen.update(tools.descendants(proc.pid))
        yield proc, seen, tools
    finally:
        if proc.poll() is None:
            proc.kill()
        tools.kill_all(seen)
        proc.wait()
