"""What the two entry points share: arguments, the run directory, data loaders, tokenizers, the
optimizer, DDP wrapping, and checkpoints (resume, mid-epoch saves, best by a validation metric)."""
from __future__ import annotations

import argparse
import logging
import math
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from utils import lr_sched
from utils.checkpoint import find_latest, load_checkpoint, save_checkpoint
from utils.config import add_config_args, load_config
from utils.dist import barrier, init_distributed, is_main_process
from utils.logging import TBWriter, setup_logging


# ---- arguments and run directory -------------------------------------------------------------------

def parser(description: str) -> argparse.ArgumentParser:
    p = add_config_args(argparse.ArgumentParser(description=description))
    p.add_argument("--resume", default=None, help="'auto' (latest checkpoint of the run dir) or a checkpoint path")
    p.add_argument("--init", default=None, help="local MAE ViT checkpoint for the image encoder (train.init)")
    p.add_argument("--output-dir", default=None, help="shorthand for --set output_dir=...")
    p.add_argument("--run-name", default=None, help="shorthand for --set run_name=...")
    return p


def load_run_config(args):
    """defaults.yaml <- --config <- --set <- the shorthands."""
    sets = list(args.set)
    for flag, key in (("output_dir", "output_dir"), ("run_name", "run_name"),
                      ("resume", "train.resume"), ("init", "train.init")):
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={value}")
    return load_config(args.config, sets)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def setup(cfg, log: bool = True):
    """Distributed init, per-rank seeds, the run dir ``output_dir/run_name`` with log.txt and TensorBoard.
    Returns (DistInfo, run_dir, TBWriter)."""
    info = init_distributed(cfg.dist.backend, cfg.device)
    seed_everything(cfg.seed + info.rank)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    if log:
        setup_logging(run_dir)
    # module loggers (dataset warnings, the ViT init report) print on rank 0, into log.txt too
    logging.basicConfig(level=logging.INFO if info.rank == 0 else logging.WARNING, format="%(message)s",
                        force=True)
    tb = TBWriter(run_dir / "tensorboard", enabled=log)
    print(f"run dir: {run_dir}  world size: {info.world_size}  device: {info.device}")
    return info, run_dir, tb


# ---- data -------------------------------------------------------------------------------------------

