"""Synthetic counterparts of the five downstream datasets, drawn from the built-in chest X-rays
(datasets/synthetic.py ``render_study``: image, finding masks, report sentences) and written in
the real datasets' formats, so that ``datasets.downstream.build_downstream`` reads them as it
reads the real ones:

    python -m datasets.synthetic_downstream --out data/synthetic_downstream --size 64 [--seed 1]
    generate_downstream(out, size=64, seed=1, counts=None, tasks=TASKS) -> {task: folder}

Task k of TASKS draws its studies with render seed ``100 * seed + k + 1`` (never 0, the
pretraining data's default seed, for seed >= 0), so downstream images are not pretraining images
and no two tasks share one. Default sizes (``COUNTS``) and what each folder holds:

- nih/: NIH ChestX-ray14-like, 2000 train / 300 val / 500 test, natural finding frequencies.
  14 labels in NIH's order; a synthetic finding sets the label it corresponds to (``NIH_LABEL``:
  atelectasis, cardiomegaly, effusion, opacity -> Infiltration, nodule, hilar_mass -> Mass,
  pneumothorax, consolidation, edema); Pneumonia, Emphysema, Fibrosis, Pleural_Thickening and
  Hernia have no synthetic counterpart and stay 0 everywhere. Files: images_001/images/*.png,
  train_1.txt / train_10.txt / train_list.txt, val_list.txt, test_list.txt, Data_Entry_2017.csv,
  BBox_List_2017.csv (boxes of the test images' findings).
- rsna/: RSNA-like, 1200 / 200 / 400; "Pneumonia" = an opacity or consolidation is present, one
  box per such finding. Files: {train,val,test}/<patientId>.png, train_1.txt / train_10.txt /
  train.txt, val.txt, test.txt, stage_2_train_labels.csv.
- siim/: SIIM-ACR-like, 700 / 100 / 200 with 40% pneumothorax in each split; the mask is the
  union of the pneumothorax finding masks. Files: images/<ImageId>.png, train-rle.csv (relative
  column-major RLE, as the real file), train_1.txt / train_10.txt / train_list.txt,
  val_list.txt, test_list.txt.
- chexpert5x200/: 5 x 40 images, each with exactly one of the five observations' findings
  (others may be present); caption = that finding's report sentence(s); labels = the study's 14
  CheXpert labels. Files: images/*.png, chexpert_5x200_test.json.
- mscxr/: MS-CXR-like, >= 300 phrases: each finding of the MS-CXR categories (``MSCXR_LABEL``)
  gives its report sentence as the phrase and its mask's bounding box (a bilateral finding: one
  box per side, same phrase). Files: files/*.png, MS_CXR_Local_Alignment_v1.0.0.json.

Fractions: the train split's lines are ordered by ``covering_order`` (a seeded permutation that
starts with one positive of each label, the most frequent first); train_1 / train_10 are its
first 1% / 10% (nested, deterministic, each label with any positive is present in 1% as long as
1% holds at least as many images as there are such labels: 20 images vs 9 NIH labels).
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.downstream.boxes import mask_to_box
from datasets.downstream.common import covering_order, subset_size
from datasets.downstream.nih import LABELS as NIH_LABELS
from datasets.downstream.rle import rle_encode
from datasets.synthetic import render_study

TASKS = ("nih", "rsna", "siim", "chexpert5x200", "mscxr")
COUNTS = {"nih": (2000, 300, 500), "rsna": (1200, 200, 400), "siim": (700, 100, 200),
          "chexpert5x200": 40, "mscxr": 300}
NIH_LABEL = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "effusion": "Effusion",
             "opacity": "Infiltration", "nodule": "Nodule", "hilar_mass": "Mass",
             "pneumothorax": "Pneumothorax", "consolidation": "Consolidation", "edema": "Edema"}
NIH_BBOX_NAME = {"Infiltration": "Infiltrate"}        # BBox_List_2017's spelling
NIH_BBOX_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                   "Pneumonia", "Pneumothorax")
RSNA_TYPES = ("opacity", "consolidation")
CXP5_LABEL = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly",
              "consolidation": "Consolidation", "edema": "Edema", "effusion": "Pleural Effusion"}
MSCXR_CATEGORIES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Lung Opacity",
                    "Pleural Effusion", "Pneumonia", "Pneumothorax")
MSCXR_LABEL = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly",
               "consolidation": "Consolidation", "edema": "Edema", "opacity": "Lung Opacity",
               "effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax"}
SIIM_POSITIVE = 0.4
MARKER = ".synthetic-downstream"
SPLITS = ("train", "val", "test")


def render_seed(seed: int, task: str) -> int:
    return 100 * seed + TASKS.index(task) + 1


def studies(seed: int, task: str, size: int):
    """(index, study) of the task's stream of studies, index 0, 1, ..."""
    rs = render_seed(seed, task)
    index = 0
    while True:
        yield index, render_study(index, size, rs)
        index += 1


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _types(study: dict) -> set[str]:
    return {f["type"] for f in study["findings"]}


