"""What the synthetic studies contain and what their reports say (datasets/synthetic.py draws them).

FINDINGS is the catalogue (type -> CheXpert observation, candidate anatomy leaves, sampling weight);
``plan_findings`` draws a study's finding events; ``make_report`` writes its report and CheXpert
labels: findings first (shuffled), then the normal/negated statements (shuffled), two or three
templates each with a dominant one, in plain clinical wording (no hedging) that the rule-based
labeler reads correctly.
"""
from __future__ import annotations

import numpy as np

from vocab.observations import CHEXPERT_OBSERVATIONS, OBSERVATION_INDEX

SIDES = ("right", "left")
ZONES = ("upper", "mid", "lower")

# type -> (observation, candidate leaves, sampling weight)
FINDINGS: dict[str, tuple[str, tuple[str, ...], float]] = {
    "opacity": ("Lung Opacity", tuple(f"{s} {z} lung zone" for s in SIDES for z in ZONES), 1.0),
    "consolidation": (
        "Consolidation",
        tuple(f"{s} {z} lung zone" for s in SIDES for z in ("mid", "lower")),
        1.0,
    ),
    "nodule": ("Lung Lesion", tuple(f"{s} {z} lung zone" for s in SIDES for z in ZONES), 1.0),
    "atelectasis": ("Atelectasis", tuple(f"{s} lower lung zone" for s in SIDES), 1.0),
    "effusion": ("Pleural Effusion", tuple(f"{s} costophrenic angle" for s in SIDES), 1.0),
    "pneumothorax": ("Pneumothorax", tuple(f"{s} apical zone" for s in SIDES), 1.0),
    "edema": ("Edema", ("right hilar structures", "left hilar structures"), 0.8),
    "cardiomegaly": ("Cardiomegaly", ("right atrium",), 1.0),
    "fracture": ("Fracture", tuple(f"{s} clavicle" for s in SIDES), 0.8),
    "support_device": ("Support Devices", ("cavoatrial junction", "superior vena cava"), 1.0),
    "widened_mediastinum": ("Enlarged Cardiomediastinum", ("upper mediastinum",), 0.8),
    "hilar_mass": ("Lung Lesion", ("right hilar structures", "left hilar structures"), 0.6),
    "endotracheal_tube": ("Support Devices", ("trachea", "carina"), 0.8),
    "enteric_tube": ("Support Devices", ("abdomen",), 0.7),
    "vertebral_fracture": ("Fracture", ("spine",), 0.7),
    "elevated_hemidiaphragm": (None, tuple(f"{s} hemidiaphragm" for s in SIDES), 0.8),
    "aortic_calcification": (None, ("aortic arch",), 0.7),
}
BILATERAL = {"edema"}                                   # one event, a finding entry per side
NO_LABEL_OR_DEVICE = {None, "Support Devices"}         # observations that leave "No Finding" at 1
LUNG_FINDINGS = {
    "opacity",
    "consolidation",
    "nodule",
    "atelectasis",
    "edema",
    "pneumothorax",
    "effusion",
}


def extra_anatomies(ev) -> tuple[str, ...]:
    """Leaves a finding concerns besides its own: the whole heart for cardiomegaly, the trachea an
    endotracheal tube runs through when its tip is at the carina."""
    if ev["type"] == "cardiomegaly":
        return ("right atrium", "cavoatrial junction")
    if ev["type"] == "endotracheal_tube" and ev["leaf"] == "carina":
        return ("trachea",)
    return ()


def plan_findings(rng, normal_frac: float) -> list[dict]:
    """The study's finding events: [] for a normal study, else 1-3 in distinct leaves."""
    if rng.random() < normal_frac:
        return []
    k = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    types = list(FINDINGS)
    w = np.array([FINDINGS[t][2] for t in types])
    chosen = rng.choice(types, size=k, replace=False, p=w / w.sum())
    used, events = set(), []
    for t in chosen:
        leaves = [lf for lf in FINDINGS[t][1] if lf not in used]
        if not leaves or (t in BILATERAL and len(leaves) < len(FINDINGS[t][1])):
            continue
        leaf = leaves[rng.integers(len(leaves))]
        used |= set(FINDINGS[t][1]) if t in BILATERAL else {leaf}
        ev = {"type": str(t), "leaf": leaf}
        if t == "support_device":
            ev["entry"] = "right" if rng.random() < 0.7 else "left"
        events.append(ev)
    return events


def _choose(rng, options, dominant=0.6):
    """One of ``options``: the first with probability ``dominant``, else uniformly among the
    rest."""
    if len(options) == 1 or rng.random() < dominant:
        return options[0]
    return options[1 + rng.integers(len(options) - 1)]


_LOBE = {"upper": "{s} upper lobe", "mid": "{s} mid lung", "lower": "{s} lower lobe"}


