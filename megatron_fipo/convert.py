"""Checkpoint conversion: HF Qwen2 safetensors <-> Megatron distributed checkpoints.

Owns ``convert`` (behind ``megatron-fipo convert`` and ``tools/convert_*.py``) and the ``--verify``
guard: after a conversion, per-token log-probs of the Megatron model on random tokens are compared
with the HF model's (the source directory, or the exported one), so a conversion that "succeeds"
but breaks the model fails loudly. Composition of ``bridge`` and ``mcore``; no tensor math here.
"""

from __future__ import annotations

import json


def convert(args) -> int:
    """HF directory -> Megatron checkpoint root, or Megatron checkpoint -> HF directory.

    The Megatron checkpoint keeps the HF config (and source directory, for the tokenizer) in its
    ``extra``; checkpoints saved elsewhere need ``--hf-config``. Collective under torchrun.
    """
    import os

    if bool(args.from_hf) == bool(args.from_mcore) or bool(args.to_mcore) != bool(args.from_hf) \
            or bool(args.to_hf) != bool(args.from_mcore):
        raise ValueError("use either --from-hf DIR --to-mcore DIR or --from-mcore DIR --to-hf DIR")
    from megatron_fipo.mcore.groups import single_process_env

    single_process_env()
    from megatron_fipo.bridge.hf_export import export_hf_state, save_hf_checkpoint
    from megatron_fipo.bridge.hf_import import load_hf_into_chunks
    from megatron_fipo.hf_config import read_hf_config
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor
    from megatron_fipo.mcore.checkpoint import latest_checkpoint, read_checkpoint_meta
    from megatron_fipo.mcore.model import Qwen2Arch

    if args.from_hf:
        hf_config, source = read_hf_config(args.from_hf), os.path.abspath(args.from_hf)
    else:
        path = latest_checkpoint(args.from_mcore) or args.from_mcore
        extra = read_checkpoint_meta(path).get("extra", {})
        hf_config = read_hf_config(args.hf_config) if args.hf_config else extra.get("hf_config")
        if hf_config is None:
            raise ValueError(f"{path}: no HF config in the checkpoint; pass --hf-config DIR")
        source = args.tokenizer or extra.get("hf_source")
    arch = Qwen2Arch.from_hf(hf_config)
    groups = G.init_distributed(tp=args.tp, pp=args.pp)
    report: dict = {}
    try:
        actor = Actor(arch, groups)
        offsets = [c.module.decoder.layers[0].layer_number - 1 for c in actor.chunks]
        spec = "te" if actor.use_te else "mcore"  # parameter names of the layer spec in use
        if args.from_hf:
            load_hf_into_chunks(args.from_hf, actor.named_local_parameters(), arch, tp_rank=groups.tp_rank,
                                tp_size=groups.tp_size, padded_vocab=actor.padded_vocab, layer_offsets=offsets,
                                spec=spec)
            out = actor.save(args.to_mcore, extra={"hf_config": hf_config, "hf_source": source})
            if args.verify:
                report["verify_max_abs_diff"] = verify_against_hf(actor, args.from_hf, tol=args.verify_tol)
        else:
            import torch

            actor.load(path, load_optimizer=False)
            dtype = getattr(torch, args.dtype or hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")
            buckets = export_hf_state(actor.named_local_parameters(), arch, groups=groups, layer_offsets=offsets,
                                      dtype=dtype, spec=spec)
            if groups.rank == 0:
                save_hf_checkpoint(buckets, args.to_hf, hf_config, source if source and os.path.isdir(source) else None)
            else:
                for _ in buckets:  # the other ranks take part in the collectives
                    pass
            out = args.to_hf
            if args.verify:
                import torch.distributed as dist

                dist.barrier()  # the export is on disk before anyone reads it
                report["verify_max_abs_diff"] = verify_against_hf(actor, args.to_hf, tol=args.verify_tol)
    finally:
        G.destroy()
    if groups.rank == 0:
        print(json.dumps({"written": out, "tp": args.tp, "pp": args.pp, **report}))
    return 0






def verify_against_hf(actor, hf_dir: str, *, tol: float, num_sequences: int = 2, length: int = 24,
                      seed: int = 0) -> float:
    """Max |log-prob difference| between the actor and ``transformers`` on random tokens.

    Every rank runs the actor (collective); rank 0 (and any rank, cheaply, for a tiny model) loads
    the HF model in float32 and compares. Raises ValueError past ``tol``.
    """
    import torch
    from transformers import AutoModelForCausalLM

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
