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
    assert launch(_convert, 2, ["convert", "--from-hf", hf, "--to-mcore", mcore, "--tp", "2"], timeout=240) == [0, 0]
    assert launch(_convert, 2, ["convert", "--from-mcore", mcore, "--to-hf", out, "--pp", "2"], timeout=240) == [0, 0]
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


def test_convert_rejects_mixed_directions(capsys):
    from megatron_fipo.cli import main

    assert main(["convert", "--from-hf", "a", "--to-hf", "b"]) == 2
    assert "--from-hf DIR --to-mcore DIR" in capsys.readouterr().err
