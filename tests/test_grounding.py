"""Grounding metrics against hand-computed values; boxes mapped like the image; the MS-CXR
loader."""
import json
import math

import numpy as np
import pytest
import torch

from metrics.grounding import (
    THRESHOLDS,
    aggregate,
    box_to_mask,
    cnr,
    dice,
    grounding_metrics,
    iou_at_thresholds,
    load_ms_cxr,
    mean_iou,
    normalize,
    pointing_game,
    transform_boxes,
    zhang_tolerance,
)

# 4x4 heatmap (values 0..15 / 15 after min-max) and a 2x2 mask in its bottom-right corner.
HEAT = np.arange(16, dtype=float).reshape(4, 4)
MASK = np.zeros((4, 4), bool)
MASK[2:, 2:] = True  # pixels 10, 11, 14, 15


def test_iou_at_thresholds_hand_computed():
    ious = iou_at_thresholds(HEAT, MASK, thresholds=[0.5, 0.65, 0.9, 1.0])
    # >= 0.5 (value >= 7.5): 8..15 -> 8 px, overlap 4 -> 4/8; >= 0.65 (9.75): 10..15 -> 6 px -> 4/6
    # >= 0.9 (13.5): 14, 15 -> 2/4; >= 1.0: only 15 -> 1/4
    assert ious == pytest.approx([0.5, 4 / 6, 0.5, 0.25])
    default = iou_at_thresholds(HEAT, MASK)
    assert len(default) == 9 and THRESHOLDS[0] == 0.1 and THRESHOLDS[-1] == 0.9
    assert mean_iou(HEAT, MASK) == pytest.approx(default.mean())
    # min-max normalisation: an affine change of the heatmap changes nothing; torch input works
    assert iou_at_thresholds(torch.tensor(HEAT * 3 + 7), torch.tensor(MASK)) == pytest.approx(
        default
    )
    assert np.isnan(iou_at_thresholds(HEAT, np.zeros((4, 4), bool))).all()  # no region: undefined
    assert normalize(np.ones((3, 3))).max() == 0  # a flat map selects nothing


def test_cnr_hand_computed():
    heat = np.array([[2.0, 4.0], [0.0, 2.0]])
    mask = np.array([[True, True], [False, False]])
    # inside 2, 4: mean 3 var 1; outside 0, 2: mean 1 var 1 -> |3 - 1| / sqrt(2)
    assert cnr(heat, mask) == pytest.approx(2 / math.sqrt(2))
    assert cnr(heat, mask, signed=True) == pytest.approx(2 / math.sqrt(2))
    assert cnr(heat, ~mask, signed=True) == pytest.approx(-2 / math.sqrt(2))  # looks away: negative
    assert cnr(heat, ~mask) == pytest.approx(2 / math.sqrt(2))  # the absolute version cannot tell
    assert cnr(heat * 10 - 3, mask) == pytest.approx(cnr(heat, mask))  # scale-free
    assert cnr(np.ones((2, 2)), mask) == 0.0
    assert math.isnan(cnr(heat, np.ones((2, 2), bool)))  # nothing outside


def test_pointing_game():
    assert pointing_game(HEAT, MASK) == 1.0  # max (15) is inside
    assert pointing_game(-HEAT, MASK) == 0.0  # max (0) at the top-left
    assert pointing_game(np.ones((4, 4)), MASK) == pytest.approx(4 / 16)  # flat: chance, not a hit
    assert math.isnan(pointing_game(HEAT, np.zeros((4, 4), bool)))
    # tolerance: the peak at the top-left (0, 0) is sqrt(8) = 2.83 px from the mask's corner (2, 2)
    assert pointing_game(-HEAT, MASK, tolerance=2.8) == 0.0
    assert pointing_game(-HEAT, MASK, tolerance=2.9) == 1.0
    assert zhang_tolerance(224) == 15.0 and zhang_tolerance(64) == pytest.approx(15 * 64 / 224)


def test_dice():
    # >= 0.5 selects 8 px (8..15), mask 4 px, overlap 4 -> 2*4 / (8 + 4)
    assert dice(HEAT, MASK) == pytest.approx(8 / 12)
    assert dice(MASK.astype(float), MASK) == 1.0
    assert dice(HEAT, MASK, threshold=1.0) == pytest.approx(2 * 1 / (1 + 4))


