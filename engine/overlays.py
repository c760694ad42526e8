"""Grounding overlays: PNGs of each report sentence beside its anatomy heatmap, plus a JSON summary.

Pillow only (hand-written jet colormap, ImageDraw captions). Files of one study, flat in ``out_dir``
(the stems are unique across studies, so they double as TensorBoard tags)::

    <id>_s00.png, <id>_s01.png ...   [image | heatmap blended over it] + the sentence as a caption
    <id>.json                        {"id", "report", "entities", "anatomies",
                                      "sentences": [{"text", "anatomies", "heatmap": "<id>_s00.png"}], ...}

A sentence's heatmap is the mean of the leaves it names (models/heatmaps.py); a sentence naming no
anatomy gets the mean over the study's predicted anatomies (the leaves the decoder saw).
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from datasets.cxr import MEAN, STD
from models.heatmaps import sentence_heatmap
from vocab.anatomy_graph import AnatomyGraph, graph_for_leaves
from vocab.report_text import sentence_anatomies, split_sentences


def jet(x: np.ndarray) -> np.ndarray:
    """Jet-like colormap: values in [0,1] ``[...]`` -> uint8 RGB ``[...,3]`` (dark blue -> red)."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0], dtype=np.float32)), 0.0, 1.0)
    return (rgb * 255 + 0.5).astype(np.uint8)


def denormalize(image: torch.Tensor, mean: float = MEAN, std: float = STD) -> np.ndarray:
    """A normalised model input ``[C,H,W]`` (or ``[H,W]``) -> grayscale ``[H,W]`` float in [0,1]."""
    image = image.detach().float().cpu()
    if image.dim() == 3:
        image = image[0]
    return (image * std + mean).clamp(0, 1).numpy()


def _gray(image) -> np.ndarray:
    """Grayscale ``[H,W]``, ``[1|3,H,W]`` or ``[H,W,1|3]`` (floats in [0,1], uint8, or any range) ->
    uint8."""
    a = image.detach().float().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if a.ndim == 3:
        a = a[0] if a.shape[0] in (1, 3) else a[..., 0]
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float32)
    if a.min() < 0 or a.max() > 1:
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return (a * 255 + 0.5).astype(np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # older Pillow or no FreeType: the bitmap font
        return ImageFont.load_default()


def overlay_panel(
    gray: np.ndarray, heat: np.ndarray, caption: str, alpha: float = 0.45
) -> Image.Image:
    """[image | heatmap blended over it] above a wrapped caption."""
    H, W = gray.shape
    heat = np.asarray(
        Image.fromarray(np.asarray(heat, dtype=np.float32)).resize((W, H), Image.BILINEAR)
    )
    rgb = np.repeat(gray[..., None], 3, -1).astype(np.float32)
    blend = ((1 - alpha) * rgb + alpha * jet(heat)).round().clip(0, 255).astype(np.uint8)
    font = _font(max(10, W // 18))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    char_w = max(1.0, probe.textlength("abcdefghijklmnopqrstuvwxyz", font=font) / 26)
    lines = textwrap.wrap(caption, width=max(10, int(2 * W / char_w) - 2)) or [""]
    line_h = int(sum(font.getmetrics()) * 1.2)
    panel = Image.new("RGB", (2 * W, H + line_h * len(lines) + 8), "white")
    panel.paste(Image.fromarray(np.repeat(gray[..., None], 3, -1)), (0, 0))
    panel.paste(Image.fromarray(blend), (W, 0))
    draw = ImageDraw.Draw(panel)
    for i, line in enumerate(lines):
        draw.text((4, H + 4 + i * line_h), line, fill="black", font=font)
    return panel


def safe_name(study_id) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(study_id)).strip("._") or "study"


def _leaves(names, graph: AnatomyGraph) -> list[str]:
    """Node names (leaves or inner nodes) -> the leaves under them, graph order."""
    wanted = {leaf for n in names if n in graph.index for leaf in graph.leaves_under(n)}
    return [n for n in graph.leaf_names if n in wanted]


def write_overlays(
    out_dir,
    study_id,
    image,
    report: str,
    entities,
    anatomies,
    heatmaps: torch.Tensor,
    graph: AnatomyGraph | None = None,
    extra: dict | None = None,
    alpha: float = 0.45,
) -> dict:
    """Write one study's sentence overlays and JSON; returns the JSON dict (plus "json" and
    "overlays", the written paths). ``image``: un-normalised grayscale (see ``denormalize``);
    ``heatmaps [25,h,w]`` in [0,1] in leaf order (resized to the image); ``anatomies``: the
    predicted anatomy names; ``extra``: more JSON fields."""
    graph = graph or AnatomyGraph.default()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = safe_name(study_id)
    gray = _gray(image)
    heatmaps = heatmaps.detach().float().cpu()
    fallback = _leaves(anatomies, graph) or list(graph.leaf_names)
    pairs = (
        sentence_anatomies(report, graph) if split_sentences(report) else [("(empty report)", [])]
    )
    sentences, paths = [], []
    for k, (text, leaves) in enumerate(pairs):
        used = leaves or fallback
        heat = sentence_heatmap(heatmaps, used, graph).numpy()
        caption = (
            f"{text}  [{', '.join(leaves) if leaves else 'no anatomy named: predicted anatomies'}]"
        )
        name = f"{stem}_s{k:02d}.png"
        overlay_panel(gray, heat, caption, alpha).save(out_dir / name)
        paths.append(str(out_dir / name))
        sentences.append({"text": text, "anatomies": leaves, "heatmap": name})
    summary = {
        "id": str(study_id),
        "report": report,
        "entities": list(entities),
        "anatomies": list(anatomies),
        "sentences": sentences,
        **(extra or {}),
    }
    with open(out_dir / f"{stem}.json", "w") as f:
        json.dump(summary, f, indent=2)
    return {**summary, "json": str(out_dir / f"{stem}.json"), "overlays": paths}


def write_overlay_batch(out_dir, visuals, leaf_names=None) -> list[str]:
    """Overlays of evaluated studies (engine/evaluate.py). ``visuals``: ``(normalised image [3,H,W],
    heatmaps [K,H,W], row)`` with row {"id", "generated" (or "report"), "entities", "anatomies",
    optional "reference"}; ``leaf_names``: the model's, in heatmap order. Returns the PNG paths."""
    graph = graph_for_leaves(leaf_names)
    paths = []
    for image, heat, row in visuals:
        extra = {"reference": row["reference"]} if "reference" in row else None
        out = write_overlays(
            out_dir,
            row["id"],
            denormalize(image),
            row.get("generated", row.get("report", "")),
            row.get("entities", []),
            row.get("anatomies", []),
            heat,
            graph,
            extra,
        )
        paths += out["overlays"]
    return paths
