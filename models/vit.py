"""ViT image encoder with prepended anatomy query tokens (SS-ACL).

Sequence = [queries (Q, no position), CLS, visible patches (+ fixed 2-D sin-cos)].
Attention mask: each query and CLS sees itself and all patches; patches see only patches,
so the queries read the image but never change it. Computed as two SDPA calls per layer:
plain attention over the patches (flash-eligible) and one boolean-masked call for the
Q+1 prefix rows, which equals one masked attention over the whole sequence.

Parameter names follow timm / the official MAE ViT, so an MAE checkpoint loads as is.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from utils.checkpoint import PartialLoadReport, load_partial, read_checkpoint

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``[N, dim]`` = [sin(pos * omega), cos(pos * omega)], omega = 1 / 10000^(2k/dim) (as MAE)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table ``[grid_h * grid_w, dim]``, row-major over the patch grid, exactly
    as MAE's ``get_2d_sincos_pos_embed`` (first half encodes the column, second half the row)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    gw, gh = torch.meshgrid(torch.arange(grid_w, dtype=torch.float64),
                            torch.arange(grid_h, dtype=torch.float64), indexing="xy")
    return torch.cat([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], dim=1).float()


def random_masking(
    batch: int, length: int, mask_ratio: float, device, noise: torch.Tensor | None = None
):
    """MAE per-sample masking: argsort of uniform noise, keep the first ``len_keep``.
    Returns ids_keep [B, len_keep], mask [B, L] (1 = masked) and ids_restore [B, L]."""
    len_keep = max(1, int(length * (1 - mask_ratio)))
    if noise is None:
        noise = torch.rand(batch, length, device=device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, length, device=device)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], mask.gather(1, ids_restore), ids_restore


def prefix_attn_mask(num_prefix: int, seq_len: int, device) -> torch.Tensor:
    """Bool ``[P, N]`` (True = may attend) for the P prefix rows: itself and every patch (j >=
    P)."""
    mask = torch.zeros(num_prefix, seq_len, dtype=torch.bool, device=device)
    mask[:, num_prefix:] = True
    mask[:, :num_prefix].fill_diagonal_(True)
    return mask


def prefix_attn_bias(mask: torch.Tensor, query_bias: torch.Tensor) -> torch.Tensor:
    """Float ``[B, 1, P, N]``: ``mask`` (bool [P, N]) as 0 / -inf, plus ``query_bias`` [B, Q, L]
    added to the Q query rows' patch columns (the CLS row, P - 1 = Q, gets none)."""
    B, Q, L = query_bias.shape
    out = torch.zeros(mask.shape, dtype=query_bias.dtype, device=mask.device).masked_fill(
        ~mask, float("-inf")
    )
    out = out.expand(B, -1, -1).clone()
    out[:, :Q, -L:] += query_bias
    return out[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x, attn_mask=None, num_prefix: int = 0, prefix_mask=None, return_attn: bool = False
    ):
        """With ``num_prefix`` P > 0 the first P tokens follow the query/CLS rule (module docstring)
        and ``prefix_mask`` is ``prefix_attn_mask(P, N)`` (or ``prefix_attn_bias``); else plain SDPA
        with ``attn_mask``.
        ``return_attn``: also the prefix rows' attention probabilities [B, heads, P, N] (fp32)."""
        B, N, C = x.shape
        q, k, v = (
            self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        attn = None
        if num_prefix:
            P = num_prefix
            patches = F.scaled_dot_product_attention(q[:, :, P:], k[:, :, P:], v[:, :, P:])
            prefix = F.scaled_dot_product_attention(q[:, :, :P], k, v, attn_mask=prefix_mask)
            out = torch.cat([prefix, patches], dim=2)
            if return_attn:  # explicit fp32 probabilities, this layer only
                with torch.autocast(x.device.type, enabled=False):
                    logits = (
                        q[:, :, :P].float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])
                    )
                    if prefix_mask.dtype == torch.bool:
                        logits = logits.masked_fill(~prefix_mask, float("-inf"))
                    else:
                        logits = logits + prefix_mask.float()
                    attn = logits.softmax(-1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, C)), attn


