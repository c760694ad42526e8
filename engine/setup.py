"""What every entry point does before its loop: arguments and config, the run folder with its log
and TensorBoard, and for training the data, tokenizers, model, optimizer, checkpoints and
loaders."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from datasets.cxr import build_dataset
from datasets.loaders import eval_loader, subset_loader, train_loader
from datasets.tokenizer import TOKENIZER_DIRS, run_tokenizers, tokenizer_files
from engine.optim import build_optimizer, wrap_model
from models.ssacl import SSACL
from utils.checkpoint import (
    Checkpointer,
    count_parameters,
    find_resume,
    load_partial,
    read_checkpoint,
    unwrap,
)
from utils.config import add_config_args, load_config, save_config
from utils.dist import DistInfo, barrier, init_distributed, is_main_process
from utils.logging import TBWriter, setup_logging
from utils.seed import seed_everything


def parser(description: str) -> argparse.ArgumentParser:
    p = add_config_args(argparse.ArgumentParser(description=description))
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' (latest checkpoint of the run dir) or a checkpoint path",
    )
    p.add_argument(
        "--init",
        default=None,
        help="local MAE ViT checkpoint for the image encoder (model.vit.init)",
    )
    p.add_argument("--output-dir", default=None, help="shorthand for --set output_dir=...")
    p.add_argument("--run-name", default=None, help="shorthand for --set run_name=...")
    return p


def load_run_config(args):
    """defaults.yaml <- --config <- --set <- the shorthands."""
    sets = list(args.set)
    shorthands = (
        ("output_dir", "output_dir"),
        ("run_name", "run_name"),
        ("resume", "train.resume"),
        ("init", "model.vit.init"),
    )
    for flag, key in shorthands:
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={value}")
    return load_config(args.config, sets)


def setup_run(cfg, log: bool = True) -> tuple[DistInfo, Path, TBWriter]:
    """Distributed init, per-rank seeds, the run dir ``output_dir/run_name`` with log.txt and
    TensorBoard."""
    info = init_distributed(cfg.dist.backend, cfg.device)
    seed_everything(cfg.seed + info.rank)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    if log:
        setup_logging(run_dir)
    # module loggers (dataset warnings, the ViT init report) print on rank 0, into log.txt too
    logging.basicConfig(
        level=logging.INFO if info.rank == 0 else logging.WARNING, format="%(message)s", force=True
    )
    tb = TBWriter(run_dir / "tensorboard", enabled=log)
    print(f"run dir: {run_dir}  world size: {info.world_size}  device: {info.device}")
    return info, run_dir, tb


@dataclass
class TrainingRun:
    model: nn.Module  # wrapped in DDP (or sharded by FSDP) when distributed
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    checkpointer: Checkpointer
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    start_epoch: int
    start_step: int


def prepare_training(cfg, info: DistInfo, run_dir: Path) -> TrainingRun:
    """Datasets, the checkpoint to resume (``train.resume``), tokenizers (datasets.tokenizer.
    run_tokenizers: the resumed or ``train.pretrained`` checkpoint's), the model (its weights from
    ``train.pretrained``, partially), DDP or FSDP (``train.fsdp``), optimizer, checkpointer
    (resumed), the location prior when the model needs one, and the loaders."""
    train_set = build_dataset(cfg, "train", train=True)
    val_set = build_dataset(cfg, "val", train=False)
    print(f"train: {len(train_set)} samples  val: {len(val_set)} samples")
    resumed = find_resume(cfg.train.resume, run_dir)
    pretrained = cfg.train.pretrained
    pre = (pretrained, read_checkpoint(pretrained, "train.pretrained", ())) if pretrained else None
    text_tok, dec_tok = run_tokenizers(
        cfg, [s.report for s in train_set.samples], run_dir, resumed, pre
    )
    if is_main_process():
        save_config(cfg, run_dir / "config.yaml")

    model = SSACL.from_config(cfg, text_tok, dec_tok)  # loads model.vit.init (an MAE ViT) if set
    if pre:
        load_pretrained(model, *pre, allow_partial=cfg.train.allow_partial)
    del pre
    if model.predicts_entities:  # positive weights of the imbalanced targets
        model.set_label_prevalence(train_set.labels, train_set.anatomies, cfg.model.entity.max_pos_weight)
    model.to(info.device)
    print(f"model: {count_parameters(model)}; losses {model.weights}")
    # DDP or FSDP first: FSDP replaces the parameters the optimizer holds and a resume loads
    model = wrap_model(model, cfg, info)
    optimizer, scaler = build_optimizer(cfg, unwrap(model), info)
    extra = {"tokenizers": dict(TOKENIZER_DIRS), "tokenizer_files": tokenizer_files(run_dir)}
    checkpointer = Checkpointer(run_dir, cfg, model, optimizer, scaler, extra)
    start_epoch, start_step = checkpointer.resume(resumed)
    del resumed
    ensure_location_prior(unwrap(model), cfg, info)
    return TrainingRun(model, optimizer, scaler, checkpointer, train_loader(train_set, cfg, info),
                       eval_loader(val_set, cfg, info), start_epoch, start_step)


def ensure_location_prior(model: SSACL, cfg, info: DistInfo) -> None:
    """Estimate the model's location prior when it has one that neither a pretraining checkpoint nor
    a resumed run brought: over ``model.location_prior.max_images`` training images (a fixed
    random subset, eval transform), sharded over the ranks and summed."""
    if not model.needs_location_prior:
        return
    dataset = build_dataset(cfg, "train", train=False)
    limit = cfg.model.location_prior.max_images
    print(f"location prior: estimating from {min(limit, len(dataset)) if limit > 0 else len(dataset)} "
          "training images")
    model.fit_location_prior(subset_loader(dataset, limit, cfg, info))


def load_pretrained(model: SSACL, path, checkpoint: dict, allow_partial: bool = False) -> None:
    """The weights of an SS-ACL checkpoint read from ``path`` (grid-shaped entries resized to this
    resolution). Keys of modules this model does not build are skipped; a model key left unfilled or
    of another shape is an error naming the keys unless ``allow_partial`` (train.allow_partial)."""
    state = checkpoint["model"] if isinstance(checkpoint.get("model"), dict) else checkpoint
    report = load_partial(model, model.adapt_state_dict(state))
    print(f"pretrained {path}: {report}")
    mismatched = [k for k, why in report.skipped.items() if why.startswith("shape")]
    if (report.missing or mismatched) and not allow_partial:
        raise ValueError(f"{path} does not fill this model (train.allow_partial=false): missing "
                         f"{report.missing[:12]}{' ...' if len(report.missing) > 12 else ''}, "
                         f"shape mismatch {mismatched}")
