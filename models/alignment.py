"""Image-report contrastive loss (position-weighted, MaCo-style) and anatomical consistency
alignment.

Across ranks both losses use one convention: every rank gathers the global batch (N = world * B)
*with gradient* (utils.dist.all_gather_with_grad: backward sums the gathered gradient over ranks)
and computes the loss rows of its OWN samples (labels offset by rank * B) against all N
candidates. The mean over ranks of the per-rank losses is the single-process loss on the global
batch, the summed backward gives each rank's inputs world x that loss's gradient, and DDP's
averaging divides it back: parameter gradients equal those of one process on the global batch
(proved by tests/test_alignment.py with 2 gloo processes). Ranks must hold equal batch sizes
(drop_last for training). The loss math runs in fp32 with autocast off.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from utils.dist import all_gather_with_grad, get_rank


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x from every rank concatenated on dim 0 with gradient, offset of this rank's rows)."""
    return all_gather_with_grad(x), get_rank() * x.shape[0]


class ImageReportContrastive(nn.Module):
    """L_con. z_i = normalize(W mean_p h_ip) over the visible patch tokens of image i, t_j =
    normalize(pooled text j), s = min(exp(logit_scale), max_logit_scale) with exp(logit_scale)
    starting at 1/temperature, and the position weight w_i = softplus(a . v_i + c) / ln 2 of the
    visibility vector v_i (1 = patch visible, length L); a = 0, c = 0 at init, so w = 1 (neutral).
    Logits l_ij = w_i s z_i . t_j scale each image's row (and, in the text->image direction, each
    image's column of the same matrix); loss = (CE over texts of l_i,: + CE over images of l_:,j) /
    2, averaged over the samples."""

    def __init__(self, embed_dim: int, text_dim: int, num_patches: int, temperature: float = 0.03,
                 max_logit_scale: float = 100.0):
        super().__init__()
        self.img_proj = nn.Linear(embed_dim, text_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.max_logit_scale = max_logit_scale
        self.pos_weight = nn.Linear(num_patches, 1)
        nn.init.zeros_(self.pos_weight.weight)
        nn.init.zeros_(self.pos_weight.bias)

    def position_weight(self, visible: torch.Tensor) -> torch.Tensor:
        """[N, L] visibility (1 = visible) -> [N] weights, 1 at initialisation."""
        return F.softplus(self.pos_weight(visible.float())).squeeze(-1) / math.log(2.0)

    def forward(
        self, patches: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """patches [B, Lv, D] visible tokens, text [B, Dt] pooled report embeddings, mask [B, L] (1
        = masked)."""
        img = self.img_proj(patches.mean(1))
        with torch.autocast(img.device.type, enabled=False):
            img = F.normalize(img.float(), dim=-1)
            txt = F.normalize(text.float(), dim=-1)
            B, Dt = img.shape
            packed, offset = _gather(torch.cat([img, txt, 1.0 - mask.float()], dim=1))
            img_all, txt_all, vis_all = packed.split([Dt, Dt, mask.shape[1]], dim=1)
            w_all = self.position_weight(vis_all)
            scale = self.logit_scale.exp().clamp(max=self.max_logit_scale)
            labels = torch.arange(B, device=img.device) + offset
            # my images vs all texts
            logits_i2t = (scale * w_all[offset:offset + B, None]) * (img @ txt_all.T)
            logits_t2i = (scale * w_all[None, :]) * (txt @ img_all.T)  # my texts vs all images
            return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


class AnatomicalConsistency(nn.Module):
    """L_aca over leaf-query outputs q_bi (L2-normalised) and pooled report embeddings t_b
    (detached, L2-normalised), b over the global batch (N images), i, j over the K leaves:

        S^{bb'}_ij = q_bi . q_b'j / tau                       (anatomy i of b vs anatomy j of b')
        lambda_bb' = w [b = b'] + (1 - w) softmax_b'(t_b . t_b' / tau_t)     (sums to 1 over b')
        L_aca = -1/(N K) sum_b sum_i sum_b' lambda_bb' log softmax_j(S^{bb'}_i,:)_(j=i)

    i.e. for anchor (b, i) the target over candidates (b', j) is lambda_bb' [j = i]: a cross-entropy
    over j ("anatomy i matches itself") for every image pair, the pairs weighted by the target
    matrix w I + (1 - w) softmax(text similarity) (the softmax includes b' = b). The self pair
    (weight >= w) keeps the anatomies of one image distinct; other pairs pull the same anatomy
    together across images, the more so the more their reports agree."""

    def __init__(
        self, identity_weight: float = 0.9, temperature: float = 0.1, text_temperature: float = 0.1
    ):
        super().__init__()
        self.identity_weight, self.temperature, self.text_temperature = (
            identity_weight,
            temperature,
            text_temperature,
        )

    def pair_weights(self, text: torch.Tensor, text_all: torch.Tensor, offset: int) -> torch.Tensor:
        """lambda [B, N] for this rank's rows (inputs L2-normalised)."""
        lam = (1 - self.identity_weight) * (text @ text_all.T / self.text_temperature).softmax(-1)
        lam.diagonal(offset).add_(self.identity_weight)  # entries (b, offset + b): the image itself
        return lam

    def forward(self, leaf_tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """leaf_tokens [B, K, D] leaf-query outputs, text [B, Dt] pooled report embeddings."""
        with torch.autocast(leaf_tokens.device.type, enabled=False):
            B, K, D = leaf_tokens.shape
            q = F.normalize(leaf_tokens.float(), dim=-1)
            t = F.normalize(text.detach().float(), dim=-1)
            packed, offset = _gather(torch.cat([q.flatten(1), t], dim=1))
            q_all, t_all = packed[:, :K * D].view(-1, K, D), packed[:, K * D:].detach()
            lam = self.pair_weights(t, t_all, offset)  # [B, N]
            logits = torch.einsum("bid,cjd->bcij", q, q_all) / self.temperature  # [B, N, K, K]
            logp_self = logits.diagonal(dim1=-2, dim2=-1) - logits.logsumexp(-1)  # [B, N, K]: j = i
            return -(lam[..., None] * logp_self).sum(1).mean()
