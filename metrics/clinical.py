"""Clinical efficacy: the precision/recall/F1 flavours papers report, over CheXpert labels of the
generated and the reference reports, labelled by the same labeler (the rule labeler of
vocab/labeler.py, or CheXbert from a local checkpoint, metrics/chexbert.py)."""
from __future__ import annotations

import numpy as np

from metrics.chexbert import CheXbertLabeler
from vocab.labeler import POSITIVE, UNCERTAIN, RuleLabeler
from vocab.observations import CHEXPERT_OBSERVATIONS, COMMON_OBSERVATIONS, OBSERVATION_INDEX


def binarize(labels, uncertain_as: str = "negative") -> np.ndarray:
    """Labeler output -> int {0,1}: positive 1; uncertain 1 or 0 per ``uncertain_as``;
    negative/nan 0."""
    if uncertain_as not in ("negative", "positive"):
        raise ValueError(f"uncertain_as must be 'negative' or 'positive', got {uncertain_as!r}")
    arr = np.asarray(labels, dtype=float)
    out = arr == POSITIVE
    if uncertain_as == "positive":
        out |= arr == UNCERTAIN
    return out.astype(int)


def _safe_div(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b != 0)


def _prf(tp, fp, fn) -> tuple:
    """Precision, recall, F1 with 0 where undefined (sklearn's zero_division=0)."""
    return _safe_div(tp, tp + fp), _safe_div(tp, tp + fn), _safe_div(2 * tp, 2 * tp + fp + fn)


def _flavours(pred: np.ndarray, ref: np.ndarray) -> dict:
    tp = (pred & ref).sum(0)
    fp = (pred & ~ref).sum(0)
    fn = (~pred & ref).sum(0)
    micro = _prf(tp.sum(), fp.sum(), fn.sum())
    macro = [x.mean() for x in _prf(tp, fp, fn)]
    per_sample = _prf((pred & ref).sum(1), (pred & ~ref).sum(1), (~pred & ref).sum(1))
    example = [x.mean() if len(x) else 0.0 for x in per_sample]
    names = ("precision", "recall", "f1")
    return {
        "micro": dict(zip(names, map(float, micro))),
        "macro": dict(zip(names, map(float, macro))),
        "example": dict(zip(names, map(float, example))),
    }


def clinical_efficacy(pred_labels, ref_labels, uncertain_as: str = "negative",
                      common: tuple = COMMON_OBSERVATIONS) -> dict:
    """Clinical-efficacy precision/recall/F1 of predicted against reference CheXpert labels, every
    flavour.

    Inputs: [N, 14] arrays in labeler convention (1/0/-1/nan) or already 0/1, same study order. Both
    sides are binarized the same way (positive = 1; uncertain per ``uncertain_as``; negative and not
    mentioned = 0). Flavours, each over all 14 observations ("all") and over the 5 common ones
    ("common"):
      micro   - TP/FP/FN pooled over observations and studies (sklearn average="micro"),
      macro   - per-observation P/R/F1, then their mean (sklearn average="macro"; F1 is the mean of F1s),
      example - per-study P/R/F1 over the observations, then their mean (sklearn average="samples").
    Undefined ratios (0/0) count as 0, i.e. sklearn's zero_division=0; so a study with no positive
    reference or prediction among the observations scores 0 in the example-based flavour.
    """
    pred = binarize(pred_labels, uncertain_as).astype(bool)
    ref = binarize(ref_labels, uncertain_as).astype(bool)
    if pred.shape != ref.shape or pred.ndim != 2 or pred.shape[1] != len(CHEXPERT_OBSERVATIONS):
        raise ValueError(f"expected two [N, 14] arrays, got {pred.shape} and {ref.shape}")
    cols = [OBSERVATION_INDEX[o] for o in common]
    tp, fp, fn = (pred & ref).sum(0), (pred & ~ref).sum(0), (~pred & ref).sum(0)
    p, r, f = _prf(tp, fp, fn)
    per_obs = {
        o: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(ref[:, i].sum()),
            "predicted": int(pred[:, i].sum()),
            "tp": int(tp[i]),
        }
        for i, o in enumerate(CHEXPERT_OBSERVATIONS)
    }
    return {
        "n": int(pred.shape[0]),
        "uncertain_as": uncertain_as,
        "common_observations": list(common),
        "all": _flavours(pred, ref),
        "common": _flavours(pred[:, cols], ref[:, cols]),
        "per_observation": per_obs,
    }


def ce_summary(ce: dict) -> dict[str, float]:
    """Flat names for logging, e.g. ``ce_micro_f1_14``, ``ce_macro_precision_5``,
    ``ce_example_recall_14``."""
    out = {}
    for group, suffix in (("all", "14"), ("common", "5")):
        for flavour in ("micro", "macro", "example"):
            for k, v in ce[group][flavour].items():
                out[f"ce_{flavour}_{k}_{suffix}"] = v
    return out


def format_table(ce: dict, labeler: str | None = None) -> str:
    """Every flavour side by side, then per-observation P/R/F1 with counts."""
    head = (
        f"Clinical efficacy ({f'labeler: {labeler}, ' if labeler else ''}uncertain as {ce['uncertain_as']}, "
        f"{ce['n']} studies; 0/0 counts as 0)"
    )
    lines = [head, f"{'':15}| {'all 14 observations':^26} | {'5 common observations':^26}",
             f"{'':15}| {'P':>8}{'R':>9}{'F1':>9} | {'P':>8}{'R':>9}{'F1':>9}"]
    for flavour, name in (("micro", "micro"), ("macro", "macro"), ("example", "example-based")):
        a, c = ce["all"][flavour], ce["common"][flavour]
        lines.append(f"{name:15}| {a['precision']:8.4f} {a['recall']:8.4f} {a['f1']:8.4f} | "
                     f"{c['precision']:8.4f} {c['recall']:8.4f} {c['f1']:8.4f}")
    lines += [
        "",
        f"{'observation':28}{'P':>8}{'R':>8}{'F1':>8}{'ref pos':>9}{'pred pos':>10}{'TP':>7}",
    ]
    for o, m in ce["per_observation"].items():
        star = "*" if o in ce["common_observations"] else " "
        lines.append(f"{o + star:28}{m['precision']:8.4f}{m['recall']:8.4f}{m['f1']:8.4f}"
                     f"{m['support']:9d}{m['predicted']:10d}{m['tp']:7d}")
    lines.append("(* = one of the 5 common observations)")
    return "\n".join(lines)


def build_labeler(
    name: str = "rule",
    chexbert_path: str | None = None,
    chexbert_bert: str | None = None,
    device="cpu",
    batch_size: int = 32,
):
    """``"rule"`` -> RuleLabeler(); ``"chexbert"`` -> CheXbertLabeler from local files (never
    downloads)."""
    if name == "rule":
        return RuleLabeler()
    if name == "chexbert":
        if not chexbert_path:
            raise ValueError("labeler 'chexbert' needs a local checkpoint path "
                             "(eval.chexbert_path / --chexbert-path)")
        return CheXbertLabeler(
            chexbert_path, bert_dir=chexbert_bert, device=device, batch_size=batch_size
        )
    raise ValueError(f"unknown labeler {name!r} (rule | chexbert)")


def labeler_from_config(eval_cfg, device="cpu"):
    """The labeler of ``cfg.eval``."""
    e = eval_cfg
    return build_labeler(e.labeler, e.chexbert_path, e.chexbert_bert, device, e.chexbert_batch_size)
