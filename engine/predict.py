"""Prediction on raw image files: a report, its entities and anatomies, and the sentence
overlays."""

from __future__ import annotations

from pathlib import Path

import torch

from datasets.cxr import build_transform, load_image
from engine.overlays import denormalize, safe_name, write_overlays
from models.report_decoder import decoding_options
from vocab.anatomy_graph import graph_for_leaves


def _read(path, min_size: int, print_fn):
    """The image ``[1,H,W]``, or None (said) when it cannot be read; says so when its shorter side
    is below ``min_size``."""
    try:
        img = load_image(path)
    except Exception as e:  # PIL raises many kinds
        print_fn(f"WARNING: skipped {path}: cannot read the image ({type(e).__name__}: {e})")
        return None
    h, w = img.shape[-2:]
    if min(h, w) < min_size:
        print_fn(f"WARNING: {path} is {w}x{h} px, smaller than the model input ({min_size} px): "
                 "it is upsampled and its report is unlikely to mean anything")
    return img


@torch.no_grad()
def predict_images(model, image_paths, transform, device, out_dir, gen_kwargs: dict | None = None,
                   batch_size: int = 8, min_size: int = 0, print_fn=print) -> list[dict]:
    """Reports + heatmaps for raw image files (any PIL mode), written with ``write_overlays``.
    An unreadable file is skipped with a warning (ValueError if none is readable); a warning
    names each image whose shorter side is below ``min_size`` pixels.

    ``model`` has ``generate(batch, **gen_kwargs) -> [{"id", "report", "entities", "anatomies"}]``
    and ``heatmaps(images) -> [B,25,H,W]`` (SSACL); ``transform`` maps a ``[1,H,W]`` image in [0,1]
    to the normalised model input (datasets/cxr.py ``build_transform(size, train=False)``). The
    overlays show the image as the model saw it (resized). Returns one dict per readable image
    (``write_overlays``'s, plus "image_path").
    """
    graph = graph_for_leaves(model.leaf_names)
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
            chunk = list(zip(image_paths[start:start + batch_size], ids[start:start + batch_size]))
            read = [(p, i, _read(p, min_size, print_fn)) for p, i in chunk]
            read = [(p, i, img) for p, i, img in read if img is not None]
            if not read:
                continue
            paths, chunk_ids = [p for p, _, _ in read], [i for _, i, _ in read]
            images = torch.stack([transform(img) for _, _, img in read]).to(device)
            outs = model.generate({"image": images, "id": chunk_ids}, **(gen_kwargs or {}))
            heat = model.heatmaps(images).float().cpu()
            for j, (o, p) in enumerate(zip(outs, paths)):
                row = write_overlays(
                    out_dir,
                    chunk_ids[j],
                    denormalize(images[j]),
                    o["report"],
                    o["entities"],
                    o["anatomies"],
                    heat[j],
                    graph,
                    extra={"image_path": str(p)},
                )
                results.append(row)
    finally:
        model.train(was_training)
    if image_paths and not results:
        raise ValueError(f"none of the {len(image_paths)} images could be read")
    return results


def predict_images_from_config(model, image_paths, cfg, out_dir, device) -> list[dict]:
    """``predict_images`` with the eval transform and generation settings of a run config; images
    smaller than the model input (data.image_size) get a warning."""
    return predict_images(
        model,
        list(image_paths),
        build_transform(cfg.data.image_size, train=False),
        device,
        out_dir,
        decoding_options(cfg.eval),
        batch_size=cfg.data.eval_batch_size,
        min_size=cfg.data.image_size,
    )