class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, so an epoch's order is reproducible) that can
    start part-way through its shard: ``set_start(n)`` skips the first n samples of this epoch."""

    start = 0

    def set_start(self, n: int) -> None:
        self.start = n

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def _loader(dataset, sampler, batch_size, cfg, info, drop_last):
    from datasets.cxr import collate  # imported late: the data package is only needed here
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                      collate_fn=collate, pin_memory=info.device.type == "cuda", drop_last=drop_last,
                      persistent_workers=False)


def train_loader(dataset, cfg, info) -> DataLoader:
    """Shuffled per epoch (ResumableSampler), sharded over ranks, full batches only (equal shapes on
    every rank for the gathered losses)."""
    sampler = ResumableSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                               seed=cfg.seed, drop_last=True)
    if len(sampler) < cfg.data.batch_size:
        raise ValueError(f"{len(dataset)} training samples over {info.world_size} ranks give fewer than "
                         f"one batch of data.batch_size={cfg.data.batch_size}")
    return _loader(dataset, sampler, cfg.data.batch_size, cfg, info, drop_last=True)


def eval_loader(dataset, cfg, info) -> DataLoader:
    """In order, sharded over ranks; the sampler pads the last shards (callers de-duplicate by index)."""
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=False)
    return _loader(dataset, sampler, cfg.data.eval_batch_size, cfg, info, drop_last=False)


def ensure_location_prior(model, cfg, info) -> None:
    """Estimate the report-derived location prior (models/location_prior.py) when the model has it on and
    neither a pretraining checkpoint nor a resumed run brought it: over ``model.location_prior.max_images``
    training images (a fixed random subset, eval transform), sharded over ranks and summed."""
    from datasets.cxr import build_dataset
    from models.location_prior import estimate_location_prior
    if not model.needs_location_prior:
        return
    dataset = build_dataset(cfg, "train", train=False)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    limit = cfg.model.location_prior.max_images
    chosen = order[:limit] if limit > 0 else order
    loader = _loader(Subset(dataset, chosen[info.rank::info.world_size]), None, cfg.data.eval_batch_size, cfg,
                     info, drop_last=False)
    print(f"location prior: estimating from {len(chosen)} training images")
    prior = estimate_location_prior(loader, model.graph.num_leaves, cfg.data.image_size, cfg.model.vit.patch_size,
                                    info.device)
    model.location_prior.copy_(prior)


# ---- tokenizers and models ----------------------------------------------------------------------

TOKENIZER_DIRS = {"text": "tokenizers/text_tokenizer", "decoder": "tokenizers/decoder_tokenizer"}


def tokenizers(cfg, train_reports, run_dir, inherit: dict | None = None):
    """The run's tokenizers, saved under run_dir/tokenizers/ so that its checkpoints reload without
    the data: the run dir's own (resume) > ``inherit`` (folders of the pretraining run, used where the
    config names none) > cfg.model.*.tokenizer > trained on ``train_reports``. Rank 0 builds, the
    others load. cfg.model.*.tokenizer then point at the saved folders. Returns
    (text_tok, decoder_tok, folders relative to the run dir) - the latter go into every checkpoint."""
    from datasets.tokenizer import build_tokenizers
    for key, folder in (inherit or {}).items():
        section = cfg.model.text if key == "text" else cfg.model.decoder
        if not section.tokenizer:
            section.tokenizer = str(folder)
    save_dir = Path(run_dir) / "tokenizers"
    toks = build_tokenizers(cfg, train_reports, save_dir) if is_main_process() else None
    barrier()
    if toks is None:
        toks = build_tokenizers(cfg, train_reports, save_dir)
    cfg.model.text.tokenizer = str((Path(run_dir) / TOKENIZER_DIRS["text"]).resolve())
    cfg.model.decoder.tokenizer = str((Path(run_dir) / TOKENIZER_DIRS["decoder"]).resolve())
    return toks[0], toks[1], dict(TOKENIZER_DIRS)


def checkpoint_tokenizers(path) -> dict[str, Path]:
    """Tokenizer folders recorded in a checkpoint, resolved against the checkpoint's own folder."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    rel = ckpt.get("extra", {}).get("tokenizers") or TOKENIZER_DIRS
    return {k: Path(path).resolve().parent / v for k, v in rel.items()}


def model_from_checkpoint(path, cfg, device):
    """The SSACL of a checkpoint, for evaluation / prediction: architecture (model, loss weights, image
    size) and tokenizers from the checkpoint and its run dir, weights loaded strictly. ``cfg`` is
    updated in place with those sections (data paths and eval settings stay the caller's); a model key
    newer than the checkpoint takes its default."""
    from datasets.tokenizer import load_tokenizer
    from models.ssacl import SSACL
    from utils.config import differences, with_defaults
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    saved, source = ckpt["config"], f"{path} (its stored config)"
    stored = {"model": with_defaults("model", saved["model"], source),
              "loss": with_defaults("loss", saved["loss"], source)}
    ignored = differences({k: cfg[k] for k in stored}, stored)
    if ignored:
        print(f"{path}: the checkpoint's model and loss settings are used; ignored: "
              + ", ".join(f"{k}={mine!r} (checkpoint: {theirs!r})" for k, mine, theirs in ignored))
    cfg.model, cfg.loss = stored["model"], stored["loss"]
    cfg.data.image_size = saved["data"]["image_size"]
    cfg.model.vit.init, cfg.train.init = None, None  # the checkpoint holds the weights
    folders = checkpoint_tokenizers(path)
    text_tok, dec_tok = load_tokenizer(folders["text"]), load_tokenizer(folders["decoder"])
    model = SSACL.from_config(cfg, text_tok, dec_tok)
    model.load_state_dict(ckpt["model"])
    print(f"loaded {path} (epoch {ckpt.get('epoch')}, step {ckpt.get('step')}): {count_parameters(model)}")
    return model.to(device)


# ---- model and optimizer ----------------------------------------------------------------------------

