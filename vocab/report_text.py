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
# (regex of the anatomy term, node), in order of precedence: an earlier term wins the characters it
# matches. "{side}" nodes are lateral (the side rule is ``_sides``).
_LOWER = r"lower (?:lobes?|zones?|lung zones?|lungs?|lung fields?|chest)|lung bases?|bases|base|basilar"
_TERMS: list[tuple[str, str]] = [
    (r"(?:under|beneath|below) the (?:right |left )?(?:hemi)?diaphragms?|subdiaphragmatic"
     r"|(?:right )?upper quadrant|upper abdomen|abdomen|abdominal|stomach|bowel|free air"
     r"|pneumoperitoneum|intraperitoneal", "abdomen"),
    (r"cardiac apex|aortic valves?|cardiac silhouette|heart|cardiac|cardiomegaly|ventricles?"
     r"|ventricular|pericardial", "cardiac silhouette"),
    (r"retrocardiac", "left lower lung zone"),
    (r"upper (?:lobes?|zones?|lung zones?|lungs?|lung fields?|chest)", "{side} upper lung zone"),
    (r"lingula|lingular", "left mid lung zone"),
    (r"middle lobe|mid ?(?:lung )?zones?|mid ?lungs?|mid chest|mid hemithorax", "{side} mid lung zone"),
    (rf"{_LOWER}|basal|bibasilar|bibasal", "{side} lower lung zone"),
    (r"apical zones?|apical|apices|apex|biapical", "{side} apical zone"),
    (r"costophrenic|costodiaphragmatic|cp angles?", "{side} costophrenic angle"),
    (r"(?:hemi)?diaphragms?|(?:hemi)?diaphragmatic", "{side} hemidiaphragm"),
    (r"hil(?:um|a|ar|ar structures)|perihilar|pulmonary arter(?:y|ies)|central pulmonary",
     "{side} hilar structures"),
    (r"clavic(?:le|les|ular)", "{side} clavicle"),
    (r"lungs?(?! volumes?)|pulmonary parenchyma|hemithorax", "{side} lung"),
    (r"cardio ?-?mediastinal (?:silhouettes?|contours?|size)", "mediastinum"),
    (r"(?:upper|superior) mediastin(?:um|al)|mediastinal widening|widened mediastinum"
     r"|widening of the (?:superior |upper )?mediastinum|paratracheal"
     r"|mediastinum (?:is |appears |remains )?(?:\w+ )?(?:widened|wide)", "upper mediastinum"),
    (r"mediastin(?:um|al)", "mediastinum"),
    (r"right atri(?:um|al)", "right atrium"),
    (r"cavo-?atrial(?: junction)?|caval? ?atrial junction", "cavoatrial junction"),
    (r"aortic (?:knob|arch|knuckle)|aorta|aortic", "aortic arch"),
    (r"svc|superior vena cava", "superior vena cava"),
    (r"trachea|tracheal|endotracheal", "trachea"),
    (r"carina|subcarinal", "carina"),
    (r"(?:thoracic )?spine|t-spine|vertebra(?:e|l)?(?: bod(?:y|ies))?|vertebroplasty|\w*scoliosis"
     r"|kyphos[ie]s|kyphotic|spondylosis|osteophytes?|thoracolumbar", "spine"),
    (r"osseous structures|bony structures|bones|skeletal structures|bony thorax",
     "skeletal structures"),
]
_TERM_RES = [(re.compile(rf"\b(?:{pat})\b"), node) for pat, node in _TERMS]
# a bilateral term: "bibasilar", "bases", "hila", "apices", "lungs", "bilateral ..."
_BILATERAL = re.compile(r"^(?:bilateral|bi\w+)|(?:s|hila|sulci|apices)$")
_WORD = re.compile(r"[a-z]+")
_JOINERS = ("and", "or", "greater than", "more than", "worse than")


def _sides(sentence: str, start: int, end: int, term: str) -> tuple[str, ...]:
    """Side(s) of a lateral term in its sentence: both for a bilateral or plural term; else the
    nearest "right"/"left" before it anywhere in the sentence ("bilateral", "both", "right and
    left", "left greater than right" -> both); else the first side word in the five words after
    it ("pneumothorax on the right"); else both."""
    if _BILATERAL.search(term):
        return _SIDES
    words = _WORD.findall(sentence[:start]) + _WORD.findall(term)
    for i in range(len(words) - 1, -1, -1):
        if words[i] in ("bilateral", "bilaterally", "both"):
            return _SIDES
        if words[i] in _SIDES:
            other = _SIDES[1 - _SIDES.index(words[i])]
            joined = " ".join(words[max(0, i - 3):i])
            pair = any(joined.endswith(f"{other} {j}") for j in _JOINERS)
            return _SIDES if pair else (words[i],)
    for w in _WORD.findall(sentence[end:])[:5]:
        if w in _SIDES:
            return (w,)
        if w in ("bilateral", "bilaterally", "both"):
            return _SIDES
    return _SIDES


def anatomy_mentions(text: str, graph, context: str | None = None) -> list[tuple[int, str]]:
    """``[(position, node name)]`` of the anatomy terms of ``text`` (cleaned or raw; one
    sentence or part of one), in order of mention. Lateral terms take their side from
    ``context``, the sentence ``text`` is part of (default ``text`` itself), where ``text`` must
    occur. Terms whose node is not in ``graph`` are left out."""
    text = " ".join(_KEEP.sub(" ", text.lower().replace("/", " ")).split())
    context = text if context is None else " ".join(
        _KEEP.sub(" ", context.lower().replace("/", " ")).split())
    offset = max(context.find(text), 0)
    taken = [False] * len(text)   # an earlier-listed term wins its characters
    found = []
    for regex, node in _TERM_RES:
        for m in regex.finditer(text):
            if any(taken[m.start():m.end()]):
                continue
            taken[m.start():m.end()] = [True] * (m.end() - m.start())
            if "{side}" in node:
                sides = _sides(context, offset + m.start(), offset + m.end(), m.group(0))
                names = [node.format(side=s) for s in sides]
            else:
                names = [node]
            found += [(m.start(), n) for n in names if n in graph.index]
    return sorted(found, key=lambda x: x[0])


def derive_anatomies(report: str, graph) -> list[str]:
    """Anatomy-graph nodes mentioned in a (cleaned or raw) report, in order of mention, each once.

    Terms whose node is not in ``graph`` are ignored; [] when nothing is mentioned.
    """
    found: list[str] = []
    for sentence in clean_report(report).split(" . "):
        for _, name in anatomy_mentions(sentence, graph):
            if name not in found:
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
