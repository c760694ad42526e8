"""Chest X-ray report datasets: images + cleaned reports + labels + anatomies.

``build_dataset(cfg, split, train)`` reads an R2Gen ``annotation.json``; ``collate`` makes
the batch of the contract::

    {"image": float [B,3,H,W], "id": list[str], "report": list[str], "labels": float [B,14],
     "anatomies": bool [B,25], "index": long [B]}

Images of any PIL mode become one channel in [0, 1] (8-bit / 255, 16-bit / 65535 - never
clipped at 255 - RGB by luminance), replicated to three and normalised with mean 0.4978,
std 0.2449. Train: RandomResizedCrop(scale=cfg.data.random_resized_crop, ratio 0.9-1.11);
eval: resize to a square. Never a horizontal flip (left/right carries meaning).

Views (``data.views``): ``first_frontal`` takes one image per study, the first "PA" of the record's
``views`` (one name per ``image_path``), else the first "AP", never a lateral: a study without a
frontal view is bad input (kind ``no_frontal``); a record without ``views`` gives its
``image_path[0]`` (R2Gen's files list the frontal first), unchecked and counted in a warning.
``all`` takes every image, each sample keeping its view name (``Sample.view``).

Anatomy targets (``data.anatomies``): ``report`` (default) parses them from the report text with
``vocab.finding_sites.finding_anatomies``, the same parser for real and synthetic data;
``annotation`` takes the record's ``anatomies`` field (the parser where a record has none).

Bad input (malformed record, empty report or one without Latin letters, missing or
unreadable image) raises DataError naming the file and the record; with ``data.skip_bad``
it is skipped and counted instead: at construction for records and missing files; at
``__getitem__`` an unreadable image is replaced by the next readable sample of the split
(index i+1, i+2, ... wrapping round), so that a batch keeps its size on every rank.
``bad_counts()`` / ``bad_summary()`` report the totals; the unreadable flags live in
shared memory, so they include what DataLoader workers found
(``datasets.loaders.skipped_counts`` adds up the ranks).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from datasets.annotation import DataError, frontal_index, load_annotation, validate_record
from vocab.anatomy_graph import graph_from_name
from vocab.finding_sites import finding_anatomies
from vocab.labeler import RuleLabeler
from vocab.report_text import ReportTextError, usable_report

MEAN, STD = 0.4978, 0.2449
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- images

def load_image(path: str | Path) -> torch.Tensor:
    """One image as float ``[1, H, W]`` in [0, 1], whatever its PIL mode."""
    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode.startswith("I;16"):
            a = np.asarray(im).astype(np.float32) / 65535.0
        elif mode == "I":        # 32-bit ints: 16-bit PNGs in older Pillow; else min-max
            a = np.asarray(im).astype(np.float64)
            a = a / 65535.0 if a.min() >= 0 and a.max() <= 65535 else _minmax(a)
        elif mode == "F":
            a = np.asarray(im).astype(np.float64)
            a = a if a.min() >= 0 and a.max() <= 1 else _minmax(a)
        elif mode == "L":
            a = np.asarray(im).astype(np.float32) / 255.0
        elif mode == "1":
            a = np.asarray(im).astype(np.float32)
        else:                    # RGB, RGBA, P, LA, CMYK, YCbCr ...: luminance
            a = np.asarray(im.convert("L")).astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


AUGMENTS = ("crop", "affine")


def build_transform(image_size: int, train: bool, scale=(0.85, 1.0), augment: str = "crop"):
    """``[1,H,W]`` in [0,1] -> normalised ``[3,S,S]``. No flip, train or eval. Train-time
    ``augment``: "crop" = RandomResizedCrop(scale, ratio 0.9-1.11); "affine" = SS-ACL's resize then
    RandomAffine(20 degrees, scale 0.8-1.2) (its horizontal flip left out)."""
    if augment not in AUGMENTS:
        raise ValueError(f"data.augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    square = v2.Resize((image_size, image_size), antialias=True)
    if not train:
        resize = square
    elif augment == "affine":
        resize = v2.Compose([square, v2.RandomAffine(degrees=20, scale=(0.8, 1.2))])
    else:
        resize = v2.RandomResizedCrop(image_size, scale=tuple(scale), ratio=(0.9, 1 / 0.9), antialias=True)

    def transform(img: torch.Tensor) -> torch.Tensor:
        img = resize(img)
        return ((img - MEAN) / STD).expand(3, -1, -1)
    return transform


# ----------------------------------------------------------------------------- labels

def binarize_labels(values, uncertain_as: str = "negative") -> np.ndarray:
    """14 values (1, 0, -1, None/nan) -> {0, 1}: uncertain -> ``uncertain_as``, unmentioned -> 0."""
    if uncertain_as not in ("negative", "positive"):
        raise ValueError(f"uncertain_as must be 'negative' or 'positive', got {uncertain_as!r}")
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    pos = (arr == 1) | ((arr == -1) & (uncertain_as == "positive"))
    return pos.astype(np.float32)


# ----------------------------------------------------------------------------- dataset

@dataclass
class Sample:
    id: str
    report: str
    path: Path
    record: str     # "record 'id' (#pos)" for messages
    view: str = ""  # the record's "views" entry for this image ("" when it has none)


class CXRDataset(Dataset):
    """Samples (one per image or per study) with precomputed labels [N,14] and anatomies [N,25]."""

    def __init__(self, samples: list[Sample], labels: torch.Tensor, anatomies: torch.Tensor,
                 transform, skip_bad: bool = False, source: str = "", bad: dict | None = None):
        self.samples, self.labels, self.anatomies = samples, labels.float(), anatomies.bool()
        self.transform, self.skip_bad, self.source = transform, skip_bad, source
        self._load_bad = dict(bad or {})          # construction-time: kind -> list of messages
        self._unreadable = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        """Sample ``i``; with skip_bad, if its image is unreadable, the next readable one (the
        item's "index" and "id" are then that sample's)."""
        for k in range(len(self.samples)):
            j = (i + k) % len(self.samples)
            if self._unreadable[j]:
                continue
            s = self.samples[j]
            try:
                img = load_image(s.path)
            except Exception as e:  # PIL raises many kinds
                msg = (f"{self.source}: {s.record}: cannot read image {s.path} "
                       f"(field 'image_path'): {e}")
                if not self.skip_bad:
                    raise DataError(msg) from e
                self._unreadable[j] = True
                log.warning("skipped: %s (replaced by the next readable sample)", msg)
                continue
            return {"image": self.transform(img), "id": s.id, "report": s.report,
                    "labels": self.labels[j], "anatomies": self.anatomies[j], "index": j}
        raise DataError(f"{self.source}: no image of this split is readable (data.skip_bad "
                        f"skipped all {len(self.samples)})")

    def unreadable(self) -> torch.Tensor:
        """bool [N]: the samples whose image was found unreadable (in any worker)."""
        return self._unreadable.clone()

    def mark_unreadable(self, flags: torch.Tensor) -> None:
        """Add unreadable flags found elsewhere (other ranks) to this dataset's."""
        self._unreadable |= flags.to(torch.bool).cpu()

    def bad_counts(self) -> dict[str, int]:
        """Skipped inputs by kind: bad_record, empty_report, non_latin_report, missing_image, no_frontal,
        unreadable_image."""
        counts = {k: len(v) for k, v in self._load_bad.items()}
        counts["unreadable_image"] = int(self._unreadable.sum())
        return counts

    def bad_summary(self, max_names: int = 5) -> str:
        """One line per kind of skipped input with the first few names; '' if nothing was
        skipped."""
        msgs = {k: list(v) for k, v in self._load_bad.items()}
        msgs["unreadable_image"] = [f"{self.samples[i].record}: {self.samples[i].path}"
                                    for i in self._unreadable.nonzero().flatten().tolist()]
        lines = []
        for kind, items in msgs.items():
            if items:
                more = f" (+{len(items) - max_names} more)" if len(items) > max_names else ""
                lines.append(f"skipped {len(items)} {kind}: " + "; ".join(items[:max_names]) + more)
        return "\n".join(lines)


