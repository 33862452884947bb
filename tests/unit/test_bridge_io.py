"""HF import / export of the bridge in one process, on plain tensors named like Megatron's (no megatron).

A (tp=1, pp=1) set of local parameters is built from the table, filled from a tiny HF checkpoint,
exported back (bit-identical, multi-shard with an index, loadable by transformers), and every
error path of the importer names the offending tensors.
"""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from megatron_fipo.bridge import qwen2_mapping as M
from megatron_fipo.bridge.hf_export import export_hf_state, save_hf_checkpoint
from megatron_fipo.bridge.hf_import import load_hf_into_chunks
from tests.hf_tiny import CASES, tiny_hf_model

PADDED = 1024
SINGLE = SimpleNamespace(tp=None, pp=None, tp_size=1, pp_size=1, tp_rank=0, pp_rank=0, pp_global_ranks=(0,))


def _arch(hf_dir):
    with open(os.path.join(hf_dir, "config.json")) as fh:
        c = json.load(fh)
    return SimpleNamespace(hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                           num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"],
                           ffn_hidden_size=c["intermediate_size"], vocab_size=c["vocab_size"],
                           head_dim=c["hidden_size"] // c["num_attention_heads"],
                           tie_word_embeddings=c["tie_word_embeddings"])


def _fake_params(arch, tp=1, rank=0, layers=None):
    """NaN-filled ``(name, tensor)`` of one TP rank of a one-stage model, shaped from the table."""
    named = []
    for entry in M.QWEN2_TABLE:
        if entry is M.OUTPUT_LAYER and arch.tie_word_embeddings:
            continue
        for layer in (range(layers or arch.num_layers) if entry.per_layer else [None]):
            ranges = M.shard_rows(entry, arch, PADDED, rank, tp)
            parts = []
            for shape, (a, b) in zip(M.hf_shapes(entry, arch), ranges):
                shape = list(shape)
                shape[entry.tp_dim or 0] = b - a
                parts.append(torch.zeros(shape))
            t = M.assemble_local(entry, parts, arch, PADDED, tp).clone().fill_(float("nan"))
            named.append((entry.mcore.format(layer=layer), t))
    return named


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_import_then_export_is_bit_identical_and_loads_in_transformers(tmp_path, case):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf_dir = tiny_hf_model(str(tmp_path / "hf"), **CASES[case])
    arch = _arch(hf_dir)
    named = _fake_params(arch)
    assert load_hf_into_chunks(hf_dir, named, arch, tp_rank=0, tp_size=1, padded_vocab=PADDED,
                               layer_offsets=[0]) == len(named)
    emb = dict(named)["embedding.word_embeddings.weight"]
    assert not emb[arch.vocab_size:].any() and not any(t.isnan().any() for _, t in named)
    buckets = list(export_hf_state(named, arch, groups=SINGLE, layer_offsets=[0], bucket_bytes=32 << 10))
    assert len(buckets) > 2
    out = str(tmp_path / "out")
    weight_map = save_hf_checkpoint(buckets, out, hf_dir, hf_dir, max_shard_bytes=100 << 10)
    assert len(set(weight_map.values())) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    exported = {}
    for f in set(weight_map.values()):
        exported.update(load_file(os.path.join(out, f)))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_export_casts_to_the_requested_dtype(tmp_path):
    hf_dir = tiny_hf_model(str(tmp_path / "hf"), num_hidden_layers=1)
    arch = _arch(hf_dir)
    named = _fake_params(arch)
    load_hf_into_chunks(hf_dir, named, arch, tp_rank=0, tp_size=1, padded_vocab=PADDED, layer_offsets=[0])
    (bucket,) = export_hf_state(named, arch, groups=SINGLE, layer_offsets=[0], dtype=torch.bfloat16)
    assert {t.dtype for _, t in bucket} == {torch.bfloat16}
    assert dict(bucket)["lm_head.weight"].shape == (arch.vocab_size, arch.hidden_size)


