
import numpy as np
import pytest
import torch
from PIL import Image

from metrics.synthetic_grounding import summarize_grounding, synthetic_grounding


def test_synthetic_grounding_by_hand(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    leaves = ["a", "b"]
    heat = torch.zeros(1, 2, 8, 8)
    heat[0, 0, 3, 3] = 1.0            # leaf a peaks inside its region
    heat[0, 1, 7, 7] = 1.0            # leaf b peaks outside
    heat[0, 1, 2:4, 2:4] = 0.5
    corner = np.zeros((8, 8), np.uint8)
    corner[6:, :2] = 255
    Image.fromarray(corner).save(tmp_path / "corner.png")
    rec = {"regions": {"a": "m.png", "b": "m.png", "unknown": "m.png"},
           "findings": [{"anatomy": "b", "mask": "m.png"}, {"anatomy": "a", "mask": "corner.png"}]}
    rows = synthetic_grounding(heat, [rec], tmp_path, leaves)
    assert rows[0]["pointing"] == {"a": 1.0, "b": 0.0}
    assert rows[0]["pointing_findings"] == [0.0, 1.0]          # the leaves of finding b, finding a
    # CNR of leaf b over the mask: inside all 0.5 (var 0); outside 60 values, one 1.0, rest 0
    out = np.zeros(60)
    out[0] = 1.0
    cnr_b = (0.5 - out.mean()) / np.sqrt(out.var())
    # leaf a over the corner: inside all 0 (var 0), outside 60 values, one 1.0: the map avoids it
    cnr_a = -(out.mean()) / np.sqrt(out.var())
    assert rows[0]["cnr"] == [pytest.approx(cnr_b), pytest.approx(cnr_a)] and cnr_a < 0
    # b's peak is 5.7 px away; tolerance 15*8/224
    assert rows[0]["pointing_tol"] == {"a": 1.0, "b": 0.0}
    summary = summarize_grounding(rows + [{"pointing": {"a": 0.0}}])
    assert summary.pop("pointing_game_by_leaf") == pytest.approx({"a": 0.5, "b": 0.0})
    assert summary == pytest.approx(
        {
            "pointing_game": 1 / 3,
            "pointing_game_tol15": 0.5,
            "pointing_game_findings": 0.5,
            "cnr": (cnr_a + cnr_b) / 2,
        }
    )
    # masks are resized (nearest) to the heatmap
    small = torch.zeros(1, 2, 4, 4)
    small[0, 0, 1, 1] = 1.0  # the 4x4 mask (nearest) is True at [1, 1] only
    assert synthetic_grounding(small, [rec], tmp_path, leaves)[0]["pointing"]["a"] == 1.0
    small[0, 0, 1, 1], small[0, 0, 2, 2] = 0.0, 1.0
    assert synthetic_grounding(small, [rec], tmp_path, leaves)[0]["pointing"]["a"] == 0.0
