import math

import pytest
import torch
import torch.nn.functional as F

from models.heatmaps import gaussian_blur, leaf_heatmaps, normalize_maps, sentence_heatmap
from vocab.anatomy_graph import AnatomyGraph

GRAPH = AnatomyGraph.default()


def test_maps_are_normalised_and_peak_on_the_attended_patch():
    grid, size = (2, 3), (32, 48)  # non-square: a row/column mix-up would move the peak
    attn = torch.full((2, 4, 6), 0.01)
    attn[0, 1, 1 * 3 + 2] = 1.0  # query 1 of image 0 looks at patch row 1, column 2
    attn[1, 3, 0] = 1.0
    maps = leaf_heatmaps(attn, grid, size)
    assert maps.shape == (2, 4, 32, 48)
    flat = maps.flatten(-2)
    assert torch.allclose(flat[0, 1].max(), torch.tensor(1.0)) and flat[0, 1].min() == 0
    r, c = divmod(flat[0, 1].argmax().item(), 48)
    assert 16 <= r < 32 and 32 <= c < 48  # inside patch (1, 2): rows 16-31, columns 32-47
    r, c = divmod(flat[1, 3].argmax().item(), 48)
    assert r < 16 and c < 16
    assert (maps[0, 0] == 0).all()  # constant attention -> constant map -> zeros


def test_no_blur_is_bilinear_upsampling():
    attn = torch.rand(1, 2, 16)
    maps = leaf_heatmaps(attn, (4, 4), 8, sigma=0)
    up = F.interpolate(attn.view(1, 2, 4, 4), size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(maps, normalize_maps(up), atol=1e-6)
    # default sigma smooths
    assert not torch.allclose(leaf_heatmaps(attn, (4, 4), 8), maps, atol=1e-3)


def test_gaussian_blur_hand_computed():
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 10] = 1.0
    y = gaussian_blur(x, 1.0)
    k = torch.exp(-0.5 * torch.arange(-3, 4.0) ** 2)
    k = k / k.sum()
    assert torch.allclose(y[0, 0, 10, 7:14], k * k[3], atol=1e-6)  # separable: k(dx) * k(0)
    assert torch.allclose(y[0, 0, 8, 11], k[1] * k[4], atol=1e-7)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(gaussian_blur(x, 0), x)


def test_visible_patches_only_is_an_error():
    with pytest.raises(ValueError, match="unmasked"):
        leaf_heatmaps(torch.rand(1, 25, 8), (4, 4), 32)


def test_heatmaps_from_vit_attention():
    from models.vit import VisionTransformer
    vit = VisionTransformer(32, 8, 16, 1, 2, 2.0).eval()
    out = vit(torch.randn(2, 3, 32, 32), torch.randn(25, 16), return_attn=True)
    maps = leaf_heatmaps(out["attn"], vit.grid, 32)
    assert maps.shape == (2, 25, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    assert math.isclose(maps.amax((-2, -1)).min().item(), 1.0, abs_tol=1e-6)




def test_sentence_heatmap_is_mean_of_its_leaves():
    maps = torch.zeros(25, 4, 4)
    a, b = GRAPH.leaf_index["left costophrenic angle"], GRAPH.leaf_index["spine"]
    maps[a, 0, 0], maps[b, 0, 1], maps[b, 0, 0] = 1.0, 1.0, 0.5
    m = sentence_heatmap(maps, ["left costophrenic angle", "spine"], GRAPH)
    expected = torch.zeros(4, 4)
    expected[0, 0], expected[0, 1] = 1.0, 0.5 / 0.75  # mean (0.75, 0.5) re-normalised to [0, 1]
    assert torch.allclose(m, expected)
    with pytest.raises(ValueError):
        sentence_heatmap(maps, [], GRAPH)
