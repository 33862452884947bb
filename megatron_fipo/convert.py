"""Checkpoint conversion: HF Qwen2 safetensors <-> Megatron distributed checkpoints, streamed.

Owns ``hf_to_mcore`` and ``mcore_to_hf`` (library functions with explicit arguments, each
returning its report; behind ``megatron-fipo convert``, ``tools/convert_*.py`` and the export of
``megatron-fipo eval``), ``print_report`` (the CLI's one JSON line, on rank 0) and the
``verify`` guard.

``hf_to_mcore`` writes a *model-only* checkpoint (``mcore.checkpoint``: weights in the dtype
asked for, default the HF config's ``torch_dtype``; no optimizer, scheduler or RNG state), which
a run starts from with ``model.init_checkpoint`` and which a resume refuses. Neither direction
builds an optimizer or a full-precision copy: the model is built in the output dtype without
random initialisation, HF tensors are read slice by slice (``bridge.hf_import``), the export is
streamed in buckets into safetensors shards written tensor by tensor (``bridge.hf_export``). Peak
memory per rank is about its share of the model in the output dtype plus one bucket.

``verify``: after a conversion, per-token log-probs of the Megatron model loaded back from the
written checkpoint (or the one exported) are compared on random tokens with the HF model's (the
source directory, or the exported one). Both compute in float32 from the same weight values:
both models are rounded to the narrower dtype of the two sides (the one the output was written
in) before computing, so the difference measures the conversion (names, QKV / gate-up layout,
vocab, tied embeddings), never the cast, and one tolerance fits every dtype; the cast itself is
``Tensor.to(dtype)`` and checked bit for bit by the round-trip tests. The HF reference runs on
rank 0 and is freed before the Megatron model is built: ``verify`` adds one float32 copy of the
model (rank 0 holds the full HF one for a moment). The output appears, by a rename, only once it
is written and verified; an existing non-empty output directory is refused, never overwritten.
Error messages name the CLI's flags (``--to-hf``, ``--hf-config``...), which the keyword
arguments mirror.
Composition of ``bridge`` and ``mcore``; no tensor math here.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import warnings

from megatron_fipo.config.conventions import hf_dtype_name, torch_dtype

DEFAULT_VERIFY_TOL = 1e-3


def hf_to_mcore(hf_dir: str, out: str, *, dtype: str | None = None, tp: int = 1, pp: int = 1,
                verify: bool = False, verify_tol: float = DEFAULT_VERIFY_TOL) -> dict:
    """HF directory ``hf_dir`` -> model-only Megatron checkpoint root ``out`` (collective under torchrun).

    The checkpoint holds the weights in ``dtype`` (no optimizer state) and keeps the HF config
    and ``hf_dir`` (for the tokenizer) in its ``extra``. The output is written into a temporary
    sibling ``out.tmp-<nonce>`` and renamed to ``out`` only once it is complete and, with
    ``verify``, verified: a failed conversion or verification leaves no ``out``. ``out`` must not
    exist or be an empty directory.

    Args:
        hf_dir: HF model directory (config.json + *.safetensors).
        out: checkpoint root to write.
        dtype: dtype name of the checkpoint's weights (default: the HF config's ``torch_dtype``,
            else float32).
        tp, pp: tensor / pipeline parallel sizes (the world size must be a multiple of tp * pp).
        verify: compare the written checkpoint's log-probs with ``hf_dir``'s on random tokens.
        verify_tol: max |log-prob difference| for ``verify``.

    Returns:
        ``{"written": abspath(out), "tp": tp, "pp": pp, "dtype": ..., "contents": "model"}``, plus
        ``verify_max_abs_diff`` (this rank's) with ``verify``; on every rank.

    Raises:
        ValueError: ``out`` not empty, a broken HF config, a bad ``dtype``, a failed verification.
    """
    from megatron_fipo.bridge.hf_import import load_hf_into_chunks
    from megatron_fipo.config.hf_model import read_hf_config

    target = _prepare_target(out, "--to-mcore")
    hf_config = read_hf_config(hf_dir)
    name = dtype or hf_dtype_name(hf_config)
    out_dtype = torch_dtype(name)
    with _writing(target, tp, pp) as (groups, tmp):
        model = _weights_only(hf_config, groups, name)
        offsets, spec = model.bridge_layout()
        load_hf_into_chunks(hf_dir, model.named_local_parameters(), model.arch, tp_rank=groups.tp_rank,
                            tp_size=groups.tp_size, padded_vocab=model.padded_vocab, layer_offsets=offsets, spec=spec)
        path = model.save(tmp, extra={"hf_config": hf_config, "hf_source": os.path.abspath(hf_dir)})
        del model
        _release_freed_memory()
        report = _verified(path, hf_config, groups, hf_dir, out_dtype, verify_tol) if verify else {}
    return {"written": target, "tp": tp, "pp": pp, "dtype": name, "contents": "model", **report}


# The --to-hf export bucket: it only batches tensors on their way to disk (each is written as it
# arrives), so a small one costs no write speed and keeps the peak near the model plus its largest
# tensor (the 512 MiB default of ``export_hf_state`` is sized for weight syncs).
EXPORT_BUCKET_BYTES = 64 << 20


def mcore_to_hf(checkpoint: str, out: str, *, hf_config: str | None = None, tokenizer: str | None = None,
                dtype: str | None = None, tp: int = 1, pp: int = 1, verify: bool = False,
                verify_tol: float = DEFAULT_VERIFY_TOL) -> dict:
    """Megatron checkpoint (model-only or training) -> HF directory ``out`` (collective under
    torchrun), published as ``hf_to_mcore``'s.

    Args:
        checkpoint: a run directory, a checkpoint root (its newest intact checkpoint is taken) or
            one ``iter_*`` directory, saved at any tp / pp.
        out: HF model directory to write.
        hf_config: HF config.json (or its directory) when the checkpoint does not carry one.
        tokenizer: copy tokenizer files from here (default: the HF source the checkpoint names).
        dtype: HF tensor dtype name (default: the config's ``torch_dtype``, else float32).
        tp, pp: the layout the conversion runs at (any; the checkpoint is resharded on load).
        verify, verify_tol: as for ``hf_to_mcore`` (``verify`` compares the checkpoint with the export).

    Returns:
        ``{"written": abspath(out), "source": the checkpoint directory read, "tp", "pp": the
        layout it was saved at, "dtype": of the export, "converted_at": {"tp", "pp"}}``, plus
        ``verify_max_abs_diff`` with ``verify``; on every rank.

    Raises:
        ValueError: ``out`` not empty, no intact checkpoint, no HF config, a bad ``dtype``, a
            failed verification.
    """
    import torch.distributed as dist

    from megatron_fipo.bridge.hf_export import drain, export_hf_state, save_hf_checkpoint

    target = _prepare_target(out, "--to-hf")
    config, source, path, layout = _mcore_source(checkpoint, hf_config, tokenizer)
    name = dtype or hf_dtype_name(config)
    round_to = torch_dtype(name)
    with _writing(target, tp, pp) as (groups, tmp):
        model = _weights_only(config, groups, name)
        model.load_weights(path)  # cast to the export dtype on load, tensor by tensor
        offsets, spec = model.bridge_layout()
        buckets = export_hf_state(model.named_local_parameters(), model.arch, groups=groups, layer_offsets=offsets,
                                  dtype=round_to, spec=spec, bucket_bytes=EXPORT_BUCKET_BYTES)
        if groups.rank == 0:
            save_hf_checkpoint(buckets, tmp, config, source if source and os.path.isdir(source) else None)
        else:
            drain(buckets)
        del model, buckets
        _release_freed_memory()
        dist.barrier(group=groups.world)  # the export is on disk before anyone reads it
        report = _verified(path, config, groups, tmp, round_to, verify_tol) if verify else {}
    return {"written": target, "source": path, "tp": layout.get("tp"), "pp": layout.get("pp"), "dtype": name,
            "converted_at": {"tp": tp, "pp": pp}, **report}


def _release_freed_memory() -> None:
    """Collect what is unreachable, then give the freed heap pages back to the OS (glibc
    ``malloc_trim``; a no-op elsewhere): freed tensors (the export's, the HF reference's) stay in the
    heap otherwise, under --verify's float32 models (0.5B peak: --to-hf --verify 4.7 -> 3.4 GB,
    --to-mcore --verify 4.2 -> 3.4 GB)."""
    import ctypes
    import ctypes.util

    gc.collect()

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
def _writing(target: str, tp: int, pp: int):
    """(groups, temporary sibling of ``target``) of a tp x pp world, for the body to write into.

    The sibling is renamed to ``target`` when the body succeeds and removed when it (or the
    rename) fails; the process groups are torn down either way.
    """
    from megatron_fipo.mcore import groups as G

    groups = G.init_distributed(tp=tp, pp=pp)
    try:
        tmp = _tmp_sibling(target, groups)
        try:
            yield groups, tmp
            _publish(tmp, target, groups)
        except BaseException:
            if groups.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # nothing that looks like an output stays
            raise
    finally:
        G.destroy()


def _weights_only(hf_config: dict, groups, dtype: str):
    """This rank's share of the model in ``dtype``, uninitialised, with no optimizer (``Actor(trainable=False)``)."""
    from megatron_fipo.mcore.actor import Actor, ActorSettings
    from megatron_fipo.mcore.model import Qwen2Arch

    return Actor(Qwen2Arch.from_hf(hf_config), groups, ActorSettings(params_dtype=dtype), trainable=False)


def _mcore_source(checkpoint: str, hf_config: str | None, tokenizer: str | None) -> tuple:
    """(HF config, tokenizer source, checkpoint directory, its saved layout) of ``mcore_to_hf``'s arguments."""
    from megatron_fipo.config.hf_presets import read_config_or_preset
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
    meta = read_checkpoint_meta(path)
    extra = meta.get("extra", {})
    config = read_config_or_preset(hf_config) if hf_config else extra.get("hf_config")
    if config is None:
        raise ValueError(f"{path}: no HF config in the checkpoint; pass --hf-config with the model's config.json "
                         "or a known shape such as qwen2.5-7b")
    return config, tokenizer or extra.get("hf_source"), path, meta.get("layout") or {}


def _verified(path: str, hf_config: dict, groups, hf_dir: str, round_to, tol: float) -> dict:
    """Checkpoint ``path`` against HF directory ``hf_dir`` (see the module docstring), on every rank
    (a failure on any rank fails all): the report's entry.

    Rank 0 computes the HF log-probs first and frees that model; then every rank loads its share
    of the checkpoint into a float32 model (no optimizer) and compares."""
    import torch.distributed as dist

    from megatron_fipo.mcore.model import Qwen2Arch

    seqs = random_sequences(Qwen2Arch.from_hf(hf_config).vocab_size)
    reference = [_agreed(lambda: hf_logprobs(hf_dir, seqs, round_to) if groups.rank == 0 else None, groups)]
    dist.broadcast_object_list(reference, src=0, group=groups.world)
    _release_freed_memory()  # the HF model's, before the float32 Megatron model is built
    model = _weights_only(hf_config, groups, "float32")
    model.load_weights(path)
    worst = _agreed(lambda: compare_logprobs(actor_logprobs(model, seqs, round_to), reference[0], tol), groups)
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


def random_sequences(vocab: int, *, num_sequences: int = 2, length: int = 24, seed: int = 0) -> list:
    """``num_sequences`` lists of ``length`` token ids below ``vocab``, the same for a ``seed`` everywhere."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(num_sequences)]


def _round_params_(params, round_to) -> None:
    """Round every parameter to ``round_to`` in place (kept in its own dtype); nothing for float32 / None."""
    import torch

    if round_to is None or round_to == torch.float32:
        return
    with torch.no_grad():
        for param in params:
            param.copy_(param.to(round_to).to(param.dtype))


def hf_logprobs(hf_dir: str, seqs: list, round_to=None) -> list:
    """Per-token log-probs (float32, ``len(seq) - 1`` each) of ``transformers``' model of ``hf_dir``,
    loaded in float32 with its weights rounded to ``round_to``; the model is freed on return."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf.eval()
    _round_params_(hf.parameters(), round_to)
    out = []
    with torch.no_grad():
        for seq in seqs:
            ids = torch.tensor([seq])
            out.append(torch.log_softmax(hf(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0])
    del hf
    gc.collect()
    return out


def actor_logprobs(actor, seqs: list, round_to=None) -> list:
    """The actor's per-token log-probs of ``seqs`` (collective), its parameters first rounded to
    ``round_to`` *in place*: use the actor for nothing else afterwards."""
    _round_params_((p for _, p in actor.named_local_parameters()), round_to)
    return actor.compute_logprobs([s[:1] for s in seqs], [s[1:] for s in seqs])


def compare_logprobs(ours: list, reference: list, tol: float) -> float:
    """Max |difference| of two lists of log-prob tensors; ValueError (``--verify failed``) past ``tol``."""
    worst = max(float((a.float() - b.float()).abs().max()) for a, b in zip(ours, reference))
    if worst > tol:
        raise ValueError(f"--verify failed: Megatron and HF log-probs differ by up to {worst:.3g} (> {tol}); "
                         "the conversion is broken (check the mapping, vocab padding and tied embeddings)")
    return worst


def verify_against_hf(actor, hf_dir: str, *, tol: float, num_sequences: int = 2, length: int = 24,
                      seed: int = 0, round_to=None) -> float:
    """Max |log-prob difference| between the actor and ``transformers`` on random tokens.

    Every rank runs the actor (collective) and loads the HF model in float32 to compare. Both
    compute in float32 from the same weight values: with ``round_to`` (the dtype the narrower side
    was written in, e.g. ``torch.bfloat16``) both models' parameters are first rounded to it *in
    place*, so the difference measures the conversion, never the cast, and one ``tol`` fits every
    dtype. Use the actor for nothing else afterwards. (``convert`` runs the two sides one after
    the other instead, so their models never coexist.)

    Raises:
        ValueError: the difference exceeds ``tol``.
    """
    seqs = random_sequences(actor.arch.vocab_size, num_sequences=num_sequences, length=length, seed=seed)
    ours = actor_logprobs(actor, seqs, round_to)
    return compare_logprobs(ours, hf_logprobs(hf_dir, seqs, round_to), tol)
