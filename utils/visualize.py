"""Grounding overlays: PNGs of each report sentence beside its anatomy heatmap, plus a JSON summary.

Pillow only (hand-written jet colormap, ImageDraw captions). Files of one study, flat in ``out_dir``
(the stems are unique across studies, so they double as TensorBoard tags)::

    <id>_s00.png, <id>_s01.png ...   [image | heatmap blended over it] + the sentence as a caption
    <id>.json                        {"id", "report", "entities", "anatomies",
                                      "sentences": [{"text", "anatomies", "heatmap": "<id>_s00.png"}], ...}

A sentence's heatmap is the mean of the leaves it names (models/heatmaps.py); a sentence naming no
anatomy gets the mean over the study's predicted anatomies (the leaves the decoder saw).
``predict_images`` runs a model on raw image files and writes all of this for each.
"""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from datasets.cxr import MEAN, STD, build_transform, load_image
from models.anatomy_graph import AnatomyGraph
from models.heatmaps import sentence_anatomies, sentence_heatmap, split_sentences


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
    """Grayscale ``[H,W]``, ``[1|3,H,W]`` or ``[H,W,1|3]`` (floats in [0,1], uint8, or any range) -> uint8."""
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


def overlay_panel(gray: np.ndarray, heat: np.ndarray, caption: str, alpha: float = 0.45) -> Image.Image:
    """[image | heatmap blended over it] above a wrapped caption."""
    H, W = gray.shape
    heat = np.asarray(Image.fromarray(np.asarray(heat, dtype=np.float32)).resize((W, H), Image.BILINEAR))
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


def write_overlays(out_dir, study_id, image, report: str, entities, anatomies, heatmaps: torch.Tensor,
                   graph: AnatomyGraph | None = None, extra: dict | None = None, alpha: float = 0.45) -> dict:
    """Write one study's sentence overlays and JSON; returns the JSON dict (plus "json" and "overlays", the
    written paths). ``image``: un-normalised grayscale (see ``denormalize``); ``heatmaps [25,h,w]`` in [0,1]
    in leaf order (resized to the image); ``anatomies``: the predicted anatomy names; ``extra``: more JSON fields."""
    graph = graph or AnatomyGraph.default()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = safe_name(study_id)
    gray = _gray(image)
    heatmaps = heatmaps.detach().float().cpu()
    fallback = _leaves(anatomies, graph) or list(graph.leaf_names)
    pairs = sentence_anatomies(report, graph) if split_sentences(report) else [("(empty report)", [])]
    sentences, paths = [], []
    for k, (text, leaves) in enumerate(pairs):
        used = leaves or fallback
        heat = sentence_heatmap(heatmaps, used, graph).numpy()
        caption = f"{text}  [{', '.join(leaves) if leaves else 'no anatomy named: predicted anatomies'}]"
        name = f"{stem}_s{k:02d}.png"
        overlay_panel(gray, heat, caption, alpha).save(out_dir / name)
        paths.append(str(out_dir / name))
        sentences.append({"text": text, "anatomies": leaves, "heatmap": name})
    summary = {"id": str(study_id), "report": report, "entities": list(entities), "anatomies": list(anatomies),
               "sentences": sentences, **(extra or {})}
    with open(out_dir / f"{stem}.json", "w") as f:
        json.dump(summary, f, indent=2)
    return {**summary, "json": str(out_dir / f"{stem}.json"), "overlays": paths}


def write_overlay_batch(out_dir, visuals, graph_or_leaf_names=None) -> list[str]:
    """Overlays of evaluated studies (engine/evaluate.py). ``visuals``: ``(normalised image [3,H,W],
    heatmaps [25,H,W], row)`` with row {"id", "generated" (or "report"), "entities", "anatomies", optional
    "reference"}; ``graph_or_leaf_names``: the model's graph or its leaf names. Returns the PNG paths."""
    graph = graph_or_leaf_names
    if not isinstance(graph, AnatomyGraph):
        graph = AnatomyGraph.default()
        if graph_or_leaf_names is not None and tuple(graph_or_leaf_names) != graph.leaf_names:
            graph = AnatomyGraph({"root": tuple(graph_or_leaf_names)}, root="root")  # flat: leaf order kept
    paths = []
    for image, heat, row in visuals:
        extra = {"reference": row["reference"]} if "reference" in row else None
        out = write_overlays(out_dir, row["id"], denormalize(image), row.get("generated", row.get("report", "")),
                             row.get("entities", []), row.get("anatomies", []), heat, graph, extra)
        paths += out["overlays"]
    return paths


@torch.no_grad()
def predict_images(model, image_paths, transform, device, out_dir, gen_kwargs: dict | None = None,
                   batch_size: int = 8) -> list[dict]:
    """Reports + heatmaps for raw image files (any PIL mode), written with ``write_overlays``.

    ``model`` has ``generate(batch, **gen_kwargs) -> [{"id", "report", "entities", "anatomies"}]`` and
    ``heatmaps(images) -> [B,25,H,W]`` (SSACL); ``transform`` maps a ``[1,H,W]`` image in [0,1] to the
    normalised model input (datasets/cxr.py ``build_transform(size, train=False)``). The overlays show
    the image as the model saw it (resized). Returns one dict per image (``write_overlays``'s, plus "image_path").
    """
    graph = getattr(model, "graph", None)
    graph = graph if isinstance(graph, AnatomyGraph) else AnatomyGraph.default()
    was_training = model.training
    model.eval()
    ids, seen = [], set()
    for p in image_paths:  # unique ids from the file names
        base, k = safe_name(Path(p).stem), 1
        name = base
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        ids.append(name)
    results = []
    try:
        for start in range(0, len(image_paths), batch_size):
            paths, chunk_ids = image_paths[start:start + batch_size], ids[start:start + batch_size]
            images = torch.stack([transform(load_image(p)) for p in paths]).to(device)
            outs = model.generate({"image": images, "id": chunk_ids}, **(gen_kwargs or {}))
            heat = model.heatmaps(images).float().cpu()
            for j, (o, p) in enumerate(zip(outs, paths)):
                row = write_overlays(out_dir, chunk_ids[j], denormalize(images[j]), o["report"], o["entities"],
                                     o["anatomies"], heat[j], graph, extra={"image_path": str(p)})
                results.append(row)
    finally:
        model.train(was_training)
    return results


def predict_images_from_config(model, image_paths, cfg, out_dir, device) -> list[dict]:
    """``predict_images`` with the eval transform and generation settings of a run config."""
    e = cfg.eval
    gen = dict(beam_size=e.beam_size, max_new_tokens=e.max_new_tokens, min_new_tokens=e.min_new_tokens,
               repetition_penalty=e.repetition_penalty, length_penalty=e.length_penalty)
    return predict_images(model, list(image_paths), build_transform(cfg.data.image_size, train=False), device,
                          out_dir, gen, batch_size=cfg.data.eval_batch_size)