def finding_templates(ev) -> list[str]:
    """The phrasings of one finding event (the first is the dominant one)."""
    t, leaf = ev["type"], ev["leaf"]
    s = leaf.split()[0]
    zone, lobe = leaf, ""
    if leaf.endswith("lung zone"):
        lobe = _LOBE[leaf.split()[1]].format(s=s)
    T = {
        "opacity": [
            f"there is an opacity in the {zone}",
            f"{lobe} opacity",
            f"patchy opacity in the {zone}",
        ],
        "consolidation": [
            f"there is consolidation in the {zone}",
            f"{lobe} consolidation",
            f"focal consolidation in the {zone}",
        ],
        "nodule": [
            f"there is a nodule in the {zone}",
            f"small {lobe} nodule",
            f"a nodule is seen in the {zone}",
        ],
        "atelectasis": [
            f"there is atelectasis at the {s} base",
            f"{s} basilar atelectasis",
            f"subsegmental atelectasis in the {s} lower lobe",
        ],
        "effusion": [
            f"small {s} pleural effusion",
            f"there is a {s} pleural effusion",
            f"{s} pleural effusion with blunting of the costophrenic angle",
        ],
        "pneumothorax": [
            f"there is a small {s} apical pneumothorax",
            f"{s} apical pneumothorax",
            f"small pneumothorax at the {s} apex",
        ],
        "edema": ["there is mild pulmonary edema", "mild perihilar pulmonary edema"],
        "cardiomegaly": ["moderate cardiomegaly", "there is cardiomegaly", "the heart is enlarged"],
        "fracture": [
            f"there is a fracture of the {s} clavicle",
            f"displaced {s} clavicular fracture",
            f"acute fracture of the {s} clavicle",
        ],
        "widened_mediastinum": [
            "the mediastinum is widened",
            "widened mediastinum",
            "there is widening of the superior mediastinum",
        ],
        "hilar_mass": [
            f"there is a {s} hilar mass",
            f"{s} hilar mass",
            f"a mass is seen at the {s} hilum",
        ],
        "enteric_tube": [
            "enteric tube with tip in the stomach",
            "the nasogastric tube terminates in the stomach",
        ],
        "vertebral_fracture": [
            "there is a compression fracture of a thoracic vertebral body",
            "mild compression fracture of the thoracic spine",
            "thoracic vertebral body compression fracture",
        ],
        "elevated_hemidiaphragm": [
            f"the {s} hemidiaphragm is elevated",
            f"elevation of the {s} hemidiaphragm",
            f"elevated {s} hemidiaphragm",
        ],
        "aortic_calcification": [
            "there is calcification of the aortic knob",
            "calcified aortic knob",
            "atherosclerotic calcification of the aortic arch",
        ],
    }
    if t == "endotracheal_tube":
        if leaf == "carina":
            return [
                "endotracheal tube with tip at the carina",
                "the endotracheal tube tip abuts the carina",
            ]
        return ["endotracheal tube with tip in the mid trachea",
                "the endotracheal tube terminates in the trachea"]
    if t == "support_device":
        entry = "right internal jugular" if ev["entry"] == "right" else "left subclavian"
        where = (
            "at the cavoatrial junction"
            if leaf == "cavoatrial junction"
            else "in the superior vena cava"
        )
        return [
            f"{entry} central venous catheter with tip {where}",
            f"{entry} central line terminates {where}",
        ]
    return T[t]


def _normal_sentences(types: set, rng) -> tuple[list[str], list[str]]:
    """Normal / negated statements for what is absent, and the observations they negate."""
    sents, negated = [], []
    focal = {"opacity", "consolidation", "nodule", "atelectasis"}
    if not types & LUNG_FINDINGS:
        sents.append(_choose(rng, ["the lungs are clear", "the lungs are well expanded and clear"]))
        negated.append("Lung Opacity")
    elif not types & (LUNG_FINDINGS - focal):
        sents.append("the lungs are otherwise clear")
        negated.append("Lung Opacity")       # overridden by a positive opacity below
    if "cardiomegaly" not in types:
        sents.append(_choose(rng, ["the heart size is normal", "normal heart size"]))
        negated.append("Cardiomegaly")
    if "widened_mediastinum" not in types:
        sents.append(
            _choose(rng, ["the mediastinal contours are normal", "normal mediastinal contours"])
        )
        negated.append("Enlarged Cardiomediastinum")
    absent = [
        n
        for t, n in (("effusion", "pleural effusion"), ("pneumothorax", "pneumothorax"))
        if t not in types
    ]
    if absent:
        what = " or ".join(absent)
        sents.append(_choose(rng, [f"no {what}", f"there is no {what}"]))
        negated += ["Pleural Effusion"] * ("effusion" not in types) + ["Pneumothorax"] * (
            "pneumothorax" not in types
        )
    if "consolidation" not in types:
        sents.append(_choose(rng, ["no focal consolidation", "there is no focal consolidation"]))
        negated.append("Consolidation")
    if not types & {"fracture", "vertebral_fracture"}:
        sents.append(
            _choose(rng, ["no acute osseous abnormality", "the osseous structures are intact"])
        )
    return sents, negated


def make_report(events, rng) -> tuple[str, list, list[str]]:
    """(report text, 14 CheXpert labels: 1 finding, 0 negated by a normal sentence, None
    unmentioned, each event's sentence as written in the report)."""
    types = {ev["type"] for ev in events}
    found = [_choose(rng, finding_templates(ev)) for ev in events]
    sentences = [s[0].upper() + s[1:] + "." for s in found]
    normal, negated = _normal_sentences(types, rng)
    rng.shuffle(found)
    rng.shuffle(normal)
    text = " ".join(s[0].upper() + s[1:] + "." for s in found + normal)
    labels: list = [None] * len(CHEXPERT_OBSERVATIONS)
    for obs in negated:
        labels[OBSERVATION_INDEX[obs]] = 0.0
    observations = {FINDINGS[t][0] for t in types}
    for obs in observations - {None}:
        labels[OBSERVATION_INDEX[obs]] = 1.0
    if observations <= NO_LABEL_OR_DEVICE:
        labels[OBSERVATION_INDEX["No Finding"]] = 1.0
    return text, labels, sentences
