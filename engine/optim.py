"""What a training run optimises with: AdamW over the parameter groups, mixed precision (autocast
dtype and grad scaler), and the DDP wrapper."""

from __future__ import annotations

import contextlib

import torch

from utils import lr_sched

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_amp(amp: str | torch.dtype | None, device) -> torch.dtype | None:
    """cfg.train.amp -> autocast dtype, None for fp32. auto: bf16 on a GPU that has it, else fp16;
    fp32 on CPU."""
    if amp is None or isinstance(amp, torch.dtype):
        return amp
    device = torch.device(device)
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp not in AMP_DTYPES:
        raise ValueError(f"train.amp must be auto|bf16|fp16|fp32, got {amp!r}")
    return AMP_DTYPES[amp]


def autocast(device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_scaler(dtype: torch.dtype | None, device) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=dtype == torch.float16)


def build_optimizer(cfg, model, info) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """AdamW over lr_sched.param_groups (no decay on norms/biases/tokens; the model's lr scales) and
    the grad scaler of cfg.train.amp. Prints the effective batch and lr."""
    groups = lr_sched.param_groups(
        model, cfg.optim.weight_decay, model.lr_scales(cfg.model.decoder.lr_scale)
    )
    lr = lr_sched.effective_lr(cfg, info.world_size)
    eff = cfg.data.batch_size * cfg.optim.accum_iter * info.world_size
    derived = f" (blr {cfg.optim.blr:.3e} x {eff}/256)" if cfg.optim.lr <= 0 else ""
    print(f"effective batch {eff} = {cfg.data.batch_size} x accum {cfg.optim.accum_iter} x "
          f"{info.world_size} ranks; lr {lr:.3e}{derived}")
    optimizer = torch.optim.AdamW(
        groups, lr=lr, betas=tuple(cfg.optim.betas), fused=info.device.type == "cuda"
    )
    dtype = resolve_amp(cfg.train.amp, info.device)
    print(f"precision: {dtype or torch.float32}")
    return optimizer, make_scaler(dtype, info.device)


def wrap_ddp(model, cfg, info):
    """DDP when launched by torchrun (device_ids only on CUDA), then torch.compile if asked."""
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=cfg.dist.find_unused_parameters,
            # no running statistics in this model: its buffers are constants
            broadcast_buffers=False)
    if cfg.train.compile:
        model = torch.compile(model)
    return model
