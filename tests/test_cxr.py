import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets.annotation import DataError
from datasets.cxr import MEAN, STD, build_dataset, build_transform, collate, load_image
from utils.config import load_config
from vocab.anatomy_graph import AnatomyGraph

GRAPH = AnatomyGraph.default()
LABELS = [1, -1, 0, None] + [None] * 9 + [0]


def norm(v):
    return (v - MEAN) / STD


def write_images(root):
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 30), 100, np.uint8)).save(root / "gray.png")                    # L
    # I;16
    Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(root / "deep.png")
    # RGB
    Image.fromarray(np.full((32, 32, 3), (200, 40, 10), np.uint8)).save(root / "color.png")
    Image.fromarray(np.full((20, 20), 30000, np.int32)).save(root / "int.tif")                   # I
    side = np.zeros((48, 48), np.uint8)
    side[:, :16] = 255                                    # bright on the image's left only
    Image.fromarray(side).save(root / "side.png")


def make_data(tmp_path, records, **overrides):
    root = tmp_path / "images"
    write_images(root)
    ann = tmp_path / "annotation.json"
    ann.write_text(json.dumps({"train": records, "val": records[:1]}))
    sets = [f"data.annotation={ann}", f"data.image_root={root}", "data.image_size=16", "data.sr_scale=1"]
    return load_config(overrides=sets + [f"{k}={v}" for k, v in overrides.items()]), ann


def rec(rid, paths, report="The heart size is normal. No pleural effusion.", **kw):
    return {"id": rid, "report": report, "image_path": paths, "split": "train", **kw}


GOOD = [rec("s1", ["gray.png", "deep.png"], labels=LABELS, anatomies=["cardiac silhouette"]),
        rec("s2", ["color.png"], labels=LABELS),
        rec("s3", ["int.tif"], report="There is a right lower lobe opacity.", labels=LABELS),
        rec("s4", ["side.png"], report="Unremarkable study.", labels=LABELS)]