def _split_counts(counts) -> dict[str, int]:
    return dict(zip(SPLITS, counts))


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def _write_fractions(folder: Path, lines: list[str], labels: np.ndarray, names: dict, seed: int):
    """The train lines in full and as their nested 1% / 10% subsets (see the module docstring)."""
    order = covering_order(labels, seed)
    for fraction, name in names.items():
        keep = np.sort(order[:subset_size(len(lines), fraction)])
        _write_lines(folder / name, [lines[i] for i in keep])


# ----------------------------------------------------------------------------- NIH

def nih_labels(study: dict) -> np.ndarray:
    y = np.zeros(len(NIH_LABELS), dtype=np.float32)
    for t in _types(study):
        if t in NIH_LABEL:
            y[NIH_LABELS.index(NIH_LABEL[t])] = 1
    return y


def write_nih(folder: Path, size: int, seed: int, counts=COUNTS["nih"]) -> None:
    per_split = _split_counts(counts)
    stream = studies(seed, "nih", size)
    lines = {s: [] for s in SPLITS}
    labels = {s: [] for s in SPLITS}
    entry_rows, bbox_rows = [], []
    for split in SPLITS:
        for _ in range(per_split[split]):
            index, st = next(stream)
            name = f"{index:08d}_000.png"
            _save(st["image"], folder / "images_001" / "images" / name)
            y = nih_labels(st)
            lines[split].append(f"images_001/{name} " + " ".join(str(int(v)) for v in y))
            labels[split].append(y)
            found = [NIH_LABELS[c] for c in np.flatnonzero(y)]
            entry_rows.append([name, "|".join(found) or "No Finding", 0, index, "PA", size, size])
            if split == "test":
                for f in st["findings"]:
                    label = NIH_LABEL.get(f["type"])
                    box = mask_to_box(f["mask"])
                    if label in NIH_BBOX_LABELS and box is not None:
                        bbox_rows.append([name, NIH_BBOX_NAME.get(label, label), *box])
    _write_fractions(folder, lines["train"], np.stack(labels["train"]),
                     {0.01: "train_1.txt", 0.1: "train_10.txt", 1.0: "train_list.txt"}, seed)
    _write_lines(folder / "val_list.txt", lines["val"])
    _write_lines(folder / "test_list.txt", lines["test"])
    with open(folder / "Data_Entry_2017.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position",
                    "OriginalImage[Width", "Height]"])
        w.writerows(entry_rows)
    with open(folder / "BBox_List_2017.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Label", "Bbox [x,y,w,h]", "", "", ""])
        w.writerows(bbox_rows)


# ----------------------------------------------------------------------------- RSNA

def rsna_boxes(study: dict) -> list[list[int]]:
    boxes = [mask_to_box(f["mask"]) for f in study["findings"] if f["type"] in RSNA_TYPES]
    return [b for b in boxes if b is not None]


def write_rsna(folder: Path, size: int, seed: int, counts=COUNTS["rsna"]) -> None:
    per_split = _split_counts(counts)
    stream = studies(seed, "rsna", size)
    lines = {s: [] for s in SPLITS}
    train_labels, rows = [], []
    for split in SPLITS:
        for _ in range(per_split[split]):
            index, st = next(stream)
            pid = str(uuid.UUID(int=(render_seed(seed, "rsna") << 64) | index))
            _save(st["image"], folder / split / f"{pid}.png")
            boxes = rsna_boxes(st)
            lines[split].append(f"{split}/{pid}.png {int(bool(boxes))}")
            if split == "train":
                train_labels.append([float(bool(boxes))])
            rows += [[pid, *b, 1] for b in boxes] or [[pid, "", "", "", "", 0]]
    _write_fractions(folder, lines["train"], np.array(train_labels),
                     {0.01: "train_1.txt", 0.1: "train_10.txt", 1.0: "train.txt"}, seed)
    _write_lines(folder / "val.txt", lines["val"])
    _write_lines(folder / "test.txt", lines["test"])
    with open(folder / "stage_2_train_labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patientId", "x", "y", "width", "height", "Target"])
        w.writerows(rows)


# ----------------------------------------------------------------------------- SIIM

def pneumothorax_mask(study: dict) -> np.ndarray:
    m = np.zeros(study["image"].shape, dtype=bool)
    for f in study["findings"]:
        if f["type"] == "pneumothorax":
            m |= f["mask"]
    return m


def write_siim(folder: Path, size: int, seed: int, counts=COUNTS["siim"]) -> None:
    stream = studies(seed, "siim", size)
    lines = {s: [] for s in SPLITS}
    train_pos, rle_rows = [], []
    for split, n in _split_counts(counts).items():
        want = {True: int(round(n * SIIM_POSITIVE))}
        want[False] = n - want[True]
        while want[True] or want[False]:
            index, st = next(stream)
            mask = pneumothorax_mask(st)
            pos = bool(mask.any())
            if not want[pos]:
                continue
            want[pos] -= 1
            iid = f"1.2.276.0.7230010.3.1.4.{render_seed(seed, 'siim')}.{index}"
            _save(st["image"], folder / "images" / f"{iid}.png")
            rle_rows.append([iid, rle_encode(mask, "relative")])
            lines[split].append(iid)
            if split == "train":
                train_pos.append([float(pos)])
    _write_fractions(folder, lines["train"], np.array(train_pos),
                     {0.01: "train_1.txt", 0.1: "train_10.txt", 1.0: "train_list.txt"}, seed)
    _write_lines(folder / "val_list.txt", lines["val"])
    _write_lines(folder / "test_list.txt", lines["test"])
    with open(folder / "train-rle.csv", "w", newline="") as f:
        f.write("ImageId, EncodedPixels\n")
        csv.writer(f).writerows(rle_rows)


