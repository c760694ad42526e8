"""Grounding heatmaps: each anatomy query's last-layer attention to the patches, as an image.

attn [B,Q,L] (heads averaged, from the UNMASKED ViT pass) -> patch grid -> bilinear upsampling to
the image -> Gaussian blur (smooths the patch-grid blockiness) -> min-max to [0,1] per map.
A sentence's heatmap is the mean of the heatmaps of the leaves it mentions (vocab/report_text.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B,C,H,W]`` (sigma in pixels, kernel 2*ceil(3 sigma)+1, reflect
    padding)."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)  # reflect padding needs pad < size
    if radius < 1:
        return x
    k = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    k = k / k.sum()
    B, C, H, W = x.shape
    y = x.reshape(B * C, 1, H, W)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return y.view(B, C, H, W)


def normalize_maps(x: torch.Tensor, rel_eps: float = 1e-5) -> torch.Tensor:
    """Min-max each ``[H,W]`` map of ``[...,H,W]`` to [0,1]. A map whose range is below ``rel_eps``
    of its magnitude (constant up to rounding noise) becomes all zeros instead of amplified
    noise."""
    flat = x.flatten(-2)
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    span = hi - lo
    flat_enough = span <= rel_eps * torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-12)
    out = (flat - lo) / span.clamp_min(1e-12)
    return out.masked_fill(flat_enough, 0.0).view_as(x)


def leaf_heatmaps(
    attn: torch.Tensor, grid: tuple[int, int], image_size, sigma: float | None = None
) -> torch.Tensor:
    """``attn [B,Q,L]`` (L = h*w patches, row-major) -> heatmaps ``[B,Q,H,W]`` in [0,1].

    ``image_size`` is H (square) or (H, W); ``sigma`` is the blur in output pixels, default half a
    patch stride (enough to hide the grid, small against an anatomical region); 0 switches it off.
    """
    h, w = grid
    B, Q, L = attn.shape
    if L != h * w:
        raise ValueError(f"heatmaps: attention covers {L} patches, grid {h}x{w} needs {h * w} "
                         "(use the unmasked encoder pass)")
    H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if sigma is None:
        sigma = 0.5 * min(H / h, W / w)
    maps = attn.float().reshape(B, Q, h, w)
    maps = F.interpolate(maps, size=(H, W), mode="bilinear", align_corners=False)
    return normalize_maps(gaussian_blur(maps, sigma))


def sentence_heatmap(heatmaps: torch.Tensor, leaves: list[str], graph) -> torch.Tensor:
    """Mean of the given leaves' maps (``heatmaps [K,H,W]`` in leaf order), re-normalised to
    [0,1]."""
    idx = torch.tensor(
        [graph.leaf_index[n] for n in leaves], dtype=torch.long, device=heatmaps.device
    )
    if idx.numel() == 0:
        raise ValueError("sentence_heatmap: no leaves given")
    return normalize_maps(heatmaps.index_select(0, idx).mean(0))
