"""The rule-based CheXpert labeler: 14 observation labels of a report from mentions, negation and
uncertainty.

Labels follow CheXpert: one float per observation in ``CHEXPERT_OBSERVATIONS`` order, 1.0 positive,
0.0 negative, -1.0 uncertain, nan not mentioned. It labels the training reports (datasets) and,
beside CheXbert, scores the generated ones (metrics/clinical.py).

RuleLabeler, in brief. A report is split into sentences (``.``/``!``/``?``/newline) and clauses
(``;``, "but", "however", "although", "though", "except", "whereas", "with", "which", "there
is/are", "and <subject> is"). In each clause it finds mentions of the 14 observations (synonym
patterns below), negation cues ("no", "not", "without", "free of", "negative for", "resolved",
"removed", "no longer", ...) and uncertainty cues ("may", "possible", "likely", "suggest", "versus",
"question of", "concern for", "cannot be excluded", "?", ...). "No change", "not changed",
"partially resolved" and the like are not negations. A mention takes:
  uncertain  if an uncertainty cue follows it in the clause, not past a comma ("... cannot be
             excluded", "... is possible"; "versus", "possible", "?" reach back only to the nearest
             mention),
  else       what the nearest cue before it says (negation scope runs to the end of the clause, so
             "no pleural effusion or pneumothorax" negates both; a cue inside the mention counts:
             "heart is not enlarged"),
  negative   if a negation cue follows it, not past a comma ("... has resolved", "... is not seen";
             "small effusion, the pneumothorax has resolved" negates the pneumothorax only),
  negative   for statements of normality, with or without a verb ("heart size is normal", "heart
             and mediastinum normal", "normal cardiomediastinal silhouette", "lungs clear" -> Lung
             Opacity),
  uncertain  for one of alternatives ("scarring or atelectasis", "atelectasis and/or infiltrate",
             "atelectasis/infiltrate") and for costophrenic blunting (effusion or pleural
             thickening),
  positive   otherwise.
Mentions follow CheXpert's phrase lists where they differ from plain synonyms: scarring and
interstitial markings are Lung Opacity, pleural(-parenchymal) scarring and fibrosis Pleural Other,
"failure" and prominent central vasculature Edema. ``clause_mentions`` gives the mentions with
their spans and values, for any extra pattern too (vocab/finding_sites.py uses it).
Per report, mentions aggregate as CheXpert does: positive > uncertain > negative > not mentioned.
"No Finding" is 1 when no observation other than Support Devices is positive or uncertain, else nan
(CheXpert labeler / CheXbert convention: that head is blank-or-positive, never negative). Perihilar
"haziness" in "pulmonary edema with perihilar haziness" is labelled Lung Opacity as well as Edema:
every opacity word is an opacity mention, whatever else the sentence says.
"""

from __future__ import annotations

import re

import numpy as np

from vocab.observations import CHEXPERT_OBSERVATIONS, OBSERVATION_INDEX

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
NO_FINDING = OBSERVATION_INDEX["No Finding"]
SUPPORT_DEVICES = OBSERVATION_INDEX["Support Devices"]

# up to three words between a subject and its predicate ("is not clearly")
_G = r"(?:[\w-]+\s+){0,3}?"
# " is" / ":"
_BE = r"(?: (?:is|are|isn't|aren't|appears?|remains?|seems?|looks?|was|were|has been|have been)|:)"
_AND = r"(?: and (?:the )?(?:[\w-]+ ){0,2}?[\w-]+)?"  # "heart size and mediastinal contour are ..."
_NORMAL = (
    r"(?:normal|within normal limits|unremarkable|not enlarged|stable and normal|top[- ]normal|"
    r"upper limits? (?:of )?normal|top normal)"
)
_HEART = r"(?:heart|cardiac silhouette|cardiac shadow|cardiac contours?|cardiac size|heart size|size of the heart)"
_CMED = (
    r"(?:cardiomediastinal|cardio-mediastinal|cardio mediastinal|mediastinal|hilar and mediastinal|"
    r"mediastinal and hilar)"
)
# " is" / ":" or nothing ("heart size normal", "lungs clear")
_BEO = rf"(?:{_BE})?"

