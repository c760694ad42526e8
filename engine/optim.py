"""What a training run optimises with: AdamW over the parameter groups, mixed precision (autocast
dtype and grad scaler), and the distributed wrapper: DDP, or FSDP2 (``fully_shard``) under
``train.fsdp``."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from utils import lr_sched
from utils.checkpoint import unwrap

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


def build_optimizer(cfg, model, info, kind: str = "adamw", momentum: float = 0.9
                    ) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """AdamW (or, ``kind="sgd"``, SGD with ``momentum``: the official downstream fine-tuning) over
    lr_sched.param_groups (no decay on norms/biases/tokens; the model's lr scales) and the grad
    scaler of cfg.train.amp. Prints the effective batch and lr."""
    groups = lr_sched.param_groups(
        model, cfg.optim.weight_decay, model.lr_scales(cfg.model.decoder.lr_scale)
    )
    lr = lr_sched.effective_lr(cfg, info.world_size)
    eff = cfg.data.batch_size * cfg.optim.accum_iter * info.world_size
    derived = f" (blr {cfg.optim.blr:.3e} x {eff}/256)" if cfg.optim.lr <= 0 else ""
    print(f"effective batch {eff} = {cfg.data.batch_size} x accum {cfg.optim.accum_iter} x "
          f"{info.world_size} ranks; lr {lr:.3e}{derived}")
    if kind == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    else:
        optimizer = torch.optim.AdamW(
            groups, lr=lr, betas=tuple(cfg.optim.betas), fused=info.device.type == "cuda"
        )
    dtype = resolve_amp(cfg.train.amp, info.device)
    print(f"precision: {dtype or torch.float32}")
    return optimizer, make_scaler(dtype, info.device)


def wrap_model(model, cfg, info):
    """The training wrapper when launched by torchrun: FSDP2 under ``train.fsdp`` (``shard_fsdp``),
    else DDP; then torch.compile if asked (``wrap_ddp``). FSDP replaces the parameters: build the
    optimizer and resume after this."""
    if info.distributed and cfg.train.fsdp:
        model = shard_fsdp(model, info)
        return torch.compile(model) if cfg.train.compile else model
    return wrap_ddp(model, cfg, info)


def shard_fsdp(model, info):
    """FSDP2 over all ranks (one mesh dimension), in place. Units, innermost first: every module's
    ``fsdp_units()`` (the report decoder: each LM block, then the decoder itself), then ``model``
    (everything else: ViT, text encoder, heads). Rank 0's parameters and buffers are broadcast
    first, as DDP does: ranks seed differently, and fully_shard keeps each rank's own shard.
    Scalar parameters (e.g. the contrastive logit scale), which fully_shard cannot shard, stay
    whole on every rank; a hook averages their gradients over the ranks (as FSDP's reduce-scatter
    does for the rest) each time backward accumulates one."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)
    scalars = {p for p in model.parameters() if p.dim() == 0}
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for module in list(model.modules()):
        if callable(getattr(module, "fsdp_units", None)):
            for unit in module.fsdp_units():
                fully_shard(unit, mesh=mesh, ignored_params=scalars)
    fully_shard(model, mesh=mesh, ignored_params=scalars)
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_grad)
    return model


def _average_grad(param: torch.Tensor) -> None:
    # .grad holds the micro-steps so far, earlier ones already averaged: the mean stays exact
    dist.all_reduce(param.grad)
    param.grad.div_(dist.get_world_size())


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (same norm, same scaling) for parameters that may mix FSDP
    shards (DTensor) with whole tensors (FSDP's ignored scalars), which torch's cannot stack."""
    params = [p for p in params if p.grad is not None]
    shards = [p.grad for p in params if isinstance(p.grad, DTensor)]
    if not shards or len(shards) == len(params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    whole = [p.grad for p in params if not isinstance(p.grad, DTensor)]
    norms = torch.stack([torch.nn.utils.get_total_norm(shards).full_tensor(),
                         torch.nn.utils.get_total_norm(whole)])
    total = torch.linalg.vector_norm(norms)
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    torch._foreach_mul_(shards, coef)
    torch._foreach_mul_(whole, coef)
    return total


@contextlib.contextmanager
def full_parameters(model):
    """Inference on an FSDP model: every unit's parameters are gathered on entering (collectives on
    every rank) and kept until the block ends, so that ranks may run different numbers of forward
    passes (generation stops when its own batch is done) and methods other than ``forward``
    (``generate``, ``heatmaps``) see whole tensors. Nothing happens without FSDP."""
    root = unwrap(model)
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    root.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        root.set_reshard_after_forward(True)
        root.set_reshard_after_forward(False, recurse=False)  # fully_shard's choice for the root


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
