"""L_aca in both forms: hand-computed values, an independent transcription of the official formula,
and two gloo ranks equal to one process."""

import math

import pytest
import torch

from models.consistency import AnatomicalConsistency
from tests.helpers import loss_ranks_worker as worker
from tests.test_contrastive import assert_ranks_equal_one_process, sp, two_ranks  # noqa: F401


def official_transcription(q, t, tpar, w=0.9):
    """SS-ACL's L_aca written out with loops: for anchor (b, i) and image b', cross-entropy over j
    of Tpar q_bi . q_b'j against w [j = i] + (1 - w) softmax_b'(Tpar t_b . t_b')."""
    q = q / q.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    B, K, _ = q.shape
    terms = []
    for b in range(B):
        pairs = (tpar * t[b] @ t.T).softmax(0)
        for c in range(B):
            for i in range(K):
                logp = (tpar * q[c] @ q[b, i]).log_softmax(0)
                target = (1 - w) * pairs[c] * torch.ones(K) + w * torch.nn.functional.one_hot(
                    torch.tensor(i), K)
                terms.append(-(target * logp).sum())
    return torch.stack(terms).mean()


def test_official_equals_the_transcription():
    g = torch.Generator().manual_seed(5)
    leaves, text = torch.randn(4, 3, 6, generator=g), torch.randn(4, 5, generator=g)
    tpar = torch.tensor(2.5)
    got = AnatomicalConsistency("official")(leaves, text, tpar)
    torch.testing.assert_close(got, official_transcription(leaves, text, tpar))


def test_official_gradient_reaches_tpar_and_the_own_leaves_only():
    leaves = torch.randn(3, 4, 5, requires_grad=True)
    text = torch.randn(3, 6, requires_grad=True)
    tpar = torch.tensor(10.0, requires_grad=True)
    AnatomicalConsistency("official")(leaves, text, tpar).backward()
    assert leaves.grad.abs().sum() > 0 and tpar.grad != 0 and text.grad is None


def test_project_hand_computed():
    # image 1 anatomies (1, 0), (0, 1); image 2 anatomies (1, 0), (0.6, 0.8); reports orthogonal
    leaves = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.6, 0.8]]])
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    aca = AnatomicalConsistency("project", identity_weight=0.9, temperature=1.0, text_temperature=0.5)
    s = math.exp(2) / (math.exp(2) + 1)  # softmax over b' of text sims (1, 0) / 0.5
    lam = [[0.9 + 0.1 * s, 0.1 * (1 - s)], [0.1 * (1 - s), 0.9 + 0.1 * s]]
    unit = text / text.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(aca.pair_weights(unit, unit, 0), torch.tensor(lam))
    # sum_i CE_j for each pair (b, b'): rows of S = q_b q_b'^T, label i
    ce = [[2 * sp(-1), sp(-0.4) + sp(-0.8)],  # (1,1): I; (1,2): rows [1, .6], [0, .8]
          [sp(-1) + sp(-0.2), 2 * sp(-0.4)]]  # (2,1): rows [1, 0], [.6, .8]; (2,2): rows [1, .6], [.6, 1]
    expect = sum(lam[b][c] * ce[b][c] for b in range(2) for c in range(2)) / (2 * 2)
    assert aca(leaves, text).item() == pytest.approx(expect, rel=1e-5)


def test_project_gradient_and_no_text_gradient():
    leaves = torch.randn(4, 5, 8, requires_grad=True)
    text = torch.randn(4, 6, requires_grad=True)
    loss = AnatomicalConsistency("project")(leaves, text)
    loss.backward()
    assert leaves.grad.abs().sum() > 0 and text.grad is None  # the text target is detached
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = AnatomicalConsistency("project")(leaves.bfloat16(), text)
    assert low.dtype == torch.float32
    # anatomies that are orthogonal within the image and identical across images score lower
    proto = torch.eye(8)[:5].expand(4, -1, -1)
    assert AnatomicalConsistency("project")(proto, text).item() < loss.item()


@pytest.mark.parametrize("form", worker.FORMS)
def test_two_ranks_equal_one_process(two_ranks, form):  # noqa: F811
    data = worker.make_data(2)
    one = worker.run(worker.ToyAca(form), (data["leaves"], data["text"]))
    assert_ranks_equal_one_process(two_ranks, f"aca_{form}", one)
