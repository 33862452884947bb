"""Checkpoint conversion: HF Qwen2 safetensors <-> Megatron distributed checkpoints.

Owns ``convert`` (behind ``megatron-fipo convert`` and ``tools/convert_*.py``) and the ``--verify``
guard: after a conversion, per-token log-probs of the Megatron model on random tokens are compared
with the HF model's (the source directory, or the exported one), so a conversion that "succeeds"
but breaks the model fails loudly. Both sides compute in float32 from the same weight values (an
export in bfloat16 / float16 is compared with the Megatron model rounded to that dtype), so one
tolerance fits every dtype. The output appears, by a rename, only once it is written and verified;
an existing non-empty output directory is refused, never overwritten.
Composition of ``bridge`` and ``mcore``; no tensor math here.
"""

from __future__ import annotations

import json
import shutil
import warnings

from megatron_fipo.conventions import hf_dtype_name, torch_dtype


def convert(args) -> int:
    """HF directory -> Megatron checkpoint root, or Megatron checkpoint -> HF directory.

    The Megatron checkpoint keeps the HF config (and source directory, for the tokenizer) in its
    ``extra``; checkpoints saved elsewhere need ``--hf-config``. Collective under torchrun.

    The output is written into a temporary sibling ``OUT.tmp-<nonce>`` and renamed to ``OUT``
    only once it is complete and, with ``--verify``, verified: a failed conversion or
    verification leaves no ``OUT``. ``OUT`` must not exist or be an empty directory (an existing
    model or checkpoint is never overwritten; remove it first).
    """
    import os

    if bool(args.from_hf) == bool(args.from_mcore) or bool(args.to_mcore) != bool(args.from_hf) \
            or bool(args.to_hf) != bool(args.from_mcore):
        raise ValueError("use either --from-hf DIR --to-mcore DIR or --from-mcore DIR --to-hf DIR")
    target = os.path.abspath(args.to_mcore or args.to_hf)
    _check_target(target, "--to-mcore" if args.to_mcore else "--to-hf")
    from megatron_fipo.mcore.groups import single_process_env

    single_process_env()
    from megatron_fipo.hf_config import read_hf_config
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.model import Qwen2Arch

    if args.from_hf:
        hf_config, source, path = read_hf_config(args.from_hf), os.path.abspath(args.from_hf), None
    else:
        hf_config, source, path = _mcore_source(args)
    arch = Qwen2Arch.from_hf(hf_config)
    groups = G.init_distributed(tp=args.tp, pp=args.pp)
    try:
        tmp = _tmp_sibling(target, groups)
        try:
            report = _write(args, arch, groups, hf_config, source, path, tmp)
            _publish(tmp, target, groups)
        except BaseException:
            if groups.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # nothing that looks like an output stays
            raise
    finally:
        G.destroy()
    if groups.rank == 0:
        print(json.dumps({"written": target, "tp": args.tp, "pp": args.pp, **report}))
    return 0


def _mcore_source(args) -> tuple:
    """(hf_config, tokenizer source, checkpoint directory) of ``--from-mcore``."""
    import os

    from megatron_fipo.hf_config import read_hf_config
    from megatron_fipo.mcore.checkpoint import checkpoint_problem, read_checkpoint_meta, resolve_checkpoint, \
        resume_candidates

    kind, path = resolve_checkpoint(args.from_mcore)
    if kind == "root":  # the newest intact one (same-size damage still fails its load, loudly)
        problems = []
        for candidate in resume_candidates(path):
            problem = checkpoint_problem(candidate)
            if problem is None:
                path = candidate
                break
            warnings.warn(f"checkpoint {candidate} is damaged and skipped: {problem}", stacklevel=2)
            problems.append(f"{os.path.basename(candidate)} ({problem})")
        else:
            raise ValueError(f"no intact checkpoint under {path}: {'; '.join(problems)}")
    extra = read_checkpoint_meta(path).get("extra", {})
    hf_config = read_hf_config(args.hf_config) if args.hf_config else extra.get("hf_config")
    if hf_config is None:
        raise ValueError(f"{path}: no HF config in the checkpoint; pass --hf-config DIR")
    return hf_config, args.tokenizer or extra.get("hf_source"), path


