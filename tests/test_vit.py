import argparse
import math

import numpy as np
import pytest
import torch

from models.vit import VisionTransformer, prefix_attn_mask, random_masking, sincos_2d

B, IMG, P, D = 2, 32, 8, 32  # grid 4x4 -> L = 16


def tiny(depth=2, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(IMG, P, D, depth, num_heads=2, mlp_ratio=2.0).eval()


def images(seed=1):
    return torch.randn(B, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def mae_numpy_sincos(dim, grid_size):
    """facebookresearch/mae util/pos_embed.py, verbatim logic (without the cls row)."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def reference_forward(vit, images, queries, keep_ids=None, query_bias=None):
    """One full attention per layer with the DESIGN mask written out as an [N, N] matrix
    (and ``query_bias`` [Q, L] added to the query rows' patch logits)."""
    x = vit.patch_embed(images) + vit.pos_embed
    Q = queries.shape[0]
    bias = (
        torch.zeros(x.shape[0], Q, x.shape[1])
        if query_bias is None
        else query_bias.expand(x.shape[0], -1, -1)
    )
    if keep_ids is not None:
        x = x.gather(1, keep_ids[..., None].expand(-1, -1, x.shape[-1]))
        bias = torch.stack([bias[b][:, keep_ids[b]] for b in range(x.shape[0])])
    x = torch.cat(
        [queries.expand(x.shape[0], -1, -1), vit.cls_token.expand(x.shape[0], -1, -1), x], 1
    )
    N, Pn = x.shape[1], Q + 1
    allowed = torch.zeros(N, N, dtype=torch.bool)
    allowed[Pn:, Pn:] = True  # patches see only patches
    allowed[:Pn, Pn:] = True  # queries and CLS see all patches ...
    allowed[range(Pn), range(Pn)] = True  # ... and themselves
    probs = None
    for blk in vit.blocks:
        h = blk.norm1(x)
        H = blk.attn.num_heads
        q, k, v = blk.attn.qkv(h).reshape(x.shape[0], N, 3, H, -1).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        logits[:, :, :Q, Pn:] += bias[:, None]
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        a = (probs @ v).transpose(1, 2).reshape(x.shape[0], N, -1)
        x = x + blk.attn.proj(a)
        x = x + blk.mlp(blk.norm2(x))
    x = vit.norm(x)
    return x[:, :Q], x[:, Q], x[:, Pn:], probs[:, :, :Q, Pn:].mean(1)


def test_sincos_matches_mae():
    got = sincos_2d(D, 4, 4)
    torch.testing.assert_close(got, torch.from_numpy(mae_numpy_sincos(D, 4)).float())
    vit = tiny()
    assert vit.grid == (4, 4) and vit.num_patches == 16
    assert "pos_embed" not in vit.state_dict() and not any(
        "pos_embed" in n for n, _ in vit.named_parameters()
    )


def test_prefix_mask():
    m = prefix_attn_mask(3, 7, "cpu")
    expect = torch.tensor(
        [[1, 0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(m, expect)


def test_matches_full_masked_attention_and_attn():
    vit, x = tiny(), images()
    queries = torch.randn(5, D)
    with torch.no_grad():
        out = vit(x, queries, return_attn=True)
        rq, rc, rp, rattn = reference_forward(vit, x, queries)
    assert (
        out["queries"].shape == (B, 5, D)
        and out["cls"].shape == (B, D)
        and out["patches"].shape == (B, 16, D)
    )
    assert out["attn"].shape == (B, 5, 16) and out["mask"].shape == (B, 16)
    assert out["mask"].sum() == 0 and torch.equal(out["ids_restore"][1], torch.arange(16))
    torch.testing.assert_close(out["queries"], rq)
    torch.testing.assert_close(out["cls"], rc)
    torch.testing.assert_close(out["patches"], rp)
    torch.testing.assert_close(out["attn"], rattn)
    s = out["attn"].sum(-1)  # probability mass on the patches (the rest on the query itself)
    assert (out["attn"] >= 0).all() and (s < 1).all() and (s > 0).all()


def test_queries_never_change_the_image_tokens():
    vit, x = tiny(), images()
    noise = torch.rand(B, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for ratio in (0.0, 0.5):
            a = vit(x, None, mask_ratio=ratio, noise=noise)
            b = vit(x, torch.randn(7, D), mask_ratio=ratio, noise=noise)
            c = vit(x, torch.randn(B, 3, D), mask_ratio=ratio, noise=noise)
            assert torch.equal(a["patches"], b["patches"]) and torch.equal(
                a["patches"], c["patches"]
            )
            torch.testing.assert_close(a["cls"], b["cls"])
            assert a["queries"].shape == (B, 0, D)
        # queries do not see each other: changing query 1 leaves query 0 as it was
        q = torch.randn(2, D)
        q2 = q.clone()
        q2[1] += 1.0
        torch.testing.assert_close(vit(x, q)["queries"][:, 0], vit(x, q2)["queries"][:, 0])


def test_query_bias_is_an_additive_prior_on_the_query_rows_only():
    vit, x = tiny(), images()
    q, bias = torch.randn(3, D), 2.0 * torch.randn(3, 16)
    noise = torch.rand(B, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = vit(x, q, return_attn=True)
        for ratio, keep in ((0.0, None), (0.5, noise.argsort(1)[:, :8])):
            out = vit(x, q, return_attn=True, query_bias=bias, mask_ratio=ratio, noise=noise)
            rq, rc, rp, rattn = reference_forward(vit, x, q, keep_ids=keep, query_bias=bias)
            torch.testing.assert_close(out["queries"], rq)
            torch.testing.assert_close(out["attn"], rattn)
            torch.testing.assert_close(out["cls"], rc)
        out = vit(x, q, return_attn=True, query_bias=bias)
        zero = vit(x, q, return_attn=True, query_bias=torch.zeros(3, 16))
    torch.testing.assert_close(zero["attn"], plain["attn"])
    # CLS and patches ignore the prior
    torch.testing.assert_close(out["cls"], plain["cls"])
    torch.testing.assert_close(out["patches"], plain["patches"])
    peak = torch.full((3, 16), -30.0)
    # a sharp prior wins the last layer's attention
    peak[torch.arange(3), torch.tensor([2, 9, 15])] = 0.0
    with torch.no_grad():
        att = vit(x, q, return_attn=True, query_bias=peak)["attn"]
    assert torch.equal(att.argmax(-1), torch.tensor([[2, 9, 15]] * B))
    with pytest.raises(ValueError, match="query_bias has 2 rows for 3 queries"):
        vit(x, q, query_bias=torch.zeros(2, 16))


def test_random_masking():
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(0))
    keep, mask, restore = random_masking(3, 16, 0.75, "cpu", noise)
    assert keep.shape == (3, 4) and mask.shape == (3, 16)
    assert torch.equal(mask.sum(1), torch.full((3,), 12.0))
    for b in range(3):
        assert torch.equal(keep[b], noise[b].argsort()[:4])  # the lowest-noise patches are kept
        assert torch.equal(mask[b, keep[b]], torch.zeros(4))
        # ids_restore inverts the shuffle
        assert torch.equal(noise[b].argsort()[restore[b]], torch.arange(16))
    # per sample: different rows keep different patches
    assert not torch.equal(keep[0].sort().values, keep[1].sort().values)


def test_masked_forward_keeps_the_chosen_patches():
    vit, x = tiny(), images()
    noise = torch.rand(B, 16, generator=torch.Generator().manual_seed(5))
    keep = noise.argsort(1)[:, :8]
    q = torch.randn(4, D)
    with torch.no_grad():
        out = vit(x, q, mask_ratio=0.5, noise=noise, return_attn=True)
        rq, rc, rp, rattn = reference_forward(vit, x, q, keep_ids=keep)
    assert out["patches"].shape == (B, 8, D) and out["attn"].shape == (B, 4, 8)
    assert torch.equal(out["mask"].sum(1), torch.full((B,), 8.0))
    torch.testing.assert_close(out["patches"], rp)
    torch.testing.assert_close(out["queries"], rq)
    torch.testing.assert_close(out["attn"], rattn)
    # random masking differs per call and per sample
    m1, m2 = vit(x, mask_ratio=0.5)["mask"], vit(x, mask_ratio=0.5)["mask"]
    assert not torch.equal(m1, m2)


def test_gradients_and_bf16_autocast():
    vit, x = tiny(), images()
    vit.train()
    q = torch.randn(3, D, requires_grad=True)
    out = vit(x, q, mask_ratio=0.5)
    (
        out["queries"].pow(2).mean() + out["patches"].pow(2).mean() + out["cls"].pow(2).mean()
    ).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert all(p.grad is not None for p in vit.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vit(x, q, mask_ratio=0.5, return_attn=True)
    assert out["patches"].dtype == torch.bfloat16 and out["attn"].dtype == torch.float32
    assert torch.isfinite(out["queries"].float()).all()
    out["queries"].float().sum().backward()


def test_load_mae_checkpoint(tmp_path):
    src, dst = tiny(seed=1), tiny(seed=2)
    mae = {k: v.clone() for k, v in src.state_dict().items()}  # official MAE layout: same names
    mae["pos_embed"] = torch.zeros(1, 17, D)
    mae["mask_token"] = torch.zeros(1, 1, 16)
    mae["decoder_embed.weight"] = torch.zeros(16, D)
    mae["decoder_blocks.0.attn.qkv.weight"] = torch.zeros(48, 16)
    mae["head.weight"] = torch.zeros(10, D)  # not part of the encoder
    mae["norm.weight"] = torch.ones(D + 1)  # wrong shape -> skipped, not loaded
    path = tmp_path / "mae.pth"
    torch.save({"model": mae, "args": argparse.Namespace(model="mae_vit_base_patch16")}, path)
    before = dst.norm.weight.clone()
    report = dst.load_mae_checkpoint(path)
    sd = dst.state_dict()
    for k in src.state_dict():
        if k != "norm.weight":
            assert torch.equal(sd[k], src.state_dict()[k]), k
    assert torch.equal(dst.norm.weight, before)
    assert (
        "blocks.1.attn.qkv.weight" in report.matched and "patch_embed.proj.weight" in report.matched
    )
    assert "cls_token" in report.matched and report.missing == ["norm.weight"]
    assert (
        "recomputed" in report.skipped["pos_embed"]
        and "decoder" in report.skipped["decoder_embed.weight"]
    )
    assert "decoder" in report.skipped["mask_token"] and "shape" in report.skipped["norm.weight"]
    assert "head.weight" in report.skipped
    assert len(report.matched) == len(src.state_dict()) - 1
    # a bare state_dict works too, with DDP's "module." prefix stripped
    again = tiny(seed=3).load_mae_checkpoint(
        {"module." + k: v for k, v in src.state_dict().items()}
    )
    assert again.missing == [] and not again.skipped


def test_bad_sizes():
    with pytest.raises(ValueError):
        VisionTransformer(30, 8, D, 1, 2)
    with pytest.raises(ValueError):
        VisionTransformer(32, 8, 36, 1, 8)  # 36 not divisible by 8 heads


def test_conv_stem_tokens_are_local_and_feed_the_same_encoder():
    torch.manual_seed(0)
    vit = VisionTransformer(IMG, P, D, 1, num_heads=2, mlp_ratio=2.0, stem="conv").eval()
    x = images().requires_grad_(True)
    out = vit(x, torch.randn(3, D), return_attn=True)
    assert out["patches"].shape == (B, 16, D) and out["local"].shape == (B, 16, D)
    assert out["attn"].shape == (B, 3, 16)
    # a stem token sees exactly its own patch (row 1, column 2 of the 4x4 grid)
    out["local"][0, 6].sum().backward()
    seen = x.grad[0].abs().sum(0) > 0
    assert seen[P:2 * P, 2 * P:3 * P].all() and seen.sum() == P * P
    masked = vit(images(), mask_ratio=0.5)
    assert masked["patches"].shape == (B, 8, D)
    with pytest.raises(ValueError, match="power-of-two"):
        VisionTransformer(36, 12, D, 1, 2, stem="conv")
    with pytest.raises(ValueError, match="stem"):
        VisionTransformer(IMG, P, D, 1, 2, stem="hybrid")


def test_two_scale_stem_encoder_sees_neighbours_local_tokens_do_not():
    torch.manual_seed(0)
    vit = VisionTransformer(IMG, P, D, 1, num_heads=2, mlp_ratio=2.0, stem="two_scale").eval()
    x = images().requires_grad_(True)
    out = vit(x)
    # the leaves' evidence: its own patch only
    out["local"][0, 6].sum().backward()
    seen = x.grad[0].abs().sum(0) > 0
    assert seen[P:2 * P, 2 * P:3 * P].all() and seen.sum() == P * P
    x.grad = None
    # the encoder's token: its patch and beyond
    vit.patch_embed(x)[0, 6].sum().backward()
    seen = x.grad[0].abs().sum(0) > 0
    assert seen[P:2 * P, 2 * P:3 * P].all() and seen.sum() > 2 * P * P
    assert not torch.equal(vit.patch_embed(images()), vit.local_embed(images()))
