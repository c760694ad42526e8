"""A pretraining run killed (SIGKILL) mid-epoch and resumed with --resume auto ends at the same
global step as an uninterrupted run, and its losses continue the same curve; so does one resumed
from that checkpoint into another run folder, with the checkpoint's tokenizers."""
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datasets.tokenizer import tokenizer_files
from tests.helpers import REPO, env, python, synthetic, torchrun, write_config


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
    # each run trains its own tokenizers: the same (deterministic), or the curves would differ
    args = ["main_pretrain.py", "--config", cfg]
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
    elsewhere = tmp_path / "elsewhere" / "checkpoint-last.pth"
    elsewhere.parent.mkdir()
    shutil.copy(killed / "checkpoint-last.pth", elsewhere)
    assert tokenizer_files(killed) == tokenizer_files(full)  # trained alike in two processes

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

    # resumed into a new run folder from a copy of the checkpoint, with a config whose vocabulary
    # sizes differ: the tokenizers stored in the checkpoint are used, not new ones
    python(*args, "--run-name", "moved", "--resume", elsewhere,
           "--set", "model.text.vocab_size=250", "model.decoder.vocab_size=280")
    moved = tmp_path / "out" / "moved"
    assert tokenizer_files(moved) == tokenizer_files(full)
    final_moved = torch.load(moved / "checkpoint-last.pth", weights_only=True)
    assert final_moved["step"] == 16
    assert final_moved["extra"]["tokenizer_files"] == final_full["extra"]["tokenizer_files"]
    assert losses(moved) == pytest.approx({s: ref[s] for s in cont}, rel=1e-5, abs=1e-6)


def test_corrupt_images_are_replaced_on_two_ranks_and_in_a_validation_batch_of_one(tmp_path):
    """With data.skip_bad a corrupt image used to shrink its rank's batch (the ranks' gathers then
    aborted), or empty a validation batch (a crash after the epoch's training)."""
    ann = synthetic(tmp_path / "data", n=40)  # 32 train, 4 val
    data = json.loads(ann.read_text())
    for split in ("train", "val"):
        broken = ann.parent / "images" / data[split][0]["image_path"][0]
        broken.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    cfg = write_config(tmp_path / "cfg.yaml", ann, tmp_path / "out",
                       optim={"epochs": 1, "warmup_epochs": 0.5},
                       data={"skip_bad": True, "eval_batch_size": 2})
    res = torchrun(2, "main_pretrain.py", "--config", cfg)
    (stats,) = [json.loads(line) for line in open(tmp_path / "out" / "run" / "log_stats.jsonl")]
    assert stats["train/bad_unreadable_image"] == 1 and stats["val/num_skipped"] == 1
    assert stats["train/samples"] == 32 and stats["train/global_step"] == 4  # full batches
    assert "skipped bad inputs: unreadable_image 1" in res.stdout
    assert "val/num_skipped: 1" in res.stdout and data["train"][0]["id"] in res.stdout + res.stderr

    res = python("main_pretrain.py", "--config", cfg, "--run-name", "one",
                 "--set", "data.eval_batch_size=1")
    (stats,) = [json.loads(line) for line in open(tmp_path / "out" / "one" / "log_stats.jsonl")]
    assert stats["val/num_skipped"] == 1 and math.isfinite(stats["val/loss"])
    assert torch.load(tmp_path / "out" / "one" / "checkpoint-last.pth",
                      weights_only=True)["epoch"] == 1
