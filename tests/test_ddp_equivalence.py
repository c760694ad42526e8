"""Two CPU ranks (torchrun, gloo) take the same optimizer steps as one process with the same global
batch: the real SS-ACL with every loss (the contrastive and ACA losses gather across ranks)."""
import json

import torch

from tiny_run import synthetic, torchrun, python, write_config
from datasets.tokenizer import build_tokenizers
from datasets.reports import load_annotation
from utils.config import load_config


def test_two_ranks_match_one_process(tmp_path):
    ann = synthetic(tmp_path / "data", n=30)
    cfg_path = write_config(tmp_path / "cfg.yaml", ann, tmp_path / "out",
                            optim={"lr": 0.05, "warmup_epochs": 0.0, "epochs": 1, "clip_grad": 0.0},
                            data={"eval_batch_size": 2})
    cfg = load_config(cfg_path)
    build_tokenizers(cfg, [r["report"] for r in load_annotation(ann, "train")], tmp_path / "tok")
    sets = [f"model.text.tokenizer={tmp_path / 'tok' / 'text_tokenizer'}",
            f"model.decoder.tokenizer={tmp_path / 'tok' / 'decoder_tokenizer'}"]
    worker = "tests/ddp_worker.py"
    python(worker, "--config", cfg_path, "--out", tmp_path / "one.pt", "--set", *sets, "data.batch_size=8")
    torchrun(2, worker, "--config", cfg_path, "--out", tmp_path / "two.pt", "--eval-split", "test",
             "--set", *sets, "data.batch_size=4")

    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert one["stats"]["global_step"] == two["stats"]["global_step"] == 3  # 24 train studies / 8
    assert one["stats"]["samples"] == two["stats"]["samples"] == 24
    moved = 0
    for name, p1 in one["params"].items():
        p2 = two["params"][name]
        torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        moved += int(not torch.equal(p1, one["init"][name]))
    assert moved > 0.9 * len(one["params"])  # the steps changed the parameters
    assert one["params"]["location_prior"].any()  # estimated, identically on 1 and 2 ranks (compared above)
    for k in ("loss", "mae", "con", "region", "aca", "entity", "lm", "rest", "grad_norm"):
        assert abs(one["stats"][k] - two["stats"][k]) < 1e-4 * max(1.0, abs(one["stats"][k])), k

    # generation over the test split on two ranks: every study once (the sampler pads 3 -> 4)
    rows = [json.loads(line) for line in open(tmp_path / "eval_2" / "generated.jsonl")]
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(r["id"] for r in load_annotation(ann, "test")) and len(set(ids)) == len(ids)