# observation -> (mention patterns, explicit-normal patterns). Lower-case text, word-bounded.
_PATTERNS: dict[str, tuple[list[str], list[str]]] = {
    "Enlarged Cardiomediastinum": (
        [
            rf"{_CMED} (?:silhouette|contours?|shadow)s?{_BE} {_G}(?:enlarged|widened|widening|prominent|increased)",
            r"(?:enlarged|widened|wide|prominent) (?:cardio-?mediastin\w*|mediastin\w*)(?: silhouette| contours?)?",
            rf"(?:cardio-?)?mediastin(?:um|al silhouette|al contours?){_BE} {_G}(?:widened|enlarged|wide|prominent)",
            r"(?:cardio-?)?mediastinal (?:widening|enlargement|prominence)",
            r"widening of the (?:superior |upper )?(?:cardio)?mediastinum",
            r"enlargement of the (?:cardio)?mediastin\w*(?: silhouette)?",
        ],
        [
            rf"{_CMED} (?:silhouette|contours?|shadow|size)s?{_AND}{_BEO} {_G}{_NORMAL}",
            rf"(?:normal|unremarkable) {_CMED} (?:silhouette|contours?|shadow)s?",
            rf"(?:cardio-?)?mediastinum(?: size)?{_BEO} {_G}(?:normal|unremarkable|within normal limits|"
            r"midline|of normal size)",
        ],
    ),
    "Cardiomegaly": (
        [
            r"cardiomegaly",
            r"cardiomegally",
            r"cardiac enlargement",
            r"cardiac hypertrophy",
            r"(?:enlarged|large|prominent) (?:heart|cardiac silhouette|cardiac shadow|cardiac contour|cardiac size)",
            r"enlargement of the (?:heart|cardiac silhouette|cardiac shadow)",
            rf"{_HEART}{_BE} {_G}(?:enlarged|increased|large|prominent|borderline enlarged)",
            rf"{_HEART} enlargement",
        ],
        [
            rf"(?:{_HEART}|cardiac and mediastinal (?:contours?|silhouettes?)){_AND}{_BEO} {_G}"
            rf"(?:{_NORMAL}|normal in size|of normal size)",
            r"(?:normal|unremarkable) (?:heart size|heart|cardiac size|cardiac silhouette|size of the heart|"
            r"cardiac contours?)",
            r"heart size normal",
            rf"{_HEART} (?:is )?within normal limits",
        ],
    ),
    "Lung Opacity": (
        [
            r"opacit(?:y|ies)",
            r"opacification",
            r"opacified",
            r"infiltrat(?:e|es|ion|ions|ive)",
            r"haziness",
            r"hazy",
            r"ground[- ]glass",
            r"air[- ]?space (?:disease|process|opacit(?:y|ies))",
            r"parenchymal (?:disease|process)",
            r"(?<!pleural )(?<!parenchymal )(?<!pleural-parenchymal )(?<!pleuroparenchymal )"
            r"scar(?:s|ring)?",
            r"interstitial (?:markings?|prominence|opacit(?:y|ies)|densit(?:y|ies)|changes?|pattern|"
            r"disease)",
            r"reticular\w*",
            r"(?:patchy|streaky|interstitial|increased|linear|airspace|hazy) densit(?:y|ies)",
        ],
        [
            rf"(?:lungs?|lung fields?){_BEO} {_G}(?:otherwise )?clear",
            r"clear (?:[\w-]+ )?lungs?",
            rf"lungs?{_BE} {_G}(?:otherwise )?(?:clear|normal|unremarkable)",
        ],
    ),
    "Lung Lesion": (
        [
            r"nodules?",
            r"nodular (?:opacit(?:y|ies)|densit(?:y|ies)|opacification)",
            r"mass(?:es)?(?! effect)",
            r"(?<!osseous )(?<!lytic )(?<!bony )(?<!bone )(?<!skin )(?<!sclerotic )lesions?",
            r"neoplasms?",
            r"tumou?rs?",
            r"carcinoma",
            r"malignanc(?:y|ies)",
            r"cavitary lesions?",
        ],
        [],
    ),
    "Edema": (
        [
            r"(?<!subcutaneous )(?<!soft tissue )(?<!wall )(?<!facial )edema",
            r"(?:pulmonary|vascular|venous) congestion",
            r"congestive heart failure",
            r"\bchf",
            r"fluid overload",
            r"(?:heart |cardiac )?failure",
            r"pulmonary vascularity (?:is )?increased",
            r"prominen\w* (?:of )?(?:the )?(?:central )?pulmonary vascula\w*",
            r"vascular (?:engorgement|redistribution)",
            r"cephalization",
            r"kerley b",
            r"(?:pulmonary )?venous hypertension",
        ],
        [],
    ),
    "Consolidation": ([r"consolidat(?:ion|ions|ive|ed|ing)"], []),
    "Pneumonia": (
        [
            r"pneumonias?",
            r"bronchopneumonia",
            r"infectious (?:process|etiology)",
            r"infection",
            r"pneumonic",
        ],
        [],
    ),
    "Atelectasis": (
        [
            r"atelecta(?:sis|ses|tic)",
            r"(?:lobar|lobe|lung|segmental|subsegmental) collapse",
            r"collapse of the (?:\w+ ){0,3}(?:lobe|lung)",
            r"collapsed (?:lobe|lung)",
        ],
        [],
    ),
    "Pneumothorax": ([r"pneumothora(?:x|ces)", r"hydropneumothora(?:x|ces)", r"\bptx"], []),
    "Pleural Effusion": (
        [
            r"(?<!pericardial )(?<!joint )effusions?",
            r"pleural fluid",
            r"hydrothorax",
            r"hydropneumothora(?:x|ces)",
            r"blunt(?:ing|ed) (?:of )?(?:the )?(?:\w+ ){0,2}costophrenic",
            r"costophrenic (?:angle )?blunting",
            r"costophrenic (?:[\w-]+ ){0,3}?(?:is |are )?blunted",
            r"layering fluid",
            r"fluid (?:in|within) the (?:\w+ )?(?:pleural|fissure)",
        ],
        [],
    ),
    "Pleural Other": (
        [
            r"pleural thickening",
            r"thickening of the pleura",
            r"pleural plaques?",
            r"pleural calcifications?",
            r"fibrothorax",
            r"fibrosis",
            r"fibrotic",
            r"(?:pleural|pleuro-?parenchymal) scar(?:ring|s)?",
            r"pleur(?:al|o)-? ?parenchymal",
            r"(?:pleural|apical) capping",
            r"pleural reaction",
        ],
        [],
    ),
    "Fracture": ([r"fractures?", r"fractured", r"\bfx"], []),
    "Support Devices": (
        [
            r"catheters?",
            r"tubes?",
            r"\bett\b",
            r"\bngt\b",
            r"\bogt\b",
            r"picc",
            r"pacemakers?",
            r"pacers?",
            r"\baicd\b",
            r"\bicd\b",
            r"defibrillators?",
            r"wires?",
            r"clips?",
            r"stents?",
            r"port-?a-?cath",
            r"portacath",
            r"\bport\b",
            r"drains?",
            r"tubing",
            r"stimulators?",
            r"leads",
            r"mediport",
            r"hardware",
            r"coils?",
            r"\bdevices?",
            r"swan[- ]ganz",
            r"tracheostomy",
            r"balloon pump",
            r"\biabp\b",
            r"prosthetic (?:\w+ )?valves?",
            r"valve (?:replacement|prosthesis|repair)",
            r"electrodes?",
            r"filter",
            r"(?:picc|central|venous|jugular|\bij|subclavian|arterial|dialysis|hemodialysis|tunneled|swan-ganz|"
            r"\bpa|midline|access|port|\biv|femoral|support) (?:[\w-]+ )?lines?",
            r"lines? and tubes?",
            r"tubes? and lines?",
            r"line tips?",
        ],
        [],
    ),
}

