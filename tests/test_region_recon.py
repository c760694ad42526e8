"""Region reconstruction in both forms: hand-computed values, and the batched call equals the loop
over inner nodes (one decoder call each, unpadded) that the official code runs."""

import pytest
import torch

from models.mae import MAEDecoder
from models.region_recon import PixelRegionReconstruction, RegionDecoder
from vocab.anatomy_graph import AnatomyGraph

GRAPH = AnatomyGraph.default()


def ln(x):
    """Parameter-free LayerNorm, by hand."""
    m = x.mean(-1, keepdim=True)
    return (x - m) / ((x - m).pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()


def test_project_hand_computed_two_level_graph():
    g = AnatomyGraph({"root": ("a", "b", "c"), "a": ("a1", "a2")}, root="root")
    assert g.names == ("root", "a", "b", "c", "a1", "a2") and g.inner_names == ("root", "a")
    dec = RegionDecoder(g, embed_dim=3, decoder_dim=3, depth=0, num_heads=1)  # Dec = LN of token 0
    m = torch.tensor([[[0, 0, 0], [1, 2, 3], [3, 0, 0], [2, 1, 0], [0, 0, 6], [2, 0, 0]]], dtype=torch.float32)
    u = torch.tensor([[[1, 0, 0], [0, 1, 0], [9, 9, 9], [9, 9, 9], [9, 9, 9], [9, 9, 9]]], dtype=torch.float32)
    # root: pred = LN(mean(a, b, c)) = LN([2, 1, 1]), target = LN(u_root);
    # a: pred = LN(mean(a1, a2)) = LN([1, 0, 3]), target = LN(u_a)
    pred = torch.stack([ln(torch.tensor([2.0, 1.0, 1.0])), ln(torch.tensor([1.0, 0.0, 3.0]))])
    target = torch.stack([ln(u[0, 0]), ln(u[0, 1])])
    torch.testing.assert_close(dec(m, u), (pred - target).pow(2).mean())


def mae_decoder(depth=2, scale=1):
    torch.manual_seed(0)
    return MAEDecoder((2, 2), patch_size=2, embed_dim=16, decoder_dim=8, decoder_depth=depth,
                      decoder_heads=2, mlp_ratio=2.0, target_scale=scale)


def official_per_node(dec, masked, unmasked):
    """The official loop: per inner node, Dec([mean of children, children]) vs Dec([parent])."""
    terms = []
    for name in GRAPH.inner_names:
        kids = [GRAPH.index[c] for c in GRAPH.children(name)]
        children = masked[:, kids]
        pred = dec.decode_tokens(torch.cat([children.mean(1, keepdim=True), children], 1))[:, 0]
        target = dec.decode_tokens(unmasked[:, [GRAPH.index[name]]])[:, 0].detach()
        terms.append(((pred - target) ** 2).mean())
    return sum(terms) / len(terms)


@pytest.mark.parametrize("scale", [1, 2])
def test_official_batched_equals_the_per_node_loop(scale):
    dec = mae_decoder(scale=scale)
    masked = torch.randn(3, 32, 16, requires_grad=True)
    unmasked = torch.randn(3, 32, 16, requires_grad=True)
    loss = PixelRegionReconstruction(GRAPH)(masked, unmasked, dec)
    torch.testing.assert_close(loss, official_per_node(dec, masked, unmasked))
    assert dec.decoder_pred.out_features == (2 * scale) ** 2 * 3  # the pixel head of the MAE target
    loss.backward()
    assert unmasked.grad is None  # the target is detached
    assert masked.grad.abs().sum() > 0 and masked.grad[:, 0].abs().sum() == 0  # the root is nobody's child
    trained = [n for n, p in dec.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert set(trained) == {n for n, _ in dec.named_parameters()} - {"mask_token"}


def reference_decode(dec, first, children):
    """Project form, one inner node at a time, unpadded, no attention mask."""
    x = dec.embed(torch.cat([first[:, None], children], 1))
    for blk in dec.blocks:
        x, _ = blk(x)
    return dec.norm(x[:, 0])


def test_project_batched_equals_per_node_loop_and_target_is_detached():
    torch.manual_seed(0)
    dec = RegionDecoder(GRAPH, embed_dim=16, decoder_dim=24, depth=2, num_heads=2, mlp_ratio=2.0)
    masked = torch.randn(3, 32, 16, requires_grad=True)
    unmasked = torch.randn(3, 32, 16, requires_grad=True)
    loss = dec(masked, unmasked)
    per_node = []
    with torch.no_grad():
        for name in GRAPH.inner_names:
            kids = [GRAPH.index[c] for c in GRAPH.children(name)]
            pred = reference_decode(dec, masked[:, kids].mean(1), masked[:, kids])
            target = reference_decode(dec, unmasked[:, GRAPH.index[name]], unmasked[:, kids])
            per_node.append((pred - target).pow(2).mean())
    torch.testing.assert_close(loss, torch.stack(per_node).mean())  # the mean over inner nodes
    loss.backward()
    assert unmasked.grad is None and masked.grad.abs().sum() > 0
    assert masked.grad[:, 0].abs().sum() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters())


@pytest.mark.parametrize("official", [True, False])
def test_bf16_autocast(official):
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        masked, unmasked = torch.randn(2, 32, 16, requires_grad=True), torch.randn(2, 32, 16)
        if official:
            loss = PixelRegionReconstruction(GRAPH)(masked, unmasked, mae_decoder(depth=1))
        else:
            loss = RegionDecoder(GRAPH, embed_dim=16, decoder_dim=16, depth=1, num_heads=2)(masked, unmasked)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
