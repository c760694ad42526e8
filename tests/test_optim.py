"""AMP choice, the grad scaler, the optimizer's parameter groups and learning rates, the DDP and
FSDP wrappers."""

import pytest
import torch
from torch import nn

from datasets.annotation import load_annotation
from datasets.tokenizer import build_tokenizers
from engine.optim import (
    build_optimizer,
    full_parameters,
    make_scaler,
    resolve_amp,
    wrap_ddp,
    wrap_model,
)
from tests.helpers import python, synthetic, torchrun, write_config
from utils.config import load_config
from utils.dist import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)


class WithLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.report_decoder = nn.Module()
        self.report_decoder.lm = nn.Linear(4, 4)

    def lr_scales(self, lm_scale):
        return {"report_decoder.lm.": lm_scale}


def test_amp_choice():
    assert resolve_amp("auto", "cpu") is None
    assert resolve_amp("fp32", "cpu") is None
    assert resolve_amp("bf16", "cpu") is torch.bfloat16
    assert resolve_amp("fp16", "cuda") is torch.float16
    with pytest.raises(ValueError, match="train.amp"):
        resolve_amp("fp8", "cpu")


def test_scaler_only_for_fp16():
    assert make_scaler(torch.float16, "cpu").is_enabled()
    assert not make_scaler(torch.bfloat16, "cpu").is_enabled()
    assert not make_scaler(None, "cpu").is_enabled()


def test_build_optimizer_groups_lr_and_scale():
    cfg = load_config(None, ["optim.lr=0", "optim.blr=1e-3", "data.batch_size=64", "optim.accum_iter=2",
                             "model.decoder.lr_scale=0.25", "optim.weight_decay=0.1", "train.amp=fp32"])
    optimizer, scaler = build_optimizer(cfg, WithLM(), CPU)
    assert optimizer.defaults["lr"] == pytest.approx(1e-3 * 64 * 2 / 256)  # blr x effective batch / 256
    scales = sorted((g["lr_scale"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups)
    assert scales == [(0.25, 0.0, 1), (0.25, 0.1, 1), (1.0, 0.0, 1), (1.0, 0.1, 1)]
    assert not scaler.is_enabled()


def test_wrap_ddp_is_a_no_op_in_one_process():
    model = WithLM()
    cfg = load_config(None)
    assert wrap_ddp(model, cfg, CPU) is model


def test_wrappers_are_no_ops_in_one_process():
    model = WithLM()
    cfg = load_config(None, ["train.fsdp=true"])
    assert wrap_model(model, cfg, CPU) is model
    with full_parameters(model):
        assert model.encoder(torch.ones(1, 4)).shape == (1, 4)


def test_fsdp_two_ranks_train_save_resume_and_generate_as_one_process(tmp_path):
    """FSDP2 on 2 CPU ranks (gloo) through the real training path: an epoch, the checkpoint (full
    state gathered to rank 0), a new launch that resumes from it and trains the next epoch. Both
    epochs' parameters, AdamW moments and gradient norms match one plain process over the same
    global batches (a lost optimizer state or a gradient scale error would show). Then generation
    under FSDP with a different number of decoding steps per rank, equal to a plain model loaded
    from the FSDP checkpoint, and generate_and_score over the test split."""
    ann = synthetic(tmp_path / "data", n=30)
    cfg_path = write_config(tmp_path / "cfg.yaml", ann, tmp_path / "out",
                            optim={"lr": 1e-3, "warmup_epochs": 0.0, "epochs": 2, "clip_grad": 0.0},
                            data={"eval_batch_size": 2})
    cfg = load_config(cfg_path)
    build_tokenizers(cfg, [r["report"] for r in load_annotation(ann, "train")], tmp_path / "tok")
    sets = [f"model.text.tokenizer={tmp_path / 'tok' / 'text_tokenizer'}",
            f"model.decoder.tokenizer={tmp_path / 'tok' / 'decoder_tokenizer'}",
            "data.random_resized_crop=[1.0, 1.0]"]  # no augmentation: the whole image, resized
    worker = ("-m", "tests.helpers.fsdp_worker", "--config", cfg_path)
    python(*worker, "--out", tmp_path / "one.pt", "--until", "2", "--set", *sets,
           "data.batch_size=8", "run_name=one")
    fsdp = [*sets, "data.batch_size=4", "train.fsdp=true", "run_name=fsdp"]
    torchrun(2, *worker, "--out", tmp_path / "a.pt", "--until", "1", "--set", *fsdp)
    torchrun(2, *worker, "--out", tmp_path / "b.pt", "--until", "2", "--generate", "--set", *fsdp,
             "train.resume=auto")
    one, a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("one", "a", "b"))
    assert (a["start_epoch"], b["start_epoch"]) == (0, 1) and set(b["epochs"]) == {1}
    for epoch, run in ((0, a), (1, b)):
        mine, ref = run["epochs"][epoch], one["epochs"][epoch]
        assert mine["params"].keys() == ref["params"].keys()  # a plain state dict
        moved = 0
        for name, p1 in ref["params"].items():
            torch.testing.assert_close(mine["params"][name], p1, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"epoch {epoch} {name}: {m}")
            moved += int(not torch.equal(p1, one["epochs"][0]["params"][name])) if epoch else 0
        assert epoch == 0 or moved > 0.8 * len(ref["params"])  # the resumed epoch trained
        for k in ("loss", "lm", "mae", "grad_norm", "samples", "global_step"):
            assert mine["stats"][k] == pytest.approx(ref["stats"][k], rel=1e-4), (epoch, k)
        # AdamW's moments, gathered by parameter name under FSDP, by position without it
        by_name, by_pos = mine["optimizer"], ref["optimizer"]
        pairs = [(n, i) for g_name, g_pos in zip(by_name["param_groups"], by_pos["param_groups"])
                 for n, i in zip(g_name["params"], g_pos["params"])]
        assert len(pairs) == len(by_pos["state"]) > 0 and all(isinstance(n, str) for n, _ in pairs)
        for n, i in pairs:
            assert by_name["state"][n]["step"] == by_pos["state"][i]["step"] > 0
            for key in ("exp_avg", "exp_avg_sq"):  # to 1e-4 of each tensor's largest entry
                x, y = by_name["state"][n][key], by_pos["state"][i][key]
                assert (x - y).abs().max() <= 1e-4 * y.abs().max() + 1e-9, (epoch, n, key)
    gen = b["generated"]
    assert gen["world_size"] == 2 and gen["rows"] == gen["plain"] and len(gen["rows"]) == 1
    assert b["num_studies"] == len(load_annotation(ann, "test"))
