"""Report text: cleaning, sentences, and the anatomy-graph nodes a sentence mentions.

Cleaned form (``clean_report``), following R2Gen's ``clean_report_mimic_cxr`` /
``clean_report_iu_xray``, with the differences noted:

- Unicode is NFKC-normalised and lower-cased, accents are folded ("ﬁndings" -> "findings",
  "négatif" -> "negatif", "ß" -> "ss"; R2Gen drops such characters);
- newlines become spaces;
- enumerations ("1.", "2)") and runs of underscores (MIMIC's de-identification
  "___") are removed;
- the report is split into sentences at ".", "?", "!" or ";" followed by a space
  (or the end); inside a sentence every character other than letters, digits,
  spaces, "-" between word characters and "." inside a decimal number ("1.5")
  is dropped ("/" becomes a space, so "and/or" -> "and or"; R2Gen keeps neither);
- whitespace is collapsed; empty sentences are dropped (R2Gen keeps them);
- sentences are joined with " . " and the report ends with " .":
  ``"The heart is normal.  No effusion!"`` -> ``"the heart is normal . no effusion ."``.

A report that cleans to nothing is an empty report (an error, or skipped); ``usable_report`` also
rejects one without a Latin letter (e.g. all CJK), saying so.
"""
from __future__ import annotations

import re
import unicodedata

# ----------------------------------------------------------------------------- cleaning

_NUMBERING = re.compile(r"(^|[.:;!?]\s*)\(?\d{1,2}[.)](?=\s|$)")
_SENT_SPLIT = re.compile(r"[.?!;]+(?:\s+|$)")
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")
_KEEP = re.compile(r"[^a-z0-9\s\-\u2024]")
_LOOSE_HYPHEN = re.compile(r"(?<![a-z0-9])-|-(?![a-z0-9])")


# Latin letters that NFKD does not decompose: their usual transliteration
_FOLD = str.maketrans({"ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ð": "d",
                       "þ": "th", "ı": "i", "ħ": "h"})


class ReportTextError(ValueError):
    """A report the text pipeline cannot use; ``kind`` is "empty_report" or "non_latin_report"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def fold_text(text: str) -> str:
    """NFKC (ligatures, full-width and compatibility forms), lower case, accents removed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return text.translate(_FOLD)


def clean_report(text: str) -> str:
    """Normalise a report as described in the module docstring; '' if nothing is left."""
    text = fold_text(text).replace("\n", " ").replace("\r", " ")
    text = re.sub(r"_+", " ", text)
    text = _NUMBERING.sub(lambda m: m.group(1) + " ", text.strip())
    text = _DECIMAL.sub("\u2024", text)          # protect decimal points from the split
    sentences = []
    for sent in _SENT_SPLIT.split(text):
        sent = sent.replace("/", " ").replace("\\", " ")
        sent = _KEEP.sub("", sent)
        sent = _LOOSE_HYPHEN.sub(" ", sent)
        sent = " ".join(sent.split()).replace("\u2024", ".")
        if sent:
            sentences.append(sent)
    return " . ".join(sentences) + " ." if sentences else ""


def usable_report(text: str) -> str:
    """``clean_report(text)``, or ReportTextError when it has no Latin letter: "is empty" for text
    without a letter or digit, else "has no Latin letters" (the pipeline reads a-z only)."""
    cleaned = clean_report(text)
    if re.search("[a-z]", cleaned):
        return cleaned
    if not any(c.isalnum() for c in text):
        raise ReportTextError("empty_report", "is empty")
    raise ReportTextError(
        "non_latin_report",
        f"has no Latin letters after NFKC normalisation and accent folding "
        f"({text.strip()[:40]!r}): the text pipeline reads a-z only",
    )


def split_sentences(report: str) -> list[str]:
    """Sentences of a report (raw or cleaned: "a . b ." -> ["a", "b"]), text kept as written."""
    return [s.strip() for s in _SENT_SPLIT.split(report) if s.strip()]


# ----------------------------------------------------------------------------- anatomy mentions

