"""The rule labeler: each observation positive / negated / uncertain, scope, aggregation."""
import math
import re

import numpy as np
import pytest

from vocab.anatomy_graph import AnatomyGraph
from vocab.labeler import RuleLabeler
from vocab.observations import CHEXPERT_OBSERVATIONS, OBSERVATION_INDEX

GRAPH = AnatomyGraph.default()
NAN = math.nan
POS, NEG, UNC = 1.0, 0.0, -1.0

# observation -> (positive, negated, uncertain) sentences
CASES = {
    "Enlarged Cardiomediastinum": (
        "The mediastinum is widened.",
        "The mediastinum is not widened.",
        "Possible mediastinal widening.",
    ),
    "Cardiomegaly": (
        "The heart is enlarged.",
        "No cardiomegaly.",
        "Mild cardiomegaly cannot be excluded.",
    ),
    "Lung Opacity": (
        "There is an opacity in the right lower lung zone.",
        "No focal opacity is seen.",
        "Possible opacity at the left base.",
    ),
    "Lung Lesion": (
        "A nodule in the left mid lung zone.",
        "No nodules or masses.",
        "Questionable nodule in the right upper lobe.",
    ),
    "Edema": ("Pulmonary edema.", "There is no pulmonary edema.", "Mild edema may be present."),
    "Consolidation": (
        "Consolidation in the left lower lobe.",
        "Free of focal consolidation.",
        "Consolidation cannot be excluded.",
    ),
    "Pneumonia": (
        "Right lower lobe pneumonia.",
        "No evidence of pneumonia.",
        "Findings may represent pneumonia.",
    ),
    "Atelectasis": (
        "Linear atelectasis at the right base.",
        "The atelectasis has resolved.",
        "Likely atelectasis at the left base.",
    ),
    "Pneumothorax": (
        "Right apical pneumothorax.",
        "No pleural effusion or pneumothorax.",
        "Questionable small apical pneumothorax.",
    ),
    "Pleural Effusion": (
        "Small left pleural effusion.",
        "No pleural effusion or pneumothorax.",
        "Possible small left pleural effusion.",
    ),
    "Pleural Other": (
        "Right apical pleural thickening.",
        "No pleural thickening.",
        "Pleural thickening versus small effusion.",
    ),
    "Fracture": (
        "Fracture of the left clavicle.",
        "No acute fracture.",
        "Possible nondisplaced rib fracture.",
    ),
    "Support Devices": (
        "A right internal jugular catheter terminates at the cavoatrial junction.",
        "The chest tube has been removed.",
        "Possible retained catheter fragment.",
    ),
}
PARAMS = [
    (obs, want, text) for obs, texts in CASES.items() for want, text in zip((POS, NEG, UNC), texts)
]

# The synthetic generator's phrasing -> every observation the sentence mentions (the rest must be
# nan, except No Finding, checked separately).
SYNTHETIC = {
    "There is an opacity in the right lower lung zone.": {"Lung Opacity": POS},
    "Small left pleural effusion.": {"Pleural Effusion": POS},
    "The heart is enlarged.": {"Cardiomegaly": POS},
    "No pleural effusion or pneumothorax.": {"Pleural Effusion": NEG, "Pneumothorax": NEG},
    "Right apical pneumothorax.": {"Pneumothorax": POS},
    "A nodule in the left mid lung zone.": {"Lung Lesion": POS},
    "Linear atelectasis at the right base.": {"Atelectasis": POS},
    "Pulmonary edema with perihilar haziness.": {"Edema": POS, "Lung Opacity": POS},
    "Fracture of the left clavicle.": {"Fracture": POS},
    "A right internal jugular catheter terminates at the cavoatrial junction.": {
        "Support Devices": POS
    },
    "The mediastinum is widened.": {"Enlarged Cardiomediastinum": POS},
    "Consolidation in the left lower lobe.": {"Consolidation": POS},
    "Heart size is normal. The lungs are clear.": {"Cardiomegaly": NEG, "Lung Opacity": NEG},
    "Enlarged cardiac silhouette.": {"Cardiomegaly": POS},
    "Enlarged cardiomediastinal silhouette.": {"Enlarged Cardiomediastinum": POS},
    "There is widening of the upper mediastinum.": {"Enlarged Cardiomediastinum": POS},
    "Left lower lobe atelectatic changes.": {"Atelectasis": POS},
    "Bilateral infiltrates and hazy opacification.": {"Lung Opacity": POS},
    "Mild pulmonary vascular congestion.": {"Edema": POS},
    "Mild pleural fibrosis.": {"Pleural Other": POS},
    "The NG tube and PICC line are in place; pacemaker leads are intact.": {"Support Devices": POS},
}

