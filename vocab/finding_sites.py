"""Where a report places its findings: the anatomy-graph nodes ``finding_anatomies`` reads.

A finding is a positive or uncertain mention (the rule labeler's clause scope, negation and
uncertainty) of one of the 13 observations other than No Finding, or of an abnormality outside
them (``OTHER_FINDINGS``: granuloma, calcification, tortuous aorta, degenerative change,
scoliosis, hyperinflation, emphysema, elevated hemidiaphragm, lymph nodes, a device tip or lead,
...). Its nodes, the first rule that gives any:

1. the regions named in its part of the clause (the text between commas); for emphysema, COPD and
   hyperinflation (large lung volumes) naming none, both lungs;
2. the regions named in the rest of its clause, then of its sentence, outside parts that only
   state something normal or absent ("heart size normal, mild aortic ectasia" -> the aorta);
3. the site the finding implies: cardiomegaly -> cardiac silhouette, enlarged cardiomediastinum ->
   mediastinum, pneumothorax -> apical zone, edema -> hilar structures (perihilar);
4. the lung of the side its clause names ("pleural reaction on the right" -> right lung), unless
   it is a device, or its sentence names a site outside the graph (rib, chest wall, axilla,
   shoulder, breast, humerus, soft tissue, neck, thoracic inlet): then none.

A pleural effusion (or costophrenic blunting) always adds its costophrenic angle. A node with a
more specific node of the same finding under it is dropped ("lung nodule in the right upper lobe"
-> the right upper lung zone, not the whole right lung). Sides follow
``vocab.report_text.anatomy_mentions`` (the nearest side word in the sentence; both when none).
"""
from __future__ import annotations

import functools
import re

from vocab.labeler import NEGATIVE, RuleLabeler
from vocab.observations import OBSERVATION_INDEX
from vocab.report_text import anatomy_mentions

OTHER_FINDINGS = re.compile(
    r"\b(?:granulom\w*|calcifi\w*|calcific|atheroscl\w*|tortu\w*|ectas\w*|ectatic|elevat\w*"
    r"|eventration|degenerat\w*|spondylosis|osteophyt\w*|\w*scoliosis|kyphos[ie]s|kyphotic"
    r"|deformit(?:y|ies)|hyperinflat\w*|hyperexpan\w*|emphysema\w*|copd|bronchiectasis"
    r"|\w*adenopathy|lymph nodes?|enlarge\w*|prominen\w*|hernia|flattened|lobectomy|shrapnel"
    r"|bullet|foreign body|vertebroplasty|widen\w*|thickening|pneumoperitoneum|free air"
    r"|distend\w*|scar\w*|curvature|large lung volumes|tips?|leads?)\b"
)
# abnormalities of both lungs as a whole: their site when their part names none
DIFFUSE = re.compile(r"\b(?:emphysema\w*|copd|hyperinflat\w*|hyperexpan\w*|large lung volumes)\b")
DEVICE = re.compile(r"\b(?:tips?|leads?)\b")
OFF_GRAPH = re.compile(
    r"\b(?:ribs?|chest wall|axilla\w*|shoulders?|breasts?|humer\w*|soft tissues?|neck"
    r"|thoracic inlet|extremit\w*|nipples?)\b"
)
EFFUSION = OBSERVATION_INDEX["Pleural Effusion"]
SUPPORT_DEVICES = OBSERVATION_INDEX["Support Devices"]
IMPLIED = {
    OBSERVATION_INDEX["Cardiomegaly"]: "cardiac silhouette",
    OBSERVATION_INDEX["Enlarged Cardiomediastinum"]: "mediastinum",
    OBSERVATION_INDEX["Pneumothorax"]: "apical zone",
    OBSERVATION_INDEX["Edema"]: "hilar structures",
}
_LATERAL = {"apical zone", "hilar structures", "costophrenic angle"}
_SIDE_WORD = re.compile(r"\b(?:right|left|bilateral\w*|both)\b")


@functools.cache
def _labeler() -> RuleLabeler:
    return RuleLabeler()


