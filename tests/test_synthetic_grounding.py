"""Grounding against the synthetic generator's masks: leaf pointing, CNR, finding-level localisation."""
import numpy as np
import pytest
import torch
from PIL import Image

from metrics.synthetic_grounding import sentence_map, summarize_grounding, synthetic_grounding
from vocab.anatomy_graph import AnatomyGraph


def test_synthetic_grounding_by_hand(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    leaves = AnatomyGraph({"root": ("a", "b")}, root="root")
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


def test_finding_level_localisation_reads_the_map_of_the_finding_s_sentence(tmp_path):
    graph = AnatomyGraph.default()
    apex, base = graph.leaf_index["right apical zone"], graph.leaf_index["left lower lung zone"]
    heat = torch.zeros(1, graph.num_leaves, 8, 8)
    heat[0, apex, 1, 1] = 1.0  # the right apex's map peaks on the pneumothorax
    heat[0, base, 6, 6] = 1.0  # the left base's map peaks away from the effusion's mask
    ptx, eff = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
    ptx[:3, :3], eff[5:7, :2] = 255, 255
    Image.fromarray(ptx).save(tmp_path / "ptx.png")
    Image.fromarray(eff).save(tmp_path / "eff.png")
    rec = {"findings": [
        {"anatomy": "right apical zone", "mask": "ptx.png", "sentence": "Small right apical pneumothorax."},
        {"anatomy": "left lower lung zone", "mask": "eff.png", "sentence": "Left lower lobe atelectasis."},
        {"anatomy": "right apical zone", "mask": "ptx.png"}]}  # no sentence: not scored
    row = synthetic_grounding(heat, [rec], tmp_path, graph)[0]
    assert row["finding_pointing"] == [1.0, 0.0]
    assert row["finding_cnr"][0] > 0 and row["finding_cnr"][1] < 0
    summary = summarize_grounding([row])
    assert summary["finding_pointing_game"] == 0.5
    # a sentence naming no anatomy: the mean of every leaf's map
    np.testing.assert_allclose(sentence_map(heat[0].numpy(), "Stable.", graph), heat[0].numpy().mean(0))
