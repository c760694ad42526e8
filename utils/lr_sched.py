"""Learning rate: a pure function of the fractional epoch (set every iteration, MAE style),
the effective lr from the batch size, and parameter groups (weight decay, per-prefix lr scales)."""
from __future__ import annotations

import math
import re

from torch import nn

from utils.config import ConfigError


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float,
          epochs: float) -> float:
    """Linear warmup from 0 to base_lr, then half-cycle cosine down to min_lr at ``epochs``."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = min(1.0, (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer, epoch: float, base_lr: float, min_lr: float,
                         warmup_epochs: float, epochs: float) -> float:
    """Set each group's lr to lr_at(...) * group["lr_scale"] (default 1); return lr_at(...)."""
    lr = lr_at(epoch, base_lr, min_lr, warmup_epochs, epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def effective_lr(cfg, world_size: int) -> float:
    """cfg.optim.lr when > 0, else blr * effective batch / 256 (effective batch = per-process
    batch * accum_iter * world_size). ConfigError if optim.min_lr exceeds it."""
    o = cfg.optim
    eff = cfg.data.batch_size * o.accum_iter * world_size
    lr = o.lr if o.lr > 0 else o.blr * eff / 256
    if o.min_lr > lr:
        given = "optim.lr" if o.lr > 0 else f"optim.blr={o.blr:g} x effective batch {eff} / 256"
        raise ConfigError(f"optim.min_lr={o.min_lr:g} must be <= the learning rate {lr:g} ({given})")
    return lr


# Parameters that are tokens / position tables: matched on the parameter's own name, or on the
# owning module's name for embedding tables ("embeddings.position_embeddings.weight", GPT-2 "wpe").
_TOKEN_PARAM = re.compile(
    r"(pos_embed|position_embeddings?|token|tokens|queries|query_embed|spatial_prior)$"
)
_POS_MODULE = re.compile(r"^(wpe|pos_embed|position_embeddings?|query_embed)$")


def _strip_wrappers(name: str) -> str:
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


def no_weight_decay(name: str, p) -> bool:
    """1-d params (biases, norm weights, scales), position embeddings, cls/mask/query tokens."""
    parts = name.split(".")
    return (p.ndim <= 1 or parts[-1] == "bias" or bool(_TOKEN_PARAM.search(parts[-1]))
            or (len(parts) > 1 and bool(_POS_MODULE.match(parts[-2]))))


def param_groups(
    model: nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None
) -> list[dict]:
    """Optimizer groups {"params", "weight_decay", "lr_scale", "name"}; frozen params excluded. A
    parameter whose name (behind DDP's "module.") starts with a prefix of ``lr_scales`` gets that lr
    multiplier."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bare = _strip_wrappers(name)
        scale = next((s for prefix, s in (lr_scales or {}).items() if bare.startswith(prefix)), 1.0)
        groups.setdefault((no_weight_decay(bare, p), scale), []).append(p)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_wd else weight_decay,
            "lr_scale": scale,
            "name": ("no_decay" if no_wd else "decay")
            + (f"_lr_x{scale:g}" if scale != 1.0 else ""),
        }
        for (no_wd, scale), params in sorted(groups.items())
    ]
