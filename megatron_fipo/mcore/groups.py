"""Process-group setup: the one place that calls megatron.core.parallel_state getters.

Owns: ``init_distributed`` (torch.distributed + ``initialize_model_parallel`` + RNG seeding),
the frozen ``ParallelGroups`` handed explicitly to everything downstream, and ``destroy``.
Must not import: megatron_fipo.algo internals, trainer, rollout.
Departs from upstream: Megatron-LM's ``initialize_megatron`` also builds global args, timers and
microbatch calculators; here only groups and seeds are set up. On CPU, gloo replaces NCCL and
``cpu_compat.apply_cpu_patches()`` runs before any model-parallel state is created. The precise
filters of ``quiet_warnings`` (megatron-core's notices that tell a user nothing) go in first.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_fipo import quiet_warnings
from megatron_fipo.mcore.cpu_compat import apply_cpu_patches

ProcessGroup = dist.ProcessGroup


@dataclass(frozen=True)
class ParallelGroups:
    """Process groups, sizes and ranks of this process (all from ``parallel_state``).

    ``dp``/``dp_cp`` are the data-parallel groups without/with context parallelism (gradients
    are reduced over ``dp_cp``). ``embedding`` holds the first and last pipeline stages (tied
    embeddings); ``position_embedding`` the first stage. ``vpp_size`` is None without virtual
    pipelining.
    """

    world_size: int
    rank: int
    world: ProcessGroup  # every rank (the default group, passed explicitly like the others)
    tp: ProcessGroup
    pp: ProcessGroup
    cp: ProcessGroup
    dp: ProcessGroup
    dp_cp: ProcessGroup
    mp: ProcessGroup
    tp_cp: ProcessGroup
    embedding: ProcessGroup | None
    position_embedding: ProcessGroup | None
    tp_size: int
    pp_size: int
    cp_size: int
    dp_size: int
    dp_cp_size: int
    vpp_size: int | None
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    dp_cp_rank: int
    cp_global_ranks: tuple[int, ...]
    pp_global_ranks: tuple[int, ...]
    is_first_stage: bool
    is_last_stage: bool
    seed: int

    def pg_collection(self):
        """The same groups as megatron's ``ProcessGroupCollection`` (for upstream APIs that take one)."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        return ProcessGroupCollection(
            tp=self.tp, pp=self.pp, cp=self.cp, mp=self.mp, tp_cp=self.tp_cp,
            embd=self.embedding, pos_embd=self.position_embedding,
            dp=self.dp, dp_cp=self.dp_cp,
        )



def world_size_error(world: int, model_parallel: int) -> str:
    """The one line for a world size that ``tp*pp*cp`` does not divide; names torchrun when run without it."""
    line = f"world size {world} is not divisible by tp*pp*cp = {model_parallel}"
    if world == 1:
        line += (f": launch with torchrun --nproc-per-node {model_parallel} -m megatron_fipo ... "
                 f"(or a multiple of {model_parallel} processes in all)")
    else:
        line += f": run a multiple of {model_parallel} processes (torchrun --nproc-per-node / --nnodes)"
    return line

def single_process_env() -> None:
    """The torchrun environment of a one-process world, when not launched by torchrun."""
    import os
    import socket

    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")


def _init_process_group(backend: str | None, timeout_minutes: int) -> None:
    if dist.is_initialized():
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if k not in os.environ]
    if missing:
        raise ValueError(f"init_distributed needs the torchrun environment; missing {missing}")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=timedelta(minutes=timeout_minutes))


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    cp: int = 1,
    seed: int = 1234,
    backend: str | None = None,
    timeout_minutes: int = 30,
) -> ParallelGroups:
    """Initialise torch.distributed (env://) and Megatron model parallelism; seed all RNGs.

    Args:
        tp, pp, cp: tensor / pipeline / context parallel sizes; world size must be divisible
            by ``tp * pp * cp``; the rest is data parallel.
        vpp: virtual pipeline stages per rank (interleaved 1F1B), or None.
        seed: base seed. CPU/default generator gets ``seed``; the model-parallel RNG tracker
            gets upstream's offsets (``model_parallel_cuda_manual_seed``).
        backend: torch.distributed backend; default nccl with CUDA, gloo without.
        timeout_minutes: collective timeout.

    Returns:
        the ``ParallelGroups`` of this process.
    """
    quiet_warnings.install()  # before megatron is imported: some of its notices fire at import
    apply_cpu_patches()  # no-op with CUDA
    _init_process_group(backend, timeout_minutes)
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(world_size_error(world, tp * pp * cp))
    if vpp is not None and pp < 2:
        raise ValueError("virtual pipeline parallelism (vpp) needs pp >= 2")

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    # force_reset_rng: a tracker created before the CPU patches would hold CUDA states.
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return _snapshot(ps, seed, vpp)


def _snapshot(ps, seed: int, vpp: int | None) -> ParallelGroups:
    embd = ps.get_embedding_group(check_initialized=False)
    pos_embd = ps.get_position_embedding_group(check_initialized=False)
    return ParallelGroups(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        world=dist.group.WORLD,
        tp=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        cp=ps.get_context_parallel_group(),
        dp=ps.get_data_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
        mp=ps.get_model_parallel_group(),
        tp_cp=ps.get_tensor_and_context_parallel_group(),
        embedding=embd,
        position_embedding=pos_embd,
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        cp_size=ps.get_context_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_cp_size=ps.get_data_parallel_world_size(with_context_parallel=True),
        vpp_size=vpp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_cp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
        cp_global_ranks=tuple(ps.get_context_parallel_global_ranks()),
        pp_global_ranks=tuple(dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())),
        is_first_stage=ps.is_pipeline_first_stage(ignore_virtual=True),
        is_last_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
        seed=seed,
    )


def destroy(process_group: bool = True) -> None:
    """Tear down Megatron model parallelism and, unless told otherwise, torch.distributed.

    Args:
        process_group: also destroy the default torch.distributed group. Pass False to
            re-initialise model parallelism with other sizes in the same processes.
    """
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()