REPORTS = list(SYNTHETIC) + [t for texts in CASES.values() for t in texts] + [
    "Compared to the prior study from ___, there is no significant change.",
    "Bibasilar opacities likely reflect atelectasis, though infection cannot be excluded.",
    "No change in the large left pleural effusion. Partially resolved right effusion.",
    "Heart size and mediastinal contours are within normal limits. Lungs: clear.",
    "There is no pneumothorax or pleural effusion, and the heart is enlarged.",
    "Ill-defined opacity at the right base, ? aspiration vs. pneumonia.",
    "No focal consolidation to suggest pneumonia. Pneumonia? ? edema",
]


def _vec(text):
    return RuleLabeler().label([text])[0]


@pytest.mark.parametrize("obs,want,text", PARAMS, ids=[f"{o}-{w:g}" for o, w, _ in PARAMS])
def test_each_observation_positive_negated_uncertain(obs, want, text):
    assert _vec(text)[OBSERVATION_INDEX[obs]] == want


def test_synthetic_generator_phrasing():
    lab = RuleLabeler()
    out = lab.label(list(SYNTHETIC))
    assert out.shape == (len(SYNTHETIC), 14) and out.dtype == np.float64
    for row, (text, want) in zip(out, SYNTHETIC.items()):
        for i, obs in enumerate(CHEXPERT_OBSERVATIONS[:-1]):
            expected = want.get(obs, NAN)
            assert (math.isnan(row[i]) and math.isnan(expected)) or row[i] == expected, (
                text,
                obs,
                row[i],
            )


def test_no_finding_rule():
    nf = OBSERVATION_INDEX["No Finding"]
    assert _vec("No acute cardiopulmonary process.")[nf] == POS
    assert _vec("")[nf] == POS  # nothing positive or uncertain
    # support devices do not count
    assert _vec("No pleural effusion. Right PICC line in the SVC.")[nf] == POS
    assert math.isnan(_vec("Small left pleural effusion.")[nf])  # CheXpert: nan (blank), never 0
    assert math.isnan(_vec("Possible pneumonia.")[nf])  # uncertain counts as a finding


def test_scope_breakers_pseudo_negation_and_aggregation():
    v = _vec("No pleural effusion, but there is a small pneumothorax.")
    assert (
        v[OBSERVATION_INDEX["Pleural Effusion"]] == NEG
        and v[OBSERVATION_INDEX["Pneumothorax"]] == POS
    )
    v = _vec("There is no pneumothorax or pleural effusion, and the heart is enlarged.")
    assert (
        v[OBSERVATION_INDEX["Cardiomegaly"]] == POS and v[OBSERVATION_INDEX["Pneumothorax"]] == NEG
    )
    assert (
        _vec("No change in the large left pleural effusion.")[OBSERVATION_INDEX["Pleural Effusion"]]
        == POS
    )
    assert _vec("The pneumothorax is no longer seen.")[OBSERVATION_INDEX["Pneumothorax"]] == NEG
    assert _vec("Pleural effusions have resolved.")[OBSERVATION_INDEX["Pleural Effusion"]] == NEG
    assert _vec("Heart size is normal.")[OBSERVATION_INDEX["Cardiomegaly"]] == NEG
    assert _vec("Normal heart size.")[OBSERVATION_INDEX["Cardiomegaly"]] == NEG
    assert _vec("? pneumonia")[OBSERVATION_INDEX["Pneumonia"]] == UNC
    assert _vec("Pneumonia?")[OBSERVATION_INDEX["Pneumonia"]] == UNC
    assert _vec("Cannot exclude pneumonia.")[OBSERVATION_INDEX["Pneumonia"]] == UNC
    assert _vec("No findings to suggest pneumonia.")[OBSERVATION_INDEX["Pneumonia"]] == NEG
    # sentence scope: a negation does not cross a sentence; mentions aggregate positive > uncertain
    # > negative
    v = _vec("No pleural effusion. Small left pleural effusion. Possible pneumonia. No pneumonia.")
    assert (
        v[OBSERVATION_INDEX["Pleural Effusion"]] == POS and v[OBSERVATION_INDEX["Pneumonia"]] == UNC
    )
    # "versus" binds its neighbours only
    v = _vec("Increased retrocardiac opacity, atelectasis vs consolidation.")
    assert v[OBSERVATION_INDEX["Lung Opacity"]] == POS
    assert (
        v[OBSERVATION_INDEX["Atelectasis"]] == UNC and v[OBSERVATION_INDEX["Consolidation"]] == UNC
    )


