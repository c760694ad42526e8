"""Evaluation: the validation loss (model selection) and generation + scoring over a split.

Generation runs on every rank over a ``DistributedSampler(shuffle=False)`` shard; that sampler pads
the last shards by repeating samples, so rows are de-duplicated by dataset index after gathering
on rank 0, which scores them and writes ``generated.jsonl`` and ``metrics.json``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from PIL import Image

from engine.train import autocast, resolve_amp, to_device
from utils.checkpoint import unwrap
from utils.dist import gather_objects, get_world_size, is_main_process
from utils.metrics.grounding import cnr, pointing_game, zhang_tolerance


@torch.no_grad()
def evaluate_loss(model, loader, device, amp="fp32") -> dict[str, float]:
    """Sample-weighted mean of every loss term over the loader, all-reduced over ranks.
    (With a padded DistributedSampler the few repeated samples count twice; the bias is negligible.)"""
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
    total = torch.cat([sums.double(), torch.tensor([float(count)], dtype=torch.float64, device=sums.device)])
    if get_world_size() > 1:
        tdist.all_reduce(total)
    total = total.tolist()
    return {k: total[i] / total[-1] for i, k in enumerate(keys)}


# ---- grounding against the synthetic generator's masks -------------------------------------------

def _read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A binary mask resized (nearest) to ``size`` = (H, W) of the heatmap."""
    with Image.open(path) as im:
        im = im.convert("L")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.NEAREST)
        return np.asarray(im) > 127


def synthetic_grounding(heatmaps: torch.Tensor, records: list[dict], root: str | Path,
                        leaf_names: list[str]) -> list[dict]:
    """Per-study grounding against the synthetic masks (records carry "regions" and "findings").

    heatmaps: [B, num_leaves, H, W] in [0, 1] (model.heatmaps), aligned with ``records``; ``root`` is the
    folder that mask paths are relative to (the annotation.json folder). Masks are resized to the heatmap.
    Returns per study {"pointing": {drawn leaf: hit}, "pointing_findings": [hit per finding's leaf],
    "pointing_tol": {drawn leaf: hit within Zhang et al.'s tolerance}, "cnr": [signed CNR of each finding's
    mask under its leaf's heatmap]}. Pointing game: the peak of a leaf query's heatmap lies inside that
    leaf's region mask (with tolerance: within 15 px at 224 px of it, scaled to the heatmap). The CNR is
    signed (utils.metrics.grounding.cnr): a map that avoids the finding scores below 0, where BioViL's
    absolute CNR would reward it.
    """
    root = Path(root)
    index = {n: i for i, n in enumerate(leaf_names)}
    maps = heatmaps.float().cpu().numpy()
    out = []
    for hm, rec in zip(maps, records):
        size = hm.shape[-2:]
        hits, hits_tol = {}, {}
        for leaf, rel in (rec.get("regions") or {}).items():
            if leaf not in index:
                continue
            mask = _read_mask(root / rel, size)
            if mask.any():
                hits[leaf] = pointing_game(hm[index[leaf]], mask)
                hits_tol[leaf] = pointing_game(hm[index[leaf]], mask, zhang_tolerance(max(size)))
        found = [f for f in rec.get("findings") or [] if f.get("anatomy") in index and f.get("mask")]
        cnrs = [cnr(hm[index[f["anatomy"]]], _read_mask(root / f["mask"], size), signed=True) for f in found]
        out.append({"pointing": hits, "pointing_tol": hits_tol,
                    "pointing_findings": [hits[f["anatomy"]] for f in found if f["anatomy"] in hits],
                    "cnr": [c for c in cnrs if math.isfinite(c)]})
    return out


def _hits(x) -> list:
    """A study's per-leaf values: {leaf: value} or a list."""
    return list(x.values()) if isinstance(x, dict) else list(x or [])


def summarize_grounding(rows: list[dict]) -> dict[str, float]:
    """Pointing game averaged over the drawn leaves of every study, and over the leaves of the findings;
    mean signed CNR over every finding; "pointing_game_by_leaf": {leaf: pointing game over its studies}."""
    out, by_leaf = {}, {}
    for r in rows:
        for leaf, hit in (r.get("pointing") or {}).items():
            by_leaf.setdefault(leaf, []).append(hit)
    for key, name in (("pointing", "pointing_game"), ("pointing_tol", "pointing_game_tol15"),
                      ("pointing_findings", "pointing_game_findings"), ("cnr", "cnr")):
        values = [v for r in rows for v in _hits(r.get(key))]
        if values:
            out[name] = float(np.mean(values))
    if by_leaf:
        out["pointing_game_by_leaf"] = {leaf: float(np.mean(v)) for leaf, v in by_leaf.items()}
    return out


# ---- generation and scoring -------------------------------------------------------------------------

def mask_records(cfg, split: str) -> dict[str, dict]:
    """Records of ``split`` in cfg.data.annotation that carry synthetic "regions"/"findings" masks, by id
    ({} for data without masks, e.g. MIMIC-CXR)."""
    from datasets.reports import load_annotation
    try:
        records = load_annotation(cfg.data.annotation, split)
    except Exception:  # noqa: BLE001 - no annotation for this split: nothing to ground against
        return {}
    return {str(r["id"]): r for r in records if isinstance(r, dict) and (r.get("regions") or r.get("findings"))}


def _record_for(records: dict, sample_id: str):
    """A sample's record; with data.views=all sample ids are "<study>_<k>"."""
    if sample_id in records:
        return records[sample_id]
    return records.get(sample_id.rsplit("_", 1)[0], {})


