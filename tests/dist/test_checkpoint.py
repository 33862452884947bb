"""megatron_fipo.mcore.checkpoint: resharding resume, crash safety, pruning (gloo, world 2).

One launch of 2 processes runs every distributed case in sequence (imports cost ~6 s per
launch, a save ~1-2 s), on a tiny Qwen2 (hidden 64, 4 heads, 2 kv heads, 4 layers, vocab 100
padded to 1024) trained with AdamW + warm-up scheduler through ``get_forward_backward_func``:

* plain optimizer, untied: 4 uninterrupted steps at (tp=2, pp=1) are the reference; after step
  2 a checkpoint is saved, at step 3 a save fails on rank 0 after every rank wrote its shards
  (a crash mid-save), then the step-2 checkpoint is reloaded in the same layout (RNG restored)
  and resumed at (tp=1, pp=2) with 2 virtual stages for steps 3-4 (parameters must match the reference; Adam's
  ``step`` must be per parameter); the resumed run saves step 4 with ``keep_last=1``.
* distributed optimizer, tied embeddings: saved at (tp=1, pp=1, dp=2) before any step (must
  work) and after 2 steps, resumed at (tp=1, pp=2, dp=1) for steps 3-4, against 4
  uninterrupted steps.
* damaged latest checkpoint (tp=2): steps 1-3 saved; ``load_latest_checkpoint`` falls back to
  step 2 when step 3 is truncated (integrity record), when an older-format step 3 (no record)
  lost its ``common.pt`` (the load fails), and when its load fails on rank 1 only; fails naming
  every checkpoint when none loads; a re-save of step 3 replaces the damaged one.

Each rank returns plain numbers; the assertions run in the pytest process.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.dist.launcher import launch

HF = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
      "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
      "intermediate_size": 128, "num_hidden_layers": 4, "vocab_size": 100,
      "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 64,
      "tie_word_embeddings": False}
LR, TOL = 1e-2, 1e-6


# ------------------------------------------------------------------------------ builders
def _trainer(groups, *, tied=False, distributed=False, seed=0):
    """DDP-wrapped tiny Qwen2 chunks, AdamW (``get_megatron_optimizer``) and a warm-up scheduler."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_fipo.mcore import model as qwen2

    arch = qwen2.Qwen2Arch.from_hf({**HF, "tie_word_embeddings": tied})
    config = qwen2.transformer_config(arch, tp=groups.tp_size, pp=groups.pp_size,
                                      vpp=groups.vpp_size)
    config.finalize_model_grads_func = finalize_model_grads
    torch.manual_seed(seed)
    chunks = qwen2.build_model_chunks(config, arch, groups, use_te=False)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=distributed)
    ddp = [DistributedDataParallel(config, ddp_config, c) for c in chunks]
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=LR, min_lr=LR, weight_decay=0.01, clip_grad=1.0, adam_eps=1e-4,
        bf16=False, fp16=False, use_distributed_optimizer=distributed), ddp)
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=LR, min_lr=LR, lr_warmup_steps=3, lr_decay_steps=4,
        lr_decay_style="constant", start_wd=0.01, end_wd=0.01, wd_incr_steps=1,
        wd_incr_style="constant")
    return ddp, opt, sched


def _train(ddp, opt, sched, step):
    """Optimizer step number ``step`` (1-based) on next-token batches that depend on it only."""
    from tests.dist import tiny_gpt as T

    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, HF["vocab_size"], (4, 2, 17), generator=gen)
    batches = [{"tokens": t[:, :-1], "labels": t[:, 1:]} for t in tokens]
    for chunk in ddp:
        chunk.zero_grad_buffer()
    opt.zero_grad()
    T.run_schedule(ddp, batches)
    ok, _, _ = opt.step()
    assert ok
    sched.step(1)


