"""Context parallelism on GPUs: Transformer Engine's CP attention (p2p ring, THD) against one GPU.

Same cases as tests/dist/test_cp_actor.py ((dp, cp) = (4, 1), (2, 2), (1, 4), tp x cp, SP x cp,
pp x cp) with the TE layer spec chosen automatically and bf16 parameters, so tolerances are those
of bf16 arithmetic; then the local spec's ``AllGatherCPAttention`` on CUDA / NCCL (``model.use_te``
false), which must agree with TE's. Skipped without 4 GPUs and Transformer Engine.
"""

import pytest

from tests.dist import test_cp_actor as C
from tests.dist.launcher import launch
from tests.helpers import BF16_SETTINGS, check_bf16_layouts, enough_gpus


@pytest.mark.gpu
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not enough_gpus(4), reason="needs 4 GPUs")
def test_te_cp_attention_matches_single_gpu():
    pytest.importorskip("transformer_engine")
    (ref,) = launch(C.run_reference, 1, BF16_SETTINGS, timeout=300)
    results = launch(C.run_layouts, 4, ref["initial"], ref["final"], BF16_SETTINGS, timeout=900)
    check_bf16_layouts(results, ref, C.LAYOUTS)


@pytest.mark.gpu
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not enough_gpus(4), reason="needs 4 GPUs")
def test_local_spec_cp_attention_on_cuda_matches_single_gpu():
    """GPUs without TE: the all-gather CP attention of the local spec on NCCL."""
    (ref,) = launch(C.run_reference, 1, BF16_SETTINGS, timeout=300)
    local = dict(BF16_SETTINGS, use_te=False)
    check_bf16_layouts(launch(C.run_layouts, 4, ref["initial"], ref["final"], local, timeout=900), ref, C.LAYOUTS)
