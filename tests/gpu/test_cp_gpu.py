"""Context parallelism on GPUs: Transformer Engine's CP attention (p2p ring, THD) against one GPU.

Same cases as tests/dist/test_cp_actor.py ((dp, cp) = (4, 1), (2, 2), (1, 4), tp x cp, SP x cp,
pp x cp) with the TE layer spec chosen automatically and bf16 parameters, so tolerances are those
of bf16 arithmetic; then the local spec's ``AllGatherCPAttention`` on CUDA / NCCL (``model.use_te``
false), which must agree with TE's. Skipped without 4 GPUs and Transformer Engine.
"""

import pytest
import torch

from tests.dist import test_cp_actor as C
from tests.dist.launcher import launch

BF16 = {"params_dtype": "bfloat16"}


def _enough_gpus(n):
    return torch.cuda.is_available() and torch.cuda.device_count() >= n


def _check(results, ref):
    for rank_results in results:
        for layout, got in zip(C.LAYOUTS, rank_results):
            for a, b in zip(got["logp"], ref["logp"]):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=5e-2, msg=str(layout))
            for s, r in zip(got["steps"], ref["steps"]):
                assert s["loss"] == pytest.approx(r["loss"], rel=5e-2, abs=1e-2), layout
                assert s["grad_norm"] == pytest.approx(r["grad_norm"], rel=5e-2), layout
                assert s["kept_tokens"] == r["kept_tokens"], layout


@pytest.mark.gpu
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not _enough_gpus(4), reason="needs 4 GPUs")
def test_te_cp_attention_matches_single_gpu():
    pytest.importorskip("transformer_engine")
    (ref,) = launch(C._reference, 1, BF16, timeout=300)
    _check(launch(C._layouts, 4, ref["initial"], ref["final"], BF16, timeout=900), ref)


@pytest.mark.gpu
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not _enough_gpus(4), reason="needs 4 GPUs")
def test_local_spec_cp_attention_on_cuda_matches_single_gpu():
    """GPUs without TE: the all-gather CP attention of the local spec on NCCL."""
    (ref,) = launch(C._reference, 1, BF16, timeout=300)
    local = dict(BF16, use_te=False)
    _check(launch(C._layouts, 4, ref["initial"], ref["final"], local, timeout=900), ref)
