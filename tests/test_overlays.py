import json

import numpy as np
import torch
from PIL import Image

from engine.overlays import MEAN, STD, denormalize, jet, write_overlay_batch, write_overlays
from vocab.anatomy_graph import AnatomyGraph

GRAPH = AnatomyGraph.default()
H, W = 40, 48


def test_jet_colormap_hand_values():
    assert jet(0.0).tolist() == [0, 0, 128]       # dark blue
    assert jet(0.5).tolist() == [128, 255, 128]
    assert jet(1.0).tolist() == [128, 0, 0]       # dark red
    assert jet(np.array([[2.0, -1.0]])).tolist() == [[[128, 0, 0], [0, 0, 128]]]  # clipped


def test_denormalize_inverts_the_dataset_normalisation():
    gray = torch.rand(H, W)
    x = ((gray - MEAN) / STD).expand(3, -1, -1)
    assert np.allclose(denormalize(x), gray.numpy(), atol=1e-6)


def _study():
    image = np.tile(np.linspace(0, 1, W, dtype=np.float32), (H, 1))
    heat = torch.zeros(25, H, W)
    # patient's left = image's right
    heat[GRAPH.leaf_index["left costophrenic angle"], 30:, 36:] = 1.0
    heat[GRAPH.leaf_index["spine"], :, 20:28] = 1.0
    report = "small effusion at the left costophrenic angle . no pneumothorax ."
    return image, heat, report


def test_write_overlays_files_json_and_pixels(tmp_path):
    image, heat, report = _study()
    out = write_overlays(
        tmp_path,
        "p10/s5",
        image,
        report,
        ["Pleural Effusion"],
        ["spine"],
        heat,
        GRAPH,
        extra={"reference": "ref"},
    )
    summary = json.loads((tmp_path / "p10_s5.json").read_text())
    assert summary == {
        "id": "p10/s5",
        "report": report,
        "entities": ["Pleural Effusion"],
        "anatomies": ["spine"],
        "sentences": [
            {
                "text": "small effusion at the left costophrenic angle",
                "anatomies": ["left costophrenic angle"],
                "heatmap": "p10_s5_s00.png",
            },
            {"text": "no pneumothorax", "anatomies": [], "heatmap": "p10_s5_s01.png"},
        ],
        "reference": "ref",
    }
    assert out["overlays"] == [str(tmp_path / "p10_s5_s00.png"), str(tmp_path / "p10_s5_s01.png")]
    first = np.asarray(Image.open(tmp_path / "p10_s5_s00.png").convert("RGB")).astype(int)
    assert first.shape[1] == 2 * W and first.shape[0] > H  # [image | overlay] + caption
    assert np.abs(first[:H, :W, 0] - (image * 255).round()).max() <= 1  # left: the image itself
    right = first[:H, W:]
    assert right[35, 44, 0] > right[35, 44, 2] + 40    # hot region: red over blue
    assert right[5, 5, 2] > right[5, 5, 0] + 20         # cold region: blue
    assert (first[H + 2:, :, :] < 128).any()            # caption text drawn
    # the sentence naming no anatomy shows the predicted anatomies (spine)
    second = np.asarray(Image.open(tmp_path / "p10_s5_s01.png").convert("RGB")).astype(int)[:H, W:]
    assert second[20, 24, 0] > second[20, 24, 2] + 40 and second[35, 44, 2] > second[35, 44, 0]


def test_overlays_accept_tensor_images_and_small_heatmaps(tmp_path):
    _, heat, _ = _study()
    image = torch.rand(3, H, W) * 5 - 2  # any range: min-max scaled for display
    small = torch.nn.functional.interpolate(heat[None], size=(10, 12), mode="bilinear")[0]
    out = write_overlays(tmp_path, "x", image, "", [], [], small, GRAPH)
    assert [s["text"] for s in out["sentences"]] == ["(empty report)"]
    assert Image.open(out["overlays"][0]).size[0] == 2 * W


def test_write_overlay_batch_from_evaluation_rows(tmp_path):
    image, heat, report = _study()
    x = ((torch.from_numpy(image) - MEAN) / STD).expand(3, -1, -1)
    rows = [
        {"id": "a", "generated": report, "reference": "gt", "entities": [], "anatomies": ["spine"]},
        {
            "id": "b",
            "generated": "heart normal .",
            "reference": "gt2",
            "entities": [],
            "anatomies": [],
        },
    ]
    paths = write_overlay_batch(
        tmp_path, [(x, heat, rows[0]), (x, heat, rows[1])], list(GRAPH.leaf_names)
    )
    assert [p.split("/")[-1] for p in paths] == ["a_s00.png", "a_s01.png", "b_s00.png"]
    assert json.loads((tmp_path / "b.json").read_text())["reference"] == "gt2"








