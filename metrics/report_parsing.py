"""How well the project's report-text parsers read real and synthetic reports.

Against a gold file (``tests/helpers/iu_xray_gold.json``: report ids, hand-annotated 14-observation
labels and anatomy leaves, a guideline) and the IU X-ray reports it names:

- labels: over every (report, observation) pair where the gold or the rule labeler has a value
  (1, 0 or -1; blank pairs are ignored), a true positive is the same value, a false positive a
  predicted value that differs from the gold (or has no gold), a false negative a gold value that
  was not predicted exactly. Micro P/R/F1 over all pairs, and per observation;
- anatomies: the leaves ``datasets.study_record.report_leaves`` reads (the parser the datasets use)
  against the gold leaves, micro P/R/F1 over (report, leaf) pairs, and per leaf.

On synthetic studies, the share whose parsed leaves equal the generator's true ``anatomies``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from datasets.iu_xray import IUReport, report_text
from datasets.study_record import report_leaves
from vocab.anatomy_graph import AnatomyGraph
from vocab.labeler import RuleLabeler
from vocab.observations import CHEXPERT_OBSERVATIONS

HALVES = ("tune", "held_out")


def load_gold(path: str | Path, graph: AnatomyGraph) -> dict:
    """The gold file, checked: every label an observation name with value 1, 0 or -1, every leaf a
    leaf of ``graph``; ValueError naming the file and the report otherwise."""
    path = Path(path)
    gold = json.loads(path.read_text())
    for rid, g in gold["reports"].items():
        bad = {o: v for o, v in g["labels"].items()
               if o not in CHEXPERT_OBSERVATIONS or v not in (1, 0, -1)}
        if bad:
            raise ValueError(f"{path}: report {rid}: bad labels {bad}")
        unknown = [n for n in g["leaves"] if n not in graph.leaf_index]
        if unknown:
            raise ValueError(f"{path}: report {rid}: not leaves of the graph: {unknown}")
    return gold


def half_ids(gold: dict, half: str) -> list[str]:
    """Report ids of one half ("tune": even positions of the ids sorted by report number,
    "held_out": odd positions) or of "all"."""
    ids = sorted(gold["reports"], key=lambda r: int(r[3:]))
    if half == "all":
        return ids
    return ids[HALVES.index(half)::2]


def gold_texts(ids: list[str], reports: list[IUReport]) -> list[str]:
    """FINDINGS + IMPRESSION text of each id; KeyError naming an id the reports lack."""
    by_id = {r.id: r for r in reports}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise KeyError(f"gold report ids missing from the reports: {missing[:5]}")
    return [report_text(by_id[i], "findings+impression") for i in ids]


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def label_scores(gold_labels: list[dict], pred: np.ndarray) -> dict:
    """{"micro": (p, r, f1), "per": {observation: (p, r, f1, gold count)}} (module docstring)."""
    counts = {o: [0, 0, 0, 0] for o in CHEXPERT_OBSERVATIONS}
    for g, row in zip(gold_labels, pred):
        for o, v in zip(CHEXPERT_OBSERVATIONS, row):
            want, got = g.get(o), (None if np.isnan(v) else float(v))
            c = counts[o]
            c[3] += want is not None
            if want is not None and got == want:
                c[0] += 1
                continue
            c[1] += got is not None
            c[2] += want is not None
    tot = np.sum([c[:3] for c in counts.values()], axis=0)
    return {"micro": prf(*tot), "per": {o: (*prf(*c[:3]), c[3]) for o, c in counts.items()}}


def leaf_scores(gold_leaves: list[list[str]], pred_leaves: list[list[str]], graph) -> dict:
    """{"micro": (p, r, f1), "per": {leaf: (p, r, f1, gold count)}} over (report, leaf) pairs."""
    counts = {n: [0, 0, 0] for n in graph.leaf_names}
    for g, p in zip(gold_leaves, pred_leaves):
        g, p = set(g), set(p)
        for n in g & p:
            counts[n][0] += 1
        for n in p - g:
            counts[n][1] += 1
        for n in g - p:
            counts[n][2] += 1
    tot = np.sum(list(counts.values()), axis=0)
    return {"micro": prf(*tot),
            "per": {n: (*prf(*c), c[0] + c[2]) for n, c in counts.items()}}


def score_gold(gold: dict, reports: list[IUReport], graph: AnatomyGraph, half: str = "all") -> dict:
    """Label and anatomy scores of the project's parsers on one half of the gold set."""
    ids = half_ids(gold, half)
    texts = gold_texts(ids, reports)
    pred = RuleLabeler().label(texts)
    labels = label_scores([gold["reports"][i]["labels"] for i in ids], pred)
    leaves = leaf_scores([gold["reports"][i]["leaves"] for i in ids],
                         [report_leaves(t, graph) for t in texts], graph)
    return {"n": len(ids), "labels": labels, "anatomies": leaves}


def synthetic_agreement(records: list[dict], graph: AnatomyGraph) -> tuple[int, list[dict]]:
    """(studies whose parsed leaves equal the generator's ``anatomies``, the disagreeing ones as
    {"id", "report", "true", "parsed"})."""
    agree, wrong = 0, []
    for rec in records:
        parsed = report_leaves(rec["report"], graph)
        true = [n for n in graph.leaf_names if n in set(rec["anatomies"])]
        if parsed == true:
            agree += 1
        else:
            wrong.append({"id": rec.get("id"), "report": rec["report"], "true": true,
                          "parsed": parsed})
    return agree, wrong
