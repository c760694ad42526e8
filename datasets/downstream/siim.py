"""SIIM-ACR Pneumothorax: an image and its pneumothorax mask.

``root`` holds the RLE table (``train-rle.csv``, ``stage_2_train.csv`` or
``siim-pneumothorax-train-rle.csv``, optionally gzipped; columns "ImageId", "EncodedPixels" - the
header's leading space tolerated - several rows of one image are united, "-1" = no pneumothorax),
its relative or absolute starts detected on the whole file (datasets/downstream/rle.py); split
files of ImageIds, one a line (SS-ACL's names: train_1.txt / train_10.txt / train_list.txt,
val_list.txt, test_list.txt); images ``<ImageId>.png`` in root, images/ or png_images/, else
``<ImageId>.dcm`` anywhere under root (read with pydicom). Masks
are decoded at the image's own size (keep the original 1024 x 1024 images). Train mode: one
RandomResizedCrop applied to both image and mask (nearest for the mask); eval: both resized.
Item "mask": float [1, S, S] in {0, 1}; "labels": float [1], 1 when the mask is not empty. Item
id: the ImageId.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from datasets.annotation import DataError
from datasets.csv_table import read_csv
from datasets.cxr import MEAN, STD
from datasets.downstream.common import (
    DownstreamDataset,
    fraction_file,
    fraction_subset,
    read_split_lines,
)
from datasets.downstream.rle import EMPTY, detect_encoding, rle_decode

LABELS = ("Pneumothorax",)
SPLIT_FILES = {"train": {0.01: "train_1.txt", 0.1: "train_10.txt", 1.0: "train_list.txt"},
               "val": "val_list.txt", "test": "test_list.txt"}
RLE_FILES = tuple(f"{n}{gz}" for n in ("train-rle.csv", "stage_2_train.csv",
                                       "siim-pneumothorax-train-rle.csv") for gz in ("", ".gz"))
PNG_DIRS = (".", "images", "png_images")


def load_rle_table(path: Path) -> tuple[dict[str, list[str]], str]:
    """ImageId -> its RLE strings, and the file's encoding ("relative"/"absolute")."""
    rows = read_csv(path, ("ImageId",))
    key = next((k for k in (rows[0] if rows else {}) if k and k.strip() == "EncodedPixels"), None)
    if key is None:
        raise DataError(f"{path}: missing column 'EncodedPixels'")
    table: dict[str, list[str]] = {}
    for row in rows:
        table.setdefault(row["ImageId"].strip(), []).append((row[key] or EMPTY).strip())
    return table, detect_encoding(r for rles in table.values() for r in rles)


def read_dicom(path: Path) -> torch.Tensor:
    """A DICOM image as float [1, H, W] in [0, 1] (min-max; MONOCHROME1 inverted)."""
    ds = pydicom.dcmread(str(path))
    a = ds.pixel_array.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        a = 1.0 - a
    return torch.from_numpy(a)[None]


class SIIMDataset(DownstreamDataset):
    def __init__(self, paths, ids, rles, encoding, image_size, train, source):
        super().__init__(paths, ids, image_size, train, source, list(LABELS))
        self.rles, self.encoding = rles, encoding
        self.geometry = (  # the same parameters for image and mask (nearest for the mask)
            v2.RandomResizedCrop(image_size, scale=(0.85, 1.0), ratio=(0.9, 1 / 0.9), antialias=True)
            if train else v2.Resize((image_size, image_size), antialias=True))

    def load(self, path: Path) -> torch.Tensor:
        return read_dicom(path) if path.suffix.lower() == ".dcm" else super().load(path)

    def mask(self, i: int, height: int, width: int) -> np.ndarray:
        m = np.zeros((height, width), dtype=bool)
        for rle in self.rles[i]:
            try:
                m |= rle_decode(rle, height, width, self.encoding)
            except ValueError as e:
                raise DataError(f"{self.source}: ImageId {self.ids[i]!r}: field 'EncodedPixels' "
                                f"does not fit its {height}x{width} image: {e}") from e
        return m

    def __getitem__(self, i: int) -> dict | None:
        img = self.read(i)
        if img is None:
            return None
        m = torch.from_numpy(self.mask(i, img.shape[-2], img.shape[-1]))[None].to(torch.uint8)
        img, m = self.geometry(tv_tensors.Image(img), tv_tensors.Mask(m))
        img = (img.as_subclass(torch.Tensor) - MEAN) / STD
        mask = m.as_subclass(torch.Tensor).float()
        return {"image": img, "id": self.ids[i], "mask": mask,
                "labels": mask.amax().reshape(1)}


def _image_index(root: Path, ids: list[str]) -> dict[str, Path]:
    """ImageId -> its PNG (root, images/, png_images/) or, failing that, DICOM file."""
    found = {}
    for i in ids:
        p = next((root / d / f"{i}.png" for d in PNG_DIRS if (root / d / f"{i}.png").is_file()),
                 None)
        if p is not None:
            found[i] = p
    if len(found) < len(ids):
        for p in root.rglob("*.dcm"):
            found.setdefault(p.stem, p)
    return found


def build_siim(root, split: str, image_size: int, train: bool = False, fraction: float = 1.0,
               split_file=None, seed: int = 0) -> SIIMDataset:
    root = Path(root)
    path, draw = (Path(split_file), False) if split_file else fraction_file(
        root, split, fraction, SPLIT_FILES)
    rle_file = next((root / f for f in RLE_FILES if (root / f).is_file()), None)
    if rle_file is None:
        raise DataError(f"no RLE table in {root} (one of {', '.join(RLE_FILES)})")
    table, encoding = load_rle_table(rle_file)
    lines = read_split_lines(path)
    images = _image_index(root, [fields[0] for _, fields in lines])
    paths, ids, rles = [], [], []
    for n, fields in lines:
        iid = fields[0]
        if iid not in table:
            raise DataError(f"{path}: line {n}: ImageId {iid!r} is not in {rle_file} (field "
                            "'ImageId')")
        if iid not in images:
            raise DataError(f"{path}: line {n}: no image {iid}.png or {iid}.dcm under {root}")
        paths.append(images[iid])
        ids.append(iid)
        rles.append(table[iid])
    if draw:
        positive = np.array([[any(r != EMPTY for r in rs)] for rs in rles], np.float32)
        keep = fraction_subset(positive.reshape(-1, 1), fraction, seed)
        paths, ids, rles = [paths[i] for i in keep], [ids[i] for i in keep], [rles[i] for i in keep]
    return SIIMDataset(paths, ids, rles, encoding, image_size, train, str(path))
