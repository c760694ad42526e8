"""Scores of the report parsers: the metric definitions on small cases, the targets on the
hand-annotated IU X-ray gold file (real reports from the torchxrayvision wheel) and agreement with
the synthetic generator."""
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from datasets.iu_xray import parse_report_xml
from datasets.synthetic import render_study
from metrics.report_parsing import (
    half_ids,
    label_scores,
    leaf_scores,
    load_gold,
    prf,
    score_gold,
    synthetic_agreement,
)
from tests.helpers import xrv_file
from vocab.anatomy_graph import AnatomyGraph
from vocab.observations import CHEXPERT_OBSERVATIONS

GRAPH = AnatomyGraph.default()
GOLD = Path(__file__).resolve().parent / "helpers" / "iu_xray_gold.json"
NAN = math.nan


def test_label_scores_count_exact_values():
    row = np.full(14, NAN)
    row[0], row[1], row[2] = 1.0, 0.0, -1.0         # EC right, CM wrong value, LO not in gold
    gold = [{"Enlarged Cardiomediastinum": 1, "Cardiomegaly": 1, "Edema": 0}]
    s = label_scores(gold, row[None])
    # tp 1 (EC); fp 2 (CM 0, LO -1); fn 2 (CM, Edema)
    assert prf(1, 2, 2) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert s["micro"] == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert s["per"]["Cardiomegaly"] == (0.0, 0.0, 0.0, 1)
    assert s["per"]["Enlarged Cardiomediastinum"] == (1.0, 1.0, 1.0, 1)


def test_leaf_scores():
    s = leaf_scores([["spine", "carina"]], [["spine", "trachea"]], GRAPH)
    assert s["micro"] == pytest.approx((0.5, 0.5, 0.5))
    assert s["per"]["carina"] == (0.0, 0.0, 0.0, 1) and s["per"]["spine"][:3] == (1.0, 1.0, 1.0)


def test_gold_file_is_well_formed(tmp_path):
    gold = load_gold(GOLD, GRAPH)
    assert len(gold["reports"]) >= 200 and gold["guideline"] and gold["selection"]
    assert set(gold["observations"]) == set(CHEXPERT_OBSERVATIONS)
    tune, held = half_ids(gold, "tune"), half_ids(gold, "held_out")
    assert not set(tune) & set(held) and len(tune) + len(held) == len(gold["reports"])
    # findings well represented: a CheXpert finding, or a placed finding outside the 14
    abnormal = sum("No Finding" not in g["labels"] or bool(g["leaves"])
                   for g in gold["reports"].values())
    assert abnormal > 0.6 * len(gold["reports"])
    assert "report" not in json.dumps(gold["reports"])          # ids and labels, no text
    bad = json.loads(GOLD.read_text())
    bad["reports"]["CXR1"]["leaves"] = ["left elbow"]
    (tmp_path / "gold.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"gold.json: report CXR1: not leaves of the graph"):
        load_gold(tmp_path / "gold.json", GRAPH)


def test_targets_on_real_iu_xray_reports():
    gold = load_gold(GOLD, GRAPH)
    with tarfile.open(fileobj=io.BytesIO(xrv_file("NLMCXR_reports.tgz"))) as tar:
        wanted = {f"ecgen-radiology/{rid[3:]}.xml" for rid in gold["reports"]}
        reports = [parse_report_xml(tar.extractfile(m).read(), m.name)
                   for m in tar.getmembers() if m.name in wanted]
    full = score_gold(gold, reports, GRAPH, "all")
    assert full["n"] == len(gold["reports"])
    assert full["labels"]["micro"][2] >= 0.90         # rule labeler, 14 observations
    assert full["anatomies"]["micro"][2] >= 0.85      # anatomy leaves
    held = score_gold(gold, reports, GRAPH, "held_out")
    assert held["labels"]["micro"][2] >= 0.90         # rules were written on the tune half only
    assert held["anatomies"]["micro"][2] >= 0.80


def test_agreement_with_the_synthetic_generator_on_200_studies():
    records = []
    for i in range(200):
        st = render_study(i, size=32, seed=7)
        records.append({"id": i, "report": st["report"], "anatomies": st["anatomies"]})
    agree, wrong = synthetic_agreement(records, GRAPH)
    assert agree / len(records) >= 0.95, wrong[:3]
    agree, wrong = synthetic_agreement(
        [{"id": "x", "report": "Small left pleural effusion.", "anatomies": ["right clavicle"]}],
        GRAPH,
    )
    assert agree == 0 and wrong[0]["parsed"] == ["left costophrenic angle"]
