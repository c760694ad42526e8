"""Global masked reconstruction (MAE): a light decoder rebuilds the masked patches' pixels.

With ``target_scale`` s > 1 (SS-ACL's super-resolution target, ``data.sr_scale``) the images given
to the loss are s times the encoder's input and each patch predicts its (s p)^2 C pixels of them.
The decoder's token path (``decode_tokens``: embed, blocks, norm, pixel head; no positions) is
shared with the official region reconstruction (models/region_recon.py).
"""
from __future__ import annotations

import torch
from torch import nn

from models.vit import Block, LayerNorm, init_weights, sincos_2d


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C] (MAE order: row-major patches, pixels (p, q, c))."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], chans: int = 3) -> torch.Tensor:
    """[B, L, p*p*C] -> [B, C, H, W], the inverse of ``patchify``."""
    h, w = grid
    x = x.reshape(x.shape[0], h, w, p, p, chans)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], chans, h * p, w * p)


class MAEDecoder(nn.Module):
    def __init__(self, grid: tuple[int, int], patch_size: int, in_chans: int = 3, embed_dim: int = 768,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_pix_loss: bool = False, target_scale: int = 1):
        super().__init__()
        self.grid, self.in_chans = tuple(grid), in_chans
        self.patch_size = patch_size * target_scale  # pixels per patch side in the target
        self.norm_pix_loss = norm_pix_loss
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_2d(decoder_dim, *grid)[None], persistent=False
        )
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, mlp_ratio)
                                            for _ in range(decoder_depth))
        self.decoder_norm = LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * in_chans)
        init_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(
        self, cls: torch.Tensor, patches: torch.Tensor, ids_restore: torch.Tensor
    ) -> torch.Tensor:
        """cls [B, D], visible patches [B, Lv, D] (shuffled order), ids_restore [B, L] -> pred [B,
        L, p*p*C]."""
        x = self.decoder_embed(torch.cat([cls[:, None], patches], dim=1))
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(B, L - patches.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = x_.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # unshuffle
        # CLS has no position
        x = torch.cat([x[:, :1], x_ + self.decoder_pos_embed.to(x.dtype)], dim=1)
        for blk in self.decoder_blocks:
            x, _ = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def decode_tokens(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder tokens [N, T, D] -> pixel predictions [N, T, (s p)^2 C] through the decoder without
        positions; ``keep`` [N, T] bool masks padded tokens out of attention."""
        x = self.decoder_embed(tokens)
        attn_mask = keep[:, None, None, :] if keep is not None else None
        for blk in self.decoder_blocks:
            x, _ = blk(x, attn_mask=attn_mask)
        return self.decoder_pred(self.decoder_norm(x))

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch pixel MSE (fp32); ``images`` [B, C, s H, s W].
        With ``norm_pix_loss`` the target is each patch normalised by its own mean and (unbiased)
        variance, as MAE."""
        target = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = (pred.float() - target).pow(2).mean(-1)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)
