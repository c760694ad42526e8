"""Segmentation metrics over a data set, from binary predicted and true masks: Dice and IoU pooled
over every pixel of the set (the figure fine-tuning papers report for SIIM), their per-image means
(an image with both masks empty scores 1), and Dice over the images with a finding. Per-image
counts are kept, so shards of a data set (ranks) merge exactly. (metrics/grounding.py scores
heatmaps against one mask; this scores predicted masks.)"""
from __future__ import annotations

import numpy as np
import torch


def mask_counts(pred, target) -> np.ndarray:
    """[B, ...] binary predicted and true masks -> [B, 3] per-image (intersection, predicted,
    true) pixel counts."""
    p = torch.as_tensor(pred).bool().flatten(1)
    t = torch.as_tensor(target).bool().flatten(1)
    if p.shape != t.shape:
        raise ValueError(f"predicted masks {tuple(p.shape)} and true masks {tuple(t.shape)} differ")
    return torch.stack([(p & t).sum(1), p.sum(1), t.sum(1)], 1).cpu().numpy().astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 1 where den is 0 (both masks empty: a perfect match)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.ones_like(num), where=den > 0)


def dice_iou(counts) -> dict:
    """[N, 3] counts of ``mask_counts`` (a whole data set) -> dice, iou (pooled over pixels),
    dice_mean, iou_mean (per image), dice_positive (per image, images with a true mask), n."""
    c = np.asarray(counts, dtype=np.int64).reshape(-1, 3)
    inter, pred, true = c[:, 0], c[:, 1], c[:, 2]
    union = pred + true - inter
    dice_img = _ratio(2 * inter, pred + true)
    iou_img = _ratio(inter, union)
    pos = true > 0
    return {
        "dice": float(_ratio(2 * inter.sum(), pred.sum() + true.sum())),
        "iou": float(_ratio(inter.sum(), union.sum())),
        "dice_mean": float(dice_img.mean()) if len(c) else float("nan"),
        "iou_mean": float(iou_img.mean()) if len(c) else float("nan"),
        "dice_positive": float(dice_img[pos].mean()) if pos.any() else float("nan"),
        "n": int(len(c)),
    }
