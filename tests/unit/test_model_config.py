"""The Megatron TransformerConfig built for Qwen2 (mcore/model.py): what depends on the machine."""
import torch
from megatron_fipo.mcore import model as M
from tests.helpers import ACTOR_HF

def test_fused_softmax_only_with_its_kernels(monkeypatch):
    """On a GPU without apex's compiled softmax kernels (a stock PyTorch image) the local spec must not ask for
    the fused softmax, which would import them; with the kernels it does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    arch = M.Qwen2Arch.from_hf(ACTOR_HF)
    monkeypatch.setattr(M, "_fused_softmax_kernels", lambda: False)
    assert M.transformer_config(arch, params_dtype=torch.bfloat16).masked_softmax_fusion is False
    monkeypatch.setattr(M, "_fused_softmax_kernels", lambda: True)
    assert M.transformer_config(arch, params_dtype=torch.bfloat16).masked_softmax_fusion is True
