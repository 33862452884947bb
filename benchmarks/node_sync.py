"""Benchmark: bytes that cross a node per weight sync, and sync time on gloo: the old funnel vs the node-local sync.

Run::

    python benchmarks/node_sync.py [--layers 8] [--hidden 512] [--repeats 3] [--json out.json] [--quick]

Two simulated nodes of two ranks each (4 gloo processes on this host) at tp=2 inside a node and
pp=2 across the nodes (node 0 holds stage 0, node 1 stage 1): the layout of the 32B recipe in
miniature. A random Qwen2-shaped model is exported so that every rank ends with the full HF state
in buckets (what a colocated SGLang server on each GPU needs):

* funnel (before): the exporting model-parallel group (data-parallel rank 0) runs
  ``export_hf_state`` (TP gather, then each stage broadcast over the pipeline group), and global
  rank 0 sends every bucket to each rank of the other node, one receiver per server TP rank, as a
  weight-update group rooted at rank 0 does;
* node-local (after): every rank runs ``export_hf_node_local`` (TP gather inside the node, each
  stage sent once into the node that lacks it, then one broadcast inside the node).

``torch.distributed`` point-to-point and broadcast calls are counted per (source node, destination
node). Reported: bytes received by each node from the other, bytes sent out of each node, and the
median sync time; the 32B recipe's figures come from ``plan.node_sync_bytes`` (node-local) and the
funnel's definition (every remote server TP rank receives the whole model from rank 0's node).
Figures are reported, not asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, PER_NODE, TP, PP = 4, 2, 2, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hf_config(layers: int, hidden: int) -> dict:
    return dict(architectures=["Qwen2ForCausalLM"], hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=8, num_key_value_heads=2, intermediate_size=hidden * 3, vocab_size=8192,
                rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
                hidden_act="silu")


class _Counter:
    """Wraps dist.send / recv / broadcast: bytes received per node, from another node or not."""

    def __init__(self, node_of: dict):
        self.node_of, self.cross_in, self.cross_out, self.real = node_of, 0, 0, {}

    def __enter__(self):
        for name in ("send", "recv", "broadcast"):
            self.real[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name))
        return self

    def __exit__(self, *exc):
        for name, fn in self.real.items():
            setattr(dist, name, fn)

    def _wrap(self, name):
        real, me = self.real[name], dist.get_rank()

        def wrapped(tensor, *args, **kwargs):
            nbytes = tensor.numel() * tensor.element_size()
            if name == "recv" and self.node_of[args[0]] != self.node_of[me]:
                self.cross_in += nbytes
            elif name == "send" and self.node_of[args[0]] != self.node_of[me]:
                self.cross_out += nbytes
            elif name == "broadcast":
                src = kwargs.get("src", args[0] if args else None)
                if src != me and self.node_of[src] != self.node_of[me]:  # gloo: each receiver gets a copy
                    self.cross_in += nbytes
                elif src == me:
                    group = kwargs.get("group")
                    ranks = dist.get_process_group_ranks(group) if group is not None else range(WORLD)
                    self.cross_out += nbytes * sum(self.node_of[r] != self.node_of[me] for r in ranks)
            return real(tensor, *args, **kwargs)
        return wrapped


def _worker(rank: int, port: int, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank % PER_NODE), LOCAL_WORLD_SIZE=str(PER_NODE), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from megatron_fipo.bridge.hf_export import export_hf_node_local, export_hf_state
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor, ActorSettings
    from megatron_fipo.mcore.model import Qwen2Arch
    from megatron_fipo.parallel.nodes import NodeGroups

    groups = G.init_distributed(tp=TP, pp=PP, seed=1)
    nodes = NodeGroups(groups, node=rank // PER_NODE)
    actor = Actor(Qwen2Arch.from_hf(_hf_config(args.layers, args.hidden)), groups, ActorSettings())
    offsets, spec = actor.bridge_layout()
    node_of = {p.rank: p.node for p in nodes.places}
    common = dict(layer_offsets=offsets, dtype=torch.float32, bucket_bytes=args.bucket_mb << 20, spec=spec)
    buffer = torch.empty((args.bucket_mb << 20) // 4)
    remote = [r for r in range(WORLD) if node_of[r] != 0]

    def export():
        return export_hf_state(actor.named_local_parameters(), actor.arch, groups=groups, reuse_buffer=buffer,
                               **common) if groups.dp_rank == 0 else None

    layout = [None]  # setup, not timed: the (shape) of every tensor of every bucket, known to every rank
    stream = export()
    shapes = [[tuple(t.shape) for _, t in bucket] for bucket in stream] if stream is not None else None
    layout = [shapes if rank == 0 else None]
    dist.broadcast_object_list(layout, src=0, group=groups.world)
    inbox = [[torch.empty(s) for s in bucket] for bucket in layout[0]] if rank in remote else None

    def funnel():
        stream = export()
        for k, bucket in enumerate(stream if stream is not None else [None] * len(layout[0])):
            if rank == 0:  # rank 0's node feeds every remote server TP rank, bucket by bucket
                for _, t in bucket:
                    for dst in remote:
                        dist.send(t, dst, group=groups.world)
            elif rank in remote:
                for t in inbox[k]:
                    dist.recv(t, 0, group=groups.world)

    def node_local():
        for _ in export_hf_node_local(actor.named_local_parameters(), actor.arch, groups=groups, nodes=nodes,
                                      reuse_buffer=buffer, **common):
            pass

    result = {}
    for name, fn in (("funnel", funnel), ("node_local", node_local)):
        times = []
        for i in range(args.repeats + 1):
            dist.barrier(group=groups.world)
            with _Counter(node_of) as counter:
                start = time.perf_counter()
                fn()
                dist.barrier(group=groups.world)
                elapsed = time.perf_counter() - start
            if i:  # the first run warms up
                times.append(elapsed)
        in_out = [None] * WORLD
        dist.all_gather_object(in_out, (node_of[rank], counter.cross_in, counter.cross_out), group=groups.world)
        per_node_in = {n: sum(b for m, b, _ in in_out if m == n) for n in (0, 1)}
        per_node_out = {n: sum(b for m, _, b in in_out if m == n) for n in (0, 1)}
        result[name] = dict(median_s=statistics.median(times), bytes_into_node=per_node_in,
                            bytes_out_of_node=per_node_out)
    if rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as fh:
            json.dump(result, fh)
    G.destroy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--bucket-mb", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true", help="2 layers, hidden 128, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.repeats = 2, 128, 1
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(_free_port(), args, tmp), nprocs=WORLD, join=True)
        with open(os.path.join(tmp, "result.json")) as fh:
            result = json.load(fh)
    from megatron_fipo.config.schema import load_config
    from megatron_fipo.plan import node_sync_bytes, parameter_counts

    big = dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
               intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False)
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples",
                                      "qwen2.5-32b-fipo.yaml"))
    local = node_sync_bytes(config, big, 128, 8)
    model = parameter_counts(big)["total"] * 2
    result["qwen2.5_32b"] = dict(node_local_max_gib_into_a_node=max(local) / 2**30,
                                 funnel_gib_into_a_node=model / 2**30)
    f, n = result["funnel"], result["node_local"]
    print("Summary (2 simulated nodes x 2 ranks, tp=2 in a node, pp=2 across; gloo on one host)")
    for name, r in (("funnel (before)", f), ("node-local (after)", n)):
        print(f"  {name:20s} into node 0 {r['bytes_into_node']['0'] / 2**20:8.2f} MiB, into node 1 "
              f"{r['bytes_into_node']['1'] / 2**20:8.2f} MiB, out of node 0 {r['bytes_out_of_node']['0'] / 2**20:8.2f}"
              f" MiB; sync {r['median_s'] * 1e3:8.1f} ms")
    ratio = sum(f["bytes_into_node"].values()) / max(sum(n["bytes_into_node"].values()), 1)
    result["cross_node_bytes_ratio"], result["time_ratio"] = ratio, f["median_s"] / n["median_s"]
    print(f"  cross-node bytes funnel / node-local: {ratio:.2f}x; time funnel / node-local: "
          f"{result['time_ratio']:.2f}x")
    big_r = result["qwen2.5_32b"]
    print(f"  Qwen2.5-32B recipe (16 nodes, tp=8 pp=2 cp=2, bf16): node-local "
          f"{big_r['node_local_max_gib_into_a_node']:.1f} GiB into a node per sync; a funnel from rank 0 moves at "
          f"least the whole model, {big_r['funnel_gib_into_a_node']:.1f} GiB, into every other node (one copy per "
          "node even with a ring broadcast), all of it leaving through one process")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
