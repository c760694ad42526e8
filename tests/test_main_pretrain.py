"""A pretraining run killed (SIGKILL) mid-epoch and resumed with --resume auto ends at the same
global step as an uninterrupted run, and its losses continue the same curve."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datasets.annotation import load_annotation
from datasets.tokenizer import build_tokenizers
from tests.helpers import REPO, env, python, synthetic, write_config
from utils.config import load_config


def losses(run_dir: Path, newest_only: bool = False) -> dict[int, float]:
    """train/loss by global step from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(
        Path(run_dir, "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime
    )
    out = {}
    for f in files[-1:] if newest_only else files:
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.tag == "train/loss":
                    out[event.step] = (
                        v.tensor.float_val[0] if v.tensor.float_val else v.simple_value
                    )
    return out


def val_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in open(run_dir / "log_stats.jsonl")]
    return {r["epoch"]: r["val/loss"] for r in rows}


def test_sigkill_mid_epoch_then_resume_auto(tmp_path):
    ann = synthetic(tmp_path / "data", n=40)  # 32 train studies, batch 4: 8 steps per epoch
    cfg = write_config(
        tmp_path / "cfg.yaml",
        ann,
        tmp_path / "out",
        optim={"epochs": 2, "warmup_epochs": 1},
        train={"save_every_steps": 3, "print_freq": 1},
    )
    # one set of tokenizers for both runs (WordPiece training is not reproducible across processes)
    build_tokenizers(
        load_config(cfg), [r["report"] for r in load_annotation(ann, "train")], tmp_path / "tok"
    )
    args = [
        "main_pretrain.py",
        "--config",
        cfg,
        "--set",
        f"model.text.tokenizer={tmp_path / 'tok/text_tokenizer'}",
        f"model.decoder.tokenizer={tmp_path / 'tok/decoder_tokenizer'}",
    ]
    python(*args, "--run-name", "full")
    full = tmp_path / "out" / "full"

    # killed as soon as the first mid-epoch checkpoint (global step 3 of 8) is on disk
    killed = tmp_path / "out" / "killed"
    proc = subprocess.Popen(
        [sys.executable, *map(str, args), "--run-name", "killed"],
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (killed / "checkpoint-last.pth").exists():
            assert proc.poll() is None and time.time() < deadline, (
                "run ended before its first checkpoint"
            )
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    ckpt = torch.load(killed / "checkpoint-last.pth", weights_only=True)
    resumed_at = ckpt["step"]
    assert ckpt["extra"]["epoch_step"] > 0 and resumed_at < 16, "not killed mid-run"

    out = python(*args, "--run-name", "killed", "--resume", "auto")
    assert f"global step {resumed_at}" in out.stdout  # the resume report
    final_full = torch.load(full / "checkpoint-last.pth", weights_only=True)
    final_killed = torch.load(killed / "checkpoint-last.pth", weights_only=True)
    assert final_full["step"] == final_killed["step"] == 16 and final_killed["epoch"] == 2

    ref, cont = losses(full), losses(killed, newest_only=True)
    assert sorted(ref) == list(range(1, 17))
    # the resumed process logs only what it ran
    assert sorted(cont) == list(range(resumed_at + 1, 17))
    for step, value in cont.items():
        assert value == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    assert val_losses(killed) == pytest.approx(val_losses(full), rel=1e-5)
    for name, p in final_full["model"].items():
        torch.testing.assert_close(final_killed["model"][name], p, rtol=1e-5, atol=1e-6)
