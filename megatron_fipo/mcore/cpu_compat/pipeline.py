"""CPU patches for pipeline schedules and p2p communication (gloo instead of NCCL).

Patches (``PATCHES``), in ``megatron.core.pipeline_parallel``:
* ``torch`` -> ``CPU_TORCH`` in ``schedules`` (``forward_backward_*`` count tokens in a tensor
  created with ``device="cuda"``) and ``p2p_communication`` (``P2PCommunicator._communicate``
  allocates receive buffers on the current CUDA device and synchronises after batched p2p).
* ``p2p_communication._batched_p2p_ops`` -> ``_batched_p2p_ops`` here: the same ops, tagged by
  direction, because gloo matches untagged messages in posting order, which swaps activations
  and gradients at pp = 2 with virtual stages (silently wrong losses).
* ``P2PCommunicator._communicate_shapes`` (variable sequence lengths) -> ``_communicate_shapes``
  here: CPU buffers, the same tagging, and shape sends left in flight instead of waited for,
  which deadlocks gloo in the interleaved schedule when num_microbatches == pp.
Must not import: megatron at module level, anything from megatron_fipo outside ``mcore.cpu_compat``.
"""
from __future__ import annotations

import torch

from megatron_fipo.mcore.cpu_compat.registry import CD, patch, same, torch_patch, with_method

# Tags for pipeline p2p on gloo: activations travel send_next -> recv_prev, gradients
# send_prev -> recv_next; shapes (variable lengths) get their own pair of tags.
_ACT_TAG, _GRAD_TAG, _ACT_SHAPE_TAG, _GRAD_SHAPE_TAG = 1, 2, 3, 4


def _tagged_p2p(send_prev, recv_prev, send_next, recv_next, group, prev_rank, next_rank,
                act_tag=_ACT_TAG, grad_tag=_GRAD_TAG):
    """Post the four pipeline p2p ops with direction tags and return their requests.

    Gloo matches the messages of one sender/receiver pair in posting order per tag. Upstream
    posts untagged [send_prev, recv_prev, send_next, recv_next] on every rank, so with two
    pipeline ranks (prev == next) and virtual stages, a gradient sent to prev is received as
    the activation expected from prev: the interleaved schedule silently trains on swapped
    tensors. Tagging by direction makes the matching unambiguous.
    """
    dist = torch.distributed
    ops = [
        dist.P2POp(fn, tensor, peer, group, tag)
        for tensor, fn, peer, tag in (
            (send_prev, dist.isend, prev_rank, grad_tag),
            (recv_prev, dist.irecv, prev_rank, act_tag),
            (send_next, dist.isend, next_rank, act_tag),
            (recv_next, dist.irecv, next_rank, grad_tag),
        )
        if tensor is not None
    ]
    return dist.batch_isend_irecv(ops) if ops else []


def _batched_p2p_ops(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next,
                     group, prev_pipeline_rank, next_pipeline_rank):
    """Upstream ``_batched_p2p_ops`` (same signature and list of requests), tagged for gloo."""
    return _tagged_p2p(tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next,
                       group, prev_pipeline_rank, next_pipeline_rank)


def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
    """Upstream ``P2PCommunicator._communicate_shapes`` on CPU, tagged for gloo (see above).

    Returns:
        (recv_prev_shape, recv_next_shape): 3-element lists, [0, 0, 0] when not received.
    """

    def shape(tensor):
        return None if tensor is None else torch.tensor(tensor.size(), dtype=torch.int64)

    prev_buf = torch.empty(3, dtype=torch.int64) if recv_prev else None
    next_buf = torch.empty(3, dtype=torch.int64) if recv_next else None
    tags = dict(act_tag=_ACT_SHAPE_TAG, grad_tag=_GRAD_SHAPE_TAG)
    sends = (shape(tensor_send_prev), shape(tensor_send_next))
    # Shape sends are not waited for (kept alive until done): see _PENDING_SHAPE_SENDS.
    _PENDING_SHAPE_SENDS[:] = [(w, t) for w, t in _PENDING_SHAPE_SENDS if not w.is_completed()]
    _PENDING_SHAPE_SENDS.extend((w, sends) for w in _tagged_p2p(
        sends[0], None, sends[1], None, self.pp_group, self.prev_rank, self.next_rank, **tags))
    for req in _tagged_p2p(None, prev_buf, None, next_buf, self.pp_group, self.prev_rank,
                           self.next_rank, **tags):
        req.wait()
    return tuple([0, 0, 0] if buf is None else buf.tolist() for buf in (prev_buf, next_buf))


# A gloo send completes only once the peer has posted the matching receive; a small NCCL send
# can complete on its own (it fits the peer's pre-allocated p2p buffer). Upstream waits for its
# shape sends, which NCCL tolerates but which deadlocks gloo in the interleaved schedule when every
# micro-batch of the first stage is in warm-up (num_microbatches == pp): the last stage's first
# 1F1B shape exchange sends a gradient shape the first stage only receives after its last
# warm-up send has completed, and that send needs the last stage's data receive that follows
# the shape exchange. So shape sends are left in flight, like on NCCL; each keeps its tensor.
_PENDING_SHAPE_SENDS: list = []

PATCHES = (
    torch_patch("pipeline_parallel.schedules",
                ["forward_backward_no_pipelining", "forward_backward_pipelining_with_interleaving",
                 "forward_backward_pipelining_without_interleaving"], 'device="cuda"',
                'total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")'),
    torch_patch("pipeline_parallel.p2p_communication", ["P2PCommunicator._communicate"],
                CD, "receive buffers on current_device(); synchronize() after batched p2p"),
    patch("pipeline_parallel.p2p_communication", "_batched_p2p_ops", ["_batched_p2p_ops"],
          "batch_isend_irecv", "untagged batched p2p swaps activations and gradients on gloo when "
          "pp == 2 with virtual stages (silently wrong losses)", same(_batched_p2p_ops)),
    patch("pipeline_parallel.p2p_communication", "P2PCommunicator", ["P2PCommunicator._communicate_shapes"],
          "batch_isend_irecv", "shape exchange (variable lengths): cuda buffers, torch.cuda.synchronize()"
          ", the same untagged-p2p mismatch, and waiting on shape sends deadlocks gloo (interleaved, "
          "num_microbatches == pp)", lambda cls: with_method(cls, "_communicate_shapes", _communicate_shapes)),
)
