"""Clinical efficacy: every P/R/F1 flavour against hand-computed values and sklearn."""
import math

import numpy as np
import pytest

from metrics.clinical import binarize, ce_summary, clinical_efficacy, format_table
from vocab.observations import COMMON_OBSERVATIONS, OBSERVATION_INDEX

NAN = math.nan


def _labels(rows):
    out = np.full((len(rows), 14), NAN)
    for r, d in enumerate(rows):
        for obs, v in d.items():
            out[r, OBSERVATION_INDEX[obs]] = v
    return out


REF = _labels(
    [{"Cardiomegaly": 1, "Edema": 1}, {"Pleural Effusion": 1, "Atelectasis": -1}, {"No Finding": 1}]
)


PRED = _labels(
    [
        {"Cardiomegaly": 1, "Pleural Effusion": 1},
        {"Pleural Effusion": 1, "Atelectasis": 1},
        {"Edema": -1, "No Finding": 1},
    ]
)


def test_binarize():
    x = np.array([[1, 0, -1, NAN]])
    assert binarize(x).tolist() == [[1, 0, 0, 0]]
    assert binarize(x, "positive").tolist() == [[1, 0, 1, 0]]
    with pytest.raises(ValueError):
        binarize(x, "ignore")


def test_clinical_efficacy_hand_computed():
    ce = clinical_efficacy(PRED, REF)
    a, c = ce["all"], ce["common"]
    # all 14: TP 3 (CM s0, PE s1, NF s2), FP 2 (PE s0, AT s1), FN 1 (ED s0)
    assert a["micro"] == pytest.approx({"precision": 3 / 5, "recall": 3 / 4, "f1": 6 / 9})
    # per class F1: CM 1, NF 1, PE 2/3 (P 1/2, R 1), everything else 0 -> mean over 14
    assert a["macro"] == pytest.approx(
        {"precision": 2.5 / 14, "recall": 3 / 14, "f1": (8 / 3) / 14}
    )
    # per study: s0 P R F 1/2; s1 P 1/2 R 1 F 2/3; s2 all 1
    assert a["example"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2.5 / 3, "f1": (0.5 + 2 / 3 + 1) / 3}
    )
    # the 5 common: TP 2, FP 2, FN 1; s2 has nothing among them -> 0 (zero_division=0)
    assert c["micro"] == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7})
    assert c["macro"] == pytest.approx({"precision": 1.5 / 5, "recall": 2 / 5, "f1": 1 / 3})
    assert c["example"] == pytest.approx(
        {"precision": 1 / 3, "recall": 0.5, "f1": (0.5 + 2 / 3) / 3}
    )
    pe = ce["per_observation"]["Pleural Effusion"]
    assert (pe["support"], pe["predicted"], pe["tp"]) == (1, 2, 1) and pe["f1"] == pytest.approx(
        2 / 3
    )
    # uncertain counted as positive: AT s1 becomes a TP, ED s2 a FP
    pos = clinical_efficacy(PRED, REF, uncertain_as="positive")
    assert pos["all"]["micro"] == pytest.approx({"precision": 4 / 6, "recall": 4 / 5, "f1": 8 / 11})
    flat = ce_summary(ce)
    assert flat["ce_micro_f1_14"] == pytest.approx(6 / 9) and flat[
        "ce_macro_precision_5"
    ] == pytest.approx(0.3)
    assert len(flat) == 18


@pytest.mark.parametrize("uncertain_as", ["negative", "positive"])
def test_clinical_efficacy_equals_sklearn(uncertain_as):
    from sklearn.metrics import precision_recall_fscore_support
    rng = np.random.default_rng(0)
    vals = np.array([1.0, 0.0, -1.0, NAN])
    pred = vals[rng.integers(0, 4, (60, 14))]
    ref = vals[rng.choice(4, (60, 14), p=[0.15, 0.3, 0.05, 0.5])]
    ref[:, 3] = NAN  # an observation never positive in the references
    pred[:5] = NAN  # studies predicting nothing
    ce = clinical_efficacy(pred, ref, uncertain_as)
    cols = [OBSERVATION_INDEX[o] for o in COMMON_OBSERVATIONS]
    for group, sl in (("all", slice(None)), ("common", cols)):
        p, r = binarize(pred, uncertain_as)[:, sl], binarize(ref, uncertain_as)[:, sl]
        for flavour, avg in (("micro", "micro"), ("macro", "macro"), ("example", "samples")):
            sp, sr, sf, _ = precision_recall_fscore_support(r, p, average=avg, zero_division=0)
            got = ce[group][flavour]
            assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(
                (sp, sr, sf), abs=1e-12
            )


def test_format_table_side_by_side():
    text = format_table(clinical_efficacy(PRED, REF), "rule")
    assert "all 14 observations" in text and "5 common observations" in text
    for row in ("micro", "macro", "example-based"):
        assert any(line.startswith(row) for line in text.splitlines())
    assert "0.6000   0.7500   0.6667" in text  # micro over 14
    assert "Pleural Effusion*" in text
