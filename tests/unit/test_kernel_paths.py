"""tools/kernel_paths.py: PyTorch's dispatch switch takes effect, each path is deterministic, and
on an AVX-512 machine the AVX2 path rounds differently (why the README states figures per path)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import kernel_paths as K  # noqa: E402


def test_switch_takes_effect_and_each_path_is_deterministic():
    default, avx2, again = K.run_pieces([None, "avx2", "avx2"])
    assert avx2["capability"] == "AVX2"  # a user forcing AVX2 gets it, whatever this CPU has
    assert again == avx2  # same path, another fresh process: the same bits
    if default["capability"] == "AVX2":  # an AVX2-only CPU: the forced path is the default one
        assert avx2 == default
        return
    assert default["capability"] == "AVX512"
    # The AVX2 kernels give other bits here: the demo's figures differ between the two paths.
    assert (avx2["logits"], avx2["grad"]) != (default["logits"], default["grad"])
