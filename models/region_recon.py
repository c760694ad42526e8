"""Recursive region reconstruction over the anatomy graph, every inner node in one batched call.

Inputs: the outputs of every graph-node query (node order of AnatomyGraph.names) from the masked
pass m (with gradient) and the unmasked pass u. For an inner node n with children c_1..c_k (padded to
the widest node and masked out of attention), in two forms:

official (SS-ACL's code): the MAE decoder's token path Dec (embed, blocks, norm, pixel head; no
    positions), its first output token:
        pred_n   = Dec([mean_c h^m_c, h^m_c1, ..., h^m_ck])[0]
        target_n = Dec([h^u_n])[0]                                   (detached)
    L_region = mean over inner nodes of the MSE over batch and pixels (equal-size terms: one mean).
project: its own token-space decoder (bias-free input projection, blocks, parameter-free LayerNorm)
        pred_n   = Dec([mean_c h^m_c, h^m_c1, ..., h^m_ck])[0]
        target_n = Dec([h^u_n, h^u_c1, ..., h^u_ck])[0]              (no gradient)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.mae import MAEDecoder
from models.vit import Block, init_weights
from vocab.anatomy_graph import AnatomyGraph


class _GraphTable(nn.Module):
    """The children of every inner node, padded: child_index / child_mask [I, W], inner_index [I]."""

    def __init__(self, graph: AnatomyGraph):
        super().__init__()
        index, mask = graph.child_table
        self.register_buffer("child_index", index.long(), persistent=False)
        self.register_buffer("child_mask", mask.bool(), persistent=False)
        self.register_buffer("inner_index", graph.inner_index.long(), persistent=False)

    def child_tokens(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """nodes [B, N, D] -> (children [B, I, W, D], their masked mean [B, I, D])."""
        kids = nodes[:, self.child_index]
        m = self.child_mask.to(kids.dtype)[..., None]
        return kids, (kids * m).sum(2) / m.sum(1)

    def keep(self, batch: int) -> torch.Tensor:
        """[B * I, W + 1] bool: the first token and the real children."""
        keep = torch.cat([self.child_mask.new_ones(len(self.inner_index), 1), self.child_mask], 1)
        return keep.repeat(batch, 1)


class PixelRegionReconstruction(_GraphTable):
    """The official form: decoded through the MAE decoder passed in at call time."""

    def forward(self, masked_nodes: torch.Tensor, unmasked_nodes: torch.Tensor,
                mae_decoder: MAEDecoder) -> torch.Tensor:
        """masked_nodes, unmasked_nodes [B, N, D] -> L_region (scalar)."""
        kids, mean = self.child_tokens(masked_nodes)
        B, I, W, D = kids.shape
        tokens = torch.cat([mean[:, :, None], kids], dim=2).reshape(B * I, W + 1, D)
        pred = mae_decoder.decode_tokens(tokens, self.keep(B))[:, 0]
        parents = unmasked_nodes[:, self.inner_index].reshape(B * I, 1, D)
        with torch.no_grad():
            target = mae_decoder.decode_tokens(parents)[:, 0]
        return F.mse_loss(pred.float(), target.float())


class RegionDecoder(_GraphTable):
    """The project form: its own token-space decoder."""

    def __init__(self, graph: AnatomyGraph, embed_dim: int, decoder_dim: int = 768, depth: int = 4,
                 num_heads: int = 16, mlp_ratio: float = 4.0):
        super().__init__(graph)
        self.embed = (nn.Identity() if decoder_dim == embed_dim
                      else nn.Linear(embed_dim, decoder_dim, bias=False))
        self.blocks = nn.ModuleList(Block(decoder_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6, elementwise_affine=False)
        init_weights(self)

    def decode(self, first: torch.Tensor, children: torch.Tensor) -> torch.Tensor:
        """first [B, I, D], children [B, I, W, D] -> first-token outputs [B, I, Dd]."""
        B, I, W, D = children.shape
        x = self.embed(torch.cat([first[:, :, None], children], dim=2).reshape(B * I, W + 1, D))
        attn_mask = self.keep(B)[:, None, None, :]
        for blk in self.blocks:
            x, _ = blk(x, attn_mask=attn_mask)
        return self.norm(x[:, 0]).reshape(B, I, -1)

    def forward(self, masked_nodes: torch.Tensor, unmasked_nodes: torch.Tensor) -> torch.Tensor:
        """masked_nodes, unmasked_nodes [B, N, D] -> L_region (scalar)."""
        kids, mean = self.child_tokens(masked_nodes)
        pred = self.decode(mean, kids)
        with torch.no_grad():
            u = unmasked_nodes.detach()
            target = self.decode(u[:, self.inner_index], u[:, self.child_index])
        return F.mse_loss(pred.float(), target.float())
