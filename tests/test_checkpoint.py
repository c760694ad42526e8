import random

import numpy as np
import pytest
import torch
from torch import nn

from utils import checkpoint as ck
from utils.config import load_config


class Tiny(nn.Module):
    def __init__(self, dim=4, out=3):
        super().__init__()
        self.proj = nn.Linear(dim, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, out)

    def forward(self, x):
        return self.head(self.norm(self.proj(x)))


def trained(steps=3):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    return model, opt


def test_save_load_round_trip(tmp_path):
    model, opt = trained()
    cfg = load_config(overrides=["optim.lr=1e-3"])
    scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    path = ck.save_checkpoint(tmp_path / "checkpoint-last.pth", model=model, optimizer=opt,
                              scaler=scaler, epoch=4, step=123, cfg=cfg, extra={"best": 0.5})
    expected = (random.random(), np.random.rand(), torch.rand(1))  # draws right after the save

    # weights_only load works: only tensors and plain containers inside
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 4 and raw["step"] == 123 and raw["extra"] == {"best": 0.5}
    assert type(raw["config"]) is dict and raw["config"]["optim"]["lr"] == 1e-3
    assert raw["scaler"]["scale"] == 128.0

    model2 = Tiny()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=5.0)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    got = ck.load_checkpoint(path, model2, opt2, scaler2)
    assert got["epoch"] == 4 and got["step"] == 123
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == 1e-2
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    assert scaler2.get_scale() == 128.0
    # RNG streams continue exactly where they were at save time
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


def test_saves_unwrapped_model(tmp_path):
    model, _ = trained(1)
    ddp_like = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp_like)
    ddp_like.module = model
    assert ck.unwrap(ddp_like) is model
    ck.save_checkpoint(tmp_path / "c.pth", model=ddp_like, epoch=0, step=0, cfg=None)
    keys = torch.load(tmp_path / "c.pth", weights_only=True)["model"].keys()
    assert set(keys) == set(model.state_dict()) and not any(k.startswith("module.") for k in keys)


def test_interrupted_save_keeps_previous(tmp_path, monkeypatch):
    model, opt = trained(1)
    path = tmp_path / "checkpoint-last.pth"
    ck.save_checkpoint(path, model=model, optimizer=opt, epoch=1, step=10, cfg=None)
    before = path.read_bytes()

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial garbage")  # a few bytes land, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, model=model, optimizer=opt, epoch=2, step=20, cfg=None)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last.pth"]  # no tmp left
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_find_latest(tmp_path):
    assert ck.find_latest(tmp_path) is None
    assert ck.find_latest(tmp_path / "absent") is None
    for name in ["checkpoint-0002.pth", "checkpoint-10.pth", "checkpoint-0009.pth",
                 "checkpoint-best.pth", ".checkpoint-last.pth.tmp123", "notes.pth"]:
        (tmp_path / name).write_bytes(b"x")
    assert ck.find_latest(tmp_path).name == "checkpoint-10.pth"  # numeric, not lexicographic
    (tmp_path / "checkpoint-last.pth").write_bytes(b"x")
    assert ck.find_latest(tmp_path).name == "checkpoint-last.pth"


def test_save_is_noop_off_rank0(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "is_main_process", lambda: False)
    assert ck.save_checkpoint(tmp_path / "c.pth", model=Tiny(), epoch=0, step=0, cfg=None) is None
    assert not (tmp_path / "c.pth").exists()


class Encoder(nn.Module):  # a mini "ViT" with the names of an MAE checkpoint
    def __init__(self, n_pos=5):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, 8))
        self.patch_embed = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)


class Host(nn.Module):  # the encoder lives at ``vit`` inside a bigger model
    def __init__(self):
        super().__init__()
        self.vit = Encoder(n_pos=7)
        self.text = nn.Linear(3, 3)


def test_load_partial_reports_matches_and_skips(tmp_path):
    torch.manual_seed(0)
    mae = Encoder(n_pos=5)
    sd = {k: v.clone() for k, v in mae.state_dict().items()}
    sd["decoder_embed.weight"] = torch.randn(2, 8)
    sd["mask_token"] = torch.randn(1, 1, 8)
    torch.save({"model": sd, "epoch": 799}, tmp_path / "mae.pth")  # MAE layout: under "model"
    state = torch.load(tmp_path / "mae.pth", weights_only=True)

    host = Host()
    text_before = host.text.weight.clone()
    report = ck.load_partial(host, state, prefix_map={"": "vit.", "decoder_": None})
    assert report.matched == ["vit.norm.bias", "vit.norm.weight", "vit.patch_embed.bias",
                              "vit.patch_embed.weight"]
    assert torch.equal(host.vit.patch_embed.weight, mae.patch_embed.weight)
    assert torch.equal(host.text.weight, text_before)
    assert report.skipped == {
        "pos_embed": "shape mismatch: checkpoint (1, 5, 8) vs model (1, 7, 8)",
        "decoder_embed.weight": "dropped by prefix_map",
        "mask_token": "unexpected key (renamed 'vit.mask_token')",
    }
    assert set(report.missing) == {"vit.pos_embed", "text.weight", "text.bias"}
    text = str(report)
    assert text.startswith("loaded 4 tensors; 3 missing, 3 skipped")
    assert "pos_embed: shape mismatch: checkpoint (1, 5, 8) vs model (1, 7, 8)" in text


def test_load_partial_top_level_and_ddp_prefix():
    src = Tiny()
    sd = {"module." + k: v for k, v in src.state_dict().items()}  # saved from a DDP model
    dst = Tiny()
    report = ck.load_partial(dst, sd)
    assert (
        len(report.matched) == len(src.state_dict()) and not report.missing and not report.skipped
    )
    assert torch.equal(dst.head.weight, src.head.weight)


def test_report_groups_long_missing_lists():
    r = ck.PartialLoadReport(
        matched=[], missing=[f"text.layer.{i}.w" for i in range(20)] + ["lm.x"], skipped={}
    )
    assert "text.layer.* (20), lm.x" in str(r)


def test_resume_reseeds_each_rank_deterministically(tmp_path, monkeypatch):
    model, _ = trained(1)
    ck.save_checkpoint(tmp_path / "c.pth", model=model, epoch=0, step=0, cfg=None)
    monkeypatch.setattr(ck, "get_world_size", lambda: 2)
    draws = {}
    for rank in (0, 1, 1):
        monkeypatch.setattr(ck, "get_rank", lambda: rank)
        ck.load_checkpoint(tmp_path / "c.pth", Tiny())
        draws.setdefault(rank, []).append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[1][0] == draws[1][1]  # same checkpoint, same rank: same stream
    assert all(a != b for a, b in zip(draws[0][0], draws[1][0]))  # ranks differ in every generator
