"""Evaluation: the validation loss (model selection) and generation + scoring over a split.

Generation runs on every rank over a ``DistributedSampler(shuffle=False)`` shard; that sampler pads
the last shards by repeating samples, so rows are de-duplicated by dataset index after gathering on
rank 0, which scores them and writes ``generated.jsonl`` and ``metrics.json`` (with the split's
inputs skipped under data.skip_bad, by kind). The model is used
through ``model(batch)``, ``generate``, ``heatmaps``, ``prior_heatmaps`` and ``leaf_names``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets.loaders import empty_on_any_rank, skipped_counts, to_device
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
from utils.dist import all_reduce_sum, broadcast_object, gather_unique, is_main_process
from utils.seed import sample_keys
from vocab.anatomy_graph import graph_for_leaves


@torch.no_grad()
def evaluate_loss(model, loader, device, amp="fp32", seed: int = 0) -> dict[str, float]:
    """Sample-weighted mean of every loss term over the loader, all-reduced over ranks, and
    "num_skipped": the split's inputs skipped under data.skip_bad (every rank). Each sample's random
    draws (masking) come from (seed, its index), the same at every evaluation. A batch with no
    readable sample (None) is skipped on every rank. (With a padded DistributedSampler the few
    repeated samples count twice; the bias is negligible.)"""
    model.eval()
    dtype = resolve_amp(amp, device)
    keys, sums, count = None, None, 0
    for batch in loader:
        if empty_on_any_rank(batch, device):
            continue
        batch = to_device(batch, device)
        batch["noise_key"] = sample_keys(seed, -1, batch["index"])
        with autocast(device, dtype):
            losses = model(batch)
        keys = keys or sorted(losses)
        n = len(batch["id"])
        terms = torch.stack([losses[k].detach().float() for k in keys]) * n
        sums = terms if sums is None else sums + terms
        count += n
    if keys is None:
        raise ValueError("evaluate_loss: the loader gave no readable sample")
    total = all_reduce_sum(
        torch.cat([sums.double(), sums.new_tensor([float(count)], dtype=torch.float64)])
    )
    total = total.tolist()
    skipped = skipped_counts(getattr(loader, "dataset", None), device)
    return {**{k: total[i] / total[-1] for i, k in enumerate(keys)},
            "num_skipped": sum(skipped.values())}


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


class SyntheticGrounder:
    """Scores a batch's heatmaps (and the location prior's, when the model has one) against the
    synthetic masks of one split; a split without masks (e.g. MIMIC-CXR) scores nothing."""

    def __init__(self, net, cfg, split: str):
        self.net, self.records = net, mask_records(cfg.data.annotation, split)
        self.root = Path(cfg.data.annotation).parent  # mask paths are relative to annotation.json
        self.graph, self.prior_maps = graph_for_leaves(net.leaf_names), None

    def __call__(self, heat: torch.Tensor, ids: list[str], image_size) -> list[dict]:
        if not self.records:
            return [{} for _ in ids]
        recs = [record_for(self.records, i) for i in ids]
        ground = synthetic_grounding(heat, recs, self.root, self.graph)
        if self.prior_maps is None:  # the location prior alone: what the model's maps are compared with
            self.prior_maps = self.net.prior_heatmaps(tuple(image_size))
        if self.prior_maps is None:
            return ground
        prior = synthetic_grounding(self.prior_maps.expand(len(recs), -1, -1, -1), recs, self.root,
                                    self.graph)
        return [{**g, "prior": p} for g, p in zip(ground, prior)]

    def summary(self, rows: list[dict]) -> dict:
        """The model's grounding figures and, as prior_*, the location prior's alone."""
        if not self.records:
            return {}
        out = summarize_grounding(rows)
        if rows and "prior" in rows[0]:
            prior = summarize_grounding([r["prior"] for r in rows])
            out.update({f"prior_{k}": v for k, v in prior.items() if k != "pointing_game_by_leaf"})
        return out


@torch.no_grad()
def evaluate_grounding(model, loader, device, cfg, split: str) -> dict:
    """The grounding figures of the model's heatmaps on ``split`` (no report is generated): leaf
    pointing game, finding-level localisation, CNR, and the location prior's alone beside them."""
    net = unwrap(model)
    net.eval()
    dtype, grounder, rows = resolve_amp(cfg.train.amp, device), SyntheticGrounder(net, cfg, split), []
    if not grounder.records:
        raise ValueError(f"{cfg.data.annotation}: split {split!r} has no synthetic masks to ground against")
    for batch in loader:
        if batch is None:
            continue
        batch = to_device(batch, device)
        with autocast(device, dtype):
            heat = net.heatmaps(batch["image"]).float()
        ground = grounder(heat, batch["id"], batch["image"].shape[-2:])
        rows += [{"index": i, **g} for i, g in zip(batch["index"].tolist(), ground)]
    unique = gather_unique(rows)
    metrics = None
    if unique is not None:
        metrics = {**grounder.summary(unique), "num_studies": len(unique)}
    return broadcast_object(metrics)


