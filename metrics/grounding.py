"""Grounding metrics of a heatmap against a region (box or mask): IoU over thresholds, CNR, pointing
game, Dice.

Heatmap and mask are 2-D arrays of the same shape (numpy or torch); the mask is boolean (nonzero =
inside). Boxes (MS-CXR: [x, y, w, h] in original-image pixels) are mapped through the same resize
and crop/pad as the image (:func:`transform_boxes`, :func:`box_to_mask`) before rasterising.
Conventions:
- IoU / Dice binarise the heatmap after min-max normalisation to [0, 1] as ``heat >= threshold`` (a
  constant heatmap normalises to all zeros). mIoU is the mean IoU over thresholds 0.1, 0.2, ...,
  0.9.
- CNR = |mean_in - mean_out| / sqrt(var_in + var_out) (BioViL / MS-CXR; population variances);
  invariant to affine rescaling of the heatmap. ``cnr(..., signed=True)`` keeps the sign of mean_in
  - mean_out, so a heatmap that avoids the region scores negative (the absolute CNR would reward
  it).
- Pointing game: the share of the heatmap's maximal pixels that lie in the region: 1/0 with a unique
  maximum; a flat heatmap scores the region's area fraction, i.e. chance, not a hit. ``tolerance``
  (pixels) counts a maximum within that Euclidean distance of the region as inside: Zhang et al.'s
  original pointing game (ECCV 2016) uses 15 px at ~224 px (:func:`zhang_tolerance` scales it to
  another image size).
Undefined values (empty region, region covering everything) are nan; :func:`aggregate` averages
ignoring nan.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import distance_transform_edt

# box geometry and the MS-CXR reader live in datasets (the grounding dataset uses them too)
from datasets.downstream.boxes import BOX_MODES as BOX_MODES
from datasets.downstream.boxes import box_to_mask as box_to_mask
from datasets.downstream.boxes import transform_boxes as transform_boxes
from datasets.downstream.mscxr import load_ms_cxr as load_ms_cxr

THRESHOLDS = tuple(round(t, 1) for t in np.arange(0.1, 1.0, 0.1))


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _pair(heatmap, mask) -> tuple[np.ndarray, np.ndarray]:
    h, m = _np(heatmap).astype(np.float64), _np(mask).astype(bool)
    h, m = np.squeeze(h), np.squeeze(m)
    if h.shape != m.shape or h.ndim != 2:
        raise ValueError(
            f"heatmap {h.shape} and mask {m.shape} must be 2-D arrays of the same shape"
        )
    return h, m


def normalize(heatmap) -> np.ndarray:
    """Min-max normalisation to [0, 1]; a constant map becomes all zeros."""
    h = _np(heatmap).astype(np.float64)
    lo, hi = np.nanmin(h), np.nanmax(h)
    return (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)


def _iou(pred: np.ndarray, mask: np.ndarray) -> float:
    union = np.logical_or(pred, mask).sum()
    return float(np.logical_and(pred, mask).sum() / union) if union else math.nan


def iou_at_thresholds(heatmap, mask, thresholds=THRESHOLDS) -> np.ndarray:
    """IoU of ``normalize(heatmap) >= t`` with the mask, for each threshold t."""
    h, m = _pair(heatmap, mask)
    if not m.any():
        return np.full(len(thresholds), math.nan)
    h = normalize(h)
    return np.array([_iou(h >= t, m) for t in thresholds])




def mean_iou(heatmap, mask, thresholds=THRESHOLDS) -> float:
    return float(np.mean(iou_at_thresholds(heatmap, mask, thresholds)))


def dice(heatmap, mask, threshold: float = 0.5) -> float:
    """Dice of ``normalize(heatmap) >= threshold`` with the mask (pass a 0/1 heatmap to score a hard
    mask)."""
    h, m = _pair(heatmap, mask)
    p = normalize(h) >= threshold
    denom = p.sum() + m.sum()
    return float(2 * np.logical_and(p, m).sum() / denom) if denom else math.nan


def cnr(heatmap, mask, signed: bool = False) -> float:
    """Contrast-to-noise ratio |mu_in - mu_out| / sqrt(var_in + var_out) (signed: mu_in -
    mu_out)."""
    h, m = _pair(heatmap, mask)
    inside, outside = h[m], h[~m]
    if inside.size == 0 or outside.size == 0:
        return math.nan
    diff = inside.mean() - outside.mean()
    denom = math.sqrt(inside.var() + outside.var())
    if denom == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff if signed else 1.0)
    return float(diff / denom if signed else abs(diff) / denom)


def pointing_game(heatmap, mask, tolerance: float = 0.0) -> float:
    """Share of the heatmap's maximal pixels inside the mask, or within ``tolerance`` pixels of it
    (1.0 = hit with a unique maximum)."""
    h, m = _pair(heatmap, mask)
    if not m.any():
        return math.nan
    top = h == np.nanmax(h)
    if tolerance > 0:
        m = distance_transform_edt(~m) <= tolerance
    return float(m[top].mean())


def zhang_tolerance(image_size: int) -> float:
    """The original pointing game's 15 px tolerance at 224 px, scaled to ``image_size`` pixels."""
    return 15.0 * image_size / 224.0


def grounding_metrics(heatmap, mask, thresholds=THRESHOLDS, dice_threshold: float = 0.5) -> dict:
    """All metrics of one heatmap/region pair: iou@t, mIoU, CNR (abs and signed), pointing game,
    Dice."""
    ious = iou_at_thresholds(heatmap, mask, thresholds)
    out = {f"iou@{t:g}": float(v) for t, v in zip(thresholds, ious)}
    out.update(
        miou=float(np.mean(ious)),
        cnr=cnr(heatmap, mask),
        cnr_signed=cnr(heatmap, mask, signed=True),
        pointing_game=pointing_game(heatmap, mask),
        dice=dice(heatmap, mask, dice_threshold),
    )
    return out


def aggregate(rows: list[dict]) -> dict:
    """Mean of each metric over samples, ignoring nan (and +-inf for CNR), plus ``n`` counted
    samples."""
    out: dict = {"n": len(rows)}
    for k in rows[0] if rows else []:
        vals = np.array([r[k] for r in rows], dtype=float)
        vals = vals[np.isfinite(vals)]
        out[k] = float(vals.mean()) if vals.size else math.nan
    return out
