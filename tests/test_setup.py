"""Entry-point set-up: the command-line shorthands map to config keys; the run folder gets its log."""

import builtins
import sys

import pytest

from engine.setup import load_run_config, parser, setup_run
from tests.helpers import TORCHRUN_ENV


def test_shorthands_set_their_keys():
    args = parser("test").parse_args(["--init", "/w/mae.pth", "--resume", "auto", "--output-dir", "/o",
                                      "--run-name", "r", "--set", "optim.epochs=3"])
    cfg = load_run_config(args)
    assert cfg.model.vit.init == "/w/mae.pth" and cfg.train.resume == "auto"
    assert (cfg.output_dir, cfg.run_name, cfg.optim.epochs) == ("/o", "r", 3)


def test_setup_run_makes_the_run_folder_and_logs_into_it(tmp_path, monkeypatch, capsys):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(builtins, "print", builtins.print)  # setup_print replaces it: restore after
    cfg = load_run_config(parser("t").parse_args(["--output-dir", str(tmp_path), "--run-name", "x",
                                                   "--set", "device=cpu"]))
    info, run_dir, tb = setup_run(cfg)
    try:
        print("hello from the run")
        assert info.world_size == 1 and run_dir == tmp_path / "x"
        assert (run_dir / "tensorboard").is_dir()
        assert "hello from the run" in (run_dir / "log.txt").read_text()
    finally:
        tb.close()
        for name in ("stdout", "stderr"):  # undo the log tee
            stream = getattr(sys, name)
            setattr(sys, name, getattr(stream, "stream", stream))


def test_unknown_key_in_a_shorthand_run_is_an_error():
    with pytest.raises(ValueError, match="optim.epoch"):
        load_run_config(parser("t").parse_args(["--set", "optim.epoch=3"]))
