"""Checkpoint conversion: HF Qwen2 safetensors <-> Megatron distributed checkpoints.

Owns ``hf_to_mcore`` and ``mcore_to_hf`` (library functions with explicit arguments, each
returning its report; behind ``megatron-fipo convert``, ``tools/convert_*.py`` and the export of
``megatron-fipo eval``), ``print_report`` (the CLI's one JSON line, on rank 0) and the
``verify`` guard: after a conversion, per-token log-probs of the Megatron model on random tokens
are compared with the HF model's (the source directory, or the exported one), so a conversion
that "succeeds" but breaks the model fails loudly. Both sides compute in float32 from the same
weight values (an export in bfloat16 / float16 is compared with the Megatron model rounded to
that dtype), so one tolerance fits every dtype. The output appears, by a rename, only once it is
written and verified; an existing non-empty output directory is refused, never overwritten.
Error messages name the CLI's flags (``--to-hf``, ``--hf-config``...), which the keyword
arguments mirror.
Composition of ``bridge`` and ``mcore``; no tensor math here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings

from megatron_fipo.config.conventions import hf_dtype_name, torch_dtype

DEFAULT_VERIFY_TOL = 1e-3


def hf_to_mcore(hf_dir: str, out: str, *, tp: int = 1, pp: int = 1, verify: bool = False,
                verify_tol: float = DEFAULT_VERIFY_TOL) -> dict:
    """HF directory ``hf_dir`` -> Megatron checkpoint root ``out`` (collective under torchrun).

    The checkpoint keeps the HF config and ``hf_dir`` (for the tokenizer) in its ``extra``. The
    output is written into a temporary sibling ``out.tmp-<nonce>`` and renamed to ``out`` only
    once it is complete and, with ``verify``, verified: a failed conversion or verification
    leaves no ``out``. ``out`` must not exist or be an empty directory.

    Args:
        hf_dir: HF model directory (config.json + *.safetensors).
        out: checkpoint root to write.
        tp, pp: tensor / pipeline parallel sizes (the world size must be a multiple of tp * pp).
        verify: compare the Megatron model's log-probs with ``hf_dir``'s on random tokens.
        verify_tol: max |log-prob difference| for ``verify``.

    Returns:
        ``{"written": abspath(out), "tp": tp, "pp": pp}``, plus ``verify_max_abs_diff`` (this
        rank's) with ``verify``; on every rank.

    Raises:
        ValueError: ``out`` not empty, a broken HF config, a failed verification.
    """
    from megatron_fipo.bridge.hf_import import load_hf_into_chunks
    from megatron_fipo.config.hf_model import read_hf_config

    target = _prepare_target(out, "--to-mcore")
    hf_config = read_hf_config(hf_dir)
    with _writing(target, hf_config, tp, pp) as (actor, groups, tmp):
        offsets, spec = actor.bridge_layout()
        load_hf_into_chunks(hf_dir, actor.named_local_parameters(), actor.arch, tp_rank=groups.tp_rank,
                            tp_size=groups.tp_size, padded_vocab=actor.padded_vocab, layer_offsets=offsets, spec=spec)
        actor.save(tmp, extra={"hf_config": hf_config, "hf_source": os.path.abspath(hf_dir)})
        report = _verified(actor, groups, hf_dir, None, verify_tol) if verify else {}
    return {"written": target, "tp": tp, "pp": pp, **report}


def mcore_to_hf(checkpoint: str, out: str, *, hf_config: str | None = None, tokenizer: str | None = None,
                dtype: str | None = None, tp: int = 1, pp: int = 1, verify: bool = False,
                verify_tol: float = DEFAULT_VERIFY_TOL) -> dict:
    """Megatron checkpoint -> HF directory ``out`` (collective under torchrun), published as ``hf_to_mcore``'s.

    Args:
        checkpoint: a run directory, a checkpoint root (its newest intact checkpoint is taken) or
            one ``iter_*`` directory, saved at any tp / pp.
        out: HF model directory to write.
        hf_config: HF config.json (or its directory) when the checkpoint does not carry one.
        tokenizer: copy tokenizer files from here (default: the HF source the checkpoint names).
        dtype: HF tensor dtype name (default: the config's ``torch_dtype``, else float32).
        tp, pp, verify, verify_tol: as for ``hf_to_mcore`` (``verify`` compares with the export).

    Returns:
        as ``hf_to_mcore``.

    Raises:
        ValueError: ``out`` not empty, no intact checkpoint, no HF config, a bad ``dtype``, a
            failed verification.
    """
    import torch.distributed as dist

    from megatron_fipo.bridge.hf_export import drain, export_hf_state, save_hf_checkpoint

    target = _prepare_target(out, "--to-hf")
    config, source, path = _mcore_source(checkpoint, hf_config, tokenizer)
    with _writing(target, config, tp, pp) as (actor, groups, tmp):
        offsets, spec = actor.bridge_layout()
        actor.load(path, load_optimizer=False)
        round_to = torch_dtype(dtype or hf_dtype_name(config))
        buckets = export_hf_state(actor.named_local_parameters(), actor.arch, groups=groups, layer_offsets=offsets,
                                  dtype=round_to, spec=spec)
        if groups.rank == 0:
            save_hf_checkpoint(buckets, tmp, config, source if source and os.path.isdir(source) else None)
        else:
            drain(buckets)
        dist.barrier(group=groups.world)  # the export is on disk before anyone reads it
        report = _verified(actor, groups, tmp, round_to, verify_tol) if verify else {}
    return {"written": target, "tp": tp, "pp": pp, **report}


def print_report(report: dict) -> None:
    """Rank 0 (torchrun's ``RANK``; a lone process is rank 0) prints ``report`` as one JSON line."""
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(report))


def _prepare_target(out: str, flag: str) -> str:
    """``abspath(out)``, checked (``flag`` names it in the error); sets up a one-process world if not under torchrun."""
    from megatron_fipo.mcore.groups import single_process_env

    target = os.path.abspath(out)
    _check_target(target, flag)
    single_process_env()
    return target


@contextlib.contextmanager
def _writing(target: str, hf_config: dict, tp: int, pp: int):
    """(actor, groups, temporary sibling of ``target``) of a tp x pp world, for the body to write into.

    The sibling is renamed to ``target`` when the body succeeds and removed when it (or the
    rename) fails; the process groups are torn down either way.
    """
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor
    from megatron_fipo.mcore.model import Qwen2Arch

    arch = Qwen2Arch.from_hf(hf_config)
    groups = G.init_distributed(tp=tp, pp=pp)
    try:
        tmp = _tmp_sibling(target, groups)
        try:
            yield Actor(arch, groups), groups, tmp
            _publish(tmp, target, groups)
        except BaseException:
            if groups.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # nothing that looks like an output stays
            raise
    finally:
        G.destroy()


def _mcore_source(checkpoint: str, hf_config: str | None, tokenizer: str | None) -> tuple:
    """(HF config, tokenizer source, checkpoint directory) of ``mcore_to_hf``'s arguments."""
    from megatron_fipo.config.hf_model import read_hf_config
    from megatron_fipo.mcore.checkpoint import checkpoint_problem, read_checkpoint_meta, resolve_checkpoint, \
        resume_candidates

    kind, path = resolve_checkpoint(checkpoint)
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
    config = read_hf_config(hf_config) if hf_config else extra.get("hf_config")
    if config is None:
        raise ValueError(f"{path}: no HF config in the checkpoint; pass --hf-config DIR")
    return config, tokenizer or extra.get("hf_source"), path


def _verified(actor, groups, hf_dir: str, round_to, tol: float) -> dict:
    """``verify_against_hf`` on every rank (a failure on any rank fails all): the report's entry."""
    worst = _agreed(lambda: verify_against_hf(actor, hf_dir, tol=tol, round_to=round_to), groups)
    return {"verify_max_abs_diff": worst}


def _check_target(path: str, flag: str) -> None:
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise ValueError(f"{flag} {path} already exists and is not empty; convert never overwrites a model or "
                         "checkpoint: remove it or choose a new directory")


def _tmp_sibling(target: str, groups) -> str:
    """``target.tmp-<nonce>`` (rank 0's nonce, on every rank), created by rank 0."""
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
