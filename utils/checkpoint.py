"""Checkpoints: atomic saving, resuming, partial loading of pretrained weights, and the Checkpointer
that decides when a training run saves.

A run directory holds ``checkpoint-last.pth`` (rewritten at every save), numbered
``checkpoint-NNNN.pth`` (NNNN = epoch) and ``checkpoint-best.pth``. ``--resume auto`` continues from
the newest intact one of checkpoint-last.pth (the newest by construction) and then the numbered
files, highest number first; checkpoint-best.pth and temporary files are never picked.

Files hold only tensors and plain containers (the config as a dict, RNG states as tensors, tuples
and lists, stored files as str or uint8 tensors) so that they load with
``torch.load(weights_only=True)``. Only rank 0 writes; a write goes to a temporary file renamed into
place, and temporaries left by an interrupted process are removed when the next run starts.

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

_TEMP = re.compile(r"\..+\.tmp\d+")  # _atomic_save's temporary files


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file (and the setting it came
    from)."""


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


def remove_stale_temporaries(run_dir) -> list[Path]:
    """Delete the temporary files that interrupted saves left in ``run_dir``; returns them."""
    run_dir = Path(run_dir)
    stale = sorted(p for p in run_dir.glob(".*.tmp*") if _TEMP.fullmatch(p.name) and p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def read_checkpoint(path, what: str = "checkpoint", required=("model",)) -> dict:
    """``torch.load(path, weights_only=True)``, or a CheckpointError naming ``what`` (e.g. the
    setting that gave the path) and the file when it is missing, empty, truncated, not a PyTorch
    file, holds objects other than tensors and containers, or lacks an entry of ``required``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what}: {path} is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds (RuntimeError, UnpicklingError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{what}: {path} is not a readable PyTorch checkpoint (truncated, "
                              f"another kind of file, or not weights-only): "
                              f"{type(e).__name__}: {first}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{what}: {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(f"{what}: {path} has no {missing[0]!r} entry (it has "
                              f"{sorted(map(str, ckpt))[:8]}): not a checkpoint of this project")
    return ckpt


def pack_files(folder) -> dict:
    """The files directly inside ``folder`` as {name: content} for a checkpoint: UTF-8 text as str,
    anything else as a uint8 tensor."""
    files = {}
    for p in sorted(Path(folder).iterdir()):
        if p.is_file():
            data = p.read_bytes()
            try:
                files[p.name] = data.decode("utf-8")
            except UnicodeDecodeError:
                files[p.name] = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
    return files


def unpack_files(files: dict, folder) -> Path:
    """Write ``pack_files``' dict into ``folder``, which is emptied of files first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        if p.is_file():
            p.unlink()
    for name, content in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"stored file name {name!r} is not a plain file name")
        target = folder / name
        if isinstance(content, str):
            target.write_text(content, encoding="utf-8")
        else:
            target.write_bytes(content.numpy().tobytes())
    return folder


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
    config, extra ...); see ``restore``."""
    return restore(read_checkpoint(path), model, optimizer, scaler, restore_rng, path)


def restore(ckpt: dict, model, optimizer=None, scaler=None, restore_rng: bool = True, path="") -> dict:
    """Put a checkpoint dict's state into model (strictly), optimizer and scaler. An FSDP model takes
    the full state on every rank and keeps its shard; an optimizer state keyed by parameter name
    (written under FSDP) loads into FSDP and plain runs alike, one keyed by position only into a
    plain run. RNG states are restored; with several ranks each rank is then reseeded from the
    restored state plus its rank, so ranks differ and a resume is reproducible. Returns ``ckpt``."""
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


def resume_candidates(run_dir) -> list[Path]:
    """The checkpoints ``--resume auto`` may continue from, newest first: checkpoint-last.pth, then
    checkpoint-NNNN.pth by number."""
    run_dir = Path(run_dir)
    numbered = []
    for p in run_dir.glob("checkpoint-*.pth"):
        m = re.fullmatch(r"checkpoint-\D*(\d+)\.pth", p.name)
        if m and p.is_file():
            numbered.append((int(m.group(1)), p))
    last = run_dir / "checkpoint-last.pth"
    return [last] * last.is_file() + [p for _, p in sorted(numbered, reverse=True)]


def find_latest(run_dir) -> Path | None:
    """The newest checkpoint of ``run_dir`` (intact or not), or None."""
    candidates = resume_candidates(run_dir)
    return candidates[0] if candidates else None


def find_resume(spec, run_dir, print_fn=print) -> tuple[Path, dict] | None:
    """The checkpoint that train.resume ``spec`` names, read: '' -> None (a fresh run); a path ->
    that file; 'auto' -> the newest intact checkpoint of ``run_dir`` (an unreadable newer one is
    reported and passed over), None when the run dir has none. Raises CheckpointError when
    nothing named is usable."""
    if not spec:
        return None
    if spec != "auto":
        return Path(spec), read_checkpoint(spec, "train.resume", ("model", "epoch", "step"))
    candidates = resume_candidates(run_dir)
    if not candidates:
        print_fn(f"resume auto: no checkpoint in {run_dir}, starting fresh")
        return None
    for path in candidates:
        try:
            return path, read_checkpoint(path, "train.resume=auto", ("model", "epoch", "step"))
        except CheckpointError as e:
            print_fn(f"WARNING: {e}; trying the next older checkpoint")
    raise CheckpointError(f"train.resume=auto: no intact checkpoint in {run_dir} "
                          f"(tried {', '.join(p.name for p in candidates)})")


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
    ``checkpoint-best.pth`` when ``best_metric`` improves. An epoch's checkpoints are written as soon
    as its training ends (``end_epoch``), before validation; ``validated`` then records the metrics
    and rewrites checkpoint-last.pth. A checkpoint records the epoch to continue, the batches of it
    already done ("epoch_step") in the batch layout it ran with (batch_size, world_size,
    accum_iter), the best value so far and ``extra`` (e.g. the tokenizers). Rank 0 removes stale
    temporary files of the run dir at construction."""

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
        self.layout = {"batch_size": int(cfg.data.batch_size), "world_size": get_world_size(),
                       "accum_iter": int(cfg.optim.accum_iter)}
        self.best = None
        if is_main_process():
            for p in remove_stale_temporaries(self.run_dir):
                print(f"removed {p}, left by an interrupted checkpoint write")

    def _save(self, name, epoch, step, epoch_step, resumable=True):
        extra = dict(self.extra, epoch_step=int(epoch_step), **self.layout,
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

    def resume(self, resumed: tuple[Path, dict] | None) -> tuple[int, int]:
        """Continue from ``resumed`` = (path, checkpoint dict) of ``find_resume`` (None: a fresh
        run). Returns (epoch to start, batches of it already done in this run's layout)."""
        if resumed is None:
            return 0, 0
        path, ckpt = resumed
        restore(ckpt, self.model, self.optimizer, self.scaler)
        extra = ckpt.get("extra", {})
        best = extra.get("best", float("nan"))
        self.best = None if best is None or math.isnan(best) else float(best)
        epoch = int(ckpt["epoch"])
        epoch_step = self._position(path, extra)
        print(
            f"resumed from {path}: epoch {epoch}, batch {epoch_step}, global step {ckpt['step']}, "
            f"best {self.best_metric} {self.best}"
        )
        return epoch, epoch_step

    def _position(self, path, extra: dict) -> int:
        """The checkpoint's batch of its epoch in this run's batch layout. A different effective
        batch (batch_size x world_size x accum_iter) is refused unless train.allow_reshape; then,
        as whenever the layout differs, the position is converted through the samples done
        (rounded down to a whole optimizer step)."""
        done = int(extra.get("epoch_step", 0))
        old = {k: extra.get(k) for k in self.layout}
        if None in old.values() or old == self.layout:  # older checkpoints: the same layout
            return done
        eff_old, eff_new = (math.prod(d.values()) for d in (old, self.layout))
        what = (f"{eff_old} = {old['batch_size']} x {old['world_size']} ranks x accum "
                f"{old['accum_iter']}")
        now = (f"{eff_new} = {self.layout['batch_size']} x {self.layout['world_size']} ranks x "
               f"accum {self.layout['accum_iter']}")
        if eff_old != eff_new and not self.cfg.train.allow_reshape:
            raise CheckpointError(
                f"train.resume: {path} was trained with an effective batch of {what} (data."
                f"batch_size x ranks x optim.accum_iter); this run's is {now}. Resume with the same"
                " batch layout, or --set train.allow_reshape=true to continue at the same sample "
                "with the new batch (a different optimisation and step count)")
        samples = done * old["batch_size"] * old["world_size"]
        per_rank_step = self.layout["batch_size"] * self.layout["world_size"]
        accum = self.layout["accum_iter"]
        batch = samples // (per_rank_step * accum) * accum
        print(f"resume: batch layout changed from {what} to {now}: the {samples} samples done of "
              f"the epoch make batch {batch} (was batch {done}); "
              f"{samples - batch * per_rank_step} samples are trained again; global steps are "
              "counted in the new layout")
        return batch

    def on_step(self, epoch: int, batches_done: int, global_step: int) -> None:
        if self.save_every_steps > 0 and global_step % self.save_every_steps == 0:
            self._save("checkpoint-last.pth", epoch, global_step, batches_done)

    def end_epoch(self, epoch: int, global_step: int) -> None:
        """After epoch ``epoch``'s training, before anything that may fail (validation): its
        checkpoint-last.pth, and checkpoint-NNNN.pth when due."""
        self._save("checkpoint-last.pth", epoch + 1, global_step, 0)
        last_epoch = epoch + 1 == self.epochs
        if self.save_every > 0 and ((epoch + 1) % self.save_every == 0 or last_epoch):
            self._save(f"checkpoint-{epoch:04d}.pth", epoch + 1, global_step, 0)

    def validated(self, epoch: int, global_step: int, metrics: dict) -> bool:
        """Epoch ``epoch``'s validation ``metrics``: update best (checkpoint-best.pth) and rewrite
        checkpoint-last.pth with it. Returns True if best."""
        improved = False
        value = metrics.get(self.best_metric)
        if value is not None and math.isfinite(value):
            improved = self.best is None or self.sign * value < self.sign * self.best
            if improved:
                self.best = float(value)
        else:
            print(
                f"WARNING: train.best_metric {self.best_metric!r} not among the validation metrics "
                f"{sorted(metrics)}"
            )
        self._save("checkpoint-last.pth", epoch + 1, global_step, 0)
        if improved:
            self._save("checkpoint-best.pth", epoch + 1, global_step, 0, resumable=False)
            print(f"new best {self.best_metric} = {self.best:.4f} at epoch {epoch}")
        return improved
