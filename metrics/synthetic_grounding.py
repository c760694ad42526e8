"""Grounding on the built-in synthetic data: heatmaps against the generator's per-leaf and
per-finding masks.

An annotation record of the synthetic data carries "regions" ({leaf: mask path}) and "findings"
([{"anatomy": leaf, "mask": path}]), paths relative to the annotation.json folder. Per study: the
pointing game of every drawn leaf (strict, and with Zhang et al.'s tolerance), that of the findings'
leaves, and the signed CNR of each finding's mask under its leaf's heatmap (a map that avoids the
finding scores below 0, where BioViL's absolute CNR would reward it).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets.annotation import load_annotation
from metrics.grounding import cnr, pointing_game, zhang_tolerance


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


def synthetic_grounding(
    heatmaps: torch.Tensor, records: list[dict], root, leaf_names
) -> list[dict]:
    """Per study {"pointing": {drawn leaf: hit}, "pointing_tol": {drawn leaf: hit within tolerance},
    "pointing_findings": [hit per finding's leaf], "cnr": [signed CNR per finding]}.

    heatmaps: [B, K, H, W] in [0, 1], aligned with ``records``; masks are read from ``root`` and
    resized to the heatmap."""
    root = Path(root)
    index = {n: i for i, n in enumerate(leaf_names)}
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
        found = [
            f for f in rec.get("findings") or [] if f.get("anatomy") in index and f.get("mask")
        ]
        cnrs = [
            cnr(hm[index[f["anatomy"]]], read_mask(root / f["mask"], size), signed=True)
            for f in found
        ]
        out.append(
            {
                "pointing": hits,
                "pointing_tol": hits_tol,
                "pointing_findings": [hits[f["anatomy"]] for f in found if f["anatomy"] in hits],
                "cnr": [c for c in cnrs if math.isfinite(c)],
            }
        )
    return out


def _values(x) -> list:
    """A study's per-leaf values: {leaf: value} or a list."""
    return list(x.values()) if isinstance(x, dict) else list(x or [])


def summarize_grounding(rows: list[dict]) -> dict:
    """Pointing game averaged over the drawn leaves of every study, and over the leaves of the
    findings; mean signed CNR over every finding; "pointing_game_by_leaf": {leaf: pointing game over
    its studies}."""
    out, by_leaf = {}, {}
    for r in rows:
        for leaf, hit in (r.get("pointing") or {}).items():
            by_leaf.setdefault(leaf, []).append(hit)
    for key, name in (("pointing", "pointing_game"), ("pointing_tol", "pointing_game_tol15"),
                      ("pointing_findings", "pointing_game_findings"), ("cnr", "cnr")):
        values = [v for r in rows for v in _values(r.get(key))]
        if values:
            out[name] = float(np.mean(values))
    if by_leaf:
        out["pointing_game_by_leaf"] = {leaf: float(np.mean(v)) for leaf, v in by_leaf.items()}
    return out
