"""Boxes through the image transform: [x, y, w, h] in original-image pixels -> the model input's
pixels (:func:`transform_boxes`) -> a boolean mask of their union (:func:`box_to_mask`).

Pixel convention: pixel column c covers [c, c + 1), so a box [x, y, w, h] of whole pixels covers
columns x .. x + w - 1 and rows y .. y + h - 1 (:func:`mask_to_box` is its inverse).
"""
from __future__ import annotations

import math

import numpy as np

BOX_MODES = ("resize", "center_crop", "pad")


def _size_hw(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def transform_boxes(boxes_xywh, orig_hw: tuple[int, int], size, mode: str = "resize") -> np.ndarray:
    """Map [K, 4] boxes (x, y, w, h in original pixels) to [K, 4] (x1, y1, x2, y2) in output pixels.

    ``orig_hw`` = (height, width) of the original image; ``size`` = int or (h, w) of the model
    input. Modes:
      resize      - stretch to (h, w): this project's eval transform (datasets/cxr.py, Resize((s, s)));
      center_crop - torchvision Resize(int) (shorter side -> size, longer side int(size * long / short)),
                    then CenterCrop(size) (offset int(round((new - size) / 2)));
      pad         - longer side -> size (shorter side round(size * short / long)), centred zero padding
                    (offset (size - new) // 2).
    """
    if mode not in BOX_MODES:
        raise ValueError(f"mode must be one of {BOX_MODES}, got {mode!r}")
    b = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    H, W = orig_hw
    oh, ow = _size_hw(size)
    if mode == "resize":
        sy, sx, top, left = oh / H, ow / W, 0.0, 0.0
    elif mode == "center_crop":
        if oh != ow:
            raise ValueError("center_crop needs a square size")
        short, long = min(H, W), max(H, W)
        new_long = int(oh * long / short)
        nh, nw = (oh, new_long) if H <= W else (new_long, oh)
        sy, sx = nh / H, nw / W
        top, left = -int(round((nh - oh) / 2.0)), -int(round((nw - ow) / 2.0))
    else:
        if oh != ow:
            raise ValueError("pad needs a square size")
        scale = oh / max(H, W)
        nh, nw = int(round(H * scale)), int(round(W * scale))
        sy, sx = nh / H, nw / W
        top, left = (oh - nh) // 2, (ow - nw) // 2
    x1, y1 = b[:, 0] * sx + left, b[:, 1] * sy + top
    x2, y2 = (b[:, 0] + b[:, 2]) * sx + left, (b[:, 1] + b[:, 3]) * sy + top
    return np.stack([x1, y1, x2, y2], axis=1)


def box_to_mask(boxes_xywh, orig_hw: tuple[int, int], size, mode: str = "resize") -> np.ndarray:
    """Boolean [h, w] mask of the union of the boxes after :func:`transform_boxes`.

    A pixel is inside when its centre is: columns ceil(x1 - 0.5) .. ceil(x2 - 0.5) - 1, clipped to
    the image.
    """
    oh, ow = _size_hw(size)
    mask = np.zeros((oh, ow), dtype=bool)
    for x1, y1, x2, y2 in transform_boxes(boxes_xywh, orig_hw, size, mode):
        c0, c1 = max(0, math.ceil(x1 - 0.5)), min(ow, math.ceil(x2 - 0.5))
        r0, r1 = max(0, math.ceil(y1 - 0.5)), min(oh, math.ceil(y2 - 0.5))
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def mask_to_box(mask) -> list[int] | None:
    """[x, y, w, h] of the smallest box of whole pixels around a boolean mask; None if empty."""
    m = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