def test_load_image_modes(tmp_path):
    write_images(tmp_path)
    assert torch.allclose(load_image(tmp_path / "gray.png"), torch.full((1, 40, 30), 100 / 255))
    deep = load_image(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    assert torch.allclose(deep, torch.full((1, 30, 40), 40000 / 65535))     # not clipped at 255
    lum = np.asarray(Image.open(tmp_path / "color.png").convert("L"))[0, 0]
    assert torch.allclose(load_image(tmp_path / "color.png"), torch.full((1, 32, 32), lum / 255))
    assert Image.open(tmp_path / "int.tif").mode == "I"
    assert torch.allclose(load_image(tmp_path / "int.tif"), torch.full((1, 20, 20), 30000 / 65535))


def test_dataset_items_and_first_frontal_vs_all(tmp_path):
    cfg, _ = make_data(tmp_path, GOOD)
    ds = build_dataset(cfg, "train", train=False)
    assert [s.id for s in ds.samples] == ["s1", "s2", "s3", "s4"]
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert torch.allclose(item["image"], torch.full((3, 16, 16), norm(100 / 255)), atol=1e-6)
    assert torch.allclose(ds[2]["image"], torch.full((3, 16, 16), norm(30000 / 65535)), atol=1e-6)
    cfg.data.sr_scale = 2  # super-resolution data: images at twice the encoder's size
    assert build_dataset(cfg, "train", train=False)[0]["image"].shape == (3, 32, 32)
    assert item["report"] == "the heart size is normal . no pleural effusion ."
    # uncertain -> negative
    assert item["labels"].tolist() == [1, 0, 0, 0] + [0] * 9 + [0]
    # data.anatomies: report (default) reads the text: the heart is named, but no finding is stated
    assert not item["anatomies"].any()
    cfg_ann, _ = make_data(tmp_path, GOOD, **{"data.anatomies": "annotation"})
    ds_ann = build_dataset(cfg_ann, "train", train=False)
    assert torch.equal(ds_ann[0]["anatomies"], GRAPH.leaf_mask(["cardiac silhouette"]))
    assert torch.equal(ds_ann[2]["anatomies"], GRAPH.leaf_mask(["right lower lung zone"]))
    # derived from text
    assert torch.equal(ds[2]["anatomies"], GRAPH.leaf_mask(["right lower lung zone"]))
    # the heart is named, but no finding is stated
    assert not ds[1]["anatomies"].any()
    # nothing mentioned
    assert not ds[3]["anatomies"].any()
    cfg, _ = make_data(tmp_path, GOOD, **{"data.views": "all", "data.uncertain_as": "positive"})
    ds = build_dataset(cfg, "train", train=False)
    assert [s.id for s in ds.samples] == ["s1_0", "s1_1", "s2", "s3", "s4"]
    assert torch.allclose(ds[1]["image"], torch.full((3, 16, 16), norm(40000 / 65535)), atol=1e-6)
    # uncertain -> positive
    assert ds[1]["labels"][:2].tolist() == [1, 1]
    assert len(build_dataset(cfg, "val", train=False)) == 2
    cfg, _ = make_data(tmp_path, GOOD, **{"data.max_samples": 2})
    assert len(build_dataset(cfg, "train", train=True)) == 2


def test_batch_size_one_and_collate(tmp_path):
    cfg, _ = make_data(tmp_path, GOOD)
    ds = build_dataset(cfg, "train", train=True)
    batches = list(DataLoader(ds, batch_size=1, collate_fn=collate))
    assert len(batches) == 4
    b = batches[1]
    assert set(b) == {"image", "id", "report", "labels", "anatomies", "index"}
    assert b["image"].shape == (1, 3, 16, 16) and b["id"] == ["s2"] and b["index"].tolist() == [1]
    assert b["labels"].dtype == torch.float32 and b["labels"].shape == (1, 14)
    assert b["anatomies"].dtype == torch.bool and b["anatomies"].shape == (1, 25)
    full = collate([ds[0], None, ds[3]])
    assert full["id"] == ["s1", "s4"] and full["index"].tolist() == [0, 3]
    assert collate([None]) is None


def test_no_horizontal_flip(tmp_path):
    write_images(tmp_path)
    img = load_image(tmp_path / "side.png")
    torch.manual_seed(0)
    for train in (True, False):
        t = build_transform(32, train=train, scale=(0.85, 1.0))
        for _ in range(30):
            x = t(img)
            assert x[:, :, :4].mean() > norm(0.9) and x[:, :, -4:].mean() < norm(0.1)
    affine = build_transform(32, train=True, augment="affine")  # rotated and scaled, never mirrored
    for _ in range(30):
        x = affine(img)
        assert x[:, :, :16].mean() > x[:, :, 16:].mean() + 1.0
    with pytest.raises(ValueError, match="data.augment"):
        build_transform(32, train=True, augment="flip")


@pytest.mark.parametrize("bad, kind, needle", [
    (rec("m1", ["nowhere.png"]), "missing_image", "nowhere.png"),
    (rec("e1", ["gray.png"], report=" ... "), "empty_report", "'report' is empty"),
    (rec("c1", ["gray.png"], report="心脏大小正常。"), "non_latin_report", "no Latin letters"),
    ({"id": "r1", "report": "ok", "image_path": 7}, "bad_record", "'image_path'"),
    (rec("a1", ["gray.png"], anatomies=["left elbow"]), "bad_record", "left elbow"),
])
def test_bad_records_raise_or_are_skipped(tmp_path, bad, kind, needle):
    cfg, ann = make_data(tmp_path, GOOD + [bad], **{"data.anatomies": "annotation"})
    with pytest.raises(DataError) as e:
        build_dataset(cfg, "train", train=False)
    assert str(ann) in str(e.value) and repr(bad["id"]) in str(e.value) and needle in str(e.value)
    cfg, _ = make_data(
        tmp_path, GOOD + [bad], **{"data.skip_bad": True, "data.anatomies": "annotation"}
    )
    ds = build_dataset(cfg, "train", train=False)
    assert len(ds) == 4 and ds.bad_counts()[kind] == 1 and sum(ds.bad_counts().values()) == 1
    assert needle in ds.bad_summary()


def test_first_frontal_uses_the_recorded_views(tmp_path, caplog):
    records = [
        rec("v1", ["deep.png", "gray.png", "color.png"], views=["LATERAL", "AP", "PA"]),
        rec("v2", ["deep.png", "gray.png"], views=["LL", "AP"]),
        rec("v3", ["deep.png"], views=["LATERAL"]),
        rec("v4", ["deep.png", "gray.png"]),                         # no views: image_path[0]
    ]
    cfg, ann = make_data(tmp_path, records)
    with pytest.raises(DataError, match=r"record 'v3' \(#2\): no frontal \(PA or AP\) view"):
        build_dataset(cfg, "train", train=False)
    cfg, _ = make_data(tmp_path, records, **{"data.skip_bad": True})
    with caplog.at_level("WARNING"):
        ds = build_dataset(cfg, "train", train=False)
    assert [(s.id, s.path.name, s.view) for s in ds.samples] == [
        ("v1", "color.png", "PA"), ("v2", "gray.png", "AP"), ("v4", "deep.png", "")]
    assert ds.bad_counts()["no_frontal"] == 1 and "'v3'" in ds.bad_summary()
    assert "1 records have no 'views' field" in caplog.text
    cfg, _ = make_data(tmp_path, records, **{"data.views": "all"})
    ds = build_dataset(cfg, "train", train=False)
    assert [(s.id, s.view) for s in ds.samples][:4] == [
        ("v1_0", "LATERAL"), ("v1_1", "AP"), ("v1_2", "PA"), ("v2_0", "LL")]
    assert len(ds) == 8
    bad = [rec("w1", ["gray.png"], views=["PA", "LATERAL"])]
    cfg, _ = make_data(tmp_path, bad)
    with pytest.raises(DataError, match="field 'views' must be a list of 1 view names"):
        build_dataset(cfg, "train", train=False)


def test_unreadable_image_raises_or_is_skipped_in_workers(tmp_path):
    cfg, ann = make_data(tmp_path, GOOD + [rec("u1", ["broken.png"], labels=LABELS)])
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = build_dataset(cfg, "train", train=False)
    with pytest.raises(DataError) as e:
        ds[4]
    assert "broken.png" in str(e.value) and "'u1'" in str(e.value) and str(ann) in str(e.value)
    cfg, _ = make_data(
        tmp_path, GOOD + [rec("u1", ["broken.png"], labels=LABELS)], **{"data.skip_bad": True}
    )
    ds = build_dataset(cfg, "train", train=False)
    batches = list(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate))
    # replaced by the next readable sample (wrapping round): every batch keeps its size
    assert [len(b["id"]) for b in batches] == [2, 2, 1]
    assert [i for b in batches for i in b["id"]] == ["s1", "s2", "s3", "s4", "s1"]
    assert batches[-1]["index"].tolist() == [0]
    assert ds.bad_counts()["unreadable_image"] == 1                # seen by a worker, counted here
    assert "broken.png" in ds.bad_summary() and "'u1'" in ds.bad_summary()
    assert ds[4]["id"] == "s1" and ds.unreadable().tolist() == [False] * 4 + [True]


def test_a_split_without_a_readable_image_is_an_error(tmp_path):
    cfg, ann = make_data(tmp_path, [rec("u1", ["broken.png"])], **{"data.skip_bad": True})
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    ds = build_dataset(cfg, "train", train=False)
    with pytest.raises(DataError, match="no image of this split is readable"):
        ds[0]


def test_labels_from_rule_labeler(tmp_path):
    pytest.importorskip("metrics.clinical")
    from vocab.observations import OBSERVATION_INDEX as I
    records = [rec("p1", ["gray.png"], report="Moderate cardiomegaly. No pleural effusion."),
               rec("p2", ["gray.png"], report="There is a small left pleural effusion.")]
    cfg, _ = make_data(tmp_path, records)
    ds = build_dataset(cfg, "train", train=False)
    assert ds.labels[0, I["Cardiomegaly"]] == 1 and ds.labels[0, I["Pleural Effusion"]] == 0
    assert ds.labels[1, I["Pleural Effusion"]] == 1 and ds.labels[1, I["Cardiomegaly"]] == 0