def _write(args, arch, groups, hf_config: dict, source, path, out: str) -> dict:
    """Convert into ``out`` (and verify it); returns the report."""
    import os

    import torch
    import torch.distributed as dist

    from megatron_fipo.bridge.hf_export import drain, export_hf_state, save_hf_checkpoint
    from megatron_fipo.bridge.hf_import import load_hf_into_chunks
    from megatron_fipo.mcore.actor import Actor

    actor = Actor(arch, groups)
    offsets, spec = actor.bridge_layout()
    if args.from_hf:
        load_hf_into_chunks(args.from_hf, actor.named_local_parameters(), arch, tp_rank=groups.tp_rank,
                            tp_size=groups.tp_size, padded_vocab=actor.padded_vocab, layer_offsets=offsets, spec=spec)
        actor.save(out, extra={"hf_config": hf_config, "hf_source": source})
        verify = (args.from_hf, None)
    else:
        actor.load(path, load_optimizer=False)
        dtype = torch_dtype(args.dtype or hf_dtype_name(hf_config))
        buckets = export_hf_state(actor.named_local_parameters(), arch, groups=groups, layer_offsets=offsets,
                                  dtype=dtype, spec=spec)
        if groups.rank == 0:
            save_hf_checkpoint(buckets, out, hf_config, source if source and os.path.isdir(source) else None)
        else:
            drain(buckets)
        dist.barrier(group=groups.world)  # the export is on disk before anyone reads it
        verify = (out, dtype)
    if not args.verify:
        return {}
    worst = _agreed(lambda: verify_against_hf(actor, verify[0], tol=args.verify_tol, round_to=verify[1]), groups)
    return {"verify_max_abs_diff": worst}


def _check_target(path: str, flag: str) -> None:
    import os

    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise ValueError(f"{flag} {path} already exists and is not empty; convert never overwrites a model or "
                         "checkpoint: remove it or choose a new directory")


def _tmp_sibling(target: str, groups) -> str:
    """``target.tmp-<nonce>`` (rank 0's nonce, on every rank), created by rank 0."""
    import os
    import uuid

    import torch.distributed as dist

    nonce = [uuid.uuid4().hex[:12]]
    dist.broadcast_object_list(nonce, src=0, group=groups.world)
    tmp = f"{target}.tmp-{nonce[0]}"
    if groups.rank == 0:
        os.makedirs(tmp)
    dist.barrier(group=groups.world)
    return tmp


def _publish(tmp: str, target: str, groups) -> None:
    """Rank 0 renames the finished ``tmp`` to ``target`` (replacing an empty directory) once every
    rank is done with it; every rank raises if that failed."""
    import os

    import torch.distributed as dist

    dist.barrier(group=groups.world)
    _agreed(lambda: os.rename(tmp, target) if groups.rank == 0 else None, groups)


def _agreed(fn, groups):
    """``fn()`` on every rank; a ValueError / OSError on any rank is raised on all of them."""
    import torch.distributed as dist

    result, error = None, None
    try:
        result = fn()
    except (ValueError, OSError) as err:
        error = f"{type(err).__name__}: {err}" if isinstance(err, OSError) else str(err)
    errors = [None] * groups.world_size
    dist.all_gather_object(errors, error, group=groups.world)
    failed = [e for e in errors if e is not None]
    if failed:
        raise ValueError(failed[0])
    return result




def verify_against_hf(actor, hf_dir: str, *, tol: float, num_sequences: int = 2, length: int = 24,
                      seed: int = 0, round_to=None) -> float:
    """Max |log-prob difference| between the actor and ``transformers`` on random tokens.

    Every rank runs the actor (collective) and loads the HF model in float32 (cheap for the
    models converted on CPU) to compare. Both compute in float32 from the same weight values:
    with ``round_to`` (the dtype the HF files were written in, e.g. ``torch.bfloat16``) the
    actor's parameters are first rounded to it *in place* (the HF loader upcasts those files
    exactly), so the difference measures the conversion (names, QKV / gate-up layout, vocab,
    tied embeddings), never the cast, and one ``tol`` fits every dtype. The cast itself is
    ``Tensor.to(dtype)`` on both sides. Use the actor for nothing else afterwards.

    Raises:
        ValueError: the difference exceeds ``tol``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if round_to is not None and round_to != torch.float32:
        with torch.no_grad():
            for _, param in actor.named_local_parameters():
                param.copy_(param.to(round_to).to(param.dtype))
    gen = torch.Generator().manual_seed(seed)
    vocab = actor.arch.vocab_size
    seqs = [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(num_sequences)]
    ours = actor.compute_logprobs([s[:1] for s in seqs], [s[1:] for s in seqs])
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf.eval()
    worst = 0.0
    with torch.no_grad():
        for seq, mine in zip(seqs, ours):
            ids = torch.tensor([seq])
            logp = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            worst = max(worst, float((logp - mine).abs().max()))
    if worst > tol:
        raise ValueError(f"--verify failed: Megatron and HF log-probs differ by up to {worst:.3g} (> {tol}); "
                         "the conversion is broken (check the mapping, vocab padding and tied embeddings)")
    return worst