def test_trigger_prefilter_never_drops_a_mention():
    fast, full = RuleLabeler(), RuleLabeler()
    full._mentions = [(i, ("",), p, n) for i, _, p, n in full._mentions]  # "" is in every clause
    a, b = fast.label(REPORTS), full.label(REPORTS)
    assert np.array_equal(a, b, equal_nan=True)
    # the sentence cache changes nothing
    assert np.array_equal(fast.label(REPORTS), a, equal_nan=True)


I = OBSERVATION_INDEX


@pytest.mark.parametrize("text, obs, want", [
    # a trailing negation does not reach past a comma into another statement
    ("Small left effusion, the pneumothorax has resolved.", "Pleural Effusion", POS),
    ("Small left effusion, the pneumothorax has resolved.", "Pneumothorax", NEG),
    ("Effusion or pneumothorax is not seen.", "Pleural Effusion", NEG),
    # alternatives are uncertain; a negated list stays negative
    ("Minimal scarring or atelectasis at the left base.", "Atelectasis", UNC),
    ("Bibasilar atelectasis and/or infiltrate.", "Atelectasis", UNC),
    ("Opacities most consistent with atelectasis/infiltrate.", "Atelectasis", UNC),
    ("No pleural effusion or pneumothorax.", "Pneumothorax", NEG),
    ("Consolidation consistent with pneumonia.", "Pneumonia", POS),
    # costophrenic blunting: effusion or pleural thickening
    ("Blunting of the left costophrenic angle.", "Pleural Effusion", UNC),
    ("The costophrenic angles are blunted.", "Pleural Effusion", UNC),
    # verbless statements of normality
    ("Heart and mediastinum normal.", "Cardiomegaly", NEG),
    ("Heart and mediastinum normal.", "Enlarged Cardiomediastinum", NEG),
    ("Heart upper limits normal.", "Cardiomegaly", NEG),
    ("Lungs otherwise clear.", "Lung Opacity", NEG),
    ("Clear hyperexpanded lungs.", "Lung Opacity", NEG),
    ("Cardiac and mediastinal contours are within normal limits.", "Cardiomegaly", NEG),
    ("Cardio mediastinal silhouette is unremarkable.", "Enlarged Cardiomediastinum", NEG),
    # CheXpert's opacity words; pleural scarring is Pleural Other
    ("Small areas of scarring in the left base.", "Lung Opacity", POS),
    ("Increased interstitial markings.", "Lung Opacity", POS),
    ("Right apical pleural-parenchymal scarring.", "Pleural Other", POS),
    ("Right apical pleural-parenchymal scarring.", "Lung Opacity", NAN),
    ("Stable bilateral apical pleural capping.", "Pleural Other", POS),
    ("Clearing of left base airspace disease.", "Lung Opacity", NEG),
    # edema and devices
    ("No evidence for failure or pneumonia.", "Edema", NEG),
    ("Stable prominence of the central pulmonary vasculature.", "Edema", POS),
    ("Shunt tubing traverses the chest.", "Support Devices", POS),
    ("Vagal nerve stimulator overlying the left chest.", "Support Devices", POS),
])
def test_real_report_conventions(text, obs, want):
    got = _vec(text)[I[obs]]
    assert (math.isnan(got) and math.isnan(want)) or got == want


def test_clause_mentions_with_an_extra_pattern():
    lab = RuleLabeler()
    (sentence,) = lab.sentences("No granuloma, but a calcified aorta.")
    clauses = lab.clause_mentions(sentence, re.compile(r"granuloma|calcified"))
    assert [c for c, _ in clauses] == ["no granuloma, ", " a calcified aorta."]
    assert [[(i, v) for i, _, _, v in ms] for _, ms in clauses] == [[(-1, NEG)], [(-1, POS)]]
