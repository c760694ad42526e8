"""Evaluation metrics users compare with papers: language (pycocoevalcap), clinical efficacy (CheXpert labels,
every P/R/F1 flavour), grounding (IoU/CNR/pointing game/Dice, MS-CXR). Command line: ``python -m utils.metrics``."""
from .clinical import (RuleLabeler, binarize, build_labeler, ce_summary, clinical_efficacy, format_table,
                       labeler_from_config)
from .grounding import (aggregate, box_to_mask, cnr, dice, grounding_metrics, iou_at_thresholds,
                        iou_over_thresholds, load_ms_cxr, mean_iou, pointing_game, transform_boxes)
from .nlg import METRICS, java_available, ptb_tokenize, score_nlg
from .observations import CHEXPERT_OBSERVATIONS, COMMON_OBSERVATIONS

__all__ = [
    "CHEXPERT_OBSERVATIONS", "COMMON_OBSERVATIONS", "METRICS", "CheXbertLabeler", "RuleLabeler", "aggregate",
    "binarize", "box_to_mask", "build_labeler", "ce_summary", "clinical_efficacy", "cnr", "dice", "format_table",
    "grounding_metrics", "iou_at_thresholds", "iou_over_thresholds", "java_available", "labeler_from_config",
    "load_ms_cxr", "mean_iou", "pointing_game", "ptb_tokenize", "score_nlg", "transform_boxes",
]


def __getattr__(name):  # CheXbert needs torch + transformers: imported on first use only
    if name == "CheXbertLabeler":
        from .chexbert import CheXbertLabeler
        return CheXbertLabeler
    raise AttributeError(f"module 'utils.metrics' has no attribute {name!r}")
