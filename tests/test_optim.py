"""AMP choice, the grad scaler and the optimizer's parameter groups and learning rates."""
import pytest
import torch

from engine.optim import resolve_amp


def test_amp_choice():
    assert resolve_amp("auto", "cpu") is None
    assert resolve_amp("fp32", "cpu") is None
    assert resolve_amp("bf16", "cpu") is torch.bfloat16
    assert resolve_amp("fp16", "cuda") is torch.float16
    with pytest.raises(ValueError):
        resolve_amp("fp8", "cpu")