def test_import_of_a_later_pipeline_stage_and_tp_rank(tmp_path):
    """Stage 2 of 2 at tp rank 1 of 2: local layers 0-1 are global 2-3; the vocab tail is padding."""
    from safetensors.torch import load_file

    hf_dir = tiny_hf_model(str(tmp_path / "hf"))
    arch, hf = _arch(hf_dir), load_file(os.path.join(hf_dir, "model.safetensors"))
    named = [(n, t) for n, t in _fake_params(arch, tp=2, rank=1, layers=2) if not n.startswith("embedding")]
    load_hf_into_chunks(hf_dir, named, arch, tp_rank=1, tp_size=2, padded_vocab=PADDED, layer_offsets=[2])
    params = dict(named)
    assert torch.equal(params["decoder.layers.1.self_attention.linear_proj.weight"],
                       hf["model.layers.3.self_attn.o_proj.weight"][:, 32:])
    assert torch.equal(params["decoder.layers.0.mlp.linear_fc1.weight"],
                       torch.cat([hf["model.layers.2.mlp.gate_proj.weight"][48:],
                                  hf["model.layers.2.mlp.up_proj.weight"][48:]]))
    assert not params["output_layer.weight"].any()  # rows 512..1023: all beyond the 201-token vocab


def test_import_errors_name_the_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_dir = tiny_hf_model(str(tmp_path / "hf"), num_hidden_layers=2)
    arch = _arch(hf_dir)
    load = lambda d, named: load_hf_into_chunks(d, named, arch, tp_rank=0, tp_size=1,
                                                padded_vocab=PADDED, layer_offsets=[0])
    state = load_file(os.path.join(hf_dir, "model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    bad = dict(state)
    del bad["model.layers.1.self_attn.k_proj.bias"]
    bad["model.layers.1.mystery.weight"] = torch.zeros(2)
    save_file(bad, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.self_attn.k_proj.bias'\], "
                                         r"unexpected \['model.layers.1.mystery.weight'\]"):
        load(str(broken), _fake_params(arch))
    with pytest.raises(ValueError, match="no Qwen2 mapping for Megatron parameter 'decoder.layers.0.extra'"):
        load(hf_dir, _fake_params(arch) + [("decoder.layers.0.extra", torch.zeros(1))])
    named = _fake_params(arch)
    with pytest.raises(ValueError, match=r"not written exactly once.*'decoder.final_layernorm.weight': 2"):
        load(hf_dir, named + [n for n in named if n[0] == "decoder.final_layernorm.weight"])
    with pytest.raises(ValueError, match=r"decoder.layers.0.mlp.linear_fc2.weight: HF .* shape \(64, 96\)"):
        load(hf_dir, [(n, torch.zeros(3) if n.endswith("fc2.weight") else t) for n, t in named])


def test_reused_bucket_buffer_streams_the_same_tensors(tmp_path):
    """reuse_buffer: each bucket, consumed before the next is requested, equals the fresh export."""
    hf_dir = tiny_hf_model(str(tmp_path / "hf"), **CASES["untied_gqa4to2"])
    arch = _arch(hf_dir)
    named = _fake_params(arch)
    load_hf_into_chunks(hf_dir, named, arch, tp_rank=0, tp_size=1, padded_vocab=PADDED, layer_offsets=[0])
    bucket_bytes = 48 << 10  # smaller than the embedding: that one gets its own tensor
    fresh = {n: t for b in export_hf_state(named, arch, groups=SINGLE, layer_offsets=[0], bucket_bytes=bucket_bytes)
             for n, t in b}
    buffer = torch.full((bucket_bytes // 4,), float("nan"))
    streamed, buckets = {}, 0
    for _ in range(2):  # the same buffer serves a second sync
        for bucket in export_hf_state(named, arch, groups=SINGLE, layer_offsets=[0], bucket_bytes=bucket_bytes,
                                      reuse_buffer=buffer):
            assert sum(t.numel() * 4 for _, t in bucket) <= bucket_bytes or len(bucket) == 1
            streamed.update({n: t.clone() for n, t in bucket})  # consumed before the next bucket
            buckets += 1
    assert buckets > 4 and sorted(streamed) == sorted(fresh)
    assert all(torch.equal(streamed[n], fresh[n]) for n in fresh)
    with pytest.raises(ValueError, match="reuse_buffer"):
        next(export_hf_state(named, arch, groups=SINGLE, layer_offsets=[0], bucket_bytes=bucket_bytes,
                             reuse_buffer=torch.zeros(10)))


def test_hf_config_readers_name_the_file(tmp_path):
    """Qwen2Arch.from_hf (a directory or a checkpoint's dict) and the export's config copy share one reader."""
    from megatron_fipo.mcore.model import Qwen2Arch  # test-side only: the bridge never imports mcore

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"hidden_size": 64,\n "vocab_size": 1x}')
    with pytest.raises(ValueError, match=f"{src / 'config.json'}:2:17: not valid JSON"):
        Qwen2Arch.from_hf(str(src))
    with pytest.raises(ValueError, match=f"{src / 'config.json'}:2:17: not valid JSON"):
        save_hf_checkpoint([], str(tmp_path / "out"), str(src))
    with pytest.raises(ValueError, match="HF config \\(config.json\\): missing intermediate_size"):
        Qwen2Arch.from_hf(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=9))


@pytest.mark.parametrize("keep", [-100, 50, 4])
def test_truncated_safetensors_names_the_file(tmp_path, keep):
    hf_dir = tiny_hf_model(str(tmp_path / "hf"), num_hidden_layers=2)
    path = os.path.join(hf_dir, "model.safetensors")
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[:keep])
    arch = _arch(hf_dir)
    with pytest.raises(ValueError, match=f"{path}: not a readable safetensors file .*re-download the model or re-export"):
        load_hf_into_chunks(hf_dir, _fake_params(arch), arch, tp_rank=0, tp_size=1, padded_vocab=PADDED,
                            layer_offsets=[0])


def test_broken_index_names_the_file(tmp_path):
    from megatron_fipo.bridge.hf_import import HFCheckpoint

    hf_dir = tiny_hf_model(str(tmp_path / "hf"), num_hidden_layers=2)
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    with open(index, "w") as fh:
        fh.write('{"weight_map": ')
    with pytest.raises(ValueError, match=f"{index}: not a safetensors index"):
        HFCheckpoint(hf_dir)
    with open(index, "w") as fh:
        json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}, fh)
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors: not a readable safetensors file"):
        HFCheckpoint(hf_dir)


