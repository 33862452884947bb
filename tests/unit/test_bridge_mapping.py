"""The Qwen2 mapping table and its tensor transforms against naive per-head loops (single process)."""

import pytest
import torch

from megatron_fipo.bridge import qwen2_mapping as M


def _split(name, fused, **arch):
    """``to_hf`` (the export path) of one table entry, for an architecture given by its fields."""
    from types import SimpleNamespace

    fields = dict(hidden_size=fused.shape[-1], ffn_hidden_size=1, vocab_size=1, num_heads=1, num_kv_heads=1,
                  head_dim=1)
    entry, _ = M.match_mcore(name)
    return M.to_hf(entry, fused, SimpleNamespace(**{**fields, **arch}))


QKV_W, QKV_B = "decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.self_attention.linear_qkv.bias"


def _naive_merge_qkv(q, k, v, heads, groups, d):
    rows = []
    per = heads // groups
    for g in range(groups):
        for h in range(g * per, (g + 1) * per):
            rows.append(q[h * d:(h + 1) * d])
        rows.append(k[g * d:(g + 1) * d])
        rows.append(v[g * d:(g + 1) * d])
    return torch.cat(rows)


@pytest.mark.parametrize("heads,groups", [(4, 2), (8, 1), (4, 4), (6, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_merge_matches_naive_and_split_inverts(heads, groups, bias):
    gen = torch.Generator().manual_seed(heads * 10 + groups)
    d, hidden = 8, 16
    def shape(n):
        return (n * d,) if bias else (n * d, hidden)

    q, k, v = (torch.randn(shape(n), generator=gen) for n in (heads, groups, groups))
    fused = M.merge_qkv(q, k, v, heads, groups, d)
    assert torch.equal(fused, _naive_merge_qkv(q, k, v, heads, groups, d))
    split = {"num_heads": heads, "num_kv_heads": groups, "head_dim": d}
    name = QKV_B if bias else QKV_W
    q2, k2, v2 = _split(name, fused, **split)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    # split of a random fused tensor then merge is the identity as well
    other = torch.randn_like(fused)
    assert torch.equal(M.merge_qkv(*_split(name, other, **split), heads, groups, d), other)


def test_fc1_merge_split_identity():
    gate, up = torch.randn(12, 5), torch.randn(12, 5)
    fused = M.merge_fc1(gate, up)
    assert torch.equal(fused[:12], gate) and torch.equal(fused[12:], up)
    g2, u2 = _split("decoder.layers.0.mlp.linear_fc1.weight", fused, ffn_hidden_size=12)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


class _Arch:
    hidden_size, num_heads, num_kv_heads, ffn_hidden_size, vocab_size, num_layers = 32, 4, 2, 24, 37, 2
    tie_word_embeddings = False
    head_dim = 8


@pytest.mark.parametrize("tp", [1, 2, 4, 8])  # 4 and 8 > the 2 kv heads: groups split over ranks
def test_tp_shards_of_hf_slices_gather_back_to_the_full_tensor(tp):
    """assemble_local over shard_rows for each rank, then merge_tp_shards, equals the tp=1 tensor."""
    arch, padded = _Arch(), 1024
    gen = torch.Generator().manual_seed(tp)
    for entry in M.QWEN2_TABLE:
        hf = [torch.randn(s, generator=gen) for s in M.hf_shapes(entry, arch)]
        full = M.assemble_local(entry, hf, arch, padded, 1)
        shards = []
        for r in range(tp):
            ranges = M.shard_rows(entry, arch, padded, r, tp)
            dim = entry.tp_dim or 0
            parts = [t.narrow(dim, a, b - a) if entry.tp_dim is not None else t for t, (a, b) in zip(hf, ranges)]
            shards.append(M.assemble_local(entry, parts, arch, padded, tp, r))
        assert torch.equal(M.merge_tp_shards(entry, shards), full), entry.mcore
        back = M.to_hf(entry, full, arch)
        assert all(torch.equal(a, b) for a, b in zip(back, hf)), entry.mcore


def test_vocab_is_padded_with_zeros_and_trimmed():
    w = torch.randn(37, 4)
    padded = M.pad_vocab(w, 1024)
    assert padded.shape == (1024, 4) and torch.equal(padded[:37], w) and not padded[37:].any()
    (trimmed,) = _split("embedding.word_embeddings.weight", padded, vocab_size=37)
    assert torch.equal(trimmed, w)
    with pytest.raises(ValueError, match="larger than the padded vocab"):
        M.pad_vocab(w, 16)


def test_names_resolve_both_ways_and_te_names_fuse_the_norms():
    entry, layer = M.match_mcore("decoder.layers.3.pre_mlp_layernorm.weight")
    assert layer == 3 and M.hf_names(entry, 5) == ("model.layers.5.post_attention_layernorm.weight",)
    te, layer = M.match_mcore("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", spec="te")
    assert te.mcore.endswith("input_layernorm.weight") and layer == 1
    te, _ = M.match_mcore("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", spec="te")
    assert te.hf == ("model.layers.{layer}.post_attention_layernorm.weight",)
    assert M.split_chunk_prefix("chunk1.decoder.final_layernorm.weight") == (1, "decoder.final_layernorm.weight")
    with pytest.raises(KeyError, match="decoder.layers.0.mystery.weight"):
        M.match_mcore("decoder.layers.0.mystery.weight")
    names = M.expected_hf_names(2, tied=True)
    assert "lm_head.weight" not in names and len(names) == len(set(names)) == 2 + 2 * 12
    assert "lm_head.weight" in M.expected_hf_names(2, tied=False)


def test_uniform_layer_offsets_follow_the_interleaved_layout():
    assert M.uniform_layer_offsets(8, 1, 2, None) == [4]
    assert M.uniform_layer_offsets(8, 1, 2, 2) == [2, 6]
    assert M.uniform_layer_offsets(8, 0, 1, None) == [0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["untied_gqa4to2", "tied_gqa8to1"])
def test_hf_state_names_and_shapes_match_the_table(tmp_path, case):
    """A real HF Qwen2 checkpoint has exactly the table's names and shapes."""
    from safetensors import safe_open

    from megatron_fipo.bridge.hf_import import HFCheckpoint, check_hf_names
    from megatron_fipo.mcore.model import Qwen2Arch  # test-side only: the bridge never imports mcore
    from tests.hf_tiny import CASES, tiny_hf_model

    d = tiny_hf_model(str(tmp_path), **CASES[case])
    arch = Qwen2Arch.from_hf(d)
    ckpt = HFCheckpoint(d)
    check_hf_names(ckpt.names, arch)
    shapes = {}
    for n, f in ckpt.weight_map.items():
        with safe_open(f"{d}/{f}", framework="pt") as h:
            shapes[n] = tuple(h.get_slice(n).get_shape())
    for entry in M.QWEN2_TABLE:
        if entry is M.OUTPUT_LAYER and arch.tie_word_embeddings:
            continue
        for layer in range(arch.num_layers) if entry.per_layer else [None]:
            for name, shape in zip(M.hf_names(entry, layer), M.hf_shapes(entry, arch)):
                assert shapes[name] == shape, name
    with pytest.raises(ValueError, match=r"missing \[.model.layers.4.input_layernorm"):
        check_hf_names(set(shapes), Qwen2Arch.from_hf(dict(arch_config(d), num_hidden_layers=5)))


def arch_config(d):
    import json

    with open(f"{d}/config.json") as fh:
        return json.load(fh)


def test_tp_neither_dividing_nor_a_multiple_of_kv_heads_is_rejected():
    arch = _Arch()
    entry, _ = M.match_mcore("decoder.layers.0.self_attention.linear_qkv.weight")
    with pytest.raises(ValueError, match="tensor parallel size 3 must divide the 2 kv heads or be a multiple"):
        M.shard_rows(entry, arch, 1024, 0, 3)
