"""The synthetic downstream sets: written in the real formats, read by the same loaders, labels
equal to the generator's findings, images never the pretraining data's."""
import csv

import numpy as np
import pytest
import torch

from datasets.downstream import TASKS, build_downstream, collate_downstream
from datasets.downstream.boxes import mask_to_box
from datasets.downstream.nih import LABELS as NIH_LABELS
from datasets.synthetic import render_study
from datasets.synthetic_downstream import (
    CXP5_LABEL,
    MSCXR_LABEL,
    NIH_LABEL,
    generate_downstream,
    main,
    pneumothorax_mask,
    render_seed,
)

SIZE, SEED = 32, 1
COUNTS = {"nih": (60, 10, 10), "rsna": (30, 8, 8), "siim": (20, 5, 5), "chexpert5x200": 3,
          "mscxr": 12}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_downstream")
    generate_downstream(out, size=SIZE, seed=SEED, counts=COUNTS)
    return out


def study(task: str, index: int) -> dict:
    return render_study(index, SIZE, render_seed(SEED, task))


def test_every_task_is_readable_by_its_loader(out):
    for task in TASKS:
        ds = build_downstream(task, out / task, "test", 16)
        assert len(ds) > 0
        batch = collate_downstream([ds[i] for i in range(min(3, len(ds)))])
        assert batch["image"].shape[1:] == (1, 16, 16) and isinstance(batch["id"][0], str)
        assert torch.isfinite(batch["image"]).all()


