"""Cross-modal retrieval metrics over a similarity matrix ``sim [Nq, Nc]`` (row = query, column =
candidate), as the CheXpert 5x200 papers (GLoRIA, MGCA, SS-ACL) report them:

- Precision@K (label-based): the share of the top-K candidates whose class equals the query's,
  averaged over the queries; chance is the class frequency (0.2 on 5x200).
- Recall@K (instance-based): the share of queries whose own paired candidate (``targets``) is
  among the top K.

The top K are taken by descending similarity, ties broken by the lower candidate index.
"""
from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def top_k(sim, k: int) -> np.ndarray:
    """[Nq, min(k, Nc)] candidate indices by descending similarity (stable on ties)."""
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"similarity must be [queries, candidates], got shape {s.shape}")
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def precision_at_k(sim, query_labels, candidate_labels, k: int) -> float:
    """Mean over queries of (top-K candidates with the query's class) / K."""
    top = top_k(sim, k)
    q, c = np.asarray(query_labels), np.asarray(candidate_labels)
    if len(q) != top.shape[0] or len(c) != np.asarray(sim).shape[1]:
        raise ValueError(f"{len(q)} query and {len(c)} candidate labels for similarity "
                         f"{np.asarray(sim).shape}")
    return float((c[top] == q[:, None]).sum(1).mean() / k)


def recall_at_k(sim, targets, k: int) -> float:
    """Share of queries whose paired candidate ``targets[i]`` is among their top K."""
    top = top_k(sim, k)
    t = np.asarray(targets)
    if len(t) != top.shape[0]:
        raise ValueError(f"{len(t)} targets for {top.shape[0]} queries")
    return float((top == t[:, None]).any(1).mean())


def retrieval_metrics(sim, query_labels, candidate_labels, targets=None, ks=KS) -> dict:
    """{"P@K", "R@K"} for every K in ``ks``; ``targets`` default: query i is paired with candidate
    i (a square matrix of image i and its own text i)."""
    if targets is None:
        targets = np.arange(np.asarray(sim).shape[0])
    out = {}
    for k in ks:
        out[f"P@{k}"] = precision_at_k(sim, query_labels, candidate_labels, k)
        out[f"R@{k}"] = recall_at_k(sim, targets, k)
    return out
