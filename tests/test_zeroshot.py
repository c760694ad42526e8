"""Zero-shot read-outs (models/embeddings.py), their figures (metrics/zeroshot.py) and
main_zeroshot.py end to end on fake downstream data (tests/helpers/zeroshot_worker.py): one process
and two gloo ranks agree, an MAE checkpoint is refused by name."""
import json
import math

import numpy as np
import pytest
import torch

import main_zeroshot
from datasets.cxr import build_dataset
from datasets.tokenizer import build_tokenizers
from engine.zeroshot import BUILTIN_PROMPTS, label_prompts
from metrics.zeroshot import classification_metrics, official_grounding, prompt_scores
from models.embeddings import (
    PHRASE_METHODS,
    encode_images,
    image_embeddings,
    phrase_maps,
    prior_phrase_maps,
    to_image,
)
from models.ssacl import SSACL
from tests.helpers import TINY_MODEL, synthetic, torchrun, write_config
from tests.helpers.zeroshot_worker import use_fakes
from utils.checkpoint import pack_files, save_checkpoint
from utils.config import load_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config path, checkpoint path, model) of a tiny SS-ACL with every loss of the demo."""
    root = tmp_path_factory.mktemp("zs")
    annotation = synthetic(root / "data", n=30, size=32)
    cfg_path = write_config(root / "cfg.yaml", annotation, root / "out",
                            model={**TINY_MODEL, "location_prior": {"enabled": True}},
                            zeroshot={"data_root": str(root / "fake"), "maps": ["leaves", "cls", "prior"]})
    cfg = load_config(cfg_path)
    reports = [s.report for s in build_dataset(cfg, "train", train=False).samples]
    toks = build_tokenizers(cfg, reports, root / "tok")
    torch.manual_seed(7)
    model = SSACL.from_config(cfg, *toks).eval()
    files = {k: pack_files(root / "tok" / f"{k}_tokenizer") for k in ("text", "decoder")}
    ckpt = save_checkpoint(root / "ckpt.pth", model=model, epoch=0, step=0, cfg=cfg,
                           extra={"tokenizer_files": files})
    return cfg_path, ckpt, model


def test_cls_copy_query_reads_as_cls(setup):
    model = setup[2]
    images = torch.randn(2, 3, 32, 32)
    leaves = model.leaf_queries()
    out = model.vit(images, torch.cat([leaves, model.vit.cls_token[0]]), return_attn=True)
    torch.testing.assert_close(out["queries"][:, -1], out["cls"], rtol=1e-5, atol=1e-5)
    enc = encode_images(model, images)
    assert enc["leaf_attn"].shape == (2, 25, 16) and enc["cls_attn"].shape == (2, 16)
    assert image_embeddings(model, encoded=enc).norm(dim=-1).allclose(torch.ones(2))


@pytest.mark.parametrize("method", PHRASE_METHODS)
def test_phrase_maps_depend_on_the_phrase(setup, method):
    model = setup[2]
    images = torch.randn(2, 3, 32, 32)
    a = phrase_maps(model, images, ["small right pleural effusion"] * 2, method)
    b = phrase_maps(model, images, ["the endotracheal tube terminates in the trachea"] * 2, method)
    assert a.shape == (2, 4, 4) and torch.isfinite(a).all()
    assert not torch.allclose(a, b)
    drawn = to_image(a, 32)
    assert drawn.shape == (2, 32, 32) and np.isfinite(drawn).all()


def test_prior_maps_follow_the_named_leaves(setup):
    model = setup[2]
    prior = torch.zeros(25, 16)
    prior[:, 0] = 1.0
    right = model.graph.leaf_index["right costophrenic angle"]
    prior[right] = 0.0
    prior[right, 15] = 1.0
    maps = prior_phrase_maps(model, ["right costophrenic angle", "nothing anatomical"], prior)
    assert maps[0].flatten().argmax() == 15 and maps[1].flatten().argmax() == 0


def test_scores_and_official_grounding_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos, neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    s = prompt_scores(z, pos, neg, scale=2.0)
    torch.testing.assert_close(s, torch.sigmoid(torch.tensor([[2.0], [-2.0]])))
    out = classification_metrics(s.numpy(), [[1], [0]], ["A"], [0.5])
    assert out["auroc_macro"] == 1.0 and out["f1/A"] == 1.0 and "top1_accuracy" not in out
    one_hot = classification_metrics([[0.9, 0.2], [0.6, 0.7]], [[1, 0], [1, 0]], ["A", "B"], [0.5, 0.5])
    assert one_hot["top1_accuracy"] == 0.5 and "auroc/A" not in one_hot  # A has one class only
    # ramp 0..9 over columns; box = the right half. In [-1, 1] the map is -1 + 2 c / 9: > 0.1 from
    # column 5 on (5 columns), > 0.3 from 6, > 0.5 from 7 (at 0.5 normalised: 0.75 * 9 = 6.75)
    heat = np.tile(np.arange(10.0), (10, 1))
    mask = np.zeros((10, 10), bool)
    mask[:, 5:] = True
    g = official_grounding(heat, mask)
    assert g["iou@0.1"] == pytest.approx(1.0) and g["iou@0.5"] == pytest.approx(3 / 5)
    assert g["pointing_game"] == 1.0 and g["cnr"] > 0
    assert math.isnan(official_grounding(heat, np.zeros((10, 10), bool))["miou"])


def test_prompts_from_config_table_and_template(setup):
    cfg = load_config(setup[0], ['zeroshot.prompts={Hernia: {pos: "hernia", neg: [no hernia]}}'])
    p = label_prompts(["Hernia", "Cardiomegaly", "Pleural_Thickening"], cfg.zeroshot)
    assert p["Hernia"] == (["hernia"], ["no hernia"])
    assert p["Cardiomegaly"] == BUILTIN_PROMPTS["cardiomegaly"]
    assert p["Pleural_Thickening"] == (["there is pleural thickening"], ["there is no pleural thickening"])
    bad = load_config(setup[0], ["zeroshot.prompts={Hernia: [a]}"])
    with pytest.raises(ValueError, match="zeroshot.prompts.Hernia"):
        label_prompts(["Hernia"], bad.zeroshot)


def _run(argv):
    use_fakes()
    return main_zeroshot.main(main_zeroshot.get_args_parser().parse_args(list(map(str, argv))))


def test_main_one_process_two_ranks_and_random_init(setup, tmp_path):
    cfg_path, ckpt, _ = setup
    out = tmp_path / "out"
    one = _run(["--config", cfg_path, "--checkpoint", ckpt, "--output-dir", out, "--run-name", "one"])
    for key, lo, hi in (("classification/nih/auroc_macro", 0, 1), ("classification/rsna/f1_macro", 0, 1),
                        ("classification/chexpert5x200/top1_accuracy", 0, 1),
                        ("retrieval/chexpert5x200/i2t/P@1", 0, 1), ("retrieval/chexpert5x200/t2i/R@10", 0, 1),
                        ("grounding/mscxr/text/miou", 0, 1), ("grounding/mscxr/cls/cnr", 0, 100),
                        ("grounding/mscxr/prior/pointing_game", 0, 1)):
        assert lo <= one[key] <= hi, key
    assert one["retrieval/chexpert5x200/num_pairs"] == 10 and one["grounding/mscxr/num_phrases"] == 10
    assert one["retrieval/chexpert5x200/t2i/R@10"] == 1.0  # 10 candidates
    assert one["grounding/mscxr/prior/source"].startswith("report-derived")
    written = json.loads((out / "one" / "zeroshot_test" / "metrics.json").read_text())
    assert written["model"] == str(ckpt)
    assert any(p.name.startswith("events") for p in (out / "one" / "tensorboard").iterdir())

    torchrun(2, "tests/helpers/zeroshot_worker.py", "--config", cfg_path, "--checkpoint", ckpt,
             "--output-dir", out, "--run-name", "two")
    two = json.loads((out / "two" / "zeroshot_test" / "metrics.json").read_text())
    for k, v in one.items():
        if isinstance(v, float) and math.isfinite(v):
            assert two[k] == pytest.approx(v, abs=1e-5), k

    rand = _run(["--config", cfg_path, "--checkpoint", ckpt, "--random-init", "--output-dir", out,
                 "--run-name", "one", "--tasks", "grounding"])
    assert (out / "one" / "zeroshot_test_random_init" / "metrics.json").is_file()
    assert not any(k.startswith("classification") for k in rand)
    assert rand["grounding/mscxr/text/miou"] != one["grounding/mscxr/text/miou"]

    lm = _run(["--config", cfg_path, "--checkpoint", ckpt, "--output-dir", out, "--run-name", "lm",
               "--tasks", "classification", "retrieval", "--set", "zeroshot.scorer=lm"])
    assert 0 <= lm["classification/nih/auroc_macro"] <= 1 and lm["retrieval/chexpert5x200/num_pairs"] == 10
    assert lm["classification/nih/auroc_macro"] != one["classification/nih/auroc_macro"]


def test_mae_checkpoint_is_refused_by_name(setup, tmp_path):
    mae = tmp_path / "mae.pth"
    torch.save({"model": setup[2].vit.state_dict()}, mae)
    with pytest.raises(ValueError, match=f"{mae}: not an SS-ACL checkpoint.*text encoder"):
        _run(["--config", setup[0], "--checkpoint", mae, "--output-dir", tmp_path])