# "no ... to suggest X": the uncertainty words are hidden so that "no" negates X
_NEG_PHRASE = [
    r"\bno (?:\w+ ){0,3}?(to suggest|suggestive of|suggesting|consistent with|compatible with|"
    r"concerning for|worrisome for|suspicious for|to indicate|indicative of|diagnostic of)"
]
# Literal stems: an observation's patterns run only on clauses containing one of them (every pattern
# above contains one of its observation's stems; tests/test_clinical.py checks the examples). A
# large speed-up.
_TRIGGERS = {
    "Enlarged Cardiomediastinum": ("mediastin",),
    "Cardiomegaly": ("cardiomegal", "cardiac", "heart"),
    "Lung Opacity": (
        "opacit",
        "opacif",
        "infiltrat",
        "haz",
        "ground",
        "air",
        "parenchymal",
        "lung",
        "scar",
        "interstitial",
        "reticular",
        "densit",
    ),
    "Lung Lesion": ("nodul", "mass", "lesion", "neoplasm", "tumo", "carcinoma", "malignan"),
    "Edema": ("edema", "congest", "chf", "overload", "vascular", "cephaliz", "kerley", "venous",
              "failure", "vascula"),
    "Consolidation": ("consolidat",),
    "Pneumonia": ("pneumoni", "infect"),
    "Atelectasis": ("atelecta", "collaps"),
    "Pneumothorax": ("pneumothora", "ptx"),
    "Pleural Effusion": ("effusion", "fluid", "hydrothorax", "hydropneumothora", "costophrenic"),
    "Pleural Other": ("pleura", "pleuro", "fibro", "scar", "capping"),
    "Fracture": ("fractur", "fx"),
    "Support Devices": (
        "cathet",
        "tube",
        "ett",
        "ngt",
        "ogt",
        "picc",
        "pace",
        "icd",
        "defib",
        "wire",
        "clip",
        "stent",
        "port",
        "drain",
        "hardware",
        "coil",
        "device",
        "swan",
        "tracheost",
        "balloon",
        "iabp",
        "valve",
        "electrode",
        "filter",
        "line",
        "tubing",
        "stimulat",
        "leads",
    ),
}