def collate(samples: list) -> dict | None:
    """Stack dataset items; None items (a dataset that drops bad samples) are left out; None if
    none is left."""
    items = [s for s in samples if s is not None]
    if not items:
        return None
    return {"image": torch.stack([s["image"] for s in items]),
            "id": [s["id"] for s in items],
            "report": [s["report"] for s in items],
            "labels": torch.stack([s["labels"] for s in items]).float(),
            "anatomies": torch.stack([s["anatomies"] for s in items]).bool(),
            "index": torch.tensor([s["index"] for s in items], dtype=torch.long)}


# ----------------------------------------------------------------------------- building

def rule_labels(reports: list[str]) -> np.ndarray:
    """CheXpert labels [N,14] (1, 0, -1, nan) from the project's rule-based labeler."""
    return np.asarray(RuleLabeler().label(reports), dtype=np.float64)


def build_dataset(cfg, split: str, train: bool, graph=None) -> CXRDataset:
    """The ``split`` of ``cfg.data.annotation`` (images under ``cfg.data.image_root``)."""
    d = cfg.data
    if d.views not in ("first_frontal", "all"):
        raise ValueError(f"data.views must be 'first_frontal' or 'all', got {d.views!r}")
    if d.anatomies not in ("report", "annotation"):
        raise ValueError(f"data.anatomies must be 'report' or 'annotation', got {d.anatomies!r}")
    # synthetic graphs: anatomies unused
    strict = graph is not None or cfg.model.graph == "default"
    graph = graph or graph_from_name(cfg.model.graph)
    ann = Path(d.annotation)
    root = Path(d.image_root) if d.image_root else ann.parent
    records = load_annotation(ann, split)
    if d.max_samples > 0:
        records = records[:d.max_samples]
    bad: dict[str, list[str]] = {
        "bad_record": [], "empty_report": [], "non_latin_report": [], "missing_image": [], "no_frontal": []
    }

    def reject(kind: str, msg: str) -> None:
        if not d.skip_bad:
            raise DataError(msg)
        bad[kind].append(msg)

    samples, raw_labels, anat_rows, unchecked = [], [], [], 0
    for pos, rec in enumerate(records):
        reason = validate_record(rec, ann, pos)
        if reason:
            reject("bad_record", reason)
            continue
        where = f"record {str(rec['id'])!r} (#{pos})"
        try:
            report = usable_report(rec["report"])
        except ReportTextError as e:
            reject(e.kind, f"{ann}: {where}: field 'report' {e}")
            continue
        try:
            anat = _anatomy_mask(rec, d.anatomies, graph, strict)
        except KeyError as e:
            reject("bad_record", f"{ann}: {where}: field 'anatomies': {e.args[0]}")
            continue
        paths = rec["image_path"] if isinstance(rec["image_path"], list) else [rec["image_path"]]
        views = rec.get("views") or [""] * len(paths)
        if d.views == "first_frontal" and "views" in rec:
            k = frontal_index(views)
            if k is None:
                reject("no_frontal", f"{ann}: {where}: no frontal (PA or AP) view in field "
                                     f"'views' {views}")
                continue
            paths, views = [paths[k]], [views[k]]
        elif d.views == "first_frontal":       # no recorded views: R2Gen's order, unchecked
            paths, views = paths[:1], views[:1]
            unchecked += 1
        for k, (rel, view) in enumerate(zip(paths, views)):
            path = root / rel
            if not path.is_file():
                reject(
                    "missing_image",
                    f"{ann}: {where}: image file {path} not found (field 'image_path')",
                )
                continue
            sid = str(rec["id"]) if len(paths) == 1 else f"{rec['id']}_{k}"
            samples.append(Sample(sid, report, path, where, view))
            raw_labels.append(rec.get("labels"))
            anat_rows.append(anat)

    missing = [i for i, lab in enumerate(raw_labels) if lab is None]
    if missing:   # label each unlabelled report once (same report for every view of a study)
        reports = sorted({samples[i].report for i in missing})
        by_report = dict(zip(reports, rule_labels(reports)))
        for i in missing:
            raw_labels[i] = [
                None if np.isnan(v) else float(v) for v in by_report[samples[i].report]
            ]
    labels = torch.from_numpy(np.stack([binarize_labels(v, d.uncertain_as) for v in raw_labels])
                              if samples else np.zeros((0, 14), np.float32))
    anatomies = (
        torch.stack(anat_rows) if samples else torch.zeros(0, graph.num_leaves, dtype=torch.bool)
    )
    transform = build_transform(d.image_size * d.sr_scale, train, d.random_resized_crop, d.augment)
    if unchecked:
        log.warning("%s split %r: %d records have no 'views' field: image_path[0] taken as the "
                    "frontal view unchecked", ann, split, unchecked)
    ds = CXRDataset(samples, labels, anatomies, transform, d.skip_bad, str(ann), bad)
    if ds.bad_summary():
        log.warning("%s split %r:\n%s", ann, split, ds.bad_summary())
    return ds


def _anatomy_mask(rec: dict, source: str, graph, strict: bool = True) -> torch.Tensor:
    """Leaf mask of the leaves where the report places its findings. ``source`` "report":
    ``finding_anatomies`` of the record's report text (the same parser for every dataset);
    "annotation": the record's "anatomies" ([] = a normal study: no leaf), the parser for a
    record without the field. Not ``strict`` (a graph other than the default): names the graph
    lacks are ignored."""
    names = rec.get("anatomies") if source == "annotation" else None
    if names is None:
        names = finding_anatomies(rec["report"], graph)
    elif not strict:
        names = [n for n in names if n in graph.index]
    else:
        unknown = [n for n in names if n not in graph.index]
        if unknown:
            raise KeyError(f"unknown anatomy {unknown[0]!r}")
    return graph.leaf_mask(names) if names else torch.zeros(graph.num_leaves, dtype=torch.bool)
