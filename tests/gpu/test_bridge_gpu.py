"""The bridge with the Transformer Engine layer spec on GPUs (fused-norm parameter names; skipped without CUDA)."""

import pytest
import torch

from tests.dist import test_bridge as B


@pytest.mark.gpu
@pytest.mark.timeout(900)
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 4), reason="needs 4 GPUs")
def test_te_spec_roundtrip_through_layouts(tmp_path):
    pytest.importorskip("transformer_engine")
    B.roundtrip(tmp_path, atol=1e-3)  # fp32 parameters; GPU kernels (TF32 off by default) round differently