def _full_params(ddp, groups):
    """Every parameter as a full tensor keyed by its (tp=1, pp=1) name, on every rank."""
    import torch.distributed as dist

    from tests.dist import tiny_gpt as T

    local = {}
    for chunk in ddp:
        model = chunk.module
        for name, param in model.named_parameters():
            t = param.detach().contiguous()
            if groups.tp_size > 1 and getattr(param, "tensor_model_parallel", False):
                parts = [torch.empty_like(t) for _ in range(groups.tp_size)]
                dist.all_gather(parts, t, group=groups.tp)
                if name.endswith("mlp.linear_fc1.weight"):  # [gate; up] per rank
                    halves = [p.chunk(2, 0) for p in parts]
                    parts = [h[0] for h in halves] + [h[1] for h in halves]
                t = torch.cat(parts, param.partition_dim)
            local[T._global_name(model, name)] = t.clone()
    everyone = [None] * groups.world_size
    dist.all_gather_object(everyone, local)
    return {k: v for d in everyone for k, v in d.items()}


def _max_diff(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _adam_steps(opt):
    """(sorted distinct step values, number of states, number of distinct step tensors)."""
    states = [s for o in opt.chained_optimizers for s in o.optimizer.state.values()]
    return (sorted({float(s["step"]) for s in states}), len(states),
            len({id(s["step"]) for s in states}))


def _rng_draws():
    import random

    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(2).tolist()
    return [random.random(), *torch.rand(2).tolist(), *tracked]


def _listing(root):
    return sorted(os.listdir(root))


# ------------------------------------------------------------------------------ cases
def _plain_cases(root):
    """Plain optimizer: save / crash / same-layout reload at (2, 1), resume at (1, 2) x vpp 2."""
    import warnings

    import torch.distributed as dist

    from megatron_fipo.mcore import checkpoint as C
    from megatron_fipo.mcore import groups as G

    out = {}
    g = G.init_distributed(tp=2, pp=1, seed=11)
    ddp, opt, sched = _trainer(g, seed=1)
    for step in (1, 2):
        _train(ddp, opt, sched, step)
    out["saved_path"] = C.save_checkpoint(root, 2, ddp, opt, sched, g, extra={"consumed": 2})
    snapshot = [p.detach().clone() for c in ddp for p in c.parameters()]
    out["draws_after_save"] = _rng_draws()
    _train(ddp, opt, sched, 3)
    publish = C._publish
    if g.rank == 0:  # rank 0 dies after every rank wrote its shards
        C._publish = lambda *a, **k: (_ for _ in ()).throw(OSError("simulated crash"))
    try:
        C.save_checkpoint(root, 3, ddp, opt, sched, g)
        out["crash_error"] = None
    except RuntimeError as err:
        out["crash_error"] = str(err)
    C._publish = publish
    with open(os.path.join(root, "latest")) as fh:
        out["after_crash"] = (_listing(root), fh.read().strip(), C.latest_checkpoint(root))
    _train(ddp, opt, sched, 4)
    reference = _full_params(ddp, g)
    out["lr_after_4"] = opt.param_groups[0]["lr"]
    # Same layout: model, optimizer, scheduler and RNG come back exactly.
    out["same_layout_load"] = C.load_checkpoint(out["saved_path"], ddp, opt, sched, g)
    out["same_layout_diff"] = max(float((p.detach() - s).abs().max())
                                  for p, s in zip((p for c in ddp for p in c.parameters()), snapshot))
    out["draws_after_load"] = _rng_draws()
    out["lr_after_load"] = opt.param_groups[0]["lr"]
    G.destroy(process_group=False)

    g = G.init_distributed(tp=1, pp=2, vpp=2, seed=11)
    if g.rank == 0:  # debris: an iter dir without marker, and a stale `latest`
        os.makedirs(os.path.join(root, "iter_0000009"))
        open(os.path.join(root, "iter_0000009", "common.pt"), "wb").close()
        with open(os.path.join(root, "latest"), "w") as fh:
            fh.write("iter_0000009\n")
    dist.barrier()
    path = C.latest_checkpoint(root)
    ddp, opt, sched = _trainer(g, seed=2)  # different initial weights
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["resumed"] = (path, *C.load_checkpoint(path, ddp, opt, sched, g))
    out["warnings"] = [str(w.message) for w in caught if "RNG" in str(w.message)]
    out["steps_after_load"] = _adam_steps(opt)
    for step in (3, 4):
        _train(ddp, opt, sched, step)
    out["resume_diff"] = _max_diff(_full_params(ddp, g), reference)
    out["lr_resumed_4"] = opt.param_groups[0]["lr"]
    out["steps_after_resume"] = _adam_steps(opt)
    C.save_checkpoint(root, 4, ddp, opt, sched, g, extra={"consumed": 4}, keep_last=1)
    out["after_prune"] = (_listing(root), C.latest_checkpoint(root))
    G.destroy(process_group=False)
    return out


def _distributed_cases(root):
    """Distributed optimizer + tied embeddings: save at (1, 1) x dp 2, resume at (1, 2)."""
    from megatron_fipo.mcore import checkpoint as C
    from megatron_fipo.mcore import groups as G

    out = {}
    g = G.init_distributed(tp=1, pp=1, seed=11)
    ddp, opt, sched = _trainer(g, tied=True, distributed=True, seed=1)
    out["meta0"] = C.read_checkpoint_meta(C.save_checkpoint(root, 0, ddp, opt, sched, g))
    for step in (1, 2):
        _train(ddp, opt, sched, step)
    path = C.save_checkpoint(root, 2, ddp, opt, sched, g)
    out["meta"] = C.read_checkpoint_meta(path)
    for step in (3, 4):
        _train(ddp, opt, sched, step)
    reference = _full_params(ddp, g)
    G.destroy(process_group=False)

    g = G.init_distributed(tp=1, pp=2, seed=11)
    ddp, opt, sched = _trainer(g, tied=True, distributed=True, seed=2)
    out["resumed"] = C.load_checkpoint(path, ddp, opt, sched, g)
    out["steps_after_load"] = _adam_steps(opt)
    for step in (3, 4):
        _train(ddp, opt, sched, step)
    out["resume_diff"] = _max_diff(_full_params(ddp, g), reference)
    out["steps_after_resume"] = _adam_steps(opt)
    G.destroy(process_group=False)
    return out


def _state(ddp, opt, g):
    return _full_params(ddp, g), opt.param_groups[0]["lr"]


def _load_latest(C, root, ddp, opt, sched, g, reference):
    """(name, step, extra, max |params - reference|, lr, rng draws, warnings) of ``load_latest_checkpoint``."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, step, extra = C.load_latest_checkpoint(root, ddp, opt, sched, g)
    params, lr = _state(ddp, opt, g)
    return (os.path.basename(path), step, extra, _max_diff(params, reference), lr, _rng_draws(),
            [str(w.message) for w in caught if "skipped" in str(w.message)])


def _on_rank0(g, fn):
    import torch.distributed as dist

    if g.rank == 0:
        fn()
    dist.barrier()


def _fallback_cases(root):
    """Damaged step 3: every way of failing falls back to step 2 on both ranks, or fails by name."""
    import json
    import shutil

    from megatron_fipo.mcore import checkpoint as C
    from megatron_fipo.mcore import groups as G

    out, saved = {}, {}
    g = G.init_distributed(tp=2, pp=1, seed=11)
    ddp, opt, sched = _trainer(g, seed=1)
    for step in (1, 2, 3):
        _train(ddp, opt, sched, step)
        C.save_checkpoint(root, step, ddp, opt, sched, g, extra={"consumed": step})
        saved[step] = (*_state(ddp, opt, g), _rng_draws())
    out["saved"] = {k: (v[1], v[2]) for k, v in saved.items()}
    out["saved_diff"] = {k: _max_diff(v[0], saved[2][0]) for k, v in saved.items()}
    it3 = os.path.join(root, "iter_0000003")
    shard, marker = os.path.join(it3, "__0_0.distcp"), os.path.join(it3, C.MARKER)
    backup = os.path.join(root, "backup")
    _on_rank0(g, lambda: shutil.copytree(it3, backup))

    def restore():
        shutil.rmtree(it3)
        shutil.copytree(backup, it3)

    def truncate():
        with open(shard, "r+b") as fh:
            fh.truncate(os.path.getsize(shard) // 2)

    def old_format_without_common():
        with open(marker) as fh:
            meta = json.load(fh)
        del meta["files"]
        with open(marker, "w") as fh:
            json.dump(meta, fh)
        os.remove(os.path.join(it3, "common.pt"))

    ddp, opt, sched = _trainer(g, seed=2)
    _on_rank0(g, truncate)
    out["truncated"] = _load_latest(C, root, ddp, opt, sched, g, saved[2][0])
    _on_rank0(g, restore)
    _on_rank0(g, old_format_without_common)
    out["no_common"] = _load_latest(C, root, ddp, opt, sched, g, saved[2][0])
    _on_rank0(g, restore)
    set_rng = C.set_rng_state
    calls = []

    def fail_once(state):  # step 3 fails at the very end of its load, on rank 1 only
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated read error")
        set_rng(state)

    if g.rank == 1:
        C.set_rng_state = fail_once
    out["one_rank"] = _load_latest(C, root, ddp, opt, sched, g, saved[2][0])
    C.set_rng_state = lambda state: (_ for _ in ()).throw(RuntimeError("simulated read error"))
    try:
        C.load_latest_checkpoint(root, ddp, opt, sched, g)
        out["none_loads"] = None
    except ValueError as err:
        out["none_loads"] = str(err)
    C.set_rng_state = set_rng
    # Truncated step 3 again: resume from 2, train and re-save step 3 with keep_last=2.
    _on_rank0(g, truncate)
    out["before_resave"] = _load_latest(C, root, ddp, opt, sched, g, saved[2][0])[:2]
    _train(ddp, opt, sched, 3)
    C.save_checkpoint(root, 3, ddp, opt, sched, g, extra={"consumed": 3}, keep_last=2)
    out["after_resave"] = (_listing(root), C.checkpoint_problem(it3), _max_diff(_full_params(ddp, g), saved[3][0]))
    out["resumed_after_resave"] = _load_latest(C, root, ddp, opt, sched, g, saved[2][0])[:3]
    G.destroy()
    return out


def _all_cases(root):
    return {"plain": _plain_cases(os.path.join(root, "plain")),
            "distributed": _distributed_cases(os.path.join(root, "distributed")),
            "fallback": _fallback_cases(os.path.join(root, "fallback"))}


# ------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return launch(_all_cases, 2, str(root), timeout=150, env={"PYTHONWARNINGS": "ignore"})


@pytest.mark.timeout(180)
def test_resume_at_other_tp_pp_matches_uninterrupted_run(results):
    for r in results:
        p = r["plain"]
        assert p["resumed"][1:] == (2, {"consumed": 2})
        assert p["resume_diff"] < TOL, p["resume_diff"]
        assert p["lr_resumed_4"] == pytest.approx(p["lr_after_4"], abs=0)
        d = r["distributed"]
        assert d["meta"]["optimizer"] == "distributed" and d["meta"]["layout"]["dp"] == 2
        assert d["meta0"]["adam_step"] == 0.0  # a never-stepped distributed optimizer saves
        assert d["resumed"] == (2, {})
        assert d["resume_diff"] < TOL, d["resume_diff"]


@pytest.mark.timeout(180)
def test_adam_step_is_restored_per_parameter(results):
    for r in results:
        for case in ("plain", "distributed"):
            for key, step in (("steps_after_load", 2.0), ("steps_after_resume", 4.0)):
                values, n_states, n_tensors = r[case][key]
                assert values == [step], (case, key, values)
                assert n_tensors == n_states > 1, (case, key)


@pytest.mark.timeout(180)
def test_same_layout_load_restores_weights_scheduler_and_rng(results):
    for rank, r in enumerate(results):
        p = r["plain"]
        assert p["same_layout_load"] == (2, {"consumed": 2})
        assert p["same_layout_diff"] == 0.0
        assert p["draws_after_load"] == p["draws_after_save"]
        assert p["lr_after_load"] < p["lr_after_4"]  # warm-up position went back to step 2
        # Another layout: RNG states are skipped, with one warning on rank 0.
        assert len(p["warnings"]) == (1 if rank == 0 else 0), p["warnings"]


@pytest.mark.timeout(180)
def test_crash_mid_save_leaves_previous_checkpoint_latest(results):
    for r in results:
        p = r["plain"]
        assert "simulated crash" in p["crash_error"]
        listing, latest, found = p["after_crash"]
        assert latest == "iter_0000002" and found == p["saved_path"]
        assert "iter_0000003" not in listing
        assert any(n.startswith("iter_0000003.tmp-") for n in listing), listing
        # Later `latest` was pointed at a marker-less iter_0000009: the scan found step 2.
        assert p["resumed"][0] == p["saved_path"]


@pytest.mark.timeout(180)
def test_keep_last_prunes_older_and_stale_dirs(results):
    listing, found = results[0]["plain"]["after_prune"]
    assert listing == ["iter_0000004", "iter_0000009", "latest"], listing
    assert found.endswith("iter_0000004")


def _fell_back_to_step2(result, saved, reason):
    name, step, extra, params_diff, lr, draws, warned = result
    assert (name, step, extra) == ("iter_0000002", 2, {"consumed": 2})
    assert params_diff == 0.0 and lr == saved[2][0] and draws == saved[2][1]
    return warned


@pytest.mark.timeout(180)
def test_damaged_latest_checkpoint_falls_back_on_every_rank(results):
    for rank, r in enumerate(results):
        f = r["fallback"]
        assert f["saved_diff"][3] > 0  # step 3 differs from step 2: a fallback is visible
        warned = _fell_back_to_step2(f["truncated"], f["saved"], "truncated")
        if rank == 0:
            assert len(warned) == 1 and "iter_0000003" in warned[0] and "__0_0.distcp" in warned[0], warned
            assert "truncated" in warned[0], warned
        warned = _fell_back_to_step2(f["no_common"], f["saved"], "no common.pt")
        assert len(warned) == (rank == 0) and all("load failed" in w for w in warned), warned
        warned = _fell_back_to_step2(f["one_rank"], f["saved"], "rank 1 only")
        assert len(warned) == (rank == 0) and all("rank 1" in w and "simulated read error" in w for w in warned)
        message = f["none_loads"]
        assert message and all(f"iter_000000{i} (" in message for i in (1, 2, 3)), message
        assert "Nothing was deleted" in message


@pytest.mark.timeout(180)
def test_resave_after_fallback_replaces_the_damaged_checkpoint(results):
    for r in results:
        f = r["fallback"]
        assert f["before_resave"] == ("iter_0000002", 2)
        listing, problem, diff = f["after_resave"]
        assert listing == ["backup", "iter_0000002", "iter_0000003", "latest"], listing
        assert problem is None and diff == 0.0
        assert f["resumed_after_resave"] == ("iter_0000003", 3, {"consumed": 3})


# ------------------------------------------------------------------------------ file system only
def _fake_checkpoint(root, step, files):
    """A published checkpoint dir of ``files`` ({name: bytes}) with its integrity record."""
    from megatron_fipo.mcore import checkpoint as C

    tmp = os.path.join(root, f"iter_{step:07d}.tmp-t{step}")
    os.makedirs(tmp)
    for name, data in files.items():
        with open(os.path.join(tmp, name), "wb") as fh:
            fh.write(data)
    return tmp, {"step": step, "files": C.integrity_record(tmp)}


@pytest.mark.timeout(30)
def test_integrity_record_catches_missing_truncated_and_changed_files(tmp_path):
    from megatron_fipo.mcore import checkpoint_integrity as I

    (tmp_path / "common.pt").write_bytes(b"x" * 100)
    (tmp_path / "big.distcp").write_bytes(b"y" * (I.CHECKSUM_MAX_BYTES + 1))
    record = I.integrity_record(str(tmp_path))
    assert record["big.distcp"] == [I.CHECKSUM_MAX_BYTES + 1, None]  # large: size only
    assert I.check_integrity(str(tmp_path), record) is None
    assert I.check_integrity(str(tmp_path), None) is None  # saved before records existed
    (tmp_path / "common.pt").write_bytes(b"z" * 100)
    assert "common.pt has other content" in I.check_integrity(str(tmp_path), record)
    (tmp_path / "common.pt").write_bytes(b"x" * 100)
    with open(tmp_path / "big.distcp", "r+b") as fh:
        fh.truncate(10)
    assert I.check_integrity(str(tmp_path), record) == \
        f"big.distcp is 10 bytes, {I.CHECKSUM_MAX_BYTES + 1} when saved (truncated?)"
    os.remove(tmp_path / "common.pt")
    assert I.check_integrity(str(tmp_path), record) == "big.distcp is 10 bytes, 1048577 when saved (truncated?)"
    (tmp_path / "big.distcp").write_bytes(b"y" * (I.CHECKSUM_MAX_BYTES + 1))
    assert I.check_integrity(str(tmp_path), record) == "common.pt is missing"


@pytest.mark.timeout(30)
def test_resume_candidates_start_at_latest_and_skip_newer_abandoned_ones(tmp_path):
    from megatron_fipo.mcore import checkpoint as C

    root = str(tmp_path)
    for step in (1, 2, 3, 5):
        tmp, meta = _fake_checkpoint(root, step, {"common.pt": b"c"})
        C._publish(root, tmp, os.path.join(root, C.checkpoint_dir_name(step)), meta, None)
    (tmp_path / "latest").write_text("iter_0000003\n")  # resumed from 3 and saved it again
    assert [os.path.basename(p) for p in C.resume_candidates(root)] == ["iter_0000003", "iter_0000002",
                                                                         "iter_0000001"]
    (tmp_path / "latest").write_text("iter_0000004\n")  # names nothing complete: scan all
    assert [os.path.basename(p) for p in C.resume_candidates(root)] == ["iter_0000005", "iter_0000003",
                                                                         "iter_0000002", "iter_0000001"]
    os.remove(tmp_path / "iter_0000005" / "common.pt")
    assert "common.pt is missing" in C.checkpoint_problem(os.path.join(root, "iter_0000005"))
    assert C.checkpoint_problem(os.path.join(root, "iter_0000003")) is None


@pytest.mark.timeout(30)
def test_keep_last_never_counts_a_damaged_checkpoint(tmp_path):
    """keep_last=2 after iter 3 was damaged: the save of 4 keeps the intact 2 (the loadable fallback)
    and leaves 3 alone; the next save prunes both."""
    from megatron_fipo.mcore import checkpoint as C

    root = str(tmp_path)
    for step in (1, 2, 3):
        tmp, meta = _fake_checkpoint(root, step, {"common.pt": b"c" * 10})
        C._publish(root, tmp, os.path.join(root, C.checkpoint_dir_name(step)), meta, 2)
    with open(tmp_path / "iter_0000003" / "common.pt", "r+b") as fh:
        fh.truncate(3)
    tmp, meta = _fake_checkpoint(root, 4, {"common.pt": b"c" * 10})
    C._publish(root, tmp, os.path.join(root, "iter_0000004"), meta, 2)
    assert sorted(os.listdir(root)) == ["iter_0000002", "iter_0000003", "iter_0000004", "latest"]
    tmp, meta = _fake_checkpoint(root, 5, {"common.pt": b"c" * 10})
    C._publish(root, tmp, os.path.join(root, "iter_0000005"), meta, 2)
    assert sorted(os.listdir(root)) == ["iter_0000004", "iter_0000005", "latest"]


@pytest.mark.timeout(30)
def test_resume_paths_name_what_to_pass(tmp_path):
    """A run directory stands for its checkpoints; an empty one, or an incomplete checkpoint, is an
    error that says what to pass (not an internal function)."""
    from megatron_fipo.mcore import checkpoint as C
    from megatron_fipo.train.run import _resume_path

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for path in (run, run / "checkpoints"):
        with pytest.raises(ValueError, match="holds no complete checkpoint") as err:
            _resume_path(str(path), str(run / "checkpoints"))
        assert "RUN_DIR/checkpoints" in str(err.value) and "checkpoint.resume=auto" in str(err.value)
        assert "latest_checkpoint" not in str(err.value)
    assert _resume_path("auto", str(run / "checkpoints")) is None
    root = str(run / "checkpoints")
    tmp, meta = _fake_checkpoint(root, 2, {"common.pt": b"c"})
    C._publish(root, tmp, os.path.join(root, "iter_0000002"), meta, None)
    assert _resume_path(str(run), "elsewhere") == ("root", root)
    assert _resume_path(root, "elsewhere") == ("root", root)
    assert _resume_path(os.path.join(root, "iter_0000002"), "elsewhere") == ("dir", os.path.join(root, "iter_0000002"))
    assert _resume_path("auto", root) == ("root", root)
    os.makedirs(os.path.join(root, "iter_0000003"))
    with pytest.raises(ValueError, match="incomplete") as err:
        _resume_path(os.path.join(root, "iter_0000003"), root)
    assert "RUN_DIR/checkpoints" in str(err.value) and "latest_checkpoint" not in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        _resume_path(str(tmp_path / "missing"), root)
    with open(os.path.join(root, "iter_0000002", "common.pt"), "wb") as fh:
        fh.write(b"")
    with pytest.raises(ValueError, match="is damaged: common.pt is 0 bytes"):
        C.load_checkpoint(os.path.join(root, "iter_0000002"), [], None, None, None)


@pytest.mark.timeout(30)
def test_missing_or_bad_paths(tmp_path):
    from megatron_fipo.mcore import checkpoint as C

    assert C.latest_checkpoint(str(tmp_path / "missing")) is None
    assert C.latest_checkpoint(str(tmp_path)) is None
    (tmp_path / "iter_0000001.tmp-abc").mkdir()
    (tmp_path / "iter_0000002").mkdir()
    (tmp_path / "latest").write_text("iter_0000002\n")
    assert C.latest_checkpoint(str(tmp_path)) is None
    with pytest.raises(ValueError, match="does not exist"):
        C.load_checkpoint(str(tmp_path / "missing"), [], None, None, None)
    with pytest.raises(ValueError, match="incomplete"):
        C.load_checkpoint(str(tmp_path / "iter_0000002"), [], None, None, None)
    with pytest.raises(ValueError, match="keep_last"):
        C.save_checkpoint(str(tmp_path), 1, [], None, None, None, keep_last=0)
    with pytest.raises(ValueError, match="JSON"):
        C.save_checkpoint(str(tmp_path), 1, [], None, None, None, extra={"x": object()})


@pytest.mark.timeout(30)
def test_publish_replaces_existing_step_and_prunes(tmp_path):
    """Rank 0's finalisation alone (file system only): re-saving a step replaces it, stale
    temporaries go, ``keep_last`` keeps the newest older ones and never newer ones."""
    from megatron_fipo.mcore import checkpoint as C

    root = str(tmp_path)
    for step in (1, 2, 3, 5):
        tmp = tmp_path / f"iter_{step:07d}.tmp-x{step}"
        tmp.mkdir()
        (tmp / "common.pt").write_text(f"old {step}")
        C._publish(root, str(tmp), os.path.join(root, C.checkpoint_dir_name(step)), {"step": step}, None)
    assert C.latest_checkpoint(root).endswith("iter_0000005")
    (tmp_path / "iter_0000004.tmp-crashed").mkdir()
    (tmp_path / "latest.tmp-stale").write_text("iter_0000001")
    tmp = tmp_path / "iter_0000003.tmp-new"
    tmp.mkdir()
    (tmp / "common.pt").write_text("new 3")
    C._publish(root, str(tmp), os.path.join(root, "iter_0000003"), {"step": 3}, 2)
    assert sorted(os.listdir(root)) == ["iter_0000002", "iter_0000003", "iter_0000005", "latest"]
    assert (tmp_path / "iter_0000003" / "common.pt").read_text() == "new 3"
    assert C.latest_checkpoint(root).endswith("iter_0000003")
    assert C.read_checkpoint_meta(C.latest_checkpoint(root)) == {"step": 3}