def test_import_keeps_no_safetensors_file_mapped(tmp_path):
    """Each file is mapped only while the tensors read from it are in use (safetensors' tensors view
    the mapping): a mapping kept for the whole load would leave every page read in the process's
    RSS, as much again as the checkpoint."""
    from megatron_fipo.bridge import hf_import

    hf_dir = tiny_hf_model(str(tmp_path / "hf"), num_hidden_layers=2)
    path = os.path.realpath(os.path.join(hf_dir, "model.safetensors"))

    def mappings():
        with open("/proc/self/maps") as fh:
            return sum(line.rstrip().endswith(path) for line in fh)

    seen, read = [], hf_import.HFCheckpoint.read

    def spy(self, *args, **kwargs):  # at most the previous parameter's parts are still referenced
        seen.append(mappings())
        return read(self, *args, **kwargs)

    arch = _arch(hf_dir)
    ckpt = hf_import.HFCheckpoint(hf_dir)
    assert mappings() == 0 and ckpt.read("model.norm.weight").shape == (arch.hidden_size,)
    assert mappings() == 0
    hf_import.HFCheckpoint.read = spy
    try:
        load_hf_into_chunks(hf_dir, _fake_params(arch), arch, tp_rank=0, tp_size=1, padded_vocab=PADDED,
                            layer_offsets=[0])
    finally:
        hf_import.HFCheckpoint.read = read
    assert seen[0] == 0 and max(seen) <= 3 and mappings() == 0


def test_saving_a_stream_lets_each_bucket_go_before_the_next(tmp_path):
    """save_hf_checkpoint holds one bucket of a stream at a time: when the next bucket is requested,
    nothing of the previous one is alive (the --to-hf peak is the model plus one bucket, not two)."""
    import gc
    import weakref

    from safetensors.torch import load_file

    hf_dir = tiny_hf_model(str(tmp_path / "hf"), num_hidden_layers=2)
    arch = _arch(hf_dir)
    named = _fake_params(arch)
    load_hf_into_chunks(hf_dir, named, arch, tp_rank=0, tp_size=1, padded_vocab=PADDED, layer_offsets=[0])
    alive, requests = [], 0

    def stream():
        nonlocal requests
        for bucket in export_hf_state(named, arch, groups=SINGLE, layer_offsets=[0], bucket_bytes=32 << 10):
            requests += 1
            gc.collect()
            assert not [r for r in alive if r() is not None], "the previous bucket is still alive"
            alive.extend(weakref.ref(t) for _, t in bucket)
            yield bucket

    out = str(tmp_path / "out")
    weight_map = save_hf_checkpoint(stream(), out, hf_dir, hf_dir)
    assert requests > 2
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    exported = {}
    for f in set(weight_map.values()):
        exported.update(load_file(os.path.join(out, f)))
    assert sorted(exported) == sorted(original) and all(torch.equal(exported[k], v) for k, v in original.items())
