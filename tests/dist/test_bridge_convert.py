"""``megatron-fipo convert``: HF -> Megatron dist-checkpoint at tp=2, back to HF at pp=2, bit-identical;
``--verify`` passes a good bf16 / fp16 export and fails a broken one, which then leaves no output; the
library functions (``hf_to_mcore`` / ``mcore_to_hf``) report what the CLI prints."""
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


def _exports(hf, root):
    """One process: HF -> mcore, then bf16 / fp16 exports with --verify, then the same with layers 0 and 1
    swapped by the mapping (export and import), then an export onto a non-empty directory."""
    import contextlib
    import io

    from megatron_fipo.bridge import qwen2_mapping as M
    from megatron_fipo.cli import main

    def run(*argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["convert", *argv])
        return code, err.getvalue()

    mcore = os.path.join(root, "mcore")
    out = {"to_mcore": run("--from-hf", hf, "--to-mcore", mcore)[0]}
    for dtype in ("bfloat16", "float16"):
        out[dtype] = run("--from-mcore", mcore, "--to-hf", os.path.join(root, dtype), "--dtype", dtype, "--verify")
    names = M.hf_names
    M.hf_names = lambda entry, layer: names(entry, {0: 1, 1: 0}.get(layer, layer))
    try:
        out["broken_export"] = run("--from-mcore", mcore, "--to-hf", os.path.join(root, "broken"), "--dtype",
                                   "bfloat16", "--verify")
        out["broken_import"] = run("--from-hf", hf, "--to-mcore", os.path.join(root, "broken_mcore"), "--verify")
    finally:
        M.hf_names = names
    out["onto_existing"] = run("--from-mcore", mcore, "--to-hf", os.path.join(root, "bfloat16"))
    out["listing"] = sorted(os.listdir(root))
    return out


def _in_one_process(fn, tmp_path):
    """``fn(hf, root)`` in one process on a tiny untied HF model and an empty ``root``: (hf, root, its result)."""
    hf = tiny_hf_model(str(tmp_path / "hf"), **CASES["untied_gqa4to2"])
    root = tmp_path / "out"
    root.mkdir()
    ((r,),) = [launch(fn, 1, hf, str(root), timeout=240)]
    return hf, root, r


@pytest.mark.timeout(300)
def test_verify_passes_half_precision_exports_and_a_failed_one_leaves_nothing(tmp_path):
    from safetensors.torch import load_file

    hf, root, r = _in_one_process(_exports, tmp_path)
    assert r["to_mcore"] == 0
    original = load_file(os.path.join(hf, "model.safetensors"))
    for dtype in ("bfloat16", "float16"):
        code, err = r[dtype]
        assert code == 0, err
        exported = load_file(str(root / dtype / "model-00001-of-00001.safetensors"))
        assert all(torch.equal(exported[k], v.to(getattr(torch, dtype))) for k, v in original.items())
    for case in ("broken_export", "broken_import"):
        code, err = r[case]
        assert code == 2 and "--verify failed" in err, (case, err)
    code, err = r["onto_existing"]
    assert code == 2 and "already exists and is not empty" in err, err
    # Nothing that looks like an output (nor a temporary) is left by the failures.
    assert r["listing"] == ["bfloat16", "float16", "mcore"], r["listing"]


def _library_and_cli(hf, root):
    """One process: each direction through ``hf_to_mcore`` / ``mcore_to_hf`` and through the CLI."""
    import contextlib
    import io

    from safetensors.torch import load_file

    from megatron_fipo.cli import main
    from megatron_fipo.convert import hf_to_mcore, mcore_to_hf

    def captured(fn, *args, **kwargs):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            result = fn(*args, **kwargs)
        return result, stdout.getvalue()

    out = {"lib_to_mcore": captured(hf_to_mcore, hf, os.path.join(root, "lib_mcore"), verify=True),
           "cli_to_mcore": captured(main, ["convert", "--from-hf", hf, "--to-mcore", os.path.join(root, "cli_mcore"),
                                           "--verify"]),
           "lib_to_hf": captured(mcore_to_hf, os.path.join(root, "lib_mcore"), os.path.join(root, "lib_hf"),
                                 dtype="bfloat16", verify=True),
           "cli_to_hf": captured(main, ["convert", "--from-mcore", os.path.join(root, "cli_mcore"), "--to-hf",
                                        os.path.join(root, "cli_hf"), "--dtype", "bfloat16", "--verify"])}
    out["files"] = [sorted(os.listdir(os.path.join(root, d))) for d in ("lib_hf", "cli_hf")]
    out["same_weights"] = all(
        torch.equal(load_file(os.path.join(root, "lib_hf", f))[k], v)
        for f in os.listdir(os.path.join(root, "cli_hf")) if f.endswith(".safetensors")
        for k, v in load_file(os.path.join(root, "cli_hf", f)).items())
    return out


@pytest.mark.timeout(300)
def test_library_functions_match_the_cli(tmp_path):
    _, root, r = _in_one_process(_library_and_cli, tmp_path)
    for direction, written in (("to_mcore", "mcore"), ("to_hf", "hf")):
        (report, printed), (code, cli_printed) = r[f"lib_{direction}"], r[f"cli_{direction}"]
        assert printed == "", printed  # the library returns its report; only the CLI prints it
        assert code == 0 and cli_printed.count("\n") == 1, cli_printed
        cli = json.loads(cli_printed)
        same = {"written": str(root / f"lib_{written}")}
        if direction == "to_hf":
            same["source"] = str(root / "lib_mcore" / "iter_0000000")
        assert report == {**cli, **same}, (report, cli)
        assert cli["written"] == str(root / f"cli_{written}") and cli["tp"] == cli["pp"] == 1
        assert cli["verify_max_abs_diff"] < 1e-3
    assert r["files"][0] == r["files"][1] and any(f.endswith(".safetensors") for f in r["files"][0]), r["files"]
    assert r["same_weights"]


def test_convert_rejects_mixed_directions(capsys):
    from megatron_fipo.cli import main

    assert main(["convert", "--from-hf", "a", "--to-hf", "b"]) == 2
    assert "--from-hf DIR --to-mcore DIR" in capsys.readouterr().err
