"""Multi-label classification metrics as fine-tuning papers report them: AUROC per label and its
macro mean over the labels that have both classes, and accuracy/F1 at per-label thresholds chosen
on validation (the F1-maximising score cut), applied unchanged to test."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _as_2d(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=float)
    if s.ndim == 1:
        s, y = s[:, None], y[:, None] if y.ndim == 1 else y
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1")
    return s, y.astype(bool)


def _binary_auroc(s: np.ndarray, y: np.ndarray) -> float | None:
    """Mann-Whitney U / (n_pos * n_neg), ties counted 1/2 (sklearn's roc_auc_score)."""
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def auroc(scores, labels) -> tuple[list[float | None], float]:
    """[N, C] scores (any monotone scale) and 0/1 labels -> (per-label AUROC, None where a label
    has one class only; macro mean over the others, nan if none)."""
    s, y = _as_2d(scores, labels)
    per = [_binary_auroc(s[:, c], y[:, c]) for c in range(s.shape[1])]
    valid = [a for a in per if a is not None]
    return per, float(np.mean(valid)) if valid else float("nan")


def _f1(pred: np.ndarray, y: np.ndarray) -> float:
    tp = float((pred & y).sum())
    denom = float(pred.sum() + y.sum())
    return 2 * tp / denom if denom else 0.0


def choose_thresholds(scores, labels, default: float = 0.5) -> list[float]:
    """Per label, the score cut t (predict positive when score >= t) maximising F1 on these
    (validation) samples; ties go to the highest cut. A label with no positive keeps ``default``."""
    s, y = _as_2d(scores, labels)
    out = []
    for c in range(s.shape[1]):
        sc, yc = s[:, c], y[:, c]
        if not yc.any():
            out.append(float(default))
            continue
        order = np.argsort(-sc, kind="stable")
        ss, yy = sc[order], yc[order]
        tp = np.cumsum(yy)
        k = np.arange(1, len(ss) + 1)
        last = np.r_[ss[1:] != ss[:-1], True]   # cut only between distinct scores
        f1 = np.where(last, 2 * tp / (k + yc.sum()), -1.0)
        best = int(np.argmax(f1))               # first max = highest cut
        out.append(float(ss[best]))
    return out


def accuracy_f1(scores, labels, thresholds) -> dict:
    """Accuracy and F1 per label at the given cuts (score >= t is positive), and their macro means."""
    s, y = _as_2d(scores, labels)
    t = np.asarray(thresholds, dtype=float).reshape(-1)
    if len(t) != s.shape[1]:
        raise ValueError(f"{len(t)} thresholds for {s.shape[1]} labels")
    pred = s >= t[None, :]
    acc = [float((pred[:, c] == y[:, c]).mean()) for c in range(s.shape[1])]
    f1 = [_f1(pred[:, c], y[:, c]) for c in range(s.shape[1])]
    return {"accuracy": acc, "f1": f1,
            "accuracy_macro": float(np.mean(acc)), "f1_macro": float(np.mean(f1))}
