"""Fine-tuning on a downstream data set (classification or segmentation) with the training engine
of pretraining (engine/train.py: AMP, accumulation, clipping, DDP, checkpoints, resume), and its
evaluation: AUROC per label and macro, accuracy / F1 at thresholds chosen on validation; Dice and
IoU of the predicted masks. Evaluation shards the split over the ranks and scores on rank 0 (the
sampler's padding removed by index); every rank gets the metrics."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from datasets import loaders
from datasets.downstream import TASKS, Indexed, build_downstream, collate_downstream
from datasets.loaders import to_device
from engine.optim import autocast, build_optimizer, resolve_amp, wrap_ddp
from engine.setup import TrainingRun
from metrics.classification import accuracy_f1, auroc, choose_thresholds
from metrics.segmentation import dice_iou, mask_counts
from models.downstream import from_pretrained
from utils.checkpoint import Checkpointer, count_parameters, find_resume, unwrap
from utils.config import ConfigError, save_config, with_defaults
from utils.dist import broadcast_object, gather_objects, is_main_process


def build_split(cfg, split: str, train: bool = False):
    """The finetune.task data set of ``split``; the training split takes finetune.split_file and
    finetune.fraction (the label fraction)."""
    f = cfg.finetune
    if f.task not in TASKS:
        raise ConfigError(f"finetune.task={f.task!r}: not a downstream task ({', '.join(TASKS)})")
    kw = {"fraction": f.fraction, "split_file": f.split_file} if split == "train" else {}
    return build_downstream(f.task, f.root, split, cfg.data.image_size, train=train, seed=cfg.seed,
                            **kw)


def is_segmentation(dataset) -> bool:
    return "mask" in dataset[0]


def train_loader(dataset, cfg, info) -> DataLoader:
    """Shuffled per epoch, sharded, resumable mid-epoch, full batches only; items carry "index"."""
    return loaders.train_loader(Indexed(dataset), cfg, info, collate_downstream)


def eval_loader(dataset, cfg, info) -> DataLoader:
    """In order, sharded over ranks (the last shards padded; scoring removes repeats by index)."""
    return loaders.eval_loader(Indexed(dataset), cfg, info, collate_downstream)


def apply_steps(cfg, steps_per_epoch: int) -> None:
    """finetune.steps > 0: optim.epochs = ceil(steps / steps per epoch) and optim.warmup_epochs =
    warmup_steps / steps per epoch (the official recipes count optimizer steps)."""
    f = cfg.finetune
    if f.steps > 0:
        cfg.optim.epochs = max(1, math.ceil(f.steps / steps_per_epoch))
        cfg.optim.warmup_epochs = f.warmup_steps / steps_per_epoch
        print(f"finetune.steps={f.steps} at {steps_per_epoch} steps per epoch: {cfg.optim.epochs} "
              f"epochs, warm-up {cfg.optim.warmup_epochs:.3f} epochs")


def prepare_finetune(cfg, info, run_dir) -> tuple[TrainingRun, bool]:
    """Data, the model (encoder from train.pretrained or model.vit.init: SS-ACL or MAE; else
    random init; a resumed run takes its checkpoint's ViT sizes and weights), DDP, optimizer,
    checkpointer (resumed from train.resume) and loaders. Returns the run and whether the task
    is segmentation."""
    train_set, val_set = build_split(cfg, "train", train=True), build_split(cfg, "val")
    seg = is_segmentation(val_set)
    print(f"{cfg.finetune.task}: train {len(train_set)} (fraction {cfg.finetune.fraction}, split "
          f"file {cfg.finetune.split_file}), val {len(val_set)}; "
          f"{'segmentation' if seg else f'{len(val_set.label_names)} labels'}")
    resumed = find_resume(cfg.train.resume, run_dir)
    path = cfg.train.pretrained or cfg.model.vit.init
    if resumed is not None:  # its weights replace the initial ones: take its ViT sizes, skip path
        cfg.model.vit = with_defaults("model", resumed[1]["config"]["model"], str(resumed[0])).vit
        path = None
    model = from_pretrained(path, cfg, 1 if seg else len(val_set.label_names), seg)
    model.to(info.device)
    print(f"model: {count_parameters(model)}; {cfg.finetune.mode}")
    model = wrap_ddp(model, cfg, info)
    optimizer, scaler = build_optimizer(cfg, unwrap(model), info, cfg.finetune.optimizer,
                                        cfg.finetune.momentum)
    loader = train_loader(train_set, cfg, info)
    apply_steps(cfg, len(loader) // cfg.optim.accum_iter)
    if is_main_process():
        save_config(cfg, run_dir / "config.yaml")
    checkpointer = Checkpointer(run_dir, cfg, model, optimizer, scaler)
    start_epoch, start_step = checkpointer.resume(resumed)
    run = TrainingRun(model, optimizer, scaler, checkpointer, loader,
                      eval_loader(val_set, cfg, info), start_epoch, start_step)
    return run, seg


@torch.no_grad()
def infer(model, loader, device, amp, segmentation: bool, mask_threshold: float = 0.5):
    """Per sample: classification (logits [C], labels [C]); segmentation (mask counts [3], mean
    pixel BCE). Gathered on rank 0 as arrays in data-set order (None elsewhere)."""
    net = unwrap(model)
    net.eval()
    dtype = resolve_amp(amp, device)
    rows = {}
    for batch in loader:
        if batch is None:  # no readable image in it
            continue
        batch = to_device(batch, device)
        with autocast(device, dtype):
            logits = net.logits(batch["image"]).float()
        if segmentation:
            mask = batch["mask"].float()
            counts = mask_counts(logits.sigmoid() >= mask_threshold, mask > 0.5)
            bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none").flatten(1).mean(1)
            out = zip(counts, bce.cpu().numpy())
        else:
            out = zip(logits.cpu().numpy(), batch["labels"].float().cpu().numpy())
        rows.update(zip(batch["index"].tolist(), out))
    gathered = gather_objects(rows)
    if gathered is None:
        return None
    merged = {k: v for part in gathered for k, v in part.items()}
    order = sorted(merged)
    return tuple(np.stack([merged[i][j] for i in order]) for j in range(2))


def classification_metrics(logits, labels, names, thresholds=None) -> dict:
    """AUROC (macro and per label), BCE loss, and accuracy / F1 at ``thresholds`` (None: chosen
    here, as on validation) of sigmoid scores."""
    scores = 1 / (1 + np.exp(-logits))
    per, macro = auroc(scores, labels)
    if thresholds is None:
        thresholds = choose_thresholds(scores, labels)
    af = accuracy_f1(scores, labels, thresholds)
    loss = F.binary_cross_entropy_with_logits(torch.as_tensor(logits), torch.as_tensor(labels))
    out = {"auroc": macro, "loss": float(loss), "accuracy": af["accuracy_macro"],
           "f1": af["f1_macro"], "n": int(len(labels))}
    for i, name in enumerate(names):
        out.update({f"auroc/{name}": per[i], f"f1/{name}": af["f1"][i],
                    f"accuracy/{name}": af["accuracy"][i], f"threshold/{name}": thresholds[i]})
    return out


def evaluate(model, loader, device, cfg, segmentation: bool, names=(), thresholds=None) -> dict:
    """The split's metrics on every rank (see classification_metrics, metrics.segmentation.dice_iou;
    segmentation adds loss = mean pixel BCE)."""
    res = infer(model, loader, device, cfg.train.amp, segmentation, cfg.finetune.mask_threshold)
    metrics = None
    if res is not None:
        if segmentation:
            metrics = {**dice_iou(res[0]), "loss": float(res[1].mean())}
        else:
            metrics = classification_metrics(res[0], res[1], names, thresholds)
    return broadcast_object(metrics)


def thresholds_of(metrics: dict, names) -> list[float]:
    return [metrics[f"threshold/{n}"] for n in names]