def test_grounding_metrics_and_aggregate():
    m = grounding_metrics(HEAT, MASK)
    assert (
        m["iou@0.5"] == pytest.approx(0.5)
        and m["pointing_game"] == 1.0
        and m["dice"] == pytest.approx(8 / 12)
    )
    assert m["miou"] == pytest.approx(np.mean([m[f"iou@{t:g}"] for t in THRESHOLDS]))
    agg = aggregate([{"cnr": 1.0, "pointing_game": 1.0}, {"cnr": 3.0, "pointing_game": math.nan},
                     {"cnr": math.inf, "pointing_game": 0.0}])
    assert agg == {"n": 3, "cnr": 2.0, "pointing_game": 0.5}
    with pytest.raises(ValueError):
        iou_at_thresholds(np.zeros((4, 4)), np.zeros((3, 4), bool))


def test_box_mapping_hand_computed():
    # original 200 (h) x 100 (w); box x=10, y=20, w=30, h=40
    box = [10, 20, 30, 40]
    # resize to 100x100: x * 1, y * 0.5
    assert transform_boxes(box, (200, 100), 100, "resize")[0] == pytest.approx([10, 10, 40, 30])
    m = box_to_mask(box, (200, 100), 100, "resize")
    assert m.sum() == 30 * 20 and m[10, 10] and m[29, 39] and not m[30, 39] and not m[29, 40]
    # center_crop 50: shorter side (w) -> 50, h -> 100 (scale 0.5), crop offset top 25
    assert transform_boxes(box, (200, 100), 50, "center_crop")[0] == pytest.approx([5, -15, 20, 5])
    m = box_to_mask(box, (200, 100), 50, "center_crop")  # rows clipped at the top of the crop
    assert m.sum() == 15 * 5 and m[0, 5] and m[4, 19] and not m[5, 19] and not m[0, 20]
    # pad 50: longer side (h) -> 50 (scale 0.25), w -> 25, centred: left offset 12
    assert transform_boxes(box, (200, 100), 50, "pad")[0] == pytest.approx([14.5, 5, 22, 15])
    with pytest.raises(ValueError):
        transform_boxes(box, (200, 100), 50, "stretch")


@pytest.mark.parametrize("mode", ["resize", "center_crop"])
def test_box_follows_the_image_transform(mode):
    """A white box drawn into the image lands where the mapped box mask says, after torchvision's
    transform."""
    from torchvision.transforms import v2
    H, W, size, box = 300, 240, 64, [37, 81, 90, 55]
    img = torch.zeros(1, H, W)
    img[:, box[1]:box[1] + box[3], box[0]:box[0] + box[2]] = 1.0
    tf = v2.Resize((size, size), antialias=True) if mode == "resize" else \
        v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    seen = tf(img)[0].numpy() > 0.5
    mapped = box_to_mask(box, (H, W), size, mode)
    inter, union = (seen & mapped).sum(), (seen | mapped).sum()
    assert inter / union > 0.9


def test_load_ms_cxr(tmp_path):
    coco = {
        "images": [
            {
                "id": 1,
                "file_name": "files/p10/s1/abc.jpg",
                "path": "files/p10/s1/abc.jpg",
                "width": 2544,
                "height": 3056,
            },
            {
                "id": 2,
                "file_name": "files/p11/s2/def.jpg",
                "path": "files/p11/s2/def.jpg",
                "width": 2000,
                "height": 2000,
            },
        ],
        "categories": [{"id": 1, "name": "Pneumonia"}, {"id": 2, "name": "Pleural effusion"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 20, 30, 40],
                "label_text": "bilateral pneumonia",
            },
            {
                "id": 2,
                "image_id": 2,
                "category_id": 2,
                "bbox": [5, 5, 10, 10],
                "label_text": "left effusion",
            },
            {
                "id": 3,
                "image_id": 1,
                "category_id": 1,
                "bbox": [100, 200, 30, 40],
                "label_text": "bilateral pneumonia",
            },
            {
                "id": 4,
                "image_id": 1,
                "category_id": 1,
                "bbox": [1, 2, 3, 4],
                "label_text": "right lower pneumonia",
            },
        ],
    }
    path = tmp_path / "ms_cxr.json"
    path.write_text(json.dumps(coco))
    entries = load_ms_cxr(str(path))
    assert len(entries) == 3  # the two boxes of "bilateral pneumonia" merge into one phrase
    first = entries[0]
    assert first["dicom_id"] == "abc" and first["category"] == "Pneumonia"
    assert first["label_text"] == "bilateral pneumonia" and first["boxes"] == [
        [10, 20, 30, 40],
        [100, 200, 30, 40],
    ]
    assert (first["height"], first["width"]) == (3056, 2544)
    assert [e["label_text"] for e in entries[1:]] == ["left effusion", "right lower pneumonia"]
    mask = box_to_mask(first["boxes"], (first["height"], first["width"]), 224)
    assert mask.any() and mask.shape == (224, 224)
