"""metrics/segmentation.py: Dice and IoU of known masks, pooled and per image (both empty = 1),
and the Dice of the images with a finding; counts of shards merge exactly."""
import numpy as np
import pytest
import torch

from metrics.segmentation import dice_iou, mask_counts


def masks():
    pred = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    true = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    pred[0, 0, :2, :2] = True          # 4 pixels
    true[0, 0, :2, :3] = True          # 6 pixels, 4 shared: dice 8/10, iou 4/6
    pred[1, 0, 0, 0] = True            # a false positive on an empty image: dice 0, iou 0
    return pred, true                  # image 2: both empty: dice 1, iou 1


def test_known_values():
    counts = mask_counts(*masks())
    assert counts.tolist() == [[4, 4, 6], [0, 1, 0], [0, 0, 0]]
    m = dice_iou(counts)
    assert m["dice"] == pytest.approx(8 / 11) and m["iou"] == pytest.approx(4 / 7)
    assert m["dice_mean"] == pytest.approx((0.8 + 0 + 1) / 3)
    assert m["iou_mean"] == pytest.approx((4 / 6 + 0 + 1) / 3)
    assert m["dice_positive"] == pytest.approx(0.8) and m["n"] == 3


def test_shards_merge_exactly_and_perfect_is_one():
    pred, true = masks()
    whole = dice_iou(mask_counts(pred, true))
    parts = np.concatenate([mask_counts(pred[:1], true[:1]), mask_counts(pred[1:], true[1:])])
    assert dice_iou(parts) == whole
    perfect = dice_iou(mask_counts(true, true))
    assert perfect["dice"] == perfect["iou"] == perfect["dice_mean"] == 1.0
    assert np.isnan(dice_iou(mask_counts(pred[1:], true[1:]))["dice_positive"])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        mask_counts(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
