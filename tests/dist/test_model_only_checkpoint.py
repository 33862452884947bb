"""Model-only checkpoints of ``convert --to-mcore``: no optimizer state, weights in the dtype asked for,
a start for training equal to starting from the HF directory, refused as a resume; HF -> mcore -> HF
bit-exact in bfloat16; the export's files readable like any other file; the reported tp / pp of a
conversion from a tp=2 checkpoint."""
import json
import os
import stat

import pytest
import torch

from tests.dist.launcher import launch
from tests.helpers import ACTOR_LOSS, ACTOR_SETTINGS, actor_per_sample, actor_prepare, actor_samples
from tests.hf_tiny import CASES, tiny_hf_model


def _checkpoint_tensors(path):
    """{key: dtype} of every tensor a torch_dist checkpoint directory holds (its metadata, no load)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(path).read_metadata()
    return {k: m.properties.dtype for k, m in meta.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}


def _start_two_ways(hf, ckpt_root):
    """One process: a trainable actor from the HF directory and one from the model-only checkpoint
    (``load_weights``, the path of ``model.init_checkpoint``), one FIPO step each on the same batch;
    then a resume from the model-only checkpoint."""
    from megatron_fipo.bridge.hf_import import load_hf_into_chunks
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor, ActorSettings
    from megatron_fipo.mcore.checkpoint import latest_checkpoint
    from megatron_fipo.mcore.model import Qwen2Arch

    arch = Qwen2Arch.from_hf(hf)
    prompts, responses = actor_samples()
    prompts = [[t % arch.vocab_size for t in p] for p in prompts]
    responses = [[t % arch.vocab_size for t in r] for r in responses]
    results = []
    for start in ("hf", "model_only"):
        groups = G.init_distributed(seed=11)
        actor = Actor(arch, groups, ActorSettings(**ACTOR_SETTINGS))
        if start == "hf":
            load_hf_into_chunks(hf, actor.named_local_parameters(), arch, tp_rank=0, tp_size=1,
                                padded_vocab=actor.padded_vocab, layer_offsets=[0])
        else:
            actor.load_weights(latest_checkpoint(ckpt_root))
        logp = actor.compute_logprobs(prompts, responses)
        per_sample = actor_per_sample(responses, logp)
        metrics = actor.train_step(actor_prepare(actor, prompts, responses, per_sample, list(range(len(prompts)))),
                                   ACTOR_LOSS)
        after = {n: p.detach().clone() for n, p in actor.named_local_parameters()}
        results.append(([lp.tolist() for lp in logp], metrics, after, actor.steps))
        if start == "model_only":
            try:
                actor.load(latest_checkpoint(ckpt_root))
                results.append(None)
            except ValueError as err:
                results.append(str(err))
        G.destroy()
    return results


@pytest.mark.timeout(120)
def test_model_only_checkpoint_holds_weights_only_and_starts_training_like_hf(tmp_path):
    from megatron_fipo.convert import hf_to_mcore
    from megatron_fipo.mcore.checkpoint import latest_checkpoint, read_checkpoint_meta

    hf = tiny_hf_model(str(tmp_path / "hf"), **CASES["tied_gqa4to2"])
    fp32, bf16 = str(tmp_path / "fp32"), str(tmp_path / "bf16")
    ((r32,),) = [launch(hf_to_mcore, 1, hf, fp32, timeout=100)]
    ((r16,),) = [launch(hf_to_mcore, 1, hf, bf16, dtype="bfloat16", timeout=100)]
    assert (r32["dtype"], r16["dtype"]) == ("float32", "bfloat16")  # default: config.json's torch_dtype
    assert r32["contents"] == r16["contents"] == "model" and r32["tp"] == r32["pp"] == 1
    for root, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16)):
        path = latest_checkpoint(root)
        meta = read_checkpoint_meta(path)
        assert meta["contents"] == "model" and meta["optimizer"] is None and meta["params_dtype"] == str(dtype)[6:]
        tensors = _checkpoint_tensors(path)
        assert tensors and all(k.startswith(("embedding.", "decoder.", "output_layer.")) for k in tensors), \
            sorted(tensors)  # the model's tensors only: no optimizer moments, no RNG state
        assert set(tensors.values()) == {dtype}, {k: v for k, v in tensors.items() if v != dtype}
        assert not any("rng" in name or "optim" in name for name in os.listdir(path))
    # bfloat16 weights take half the bytes of float32 ones (and no optimizer moments)
    size = {r: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(r) for f in fs) for r in (fp32, bf16)}
    assert size[bf16] < 0.6 * size[fp32], size

    hf_start, model_only_start, resume_error = launch(_start_two_ways, 1, hf, fp32, timeout=100)[0]
    assert model_only_start[0] == hf_start[0]  # log-probs before the step
    assert model_only_start[1] == hf_start[1]  # step-1 metrics
    assert all(torch.equal(model_only_start[2][k], v) for k, v in hf_start[2].items())
    assert model_only_start[3] == hf_start[3] == 1
    assert resume_error is not None and "model-only checkpoint" in resume_error
    assert "model.init_checkpoint=" in resume_error and "\n" not in resume_error


def _round_trip(hf, root):
    """One process: HF (bfloat16) -> model-only mcore -> HF with --verify, through the CLI."""
    import contextlib
    import io

    from megatron_fipo.cli import main

    mcore, out = os.path.join(root, "mcore"), os.path.join(root, "out")
    old = os.umask(0o022)
    try:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            codes = [main(["convert", "--from-hf", hf, "--to-mcore", mcore, "--verify", "--verify-tol", "1e-5"]),
                     main(["convert", "--from-mcore", mcore, "--to-hf", out, "--verify", "--verify-tol", "1e-5"])]
    finally:
        os.umask(old)
    return codes, [json.loads(line) for line in printed.getvalue().splitlines()]


@pytest.mark.timeout(120)
def test_round_trip_in_bfloat16_is_bit_exact_and_export_files_follow_the_umask(tmp_path):
    from safetensors.torch import load_file
    from transformers import Qwen2ForCausalLM

    hf = tiny_hf_model(str(tmp_path / "hf32"), **CASES["tied_gqa4to2"])
    bf16 = str(tmp_path / "hf")
    Qwen2ForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).save_pretrained(bf16)
    with open(os.path.join(bf16, "tokenizer_config.json"), "w") as fh:
        json.dump({"model_max_length": 256}, fh)
    os.chmod(os.path.join(bf16, "tokenizer_config.json"), 0o600)  # copied content, not the mode
    root = tmp_path / "work"
    root.mkdir()
    codes, reports = launch(_round_trip, 1, bf16, str(root), timeout=100)[0]
    assert codes == [0, 0], reports
    assert reports[0]["dtype"] == reports[1]["dtype"] == "bfloat16"
    assert reports[0]["verify_max_abs_diff"] < 1e-5 and reports[1]["verify_max_abs_diff"] < 1e-5
    original = load_file(os.path.join(bf16, "model.safetensors"))
    out = root / "out"
    exported = {k: v for f in os.listdir(out) if f.endswith(".safetensors") for k, v in load_file(str(out / f)).items()}
    assert sorted(exported) == sorted(original)
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], v) for k, v in original.items())
    modes = {f: stat.S_IMODE(os.stat(out / f).st_mode) for f in os.listdir(out)}
    assert "tokenizer_config.json" in modes and any(f.endswith(".safetensors") for f in modes)
    assert set(modes.values()) == {0o644}, modes


def _report_from_one_process(root):
    from megatron_fipo.convert import mcore_to_hf

    return mcore_to_hf(os.path.join(root, "mcore"), os.path.join(root, "hf_out"))


@pytest.mark.timeout(150)
def test_conversion_from_a_tp2_checkpoint_reports_its_layout(tmp_path):
    hf = tiny_hf_model(str(tmp_path / "hf"), **CASES["untied_gqa4to2"])
    root = tmp_path / "work"
    root.mkdir()
    from megatron_fipo.convert import hf_to_mcore

    written = launch(hf_to_mcore, 2, hf, str(root / "mcore"), tp=2, timeout=120)
    assert [(r["tp"], r["pp"]) for r in written] == [(2, 1), (2, 1)]
    ((report,),) = [launch(_report_from_one_process, 1, str(root), timeout=100)]
    assert (report["tp"], report["pp"]) == (2, 1)  # the checkpoint's layout, not the one converted at
    assert report["converted_at"] == {"tp": 1, "pp": 1}
    assert report["source"] == str(root / "mcore" / "iter_0000000")
