"""Recursive region reconstruction over the anatomy graph, every inner node in one decoder call.

Inputs are the outputs of all graph-node queries (node order of AnatomyGraph.names) from two
encoder passes: the masked pass m (with gradient) and the unmasked pass u (detached). For every
inner node n with children c_1..c_k (padded to the widest node and masked out of attention):

    pred_n   = Dec([mean_c h^m_c, h^m_c1, ..., h^m_ck])[0]
    target_n = Dec([h^u_n,        h^u_c1, ..., h^u_ck])[0]     (same decoder, under no_grad)
    L_region = mean over batch, inner nodes and channels of (pred_n - target_n)^2

i.e. the parent's "decoded output" is the decoder's position-0 output on the parent's own token
and its children from the unmasked pass. Dec = bias-free input projection (identity when the
widths agree), pre-norm transformer blocks, and a parameter-free LayerNorm, so that neither the
decoder nor its target can shrink to a constant through a scale or bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.vit import Block, init_weights
from vocab.anatomy_graph import AnatomyGraph


class RegionDecoder(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        child_index: torch.Tensor,
        child_mask: torch.Tensor,
        inner_index: torch.Tensor,
        decoder_dim: int = 768,
        depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.register_buffer("child_index", child_index.long(), persistent=False)  # [I, W]
        self.register_buffer("child_mask", child_mask.bool(), persistent=False)  # [I, W]
        self.register_buffer("inner_index", inner_index.long(), persistent=False)  # [I]
        self.embed = (
            nn.Identity()
            if decoder_dim == embed_dim
            else nn.Linear(embed_dim, decoder_dim, bias=False)
        )
        self.blocks = nn.ModuleList(Block(decoder_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6, elementwise_affine=False)
        init_weights(self)

    @classmethod
    def from_graph(cls, graph: AnatomyGraph, embed_dim: int, **kwargs) -> "RegionDecoder":
        idx, mask = graph.child_table
        return cls(embed_dim, idx, mask, graph.inner_index, **kwargs)

    def decode(self, first: torch.Tensor, children: torch.Tensor) -> torch.Tensor:
        """first [B, I, D], children [B, I, W, D] -> position-0 outputs [B, I, Dd]; padded children
        masked."""
        B, I, W, D = children.shape
        x = self.embed(torch.cat([first[:, :, None], children], dim=2).reshape(B * I, W + 1, D))
        keep = torch.cat([self.child_mask.new_ones(I, 1), self.child_mask], dim=1)  # [I, W+1]
        attn_mask = keep.expand(B, I, W + 1).reshape(B * I, 1, 1, W + 1)
        for blk in self.blocks:
            x, _ = blk(x, attn_mask=attn_mask)
        return self.norm(x[:, 0]).reshape(B, I, -1)

    def forward(self, masked_nodes: torch.Tensor, unmasked_nodes: torch.Tensor) -> torch.Tensor:
        """masked_nodes, unmasked_nodes [B, num_nodes, D] -> L_region (scalar)."""
        kids = masked_nodes[:, self.child_index]  # [B, I, W, D]
        m = self.child_mask.to(kids.dtype)[..., None]
        mean = (kids * m).sum(2) / m.sum(1)  # [B, I, D] / [I, 1]
        pred = self.decode(mean, kids)
        with torch.no_grad():
            u = unmasked_nodes.detach()
            target = self.decode(u[:, self.inner_index], u[:, self.child_index])
        return F.mse_loss(pred.float(), target.float())
