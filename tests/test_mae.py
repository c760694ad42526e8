import pytest
import torch

from models.mae import MAEDecoder, patchify, unpatchify
from models.vit import VisionTransformer, random_masking


def test_patchify_layout_and_roundtrip():
    imgs = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    x = patchify(imgs, 2)
    assert x.shape == (2, 4, 12)
    # patch 1 = rows 0-1, cols 2-3; pixel order (p, q, c)
    expect = torch.stack(
        [imgs[0, c, p, 2 + q] for p in range(2) for q in range(2) for c in range(3)]
    )
    torch.testing.assert_close(x[0, 1], expect)
    torch.testing.assert_close(unpatchify(x, 2, (2, 2)), imgs)


def test_decoder_unshuffles_and_adds_positions():
    torch.manual_seed(0)
    dec = MAEDecoder((2, 2), patch_size=2, in_chans=3, embed_dim=8, decoder_dim=8, decoder_depth=0,
                     decoder_heads=2).eval()
    full = torch.randn(2, 4, 8)
    cls = torch.randn(2, 8)
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.4, 0.6]])
    keep, mask, restore = random_masking(2, 4, 0.5, "cpu", noise)
    visible = full.gather(1, keep[..., None].expand(-1, -1, 8))
    with torch.no_grad():
        pred = dec(cls, visible, restore)
        assert pred.shape == (2, 4, 12)
        # with no blocks, each position is pred(norm(token + pos)) on its own
        for b in range(2):
            for pos in range(4):
                tok = dec.mask_token[0, 0] if mask[b, pos] else dec.decoder_embed(full[b, pos])
                expect = dec.decoder_pred(dec.decoder_norm(tok + dec.decoder_pos_embed[0, pos]))
                torch.testing.assert_close(pred[b, pos], expect)


def test_loss_hand_computed():
    dec = MAEDecoder(
        (1, 2),
        patch_size=1,
        in_chans=2,
        embed_dim=4,
        decoder_dim=4,
        decoder_depth=1,
        decoder_heads=1,
    )
    imgs = torch.tensor([[[[1.0, 2.0]], [[3.0, 5.0]]]])  # [1, 2, 1, 2]: patches (1, 3) and (2, 5)
    pred = torch.tensor([[[0.0, 3.0], [2.0, 1.0]]])
    mask = torch.tensor([[0.0, 1.0]])  # only patch 1 is masked
    # patch 1: ((2-2)^2 + (1-5)^2) / 2 = 8; patch 0 is visible and does not count
    torch.testing.assert_close(dec.loss(imgs, pred, mask), torch.tensor(8.0))
    both = torch.ones(1, 2)  # patch 0: ((0-1)^2 + 0) / 2 = 0.5 -> mean (0.5 + 8) / 2
    torch.testing.assert_close(dec.loss(imgs, pred, both), torch.tensor(4.25))
    # targets (x - mean) / sqrt(unbiased var + 1e-6): (-1, 1)/sqrt(2) and (-1.5, 1.5)/sqrt(4.5)
    dec.norm_pix_loss = True
    t1 = torch.tensor([-1.5, 1.5]) / (4.5 + 1e-6) ** 0.5
    expect = ((pred[0, 1] - t1) ** 2).mean()
    torch.testing.assert_close(dec.loss(imgs, pred, mask), expect)


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_reconstruction_learns(one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    c = torch.rand(8, 2, 1, 1, generator=g) - 0.5
    imgs = torch.exp(-((xx - c[:, 0]) ** 2 + (yy - c[:, 1]) ** 2) * 6)[:, None].expand(
        -1, 3, -1, -1
    )
    vit = VisionTransformer(32, 8, 32, 2, 2, 2.0)
    dec = MAEDecoder(
        vit.grid, 8, 3, 32, decoder_dim=32, decoder_depth=1, decoder_heads=2, mlp_ratio=2.0
    )
    opt = torch.optim.AdamW(list(vit.parameters()) + list(dec.parameters()), lr=2e-3)
    losses = []
    for _ in range(40):
        out = vit(imgs, mask_ratio=0.5)
        loss = dec.loss(imgs, dec(out["cls"], out["patches"], out["ids_restore"]), out["mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in dec.parameters())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_super_resolution_target_predicts_the_2x_patches():
    """data.sr_scale 2: each of the 2 x 2 patches predicts its 4 x 4 pixels of the 8 x 8 image."""
    torch.manual_seed(0)
    dec = MAEDecoder((2, 2), patch_size=2, embed_dim=8, decoder_dim=8, decoder_depth=1,
                     decoder_heads=2, target_scale=2)
    big = torch.randn(1, 3, 8, 8)
    pred = dec(torch.randn(1, 8), torch.randn(1, 2, 8), torch.tensor([[0, 1, 2, 3]]))
    assert pred.shape == (1, 4, 4 * 4 * 3)
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    target = torch.stack([big[0, :, r : r + 4, c : c + 4].permute(1, 2, 0).reshape(-1)
                          for r in (0, 4) for c in (0, 4)])  # row-major patches, pixels (p, q, c)
    expect = (pred[0, 2:] - target[2:]).pow(2).mean()
    torch.testing.assert_close(dec.loss(big, pred, mask), expect)
