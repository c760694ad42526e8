"""Report-derived location prior: where in the image each anatomy leaf's findings show.

For leaf k the training images whose report places a finding there (the "anatomies" targets, read
from the reports) are compared with the others, pixel by pixel: ``|mean of positives - mean of
negatives|``, averaged over each patch and normalised to a distribution over the patch grid. No box
and no mask go in: only images and the report-derived labels the entity head trains on. SSACL adds
``gain * log(prior / max prior)`` (clamped) to each leaf query's attention logits over the patches:
a leaf with nothing to detect then rests on its own anatomy, not on whatever patch is safest. A leaf
with no positive (or no negative) image gets a uniform prior.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.nn.functional as F


class LocationPriorStats:
    """Running pixel sums of all images and of each leaf's positive images (float64, on the CPU)."""

    def __init__(self, num_leaves: int, height: int, width: int):
        self.total = torch.zeros(height, width, dtype=torch.float64)
        self.positive = torch.zeros(num_leaves, height, width, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)
        self.positive_count = torch.zeros(num_leaves, dtype=torch.float64)

    def update(self, images: torch.Tensor, anatomies: torch.Tensor) -> None:
        """``images [B,C,H,W]`` (first channel used), ``anatomies [B,K]`` (bool or 0/1)."""
        x = images[:, 0].detach().to("cpu", torch.float64)
        a = anatomies.detach().to("cpu", torch.float64)
        self.total += x.sum(0)
        self.positive += torch.einsum("bk,bhw->khw", a, x)
        self.count += x.shape[0]
        self.positive_count += a.sum(0)

    def all_reduce(self, device) -> None:
        """Sum the statistics over ranks (no-op in one process)."""
        if not (tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1):
            return
        for name in ("total", "positive", "count", "positive_count"):
            t = getattr(self, name).to(device)
            tdist.all_reduce(t)
            setattr(self, name, t.cpu())

    def prior(self, patch_size: int) -> torch.Tensor:
        """``[K, L]`` float32: each leaf's distribution over the (row-major) patch grid."""
        K, H, W = self.positive.shape
        if H % patch_size or W % patch_size:
            raise ValueError(
                f"location prior: image {H}x{W} is not a multiple of patch size {patch_size}"
            )
        n_pos = self.positive_count[:, None, None]
        n_neg = self.count - n_pos
        pos_mean = self.positive / n_pos.clamp_min(1)
        neg_mean = (self.total - self.positive) / n_neg.clamp_min(1)
        diff = (pos_mean - neg_mean).abs()
        per_patch = F.avg_pool2d(diff[:, None], patch_size).flatten(1)  # [K, L]
        flat = (
            (per_patch.sum(1) <= 0)
            | (self.positive_count == 0)
            | (self.positive_count == self.count)
        )
        per_patch[flat] = 1.0
        return (per_patch / per_patch.sum(1, keepdim=True)).float()


@torch.no_grad()
def estimate_location_prior(
    batches, num_leaves: int, image_size: int, patch_size: int, device
) -> torch.Tensor:
    """``[K, L]`` prior from an iterable of batches with "image" and "anatomies" (None batches are
    skipped), summed over ranks when distributed."""
    stats = LocationPriorStats(num_leaves, image_size, image_size)
    for batch in batches:
        if batch is not None:
            stats.update(batch["image"], batch["anatomies"])
    stats.all_reduce(device)
    if stats.count == 0:
        raise ValueError("location prior: no training image was read")
    return stats.prior(patch_size)


def prior_bias(prior: torch.Tensor, gain: float, min_ratio: float = 1e-3) -> torch.Tensor:
    """``gain * log(prior / max prior)``, each row's ratio clamped at ``min_ratio``: 0 on a leaf's
    most likely patch, at most ``gain * log(min_ratio)`` below it elsewhere."""
    ratio = prior / prior.amax(-1, keepdim=True).clamp_min(1e-12)
    return gain * ratio.clamp_min(min_ratio).log()


def rest_loss(attn: torch.Tensor, prior: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Where a leaf looks when it has nothing to find: ``KL(prior_k || attn_bk)`` summed over the
    (image, leaf) pairs whose report places no finding in the leaf, divided by all B*K pairs (a
    per-sample mean, so ranks of equal batch agree with one process). ``attn [B,K,L]`` (each leaf's
    attention over the patches, renormalised here), ``prior [K,L]``, ``positive [B,K]`` bool. Pairs
    with a finding are left to the entity head (the attention finds the finding)."""
    a = attn.float() / attn.float().sum(-1, keepdim=True).clamp_min(1e-12)
    p = prior.float()[None]
    kl = (p * (p.clamp_min(1e-12).log() - a.clamp_min(1e-12).log())).sum(-1)      # [B, K]
    return (kl * ~positive.bool()).sum() / kl.numel()