@torch.no_grad()
def generate_and_score(model, loader, device, cfg, out_dir, tb=None, epoch=None, prefix: str = "val",
                       num_visualize: int | None = None, step: int | None = None,
                       split: str | None = None) -> dict:
    """Generate a report for every study of ``loader``'s split (sharded over ranks), gather and
    de-duplicate on rank 0, score (language, clinical efficacy, and grounding when the records carry
    synthetic masks), write ``out_dir``/generated.jsonl + metrics.json + heatmap overlays, log to
    TensorBoard under ``prefix``/ at ``step`` (default: ``epoch``). ``split`` (default ``prefix``)
    names the annotation split whose records hold the masks. Every rank returns the same metrics
    dict (unprefixed keys)."""
    net = unwrap(model)
    net.eval()
    dtype = resolve_amp(cfg.train.amp, device)
    grounder = SyntheticGrounder(net, cfg, split or prefix)
    num_visualize = cfg.eval.num_visualize if num_visualize is None else num_visualize
    rows, visuals = [], []
    with full_parameters(model):  # FSDP: whole weights, no collective per generated token
        for batch in loader:
            if batch is None:  # every sample unreadable (data.skip_bad)
                continue
            batch = to_device(batch, device)
            with autocast(device, dtype):
                outs = net.generate(batch, **decoding_options(cfg.eval))
            want_vis = is_main_process() and len(visuals) < num_visualize
            ground = [{}] * len(outs)
            if grounder.records or want_vis:
                with autocast(device, dtype):
                    heat = net.heatmaps(batch["image"]).float()
                ground = grounder(heat, [o["id"] for o in outs], batch["image"].shape[-2:])
            for j, (o, i) in enumerate(zip(outs, batch["index"].tolist())):
                rows.append({"index": i, "id": o["id"], "generated": o["report"], "reference": batch["report"][j],
                             "entities": list(o["entities"]), "anatomies": list(o["anatomies"]), **ground[j]})
                if want_vis and len(visuals) < num_visualize:
                    visuals.append((batch["image"][j].float().cpu(), heat[j].cpu(), rows[-1]))

    unique = gather_unique(rows)
    skipped = skipped_counts(getattr(loader, "dataset", None), device)
    metrics = None
    if unique is not None:
        metrics, ce = score_reports(unique, cfg, device)
        metrics.update(grounder.summary(unique))
        metrics["num_studies"] = len(unique)
        metrics["num_skipped"] = sum(skipped.values())
        if metrics["num_skipped"]:
            print(f"[{prefix}] skipped inputs (data.skip_bad): "
                  + ", ".join(f"{k} {v}" for k, v in skipped.items() if v))
        out_dir = Path(out_dir)
        _write(out_dir, unique, {**metrics, "skipped": skipped, "clinical_efficacy": ce})
        paths = write_overlay_batch(out_dir / "overlays", visuals, net.leaf_names) if visuals else []
        _log(tb, unique, paths, metrics, prefix, epoch if step is None else step, cfg.eval.num_text_samples)
    return broadcast_object(metrics)


def _write(out_dir: Path, rows: list[dict], metrics: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ("id", "generated", "reference", "entities", "anatomies")
    with open(out_dir / "generated.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in keys}) + "\n")
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
        tb.add_text(f"{prefix}/report/{r['id']}", f"**generated:** {r['generated']}\n\n**reference:** "
                    f"{r['reference']}\n\n**entities:** {', '.join(r['entities']) or 'none'}", step)
    for p in overlay_paths:
        with Image.open(p) as im:
            image = np.asarray(im.convert("RGB"))
        tb.add_image(f"{prefix}/overlay/{Path(p).stem}", image, step, dataformats="HWC")
