"""engine/train.py with a test-double model (the engine only sees model(batch) -> dict of
losses)."""
import contextlib
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets.annotation import load_annotation
from datasets.loaders import ResumableSampler
from datasets.tokenizer import build_tokenizers
from engine.optim import make_scaler, resolve_amp
from engine.train import position_loader, train_epochs, train_one_epoch
from tests.helpers import TINY_MODEL, python, synthetic, torchrun, write_config
from utils.checkpoint import Checkpointer
from utils.config import load_config
from utils.lr_sched import lr_at, param_groups

N, D = 32, 4
W_TRUE = torch.tensor([1.0, -2.0, 0.5, 3.0])


class Regression(nn.Module):
    """A linear model with an MSE loss; ids containing 'nan' make the loss NaN."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(D, 1)
        self.report_decoder = nn.Module()
        self.report_decoder.lm = nn.Linear(1, 1, bias=False)  # stands in for the LM (own lr scale)
        self.seen_ids, self.autocast_dtypes = [], []

    def forward(self, batch):
        self.seen_ids += list(batch["id"])
        self.autocast_dtypes.append(
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        )
        pred = self.report_decoder.lm(self.lin(batch["image"])).squeeze(-1)
        mse = ((pred.float() - batch["target"]) ** 2).mean()
        if any("nan" in i for i in batch["id"]):
            mse = mse * float("nan")
        return {"loss": mse, "mse": mse, "size": pred.detach().abs().mean()}


def make_data(n=N, nan_ids=()):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, D, generator=g)
    y = x @ W_TRUE
    return [
        {"image": x[i], "target": y[i], "id": f"s{i}" + ("nan" if i in nan_ids else ""), "index": i}
        for i in range(n)
    ]


def collate(items):
    out = {
        "image": torch.stack([i["image"] for i in items]),
        "target": torch.stack([i["target"] for i in items]),
        "id": [i["id"] for i in items],
        "index": torch.tensor([i["index"] for i in items]),
    }
    return out


def make_loader(data, batch_size=4, shuffle=False):
    sampler = ResumableSampler(
        data, num_replicas=1, rank=0, shuffle=shuffle, seed=0, drop_last=True
    )
    return DataLoader(
        data, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=True
    )


def make_cfg(*sets):
    return load_config(None, ["optim.lr=0.05", "optim.min_lr=0.05", "optim.warmup_epochs=0",
                              "optim.weight_decay=0.0", "optim.clip_grad=0", "train.print_freq=100",
                              "optim.epochs=10", *sets])


def sgd(model, lr_scale=1.0):
    return torch.optim.SGD(param_groups(model, 0.0, {"report_decoder.lm.": lr_scale}), lr=0.05)


def scaler():
    return torch.amp.GradScaler("cpu", enabled=False)


class Recorder:
    def __init__(self):
        self.scalars = []

    def add_scalars(self, values, step, prefix=""):
        self.scalars.append((step, dict(values)))

    def flush(self):
        pass


def test_loss_decreases_and_logs_every_term():
    model, cfg, tb = Regression(), make_cfg(), Recorder()
    loader = make_loader(make_data(), shuffle=True)
    opt = sgd(model)
    first = train_one_epoch(model, loader, opt, scaler(), 0, cfg, "cpu", tb=tb)
    for epoch in range(1, 4):
        last = train_one_epoch(model, loader, opt, scaler(), epoch, cfg, "cpu", tb=tb)
    assert last["mse"] < 0.2 * first["mse"]
    assert last["global_step"] == 4 * 8 and first["steps_per_epoch"] == 8
    steps = [s for s, _ in tb.scalars]
    assert steps == list(range(1, 33))  # one entry per optimizer step, global step as x axis
    tags = tb.scalars[-1][1]
    for tag in (
        "train/loss",
        "train/mse",
        "train/size",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
    ):
        assert tag in tags and math.isfinite(tags[tag])


def test_accumulation_equals_one_big_batch():
    """accum 2 x batch 4 == accum 1 x batch 8 (same lr, mean losses)."""
    data = make_data()
    a, b = Regression(), Regression()
    train_one_epoch(a, make_loader(data, 8), sgd(a), scaler(), 0, make_cfg(), "cpu")
    out = train_one_epoch(
        b, make_loader(data, 4), sgd(b), scaler(), 0, make_cfg("optim.accum_iter=2"), "cpu"
    )
    assert out["steps_per_epoch"] == 4
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_trailing_partial_accumulation_group_is_dropped():
    model = Regression()
    out = train_one_epoch(model, make_loader(make_data(28), 4), sgd(model), scaler(), 0,
                          make_cfg("optim.accum_iter=2"), "cpu")  # 7 batches -> 3 steps, 6 batches
    assert out["steps_per_epoch"] == 3 and len(model.seen_ids) == 24


class FakeDDP(nn.Module):
    """Counts forwards under no_sync (what DDP would not all-reduce)."""

    def __init__(self, module):
        super().__init__()
        self.module, self.in_no_sync, self.calls = module, False, []

    @contextlib.contextmanager
    def no_sync(self):
        self.in_no_sync = True
        yield
        self.in_no_sync = False

    def forward(self, batch):
        self.calls.append(self.in_no_sync)
        return self.module(batch)


def test_no_sync_on_all_but_the_last_micro_step():
    ddp = FakeDDP(Regression())
    train_one_epoch(
        ddp,
        make_loader(make_data(24), 4),
        sgd(ddp),
        scaler(),
        0,
        make_cfg("optim.accum_iter=3"),
        "cpu",
    )
    assert ddp.calls == [True, True, False] * 2


def test_per_iteration_lr_schedule_and_lm_scale():
    model = Regression()
    cfg = make_cfg("optim.lr=0.1", "optim.min_lr=0.0", "optim.warmup_epochs=1", "optim.epochs=3")
    opt, tb = sgd(model, lr_scale=0.1), Recorder()
    lrs = []
    for epoch in range(2):
        train_one_epoch(
            model,
            make_loader(make_data()),
            opt,
            scaler(),
            epoch,
            cfg,
            "cpu",
            tb=tb,
            on_step=lambda e, i, s: lrs.append({g["name"]: g["lr"] for g in opt.param_groups}),
        )
    # 8 batches per epoch: step k (0-based batch it) uses lr_at(epoch + it / 8)
    expected = [lr_at(e + it / 8, 0.1, 0.0, 1, 3) for e in range(2) for it in range(8)]
    got = [g["decay"] for g in lrs]
    assert got == pytest.approx(expected)
    assert [g["decay_lr_x0.1"] for g in lrs] == pytest.approx([0.1 * v for v in expected])
    assert got[0] == 0.0 and got[7] == pytest.approx(0.1 * 7 / 8)


def test_clipping_bounds_the_update_and_logs_the_norm():
    model, tb = Regression(), Recorder()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = [dict(d, target=d["target"] * 100) for d in make_data(4)]
    train_one_epoch(
        model, make_loader(data), opt, scaler(), 0, make_cfg("optim.clip_grad=0.001"), "cpu", tb=tb
    )
    delta = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), before)))
    # SGD: update = lr x clipped gradient
    assert delta.item() == pytest.approx(0.05 * 0.001, rel=1e-3)
    assert tb.scalars[0][1]["train/grad_norm"] > 1.0  # the norm before clipping is logged


def test_nonfinite_skip_counts_and_leaves_params():
    model = Regression()
    data = make_data(8, nan_ids=(5,))  # batch 1 (ids 4-7) is non-finite
    opt = sgd(model)
    snapshots = []
    out = train_one_epoch(
        model,
        make_loader(data),
        opt,
        scaler(),
        0,
        make_cfg(),
        "cpu",
        on_step=lambda e, i, s: snapshots.append(model.lin.weight.detach().clone()),
        print_fn=lambda *a: None,
    )
    assert out["nonfinite"] == 1
    torch.testing.assert_close(snapshots[0], snapshots[1])  # the bad step changed nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_stop_names_step_and_ids():
    model = Regression()
    data = make_data(16, nan_ids=(9,))
    with pytest.raises(FloatingPointError, match=r"global step 11 .*s8.*s9nan"):
        train_one_epoch(
            model,
            make_loader(data),
            sgd(model),
            scaler(),
            2,
            make_cfg("train.nonfinite=stop"),
            "cpu",
        )


def test_too_many_nonfinite_steps_stop():
    model = Regression()
    data = make_data(16, nan_ids=(0, 4, 8))
    with pytest.raises(FloatingPointError, match="3 non-finite steps"):
        train_one_epoch(
            model,
            make_loader(data),
            sgd(model),
            scaler(),
            0,
            make_cfg("train.max_nonfinite=2"),
            "cpu",
            print_fn=lambda *a: None,
        )


def test_start_step_skips_batches_deterministically():
    data = make_data()
    full, resumed = Regression(), Regression()
    train_one_epoch(
        full, make_loader(data, shuffle=True), sgd(full), scaler(), 3, make_cfg(), "cpu"
    )
    out = train_one_epoch(
        resumed,
        make_loader(data, shuffle=True),
        sgd(resumed),
        scaler(),
        3,
        make_cfg(),
        "cpu",
        start_step=5,
    )
    assert resumed.seen_ids == full.seen_ids[5 * 4:]
    assert out["global_step"] == 4 * 8
    # the next epoch on the same loader is whole again
    loader = make_loader(data, shuffle=True)
    train_one_epoch(resumed, loader, sgd(resumed), scaler(), 3, make_cfg(), "cpu", start_step=6)
    out = train_one_epoch(resumed, loader, sgd(resumed), scaler(), 4, make_cfg(), "cpu")
    assert out["steps_per_epoch"] == 8 and out["global_step"] == 5 * 8 and out["samples"] == N
    # a loader without set_start is iterated past the skipped batches
    plain = DataLoader(data, batch_size=4, collate_fn=collate)
    it, n = position_loader(plain, 0, 6)
    assert n == 8 and [b["id"][0] for b in it] == ["s24", "s28"]


class Unreadable(list):
    """Items listed in ``bad`` are unreadable (None, as datasets/cxr.py returns with
    data.skip_bad)."""

    def __init__(self, items, bad):
        super().__init__(items)
        self.bad = set(bad)

    def __getitem__(self, i):
        return None if i in self.bad else super().__getitem__(i)

    def bad_counts(self):
        return {"missing_image": 1, "unreadable_image": len(self.bad)}

    def bad_summary(self):
        return "skipped ..."


def collate_skip(items):
    items = [i for i in items if i is not None]
    return collate(items) if items else None


def test_empty_batches_drop_their_step_and_bad_inputs_are_reported():
    model = Regression()
    # batch 1 (ids 4-7) is entirely unreadable
    data = Unreadable(make_data(16), bad=(1, 4, 5, 6, 7))
    sampler = ResumableSampler(data, num_replicas=1, rank=0, shuffle=False, drop_last=True)
    loader = DataLoader(data, batch_size=4, sampler=sampler, collate_fn=collate_skip)
    steps = []
    out = train_one_epoch(
        model,
        loader,
        sgd(model),
        scaler(),
        0,
        make_cfg("data.skip_bad=true"),
        "cpu",
        on_step=lambda e, i, s: steps.append(s),
        print_fn=lambda *a: None,
    )
    assert steps == [1, 2, 3, 4] and out["dropped_steps"] == 1
    assert model.seen_ids == ["s0", "s2", "s3"] + [f"s{i}" for i in range(8, 16)]
    assert out["bad_unreadable_image"] == 5 and out["bad_missing_image"] == 1
    assert out["samples"] == 11




def test_autocast_dtype_follows_train_amp():
    model = Regression()
    train_one_epoch(
        model, make_loader(make_data(8)), sgd(model), scaler(), 0, make_cfg("train.amp=bf16"), "cpu"
    )
    assert model.autocast_dtypes == [torch.bfloat16, torch.bfloat16]
    model = Regression()
    train_one_epoch(model, make_loader(make_data(8)), sgd(model), scaler(), 0, make_cfg(), "cpu")
    assert model.autocast_dtypes == [None, None]


def test_fp16_uses_the_grad_scaler():
    model, tb = Regression(), Recorder()
    cfg = make_cfg("train.amp=fp16")
    scaler16 = make_scaler(resolve_amp("fp16", "cpu"), "cpu")
    assert scaler16.is_enabled()
    out = train_one_epoch(
        model, make_loader(make_data()), sgd(model), scaler16, 0, cfg, "cpu", tb=tb
    )
    assert model.autocast_dtypes[0] == torch.float16
    # logged (halved on overflowing steps)
    assert 0 < tb.scalars[-1][1]["train/loss_scale"] <= 65536.0
    assert math.isfinite(out["loss"]) and all(torch.isfinite(p).all() for p in model.parameters())
    assert not make_scaler(resolve_amp("auto", "cpu"), "cpu").is_enabled()


def test_two_ranks_match_one_process(tmp_path):
    ann = synthetic(tmp_path / "data", n=30)
    cfg_path = write_config(tmp_path / "cfg.yaml", ann, tmp_path / "out",
                            optim={"lr": 0.05, "warmup_epochs": 0.0, "epochs": 1, "clip_grad": 0.0},
                            data={"eval_batch_size": 2}, loss={"rest": {"weight": 1.0}},
                            model={**TINY_MODEL, "location_prior": {"enabled": True}})
    cfg = load_config(cfg_path)
    build_tokenizers(cfg, [r["report"] for r in load_annotation(ann, "train")], tmp_path / "tok")
    sets = [f"model.text.tokenizer={tmp_path / 'tok' / 'text_tokenizer'}",
            f"model.decoder.tokenizer={tmp_path / 'tok' / 'decoder_tokenizer'}"]
    worker = ("-m", "tests.helpers.ddp_worker")
    python(
        *worker,
        "--config",
        cfg_path,
        "--out",
        tmp_path / "one.pt",
        "--set",
        *sets,
        "data.batch_size=8",
    )
    torchrun(2, *worker, "--config", cfg_path, "--out", tmp_path / "two.pt", "--eval-split", "test",
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
    # estimated, identically on 1 and 2 ranks (compared above)
    assert one["params"]["location_prior"].any()
    for k in ("loss", "mae", "con", "region", "aca", "entity", "lm", "rest", "grad_norm"):
        assert abs(one["stats"][k] - two["stats"][k]) < 1e-4 * max(1.0, abs(one["stats"][k])), k

    # generation over the test split on two ranks: every study once (the sampler pads 3 -> 4)
    rows = [json.loads(line) for line in open(tmp_path / "eval_2" / "generated.jsonl")]
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(r["id"] for r in load_annotation(ann, "test")) and len(
        set(ids)
    ) == len(ids)


def test_the_epoch_checkpoint_is_written_before_validation(tmp_path):
    model = Regression()
    cfg = make_cfg("optim.epochs=2")
    opt = sgd(model)
    run = SimpleNamespace(model=model, optimizer=opt, scaler=scaler(), train_loader=make_loader(
        make_data()), start_epoch=0, start_step=0,
        checkpointer=Checkpointer(tmp_path, cfg, model, opt, scaler()))

    def failing_validation(epoch, step):
        raise RuntimeError("validation broke")

    with pytest.raises(RuntimeError, match="validation broke"):
        train_epochs(run, cfg, "cpu", Recorder(), tmp_path, failing_validation)
    saved = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert saved["epoch"] == 1 and saved["step"] == 8 and saved["extra"]["epoch_step"] == 0
    torch.testing.assert_close(saved["model"]["lin.weight"], model.lin.weight)
    # validation that works is recorded afterwards: best value and checkpoint
    run.start_epoch = 1
    train_epochs(run, cfg, "cpu", Recorder(), tmp_path, lambda e, s: {"val/loss": 0.5})
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["extra"]["best"] == 0.5
    assert (tmp_path / "checkpoint-best.pth").is_file() and run.checkpointer.best == 0.5
