"""``megatron-fipo convert``: HF -> Megatron dist-checkpoint at tp=2, back to HF at pp=2, bit-identical."""
import json
import os

import pytest
import torch

from tests.dist.launcher import launch
from tests.hf_tiny import CASES, tiny_hf_model


def _convert(argv):
    from megatron_fipo.cli import main

    return main(argv)


@pytest.mark.timeout(300)
def test_convert_hf_to_mcore_and_back_across_layouts(tmp_path):
    from safetensors.torch import load_file

    hf = tiny_hf_model(str(tmp_path / "hf"), **CASES["tied_gqa4to2"])
    with open(os.path.join(hf, "tokenizer_config.json"), "w") as fh:  # stands in for the tokenizer files
        json.dump({"model_max_length": 256}, fh)
    mcore, out = str(tmp_path / "mcore"), str(tmp_path / "out")
    assert launch(_convert, 2, ["convert", "--from-hf", hf, "--to-mcore", mcore, "--tp", "2", "--verify"],
                  timeout=240) == [0, 0]
    assert launch(_tool, 2, "convert_mcore_to_hf.py", [mcore, out, "--pp", "2", "--verify", "--verify-tol", "1e-5"],
                  timeout=240) == [0, 0]
    original = load_file(os.path.join(hf, "model.safetensors"))
    exported = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            exported.update(load_file(os.path.join(out, f)))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
    with open(os.path.join(out, "config.json")) as fh:
        assert json.load(fh)["tie_word_embeddings"] is True


def _tool(name, argv):
    import runpy
    import sys

    sys.argv = [name, *argv]
    try:
        runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "..", "tools", name), run_name="__main__")
    except SystemExit as exc:
        return exc.code
    return None


def _verify_mismatch(hf_a, hf_b):
    from megatron_fipo.bridge.hf_import import load_hf_into_chunks
    from megatron_fipo.convert import verify_against_hf
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor
    from megatron_fipo.mcore.model import Qwen2Arch

    groups = G.init_distributed()
    arch = Qwen2Arch.from_hf(hf_a)
    actor = Actor(arch, groups)
    load_hf_into_chunks(hf_a, actor.named_local_parameters(), arch, tp_rank=0, tp_size=1,
                        padded_vocab=actor.padded_vocab, layer_offsets=[0])
    same = verify_against_hf(actor, hf_a, tol=1e-5)
    try:
        verify_against_hf(actor, hf_b, tol=1e-3)
    except ValueError as exc:
        return same, str(exc)
    finally:
        G.destroy()
    return same, None


@pytest.mark.timeout(200)
def test_verify_catches_a_broken_conversion(tmp_path):
    hf_a = tiny_hf_model(str(tmp_path / "a"), seed=0, **CASES["tied_gqa4to2"])
    hf_b = tiny_hf_model(str(tmp_path / "b"), seed=1, **CASES["tied_gqa4to2"])  # same shapes, other weights
    ((same, error),) = launch(_verify_mismatch, 1, hf_a, hf_b, timeout=180)
    assert same < 1e-5
    assert error is not None and "--verify failed" in error


def test_convert_rejects_mixed_directions(capsys):
    from megatron_fipo.cli import main

    assert main(["convert", "--from-hf", "a", "--to-hf", "b"]) == 2
    assert "--from-hf DIR --to-mcore DIR" in capsys.readouterr().err
