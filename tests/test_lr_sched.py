import math

import pytest
import torch
from torch import nn

from utils.config import ConfigError, load_config
from utils.lr_sched import adjust_learning_rate, effective_lr, lr_at, no_weight_decay, param_groups

BASE, MIN = 1e-3, 1e-5


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0),
    (0.5, 2.5e-4),                    # warmup: linear, per iteration (fractional epochs)
    (1.0, 5e-4),
    (2.0, 1e-3),                      # end of warmup: base lr
    (6.0, MIN + (BASE - MIN) * 0.5),  # half-way through the cosine
    (4.0, MIN + (BASE - MIN) * 0.5 * (1 + math.cos(math.pi / 4))),
    (10.0, MIN),                      # end: min lr
    (12.0, MIN),                      # past the end: stays at min lr
])
def test_lr_at_known_values(epoch, expected):
    assert lr_at(epoch, BASE, MIN, 2.0, 10) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lr_at_edge_cases():
    assert lr_at(0.0, BASE, MIN, 0.0, 10) == pytest.approx(BASE)  # no warmup
    assert lr_at(3.0, BASE, MIN, 3.0, 3) == pytest.approx(BASE)   # all warmup: no division by 0
    lrs = [lr_at(e / 10, BASE, MIN, 2.0, 10) for e in range(20, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))              # monotone decay after warmup


def test_adjust_learning_rate_applies_lr_scale():
    p1, p2 = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p1]}, {"params": [p2], "lr_scale": 0.1}], lr=123.0)
    lr = adjust_learning_rate(opt, 1.0, BASE, MIN, 2.0, 10)
    assert lr == pytest.approx(5e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert opt.param_groups[1]["lr"] == pytest.approx(5e-5)


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wpe = nn.Embedding(8, 4)       # GPT-2 position table: no decay
        self.wte = nn.Embedding(10, 4)      # token embedding table: decay
        self.c_fc = nn.Linear(4, 4)


class Fake(nn.Module):
    def __init__(self):
        super().__init__()
        self.vit = nn.Module()
        self.vit.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.vit.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.vit.leaf_queries = nn.Parameter(torch.zeros(25, 4))
        self.vit.qkv = nn.Linear(4, 12)
        self.vit.norm = nn.LayerNorm(4)
        self.mae_decoder = nn.Module()
        self.mae_decoder.mask_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.mae_decoder.decoder_pos_embed = nn.Parameter(torch.zeros(1, 5, 4), requires_grad=False)
        self.text_encoder = nn.Module()
        self.text_encoder.query = nn.Linear(4, 4)  # BERT attention "query" Linear: decay
        self.text_encoder.position_embeddings = nn.Embedding(6, 4)
        self.text_encoder.frozen = nn.Linear(4, 4)
        self.text_encoder.frozen.requires_grad_(False)
        self.report_decoder = nn.Module()
        self.report_decoder.lm = LM()
        self.report_decoder.visual_proj = nn.Linear(4, 4)  # not under .lm: lr_scale 1


def group_names(groups, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in groups}


@pytest.mark.parametrize("wrap", [False, True])
def test_param_groups(wrap):
    model = Fake()
    root = model
    if wrap:  # DDP-style "module." prefix
        root = nn.Module()
        root.module = model
    groups = param_groups(root, weight_decay=0.05, lr_scales={"report_decoder.lm.": 0.1})
    p = "module." if wrap else ""
    got = group_names(groups, root)
    assert got == {
        "decay": sorted(
            p + n
            for n in [
                "vit.qkv.weight",
                "text_encoder.query.weight",
                "report_decoder.visual_proj.weight",
            ]
        ),
        "no_decay": sorted(
            p + n
            for n in [
                "vit.pos_embed",
                "vit.cls_token",
                "vit.leaf_queries",
                "vit.qkv.bias",
                "vit.norm.weight",
                "vit.norm.bias",
                "mae_decoder.mask_token",
                "text_encoder.query.bias",
                "text_encoder.position_embeddings.weight",
                "report_decoder.visual_proj.bias",
            ]
        ),
        "decay_lr_x0.1": sorted(
            p + n for n in ["report_decoder.lm.wte.weight", "report_decoder.lm.c_fc.weight"]
        ),
        "no_decay_lr_x0.1": sorted(
            p + n for n in ["report_decoder.lm.wpe.weight", "report_decoder.lm.c_fc.bias"]
        ),
    }
    by_name = {g["name"]: g for g in groups}
    assert (
        by_name["decay"]["weight_decay"] == 0.05
        and by_name["decay_lr_x0.1"]["weight_decay"] == 0.05
    )
    assert (
        by_name["no_decay"]["weight_decay"] == 0.0
        and by_name["no_decay_lr_x0.1"]["weight_decay"] == 0.0
    )
    assert by_name["decay"]["lr_scale"] == 1.0 and by_name["no_decay"]["lr_scale"] == 1.0
    assert (
        by_name["decay_lr_x0.1"]["lr_scale"] == 0.1
        and by_name["no_decay_lr_x0.1"]["lr_scale"] == 0.1
    )
    # the groups build an optimizer and the schedule scales the LM's lr
    opt = torch.optim.AdamW(groups, lr=1.0)
    adjust_learning_rate(opt, 2.0, BASE, MIN, 2.0, 10)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == pytest.approx(
        {
            "decay": BASE,
            "no_decay": BASE,
            "decay_lr_x0.1": BASE * 0.1,
            "no_decay_lr_x0.1": BASE * 0.1,
        }
    )


def test_no_weight_decay_rules():
    w2, w1 = torch.zeros(2, 2), torch.zeros(2)
    assert no_weight_decay("blocks.0.norm1.weight", w1)
    assert no_weight_decay("embeddings.word_embeddings.bias", w1)
    assert no_weight_decay("blocks.0.gamma", w2[0]) and not no_weight_decay(
        "blocks.0.fc.weight", w2
    )
    assert not no_weight_decay("encoder.layer.0.attention.self.query.weight", w2)
    assert not no_weight_decay("embeddings.token_type_embeddings.weight", w2)
    assert no_weight_decay("embeddings.position_embeddings.weight", w2)


def test_effective_lr():
    cfg = load_config(overrides=["data.batch_size=8", "optim.accum_iter=2", "optim.blr=1.5e-4"])
    assert effective_lr(cfg, world_size=4) == pytest.approx(1.5e-4 * 8 * 2 * 4 / 256)  # 3.75e-5
    assert effective_lr(cfg, world_size=1) == pytest.approx(9.375e-6)
    cfg.optim.lr = 2e-4
    assert effective_lr(cfg, world_size=4) == 2e-4


def test_min_lr_above_the_lr_is_an_error_naming_both():
    cfg = load_config(overrides=["optim.lr=1e-4", "optim.min_lr=1e-3"])
    with pytest.raises(ConfigError, match=r"optim.min_lr=0.001 must be <= the learning rate "
                                          r"0.0001 \(optim.lr\)"):
        effective_lr(cfg, world_size=1)
    cfg = load_config(overrides=["optim.min_lr=1e-3", "data.batch_size=8"])  # lr from blr
    with pytest.raises(ConfigError, match=r"optim.blr=0.00015 x effective batch 16 / 256"):
        effective_lr(cfg, world_size=2)
