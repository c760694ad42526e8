import torch

from models.region_recon import RegionDecoder
from vocab.anatomy_graph import AnatomyGraph


def ln(x):
    """Parameter-free LayerNorm, by hand."""
    m = x.mean(-1, keepdim=True)
    return (x - m) / ((x - m).pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()


def test_hand_computed_two_level_graph():
    g = AnatomyGraph({"root": ("a", "b", "c"), "a": ("a1", "a2")}, root="root")
    assert g.names == ("root", "a", "b", "c", "a1", "a2") and g.inner_names == ("root", "a")
    # Dec = LN of token 0
    dec = RegionDecoder.from_graph(g, embed_dim=3, decoder_dim=3, depth=0, num_heads=1)
    m = torch.tensor(
        [[[0, 0, 0], [1, 2, 3], [3, 0, 0], [2, 1, 0], [0, 0, 6], [2, 0, 0]]], dtype=torch.float32
    )
    u = torch.tensor(
        [[[1, 0, 0], [0, 1, 0], [9, 9, 9], [9, 9, 9], [9, 9, 9], [9, 9, 9]]], dtype=torch.float32
    )
    # root: pred = LN(mean(a, b, c)) = LN([2, 1, 1]), target = LN(u_root); a: pred = LN(mean(a1,
    # a2)) = LN([1, 0, 3]), target = LN(u_a)
    pred = torch.stack([ln(torch.tensor([2.0, 1.0, 1.0])), ln(torch.tensor([1.0, 0.0, 3.0]))])
    target = torch.stack([ln(u[0, 0]), ln(u[0, 1])])
    expect = (pred - target).pow(2).mean()
    torch.testing.assert_close(dec(m, u), expect)


def reference_decode(dec, first, children):
    """One inner node at a time, unpadded, no attention mask."""
    x = dec.embed(torch.cat([first[:, None], children], 1))
    for blk in dec.blocks:
        x, _ = blk(x)
    return dec.norm(x[:, 0])


def test_batched_equals_per_node_loop_and_target_is_detached():
    torch.manual_seed(0)
    g = AnatomyGraph.default()
    dec = RegionDecoder.from_graph(
        g, embed_dim=16, decoder_dim=24, depth=2, num_heads=2, mlp_ratio=2.0
    )
    masked = torch.randn(3, 32, 16, requires_grad=True)
    unmasked = torch.randn(3, 32, 16, requires_grad=True)
    loss = dec(masked, unmasked)
    per_node = []
    with torch.no_grad():
        for name in g.inner_names:
            kids = [g.index[c] for c in g.children(name)]
            pred = reference_decode(dec, masked[:, kids].mean(1), masked[:, kids])
            target = reference_decode(dec, unmasked[:, g.index[name]], unmasked[:, kids])
            per_node.append((pred - target).pow(2).mean())
    torch.testing.assert_close(loss, torch.stack(per_node).mean())  # the mean over inner nodes
    loss.backward()
    assert unmasked.grad is None  # the target is detached
    assert masked.grad.abs().sum() > 0
    # the root is nobody's child: only its children feed predictions
    assert masked.grad[:, 0].abs().sum() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters())


def test_bf16_autocast():
    torch.manual_seed(0)
    dec = RegionDecoder.from_graph(
        AnatomyGraph.default(), embed_dim=16, decoder_dim=16, depth=1, num_heads=2
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dec(torch.randn(2, 32, 16, requires_grad=True), torch.randn(2, 32, 16))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
