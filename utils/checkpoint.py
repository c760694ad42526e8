"""Checkpoints: atomic saving, resuming, partial loading of pretrained weights, and the Checkpointer
that decides when a training run saves.

A run directory holds ``checkpoint-last.pth`` (rewritten at every save), numbered
``checkpoint-NNNN.pth`` (NNNN = epoch) and ``checkpoint-best.pth``. ``find_latest`` returns
checkpoint-last.pth when it exists (it is the newest by construction), else the numbered file with
the highest number; checkpoint-best.pth and temporary files are never picked.

Files hold only tensors and plain containers (the config as a dict, RNG states as tensors, tuples
and lists) so that they load with ``torch.load(weights_only=True)``. Only rank 0 writes.

An FSDP-sharded model (train.fsdp) is saved as a full state dict gathered to rank 0 (the same keys
as the plain model's: such a checkpoint evaluates and resumes without FSDP too), its optimizer state
keyed by parameter name (torch.distributed.checkpoint's full optimizer state dict); gathering is a
collective, so every rank calls ``save_checkpoint``. Loading shards the full state on every rank.
"""
from __future__ import annotations

import math
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from utils.dist import get_rank, get_world_size, is_main_process


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def is_fsdp(model: nn.Module) -> bool:
    """True when (the bare) ``model`` holds FSDP-sharded modules."""
    return any(isinstance(m, FSDPModule) for m in unwrap(model).modules())


def _by_name(optimizer_state: dict) -> bool:
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's) rather than
    by position (``optimizer.state_dict()``)."""
    groups = optimizer_state.get("param_groups") or [{"params": []}]
    return any(isinstance(p, str) for g in groups for p in g["params"])


def rng_state() -> dict:
    st = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": st[0], "keys": st[1].tolist(), "pos": int(st[2]),
                       "has_gauss": int(st[3]), "cached_gaussian": float(st[4])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def _atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same directory, then os.replace: an interrupted save
    leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(path, *, model, optimizer=None, scaler=None, epoch: int, step: int, cfg,
                    extra: dict | None = None) -> Path | None:
    """Save model (unwrapped), optimizer, grad scaler, epoch, global step, config and RNG states.
    Writes on rank 0 only. Without FSDP there is no collective inside (safe to call on rank 0
    only); an FSDP model's state is gathered first, so every rank must call it. ``extra`` must
    hold only tensors / numbers / strings / containers of them."""
    optim_state = None
    if is_fsdp(model):
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # {} on ranks > 0
        model_state = get_model_state_dict(unwrap(model), options=full)
        if optimizer is not None:
            optim_state = get_optimizer_state_dict(unwrap(model), optimizer, options=full)
    if not is_main_process():
        return None
    if not is_fsdp(model):
        model_state = unwrap(model).state_dict()
        optim_state = optimizer.state_dict() if optimizer is not None else None
    state = {"model": model_state, "epoch": int(epoch), "step": int(step),
             "config": cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {}),
             "rng": rng_state(), "world_size": get_world_size()}
    if optim_state is not None:
        state["optimizer"] = optim_state
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if extra:
        state["extra"] = extra
    path = Path(path)
    _atomic_save(state, path)
    return path


def load_checkpoint(path, model, optimizer=None, scaler=None, restore_rng: bool = True) -> dict:
    """Load a checkpoint written by save_checkpoint (strictly) and return its dict (epoch, step,
    config, extra ...). An FSDP model takes the full state on every rank and keeps its shard; an
    optimizer state keyed by parameter name (written under FSDP) loads into FSDP and plain runs
    alike, one keyed by position only into a plain run. RNG states are restored; with several
    ranks each rank is then reseeded from the restored state plus its rank, so ranks differ and a
    resume is reproducible."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    bare, full = unwrap(model), StateDictOptions(full_state_dict=True)
    if is_fsdp(model):
        set_model_state_dict(bare, ckpt["model"], options=full)
    else:
        bare.load_state_dict(ckpt["model"])
    if optimizer is not None and "optimizer" in ckpt:
        if _by_name(ckpt["optimizer"]):
            set_optimizer_state_dict(bare, optimizer, ckpt["optimizer"], options=full)
        elif is_fsdp(model):
            raise ValueError(f"{path}: its optimizer state was written without FSDP (keyed by "
                             f"position); resume it with train.fsdp: false")
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if restore_rng and "rng" in ckpt:
        set_rng_state(ckpt["rng"])
        if get_world_size() > 1:
            seed = int(torch.randint(0, 2**31 - 1, (1,))) + get_rank()
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
    return ckpt


