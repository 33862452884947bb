"""Which CPU kernel path this machine runs, and whether the paths give the same bits.

Usage: python tools/kernel_paths.py [--json]

The README's demo figures depend on the float kernels: PyTorch picks its CPU kernels by the CPU's
instruction set (``torch.backends.cpu.get_cpu_capability()``: AVX512 or AVX2 on x86), and a
different path rounds some reductions differently, which a 30-step RL run amplifies into
different sampled tokens. This script runs a small fixed fp32 piece (an embedding, RMS norm, one
causal attention head, SiLU, tied logits, cross-entropy and its backward) in fresh processes under
PyTorch's dispatch switch (``ATEN_CPU_CAPABILITY``) and prints, per path, a hash of the logits and
of the gradients, and whether each path equals this machine's default bit for bit. MKL's switch
(``MKL_CBWR``) is set to AVX2 in every run so that Intel machines' AVX-512 GEMMs do not add a
third path; on AMD CPUs MKL takes its AVX2 code path anyway.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PIECE = r"""
import hashlib, json, torch
torch.manual_seed(0)
d, v, t = 64, 50, 24
W = [(torch.randn(d, d) * 0.1).requires_grad_() for _ in range(4)]
E = (torch.randn(v, d) * 0.1).requires_grad_()
ids = torch.randint(0, v, (t,))
h = E[ids]
h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
q, k, vv = h @ W[0], h @ W[1], h @ W[2]
a = torch.softmax((q @ k.T) / 8 + torch.triu(torch.full((t, t), -1e9), 1), -1) @ vv
h = h + torch.nn.functional.silu(a @ W[3])
logits = h @ E.T
torch.nn.functional.cross_entropy(logits, ids).backward()
grad = torch.cat([w.grad.flatten() for w in W] + [E.grad.flatten()])
digest = lambda x: hashlib.sha256(x.detach().numpy().tobytes()).hexdigest()[:16]
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "logits": digest(logits),
                  "grad": digest(grad)}))
"""

# label -> ATEN_CPU_CAPABILITY (None: the machine's default)
PATHS = {"default": None, "avx2": "avx2", "avx512": "avx512"}


def run_pieces(capabilities, timeout: float = 120.0) -> list:
    """Run the fixed piece once per entry of ``capabilities``, each in a fresh single-threaded process
    under ``ATEN_CPU_CAPABILITY=entry`` (None: unset), all at once; the results in that order."""
    procs = []
    for capability in capabilities:
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MKL_CBWR="AVX2")
        if capability is not None:
            env["ATEN_CPU_CAPABILITY"] = capability
        procs.append(subprocess.Popen([sys.executable, "-c", PIECE], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"kernel piece failed ({proc.returncode}): {err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    args = parser.parse_args(argv)
    results = dict(zip(PATHS, run_pieces(list(PATHS.values()))))
    base = results["default"]
    for r in results.values():
        r["same_bits_as_default"] = r["logits"] == base["logits"] and r["grad"] == base["grad"]
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"this machine's default kernel path: {base['capability']}")
    for label, r in results.items():
        print(f"{label:8s} ran {r['capability']:7s} logits {r['logits']} grad {r['grad']}"
              f"  {'same bits as default' if r['same_bits_as_default'] else 'DIFFERS from default'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
