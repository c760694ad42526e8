"""RSNA Pneumonia: one binary label ("Pneumonia") per image.

Split files (SS-ACL's names, in ``root``): train_1.txt / train_10.txt / train.txt (1/10/100%),
val.txt, test.txt; a line is ``train/<patientId>.jpg 0`` (path, label), or the path alone: its
label is then "Target" of ``stage_2_train_labels.csv[.gz]`` in root (1 if any of the patient's
rows has Target 1). That file, when present, also gives ``ds.boxes``: patientId -> [[x, y, width,
height]] in original pixels (1024 x 1024 in the challenge). Item id: the patientId (file stem).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datasets.annotation import DataError
from datasets.csv_table import read_csv
from datasets.downstream.common import (
    DownstreamDataset,
    find_image,
    fraction_file,
    fraction_subset,
    read_split_lines,
)

LABELS = ("Pneumonia",)
SPLIT_FILES = {"train": {0.01: "train_1.txt", 0.1: "train_10.txt", 1.0: "train.txt"},
               "val": "val.txt", "test": "test.txt"}
LABEL_FILES = ("stage_2_train_labels.csv", "stage_2_train_labels.csv.gz")
COLUMNS = ("patientId", "x", "y", "width", "height", "Target")


def load_rsna_labels(path: Path) -> tuple[dict[str, int], dict[str, list[list[float]]]]:
    """patientId -> Target (max over its rows) and patientId -> boxes [[x, y, w, h]]."""
    targets: dict[str, int] = {}
    boxes: dict[str, list] = {}
    for n, row in enumerate(read_csv(path, COLUMNS), 2):
        pid = row["patientId"]
        if row["Target"] not in ("0", "1"):
            raise DataError(f"{path}: line {n}: field 'Target' must be 0 or 1, got {row['Target']!r}")
        targets[pid] = max(targets.get(pid, 0), int(row["Target"]))
        if row["Target"] == "1":
            try:
                box = [float(row[k]) for k in ("x", "y", "width", "height")]
            except ValueError as e:
                raise DataError(f"{path}: line {n}: fields 'x', 'y', 'width', 'height' of a "
                                f"positive row must be numbers: {e}") from e
            boxes.setdefault(pid, []).append(box)
    return targets, boxes


class RSNADataset(DownstreamDataset):
    def __init__(self, paths, ids, labels, image_size, train, source, boxes=None):
        super().__init__(paths, ids, image_size, train, source, list(LABELS))
        self.labels = torch.as_tensor(np.asarray(labels, np.float32).reshape(-1, 1))
        self.boxes = boxes or {}

    def fields(self, i: int) -> dict:
        return {"labels": self.labels[i]}


def build_rsna(root, split: str, image_size: int, train: bool = False, fraction: float = 1.0,
               split_file=None, seed: int = 0) -> RSNADataset:
    root = Path(root)
    path, draw = (Path(split_file), False) if split_file else fraction_file(
        root, split, fraction, SPLIT_FILES)
    label_file = next((root / f for f in LABEL_FILES if (root / f).is_file()), None)
    targets, boxes = load_rsna_labels(label_file) if label_file else ({}, {})
    paths, ids, labels = [], [], []
    for n, fields in read_split_lines(path):
        where = f"{path}: line {n}"
        pid = Path(fields[0]).stem
        if len(fields) > 2 or (len(fields) == 2 and fields[1] not in ("0", "1")):
            raise DataError(f"{where}: field 'label' must be one value 0/1 after the path, got "
                            f"{fields[1:]}")
        if len(fields) == 2:
            y = float(fields[1])
        elif label_file is None:
            raise DataError(f"{where}: no field 'label' after the path, and no {LABEL_FILES[0]} "
                            f"in {root} to read it from")
        elif pid not in targets:
            raise DataError(f"{where}: patient {pid!r} is not in {label_file} (field 'patientId')")
        else:
            y = float(targets[pid])
        image = find_image(root, fields[0])
        if image is None:
            raise DataError(f"{where}: image file {fields[0]!r} (field 'path') not found under {root}")
        paths.append(image)
        ids.append(pid)
        labels.append(y)
    labels = np.asarray(labels, np.float32).reshape(-1, 1)
    if draw:
        keep = fraction_subset(labels, fraction, seed)
        paths, ids, labels = [paths[i] for i in keep], [ids[i] for i in keep], labels[keep]
    return RSNADataset(paths, ids, labels, image_size, train, str(path), boxes)
