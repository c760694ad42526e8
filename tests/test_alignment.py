import math
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from models.alignment import AnatomicalConsistency, ImageReportContrastive
from tests.helpers import alignment_worker as worker
from tests.helpers import torchrun

ROOT = Path(__file__).resolve().parent.parent



def sp(x):  # log(1 + e^x): the cross-entropy of a 2-way choice that loses by -x
    return math.log1p(math.exp(x))


def identity_contrastive(scale=10.0):
    con = ImageReportContrastive(embed_dim=2, text_dim=2, num_patches=2, temperature=0.03)
    with torch.no_grad():
        con.img_proj.weight.copy_(torch.eye(2))
        con.img_proj.bias.zero_()
        con.logit_scale.fill_(math.log(scale))
    return con


# z1 = (1, 0), z2 = (0, 1) (one visible patch each); t1 = (1, 0), t2 = (0.6, 0.8)
PATCHES = torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]]])
TEXT = torch.tensor([[5.0, 0.0], [0.6, 0.8]])
MASK = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # image 1 sees patch 0, image 2 patch 1


def test_contrastive_init():
    con = ImageReportContrastive(4, 3, 5, temperature=0.03)
    assert con.logit_scale.exp().item() == pytest.approx(1 / 0.03)
    # neutral at init
    torch.testing.assert_close(con.position_weight(torch.rand(7, 5)), torch.ones(7))


def test_contrastive_hand_computed():
    con = identity_contrastive(10.0)
    # logits = 10 * cos: i2t rows [10, 6], [0, 8]; t2i rows (texts) [10, 0], [6, 8]
    expect = (sp(-4) + sp(-8) + sp(-10) + sp(-2)) / 4
    assert con(PATCHES, TEXT, MASK).item() == pytest.approx(expect, rel=1e-5)
    # position weight 2 for image 1 (visibility (1, 0) -> softplus(ln 3) / ln 2 = 2), 1 for image 2
    with torch.no_grad():
        con.pos_weight.weight.copy_(torch.tensor([[math.log(3.0), 0.0]]))
    torch.testing.assert_close(con.position_weight(1 - MASK), torch.tensor([2.0, 1.0]))
    # i2t rows [20, 12], [0, 8]; t2i rows [20, 0], [12, 8] (image 1's column doubled)
    expect = (sp(-8) + sp(-8) + sp(-20) + sp(4)) / 4
    assert con(PATCHES, TEXT, MASK).item() == pytest.approx(expect, rel=1e-5)


def test_contrastive_scale_is_clamped():
    con = identity_contrastive(10.0)
    con.max_logit_scale = 5.0  # logits = 5 * cos
    loss = con(PATCHES, TEXT, MASK)
    expect = (sp(-2) + sp(-4) + sp(-5) + sp(-1)) / 4
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    loss.backward()
    assert con.logit_scale.grad.item() == 0.0  # clamped: no push beyond the cap


def test_aca_hand_computed():
    # image 1 anatomies (1, 0), (0, 1); image 2 anatomies (1, 0), (0.6, 0.8); reports orthogonal
    leaves = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.6, 0.8]]])
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    aca = AnatomicalConsistency(identity_weight=0.9, temperature=1.0, text_temperature=0.5)
    s = math.exp(2) / (math.exp(2) + 1)  # softmax over b' of text sims (1, 0) / 0.5
    lam = [[0.9 + 0.1 * s, 0.1 * (1 - s)], [0.1 * (1 - s), 0.9 + 0.1 * s]]
    torch.testing.assert_close(
        aca.pair_weights(
            text / text.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True), 0
        ),
        torch.tensor(lam),
    )
    # sum_i CE_j for each pair (b, b'): rows of S = q_b q_b'^T, label i
    ce = [[2 * sp(-1), sp(-0.4) + sp(-0.8)],  # (1,1): I; (1,2): rows [1, .6], [0, .8]
          # (2,1): rows [1, 0], [.6, .8]; (2,2): rows [1, .6], [.6, 1]
          [sp(-1) + sp(-0.2), 2 * sp(-0.4)]]
    expect = sum(lam[b][c] * ce[b][c] for b in range(2) for c in range(2)) / (2 * 2)
    assert aca(leaves, text).item() == pytest.approx(expect, rel=1e-5)


def test_aca_gradient_and_no_text_gradient():
    leaves = torch.randn(4, 5, 8, requires_grad=True)
    text = torch.randn(4, 6, requires_grad=True)
    loss = AnatomicalConsistency()(leaves, text)
    loss.backward()
    assert leaves.grad.abs().sum() > 0 and text.grad is None  # the text target is detached
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = AnatomicalConsistency()(leaves.bfloat16(), text)
    assert low.dtype == torch.float32
    # anatomies that are orthogonal within the image and identical across images score lower
    proto = torch.eye(8)[:5].expand(4, -1, -1)
    assert AnatomicalConsistency()(proto, text).item() < loss.item()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    torchrun(2, "-m", "tests.helpers.alignment_worker", tmp_path, timeout=180)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    data = worker.make_data(2)
    data["patches"].requires_grad_(True)
    data["leaves"].requires_grad_(True)
    refs: dict[str, nn.Module] = {"con": worker.ToyCon(), "aca": worker.ToyAca()}
    losses = {"con": refs["con"](data["patches"], data["text"], data["mask"]),
              "aca": refs["aca"](data["leaves"], data["text"])}
    for name in ("con", "aca"):
        losses[name].backward()
        # the mean of the per-rank losses (each over its own rows) is the global-batch loss
        mean = (res[0][name]["loss"] + res[1][name]["loss"]) / 2
        torch.testing.assert_close(mean, losses[name].detach())
        assert not torch.allclose(res[0][name]["loss"], res[1][name]["loss"])
        # DDP-averaged parameter gradients equal the single-process ones, on both ranks
        for k, p in refs[name].named_parameters():
            for r in range(2):
                torch.testing.assert_close(
                    res[r][name]["grads"][k], p.grad, msg=f"{name} {k} rank {r}"
                )
    n = worker.PER_RANK
    for r in range(2):  # inputs get world_size x their slice of the single-process gradient
        torch.testing.assert_close(
            res[r]["patches_grad"], 2 * data["patches"].grad[r * n : (r + 1) * n]
        )
        torch.testing.assert_close(
            res[r]["leaves_grad"], 2 * data["leaves"].grad[r * n : (r + 1) * n]
        )
