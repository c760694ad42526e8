"""Scores of generated reports: counts, the language metrics of metrics/nlg.py and the clinical
efficacy of metrics/clinical.py over the same records, flattened for logging."""

import pytest

from metrics.clinical import ce_summary, clinical_efficacy
from metrics.nlg import score_nlg
from metrics.reports import flat_scores, score_records
from vocab.labeler import RuleLabeler

RECORDS = [
    {"id": "a", "generated": "The heart is enlarged.", "references": ["Cardiomegaly."]},
    {"id": "b", "generated": "", "references": ["Small left pleural effusion."]},
    {"id": "c", "generated": "No pneumothorax.", "references": ["No pneumothorax.", "Lungs clear."]},
]


def test_score_records_combines_language_and_clinical_scores():
    labeler = RuleLabeler()
    out = score_records(RECORDS, labeler, meteor=False)
    assert out["counts"]["studies"] == 3 and out["counts"]["empty_generations"] == 1
    assert out["counts"]["references_per_study"] == 2 and out["labeler"] == "rule"
    lang = score_nlg({r["id"]: r["references"] for r in RECORDS}, {r["id"]: [r["generated"]] for r in RECORDS},
                     meteor=False)
    assert out["language"] == pytest.approx(lang, nan_ok=True)
    ce = clinical_efficacy(labeler.label([r["generated"] for r in RECORDS]),
                           labeler.label([r["references"][0] for r in RECORDS]))
    assert out["clinical_efficacy"] == ce
    assert ce["all"]["micro"]["recall"] == pytest.approx(2 / 3)  # cardiomegaly and no finding hit; effusion missed
    flat = flat_scores(out)
    assert flat["BLEU_4"] == lang["BLEU_4"] and flat["ce_micro_f1_14"] == ce_summary(ce)["ce_micro_f1_14"]
