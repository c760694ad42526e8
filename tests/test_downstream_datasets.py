"""The downstream loaders on the real annotation files the torchxrayvision wheel ships (NIH, RSNA,
SIIM; placeholder images) and on small fixtures in the exact formats (CheXpert 5x200, MS-CXR)."""
import csv
import gzip
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.annotation import DataError
from datasets.cxr import MEAN, STD
from datasets.downstream import TASKS, build_downstream, collate_downstream
from datasets.downstream.common import covering_order, fraction_subset
from datasets.downstream.nih import LABELS as NIH_LABELS
from datasets.downstream.rle import detect_encoding, rle_decode, rle_encode
from datasets.downstream.siim import pydicom
from tests.helpers import xrv_file

# the first line of SS-ACL's NIH train_1.txt
OFFICIAL_LINE = "images_002/00003547_001.png 0 0 0 0 0 1 0 0 0 0 0 0 0 0"


def png(path: Path, size=(8, 8), value: int | np.ndarray = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = value if isinstance(value, np.ndarray) else np.full(size[::-1], value, np.uint8)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def siim_rows() -> list[tuple[str, str]]:
    text = gzip.decompress(xrv_file("siim-pneumothorax-train-rle.csv.gz")).decode()
    rows = list(csv.reader(io.StringIO(text), skipinitialspace=True))
    assert rows[0] == ["ImageId", "EncodedPixels"]
    return [(r[0], r[1]) for r in rows[1:]]


# ----------------------------------------------------------------------------- RLE

def test_rle_round_trips_on_the_real_siim_masks():
    rows = siim_rows()
    rles = [r for _, r in rows]
    assert detect_encoding(rles) == "relative"
    positives = [r for r in rles if r.strip() != "-1"]
    assert len(positives) > 3000
    for rle in positives[::12]:
        mask = rle_decode(rle, 1024, 1024, "relative")
        assert mask.any() and rle_encode(mask, "relative") == rle.strip()
        absolute = rle_encode(mask, "absolute")
        assert np.array_equal(rle_decode(absolute, 1024, 1024, "absolute"), mask)
    assert detect_encoding(rle_encode(rle_decode(r, 1024, 1024), "absolute")
                           for r in positives[:50]) == "absolute"
    # column-major: the first run "557374 2" covers rows 318-319 of column 544
    first = next(r for r in positives if r.startswith("557374 2 "))
    m = rle_decode(first, 1024, 1024)
    assert m[318, 544] and m[319, 544] and not m[317, 544] and not m[320, 544]


def test_rle_on_a_toy_mask():
    m = np.array([[0, 1, 1], [1, 1, 0]], bool)           # column-major flat: 0 1 1 1 1 0
    assert rle_encode(m, "absolute") == "1 4" and rle_encode(m, "relative") == "1 4"
    m2 = np.array([[1, 0, 1], [0, 0, 1]], bool)          # flat: 1 0 0 0 1 1
    assert rle_encode(m2, "absolute") == "0 1 4 2" and rle_encode(m2, "relative") == "0 1 3 2"
    assert np.array_equal(rle_decode("1 1 5 2", 2, 3, "absolute", one_based=True), m2)
    assert rle_encode(np.zeros((2, 3), bool)) == "-1" and not rle_decode(" -1", 2, 3).any()
    with pytest.raises(ValueError, match="outside"):
        rle_decode("5 3", 2, 3, "absolute")


# ----------------------------------------------------------------------------- NIH

def nih_root(tmp_path: Path, names: list[str]) -> Path:
    root = tmp_path / "nih"
    (root).mkdir()
    (root / "Data_Entry_2017_v2020.csv.gz").write_bytes(xrv_file("Data_Entry_2017_v2020.csv.gz"))
    (root / "BBox_List_2017.csv.gz").write_bytes(xrv_file("BBox_List_2017.csv.gz"))
    for name in names:                                   # Kaggle layout: images_00x/images/
        png(root / "images_002" / "images" / name)
    return root


def test_nih_labels_from_split_lines_and_from_data_entry(tmp_path):
    text = gzip.decompress(xrv_file("Data_Entry_2017_v2020.csv.gz")).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    multi = [r for r in rows if "|" in r["Finding Labels"]][:8]
    chosen = [r for r in rows if r["Image Index"] in ("00003547_001.png", "00013118_008.png")]
    chosen += multi + rows[:6]
    names = [r["Image Index"] for r in chosen]
    root = nih_root(tmp_path, names)
    # NIH's own list format (names only): labels from Data_Entry
    (root / "test_list.txt").write_text("".join(f"images_002/{n}\n" for n in names))
    ds = build_downstream("nih", root, "test", 16)
    assert ds.label_names == list(NIH_LABELS) and ds.ids == names
    for k, r in enumerate(chosen):
        found = {NIH_LABELS[i] for i in torch.nonzero(ds.labels[k]).flatten().tolist()}
        expected = set(r["Finding Labels"].split("|")) - {"No Finding"}
        assert found == expected, r
    # SS-ACL's format: the line's labels, the official label order (index 5 = Nodule)
    (root / "train_1.txt").write_text(OFFICIAL_LINE + "\n")
    one = build_downstream("nih", root, "train", 16, fraction=0.01)
    assert one.labels.tolist() == [[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]]
    assert one.labels[0].tolist() == ds.labels[names.index("00003547_001.png")].tolist()
    item = one[0]
    assert item["image"].shape == (1, 16, 16) and item["id"] == "00003547_001.png"
    assert ds.boxes["00013118_008.png"][0][0] == "Atelectasis"
    assert ds.boxes["00013118_008.png"][0][1] == pytest.approx([225.0847, 547.0192, 86.7797, 79.1864],
                                                               abs=1e-3)


def test_nih_split_errors_name_file_and_field(tmp_path):
    root = nih_root(tmp_path, ["00000001_000.png"])
    (root / "val_list.txt").write_text("images_002/00000001_000.png 0 1 0\n")
    with pytest.raises(DataError, match=r"val_list.txt: line 1: field 'labels'"):
        build_downstream("nih", root, "val", 16)
    (root / "val_list.txt").write_text("images_002/99999999_000.png\n")
    with pytest.raises(DataError, match=r"line 1: image '99999999_000.png' is not in .*Data_Entry"):
        build_downstream("nih", root, "val", 16)
    (root / "val_list.txt").write_text("images_009/00000001_000.png " + "0 " * 14 + "\n")
    with pytest.raises(DataError, match=r"val_list.txt: line 1: image file .* \(field 'path'\)"):
        build_downstream("nih", root, "val", 16)
    with pytest.raises(DataError, match=r"test_list.txt not found"):
        build_downstream("nih", root, "test", 16)


# ----------------------------------------------------------------------------- RSNA

def rsna_table() -> list[dict]:
    with zipfile.ZipFile(io.BytesIO(xrv_file("kaggle_stage_2_train_labels.csv.zip"))) as z:
        return list(csv.DictReader(io.StringIO(z.read("stage_2_train_labels.csv").decode())))


def test_rsna_labels_and_boxes_from_the_real_table(tmp_path):
    rows = rsna_table()
    pids = list(dict.fromkeys(r["patientId"] for r in rows))[:40]
    root = tmp_path / "rsna"
    for pid in pids:
        (root / "train").mkdir(parents=True, exist_ok=True)
        Image.new("L", (12, 12), 90).save(root / "train" / f"{pid}.jpg")
    with open(root / "stage_2_train_labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / "train.txt").write_text("".join(f"train/{p}.jpg\n" for p in pids))
    ds = build_downstream("rsna", root, "train", 16)
    target = {}
    for r in rows:
        target[r["patientId"]] = max(target.get(r["patientId"], 0), int(r["Target"]))
    assert ds.ids == pids and ds.label_names == ["Pneumonia"]
    assert ds.labels.flatten().tolist() == [float(target[p]) for p in pids]
    assert 0 < ds.labels.sum() < len(pids)
    pos = next(p for p in pids if target[p])
    expected = [[float(r[k]) for k in ("x", "y", "width", "height")] for r in rows
                if r["patientId"] == pos]
    assert ds.boxes[pos] == expected
    # a split line's own label wins: SS-ACL's "path label" format
    (root / "val.txt").write_text(f"train/{pids[0]}.jpg 1\n")
    assert build_downstream("rsna", root, "val", 16).labels.tolist() == [[1.0]]


def test_rsna_missing_column_is_named(tmp_path):
    root = tmp_path / "rsna"
    png(root / "train" / "a.png")
    (root / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height\na,,,,\n")
    (root / "test.txt").write_text("train/a.png\n")
    with pytest.raises(DataError, match=r"stage_2_train_labels.csv: missing column.*Target"):
        build_downstream("rsna", root, "test", 16)
    (root / "stage_2_train_labels.csv").unlink()
    (root / "test.txt").write_text("train/a.png 2\n")
    with pytest.raises(DataError, match=r"test.txt: line 1: field 'label'"):
        build_downstream("rsna", root, "test", 16)


# ----------------------------------------------------------------------------- SIIM

def test_siim_masks_from_the_real_rle_file(tmp_path):
    rows = siim_rows()
    by_id: dict[str, list[str]] = {}
    for iid, rle in rows:
        by_id.setdefault(iid, []).append(rle)
    multi = next(i for i, r in by_id.items() if len(r) > 1)
    empty = next(i for i, r in by_id.items() if r == ["-1"])
    single = next(i for i, r in by_id.items() if len(r) == 1 and r[0] != "-1")
    root = tmp_path / "siim"
    (root / "png_images").mkdir(parents=True)
    (root / "siim-pneumothorax-train-rle.csv.gz").write_bytes(
        xrv_file("siim-pneumothorax-train-rle.csv.gz"))
    truth = {}
    for iid in (multi, empty, single):
        truth[iid] = np.zeros((1024, 1024), bool)
        for rle in by_id[iid]:
            truth[iid] |= rle_decode(rle, 1024, 1024)
        png(root / "png_images" / f"{iid}.png", value=truth[iid].astype(np.uint8) * 255)
    (root / "test_list.txt").write_text(f"{multi}\n{empty}\n{single}\n")
    ds = build_downstream("siim", root, "test", 1024)
    for k, iid in enumerate((multi, empty, single)):
        item = ds[k]
        assert item["id"] == iid and item["mask"].shape == (1, 1024, 1024)
        assert np.array_equal(item["mask"][0].numpy() > 0, truth[iid])      # rows united
        assert item["labels"].item() == float(truth[iid].any())
    # train mode: one random crop for both (the placeholder image is the mask itself)
    torch.manual_seed(0)
    (root / "train_list.txt").write_text(f"{multi}\n")
    train = build_downstream("siim", root, "train", 64, train=True)
    for _ in range(3):
        item = train[0]
        seen = item["image"][0] > 0.5 / 0.2449                # white (mask) pixels, normalised
        assert item["mask"].shape == (1, 64, 64) and set(item["mask"].unique().tolist()) <= {0, 1}
        agree = (seen == (item["mask"][0] > 0)).float().mean().item()
        assert agree > 0.97


def test_siim_errors_name_file_and_field(tmp_path):
    root = tmp_path / "siim"
    png(root / "images" / "a.png")
    (root / "train-rle.csv").write_text("ImageId,Pixels\na,-1\n")
    (root / "test_list.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"train-rle.csv: missing column 'EncodedPixels'"):
        build_downstream("siim", root, "test", 16)
    (root / "train-rle.csv").write_text("ImageId, EncodedPixels\nb,-1\n")
    with pytest.raises(DataError, match=r"test_list.txt: line 1: ImageId 'a' is not in .*'ImageId'"):
        build_downstream("siim", root, "test", 16)
    (root / "train-rle.csv").write_text("ImageId, EncodedPixels\na,60 10\n")
    with pytest.raises(DataError, match=r"field 'EncodedPixels' does not fit its 8x8 image"):
        build_downstream("siim", root, "test", 16)[0]


def write_dicom(path: Path, pixels: np.ndarray, photometric: str) -> None:
    """A minimal uncompressed 16-bit DICOM file, as SIIM's dicom-images-* hold."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_siim_dicom_images_are_read_min_max_scaled(tmp_path, photometric):
    root = tmp_path / "siim"
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 50 + 1000
    write_dicom(root / "dicom-images-train" / "s" / "t" / "a.dcm", pixels, photometric)
    (root / "train-rle.csv").write_text("ImageId, EncodedPixels\na,3 2\n")
    (root / "val_list.txt").write_text("a\n")
    item = build_downstream("siim", root, "val", 8)[0]
    expect = (pixels - 1000.0) / (63 * 50)
    expect = 1.0 - expect if photometric == "MONOCHROME1" else expect
    got = item["image"][0].numpy() * STD + MEAN                # undo the normalisation
    assert np.allclose(got, expect, atol=1e-5)
    assert item["mask"].sum().item() == 2 and item["labels"].item() == 1.0


# ----------------------------------------------------------------------------- fractions

def test_fraction_subsets_are_nested_deterministic_and_cover_labels(tmp_path):
    rng = np.random.default_rng(3)
    labels = (rng.random((400, 14)) < np.linspace(0.01, 0.3, 14)).astype(np.float32)
    labels[:, 13] = 0                                     # a label without positives
    order = covering_order(labels, seed=5)
    assert sorted(order.tolist()) == list(range(400))
    assert np.array_equal(order, covering_order(labels, seed=5))
    assert (labels[order[:13]].sum(0)[:13] > 0).all()     # 13 images hold every present label
    one, ten = fraction_subset(labels, 0.01, 5), fraction_subset(labels, 0.1, 5)
    assert len(one) == 4 and len(ten) == 40 and set(one) <= set(ten)
    assert not np.array_equal(fraction_subset(labels, 0.1, 6), ten)
    # the loader: no train_10.txt in root -> the seeded subset of train_list.txt
    root = tmp_path / "nih"
    lines = []
    for k, y in enumerate(labels):
        png(root / "images_001" / f"{k:08d}_000.png", size=(4, 4))
        lines.append(f"images_001/{k:08d}_000.png " + " ".join(str(int(v)) for v in y))
    (root / "train_list.txt").write_text("\n".join(lines) + "\n")
    ds10 = build_downstream("nih", root, "train", 8, fraction=0.1, seed=5)
    ds1 = build_downstream("nih", root, "train", 8, fraction=0.01, seed=5)
    assert ds10.ids == [f"{k:08d}_000.png" for k in ten] and set(ds1.ids) <= set(ds10.ids)
    assert torch.equal(ds10.labels, torch.from_numpy(labels[ten]))
    # an official fraction file is taken as it is
    (root / "train_10.txt").write_text(lines[7] + "\n" + lines[3] + "\n")
    assert build_downstream("nih", root, "train", 8, fraction=0.1).ids == ["00000007_000.png",
                                                                          "00000003_000.png"]
    with pytest.raises(ValueError, match="fraction"):
        build_downstream("nih", root, "train", 8, fraction=0.5)


# ----------------------------------------------------------------------------- CheXpert 5x200

def test_chexpert5x200_records(tmp_path):
    root = tmp_path / "cxp"
    png(root / "CheXpert-v1.0-small" / "valid" / "p1.jpg")
    png(root / "imgs" / "p2.png")
    labels = [None] * 14
    labels[1] = 1.0                                       # Cardiomegaly (project order)
    recs = [{"image": "CheXpert-v1.0/valid/p1.jpg", "caption": "enlarged heart", "labels": labels},
            {"image_id": "imgs/p2.png", "caption": "small effusion",
             "labels": {"Pleural Effusion": -1, "Lung Opacity": 1}}]
    (root / "chexpert_5x200_test.json").write_text(json.dumps(recs))
    ds = build_downstream("chexpert5x200", root, "test", 16)
    assert ds.label_names == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                              "Pleural Effusion"]
    batch = collate_downstream([ds[0], ds[1]])
    assert batch["labels"].tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 0, 1]]
    assert batch["caption"] == ["enlarged heart", "small effusion"]
    assert batch["image"].shape == (2, 1, 16, 16)
    recs[1]["labels"] = {"Pleural Effusion": 1, "Edema": 1}
    (root / "chexpert_5x200_test.json").write_text(json.dumps(recs))
    with pytest.raises(DataError, match=r"record #1: field 'labels' must be positive for exactly"):
        build_downstream("chexpert5x200", root, "test", 16)
    del recs[0]["caption"]
    (root / "chexpert_5x200_test.json").write_text(json.dumps(recs))
    with pytest.raises(DataError, match=r"chexpert_5x200_test.json: record #0: missing field 'caption'"):
        build_downstream("chexpert5x200", root, "test", 16)


# ----------------------------------------------------------------------------- MS-CXR

def mscxr_root(tmp_path: Path, annotations: list[dict]) -> Path:
    root = tmp_path / "mscxr"
    png(root / "files" / "p10" / "abc.jpg", size=(100, 200))       # width 100, height 200
    coco = {"images": [{"id": 1, "file_name": "files/p10/abc.jpg", "path": "files/p10/abc.jpg",
                        "width": 100, "height": 200}],
            "categories": [{"id": 1, "name": "Pneumonia"}, {"id": 2, "name": "Edema"}],
            "annotations": annotations}
    (root / "MS_CXR_Local_Alignment_v1.0.0.json").write_text(json.dumps(coco))
    return root


def test_mscxr_boxes_map_into_the_resized_image(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40],
             "label_text": "bilateral pneumonia"},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 100, 200],
             "label_text": "edema"},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [60, 100, 20, 20],
             "label_text": "bilateral pneumonia"}]
    ds = build_downstream("mscxr", mscxr_root(tmp_path, anns), "test", 50)
    assert len(ds) == 2 and ds.label_names == ["Edema", "Pneumonia"]
    item = ds[0]
    assert item["phrase"] == "bilateral pneumonia" and item["label"] == "Pneumonia"
    expected = torch.zeros(50, 50)
    expected[5:15, 5:20] = 1            # x 10..40 -> 5..20 (x 0.5), y 20..60 -> 5..15 (x 0.25)
    expected[25:30, 30:40] = 1          # the phrase's second box: x 60..80, y 100..120
    assert torch.equal(item["box_mask"], expected)
    assert ds[1]["box_mask"].all() and item["image"].shape == (1, 50, 50)
    with pytest.raises(DataError, match=r"whole file is the 'test' split"):
        build_downstream("mscxr", tmp_path / "mscxr", "train", 50)
    with pytest.raises(ValueError, match="evaluation set"):
        build_downstream("mscxr", tmp_path / "mscxr", "test", 50, train=True)
    del anns[1]["bbox"]
    with pytest.raises(DataError, match=r"MS_CXR_Local_Alignment_v1.0.0.json: annotations\[1\]: "
                                        r"missing field 'bbox'"):
        build_downstream("mscxr", mscxr_root(tmp_path / "b", anns), "test", 50)


# ----------------------------------------------------------------------------- common

def test_unreadable_images_are_dropped_and_counted(tmp_path):
    root = tmp_path / "rsna"
    png(root / "train" / "a.png")
    (root / "train").joinpath("b.png").write_bytes(b"not a png")
    (root / "test.txt").write_text("train/a.png 0\ntrain/b.png 1\n")
    ds = build_downstream("rsna", root, "test", 16)
    assert ds[1] is None and ds.bad_counts() == {"unreadable_image": 1}
    assert ds.bad_summary().startswith("skipped 1 unreadable_image: ") and "b.png" in ds.bad_summary()
    batch = collate_downstream([ds[0], ds[1]])
    assert batch["id"] == ["a"] and batch["labels"].shape == (1, 1)
    assert collate_downstream([None]) is None
    with pytest.raises(ValueError, match="task must be one of"):
        build_downstream("chexpert", root, "test", 16)
    assert TASKS == ("nih", "rsna", "siim", "chexpert5x200", "mscxr")