_NEG_PRE = [
    r"\bno\b",
    r"\bnot\b",
    r"\bwithout\b",
    r"free of",
    r"negative for",
    r"absence of",
    r"\bnor\b",
    r"resolution of",
    r"clearing of",
    r"\bresolved\b",
    r"removal of",
    r"clear of",
    r"rather than",
    r"no longer",
    r"\bnever\b",
    r"n't\b",
]
_NEG_POST = [
    r"\bresolved\b",
    r"has cleared",
    r"have cleared",
    r"\bcleared\b",
    r"\bremoved\b",
    r"\babsent\b",
    r"no longer",
    r"\bexcluded\b",
    r"ruled out",
    r"\bgone\b",
    r"(?:\bnot|n't) (?:\w+ )?(?:seen|identified|present|visualized|appreciated|evident|demonstrated|noted|"
    r"detected|visible|observed|enlarged|widened)\b",
]
_UNC_PRE = [
    r"\bmay\b",
    r"\bmight\b",
    r"\bcould\b",
    r"\bpossibl[ey]\b",
    r"\bprobabl[ey]\b",
    r"\blikely\b",
    r"\bunlikely\b",
    r"\bsuggest\w*",
    r"\bversus\b",
    r"\bvs\b",
    r"question of",
    r"\bquestionabl[ey]\b",
    r"concern(?:ing)? for",
    r"suspicious for",
    r"\bsuspect\w*",
    r"\bsuspicion\b",
    r"can ?not (?:be )?(?:\w+ )?(?:excluded?|ruled out|rule out)",
    r"can't (?:be )?(?:excluded?|rule out)",
    r"\brule out\b",
    r"\br/o\b",
    r"evaluate for",
    r"assess for",
    r"\bborderline\b",
    r"\bequivocal\b",
    r"\bindeterminate\b",
    r"\bdifferential\b",
    r"\bconsider\w*",
    r"\bperhaps\b",
    r"\bmaybe\b",
    r"\bpotential(?:ly)?\b",
    r"\bpresum\w*",
    r"\bquestioned\b",
    r"\buncertain\b",
    r"\bdifficult to exclude",
    r"worrisome for",
    r"\bpossibility\b",
    r"not (?:\w+ )?excluded",
    r"\bcannot exclude\b",
    r"(?:^|\s)\?(?=\s*\w)",
]
# after the mention: "loose" cues reach every mention before them in the clause, "tight" ones only
# the last
_UNC_POST = [
    r"can ?not (?:be )?(?:\w+ )?(?:excluded|ruled out)",
    r"not (?:\w+ )?(?:excluded|ruled out)",
    r"can't be (?:excluded|ruled out)",
    rf"{_BE} (?:also )?(?:possible|likely|unlikely|suspected|questionable|"
    r"considered|not excluded|in the differential)",
    r"\bdifficult to exclude",
]
_UNC_POST_TIGHT = [
    r"\bversus\b",
    r"\bvs\b",
    r"\?\s*$",
    r"(?:may|might|could) (?:be|represent|reflect|indicate)",
    r"\bpossible\b",
    r"\bsuspected\b",
]
_PSEUDO = [
    r"\b(?:no|not|without)\s+(?:\w+\s+)?(?:change|changed|changes|increase|increased|decrease|decreased|"
    r"worsening|worsened|improvement|improved|progression|progressed|difference|interval change)\b",
    r"(?:partial(?:ly)?|incomplete(?:ly)?|nearly|almost|not (?:completely|fully|entirely)|near(?:ly)?[- ]"
    r"complete(?:ly)?|near[- ]complete)\s+(?:resolved|resolution|cleared|clearing)",
    r"not (?:well )?(?:seen|visualized|assessed|evaluated|included)\s+(?:on|in) (?:this|the)",
    r"no other",
    r"\bnot only\b",
    r"\bno\.\s*\d",
]
_BREAKERS = re.compile(
    r";|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bexcept\b|\bwhereas\b|"
    r"(?<!consistent )(?<!compatible )\bwith\b|\bthere (?:is|are|has been|have been)\b|\bwhich\b|"
    r"\band (?=(?:the |a |an )?[\w-]+ (?:is|are|has|have|was|were|appears?|remains?)\b)"
)
# between two mentions offered as alternatives (a positive one becomes uncertain)
_ALTERNATIVE = re.compile(r"\s*(?:,?\s*or|and\s*/\s*or|and or|/)\s*(?:[\w-]+\s+){0,2}?")
# mentions that are uncertain in themselves: costophrenic blunting (effusion or pleural thickening)
_HEDGED = re.compile(r"blunt")
# "? pneumonia" stays whole
_SENTENCES = re.compile(r"(?<=[.!])\s+|(?<=\w\?)\s+|\n+|(?<=[a-z])\.(?=[a-z])")