_SIDES = ("right", "left")
# (regex of the anatomy term, node). "{side}" nodes are lateral: the side comes from a
# "right"/"left" word just before the term (or inside it); both sides when there is none,
# when both appear, or when the term itself is bilateral (plural, "bi-", "bilateral").
_TERMS: list[tuple[str, str]] = [
    (r"upper (?:lobes?|zones?|lung zones?|lungs?|lung fields?)", "{side} upper lung zone"),
    (r"lingula|lingular", "left mid lung zone"),
    (r"middle lobe|mid (?:lung )?zones?|mid lungs?", "{side} mid lung zone"),
    (
        r"lower (?:lobes?|zones?|lung zones?|lungs?|lung fields?)|lung bases?|bases|base|basilar|basal"
        r"|bibasilar|bibasal",
        "{side} lower lung zone",
    ),
    (r"apical zones?|apical|apices|apex|biapical", "{side} apical zone"),
    (r"costophrenic (?:angles?|sulcus|sulci)", "{side} costophrenic angle"),
    (r"(?:hemi)?diaphragms?|hemidiaphragmatic", "{side} hemidiaphragm"),
    (r"hil(?:um|a|ar|ar structures)|perihilar", "{side} hilar structures"),
    (r"clavic(?:le|les|ular)", "{side} clavicle"),
    (r"lungs?|pulmonary parenchyma", "{side} lung"),
    (r"cardiac silhouette|heart|cardiac|cardiomegaly", "cardiac silhouette"),
    (r"cardiomediastinal (?:silhouette|contours?)", "mediastinum"),
    (
        r"(?:upper|superior) mediastin(?:um|al)|mediastinal widening|widened mediastinum",
        "upper mediastinum",
    ),
    (r"mediastin(?:um|al)", "mediastinum"),
    (r"right atri(?:um|al)", "right atrium"),
    (r"cavo-?atrial(?: junction)?", "cavoatrial junction"),
    (r"aortic (?:knob|arch|knuckle)|aorta", "aortic arch"),
    (r"svc|superior vena cava", "superior vena cava"),
    (r"trachea|tracheal", "trachea"),
    (r"carina", "carina"),
    (r"(?:thoracic )?spine|vertebra(?:e|l)?(?: bod(?:y|ies))?", "spine"),
    (r"osseous structures|bony structures|bones|skeletal structures", "skeletal structures"),
    (r"(?:upper )?abdomen|abdominal|stomach|bowel|subdiaphragmatic", "abdomen"),
]
_TERM_RES = [(re.compile(rf"\b(?:{pat})\b"), node) for pat, node in _TERMS]
_BILATERAL = re.compile(r"^(?:bilateral|bi\w+)|(?:s|hila|sulci)$")   # "bibasilar", "bases", "hila"


def _sides_before(sentence: str, start: int, term: str) -> tuple[str, ...]:
    """Side of a lateral term: the nearest "right"/"left" in the 4 words before it (or in
    it); both for a bilateral or plural term, "right and left", "bilateral", or no side."""
    if _BILATERAL.search(term):
        return _SIDES
    words = sentence[:start].split()[-4:] + term.split()
    for i in range(len(words) - 1, -1, -1):
        if words[i] in ("bilateral", "bilaterally", "both"):
            return _SIDES
        if words[i] in _SIDES:
            if i >= 2 and words[i - 1] in ("and", "or") and words[i - 2] in _SIDES:
                return _SIDES
            return (words[i],)
    return _SIDES


def derive_anatomies(report: str, graph) -> list[str]:
    """Anatomy-graph nodes mentioned in a (cleaned or raw) report, in order of mention.

    Terms whose node is not in ``graph`` are ignored; [] when nothing is mentioned.
    """
    found: list[str] = []
    for sentence in clean_report(report).split(" . "):
        taken = [False] * len(sentence)   # a longer, earlier-listed term wins its characters
        for regex, node in _TERM_RES:
            for m in regex.finditer(sentence):
                if any(taken[m.start():m.end()]):
                    continue
                taken[m.start():m.end()] = [True] * (m.end() - m.start())
                names = (
                    [node.format(side=s) for s in _sides_before(sentence, m.start(), m.group(0))]
                    if "{side}" in node
                    else [node]
                )
                for name in names:
                    if name in graph.index and name not in found:
                        found.append(name)
    return found


def sentence_anatomies(report: str, graph) -> list[tuple[str, list[str]]]:
    """``[(sentence, [leaf names it mentions])]``: mentioned nodes expanded to the leaves under them
    (e.g. "left lung" -> its 7 zones), graph leaf order; [] for a sentence naming no anatomy."""
    out = []
    for sent in split_sentences(report):
        leaves = {
            leaf for node in derive_anatomies(sent, graph) for leaf in graph.leaves_under(node)
        }
        out.append((sent, [n for n in graph.leaf_names if n in leaves]))
    return out
