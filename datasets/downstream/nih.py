"""NIH ChestX-ray14: 14 labels per image, in the order of SS-ACL's split files (``LABELS``).

Split files (SS-ACL's names, in ``root``): train_1.txt / train_10.txt / train_list.txt (1/10/100%),
val_list.txt, test_list.txt. A line is ``images_002/00003547_001.png 0 0 0 0 0 1 0 0 0 0 0 0 0 0``
(path, 14 labels), or the path alone (NIH's own train_val_list.txt / test_list.txt): its labels
then come from ``Data_Entry_2017*.csv[.gz]`` in root ("Finding Labels", "|"-separated, "No
Finding" = all 0). Images: ``root/<path>``, or the Kaggle layout ``root/images_002/images/<name>``,
or ``root/images/<name>``. ``BBox_List_2017.csv[.gz]``, when present, gives ``ds.boxes``: image
name -> [(label, [x, y, w, h])] in original pixels. Item id: the image file name.
"""
from __future__ import annotations

import csv
import io
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
    read_text,
)

LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
          "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
          "Hernia")
SPLIT_FILES = {"train": {0.01: "train_1.txt", 0.1: "train_10.txt", 1.0: "train_list.txt"},
               "val": "val_list.txt", "test": "test_list.txt"}
BBOX_LABELS = {"Infiltrate": "Infiltration"}         # BBox_List's spelling -> LABELS


def _first(root: Path, patterns: tuple[str, ...]) -> Path | None:
    found = sorted(p for pat in patterns for p in root.glob(pat))
    return found[0] if found else None


def data_entry_labels(path: Path) -> dict[str, np.ndarray]:
    """Image name -> 14 labels from a Data_Entry_2017*.csv."""
    out = {}
    for n, row in enumerate(read_csv(path, ("Image Index", "Finding Labels")), 2):
        y = np.zeros(len(LABELS), dtype=np.float32)
        for name in row["Finding Labels"].split("|"):
            name = name.strip()
            if name in ("No Finding", ""):
                continue
            if name not in LABELS:
                raise DataError(f"{path}: line {n}: field 'Finding Labels' has unknown label "
                                f"{name!r} (known: {', '.join(LABELS)}, No Finding)")
            y[LABELS.index(name)] = 1
        out[row["Image Index"]] = y
    return out


def load_bboxes(path: Path) -> dict[str, list[tuple[str, list[float]]]]:
    """Image name -> [(label, [x, y, w, h])] from BBox_List_2017.csv: "Image Index", "Finding
    Label", then x, y, w, h in the next four columns (the header names only the first)."""
    rows = list(csv.reader(io.StringIO(read_text(path))))
    if not rows or rows[0][:2] != ["Image Index", "Finding Label"]:
        raise DataError(f"{path}: header must start with fields 'Image Index', 'Finding Label', "
                        f"got {rows[0][:2] if rows else []}")
    out: dict[str, list] = {}
    for n, row in enumerate(rows[1:], 2):
        if not row:
            continue
        try:
            box = [float(v) for v in row[2:6]]
        except ValueError as e:
            raise DataError(f"{path}: line {n}: field 'Bbox [x,y,w,h]': {e}") from e
        if len(box) != 4:
            raise DataError(f"{path}: line {n}: field 'Bbox [x,y,w,h]' needs 4 numbers, got {row[2:]}")
        out.setdefault(row[0], []).append((BBOX_LABELS.get(row[1], row[1]), box))
    return out


class NIHDataset(DownstreamDataset):
    def __init__(self, paths, ids, labels: np.ndarray, image_size, train, source, boxes=None):
        super().__init__(paths, ids, image_size, train, source, list(LABELS))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.float32).reshape(-1, len(LABELS)))
        self.boxes = boxes or {}

    def fields(self, i: int) -> dict:
        return {"labels": self.labels[i]}


def parse_labels(fields: list[str], where: str) -> np.ndarray:
    if len(fields) != len(LABELS) or any(v not in ("0", "1") for v in fields):
        raise DataError(f"{where}: field 'labels' must be {len(LABELS)} values 0/1 after the path, "
                        f"got {fields}")
    return np.array([float(v) for v in fields], dtype=np.float32)


def build_nih(root, split: str, image_size: int, train: bool = False, fraction: float = 1.0,
              split_file=None, seed: int = 0) -> NIHDataset:
    root = Path(root)
    path, draw = (Path(split_file), False) if split_file else fraction_file(
        root, split, fraction, SPLIT_FILES)
    entry_file = _first(root, ("Data_Entry_2017*.csv", "Data_Entry_2017*.csv.gz"))
    entry = None
    paths, ids, labels = [], [], []
    for n, fields in read_split_lines(path):
        where = f"{path}: line {n}"
        name = Path(fields[0]).name
        if len(fields) > 1:
            y = parse_labels(fields[1:], where)
        else:
            if entry_file is None:
                raise DataError(f"{where}: no field 'labels' after the path, and no "
                                f"Data_Entry_2017*.csv in {root} to read them from")
            entry = entry if entry is not None else data_entry_labels(entry_file)
            if name not in entry:
                raise DataError(f"{where}: image {name!r} is not in {entry_file} (field "
                                f"'Image Index')")
            y = entry[name]
        image = find_image(root, fields[0])
        if image is None:
            raise DataError(f"{where}: image file {fields[0]!r} (field 'path') not found under "
                            f"{root} (also tried {Path(fields[0]).parent}/images/ and images/)")
        paths.append(image)
        ids.append(name)
        labels.append(y)
    labels = np.stack(labels) if labels else np.zeros((0, len(LABELS)), np.float32)
    if draw:
        keep = fraction_subset(labels, fraction, seed)
        paths, ids, labels = [paths[i] for i in keep], [ids[i] for i in keep], labels[keep]
    bbox_file = _first(root, ("BBox_List_2017.csv", "BBox_List_2017.csv.gz"))
    boxes = load_bboxes(bbox_file) if bbox_file else None
    return NIHDataset(paths, ids, labels, image_size, train, str(path), boxes)
