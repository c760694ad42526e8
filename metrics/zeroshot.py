"""Zero-shot scores and their figures: classification from (positive, negative) prompt pairs and
phrase grounding under the official SS-ACL / BioViL protocol.

Classification: for label c the image vector z is compared with the positive and the negative
prompt vectors (all L2-normalised); the score is softmax over (pos, neg) of scale * cosine, its
positive entry: sigmoid(scale * (z.p_c - z.n_c)). AUROC per label and macro (metrics/
classification.py), accuracy / F1 at per-label thresholds chosen on validation; on one-hot data
(CheXpert 5x200) also the top-1 accuracy of the arg-max label.

Grounding (official, eval/common.py of SS-ACL): the map is min-max normalised to [-1, 1], each
threshold t in 0.1 .. 0.5 binarises it as map > t (= the [0, 1] map above (t + 1) / 2) and mIoU is
the mean IoU over the five; CNR is |mean_in - mean_out| / sqrt(var_in + var_out); the pointing game
is hit (1) when the map's maximum lies in the box.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from metrics.classification import accuracy_f1, auroc
from metrics.grounding import cnr, iou_at_thresholds, pointing_game

OFFICIAL_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)


def prompt_scores(images: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """images [N, D], positive / negative [C, D] (all normalised) -> [N, C] softmax(pos, neg)[pos]."""
    return torch.sigmoid(scale * (images @ positive.T - images @ negative.T))


def classification_metrics(scores, labels, label_names, thresholds) -> dict:
    """AUROC (per label, macro over labels with both classes), accuracy / F1 at ``thresholds``
    (per label and macro), and top-1 accuracy when every row of ``labels`` is one-hot."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=float)
    per, macro = auroc(s, y)
    at = accuracy_f1(s, y, thresholds)
    out = {"auroc_macro": macro, "accuracy_macro": at["accuracy_macro"], "f1_macro": at["f1_macro"],
           "num_images": int(len(s))}
    for i, name in enumerate(label_names):
        if per[i] is not None:
            out[f"auroc/{name}"] = per[i]
        out[f"f1/{name}"], out[f"threshold/{name}"] = at["f1"][i], float(thresholds[i])
    if len(y) and (y.sum(1) == 1).all():
        out["top1_accuracy"] = float((s.argmax(1) == y.argmax(1)).mean())
    return out


def official_grounding(heatmap, mask, thresholds=OFFICIAL_THRESHOLDS) -> dict:
    """One map / box pair under the official protocol (module docstring); nan for an empty box."""
    cuts = tuple((t + 1.0) / 2.0 for t in thresholds)  # [-1, 1] thresholds on the [0, 1] map
    ious = iou_at_thresholds(heatmap, mask, cuts)
    out = {f"iou@{t:g}": float(v) for t, v in zip(thresholds, ious)}
    out.update(miou=float(np.mean(ious)), cnr=cnr(heatmap, mask),
               pointing_game=float(pointing_game(heatmap, mask) > 0) if np.asarray(mask).any()
               else math.nan)
    return out


def summarize(rows: list[dict], by: str = "label") -> dict:
    """Mean of every metric over the rows (nan and inf ignored), and per ``by`` group as
    ``by_label/<group>/<metric>`` (mIoU, CNR); ``n`` counts the rows."""
    def mean(group):
        out = {}
        for k in group[0]:
            if k == by:
                continue
            v = np.array([r[k] for r in group], dtype=float)
            v = v[np.isfinite(v)]
            out[k] = float(v.mean()) if v.size else math.nan
        return out

    if not rows:
        return {"n": 0}
    out = {"n": len(rows), **mean(rows)}
    for g in sorted({r[by] for r in rows}):
        group = [r for r in rows if r[by] == g]
        out.update({f"by_label/{g}/{k}": v for k, v in mean(group).items() if k in ("miou", "cnr")})
    return out