def find_latest(run_dir) -> Path | None:
    """The checkpoint ``--resume auto`` continues from (rule in the module docstring), or None."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoint-last.pth"
    if last.is_file():
        return last
    numbered = []
    for p in run_dir.glob("checkpoint-*.pth"):
        m = re.fullmatch(r"checkpoint-\D*(\d+)\.pth", p.name)
        if m:
            numbered.append((int(m.group(1)), p))
    return max(numbered)[1] if numbered else None


@dataclass
class PartialLoadReport:
    matched: list[str] = field(default_factory=list)       # module keys that were loaded
    missing: list[str] = field(default_factory=list)       # module keys the checkpoint did not fill
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it was not loaded

    def __str__(self) -> str:
        lines = [f"loaded {len(self.matched)} tensors; {len(self.missing)} missing, "
                 f"{len(self.skipped)} skipped"]
        if self.missing:
            lines.append("  missing: " + ", ".join(_summarize(self.missing)))
        lines += [f"  skipped {k}: {why}" for k, why in self.skipped.items()]
        return "\n".join(lines)


def _summarize(keys: list[str], limit: int = 12) -> list[str]:
    """Keys as they are when few; else grouped by their first two name parts with a count."""
    if len(keys) <= limit:
        return keys
    groups: dict[str, int] = defaultdict(int)
    for k in keys:
        groups[".".join(k.split(".")[:2])] += 1
    return [f"{g}.* ({n})" if n > 1 else g for g, n in groups.items()]


def _rename(key: str, prefix_map: dict) -> str | None:
    """Apply the longest matching prefix of ``prefix_map`` (old -> new, None = drop)."""
    for old in sorted(prefix_map, key=len, reverse=True):
        if key.startswith(old):
            new = prefix_map[old]
            return None if new is None else new + key[len(old):]
    return key


def load_partial(module: nn.Module, state_dict: dict, prefix_map: dict | None = None
                 ) -> PartialLoadReport:
    """Load the tensors of ``state_dict`` (or of its "model" / "state_dict" entry, as in MAE
    checkpoints) whose renamed key exists in ``module`` with the same shape; report the rest.
    A leading "module." (DDP) is stripped before ``prefix_map`` applies, e.g. {"": "vit."} loads a
    bare ViT into SSACL.vit and {"decoder_": None} drops MAE decoder keys."""
    for k in ("model", "state_dict"):
        if isinstance(state_dict.get(k), dict):
            state_dict = state_dict[k]
            break
    module = unwrap(module)
    own = module.state_dict()
    load, skipped = {}, {}
    for key, value in state_dict.items():
        new = _rename(key.removeprefix("module."), prefix_map or {})
        if new is None:
            skipped[key] = "dropped by prefix_map"
        elif not torch.is_tensor(value):
            skipped[key] = f"not a tensor ({type(value).__name__})"
        elif new not in own:
            skipped[key] = "unexpected key" + (f" (renamed {new!r})" if new != key else "")
        elif value.shape != own[new].shape:
            skipped[key] = (f"shape mismatch: checkpoint {tuple(value.shape)} "
                            f"vs model {tuple(own[new].shape)}")
        else:
            load[new] = value
    module.load_state_dict(load, strict=False)
    return PartialLoadReport(sorted(load), [k for k in own if k not in load], skipped)


def count_parameters(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{total / 1e6:.2f}M parameters ({train / 1e6:.2f}M trainable)"


class Checkpointer:
    """Saves ``checkpoint-last.pth`` every ``save_every_steps`` optimizer steps (mid-epoch) and at
    every epoch end, ``checkpoint-NNNN.pth`` every ``save_every`` epochs (and after the last), and
    ``checkpoint-best.pth`` when ``best_metric`` improves. A checkpoint records the epoch to
    continue, the batches of it already done ("epoch_step"), the best value so far and ``extra``
    (e.g. tokenizer folders)."""

    def __init__(self, run_dir, cfg, model, optimizer, scaler, extra: dict | None = None):
        t = cfg.train
        if t.best_mode not in ("min", "max"):
            raise ValueError(f"train.best_mode must be min or max, got {t.best_mode!r}")
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.extra = dict(extra or {})
        self.best_metric, self.sign = t.best_metric, 1.0 if t.best_mode == "min" else -1.0
        self.save_every, self.save_every_steps = t.save_every, t.save_every_steps
        self.epochs = cfg.optim.epochs
        self.best = None

    def _save(self, name, epoch, step, epoch_step, resumable=True):
        extra = dict(self.extra, epoch_step=int(epoch_step),
                     best=self.best if self.best is not None else float("nan"))
        save_checkpoint(
            self.run_dir / name,
            model=self.model,
            optimizer=self.optimizer if resumable else None,
            scaler=self.scaler if resumable else None,
            epoch=epoch,
            step=step,
            cfg=self.cfg,
            extra=extra,
        )

    def resume(self, spec) -> tuple[int, int]:
        """``spec`` '' (fresh), 'auto' (latest in the run dir, fresh if none) or a path.
        Returns (epoch to start, batches of it already done)."""
        if not spec:
            return 0, 0
        path = find_latest(self.run_dir) if spec == "auto" else Path(spec)
        if path is None:
            print(f"resume auto: no checkpoint in {self.run_dir}, starting fresh")
            return 0, 0
        ckpt = load_checkpoint(path, self.model, self.optimizer, self.scaler)
        extra = ckpt.get("extra", {})
        best = extra.get("best", float("nan"))
        self.best = None if best is None or math.isnan(best) else float(best)
        epoch, epoch_step = int(ckpt["epoch"]), int(extra.get("epoch_step", 0))
        print(
            f"resumed from {path}: epoch {epoch}, batch {epoch_step}, global step {ckpt['step']}, "
            f"best {self.best_metric} {self.best}"
        )
        return epoch, epoch_step

    def on_step(self, epoch: int, batches_done: int, global_step: int) -> None:
        if self.save_every_steps > 0 and global_step % self.save_every_steps == 0:
            self._save("checkpoint-last.pth", epoch, global_step, batches_done)

    def end_epoch(self, epoch: int, global_step: int, metrics: dict | None = None) -> bool:
        """After epoch ``epoch`` (and its validation ``metrics``): update best, save. Returns True
        if best."""
        improved = False
        value = (metrics or {}).get(self.best_metric)
        if value is not None and math.isfinite(value):
            improved = self.best is None or self.sign * value < self.sign * self.best
            if improved:
                self.best = float(value)
        elif metrics:
            print(
                f"WARNING: train.best_metric {self.best_metric!r} not among the validation metrics "
                f"{sorted(metrics)}"
            )
        self._save("checkpoint-last.pth", epoch + 1, global_step, 0)
        last_epoch = epoch + 1 == self.epochs
        if self.save_every > 0 and ((epoch + 1) % self.save_every == 0 or last_epoch):
            self._save(f"checkpoint-{epoch:04d}.pth", epoch + 1, global_step, 0)
        if improved:
            self._save("checkpoint-best.pth", epoch + 1, global_step, 0, resumable=False)
            print(f"new best {self.best_metric} = {self.best:.4f} at epoch {epoch}")
        return improved
