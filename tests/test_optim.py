"""AMP choice, the grad scaler, the optimizer's parameter groups and learning rates, the DDP wrapper."""

import pytest
import torch
from torch import nn

from engine.optim import build_optimizer, make_scaler, resolve_amp, wrap_ddp
from utils.config import load_config
from utils.dist import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)


class WithLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.report_decoder = nn.Module()
        self.report_decoder.lm = nn.Linear(4, 4)

    def lr_scales(self, lm_scale):
        return {"report_decoder.lm.": lm_scale}


def test_amp_choice():
    assert resolve_amp("auto", "cpu") is None
    assert resolve_amp("fp32", "cpu") is None
    assert resolve_amp("bf16", "cpu") is torch.bfloat16
    assert resolve_amp("fp16", "cuda") is torch.float16
    with pytest.raises(ValueError, match="train.amp"):
        resolve_amp("fp8", "cpu")


def test_scaler_only_for_fp16():
    assert make_scaler(torch.float16, "cpu").is_enabled()
    assert not make_scaler(torch.bfloat16, "cpu").is_enabled()
    assert not make_scaler(None, "cpu").is_enabled()


def test_build_optimizer_groups_lr_and_scale():
    cfg = load_config(None, ["optim.lr=0", "optim.blr=1e-3", "data.batch_size=64", "optim.accum_iter=2",
                             "model.decoder.lr_scale=0.25", "optim.weight_decay=0.1", "train.amp=fp32"])
    optimizer, scaler = build_optimizer(cfg, WithLM(), CPU)
    assert optimizer.defaults["lr"] == pytest.approx(1e-3 * 64 * 2 / 256)  # blr x effective batch / 256
    scales = sorted((g["lr_scale"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups)
    assert scales == [(0.25, 0.0, 1), (0.25, 0.1, 1), (1.0, 0.0, 1), (1.0, 0.1, 1)]
    assert not scaler.is_enabled()


def test_wrap_ddp_is_a_no_op_in_one_process():
    model = WithLM()
    cfg = load_config(None)
    assert wrap_ddp(model, cfg, CPU) is model
