"""metrics/retrieval.py against values computed by hand."""
import numpy as np
import pytest

from metrics.retrieval import precision_at_k, recall_at_k, retrieval_metrics, top_k

# 3 queries x 4 candidates; classes: queries [0, 1, 0], candidates [0, 1, 1, 0]; pairs i <-> i
SIM = np.array([[0.9, 0.1, 0.8, 0.2],    # order 0, 2, 3, 1
                [0.3, 0.2, 0.7, 0.1],    # order 2, 0, 1, 3
                [0.5, 0.6, 0.6, 0.4]])   # order 1, 2 (tie: lower index first), 0, 3
Q, C = np.array([0, 1, 0]), np.array([0, 1, 1, 0])


def test_top_k_order_and_ties():
    assert top_k(SIM, 2).tolist() == [[0, 2], [2, 0], [1, 2]]
    assert top_k(SIM, 10).shape == (3, 4)  # K beyond the candidates: all of them


def test_precision_by_hand():
    # K=1: q0 -> c0 (class 0 = 0: hit), q1 -> c2 (1 = 1: hit), q2 -> c1 (1 != 0: miss)
    assert precision_at_k(SIM, Q, C, 1) == pytest.approx(2 / 3)
    # K=2: q0 {c0 0, c2 1} 1/2; q1 {c2 1, c0 0} 1/2; q2 {c1 1, c2 1} 0/2
    assert precision_at_k(SIM, Q, C, 2) == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    # K=3: q0 {0,2,3} classes 0,1,0 -> 2/3; q1 {2,0,1} -> 1,0,1 -> 2/3; q2 {1,2,0} -> 1,1,0 -> 1/3
    assert precision_at_k(SIM, Q, C, 3) == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)


def test_recall_by_hand():
    # own candidate i: q0 -> 0 at rank 1; q1 -> 1 at rank 3; q2 -> 2 at rank 2
    assert recall_at_k(SIM, [0, 1, 2], 1) == pytest.approx(1 / 3)
    assert recall_at_k(SIM, [0, 1, 2], 2) == pytest.approx(2 / 3)
    assert recall_at_k(SIM, [0, 1, 2], 3) == pytest.approx(1.0)


def test_retrieval_metrics_keys_and_defaults():
    out = retrieval_metrics(SIM, Q, C, ks=(1, 2))
    assert set(out) == {"P@1", "R@1", "P@2", "R@2"}
    assert out["R@2"] == pytest.approx(2 / 3)  # default targets: query i <-> candidate i
    # a perfect square matrix: every metric at its maximum
    eye = np.eye(5)
    perfect = retrieval_metrics(eye, np.arange(5), np.arange(5), ks=(1,))
    assert perfect == {"P@1": 1.0, "R@1": 1.0}


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="labels"):
        precision_at_k(SIM, Q[:2], C, 1)
    with pytest.raises(ValueError, match="targets"):
        recall_at_k(SIM, [0, 1], 1)
    with pytest.raises(ValueError, match="K must be"):
        top_k(SIM, 0)
