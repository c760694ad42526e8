"""Reports and overlays for raw image files, with a stand-in model and with a tiny SS-ACL."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.predict import predict_images, predict_images_from_config
from vocab.anatomy_graph import AnatomyGraph

GRAPH = AnatomyGraph.default()


class StandIn(torch.nn.Module):
    """Test double with SSACL's inference API: records its inputs, heatmap peaked on one leaf."""

    leaf_names = GRAPH.leaf_names

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
    rows = predict_images(
        model, files, transform, "cpu", tmp_path / "out", {"beam_size": 2}, batch_size=2
    )
    assert [r["id"] for r in rows] == ["cxr", "cxr_1", "rgb"]  # unique ids from file names
    assert [len(s[1]) for s in model.seen] == [2, 1] and model.seen[0][2] == {"beam_size": 2}
    assert not model.seen[0][3] and model.training  # eval during prediction, mode restored after
    assert torch.allclose(model.seen[0][0][1], transform(load_image(files[1])))
    for r in rows:
        saved = json.loads((tmp_path / "out" / f"{r['id']}.json").read_text())
        assert saved["entities"] == ["Cardiomegaly"] and saved["image_path"] == r["image_path"]
        # "heart"
        assert saved["sentences"][0]["anatomies"] == ["right atrium", "cavoatrial junction"]
        assert Image.open(tmp_path / "out" / saved["sentences"][0]["heatmap"]).size[0] == 64


def test_predict_images_with_a_tiny_ssacl(tmp_path):
    from datasets.tokenizer import train_bpe, train_wordpiece
    from models.ssacl import SSACL
    from utils.config import load_config
    cfg = load_config(None)
    cfg.data.image_size, cfg.data.eval_batch_size = 32, 2
    cfg.eval.update(beam_size=2, max_new_tokens=4)
    cfg.model.vit.update(patch_size=8, embed_dim=32, depth=1, num_heads=2)
    cfg.model.text.update(
        hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=200
    )
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


def test_unreadable_images_are_skipped_and_tiny_ones_warned_about(tmp_path):
    from datasets.cxr import build_transform
    files = _image_files(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(tmp_path / "dot.png")
    said = []
    rows = predict_images(StandIn(), [files[0], str(tmp_path / "broken.png"),
                                      str(tmp_path / "dot.png")],
                          build_transform(32, train=False), "cpu", tmp_path / "out",
                          batch_size=2, min_size=16, print_fn=said.append)
    assert [r["id"] for r in rows] == ["cxr", "dot"]
    assert said[0].startswith(f"WARNING: skipped {tmp_path / 'broken.png'}: cannot read the image")
    assert said[1] == (f"WARNING: {tmp_path / 'dot.png'} is 1x1 px, smaller than the model input "
                       "(16 px): it is upsampled and its report is unlikely to mean anything")
    assert len(said) == 2  # files[0] is 20 px wide: above 16
    with pytest.raises(ValueError, match="none of the 1 images could be read"):
        predict_images(StandIn(), [str(tmp_path / "broken.png")], build_transform(32, train=False),
                       "cpu", tmp_path / "out", print_fn=said.append)