def build_optimizer(cfg, model, info):
    """AdamW over utils.lr_sched.param_groups (no decay on norms/biases/tokens; LM lr scale) and the
    grad scaler for cfg.train.amp. Prints the effective batch and lr."""
    from engine.train import make_scaler, resolve_amp
    groups = lr_sched.param_groups(model, cfg.optim.weight_decay, cfg.model.decoder.lr_scale)
    lr = lr_sched.effective_lr(cfg, info.world_size)
    eff = cfg.data.batch_size * cfg.optim.accum_iter * info.world_size
    print(f"effective batch {eff} = {cfg.data.batch_size} x accum {cfg.optim.accum_iter} x "
          f"{info.world_size} ranks; lr {lr:.3e}" + (f" (blr {cfg.optim.blr:.3e} x {eff}/256)"
                                                      if cfg.optim.lr <= 0 else ""))
    fused = info.device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.optim.betas), fused=fused)
    dtype = resolve_amp(cfg.train.amp, info.device)
    print(f"precision: {dtype or torch.float32}")
    return optimizer, make_scaler(dtype, info.device)


def wrap_ddp(model, cfg, info):
    """DDP when launched by torchrun (device_ids only on CUDA), then torch.compile if asked."""
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=cfg.dist.find_unused_parameters,
            broadcast_buffers=False)  # no running statistics in this model: its buffers are constants
    if cfg.train.compile:
        model = torch.compile(model)
    return model


def count_parameters(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{total / 1e6:.2f}M parameters ({train / 1e6:.2f}M trainable)"


# ---- checkpoints ------------------------------------------------------------------------------------

class Checkpointer:
    """Saves ``checkpoint-last.pth`` every ``train.save_every_steps`` optimizer steps (mid-epoch) and at
    every epoch end, ``checkpoint-NNNN.pth`` every ``train.save_every`` epochs, ``checkpoint-best.pth``
    when ``train.best_metric`` improves. A checkpoint records the epoch to continue and the batches of it
    already done ("epoch_step"), the best value so far and ``extra`` (e.g. tokenizer folders)."""

    def __init__(self, run_dir, cfg, model, optimizer, scaler, extra: dict | None = None):
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.extra = dict(extra or {})
        self.best = None
        self.sign = 1.0 if cfg.train.best_mode == "min" else -1.0
        if cfg.train.best_mode not in ("min", "max"):
            raise ValueError(f"train.best_mode must be min or max, got {cfg.train.best_mode!r}")

    def _save(self, name, epoch, step, epoch_step, resumable=True):
        extra = dict(self.extra, epoch_step=int(epoch_step),
                     best=self.best if self.best is not None else float("nan"))
        save_checkpoint(self.run_dir / name, model=self.model, optimizer=self.optimizer if resumable else None,
                        scaler=self.scaler if resumable else None, epoch=epoch, step=step, cfg=self.cfg,
                        extra=extra)

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
        print(f"resumed from {path}: epoch {epoch}, batch {epoch_step}, global step {ckpt['step']}, "
              f"best {self.cfg.train.best_metric} {self.best}")
        return epoch, epoch_step

    def on_step(self, epoch: int, batches_done: int, global_step: int) -> None:
        every = self.cfg.train.save_every_steps
        if every > 0 and global_step % every == 0:
            self._save("checkpoint-last.pth", epoch, global_step, batches_done)

    def end_epoch(self, epoch: int, global_step: int, metrics: dict | None = None) -> bool:
        """After epoch ``epoch`` (and its validation, ``metrics``): update best, save. Returns True if best."""
        improved = False
        key = self.cfg.train.best_metric
        if metrics and key in metrics and metrics[key] is not None and math.isfinite(metrics[key]):
            value = float(metrics[key])
            improved = self.best is None or self.sign * value < self.sign * self.best
            if improved:
                self.best = value
        elif metrics:
            print(f"WARNING: train.best_metric {key!r} not among the validation metrics {sorted(metrics)}")
        self._save("checkpoint-last.pth", epoch + 1, global_step, 0)
        last_epoch = epoch + 1 == self.cfg.optim.epochs
        if self.cfg.train.save_every > 0 and ((epoch + 1) % self.cfg.train.save_every == 0 or last_epoch):
            self._save(f"checkpoint-{epoch:04d}.pth", epoch + 1, global_step, 0)
        if improved:
            self._save("checkpoint-best.pth", epoch + 1, global_step, 0, resumable=False)
            print(f"new best {key} = {self.best:.4f} at epoch {epoch}")
        return improved
