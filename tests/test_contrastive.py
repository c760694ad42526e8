"""L_con in both forms: hand-computed values, an independent transcription of the official formula,
and two gloo ranks equal to one process."""

import math

import pytest
import torch

from models.contrastive import ImageReportContrastive
from tests.helpers import loss_ranks_worker as worker
from tests.helpers import torchrun


def sp(x):  # log(1 + e^x): the cross-entropy of a 2-way choice that loses by -x
    return math.log1p(math.exp(x))


def identity_contrastive(form, scale=10.0):
    con = ImageReportContrastive(embed_dim=2, text_dim=2, num_patches=2, form=form, temperature=0.03)
    with torch.no_grad():
        con.img_proj.weight.copy_(torch.eye(2))
        con.img_proj.bias.zero_()
        if form == "project":
            con.logit_scale.fill_(math.log(scale))
    return con


# z1 = (1, 0), z2 = (0, 1) (one visible patch each); t1 = (1, 0), t2 = (0.6, 0.8)
PATCHES = torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]]])
TEXT = torch.tensor([[5.0, 0.0], [0.6, 0.8]])
MASK = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # image 1 sees patch 0, image 2 patch 1


def official_transcription(img, txt, visible, a, c, tpar):
    """SS-ACL's L_con written out: four cross-entropies against the diagonal, averaged."""
    z = img / img.norm(dim=1, keepdim=True)
    t = txt / txt.norm(dim=1, keepdim=True)
    i2t = tpar * z @ t.T
    t2i = tpar * t @ z.T
    s = torch.log(1 + torch.exp(visible @ a + c))  # one weight per image

    def ce(logits):
        return -logits.log_softmax(dim=1).diagonal().mean()

    def weighted_ce(logits):
        per_row = -logits.log_softmax(dim=1).diagonal()
        return (s * per_row).sum() / s.sum()

    return (ce(i2t * s[:, None]) + ce(t2i * s[:, None]) + weighted_ce(i2t) + weighted_ce(t2i)) / 4


def test_initial_weights_and_scales():
    official = ImageReportContrastive(4, 3, 5, "official")
    torch.testing.assert_close(official.position_weight(torch.rand(7, 5)), torch.full((7,), math.log(2)))
    project = ImageReportContrastive(4, 3, 5, "project", temperature=0.03)
    assert project.logit_scale.exp().item() == pytest.approx(1 / 0.03)
    torch.testing.assert_close(project.position_weight(torch.rand(7, 5)), torch.ones(7))
    with pytest.raises(ValueError, match="loss.con.form"):
        ImageReportContrastive(4, 3, 5, "clip")


def test_official_hand_computed():
    con = identity_contrastive("official")
    # Tpar = 10, s = ln 2 for both images: i2t rows 10 * [1, .6], [0, .8]; t2i rows 10 * [1, 0], [.6, .8]
    s = math.log(2)
    scaled = (sp(-4 * s) + sp(-8 * s)) / 2 + (sp(-10 * s) + sp(-2 * s)) / 2
    plain = (sp(-4) + sp(-8)) / 2 + (sp(-10) + sp(-2)) / 2  # equal weights: a plain mean
    got = con(PATCHES, TEXT, MASK, torch.tensor(10.0))
    assert got.item() == pytest.approx((scaled + plain) / 4, rel=1e-5)


def test_official_equals_the_transcription():
    g = torch.Generator().manual_seed(3)
    B, L, LV, D, DT = 5, 6, 3, 4, 3
    con = ImageReportContrastive(D, DT, L, "official")
    with torch.no_grad():
        con.pos_weight.weight.normal_(generator=g)
        con.pos_weight.bias.fill_(0.3)
    patches, text = torch.randn(B, LV, D, generator=g), torch.randn(B, DT, generator=g)
    mask = torch.stack([torch.randperm(L, generator=g) >= LV for _ in range(B)]).float()
    tpar = torch.tensor(7.0, requires_grad=True)
    got = con(patches, text, mask, tpar)
    img = con.img_proj(patches.mean(1))
    want = official_transcription(img, text, 1 - mask, con.pos_weight.weight[0], con.pos_weight.bias[0], tpar)
    torch.testing.assert_close(got, want)
    got.backward()
    assert tpar.grad is not None and tpar.grad != 0


def test_project_hand_computed():
    con = identity_contrastive("project", 10.0)
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


def test_project_scale_is_clamped():
    con = identity_contrastive("project", 10.0)
    con.max_logit_scale = 5.0  # logits = 5 * cos
    loss = con(PATCHES, TEXT, MASK)
    expect = (sp(-2) + sp(-4) + sp(-5) + sp(-1)) / 4
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    loss.backward()
    assert con.logit_scale.grad.item() == 0.0  # clamped: no push beyond the cap


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    torchrun(2, "-m", "tests.helpers.loss_ranks_worker", out, timeout=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def assert_ranks_equal_one_process(two_ranks, key, one):
    """The ranks' mean loss is the global loss, their DDP-averaged parameter gradients equal one
    process's, and each rank's inputs get world x their slice of one process's input gradient."""
    loss, grads, input_grad = one
    mean = (two_ranks[0][key][0] + two_ranks[1][key][0]) / 2
    torch.testing.assert_close(mean, loss)
    n = worker.PER_RANK
    for r in range(2):
        for k, g in grads.items():
            torch.testing.assert_close(two_ranks[r][key][1][k], g, msg=f"{key} {k} rank {r}")
        torch.testing.assert_close(two_ranks[r][key][2], 2 * input_grad[r * n : (r + 1) * n])


@pytest.mark.parametrize("form", worker.FORMS)
def test_two_ranks_equal_one_process(two_ranks, form):
    data = worker.make_data(2)
    one = worker.run(worker.ToyCon(form), (data["patches"], data["text"], data["mask"]))
    assert_ranks_equal_one_process(two_ranks, f"con_{form}", one)
