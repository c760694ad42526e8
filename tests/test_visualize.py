import json

import numpy as np
import torch
from PIL import Image

from models.anatomy_graph import AnatomyGraph
from utils.visualize import (MEAN, STD, denormalize, jet, predict_images, predict_images_from_config,
                             write_overlay_batch, write_overlays)

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
    heat[GRAPH.leaf_index["left costophrenic angle"], 30:, 36:] = 1.0  # patient's left = image's right
    heat[GRAPH.leaf_index["spine"], :, 20:28] = 1.0
    report = "small effusion at the left costophrenic angle . no pneumothorax ."
    return image, heat, report


def test_write_overlays_files_json_and_pixels(tmp_path):
    image, heat, report = _study()
    out = write_overlays(tmp_path, "p10/s5", image, report, ["Pleural Effusion"], ["spine"], heat, GRAPH,
                         extra={"reference": "ref"})
    summary = json.loads((tmp_path / "p10_s5.json").read_text())
    assert summary == {"id": "p10/s5", "report": report, "entities": ["Pleural Effusion"], "anatomies": ["spine"],
                       "sentences": [{"text": "small effusion at the left costophrenic angle",
                                      "anatomies": ["left costophrenic angle"], "heatmap": "p10_s5_s00.png"},
                                     {"text": "no pneumothorax", "anatomies": [], "heatmap": "p10_s5_s01.png"}],
                       "reference": "ref"}
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
    rows = [{"id": "a", "generated": report, "reference": "gt", "entities": [], "anatomies": ["spine"]},
            {"id": "b", "generated": "heart normal .", "reference": "gt2", "entities": [], "anatomies": []}]
    paths = write_overlay_batch(tmp_path, [(x, heat, rows[0]), (x, heat, rows[1])], list(GRAPH.leaf_names))
    assert [p.split("/")[-1] for p in paths] == ["a_s00.png", "a_s01.png", "b_s00.png"]
    assert json.loads((tmp_path / "b.json").read_text())["reference"] == "gt2"


class StandIn(torch.nn.Module):
    """Test double with SSACL's inference API: records its inputs, heatmap peaked on one leaf."""

    graph = GRAPH

    def __init__(self):
        super().__init__()
        self.seen = []

    def generate(self, batch, **kw):
        assert set(batch) == {"image", "id"}  # nothing but the image (and its id) reaches the model
        self.seen.append((batch["image"].clone(), list(batch["id"]), kw, self.training))
        return [{"id": i, "report": "the heart is enlarged .", "entities": ["Cardiomegaly"],
                 "anatomies": ["right atrium"]} for i in batch["id"]]

    def heatmaps(self, images):
        maps = torch.zeros(images.shape[0], 25, *images.shape[-2:])
        maps[:, GRAPH.leaf_index["right atrium"], :8, :8] = 1.0
        return maps


def _image_files(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    paths = [tmp_path / "d1" / "cxr.png", tmp_path / "d2" / "cxr.png", tmp_path / "rgb.jpg"]
    Image.fromarray(rng.integers(0, 255, (30, 20), dtype=np.uint8)).save(paths[0])        # L
    Image.fromarray(rng.integers(0, 65535, (24, 24), dtype=np.uint16)).save(paths[1])     # 16-bit
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(paths[2])     # RGB
    return [str(p) for p in paths]


def test_predict_images_with_a_stand_in_model(tmp_path):
    from datasets.cxr import build_transform, load_image
    files = _image_files(tmp_path)
    model = StandIn().train()
    transform = build_transform(32, train=False)
    rows = predict_images(model, files, transform, "cpu", tmp_path / "out", {"beam_size": 2}, batch_size=2)
    assert [r["id"] for r in rows] == ["cxr", "cxr_1", "rgb"]  # unique ids from file names
    assert [len(s[1]) for s in model.seen] == [2, 1] and model.seen[0][2] == {"beam_size": 2}
    assert not model.seen[0][3] and model.training  # eval during prediction, mode restored after
    assert torch.allclose(model.seen[0][0][1], transform(load_image(files[1])))
    for r in rows:
        saved = json.loads((tmp_path / "out" / f"{r['id']}.json").read_text())
        assert saved["entities"] == ["Cardiomegaly"] and saved["image_path"] == r["image_path"]
        assert saved["sentences"][0]["anatomies"] == ["right atrium", "cavoatrial junction"]  # "heart"
        assert Image.open(tmp_path / "out" / saved["sentences"][0]["heatmap"]).size[0] == 64


def test_predict_images_with_a_tiny_ssacl(tmp_path):
    from datasets.tokenizer import train_bpe, train_wordpiece
    from models.ssacl import SSACL
    from utils.config import load_config
    cfg = load_config(None)
    cfg.data.image_size, cfg.data.eval_batch_size = 32, 2
    cfg.eval.update(beam_size=2, max_new_tokens=4)
    cfg.model.vit.update(patch_size=8, embed_dim=32, depth=1, num_heads=2)
    cfg.model.text.update(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=200)
    for k in ("mae", "region"):
        cfg.model[k].update(decoder_dim=32, decoder_depth=1, decoder_heads=2)
    cfg.model.decoder.update(n_embd=32, n_layer=1, n_head=2, n_positions=256)
    texts = ["the heart is normal . no pleural effusion .", "Findings: cardiomegaly, edema, none."]
    torch.manual_seed(0)
    model = SSACL.from_config(cfg, train_wordpiece(texts, 200), train_bpe(texts, 300))
    rows = predict_images_from_config(model, _image_files(tmp_path), cfg, tmp_path / "out", "cpu")
    assert len(rows) == 3 and all(isinstance(r["report"], str) for r in rows)
    assert all((tmp_path / "out" / f"{r['id']}.json").exists() for r in rows)
    assert all(set(r["anatomies"]) <= set(GRAPH.leaf_names) and r["anatomies"] for r in rows)
