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


def test_unusable_files_are_named_errors(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "notes.pth").write_text("these are my notes\n")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    torch.save(torch.zeros(2), tmp_path / "tensor.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    for name, says in [("missing.pth", "does not exist"), ("empty.pth", "is empty (0 bytes)"),
                       ("notes.pth", "is not a readable PyTorch checkpoint"),
                       ("other.pth", "has no 'model' entry"), ("tensor.pth", "holds a Tensor"),
                       ("evil.pth", "not weights-only")]:
        with pytest.raises(ck.CheckpointError) as e:
            ck.read_checkpoint(tmp_path / name, "--checkpoint")
        assert str(e.value).startswith(f"--checkpoint: {tmp_path / name} ") and says in str(e.value)
    with pytest.raises(ck.CheckpointError, match="empty.pth is empty"):
        ck.load_checkpoint(tmp_path / "empty.pth", Tiny())


def truncated_copy(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    model, opt = trained(1)
    for epoch in (1, 2):
        ck.save_checkpoint(tmp_path / f"checkpoint-{epoch - 1:04d}.pth", model=model,
                           optimizer=opt, epoch=epoch, step=10 * epoch, cfg=None)
    truncated_copy(tmp_path / "checkpoint-0001.pth", tmp_path / "checkpoint-last.pth")
    said = []
    path, ckpt = ck.find_resume("auto", tmp_path, print_fn=said.append)
    assert path.name == "checkpoint-0001.pth" and ckpt["epoch"] == 2
    assert len(said) == 1 and "checkpoint-last.pth is not a readable PyTorch checkpoint" in said[0]
    assert "trying the next older checkpoint" in said[0]
    truncated_copy(tmp_path / "checkpoint-0000.pth", tmp_path / "checkpoint-0001.pth")
    path, ckpt = ck.find_resume("auto", tmp_path, print_fn=said.append)
    assert path.name == "checkpoint-0000.pth" and ckpt["epoch"] == 1
    (tmp_path / "checkpoint-0000.pth").write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match="no intact checkpoint in .* \\(tried "
                       "checkpoint-last.pth, checkpoint-0001.pth, checkpoint-0000.pth\\)"):
        ck.find_resume("auto", tmp_path, print_fn=said.append)
    assert ck.find_resume("", tmp_path) is None
    assert ck.find_resume("auto", tmp_path / "fresh", print_fn=said.append) is None
    with pytest.raises(ck.CheckpointError, match="train.resume: .*checkpoint-0000.pth is empty"):
        ck.find_resume(str(tmp_path / "checkpoint-0000.pth"), tmp_path)


def test_stale_temporary_files_are_removed_at_start(tmp_path, capsys):
    (tmp_path / ".checkpoint-last.pth.tmp4242").write_bytes(b"half a checkpoint")
    (tmp_path / ".checkpoint-0003.pth.tmp17").write_bytes(b"half")
    (tmp_path / "notes.tmp1").write_text("not ours")
    model, opt = trained(1)
    ck.Checkpointer(tmp_path, load_config(), model, opt, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp1"]
    out = capsys.readouterr().out
    assert f"removed {tmp_path / '.checkpoint-last.pth.tmp4242'}, left by an interrupted" in out


def test_pack_and_unpack_files_round_trip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"é": 1}', encoding="utf-8")
    (src / "tokenizer.model").write_bytes(bytes(range(256)))
    (src / "sub").mkdir()  # folders are not packed
    files = ck.pack_files(src)
    assert files["tokenizer.json"] == '{"é": 1}' and files["tokenizer.model"].dtype == torch.uint8
    torch.save({"files": files}, tmp_path / "c.pth")
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)["files"]
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    ck.unpack_files(loaded, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["tokenizer.json", "tokenizer.model"]
    assert (dst / "tokenizer.model").read_bytes() == bytes(range(256))
    with pytest.raises(ck.CheckpointError, match="not a plain file name"):
        ck.unpack_files({"../escape": "x"}, dst)


def layout_checkpointer(tmp_path, monkeypatch, world_size, *sets):
    monkeypatch.setattr(ck, "get_world_size", lambda: world_size)
    model, opt = trained(1)
    return ck.Checkpointer(tmp_path, load_config(overrides=list(sets)), model, opt, None)


def test_resume_refuses_another_effective_batch_unless_allowed(tmp_path, monkeypatch, capsys):
    saver = layout_checkpointer(tmp_path, monkeypatch, 2, "data.batch_size=4",
                                "train.save_every_steps=1")
    saver.on_step(epoch=1, batches_done=6, global_step=14)
    saved = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert {k: saved["extra"][k] for k in ("epoch_step", "batch_size", "world_size", "accum_iter")
            } == {"epoch_step": 6, "batch_size": 4, "world_size": 2, "accum_iter": 1}
    resumed = (tmp_path / "checkpoint-last.pth", saved)
    # the same layout: the same batch
    assert layout_checkpointer(tmp_path, monkeypatch, 2, "data.batch_size=4").resume(resumed) == (
        1, 6)
    # effective batch 8 -> 16: refused, naming both
    other = layout_checkpointer(tmp_path, monkeypatch, 2, "data.batch_size=8")
    with pytest.raises(ck.CheckpointError) as e:
        other.resume(resumed)
    assert "effective batch of 8 = 4 x 2 ranks x accum 1" in str(e.value)
    assert "this run's is 16 = 8 x 2 ranks x accum 1" in str(e.value)
    assert "train.allow_reshape=true" in str(e.value)
    # allowed: 6 batches x 4 x 2 ranks = 48 samples -> batch 3 of 16 samples (3 x 16 = 48)
    allowed = layout_checkpointer(tmp_path, monkeypatch, 2, "data.batch_size=8",
                                  "train.allow_reshape=true")
    capsys.readouterr()
    assert allowed.resume(resumed) == (1, 3)
    assert "the 48 samples done of the epoch make batch 3 (was batch 6); 0 samples" in (
        capsys.readouterr().out)
    # the same effective batch in another layout (1 rank x accum 2) resumes without asking,
    # at a whole optimizer step: 48 samples = 12 batches of 4
    assert layout_checkpointer(tmp_path, monkeypatch, 1, "data.batch_size=4",
                               "optim.accum_iter=2").resume(resumed) == (1, 12)
    # rounded down to a whole step: 48 samples in steps of 3 x 4 x 3 = 36 -> batch 3 (36 samples)
    odd = layout_checkpointer(tmp_path, monkeypatch, 3, "data.batch_size=4", "optim.accum_iter=3",
                              "train.allow_reshape=true")
    assert odd.resume(resumed) == (1, 3)
    assert "12 samples are trained again" in capsys.readouterr().out
