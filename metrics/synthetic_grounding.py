"""Grounding on the built-in synthetic data: heatmaps against the generator's per-leaf and
per-finding masks.

An annotation record of the synthetic data carries "regions" ({leaf: mask path}) and "findings"
([{"anatomy": leaf, "mask": path, "sentence": its sentence in the report}]), paths relative to the
annotation.json folder. Per study: the pointing game of every drawn leaf (strict, and with Zhang et
al.'s tolerance), that of the findings' leaves, the signed CNR of each finding's mask under its
leaf's heatmap (a map that avoids the finding scores below 0, where BioViL's absolute CNR would
reward it), and finding-level localisation: each finding's own mask under the map shown beside its
sentence (the mean of the maps of the leaves the sentence names).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets.annotation import load_annotation
from metrics.grounding import cnr, pointing_game, zhang_tolerance
from vocab.anatomy_graph import AnatomyGraph
from vocab.report_text import sentence_anatomies


def read_mask(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A binary mask, resized (nearest) to ``size`` = (H, W) of the heatmap when given."""
    with Image.open(path) as im:
        im = im.convert("L")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.NEAREST)
        return np.asarray(im) > 127


def mask_records(annotation, split: str) -> dict[str, dict]:
    """Records of ``split`` that carry synthetic masks, by id ({} for data without masks, e.g.
    MIMIC-CXR, or when the annotation has no such split)."""
    try:
        records = load_annotation(annotation, split)
    except ValueError:
        return {}
    return {
        str(r["id"]): r
        for r in records
        if isinstance(r, dict) and (r.get("regions") or r.get("findings"))
    }


def record_for(records: dict, sample_id: str) -> dict:
    """A sample's record; with data.views=all sample ids are "<study>_<k>"."""
    return records.get(sample_id) or records.get(sample_id.rsplit("_", 1)[0], {})


def sentence_map(heatmaps: np.ndarray, sentence: str, graph: AnatomyGraph) -> np.ndarray:
    """[H, W]: the map shown beside a sentence, the mean of the maps of the leaves it names (every
    leaf when it names none), as the overlays draw it. ``heatmaps`` [K, H, W] in leaf order."""
    leaves = [leaf for _, names in sentence_anatomies(sentence, graph) for leaf in names]
    index = [graph.leaf_index[n] for n in leaves] or list(range(graph.num_leaves))
    return heatmaps[index].mean(0)


def synthetic_grounding(heatmaps: torch.Tensor, records: list[dict], root, graph: AnatomyGraph) -> list[dict]:
    """Per study {"pointing": {drawn leaf: hit}, "pointing_tol": {drawn leaf: hit within tolerance},
    "pointing_findings": [hit per finding's leaf], "cnr": [signed CNR per finding under its leaf's
    map], "finding_pointing" / "finding_cnr": [per finding with a sentence: the pointing game and
    signed CNR of the finding's own mask under its sentence's map]}.

    heatmaps: [B, K, H, W] in [0, 1] in ``graph``'s leaf order, aligned with ``records``; masks are
    read from ``root`` and resized to the heatmap."""
    root = Path(root)
    index = graph.leaf_index
    out = []
    for hm, rec in zip(heatmaps.float().cpu().numpy(), records):
        size = hm.shape[-2:]
        hits, hits_tol = {}, {}
        for leaf, rel in (rec.get("regions") or {}).items():
            if leaf not in index:
                continue
            mask = read_mask(root / rel, size)
            if mask.any():
                hits[leaf] = pointing_game(hm[index[leaf]], mask)
                hits_tol[leaf] = pointing_game(hm[index[leaf]], mask, zhang_tolerance(max(size)))
        found = [f for f in rec.get("findings") or [] if f.get("anatomy") in index and f.get("mask")]
        masks = [read_mask(root / f["mask"], size) for f in found]
        cnrs = [cnr(hm[index[f["anatomy"]]], m, signed=True) for f, m in zip(found, masks)]
        phrased = [(sentence_map(hm, f["sentence"], graph), m) for f, m in zip(found, masks)
                   if f.get("sentence") and m.any()]
        out.append({"pointing": hits, "pointing_tol": hits_tol,
                    "pointing_findings": [hits[f["anatomy"]] for f in found if f["anatomy"] in hits],
                    "cnr": [c for c in cnrs if math.isfinite(c)],
                    "finding_pointing": [pointing_game(s, m) for s, m in phrased],
                    "finding_cnr": [c for c in (cnr(s, m, signed=True) for s, m in phrased) if math.isfinite(c)]})
    return out


def _values(x) -> list:
    """A study's per-leaf values: {leaf: value} or a list."""
    return list(x.values()) if isinstance(x, dict) else list(x or [])


def summarize_grounding(rows: list[dict]) -> dict:
    """Pointing game averaged over the drawn leaves of every study, and over the leaves of the
    findings; mean signed CNR over every finding; the finding-level pointing game and CNR (each
    finding's mask under its sentence's map); "pointing_game_by_leaf": {leaf: pointing game over its
    studies}."""
    out, by_leaf = {}, {}
    for r in rows:
        for leaf, hit in (r.get("pointing") or {}).items():
            by_leaf.setdefault(leaf, []).append(hit)
    for key, name in (("pointing", "pointing_game"), ("pointing_tol", "pointing_game_tol15"),
                      ("pointing_findings", "pointing_game_findings"), ("cnr", "cnr"),
                      ("finding_pointing", "finding_pointing_game"), ("finding_cnr", "finding_cnr")):
        values = [v for r in rows for v in _values(r.get(key))]
        if values:
            out[name] = float(np.mean(values))
    if by_leaf:
        out["pointing_game_by_leaf"] = {leaf: float(np.mean(v)) for leaf, v in by_leaf.items()}
    return out
