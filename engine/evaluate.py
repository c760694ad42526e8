"""Evaluation: the validation loss (model selection) and generation + scoring over a split.

Generation runs on every rank over a ``DistributedSampler(shuffle=False)`` shard; that sampler pads
the last shards by repeating samples, so rows are de-duplicated by dataset index after gathering on
rank 0, which scores them and writes ``generated.jsonl`` and ``metrics.json``. The model is used
through ``model(batch)``, ``generate``, ``heatmaps``, ``prior_heatmaps`` and ``leaf_names``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets.loaders import to_device
from engine.optim import autocast, full_parameters, resolve_amp
from engine.overlays import write_overlay_batch
from metrics.clinical import format_table, labeler_from_config
from metrics.reports import flat_scores, score_records
from metrics.synthetic_grounding import (
    mask_records,
    record_for,
    summarize_grounding,
    synthetic_grounding,
)
from models.report_decoder import decoding_options
from utils.checkpoint import unwrap
from utils.dist import all_reduce_sum, broadcast_object, gather_objects, is_main_process


@torch.no_grad()
def evaluate_loss(model, loader, device, amp="fp32") -> dict[str, float]:
    """Sample-weighted mean of every loss term over the loader, all-reduced over ranks. (With a
    padded DistributedSampler the few repeated samples count twice; the bias is negligible.)"""
    model.eval()
    dtype = resolve_amp(amp, device)
    keys, sums, count = None, None, 0
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, dtype):
            losses = model(batch)
        keys = keys or sorted(losses)
        n = len(batch["id"])
        terms = torch.stack([losses[k].detach().float() for k in keys]) * n
        sums = terms if sums is None else sums + terms
        count += n
    if keys is None:
        raise ValueError("evaluate_loss: the loader is empty")
    total = all_reduce_sum(
        torch.cat([sums.double(), sums.new_tensor([float(count)], dtype=torch.float64)])
    )
    total = total.tolist()
    return {k: total[i] / total[-1] for i, k in enumerate(keys)}


def score_reports(rows: list[dict], cfg, device="cpu") -> tuple[dict[str, float], dict]:
    """Language metrics and clinical efficacy (cfg.eval.labeler on both sides) of rows {"index",
    "generated", "reference"}. Returns (flat metrics, the full clinical-efficacy dict)."""
    records = [
        {"id": str(r["index"]), "generated": r["generated"], "references": [r["reference"]]}
        for r in rows
    ]
    result = score_records(records, labeler_from_config(cfg.eval, device), cfg.eval.uncertain_as,
                           meteor=cfg.eval.meteor)
    print(format_table(result["clinical_efficacy"], cfg.eval.labeler))
    return flat_scores(result), result["clinical_efficacy"]


@torch.no_grad()
def generate_and_score(
    model,
    loader,
    device,
    cfg,
    out_dir,
    tb=None,
    epoch=None,
    prefix: str = "val",
    num_visualize: int | None = None,
    step: int | None = None,
    split: str | None = None,
) -> dict:
    """Generate a report for every study of ``loader``'s split (sharded over ranks), gather and
    de-duplicate on rank 0, score (language, clinical efficacy, and grounding when the records carry
    synthetic masks), write ``out_dir``/generated.jsonl + metrics.json + heatmap overlays, log to
    TensorBoard under ``prefix``/ at ``step`` (default: ``epoch``). ``split`` (default ``prefix``)
    names the annotation split whose records hold the masks. Every rank returns the same metrics
    dict (unprefixed keys)."""
    net = unwrap(model)
    net.eval()
    dtype = resolve_amp(cfg.train.amp, device)
    records = mask_records(cfg.data.annotation, split or prefix)
    root = Path(cfg.data.annotation).parent  # mask paths are relative to the annotation.json folder
    num_visualize = cfg.eval.num_visualize if num_visualize is None else num_visualize
    rows, visuals, prior_maps = [], [], None
    with full_parameters(model):  # FSDP: whole weights, no collective per generated token
        for batch in loader:
            if batch is None:  # every sample unreadable (data.skip_bad)
                continue
            batch = to_device(batch, device)
            with autocast(device, dtype):
                outs = net.generate(batch, **decoding_options(cfg.eval))
            want_vis = is_main_process() and len(visuals) < num_visualize
            recs = [record_for(records, o["id"]) for o in outs]
            ground = [{}] * len(outs)
            if records or want_vis:
                with autocast(device, dtype):
                    heat = net.heatmaps(batch["image"]).float()
            if records:
                ground = synthetic_grounding(heat, recs, root, net.leaf_names)
                # the location prior alone: what the model's maps are compared with
                if prior_maps is None:
                    prior_maps = net.prior_heatmaps(tuple(batch["image"].shape[-2:]))
                if prior_maps is not None:
                    prior = synthetic_grounding(
                        prior_maps.expand(len(recs), -1, -1, -1), recs, root, net.leaf_names
                    )
                    ground = [{**g, "prior": p} for g, p in zip(ground, prior)]
            for j, (o, i) in enumerate(zip(outs, batch["index"].tolist())):
                rows.append(
                    {
                        "index": i,
                        "id": o["id"],
                        "generated": o["report"],
                        "reference": batch["report"][j],
                        "entities": list(o["entities"]),
                        "anatomies": list(o["anatomies"]),
                        **ground[j],
                    }
                )
                if want_vis and len(visuals) < num_visualize:
                    visuals.append((batch["image"][j].float().cpu(), heat[j].cpu(), rows[-1]))

    gathered = gather_objects(rows)
    metrics = None
    if is_main_process():
        unique = sorted({r["index"]: r for part in reversed(gathered) for r in part}.values(),
                        key=lambda r: r["index"])
        metrics, ce = score_reports(unique, cfg, device)
        if records:
            metrics.update(summarize_grounding(unique))
        # e.g. prior_pointing_game: the prior alone, the same for every image
        if unique and "prior" in unique[0]:
            prior = summarize_grounding([r["prior"] for r in unique])
            metrics.update(
                {f"prior_{k}": v for k, v in prior.items() if k != "pointing_game_by_leaf"}
            )
        metrics["num_studies"] = len(unique)
        out_dir = Path(out_dir)
        _write(out_dir, unique, {**metrics, "clinical_efficacy": ce})
        paths = (
            write_overlay_batch(out_dir / "overlays", visuals, net.leaf_names) if visuals else []
        )
        _log(
            tb,
            unique,
            paths,
            metrics,
            prefix,
            epoch if step is None else step,
            cfg.eval.num_text_samples,
        )
    return broadcast_object(metrics)


def _write(out_dir: Path, rows: list[dict], metrics: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "generated.jsonl", "w") as f:
        for r in rows:
            f.write(
                json.dumps(
                    {k: r[k] for k in ("id", "generated", "reference", "entities", "anatomies")}
                )
                + "\n"
            )
    with open(out_dir / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)


def _log(tb, rows, overlay_paths, metrics, prefix, step, num_text_samples: int) -> None:
    step = step or 0
    print(f"[{prefix}] " + "  ".join(f"{k}: {v:.4f}" for k, v in metrics.items()
                                     if isinstance(v, (int, float)) and v is not None))
    if tb is None:
        return
    tb.add_scalars(metrics, step, prefix=prefix)
    for r in rows[:num_text_samples]:
        tb.add_text(
            f"{prefix}/report/{r['id']}",
            f"**generated:** {r['generated']}\n\n"
            f"**reference:** {r['reference']}\n\n**entities:** {', '.join(r['entities']) or 'none'}",
            step,
        )
    for p in overlay_paths:
        with Image.open(p) as im:
            tb.add_image(
                f"{prefix}/overlay/{Path(p).stem}",
                np.asarray(im.convert("RGB")),
                step,
                dataformats="HWC",
            )
