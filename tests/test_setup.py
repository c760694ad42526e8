"""Entry-point set-up: the command-line shorthands map to config keys; the run folder gets its log."""

import builtins
import sys

import pytest
import torch

from datasets.tokenizer import train_bpe, train_wordpiece
from engine.setup import load_pretrained, load_run_config, parser, setup_run
from models.ssacl import SSACL
from tests.helpers import TORCHRUN_ENV
from utils.config import load_config
from vocab.anatomy_graph import AnatomyGraph


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


def test_a_partial_pretrained_load_is_an_error_unless_allowed(tmp_path):
    texts = ["the heart is normal .", "small left pleural effusion .", "Findings: none."] * 5
    toks = (train_wordpiece(texts + list(AnatomyGraph.default().leaf_names), 200), train_bpe(texts, 300))
    tiny = ["data.image_size=32", "model.vit.patch_size=8", "model.vit.embed_dim=32", "model.vit.depth=1",
            "model.vit.num_heads=2", "model.text.hidden_size=32", "model.text.num_layers=1",
            "model.text.num_heads=2", "model.text.intermediate_size=64", "model.mae.decoder_dim=32",
            "model.mae.decoder_heads=2", "model.decoder.n_embd=32", "model.decoder.n_layer=1",
            "model.decoder.n_head=2"]
    source = SSACL.from_config(load_config(overrides=tiny + ["loss.entity.weight=0"]), *toks)
    checkpoint = {"model": source.state_dict()}
    target = SSACL.from_config(load_config(overrides=tiny), *toks)  # has an entity head
    with pytest.raises(ValueError, match=r"does not fill this model.*entity_head"):
        load_pretrained(target, tmp_path / "src.pth", checkpoint)
    load_pretrained(target, tmp_path / "src.pth", checkpoint, allow_partial=True)
    torch.testing.assert_close(target.query_proj.weight, source.query_proj.weight)
