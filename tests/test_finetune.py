"""Downstream fine-tuning (main_finetune.py, engine/finetune.py, models/downstream.py) on tiny
in-memory data sets: a short run lowers the loss and picks its best on val, --eval writes the test
metrics; a linear probe leaves the encoder as it was and full fine-tuning changes it; an SS-ACL
checkpoint's ViT and an MAE state_dict load into the classifier (equal tensors), unmapped keys are
errors; a run resumed after its first epoch ends where the uninterrupted one does."""
import builtins
import json
import sys

import pytest
import torch
from torch.utils.data import Dataset

import main_finetune
from datasets.downstream import TASKS, build_downstream, collate_downstream
from datasets.synthetic_downstream import generate_downstream
from datasets.tokenizer import train_bpe, train_wordpiece
from engine import finetune as ft
from engine.optim import build_optimizer
from models.downstream import Classifier, Segmenter, build_model, build_vit, from_pretrained
from models.ssacl import SSACL
from tests.helpers import TORCHRUN_ENV, torchrun
from utils.checkpoint import read_checkpoint, save_checkpoint
from utils.config import load_config
from vocab.anatomy_graph import AnatomyGraph

SIZE = 32
SPLITS = {"train": (64, 1), "val": (48, 2), "test": (48, 3)}


class FakeDownstream(Dataset):
    """Learnable: label 0 = a bright left half, label 1 = a bright top half; the mask = a bright
    square."""

    def __init__(self, n, seed, segmentation):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, SIZE, SIZE, generator=g) * 0.5
        self.labels = (torch.rand(n, 2, generator=g) < 0.5).float()
        self.masks = torch.zeros(n, 1, SIZE, SIZE)
        self.segmentation, self.label_names = segmentation, ["left", "top"]
        for i in range(n):
            if segmentation:
                y, x = torch.randint(0, SIZE - 12, (2,), generator=g).tolist()
                self.masks[i, :, y:y + 12, x:x + 12] = 1
            else:
                self.images[i, :, :, : SIZE // 2] += self.labels[i, 0]
                self.images[i, :, : SIZE // 2] += self.labels[i, 1]
        self.images += 1.5 * self.masks

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        item = {"image": self.images[i], "id": f"s{i}"}
        item.update({"mask": self.masks[i]} if self.segmentation else {"labels": self.labels[i]})
        return item


def fake_build(task, root, split, image_size, *, train=False, fraction=1.0, split_file=None, seed=0):
    if not task.startswith("fake"):
        return build_downstream(task, root, split, image_size, train=train, fraction=fraction,
                                split_file=split_file, seed=seed)
    n, s = SPLITS[split]
    return FakeDownstream(max(8, int(n * fraction)), s, task == "fake_seg")


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    monkeypatch.setattr(ft, "build_downstream", fake_build)
    monkeypatch.setattr(ft, "TASKS", ("fake_cls", "fake_seg", *TASKS))
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(builtins, "print", builtins.print)  # setup_print replaces it
    yield
    for name in ("stdout", "stderr"):  # undo setup_logging's tee
        stream = getattr(sys, name)
        setattr(sys, name, getattr(stream, "stream", stream))


TINY_VIT = ["model.vit.patch_size=8", "model.vit.embed_dim=32", "model.vit.depth=1",
            "model.vit.num_heads=2", "model.vit.mlp_ratio=2.0", "model.vit.stem=patch"]


def config(tmp_path, *sets, task="fake_cls"):
    return load_config(overrides=[
        f"output_dir={tmp_path}", "run_name=run", "device=cpu", f"data.image_size={SIZE}",
        "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=0", *TINY_VIT,
        f"finetune.task={task}", "finetune.optimizer=adamw", "optim.lr=3e-3", "optim.min_lr=0",
        "optim.weight_decay=0", "optim.epochs=3", "optim.warmup_epochs=0.5", "train.print_freq=100",
        "train.save_every=0", "train.best_metric=val/auroc", "train.best_mode=max", *sets])


def rows(run_dir):
    return [json.loads(line) for line in open(run_dir / "log_stats.jsonl")]


def test_short_finetune_lowers_the_loss_then_eval_scores_test(tmp_path):
    cfg = config(tmp_path)
    main_finetune.train(cfg)
    run = tmp_path / "run"
    stats = rows(run)
    assert stats[-1]["train/loss"] < stats[0]["train/loss"]
    assert stats[-1]["val/loss"] < stats[0]["val/loss"] and stats[-1]["val/auroc"] > 0.8
    assert {"val/auroc/left", "val/f1/top", "val/threshold/left"} <= set(stats[0])
    for name in ("config.yaml", "log.txt", "checkpoint-last.pth", "checkpoint-best.pth"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    best = read_checkpoint(run / "checkpoint-best.pth", required=("model", "config"))
    assert best["extra"]["best"] == max(r["val/auroc"] for r in stats)

    metrics = main_finetune.evaluate(config(tmp_path), run / "checkpoint-best.pth")
    saved = json.loads((run / "eval_test" / "metrics.json").read_text())
    assert saved["split"] == "test" and saved["thresholds_from"] == "val"
    assert saved["metrics"]["auroc"] == pytest.approx(metrics["auroc"]) and metrics["n"] == 48
    assert metrics["threshold/left"] == saved["val"]["threshold/left"]  # chosen on val, not test


def test_segmentation_run_reports_dice_and_iou(tmp_path):
    cfg = config(tmp_path, "train.best_metric=val/dice", "finetune.decoder_dim=16", task="fake_seg")
    main_finetune.train(cfg)
    stats = rows(tmp_path / "run")
    assert stats[-1]["train/loss"] < stats[0]["train/loss"]
    assert 0 <= stats[-1]["val/iou"] <= stats[-1]["val/dice"] <= 1
    assert stats[-1]["val/dice"] > 0.3


def _steps(model, cfg, n=3):
    model.train()
    info = type("I", (), {"world_size": 1, "device": torch.device("cpu")})()
    opt, _ = build_optimizer(cfg, model, info, cfg.finetune.optimizer, cfg.finetune.momentum)
    data = FakeDownstream(8, 0, isinstance(model, Segmenter))
    batch = collate_downstream([data[i] | {"index": i} for i in range(8)])
    for _ in range(n):
        model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("segmentation", [False, True])
def test_linear_probe_freezes_the_encoder_full_finetuning_does_not(tmp_path, segmentation):
    for mode in ("linear_probe", "full"):
        cfg = config(tmp_path, f"finetune.mode={mode}", "finetune.decoder_dim=16")
        torch.manual_seed(0)
        model = build_model(cfg, 2, segmentation)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = _steps(model, cfg)
        vit_same = all(torch.equal(before[k], v) for k, v in model.state_dict().items()
                       if k.startswith("vit."))
        head_same = all(torch.equal(before[k], v) for k, v in model.state_dict().items()
                        if not k.startswith("vit."))
        trained = {id(p) for g in opt.param_groups for p in g["params"]}
        assert not head_same
        if mode == "linear_probe":
            assert vit_same and not any(id(p) in trained for p in model.vit.parameters())
            assert not model.vit.training  # kept in eval mode
        else:
            assert not vit_same


def _ssacl_checkpoint(tmp_path):
    texts = ["the heart is normal .", "small left pleural effusion ."] * 4
    toks = (train_wordpiece(texts + list(AnatomyGraph.default().leaf_names), 200),
            train_bpe(texts, 300))
    cfg = load_config(overrides=[
        "data.image_size=32", "model.vit.patch_size=8", "model.vit.embed_dim=48", "model.vit.depth=2",
        "model.vit.num_heads=2", "model.vit.stem=two_scale", "model.text.hidden_size=32",
        "model.text.num_layers=1", "model.text.num_heads=2", "model.text.intermediate_size=64",
        "model.mae.decoder_dim=32", "model.mae.decoder_heads=2", "model.decoder.n_embd=32",
        "model.decoder.n_layer=1", "model.decoder.n_head=2"])
    model = SSACL.from_config(cfg, *toks)
    path = save_checkpoint(tmp_path / "ssacl.pth", model=model, epoch=1, step=5, cfg=cfg)
    return path, model


def test_ssacl_checkpoint_vit_loads_into_the_classifier(tmp_path):
    path, source = _ssacl_checkpoint(tmp_path)
    cfg = config(tmp_path, "data.image_size=48")  # another resolution: the position table is rebuilt
    model = from_pretrained(path, cfg, 2, segmentation=False)
    assert isinstance(model, Classifier) and cfg.model.vit.embed_dim == 48  # the checkpoint's sizes
    own = model.vit.state_dict()
    for k, v in source.vit.state_dict().items():
        if k.startswith("local_embed."):
            continue
        torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)
    assert model.vit.grid == (6, 6) and model.logits(torch.randn(2, 1, 48, 48)).shape == (2, 2)


def test_mae_state_dict_loads_and_unmapped_keys_are_errors(tmp_path):
    cfg = config(tmp_path)
    vit = build_vit(cfg.model.vit, SIZE)
    state = {f"module.{k}": v for k, v in vit.state_dict().items()}
    state.update({"decoder_embed.weight": torch.zeros(2, 2), "mask_token": torch.zeros(1, 1, 32),
                  "pos_embed": torch.zeros(1, 17, 32)})
    torch.save({"model": state}, tmp_path / "mae.pth")
    model = from_pretrained(tmp_path / "mae.pth", config(tmp_path), 2, segmentation=True)
    torch.testing.assert_close(model.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)

    state["head.weight"] = torch.zeros(1000, 32)  # a fine-tuned MAE: a key that maps nowhere
    del state["module.norm.weight"]
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad.pth.*missing \['norm.weight'\].*head.weight"):
        from_pretrained(tmp_path / "bad.pth", config(tmp_path), 2, segmentation=False)
    from_pretrained(tmp_path / "bad.pth", config(tmp_path, "train.allow_partial=true"), 2, False)


def test_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path, monkeypatch):
    main_finetune.train(config(tmp_path, "optim.epochs=2", "run_name=full"))
    evaluate = ft.evaluate

    def fail_once(*a, **k):  # the first validation dies (after epoch 0's checkpoint is written)
        monkeypatch.setattr(ft, "evaluate", evaluate)
        raise RuntimeError("killed")

    monkeypatch.setattr(ft, "evaluate", fail_once)
    with pytest.raises(RuntimeError, match="killed"):
        main_finetune.train(config(tmp_path, "optim.epochs=2", "run_name=cut"))
    main_finetune.train(config(tmp_path, "optim.epochs=2", "run_name=cut", "train.resume=auto"))
    full = read_checkpoint(tmp_path / "full" / "checkpoint-last.pth")
    cut = read_checkpoint(tmp_path / "cut" / "checkpoint-last.pth")
    assert full["step"] == cut["step"] == 16
    for k, v in full["model"].items():
        torch.testing.assert_close(cut["model"][k], v, msg=k)


def test_two_ranks_train_and_score_as_one_process(tmp_path):
    """torchrun with two CPU ranks fine-tunes (DDP, linear probe); its validation, whose shards the
    sampler pads (15 images), equals one process's --eval of that split."""
    folder = generate_downstream(tmp_path / "data", size=SIZE, counts={"nih": (24, 15, 15)},
                                 tasks=("nih",))["nih"]
    sets = [f"output_dir={tmp_path}", "device=cpu", f"data.image_size={SIZE}", "data.batch_size=4",
            "data.eval_batch_size=4", "data.num_workers=0", *TINY_VIT, f"finetune.root={folder}",
            "finetune.mode=linear_probe", "optim.epochs=1", "train.best_metric=val/auroc",
            "train.best_mode=max", "train.save_every=0"]
    torchrun(2, "main_finetune.py", "--set", *sets, "run_name=ddp")
    ckpt = tmp_path / "ddp" / "checkpoint-best.pth"
    assert read_checkpoint(ckpt)["extra"]["world_size"] == 2
    two = {k.removeprefix("val/"): v for k, v in rows(tmp_path / "ddp")[0].items()
           if k.startswith("val/")}
    one = main_finetune.evaluate(load_config(overrides=[*sets, "run_name=one", "eval.split=val"]),
                                 ckpt)
    assert one["n"] == two["n"] == 15 and set(one) == set(two)
    for k, v in one.items():
        assert two[k] == pytest.approx(v, abs=1e-6, nan_ok=True), k
