"""The HF <-> Megatron bridge at (tp, pp) in {(1,1), (2,1), (1,2), (2,2)} and (2, 2, vpp 2) against HF transformers.

Tiny random ``Qwen2ForCausalLM`` checkpoints (tests/hf_tiny.py: untied GQA 4:2, tied GQA 4:2, tied
GQA 8:1; vocabs not divisible by tp) are loaded into an ``Actor`` with ``load_hf_into_chunks``; its
``compute_logprobs`` must equal HF's ``log_softmax(model(ids).logits)`` at the next tokens (fp32,
1e-5). The same actor is exported with ``export_hf_state`` (small buckets, so several) and written
by rank 0 with ``save_hf_checkpoint``: the files must be bit-identical to the original HF state
dict and load with ``AutoModelForCausalLM.from_pretrained`` with no missing / unexpected keys;
every rank must see the same buckets. All layouts of all cases run in one world-4 launch.
"""
import hashlib
import os
import random

import pytest
import torch

from tests.dist.launcher import launch
from tests.hf_tiny import CASES, tiny_hf_model

LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (2, 2, 2)]  # (tp, pp, vpp)
BUCKET_BYTES = 64 << 10


def _layouts(case):
    """Every (tp, pp) for every case (8:1 at tp 2 splits the one query group); vpp once is enough."""
    return [lay for lay in LAYOUTS if lay[2] is None or case == "untied_gqa4to2"]  # 8:1 runs at tp 2 > 1 kv head


def _samples(vocab, seed=0, n=5):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    responses = [[rng.randrange(vocab) for _ in range(rng.randint(1, 10))] for _ in range(n)]
    return prompts, responses


def _one_layout(hf_dir, out_dir, tp, pp, vpp):
    import torch.distributed as dist

    from megatron_fipo.bridge import qwen2_mapping as M
    from megatron_fipo.bridge.hf_export import export_hf_state, save_hf_checkpoint
    from megatron_fipo.bridge.hf_import import load_hf_into_chunks
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor, ActorSettings
    from megatron_fipo.mcore.model import Qwen2Arch

    groups = G.init_distributed(tp=tp, pp=pp, vpp=vpp, seed=7)
    arch = Qwen2Arch.from_hf(hf_dir)
    actor = Actor(arch, groups, ActorSettings(max_tokens_per_micro_batch=32))
    offsets = [c.module.decoder.layers[0].layer_number - 1 for c in actor.chunks]
    assert offsets == M.uniform_layer_offsets(arch.num_layers, groups.pp_rank, groups.pp_size, groups.vpp_size)
    spec = "te" if actor.use_te else "mcore"  # TE layer spec on GPU: norms fused into the linears
    written = load_hf_into_chunks(hf_dir, actor.named_local_parameters(), arch, tp_rank=groups.tp_rank,
                                  tp_size=groups.tp_size, padded_vocab=actor.padded_vocab, layer_offsets=offsets,
                                  spec=spec)
    prompts, responses = _samples(arch.vocab_size)
    logp = actor.compute_logprobs(prompts, responses)
    buckets = list(export_hf_state(actor.named_local_parameters(), arch, groups=groups, layer_offsets=offsets,
                                   dtype=torch.float32, bucket_bytes=BUCKET_BYTES, spec=spec))
    sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in buckets]
    digest = hashlib.sha256()
    for bucket in buckets:
        for name, t in bucket:
            digest.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    if dist.get_rank() == 0:
        save_hf_checkpoint(buckets, out_dir, hf_dir, hf_dir)
    dist.barrier()
    G.destroy(process_group=False)
    return dict(logp=[lp.tolist() for lp in logp], written=written, digest=digest.hexdigest(),
                bucket_sizes=sizes, bucket_lens=[len(b) for b in buckets])


def _all_cases(jobs):
    from megatron_fipo.mcore import groups as G

    out = [_one_layout(*job) for job in jobs]
    G.destroy()
    return out


def _hf_reference(hf_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    prompts, responses = _samples(model.config.vocab_size)
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([p + r])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            pos = torch.arange(len(p) - 1, len(p) + len(r) - 1)
            out.append(logp[pos, ids[0, pos + 1]])
    return out


def _check_export(hf_dir, out_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    assert os.path.exists(os.path.join(out_dir, "model.safetensors.index.json"))
    exported = {}
    for f in sorted(os.listdir(out_dir)):
        if f.endswith(".safetensors"):
            exported.update(load_file(os.path.join(out_dir, f)))
    assert sorted(exported) == sorted(original)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    _, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


@pytest.mark.timeout(900)
def test_hf_roundtrip_through_megatron_layouts(tmp_path):
    roundtrip(tmp_path, atol=1e-5)


def roundtrip(tmp_path, atol):
    """Every case at every layout: log-probs vs HF within ``atol``, bit-identical export."""
    jobs, refs = [], {}
    for i, case in enumerate(CASES):
        hf_dir = tiny_hf_model(str(tmp_path / case), seed=i, **CASES[case])
        refs[case] = _hf_reference(hf_dir)
        jobs += [(hf_dir, str(tmp_path / f"out_{case}_tp{tp}_pp{pp}_vpp{vpp}"), tp, pp, vpp)
                 for tp, pp, vpp in _layouts(case)]
    results = launch(_all_cases, 4, jobs, timeout=840)
    for j, (hf_dir, out_dir, tp, pp, vpp) in enumerate(jobs):
        case = os.path.basename(hf_dir)
        per_rank = [r[j] for r in results]
        for rank, got in enumerate(per_rank):
            for a, b in zip(got["logp"], refs[case]):
                torch.testing.assert_close(torch.tensor(a), b, rtol=0, atol=atol, msg=f"{case} tp{tp} pp{pp} vpp{vpp} r{rank}")
            assert got["digest"] == per_rank[0]["digest"], (case, tp, pp, vpp, rank)
        sizes, lens = per_rank[0]["bucket_sizes"], per_rank[0]["bucket_lens"]
        assert len(sizes) > 1 and all(s <= BUCKET_BYTES or n == 1 for s, n in zip(sizes, lens)), (sizes, lens)
        _check_export(hf_dir, out_dir)
