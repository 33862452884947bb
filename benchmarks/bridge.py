"""Benchmark: Megatron -> HF export throughput (``bridge.hf_export.export_hf_state``) vs a memcpy.

Run::

    python benchmarks/bridge.py [--layers 24] [--dtype float32|bfloat16] [--bucket-mb 512]
                                [--repeats 3] [--json out.json] [--quick]

One process, tp = pp = 1 (no collectives: what is measured is the conversion itself: QKV and
gate/up splits, vocab trimming, the cast and bucketing). The parameters are plain tensors named
and shaped like Megatron's local spec for Qwen2.5-0.5B (hidden 896, 14 heads, 2 kv heads,
ffn 4864, vocab 151936 padded to 152576; ``--layers`` scales the depth, ``--quick`` shrinks it to
2 layers and vocab 32000). The floor is ``dst.copy_(src)`` of every parameter into preallocated
tensors of the target dtype: the same bytes read and written once. The export streams into one
bucket buffer kept across calls (``reuse_buffer=buffer``, the weight-sync path); ``alloc+copy`` also allocates
each destination (``p.to(dtype, copy=True)``), as the export must (fresh pages: first-touch page
faults dominate on CPU). Figures: GB/s of HF bytes
produced, median over repeats (``time.perf_counter``); they are reported, not asserted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch

from megatron_fipo.bridge import qwen2_mapping as M
from megatron_fipo.bridge.hf_export import export_hf_state

SINGLE = SimpleNamespace(tp=None, pp=None, tp_size=1, pp_size=1, tp_rank=0, pp_rank=0, pp_global_ranks=(0,))


def qwen_arch(layers: int, vocab: int) -> SimpleNamespace:
    return SimpleNamespace(hidden_size=896, num_layers=layers, num_heads=14, num_kv_heads=2, head_dim=64,
                           ffn_hidden_size=4864, vocab_size=vocab, tie_word_embeddings=True)


def local_params(arch, padded: int) -> list:
    """Random (tp=1) Megatron-named parameters of ``arch``."""
    named = []
    for entry in M.QWEN2_TABLE:
        if entry is M.OUTPUT_LAYER and arch.tie_word_embeddings:
            continue
        for layer in range(arch.num_layers) if entry.per_layer else [None]:
            parts = [torch.empty(s) for s in M.hf_shapes(entry, arch)]
            named.append((entry.mcore.format(layer=layer), M.assemble_local(entry, parts, arch, padded, 1).normal_()))
    return named


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--bucket-mb", type=float, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    arch = qwen_arch(2 if args.quick else args.layers, 32000 if args.quick else 151936)
    padded = -(-arch.vocab_size // 1024) * 1024
    named, dtype = local_params(arch, padded), getattr(torch, args.dtype)
    hf_bytes = sum(t.numel() for b in export_hf_state(named, arch, groups=SINGLE, layer_offsets=[0], dtype=dtype)
                   for _, t in b) * dtype.itemsize
    dst = [torch.empty(p.shape, dtype=dtype) for _, p in named]
    bucket_bytes = int(args.bucket_mb * 2**20)
    buffer = torch.empty(bucket_bytes // dtype.itemsize, dtype=dtype)  # kept across syncs, like dst

    def export():
        for bucket in export_hf_state(named, arch, groups=SINGLE, layer_offsets=[0], dtype=dtype,
                                      bucket_bytes=bucket_bytes, reuse_buffer=buffer):
            del bucket

    def memcpy():
        for d, (_, p) in zip(dst, named):
            d.copy_(p)

    def alloc_copy():
        for _, p in named:
            p.to(dtype=dtype, copy=True)

    t_export, t_copy = _median_time(export, args.repeats), _median_time(memcpy, args.repeats)
    t_alloc = _median_time(alloc_copy, args.repeats)
    result = dict(layers=arch.num_layers, vocab=arch.vocab_size, dtype=args.dtype, hf_bytes=hf_bytes,
                  threads=torch.get_num_threads(), export_s=t_export, memcpy_s=t_copy,
                  alloc_copy_s=t_alloc, export_gbps=hf_bytes / t_export / 1e9, memcpy_gbps=hf_bytes / t_copy / 1e9,
                  alloc_copy_gbps=hf_bytes / t_alloc / 1e9, slowdown=t_export / t_copy)
    print(f"Summary: {hf_bytes / 1e9:.3f} GB of HF {args.dtype} tensors ({arch.num_layers} layers), "
          f"export {result['export_gbps']:.2f} GB/s, memcpy {result['memcpy_gbps']:.2f} GB/s, "
          f"alloc+copy {result['alloc_copy_gbps']:.2f} GB/s, "
          f"export / memcpy time {result['slowdown']:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