def test_nih_labels_are_the_generators_findings(out):
    root = out / "nih"
    sizes = {}
    for split, n in zip(("train", "val", "test"), COUNTS["nih"]):
        ds = build_downstream("nih", root, split, SIZE)
        sizes[split] = len(ds)
        assert len(ds) == n
        for k in range(0, len(ds), 7):
            types = {f["type"] for f in study("nih", int(ds.ids[k][:8]))["findings"]}
            expected = {NIH_LABEL[t] for t in types if t in NIH_LABEL}
            assert {NIH_LABELS[i] for i in torch.nonzero(ds.labels[k]).flatten()} == expected
    for name in ("Pneumonia", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"):
        assert ds.labels[:, NIH_LABELS.index(name)].sum() == 0
    # the image is the rendered one (PNG, lossless), resized to the same size: identical pixels
    item = build_downstream("nih", root, "test", SIZE)[0]
    raw = study("nih", int(item["id"][:8]))["image"].astype(np.float32) / 255
    assert np.allclose(item["image"][0].numpy() * 0.2449 + 0.4978, raw, atol=1e-5)
    # fractions: nested official-name files, 1% holds a positive of the most frequent label
    full = build_downstream("nih", root, "train", SIZE)
    ten = build_downstream("nih", root, "train", SIZE, fraction=0.1)
    one = build_downstream("nih", root, "train", SIZE, fraction=0.01)
    assert (len(one), len(ten)) == (1, 6) and set(one.ids) <= set(ten.ids) <= set(full.ids)
    assert one.labels[0, full.labels.sum(0).argmax()] == 1
    assert (ten.labels.sum(0) > 0).sum() >= min(6, int((full.labels.sum(0) > 0).sum()))
    # Data_Entry agrees with the split files; BBox_List holds the test findings' boxes
    rows = list(csv.DictReader(open(root / "Data_Entry_2017.csv")))
    assert {r["Image Index"] for r in rows} == {i for s in ("train", "val", "test")
                                                for i in build_downstream("nih", root, s, 8).ids}
    test = build_downstream("nih", root, "test", SIZE)
    for name, boxes in test.boxes.items():
        found = study("nih", int(name[:8]))["findings"]
        assert [b for _, b in boxes] == [mask_to_box(f["mask"]) for f in found
                                         if NIH_LABEL.get(f["type"]) in
                                         ("Atelectasis", "Cardiomegaly", "Effusion",
                                          "Infiltration", "Mass", "Nodule", "Pneumothorax")]


def test_rsna_pneumonia_is_opacity_or_consolidation_with_boxes(out):
    ds = build_downstream("rsna", out / "rsna", "train", SIZE)
    lines = (out / "rsna" / "train.txt").read_text().split()
    for k, pid in enumerate(ds.ids):
        index = int(pid.replace("-", ""), 16) & (2**64 - 1)
        found = [f for f in study("rsna", index)["findings"]
                 if f["type"] in ("opacity", "consolidation")]
        assert ds.labels[k].item() == float(bool(found))
        assert ds.boxes.get(pid, []) == [mask_to_box(f["mask"]) for f in found]
        assert lines[2 * k] == f"train/{pid}.png"
    assert len(build_downstream("rsna", out / "rsna", "train", SIZE, fraction=0.1)) == 3


def test_siim_masks_and_positive_share(out):
    for split, n in zip(("train", "val", "test"), COUNTS["siim"]):
        ds = build_downstream("siim", out / "siim", split, SIZE)
        assert len(ds) == n
        positives = 0
        for k in range(len(ds)):
            item = ds[k]
            truth = pneumothorax_mask(study("siim", int(item["id"].rsplit(".", 1)[1])))
            assert np.array_equal(item["mask"][0].numpy() > 0, truth)
            positives += int(truth.any())
        assert positives == round(0.4 * n)


def test_chexpert5x200_one_observation_each_with_its_sentence(out):
    ds = build_downstream("chexpert5x200", out / "chexpert5x200", "test", SIZE)
    assert len(ds) == 5 * COUNTS["chexpert5x200"]
    assert ds.labels.sum(0).tolist() == [COUNTS["chexpert5x200"]] * 5
    for k in range(len(ds)):
        st = study("chexpert5x200", int(ds.ids[k].rsplit("_", 1)[1][:6]))
        present = [t for t in {f["type"] for f in st["findings"]} if t in CXP5_LABEL]
        assert len(present) == 1
        assert ds.label_names[int(ds.labels[k].argmax())] == CXP5_LABEL[present[0]]
        assert ds.captions[k] and ds.captions[k] in st["report"]


def test_mscxr_phrases_and_boxes_are_the_findings(out):
    ds = build_downstream("mscxr", out / "mscxr", "test", SIZE)
    assert len(ds) >= COUNTS["mscxr"]
    for k in range(len(ds)):
        item = ds[k]
        st = study("mscxr", int(item["id"].split("#")[0].rsplit("_", 1)[1]))
        own = [f for f in st["findings"]
               if f["sentence"] == item["phrase"] and MSCXR_LABEL.get(f["type"]) == item["label"]]
        assert own and item["phrase"] in st["report"]
        expected = np.zeros((SIZE, SIZE), bool)
        for f in own:
            x, y, w, h = mask_to_box(f["mask"])
            expected[y:y + h, x:x + w] = True
        assert np.array_equal(item["box_mask"].numpy() > 0, expected)


def test_generation_is_deterministic(out, tmp_path):
    again = generate_downstream(tmp_path, size=SIZE, seed=SEED, counts=COUNTS,
                                tasks=("siim", "mscxr"))
    for name in ("siim/train-rle.csv", "siim/train_1.txt", "mscxr/MS_CXR_Local_Alignment_v1.0.0.json"):
        assert (out / name).read_bytes() == (again["siim"].parent / name).read_bytes()


def test_seeds_differ_from_pretraining_and_between_tasks(tmp_path):
    seeds = [render_seed(s, t) for s in (0, 1, 2) for t in TASKS]
    assert 0 not in seeds and len(set(seeds)) == len(seeds)
    a = render_study(3, SIZE, render_seed(SEED, "nih"))["image"]
    assert not np.array_equal(a, render_study(3, SIZE, 0)["image"])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("someone's file")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--tasks", "mscxr"])
