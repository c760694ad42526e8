"""CheXpert 5x200: images positive for exactly one of five observations, each with a report
caption (the retrieval / zero-shot set of GLoRIA and SS-ACL).

``root/chexpert_5x200_<split>.json`` (the official code's name; ``chexpert_5x200.json`` also
serves "test"): a JSON list of records {"image_id" (or the official code's "image"): image path
relative to root ("CheXpert-v1.0/..." also found under "CheXpert-v1.0-small/..."), "caption":
str, "labels": 14 values in the project's CheXpert order (vocab.observations.
CHEXPERT_OBSERVATIONS; null = 0) or {observation: value}}. A value of 1 or -1 is positive (the
official code takes abs); each record must have exactly one positive among ``LABELS``. Item:
"labels" one-hot float [5], "caption". Item id: the image path.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from datasets.annotation import DataError
from datasets.downstream.common import DownstreamDataset, find_image, fraction_subset
from vocab.observations import CHEXPERT_OBSERVATIONS, OBSERVATION_INDEX

LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def split_json(root: Path, split: str) -> Path:
    own = root / f"chexpert_5x200_{split}.json"
    if own.is_file() or split != "test" or not (root / "chexpert_5x200.json").is_file():
        return own
    return root / "chexpert_5x200.json"


def one_hot(labels, where: str) -> np.ndarray:
    """The record's 14 labels (list or dict) -> one-hot over LABELS."""
    if isinstance(labels, dict):
        unknown = [k for k in labels if k not in OBSERVATION_INDEX]
        if unknown:
            raise DataError(f"{where}: field 'labels' has unknown observation {unknown[0]!r}")
        values = {k: labels.get(k) for k in LABELS}
    elif isinstance(labels, list) and len(labels) == len(CHEXPERT_OBSERVATIONS):
        values = {k: labels[OBSERVATION_INDEX[k]] for k in LABELS}
    else:
        raise DataError(f"{where}: field 'labels' must be {len(CHEXPERT_OBSERVATIONS)} values or "
                        f"a dict by observation, got {labels!r}")
    y = np.array([abs(float(values[k] or 0)) == 1 for k in LABELS], dtype=np.float32)
    if y.sum() != 1:
        raise DataError(f"{where}: field 'labels' must be positive for exactly one of "
                        f"{', '.join(LABELS)}, got {dict(values)}")
    return y


class CheXpert5x200Dataset(DownstreamDataset):
    def __init__(self, paths, ids, labels, captions, image_size, train, source):
        super().__init__(paths, ids, image_size, train, source, list(LABELS))
        self.labels = torch.from_numpy(np.asarray(labels, np.float32).reshape(-1, len(LABELS)))
        self.captions = captions

    def fields(self, i: int) -> dict:
        return {"labels": self.labels[i], "caption": self.captions[i]}


def build_chexpert5x200(root, split: str, image_size: int, train: bool = False,
                        fraction: float = 1.0, split_file=None, seed: int = 0):
    root = Path(root)
    path = Path(split_file) if split_file else split_json(root, split)
    if not path.is_file():
        raise DataError(f"CheXpert 5x200 file {path} not found")
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(records, list):
        raise DataError(f"{path}: must hold a list of records, got {type(records).__name__}")
    paths, ids, labels, captions = [], [], [], []
    for k, rec in enumerate(records):
        where = f"{path}: record #{k}"
        rel = rec.get("image_id", rec.get("image")) if isinstance(rec, dict) else None
        if not isinstance(rel, str):
            raise DataError(f"{where}: missing field 'image_id' (the image path)")
        for field in ("caption", "labels"):
            if field not in rec:
                raise DataError(f"{where}: missing field {field!r}")
        image = find_image(root, rel) or find_image(
            root, rel.replace("CheXpert-v1.0/", "CheXpert-v1.0-small/"))
        if image is None:
            raise DataError(f"{where}: image file {rel!r} (field 'image_id') not found under {root}")
        paths.append(image)
        ids.append(rel)
        labels.append(one_hot(rec["labels"], where))
        captions.append(str(rec["caption"]))
    labels = np.stack(labels) if labels else np.zeros((0, len(LABELS)), np.float32)
    if split == "train" and fraction < 1.0 and not split_file:
        keep = fraction_subset(labels, fraction, seed)
        paths, ids = [paths[i] for i in keep], [ids[i] for i in keep]
        labels, captions = labels[keep], [captions[i] for i in keep]
    return CheXpert5x200Dataset(paths, ids, labels, captions, image_size, train, str(path))
