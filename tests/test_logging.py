import re
import sys
import time

import pytest
import torch

from utils import logging as lg


def test_smoothed_value_known_values():
    m = lg.SmoothedValue(window_size=3)
    for v in [1.0, 2.0, 3.0, 10.0]:
        m.update(v)
    assert m.median == 3.0           # window [2, 3, 10]
    assert m.avg == pytest.approx(5.0)
    assert m.global_avg == pytest.approx(4.0)  # (1 + 2 + 3 + 10) / 4
    assert m.max == 10.0 and m.value == 10.0
    assert str(m) == "3.0000 (4.0000)"
    m.update(2.0, n=4)               # a batch mean over 4 samples counts 4 times in the global avg
    assert m.global_avg == pytest.approx((16 + 8) / 8)
    m.synchronize_between_processes()  # single process: unchanged
    assert m.count == 8


def test_metric_logger_progress_line(capsys):
    logger = lg.MetricLogger(delimiter="  ")
    logger.add_meter("lr", lg.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    seen = []
    for i, x in enumerate(logger.log_every(list(range(5)), print_freq=2, header="Epoch: [3]",
                                           batch_size=16)):
        time.sleep(0.01)
        logger.update(loss=torch.tensor(float(i + 1)), lr=1e-4 * (i + 1), skipped=None)
        seen.append(x)
    assert seen == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4  # iterations 0, 2, 4 (the last) and the total
    first, last = lines[0], lines[2]
    assert first.startswith("Epoch: [3]  [0/5]  eta: 0:00:0")
    assert "loss: 1.0000 (1.0000)" in first and "lr: 0.000100" in first
    # last line: median of losses 1..5 is 3, global average 3; ETA 0 at the end
    assert "[4/5]  eta: 0:00:00" in last and "loss: 3.0000 (3.0000)" in last
    assert "lr: 0.000500" in last
    t = float(re.search(r"time: ([\d.]+)", last).group(1))
    assert 0.005 < t < 1.0
    assert re.search(r"data: [\d.]+", last)
    sps = float(re.search(r"samples/s: ([\d.]+)", last).group(1))
    assert sps == pytest.approx(16 / t, rel=0.05)
    assert lines[3].startswith("Epoch: [3] Total time: 0:00:00")
    assert logger.global_avgs() == pytest.approx({"lr": 3e-4, "loss": 3.0})


def test_tbwriter_writes_readable_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    w = lg.TBWriter(tmp_path / "tb", enabled=True)
    w.add_scalars({"loss": 1.5, "acc": torch.tensor(0.25), "meteor": None, "name": "x"}, step=3,
                  prefix="train/")
    w.add_scalars({"loss": 0.5}, step=4, prefix="train")
    w.add_text("samples/0", "no acute findings", step=4)
    w.add_image("heatmap", torch.rand(3, 8, 8), step=4)
    w.close()
    w.close()  # second close is harmless
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "train/acc"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(3, 1.5), (4, 0.5)]
    assert acc.Scalars("train/acc")[0].value == 0.25
    assert "heatmap" in tags["images"]
    assert any("samples/0" in t for t in tags["tensors"])


def test_tbwriter_disabled_is_noop(tmp_path, monkeypatch):
    w = lg.TBWriter(tmp_path / "off", enabled=False)
    w.add_scalars({"loss": 1.0}, 0)
    w.add_text("a", "b", 0)
    w.flush()
    w.close()
    assert not (tmp_path / "off").exists()
    monkeypatch.setattr(lg, "is_main_process", lambda: False)  # rank > 0
    lg.TBWriter(tmp_path / "rank1", enabled=True).add_scalars({"loss": 1.0}, 0)
    assert not (tmp_path / "rank1").exists()


def test_setup_logging_tees_to_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # restored after the test
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    path = lg.setup_logging(tmp_path / "run")
    print("hello log")
    print("warn", file=sys.stderr)
    again = lg.setup_logging(tmp_path / "run")  # no double lines when called twice
    print("second")
    sys.stdout.flush()
    assert path == again == tmp_path / "run" / "log.txt"
    assert path.read_text() == "hello log\nwarn\nsecond\n"
    out = capsys.readouterr()
    assert "hello log" in out.out and "second" in out.out and "warn" in out.err
    sys.stdout.file.close()
    monkeypatch.setattr(lg, "is_main_process", lambda: False)
    assert lg.setup_logging(tmp_path / "other") is None and not (tmp_path / "other").exists()