def score_reports(rows: list[dict], cfg, device="cpu") -> tuple[dict[str, float], dict]:
    """Language metrics (pycocoevalcap) and clinical efficacy (cfg.eval.labeler run on both the generated
    and the reference reports) of rows {"index", "generated", "reference"}. Returns (flat metrics, the
    full clinical-efficacy dict with per-observation numbers)."""
    from utils.metrics.clinical import ce_summary, clinical_efficacy, format_table, labeler_from_config
    from utils.metrics.nlg import score_nlg
    keys = [str(r["index"]) for r in rows]
    metrics = score_nlg({k: [r["reference"]] for k, r in zip(keys, rows)},
                        {k: [r["generated"]] for k, r in zip(keys, rows)}, meteor=cfg.eval.meteor)
    labeler = labeler_from_config(cfg, device)
    ce = clinical_efficacy(labeler.label([r["generated"] for r in rows]),
                           labeler.label([r["reference"] for r in rows]), cfg.eval.uncertain_as)
    metrics.update(ce_summary(ce))
    print(format_table(ce, cfg.eval.labeler))
    return metrics, ce


@torch.no_grad()
def generate_and_score(model, loader, device, cfg, out_dir, tb=None, epoch=None, prefix: str = "val",
                       num_visualize: int | None = None, step: int | None = None, split: str | None = None) -> dict:
    """Generate a report for every study of ``loader``'s split (sharded over ranks), gather and de-duplicate
    on rank 0, score (language, clinical efficacy, and grounding when the records carry synthetic masks),
    write ``out_dir``/generated.jsonl + metrics.json + heatmap overlays, log to TensorBoard under
    ``prefix``/ at ``step`` (default: ``epoch``). ``split`` (default ``prefix``) names the annotation split
    whose records hold the masks. Every rank returns the same metrics dict (unprefixed keys)."""
    net = unwrap(model)
    net.eval()
    dtype = resolve_amp(cfg.train.amp, device)
    records = mask_records(cfg, split or prefix)
    leaf_names = list(net.graph.leaf_names)
    root = Path(cfg.data.annotation).parent  # mask paths are relative to the annotation.json folder
    num_visualize = cfg.eval.num_visualize if num_visualize is None else num_visualize
    out_dir = Path(out_dir)
    prior_maps = None  # the location prior alone as heatmaps: what the model's maps are compared with
    if records and getattr(net, "location_prior", None) is not None:
        from models.heatmaps import leaf_heatmaps
        size = (cfg.data.image_size, cfg.data.image_size)
        prior_maps = leaf_heatmaps(net.location_prior[None].float().cpu(), net.vit.grid, size)
    rows, visuals = [], []
    for batch in loader:
        if batch is None:  # every sample unreadable (data.skip_bad)
            continue
        batch = to_device(batch, device)
        with autocast(device, dtype):
            outs = net.generate(batch, beam_size=cfg.eval.beam_size, max_new_tokens=cfg.eval.max_new_tokens,
                                min_new_tokens=cfg.eval.min_new_tokens,
                                repetition_penalty=cfg.eval.repetition_penalty,
                                length_penalty=cfg.eval.length_penalty)
        indices = batch["index"].tolist()
        want_vis = is_main_process() and len(visuals) < num_visualize
        heat = None
        if records or want_vis:
            with autocast(device, dtype):
                heat = net.heatmaps(batch["image"]).float()
        recs = [_record_for(records, o["id"]) for o in outs]
        ground = synthetic_grounding(heat, recs, root, leaf_names) if records else [{}] * len(indices)
        if prior_maps is not None:
            for g, p in zip(ground, synthetic_grounding(prior_maps.expand(len(recs), -1, -1, -1), recs, root,
                                                        leaf_names)):
                g["prior"] = p
        for j, (o, i) in enumerate(zip(outs, indices)):
            rows.append({"index": i, "id": o["id"], "generated": o["report"], "reference": batch["report"][j],
                         "entities": list(o["entities"]), "anatomies": list(o["anatomies"]), **ground[j]})
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
        if prior_maps is not None:  # e.g. prior_pointing_game: the location prior alone, the same for every image
            metrics.update({f"prior_{k}": v for k, v in summarize_grounding([r["prior"] for r in unique]).items()
                            if k != "pointing_game_by_leaf"})
        metrics["num_studies"] = len(unique)
        _write(out_dir, unique, {**metrics, "clinical_efficacy": ce})
        _log(tb, unique, visuals, metrics, prefix, epoch if step is None else step, out_dir, net.graph, cfg)
    if get_world_size() > 1:
        box = [metrics]
        tdist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _write(out_dir: Path, rows: list[dict], metrics: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "generated.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("id", "generated", "reference", "entities", "anatomies")}) + "\n")
    with open(out_dir / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)


def _log(tb, rows, visuals, metrics, prefix, step, out_dir, graph, cfg) -> None:
    step = step or 0
    print(f"[{prefix}] " + "  ".join(f"{k}: {v:.4f}" for k, v in metrics.items()
                                     if isinstance(v, (int, float)) and v is not None))
    paths = []
    if visuals:
        from utils.visualize import write_overlay_batch
        paths = write_overlay_batch(out_dir / "overlays", visuals, graph)
    if tb is None:
        return
    tb.add_scalars(metrics, step, prefix=prefix)
    for r in rows[:cfg.eval.num_text_samples]:
        tb.add_text(f"{prefix}/report/{r['id']}", f"**generated:** {r['generated']}\n\n"
                    f"**reference:** {r['reference']}\n\n**entities:** {', '.join(r['entities']) or 'none'}", step)
    for p in paths:
        with Image.open(p) as im:
            tb.add_image(f"{prefix}/overlay/{Path(p).stem}", np.asarray(im.convert("RGB")), step, dataformats="HWC")