# ----------------------------------------------------------------------------- CheXpert 5x200

def caption(study: dict, finding_type: str) -> str:
    """The report sentence(s) of the study's findings of ``finding_type`` (each once)."""
    sents = dict.fromkeys(f["sentence"] for f in study["findings"] if f["type"] == finding_type)
    return " ".join(sents)


def write_chexpert5x200(folder: Path, size: int, seed: int, per_class=COUNTS["chexpert5x200"]):
    stream = studies(seed, "chexpert5x200", size)
    want = dict.fromkeys(CXP5_LABEL, per_class)
    records = []
    while any(want.values()):
        index, st = next(stream)
        present = _types(st) & set(CXP5_LABEL)
        if len(present) != 1 or not want[next(iter(present))]:
            continue
        t = present.pop()
        want[t] -= 1
        rel = f"images/cxp5_{index:06d}.png"
        _save(st["image"], folder / rel)
        records.append({"image_id": rel, "caption": caption(st, t), "labels": st["labels"]})
    (folder / "chexpert_5x200_test.json").write_text(json.dumps(records, indent=1))


# ----------------------------------------------------------------------------- MS-CXR

def write_mscxr(folder: Path, size: int, seed: int, phrases=COUNTS["mscxr"]) -> None:
    stream = studies(seed, "mscxr", size)
    cat_id = {name: k + 1 for k, name in enumerate(MSCXR_CATEGORIES)}
    images, annotations, n_phrases = [], [], 0
    while n_phrases < phrases:
        index, st = next(stream)
        keep = [(f, mask_to_box(f["mask"])) for f in st["findings"] if f["type"] in MSCXR_LABEL]
        keep = [(f, box) for f, box in keep if box is not None]
        if not keep:
            continue
        rel = f"files/msx_{index:06d}.png"
        _save(st["image"], folder / rel)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": rel, "path": rel, "width": size,
                       "height": size})
        seen = set()
        for f, box in keep:
            category = MSCXR_LABEL[f["type"]]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": cat_id[category], "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0,
                                "label_text": f["sentence"]})
            seen.add((category, f["sentence"]))
        n_phrases += len(seen)
    coco = {"info": {"description": "synthetic MS-CXR-like phrase grounding "
                                    "(python -m datasets.synthetic_downstream)"},
            "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n, "supercategory": "finding"}
                           for n, i in cat_id.items()]}
    (folder / "MS_CXR_Local_Alignment_v1.0.0.json").write_text(json.dumps(coco, indent=1))


WRITERS = {"nih": write_nih, "rsna": write_rsna, "siim": write_siim,
           "chexpert5x200": write_chexpert5x200, "mscxr": write_mscxr}


def claim(out: Path, overwrite: bool) -> None:
    """Make ``out`` this generator's folder; FileExistsError for a non-empty folder it did not
    make, unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        raise FileExistsError(f"--out {out} is not empty and was not made by "
                              f"datasets.synthetic_downstream (no {MARKER} file): its task folders "
                              "would be replaced. Choose a new folder, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by python -m datasets.synthetic_downstream, which replaces "
                              "the task folders here when run again\n")


def generate_downstream(out, size: int = 64, seed: int = 1, counts: dict | None = None,
                        tasks=TASKS, overwrite: bool = False) -> dict[str, Path]:
    """Write the ``tasks``' folders under ``out`` (each replaced); ``counts`` overrides COUNTS
    per task. Returns {task: folder}."""
    out = Path(out)
    claim(out, overwrite)
    counts = {**COUNTS, **(counts or {})}
    folders = {}
    for task in tasks:
        if task not in WRITERS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        folder = out / task
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        WRITERS[task](folder, size, seed, counts[task])
        folders[task] = folder
    return folders


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write synthetic downstream datasets (NIH, RSNA, "
                                             "SIIM, CheXpert 5x200, MS-CXR formats).")
    ap.add_argument("--out", required=True, help="output folder (one sub-folder per task)")
    ap.add_argument("--size", type=int, default=64, help="image size in pixels")
    ap.add_argument("--seed", type=int, default=1,
                    help="task k renders with seed 100*seed+k+1 (pretraining data: seed 0)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty folder that this generator did not make")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        folders = generate_downstream(args.out, args.size, args.seed, tasks=args.tasks,
                                      overwrite=args.overwrite)
    except FileExistsError as e:
        ap.error(str(e))
    for task, folder in folders.items():
        print(f"{task}: {folder}")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
