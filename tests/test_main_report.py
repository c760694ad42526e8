"""The two entry points end to end on tiny synthetic data, as a user runs them (fresh processes,
CPU): pretraining (with --init) -> report fine-tuning from it -> --eval on TEST (python and
torchrun) -> --predict."""
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets.tokenizer import tokenizer_files
from models.vit import VisionTransformer
from tests.helpers import TINY_MODEL, python, synthetic, torchrun, write_config


def tb_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    return set(tags["tensors"]) | set(tags["scalars"]) | set(tags["images"])


class Timer:
    def __init__(self):
        self.t = time.time()

    def lap(self, name):
        now = time.time()
        print(f"{name}: {now - self.t:.1f} s")
        self.t = now


def test_pretrain_finetune_eval_predict(tmp_path):
    timer = Timer()
    ann = synthetic(tmp_path / "data", n=30)  # 24 train, 3 val, 3 test
    test_ids = [r["id"] for r in json.load(open(ann))["test"]]
    out = tmp_path / "out"
    common = dict(optim={"epochs": 1, "warmup_epochs": 0.5}, eval={"meteor": False, "num_visualize": 2},
                  model={**TINY_MODEL, "location_prior": {"enabled": True}}, loss={"rest": {"weight": 1.0}})
    pre_cfg = write_config(tmp_path / "pre.yaml", ann, out, "pre", **common)
    rep_cfg = write_config(
        tmp_path / "rep.yaml",
        ann,
        out,
        "rep",
        base="demo_report.yaml",
        train={
            "pretrained": str(out / "pre" / "checkpoint-best.pth"),
            "eval_every": 1,
            "print_freq": 5,
        },
        **common,
    )

    # --- pretraining, encoder initialised from an MAE-style ViT checkpoint
    v = TINY_MODEL["vit"]
    vit = VisionTransformer(
        32, v["patch_size"], v["embed_dim"], v["depth"], v["num_heads"], v["mlp_ratio"]
    )
    torch.save(
        {"model": {**vit.state_dict(), "decoder_embed.weight": torch.zeros(2, 2)}},
        tmp_path / "mae.pth",
    )
    timer.lap("setup")
    res = python("main_pretrain.py", "--config", pre_cfg, "--init", tmp_path / "mae.pth")
    timer.lap("pretrain")
    assert "ViT init from" in res.stdout + res.stderr and "skipped" in res.stdout + res.stderr
    pre = out / "pre"
    for name in (
        "config.yaml",
        "log.txt",
        "log_stats.jsonl",
        "checkpoint-last.pth",
        "checkpoint-best.pth",
        "tokenizers/text_tokenizer/tokenizer.json",
        "tokenizers/decoder_tokenizer/tokenizer.json",
    ):
        assert (pre / name).is_file(), name
    stats = [json.loads(line) for line in open(pre / "log_stats.jsonl")]
    assert stats[-1]["train/global_step"] == 6 and np.isfinite(stats[-1]["val/loss"])
    tags = tb_tags(pre)
    for tag in (
        "train/loss",
        "train/mae",
        "train/con",
        "train/region",
        "train/aca",
        "train/lm",
        "train/entity",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
        "val/loss",
    ):
        assert tag in tags, tag
    ckpt = torch.load(pre / "checkpoint-best.pth", weights_only=True)
    # the demo config has it on
    assert "location prior: estimating from 24 training images" in res.stdout
    torch.testing.assert_close(ckpt["model"]["location_prior"].sum(1), torch.ones(25))
    assert ckpt["extra"]["tokenizers"] == {"text": "tokenizers/text_tokenizer",
                                           "decoder": "tokenizers/decoder_tokenizer"}
    # loaded, then moved by 6 small AdamW steps (a fresh init would be far off)
    init = vit.state_dict()
    for k in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight"):
        assert (ckpt["model"][f"vit.{k}"] - init[k]).abs().max() < 0.02, k

    # --- report fine-tuning from the pretraining checkpoint (lm + entity), best by val BLEU_4; the
    # tokenizers come from the checkpoint itself (the pretraining run's folder no longer has them)
    pre_tokenizers = tokenizer_files(pre)
    assert ckpt["extra"]["tokenizer_files"] == pre_tokenizers  # stored in every checkpoint
    shutil.rmtree(pre / "tokenizers")
    res = python("main_report.py", "--config", rep_cfg)
    timer.lap("finetune")
    assert "pretrained" in res.stdout and "loaded" in res.stdout
    assert "location prior: estimating" not in res.stdout  # it came with the pretraining checkpoint
    rep = out / "rep"
    assert tokenizer_files(rep) == pre_tokenizers
    shutil.rmtree(rep / "tokenizers")  # --eval and --predict read them from the checkpoint
    val = rep / "val" / "epoch_0000"
    assert (val / "generated.jsonl").is_file() and (val / "metrics.json").is_file()
    assert (rep / "checkpoint-best.pth").is_file()
    best = torch.load(rep / "checkpoint-best.pth", weights_only=True)
    # weights 0: not built
    assert not any(k.startswith(("mae_decoder", "region_decoder")) for k in best["model"])
    assert torch.equal(best["model"]["location_prior"], ckpt["model"]["location_prior"])
    # the pretrained text encoder was loaded (then fine-tuned a little)
    for k, p in ckpt["model"].items():
        if k.startswith("text_encoder.bert.embeddings.word_embeddings"):
            assert (best["model"][k] - p).abs().max() < 0.05
    tags = tb_tags(rep)
    assert {
        "val/BLEU_4",
        "val/ce_micro_f1_14",
        "val/pointing_game",
        "val/cnr",
        "train/lm",
        "train/entity",
    } <= tags
    assert any(t.startswith("val/overlay/") for t in tags) and any(
        t.startswith("val/report/") for t in tags
    )

    # --- evaluation on TEST, single process: the model's architecture and tokenizers come from the
    # checkpoint
    python(
        "main_report.py",
        "--config",
        rep_cfg,
        "--eval",
        "--checkpoint",
        rep / "checkpoint-best.pth",
        "--run-name",
        "eval1",
    )
    timer.lap("eval")
    ev = out / "eval1" / "eval_test"
    rows = [json.loads(line) for line in open(ev / "generated.jsonl")]
    assert sorted(r["id"] for r in rows) == sorted(test_ids)
    metrics = json.load(open(ev / "metrics.json"))
    assert {"BLEU_4", "ROUGE_L", "CIDEr", "ce_micro_f1_14", "pointing_game", "cnr"} <= set(metrics)
    # the location prior alone, beside the model
    assert 0.0 <= metrics["prior_pointing_game"] <= 1.0
    assert list((ev / "overlays").glob("*.png"))

    # --- the same under torchrun (2 ranks): each test study once, same reports (greedy decoding)
    torchrun(
        2,
        "main_report.py",
        "--config",
        rep_cfg,
        "--eval",
        "--checkpoint",
        rep / "checkpoint-best.pth",
        "--run-name",
        "eval2",
    )
    timer.lap("eval torchrun")
    rows2 = [json.loads(line) for line in open(out / "eval2" / "eval_test" / "generated.jsonl")]
    assert rows2 == rows

    # --- prediction for bare image files (no annotation at all: the data paths point nowhere)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(tmp_path / "data" / "images" / f"{test_ids[0]}.png", imgs / "a.png")
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(
        imgs / "b.jpg"
    )
    res = python(
        "main_report.py",
        "--config",
        rep_cfg,
        "--predict",
        imgs / "a.png",
        imgs / "b.jpg",
        "--checkpoint",
        rep / "checkpoint-best.pth",
        "--run-name",
        "pred",
        "--set",
        "data.annotation=/nonexistent/annotation.json",
        "data.image_root=/nonexistent",
    )
    timer.lap("predict")
    pred = out / "pred" / "predict"
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [r["id"] for r in lines] == ["a", "b"] and all(
        isinstance(r["report"], str) for r in lines
    )
    assert (pred / "a.json").is_file() and list(pred.glob("b_s*.png"))
