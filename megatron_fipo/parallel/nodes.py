"""Which node every rank is on, one process group per node, and the plan of a node-local weight sync.

Owns ``RankPlace`` (a rank's node, local index and parallel coordinates), ``node_sync_plan`` (pure:
for every pipeline stage, which tensor-parallel group of each node produces the stage's full HF
tensors, and which rank sends them to a node that holds no rank of that stage), ``cross_node_bytes``
(the bytes that plan moves between nodes) and ``NodeGroups`` (built collectively: the places of
all ranks and one group per node).

Why: colocated rollout servers run on every node, and every GPU of a node feeds the server TP rank
on that GPU with full (unsharded) HF tensors. The tensor-parallel all-gather stays inside a node
(``node_sync_plan`` refuses tensor-parallel groups that span nodes), and each stage's tensors cross
into a node that lacks the stage exactly once; inside the node one broadcast reaches every rank.

Node ids: ``GROUP_RANK`` (torchrun's node rank; what tells simulated nodes on one host apart),
else ``global rank // LOCAL_WORLD_SIZE``. Must not import megatron (the parallel coordinates
arrive in any object with ``rank``, ``world_size``, ``tp_rank``, ``pp_rank``, ``dp_rank``,
``cp_rank``, ``tp_size`` and ``world``).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional, Sequence

import torch.distributed as dist


@dataclass(frozen=True)
class RankPlace:
    rank: int
    node: int
    local: int
    """Index of the rank among its node's ranks (global-rank order): the GPU it drives."""
    pp: int
    tp: int
    dp: int
    cp: int
    host: str = ""
    pid: int = 0


@dataclass(frozen=True)
class StagePlan:
    """How the full HF tensors of one pipeline stage reach every node."""

    producers: dict
    """node -> the global ranks (tensor-parallel order) of the tp group that builds the tensors there;
    only nodes that hold ranks of the stage."""
    transfers: tuple
    """``(src rank, dst rank)`` per node without the stage: ``dst`` is that node's first rank."""
    holders: dict
    """node -> the rank that broadcasts the tensors inside the node (a producer, or the receiver)."""


def node_sync_plan(places: Sequence[RankPlace], tp_size: int) -> list[StagePlan]:
    """Per pipeline stage: producers per node, cross-node transfers, the broadcaster of each node.

    A node's producer is its tensor-parallel group of the stage with the smallest (dp, cp); the
    senders to nodes without the stage take turns over the producer nodes, so no node sends the
    stage to every other node. ``ValueError`` if a tensor-parallel group spans nodes.
    """
    by_rank = {p.rank: p for p in places}
    nodes = sorted({p.node for p in places})
    first_of = {n: min(p.rank for p in places if p.node == n) for n in nodes}
    tp_groups: dict = {}
    for p in places:
        tp_groups.setdefault((p.pp, p.dp, p.cp), []).append(p)
    for key, members in tp_groups.items():
        if len({m.node for m in members}) > 1 or len(members) != tp_size:
            raise ValueError(f"the tensor-parallel group of (pp, dp, cp) = {key} spans nodes "
                             f"{sorted({m.node for m in members})}: a node-local weight sync needs every tensor-"
                             "parallel group inside one node (tp <= GPUs per node, and a divisor of it)")
    plans = []
    for stage in sorted({p.pp for p in places}):
        producers = {}
        for (pp, dp, cp), members in sorted(tp_groups.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            node = members[0].node
            if pp == stage and node not in producers:
                producers[node] = tuple(m.rank for m in sorted(members, key=lambda m: m.tp))
        sources = sorted(producers)
        transfers, holders = [], {n: producers[n][0] for n in producers}
        lacking = [n for n in nodes if n not in producers]
        for i, node in enumerate(lacking):
            src = producers[sources[i % len(sources)]][0]
            transfers.append((src, first_of[node]))
            holders[node] = first_of[node]
        assert all(by_rank[dst].node != by_rank[src].node for src, dst in transfers)
        plans.append(StagePlan(producers, tuple(transfers), holders))
    return plans


def cross_node_bytes(places: Sequence[RankPlace], plans: Sequence[StagePlan], stage_bytes: Sequence[int]) -> dict:
    """node -> bytes that node receives from other nodes per sync (``stage_bytes[s]``: stage s's HF tensors)."""
    node_of = {p.rank: p.node for p in places}
    out = {n: 0 for n in sorted({p.node for p in places})}
    for plan, nbytes in zip(plans, stage_bytes):
        for _, dst in plan.transfers:
            out[node_of[dst]] += nbytes
    return out


def node_id(rank: int) -> int:
    """This process's node: torchrun's ``GROUP_RANK``, else ``rank // LOCAL_WORLD_SIZE`` (one node when unset)."""
    if os.environ.get("GROUP_RANK") is not None:
        return int(os.environ["GROUP_RANK"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return rank // local if local > 0 else 0


class NodeGroups:
    """Every rank's place, this rank's node group and the sync plan (built collectively over ``groups.world``)."""

    def __init__(self, groups, *, node: Optional[int] = None):
        me = (node if node is not None else node_id(groups.rank), groups.pp_rank, groups.tp_rank, groups.dp_rank,
              groups.cp_rank, socket.gethostname(), os.getpid())
        gathered = [None] * groups.world_size
        dist.all_gather_object(gathered, me, group=groups.world)
        nodes = sorted({g[0] for g in gathered})
        members = {n: [r for r, g in enumerate(gathered) if g[0] == n] for n in nodes}
        self.places = [RankPlace(r, g[0], members[g[0]].index(r), *g[1:]) for r, g in enumerate(gathered)]
        self.place = self.places[groups.rank]
        self.nodes = nodes
        self.ranks = members[self.place.node]
        """The global ranks of this rank's node."""
        self.group = None
        for n in nodes:  # every rank creates every node's group, in the same order
            group = dist.new_group(members[n])
            if n == self.place.node:
                self.group = group
        self.plan = node_sync_plan(self.places, groups.tp_size)

    def records(self) -> list[dict]:
        """One dict per rank (rank, node, local, pp, tp, dp, cp, host, pid): what ``ranks.json`` holds."""
        return [dict(vars(p)) for p in self.places]

    @property
    def leader(self) -> int:
        """The node's first rank: it launches and feeds the node's rollout servers."""
        return self.ranks[0]

    @property
    def is_leader(self) -> bool:
        return self.place.rank == self.leader
