"""One prepared study as an R2Gen annotation record, the same for every raw source.

``make_record`` fills ``labels`` (given, e.g. MIMIC's CheXpert CSV, else the project's rule
labeler on the report) and ``anatomies`` (the leaves of the anatomy graph where the report places
its findings: ``finding_anatomies``, the parser the datasets use). It returns the reason instead
of a record when the report text is empty once cleaned.
"""
from __future__ import annotations

import functools

import numpy as np

from vocab.anatomy_graph import AnatomyGraph
from vocab.finding_sites import finding_anatomies
from vocab.labeler import RuleLabeler
from vocab.report_text import clean_report


@functools.cache
def _labeler() -> RuleLabeler:
    return RuleLabeler()


def report_leaves(report: str, graph: AnatomyGraph) -> list[str]:
    """Leaves (graph order) under the nodes ``finding_anatomies`` reads in the report."""
    nodes = finding_anatomies(report, graph)
    leaves = {leaf for n in nodes for leaf in graph.leaves_under(n)}
    return [n for n in graph.leaf_names if n in leaves]


def make_record(
    rid: str,
    report: str,
    image_path: list[str],
    views: list[str],
    split: str,
    labels: list | None = None,
    graph: AnatomyGraph | None = None,
    **extra,
) -> tuple[dict | None, str]:
    """(record, "") or (None, reason). ``labels``: 14 values in the project's order or None."""
    if not clean_report(report):
        return None, "empty report text in the chosen sections"
    if not image_path:
        return None, "no image"
    graph = graph or AnatomyGraph.default()
    if labels is None:
        labels = [None if np.isnan(v) else float(v) for v in _labeler().label_one(report)]
    rec = {
        "id": rid,
        "report": report,
        "image_path": list(image_path),
        "views": list(views),
        "labels": labels,
        "anatomies": report_leaves(report, graph),
        "split": split,
    }
    rec.update(extra)
    return rec, ""
