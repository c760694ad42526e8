import math

import pytest
import torch

from models.location_prior import LocationPriorStats, estimate_location_prior, prior_bias, rest_loss


def marked_batch(n=40, size=16, patch=4, seed=0):
    """Noise images; leaf 0's positives are brighter on patch (1, 2), leaf 2's darker on patch (3,
    0), leaf 1 has no positive image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g) * 0.1
    anat = torch.zeros(n, 3, dtype=torch.bool)
    anat[: n // 2, 0] = True
    anat[n // 4: 3 * n // 4, 2] = True
    images[anat[:, 0], :, patch:2 * patch, 2 * patch:3 * patch] += 1.0
    images[anat[:, 2], :, 3 * patch:, :patch] -= 1.0
    return {"image": images, "anatomies": anat}


def test_prior_peaks_where_the_positive_images_differ_and_is_uniform_without_positives():
    batch = marked_batch()
    prior = estimate_location_prior(
        [batch, None], num_leaves=3, image_size=16, patch_size=4, device="cpu"
    )
    assert prior.shape == (3, 16)
    torch.testing.assert_close(prior.sum(1), torch.ones(3))
    assert prior[0].argmax() == 1 * 4 + 2          # brighter patch
    assert prior[2].argmax() == 3 * 4 + 0          # darker patch: the sign does not matter
    assert prior[0].max() > 0.5 and prior[2].max() > 0.5
    torch.testing.assert_close(prior[1], torch.full((16,), 1 / 16))


def test_streamed_batches_give_the_one_pass_prior():
    batch = marked_batch()
    halves = [{k: v[:13] for k, v in batch.items()}, {k: v[13:] for k, v in batch.items()}]
    one = estimate_location_prior([batch], 3, 16, 4, "cpu")
    two = estimate_location_prior(halves, 3, 16, 4, "cpu")
    torch.testing.assert_close(one, two)


def test_prior_bias_is_a_clamped_log_ratio():
    prior = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    bias = prior_bias(prior, gain=2.0, min_ratio=1e-3)
    expected = torch.tensor([[0.0, 2 * math.log(0.5), 2 * math.log(0.5), 2 * math.log(1e-3)]])
    torch.testing.assert_close(bias, expected)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no training image"):
        estimate_location_prior([None], 3, 16, 4, "cpu")
    stats = LocationPriorStats(3, 16, 16)
    stats.update(marked_batch()["image"], marked_batch()["anatomies"])
    with pytest.raises(ValueError, match="multiple of patch size"):
        stats.prior(5)


def test_rest_loss_is_the_kl_to_the_prior_over_pairs_without_a_finding():
    prior = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    positive = torch.tensor([[False, True], [True, True]])
    # (0, 0): the prior at half mass
    attn = torch.tensor([[[0.25, 0.25, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]],
                         # positives: anything goes
                         [[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]]])
    assert rest_loss(attn, prior, positive).item() == pytest.approx(0.0, abs=1e-6)
    attn[0, 0] = torch.tensor([0.75, 0.25, 0.0, 0.0])
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    # 1 of 4 pairs
    assert rest_loss(attn, prior, positive).item() == pytest.approx(kl / 4, rel=1e-5)
    assert rest_loss(attn, prior, torch.ones(2, 2, dtype=torch.bool)).item() == 0.0


def test_rest_loss_moves_attention_logits_towards_the_prior():
    prior = torch.tensor([[0.1, 0.6, 0.3]])
    logits = torch.tensor([[[3.0, 0.0, -2.0]]], requires_grad=True)
    opt = torch.optim.SGD([logits], lr=1.0)
    first = None
    for _ in range(50):
        loss = rest_loss(logits.softmax(-1), prior, torch.zeros(1, 1, dtype=torch.bool))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * first
    assert logits.softmax(-1)[0, 0].argmax() == 1