def _compile(patterns: list[str]) -> re.Pattern | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def _bounded(p: str) -> str:
    start = "" if p.startswith(("\\b", "(?<")) else r"\b"
    return rf"{start}(?:{p})\b"


class RuleLabeler:
    """Rule-based CheXpert labeler (mentions, negation, uncertainty, sentence scope, synonyms)."""

    name = "rule"

    def __init__(self, cache_size: int = 200_000):
        self._cache: dict[str, tuple] = {}  # sentence -> its (observation, value) mentions
        self._cache_size = cache_size
        self._mentions = []
        for obs in CHEXPERT_OBSERVATIONS:
            if obs == "No Finding":
                continue
            pos, normal = _PATTERNS[obs]
            self._mentions.append(
                (
                    OBSERVATION_INDEX[obs],
                    _TRIGGERS[obs],
                    _compile([_bounded(p) for p in pos]),
                    _compile([_bounded(p) for p in normal]),
                )
            )
        self._neg_phrase, self._pseudo = re.compile(_NEG_PHRASE[0]), _compile(_PSEUDO)
        self._neg_pre, self._neg_post = _compile(_NEG_PRE), _compile(_NEG_POST)
        self._unc_pre, self._unc_post = _compile(_UNC_PRE), _compile(_UNC_POST)
        self._unc_tight = _compile(_UNC_POST_TIGHT)

    # -- one clause
    # ---------------------------------------------------------------------------------------
    @staticmethod
    def _mask(text: str, spans: list[tuple[int, int]]) -> str:
        chars = list(text)
        for a, b in spans:
            chars[a:b] = " " * (b - a)
        return "".join(chars)

    def _find(
        self, pattern: re.Pattern, text: str, value: float, tight: bool = False
    ) -> list[tuple]:
        return [(m.start(), m.end(), value, tight) for m in pattern.finditer(text)]

    def _cues(self, clause: str) -> tuple[list, list]:
        """(pre-cues, post-cues) as (start, end, value, tight); phrases found first hide the words
        inside them."""
        hide = [m.span() for m in self._pseudo.finditer(clause)]
        hide += [m.span(1) for m in self._neg_phrase.finditer(clause)]
        masked = self._mask(clause, hide)
        unc_pre = self._find(self._unc_pre, masked, UNCERTAIN)
        unc_post = self._find(self._unc_post, masked, UNCERTAIN) + self._find(
            self._unc_tight, masked, UNCERTAIN, True
        )
        masked = self._mask(masked, [c[:2] for c in unc_pre + unc_post])
        neg_pre = self._find(self._neg_pre, masked, NEGATIVE)
        neg_post = self._find(self._neg_post, masked, NEGATIVE)
        return unc_pre + neg_pre, unc_post + neg_post

    def _label_clause(self, clause: str) -> list[tuple[int, float]]:
        return self._values(clause, self._clause_mentions(clause))

    def _clause_mentions(self, clause: str) -> list[tuple[int, int, int, bool]]:
        """(index, start, end, is_normal) of every observation mention of one clause."""
        mentions = []
        for idx, triggers, pos_re, normal_re in self._mentions:
            if not any(t in clause for t in triggers):
                continue
            mentions += [(idx, m.start(), m.end(), False) for m in pos_re.finditer(clause)]
            if normal_re is not None:
                mentions += [(idx, m.start(), m.end(), True) for m in normal_re.finditer(clause)]
        return mentions

    def _values(self, clause: str, mentions: list[tuple]) -> list[tuple[int, float]]:
        """(index, value) of each mention ``(index, start, end, is_normal)`` of one clause."""
        if not mentions:
            return []
        values = []
        pre, post = self._cues(clause)
        starts = sorted(m[1] for m in mentions)
        spans = sorted({(m[1], m[2]) for m in mentions if not m[3]})
        for idx, start, end, is_normal in mentions:
            # a tight post-cue ("versus", "possible", "?") reaches back only to the nearest mention,
            # a trailing negation ("... has resolved") not past a comma: "heart enlarged, effusion
            # resolved" negates the effusion only
            after = [c for c in post if c[0] >= end and not (
                "," in clause[end:c[0]]
                or (c[3] and any(end <= s < c[0] for s in starts)))]
            before = [c for c in pre if c[1] <= end]
            if any(c[2] == UNCERTAIN for c in after):
                value = UNCERTAIN
            elif before:
                # the nearest cue before the mention decides
                value = max(before, key=lambda c: c[0])[2]
            elif after or is_normal:
                value = NEGATIVE
            elif _HEDGED.search(clause[start:end]) or self._alternative(clause, start, end, spans):
                value = UNCERTAIN
            else:
                value = POSITIVE
            values.append((idx, value))
        return values

    @staticmethod
    def _alternative(clause: str, start: int, end: int, spans: list[tuple[int, int]]) -> bool:
        """A mention offered as one of alternatives: joined to a neighbouring mention by "or",
        "and/or" or "/" ("scarring or atelectasis", "atelectasis/infiltrate")."""
        for a, b in spans:
            if b <= start and _ALTERNATIVE.fullmatch(clause[b:start]):
                return True
            if a >= end and _ALTERNATIVE.fullmatch(clause[end:a]):
                return True
        return False

    def clause_mentions(self, sentence: str, extra: re.Pattern | None = None) -> list[tuple]:
        """``[(clause, [(index, start, end, value)])]`` for one lower-case sentence: its clauses
        and each mention's observation index (-1 for a match of ``extra``), span in the clause and
        value (1, 0, -1), read with this labeler's scope, negation and uncertainty cues."""
        out = []
        for clause in _BREAKERS.split(sentence):
            if not clause.strip():
                continue
            mentions = self._clause_mentions(clause)
            if extra is not None:
                mentions += [(-1, m.start(), m.end(), False) for m in extra.finditer(clause)]
            values = self._values(clause, mentions)
            out.append((clause, [(m[0], m[1], m[2], v) for m, (_, v) in zip(mentions, values)]))
        return out

    @staticmethod
    def sentences(text: str) -> list[str]:
        """The lower-case sentences the labeler reads in ``text``."""
        return [s for s in _SENTENCES.split(_normalise(text)) if s.strip()]

    def _label_sentence(self, sentence: str) -> tuple:
        hit = self._cache.get(sentence)
        if hit is None:
            hit = tuple(
                v
                for clause in _BREAKERS.split(sentence)
                if clause.strip()
                for v in self._label_clause(clause)
            )
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[sentence] = hit
        return hit

    # -- reports
    # ------------------------------------------------------------------------------------------
    def label_one(self, text: str) -> np.ndarray:
        out = np.full(len(CHEXPERT_OBSERVATIONS), np.nan)
        for sentence in _SENTENCES.split(_normalise(text)):
            for idx, value in self._label_sentence(sentence):
                out[idx] = _merge(out[idx], value)
        others = np.delete(out, [NO_FINDING, SUPPORT_DEVICES])
        out[NO_FINDING] = (
            POSITIVE if not np.any((others == POSITIVE) | (others == UNCERTAIN)) else np.nan
        )
        return out

    def label(self, texts: list[str]) -> np.ndarray:
        """[N, 14] float array: 1 positive, 0 negative, -1 uncertain, nan not mentioned."""
        return np.stack([self.label_one(t) for t in texts]) if len(texts) else np.zeros((0, 14))

    __call__ = label


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", (text or "").lower().replace("vs.", "vs"))


def _merge(old: float, new: float) -> float:
    """CheXpert aggregation of mentions: positive > uncertain > negative > not mentioned."""
    rank = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}
    if np.isnan(old):
        return new
    return old if rank[old] >= rank[new] else new