def _parts(clause: str) -> list[tuple[int, int]]:
    """Spans of a clause's comma-separated parts."""
    spans, start = [], 0
    for m in re.finditer(r",", clause):
        spans.append((start, m.start()))
        start = m.end()
    return spans + [(start, len(clause))]


def _nodes(text: str, sentence: str, graph) -> list[str]:
    return [n for _, n in anatomy_mentions(text, graph, context=sentence)]


def _implied(idx: int, part: str, sentence: str, graph) -> list[str]:
    """The site a finding implies, on the side(s) its sentence gives (both when none)."""
    site = "costophrenic angle" if idx == EFFUSION else IMPLIED.get(idx)
    if site is None:
        return []
    if site not in _LATERAL:
        return [site]
    sides = _side_words(part) or _side_words(sentence) or ("right", "left")
    return [f"{s} {site}" for s in sides if f"{s} {site}" in graph.index]


def _side_words(text: str) -> tuple[str, ...]:
    words = _SIDE_WORD.findall(text)
    if not words or any(w.startswith("bilateral") or w == "both" for w in words):
        return ("right", "left") if words else ()
    return tuple(s for s in ("right", "left") if s in words)


def _finding_nodes(idx, span, clause, parts, clause_nodes, sentence, sentence_nodes, graph):
    part = next(clause[a:b] for a, b in parts if a <= span[0] <= b)
    nodes = _nodes(part, sentence, graph)
    if not nodes and idx == -1 and DIFFUSE.fullmatch(clause[span[0]:span[1]]):
        nodes = ["lungs"]
    nodes = nodes or clause_nodes or sentence_nodes
    if not nodes:
        nodes = [] if idx == EFFUSION else _implied(idx, part, sentence, graph)
    device = idx == SUPPORT_DEVICES or (idx == -1 and DEVICE.fullmatch(clause[span[0]:span[1]]))
    if not nodes and not device and not OFF_GRAPH.search(sentence):
        nodes = [f"{s} lung" for s in _side_words(clause)]
    if idx == EFFUSION:
        nodes = nodes + _implied(idx, part, sentence, graph)
    nodes = [n for n in nodes if n in graph.index]
    # the most specific: drop a node with another of this finding's nodes under it
    return [n for n in nodes if not any(m != n and _is_under(m, n, graph) for m in nodes)]


def _is_under(node: str, ancestor: str, graph) -> bool:
    parent = graph.parent(node)
    while parent is not None:
        if parent == ancestor:
            return True
        parent = graph.parent(parent)
    return False


def _stated_nodes(clause: str, mentions, sentence: str, graph) -> list[str]:
    """Regions named in the parts of a clause that state no negative or normal mention only."""
    out = []
    for a, b in _parts(clause):
        inside = [m for m in mentions if a <= m[1] <= b]
        if inside and all(m[3] == NEGATIVE for m in inside):
            continue
        out += _nodes(clause[a:b], sentence, graph)
    return out


def finding_anatomies(report: str, graph) -> list[str]:
    """Graph nodes where the report places its findings (module docstring), in order of
    mention, each once: "small right pleural effusion" gives the right costophrenic angle,
    "the lungs are clear" gives nothing."""
    found: list[str] = []
    labeler = _labeler()
    for sentence in labeler.sentences(report):
        clauses = labeler.clause_mentions(sentence, OTHER_FINDINGS)
        sentence_nodes = [n for c, ms in clauses for n in _stated_nodes(c, ms, sentence, graph)]
        for clause, mentions in clauses:
            findings = [m for m in mentions
                        if m[3] != NEGATIVE and m[0] != OBSERVATION_INDEX["No Finding"]]
            if not findings:
                continue
            parts = _parts(clause)
            clause_nodes = _stated_nodes(clause, mentions, sentence, graph)
            for idx, start, end, _ in findings:
                for n in _finding_nodes(idx, (start, end), clause, parts, clause_nodes, sentence,
                                        sentence_nodes, graph):
                    if n not in found:
                        found.append(n)
    return found
