"""MS-CXR phrase grounding: one item per (image, category, phrase), with the union of that
phrase's boxes as a mask in the resized image.

``root/MS_CXR_Local_Alignment_v*.json`` (COCO style: "images" {id, file_name, path, width,
height}, "annotations" {image_id, category_id, bbox [x, y, w, h], label_text}, "categories" {id,
name}); images at ``root/<path>`` (MIMIC-CXR-JPG's "files/p1x/...") or ``root/images/<name>``.
MS-CXR is an evaluation set: without a "split" field on its images the whole file is the "test"
split (other splits are an error); with one, entries are filtered by it. Eval transform only (the
boxes follow Resize((S, S))). Item: "phrase", "label" (category), "box_mask" float [S, S].
Item id: "<dicom_id>#<k>", k the entry's position in the file.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch

from datasets.annotation import DataError
from datasets.downstream.boxes import box_to_mask
from datasets.downstream.common import DownstreamDataset, find_image

PATTERN = "MS_CXR_Local_Alignment_v*.json"


def _need(obj: dict, field: str, where: str):
    if not isinstance(obj, dict) or field not in obj:
        raise DataError(f"{where}: missing field {field!r}")
    return obj[field]


def load_ms_cxr(json_path) -> list[dict]:
    """MS-CXR's COCO-style JSON -> one entry per (image, category, phrase) with its boxes merged.

    Entry: {"image_id", "dicom_id" (file-name stem), "file_name", "path", "width", "height",
    "category", "label_text", "boxes": [[x, y, w, h], ...]} (+ "split" where the image has one),
    in the file's order.
    """
    try:
        with open(json_path) as f:
            coco = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{json_path}: cannot read JSON: {e}") from e
    images = {_need(img, "id", f"{json_path}: images[{k}]"): img
              for k, img in enumerate(_need(coco, "images", str(json_path)))}
    cats = {c["id"]: c["name"] for c in coco.get("categories", [])}
    groups: OrderedDict = OrderedDict()
    for k, ann in enumerate(_need(coco, "annotations", str(json_path))):
        where = f"{json_path}: annotations[{k}]"
        img = images.get(_need(ann, "image_id", where))
        if img is None:
            raise DataError(f"{where}: field 'image_id' {ann['image_id']!r} names no image")
        bbox = _need(ann, "bbox", where)
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise DataError(f"{where}: field 'bbox' must be [x, y, w, h], got {bbox!r}")
        cat = cats.get(ann.get("category_id"), ann.get("category_name"))
        key = (ann["image_id"], cat, ann.get("label_text", ""))
        if key not in groups:
            iwhere = f"{json_path}: image {ann['image_id']!r}"
            name = img.get("file_name", img.get("path", ""))
            groups[key] = {
                "image_id": ann["image_id"],
                "dicom_id": name.rsplit("/", 1)[-1].rsplit(".", 1)[0],
                "file_name": name,
                "path": img.get("path", name),
                "width": _need(img, "width", iwhere),
                "height": _need(img, "height", iwhere),
                "category": cat,
                "label_text": ann.get("label_text", ""),
                "boxes": [],
            }
            if "split" in img:
                groups[key]["split"] = img["split"]
        groups[key]["boxes"].append([float(v) for v in bbox])
    return list(groups.values())


class MSCXRDataset(DownstreamDataset):
    def __init__(self, paths, ids, entries, image_size, source, label_names):
        super().__init__(paths, ids, image_size, False, source, label_names)
        self.entries = entries

    def fields(self, i: int) -> dict:
        e = self.entries[i]
        mask = box_to_mask(e["boxes"], (e["height"], e["width"]), self.image_size)
        return {"phrase": e["label_text"], "label": e["category"],
                "box_mask": torch.from_numpy(mask).float()}


def build_mscxr(root, split: str, image_size: int, train: bool = False, fraction: float = 1.0,
                split_file=None, seed: int = 0) -> MSCXRDataset:
    if train:
        raise ValueError("mscxr is an evaluation set: train=True is not supported (its boxes "
                         "follow the eval resize only)")
    root = Path(root)
    if split_file:
        path = Path(split_file)
    else:
        found = sorted(root.glob(PATTERN))
        if not found:
            raise DataError(f"no {PATTERN} in {root}")
        path = found[-1]
    entries = load_ms_cxr(path)
    if any("split" in e for e in entries):
        entries = [e for e in entries if e.get("split") == split]
    elif split != "test":
        raise DataError(f"{path}: no field 'split' on its images, so the whole file is the 'test' "
                        f"split; got split={split!r}")
    paths, ids = [], []
    for k, e in enumerate(entries):
        image = find_image(root, e["path"])
        if image is None:
            raise DataError(f"{path}: image {e['image_id']!r}: file {e['path']!r} (field 'path') "
                            f"not found under {root}")
        paths.append(image)
        ids.append(f"{e['dicom_id']}#{k}")
    names = sorted({e["category"] for e in entries if e["category"]})
    return MSCXRDataset(paths, ids, entries, image_size, str(path), names)
