"""The node-local weight export against the HF checkpoint, with the bytes that cross nodes counted.

World 4 on gloo, split into simulated nodes (``NodeGroups(node=...)``): 2 nodes of 2 ranks at
(tp, pp) = (2, 2), (1, 2), (2, 1) and (1, 4), and 4 nodes of one rank at (1, 4). Every rank loads a
tiny random HF Qwen2 into its actor, runs ``export_hf_node_local`` in small buckets (several per
stage) and must hold every HF tensor bit-identical to the checkpoint. ``dist.send`` / ``recv`` /
``broadcast`` are wrapped to record who moved which bytes: every byte a node receives from another
node must be one of the plan's transfers, each stage must reach a node that lacks it exactly once,
the total must equal ``cross_node_bytes`` and ``plan.node_sync_bytes`` (the formula ``megatron-
fipo plan`` reports), and every broadcast must stay inside one node.
"""
import pytest
import torch

from tests.dist.launcher import launch
from tests.hf_tiny import tiny_hf_model

CASES = [  # (tp, pp, ranks per node)
    (2, 2, 2), (1, 2, 2), (2, 1, 2), (1, 4, 2), (1, 4, 1),
]


def _run(hf_dir, cases):
    import torch.distributed as dist
    from safetensors.torch import load_file

    from megatron_fipo.bridge.hf_export import export_hf_node_local
    from megatron_fipo.bridge.hf_import import load_hf_into_chunks
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor, ActorSettings
    from megatron_fipo.mcore.model import Qwen2Arch
    from megatron_fipo.parallel.nodes import NodeGroups, cross_node_bytes

    import glob

    reference = {}
    for f in glob.glob(f"{hf_dir}/*.safetensors"):
        reference.update(load_file(f))
    log: list = []
    real = {name: getattr(dist, name) for name in ("send", "recv", "broadcast")}

    def record(name):
        def wrapped(tensor, *args, **kwargs):
            peer = args[0] if args else kwargs.get("dst", kwargs.get("src"))
            if name == "broadcast":
                peer = kwargs.get("src", peer)
                members = dist.get_process_group_ranks(kwargs["group"]) if kwargs.get("group") else None
                log.append((name, peer, tensor.numel() * tensor.element_size(), members))
            else:
                log.append((name, peer, tensor.numel() * tensor.element_size(), None))
            return real[name](tensor, *args, **kwargs)
        return wrapped

    out = []
    for tp, pp, per_node in cases:
        groups = G.init_distributed(tp=tp, pp=pp, seed=3)
        nodes = NodeGroups(groups, node=groups.rank // per_node)
        arch = Qwen2Arch.from_hf(hf_dir)
        actor = Actor(arch, groups, ActorSettings(max_tokens_per_micro_batch=64))
        offsets, spec = actor.bridge_layout()
        load_hf_into_chunks(hf_dir, actor.named_local_parameters(), arch, tp_rank=groups.tp_rank,
                            tp_size=groups.tp_size, padded_vocab=actor.padded_vocab, layer_offsets=offsets, spec=spec)
        log.clear()
        for name in real:
            setattr(dist, name, record(name))
        try:
            got, buckets = {}, 0
            for bucket in export_hf_node_local(actor.named_local_parameters(), arch, groups=groups, nodes=nodes,
                                               layer_offsets=offsets, dtype=torch.float32, bucket_bytes=16 << 10,
                                               spec=spec, reuse_buffer=True):
                buckets += 1
                for name, t in bucket:
                    assert name not in got, name
                    got[name] = t.clone()
        finally:
            for name, fn in real.items():
                setattr(dist, name, fn)
        exact = sorted(got) == sorted(reference) and all(torch.equal(got[k], reference[k]) for k in reference)
        stage_of = {}
        for stage, plan in enumerate(nodes.plan):
            for src, dst in plan.transfers:
                stage_of[(src, dst)] = stage
        stage_bytes = [0] * pp
        for name, shape_bytes in _stage_tensor_bytes(reference, arch.num_layers, pp).items():
            stage_bytes[name] = shape_bytes
        out.append(dict(
            case=(tp, pp, per_node), exact=exact, buckets=buckets, node=nodes.place.node, rank=groups.rank,
            stage=groups.pp_rank, stage_bytes=stage_bytes,
            node_ranks=nodes.ranks,
            received=sum(b for n, peer, b, _ in log if n == "recv"),
            received_from=sorted({peer for n, peer, _, _ in log if n == "recv"}),
            sent_to=sorted({peer for n, peer, _, _ in log if n == "send"}),
            broadcast_groups=sorted({tuple(m) for n, _, _, m in log if n == "broadcast" and m}),
            plan_bytes=cross_node_bytes(nodes.places, nodes.plan, stage_bytes),
            transfers=[list(p.transfers) for p in nodes.plan]))
        G.destroy(process_group=False)
    G.destroy()
    return out


def _stage_tensor_bytes(reference, layers, pp):
    """HF bytes per pipeline stage: layers split evenly, embedding first, final norm and lm_head last."""
    out = [0] * pp
    for name, t in reference.items():
        if ".layers." in name:
            stage = int(name.split(".layers.")[1].split(".")[0]) // (layers // pp)
        elif "embed_tokens" in name:
            stage = 0
        else:
            stage = pp - 1
        out[stage] += t.numel() * t.element_size()
    return dict(enumerate(out))


@pytest.mark.timeout(600)
def test_node_local_export_is_exact_and_crosses_each_node_once(tmp_path):
    hf_dir = tiny_hf_model(str(tmp_path / "hf"), seed=4, num_hidden_layers=4)
    results = launch(_run, 4, hf_dir, CASES, timeout=540)
    for i, (tp, pp, per_node) in enumerate(CASES):
        ranks = [r[i] for r in results]
        assert all(r["exact"] for r in ranks), (tp, pp, per_node)  # every rank holds the whole HF state
        assert all(r["buckets"] > 1 for r in ranks)  # several buckets through the reused buffer
        node_of = {r["rank"]: r["node"] for r in ranks}
        for r in ranks:  # a rank receives only the plan's transfers, only from other nodes
            assert all(node_of[src] != r["node"] for src in r["received_from"]), r
            assert all(node_of[dst] != r["node"] for dst in r["sent_to"]), r
            assert all(set(g) <= set(r["node_ranks"]) for g in r["broadcast_groups"]), r  # broadcasts stay in the node
        received = {}
        for r in ranks:
            received[r["node"]] = received.get(r["node"], 0) + r["received"]
        plan_bytes = {int(k): v for k, v in ranks[0]["plan_bytes"].items()}
        assert received == plan_bytes, ((tp, pp, per_node), received, plan_bytes)
        # naive: a node receives, once, every stage none of its ranks holds
        held = {}
        for r in ranks:
            held.setdefault(r["node"], set()).add(r["stage"])
        stage_bytes = ranks[0]["stage_bytes"]
        expected = {n: sum(stage_bytes[s] for s in range(pp) if s not in stages) for n, stages in held.items()}
        assert received == expected, ((tp, pp, per_node), received, expected)
        if pp > 1 and per_node < 4:
            assert sum(received.values()) > 0