class Block(nn.Module):
    """Pre-norm transformer block (timm naming: norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(
        self, x, attn_mask=None, num_prefix: int = 0, prefix_mask=None, return_attn: bool = False
    ):
        y, attn = self.attn(self.norm1(x), attn_mask, num_prefix, prefix_mask, return_attn)
        x = x + y
        return x + self.mlp(self.norm2(x)), attn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ConvStem(nn.Module):
    """A small CNN stem (as hybrid ViTs' convolutional stems, Xiao et al. 2021): log2(patch) stages
    of 3x3 conv, GELU and 2x2 max-pooling, widths doubling up to half the embedding, then a
    linear projection; one token per patch, as PatchEmbed, with the locality bias a ViT trained
    from scratch on little data lacks. ``per_patch``: the CNN runs on every patch alone, so a
    token sees exactly its own patch and what a leaf's attention picks from these tokens lies
    where the attention points. Otherwise it runs over the whole image and a token also sees its
    neighbours (receptive field 22 px for 8 px patches)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, per_patch: bool = True):
        super().__init__()
        steps = patch_size.bit_length() - 1
        if patch_size != 2 ** steps or steps < 1:
            raise ValueError(f"the conv stem needs a power-of-two patch size, got {patch_size}")
        self.patch_size, self.per_patch = patch_size, per_patch
        layers, c = [], in_chans
        for i in range(steps):
            w = max(embed_dim // 2 ** (steps - i), 16)
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2)]
            c = w
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(c, embed_dim)

    def forward(self, x):
        B, C, H, W = x.shape
        p = self.patch_size
        if not self.per_patch:  # channels-last: ~1.5x faster convolutions on CPU
            return self.proj(
                self.convs(x.contiguous(memory_format=torch.channels_last))
                .flatten(2)
                .transpose(1, 2)
            )
        patches = (
            x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, p, p)
        )
        return self.proj(self.convs(patches).flatten(1)).reshape(B, (H // p) * (W // p), -1)


STEMS = ("patch", "conv", "two_scale")


def init_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linears (and the patch conv as a linear), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
            nn.init.zeros_(m.proj.bias)


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, in_chans: int = 3, stem: str = "patch"):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"model.vit.stem must be one of {', '.join(STEMS)}, got {stem!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} not divisible by patch_size {patch_size}")
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        g = img_size // patch_size
        # two_scale: the encoder reads the whole-image CNN's tokens, ``local`` the per-patch CNN's
        if stem == "patch":
            self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        else:
            self.patch_embed = ConvStem(patch_size, in_chans, embed_dim, per_patch=stem == "conv")
        self.local_embed = (
            ConvStem(patch_size, in_chans, embed_dim) if stem == "two_scale" else None
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_2d(embed_dim, g, g)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = LayerNorm(embed_dim)
        init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)

    @property
    def grid(self) -> tuple[int, int]:
        g = self.img_size // self.patch_size
        return g, g

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, images, queries=None, mask_ratio: float = 0.0, return_attn: bool = False,
                noise=None, query_bias=None) -> dict:
        """images [B, C, H, W]; queries [Q, D] or [B, Q, D] or None. ``noise`` [B, L] optionally
        fixes the masking. ``query_bias`` [Q, L]: added to each query's attention logits over the
        patches, in every layer (a learned spatial prior; the CLS row gets none). Returns queries
        [B, Q, D], cls [B, D], patches [B, L_visible, D] (kept in shuffled order when masked,
        original order when not), mask [B, L] (1 = masked), ids_restore [B, L], local [B, L, D]
        (every patch's stem embedding, before positions and attention; the per-patch CNN's with
        the two_scale stem), and with ``return_attn`` attn [B, Q, L_visible]: last-layer query ->
        patch attention probabilities averaged over heads."""
        tokens = self.patch_embed(images)
        local = tokens if self.local_embed is None else self.local_embed(images)
        x = tokens + self.pos_embed.to(tokens.dtype)
        B, L, D = x.shape
        if mask_ratio > 0:
            ids_keep, mask, ids_restore = random_masking(B, L, mask_ratio, x.device, noise)
            x = x.gather(1, ids_keep[..., None].expand(-1, -1, D))
            if query_bias is not None:
                keep = ids_keep[:, None].expand(-1, query_bias.shape[0], -1)
                query_bias = query_bias.expand(B, -1, -1).gather(2, keep)
        else:
            mask = torch.zeros(B, L, device=x.device)
            ids_restore = torch.arange(L, device=x.device).expand(B, L)
        prefix = [self.cls_token.to(x.dtype).expand(B, -1, -1)]
        Q = 0
        if queries is not None:
            queries = queries.to(x.dtype)
            queries = queries.expand(B, -1, -1) if queries.dim() == 2 else queries
            Q = queries.shape[1]
            prefix.insert(0, queries)
        x = torch.cat(prefix + [x], dim=1)
        P = Q + 1
        pmask = prefix_attn_mask(P, x.shape[1], x.device)
        if query_bias is not None:
            if query_bias.shape[-2] != Q:
                raise ValueError(f"query_bias has {query_bias.shape[-2]} rows for {Q} queries")
            pmask = prefix_attn_bias(pmask, query_bias.to(x.dtype).expand(B, -1, -1))
        attn = None
        for i, blk in enumerate(self.blocks):
            x, attn = blk(
                x,
                num_prefix=P,
                prefix_mask=pmask,
                return_attn=return_attn and i == len(self.blocks) - 1,
            )
        x = self.norm(x)
        out = {
            "queries": x[:, :Q],
            "cls": x[:, Q],
            "patches": x[:, P:],
            "mask": mask,
            "ids_restore": ids_restore,
            "local": local,
        }
        if return_attn:
            out["attn"] = attn[:, :, :Q, P:].mean(1)
        return out

    def load_mae_checkpoint(self, source) -> PartialLoadReport:
        """Load an MAE ViT state_dict (a path, or a dict; official layout {"model": {...}}).
        The MAE decoder, mask token and the stored position table (recomputed here) are skipped."""
        sd = source if isinstance(source, Mapping) else _load_file(source)
        report = load_partial(self, dict(sd), prefix_map={"decoder_": None, "mask_token": None,
                                                          "pos_embed": None})
        for k, why in report.skipped.items():
            bare = k.removeprefix("module.")
            if why == "dropped by prefix_map":
                report.skipped[k] = (
                    "fixed 2-D sin-cos position table, recomputed"
                    if bare == "pos_embed"
                    else "MAE decoder, not part of the encoder"
                )
        return report


def _load_file(path) -> dict:
    # Full MAE training checkpoints also store their argparse Namespace.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return read_checkpoint(path, "model.vit.init", required=())
