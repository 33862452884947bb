"""The actor layout parity check on GPUs: Transformer Engine spec, NCCL, bf16 (skipped without CUDA).

Same cases as tests/dist/test_actor.py, with the TE layer spec chosen automatically (TE imports
and CUDA is present) and bf16 parameters, so tolerances are those of bf16 arithmetic.
"""

import pytest
import torch

from tests.dist import test_actor as A
from tests.dist.launcher import launch
from tests.helpers import BF16_SETTINGS, check_bf16_layouts, enough_gpus


@pytest.mark.gpu
@pytest.mark.timeout(900)
@pytest.mark.skipif(not enough_gpus(4), reason="needs 4 GPUs")
def test_te_bf16_layouts_match_single_gpu():
    pytest.importorskip("transformer_engine")
    (ref,) = launch(A.run_reference, 1, False, BF16_SETTINGS, timeout=300)
    results = launch(A.run_layouts, 4, ref["initial"], ref["final"], False, BF16_SETTINGS, timeout=600)
    check_bf16_layouts(results, ref, A.LAYOUTS)


@pytest.mark.gpu
@pytest.mark.timeout(900)
@pytest.mark.skipif(not enough_gpus(4), reason="needs 4 GPUs")
def test_te_bf16_checkpoint_resharding(tmp_path):
    pytest.importorskip("transformer_engine")
    from tests.dist import test_actor_checkpoint as C

    (ref,) = launch(C.run_reference, 1, str(tmp_path), BF16_SETTINGS, timeout=300)
    results = launch(C.run_layouts, 4, str(tmp_path), ref[0], BF16_SETTINGS, timeout=600)
    for rank_results in results:
        for layout, (logp, second, _after, extra, steps) in zip(C.LAYOUTS, rank_results):
            assert steps == 2 and extra == {"note": "after one step"}, layout
            for a, b in zip(logp, ref[0]):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=5e-2, msg=str(layout))
            assert second["loss"] == pytest.approx(ref[1]["loss"], rel=5e-2, abs=1e-2), layout
