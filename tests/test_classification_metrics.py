"""metrics/classification.py: AUROC equal to hand-computed values (ties count 1/2) and to sklearn,
labels with one class skipped from the macro mean; F1-maximising thresholds chosen on one set
and applied to another."""
import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from metrics.classification import accuracy_f1, auroc, choose_thresholds


def test_auroc_by_hand_with_ties():
    # positives 0.8, 0.4; negatives 0.4, 0.1, 0.3: pairs (pos > neg) = 3 + 1 + 0.5 (tie) of 6
    scores = [0.8, 0.4, 0.4, 0.1, 0.3]
    labels = [1, 1, 0, 0, 0]
    per, macro = auroc(scores, labels)
    assert per == [pytest.approx(5.5 / 6)] and macro == pytest.approx(5.5 / 6)


def test_auroc_matches_sklearn_and_skips_one_class_labels():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((60, 4)), 1)  # many ties
    labels = (rng.random((60, 4)) < 0.3).astype(int)
    labels[:, 3] = 0  # no positive: undefined
    per, macro = auroc(scores, labels)
    expected = [roc_auc_score(labels[:, c], scores[:, c]) for c in range(3)]
    assert per[:3] == pytest.approx(expected) and per[3] is None
    assert macro == pytest.approx(np.mean(expected))
    assert np.isnan(auroc([0.1, 0.9], [[1], [1]])[1])


def test_thresholds_maximise_f1_and_apply_unchanged():
    rng = np.random.default_rng(1)
    scores = np.round(rng.random((80, 3)), 2)
    labels = (rng.random((80, 3)) < 0.4).astype(int)
    t = choose_thresholds(scores, labels)
    out = accuracy_f1(scores, labels, t)
    for c in range(3):
        best = max(f1_score(labels[:, c], scores[:, c] >= u) for u in np.unique(scores[:, c]))
        assert out["f1"][c] == pytest.approx(best)
        assert out["accuracy"][c] == pytest.approx(np.mean((scores[:, c] >= t[c]) == labels[:, c]))
    assert out["f1_macro"] == pytest.approx(np.mean(out["f1"]))
    # by hand: positives at 0.9 and 0.6, a negative at 0.7 -> cut 0.6 (F1 0.8) beats 0.9 (2/3)
    assert choose_thresholds([0.9, 0.7, 0.6, 0.2], [1, 0, 1, 0]) == [0.6]
    assert choose_thresholds([0.3, 0.2], [0, 0], default=0.5) == [0.5]


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="shape"):
        auroc(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="0/1"):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="2 thresholds for 1 labels"):
        accuracy_f1([0.1, 0.2], [0, 1], [0.5, 0.5])
