"""Image-report contrastive loss (L_con), position-weighted as in MaCo, in two forms.

Shared by both: the image vector is a linear map (``img_proj``) of the mean of the masked pass's
visible patch tokens, the text vector is the report's pooled embedding, and a position weight
``s_i = softplus(a . v_i + c)`` is read from image i's visibility vector v_i (1 visible, 0 masked,
length L), with a = 0 and c = 0 at initialisation. Every rank gathers the global batch (N images)
*with gradient* (utils.dist.all_gather_with_grad); the loss math runs in fp32.

official (SS-ACL's code): logits l_i2t = Tpar z . t^T and l_t2i = Tpar t . z^T over the normalised
    vectors of the whole global batch [N, N], with Tpar the model's shared learnable scale (linear,
    initialised to 1/T). Four cross-entropies against the diagonal, averaged:
        CE(l_i2t * s) + CE(l_t2i * s) + CE_s(l_i2t) + CE_s(l_t2i),
    where row i of either matrix is scaled by s_i and CE_s weights row i's term by s_i (detached)
    and divides by the sum of the weights. Every rank computes the same global loss.
project: l_ij = w_i exp(tau) z_i . t_j with w = s / ln 2 (1 at initialisation) and exp(tau) its own
    learnable scale clamped at ``max_logit_scale``; (CE over texts + CE over images) / 2, each rank
    scoring its own rows against all N candidates.
Either way the parameter gradients equal one process's on the global batch (tests/test_contrastive.py,
two gloo ranks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from utils.dist import all_gather_with_grad, get_rank

FORMS = ("official", "project")


class ImageReportContrastive(nn.Module):
    def __init__(self, embed_dim: int, text_dim: int, num_patches: int, form: str = "official",
                 temperature: float = 0.03, max_logit_scale: float = 100.0):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"loss.con.form must be one of {', '.join(FORMS)}, got {form!r}")
        self.form = form
        self.img_proj = nn.Linear(embed_dim, text_dim)
        self.pos_weight = nn.Linear(num_patches, 1)
        nn.init.zeros_(self.pos_weight.weight)
        nn.init.zeros_(self.pos_weight.bias)
        if form == "project":
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
            self.max_logit_scale = max_logit_scale

    def position_weight(self, visible: torch.Tensor) -> torch.Tensor:
        """[N, L] visibility (1 = visible) -> [N] weights: s (official), s / ln 2 (project; 1 at
        initialisation)."""
        s = F.softplus(self.pos_weight(visible.float())).squeeze(-1)
        return s if self.form == "official" else s / math.log(2.0)

    def image_vectors(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, Lv, D] patch tokens -> [B, Dt] image vectors in the text space (not normalised)."""
        return self.img_proj(patches.mean(1))

    def forward(self, patches: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                tpar: torch.Tensor | None = None) -> torch.Tensor:
        """patches [B, Lv, D] visible tokens, text [B, Dt] report vectors, mask [B, L] (1 = masked);
        ``tpar`` the shared scale (official form)."""
        img = self.image_vectors(patches)
        with torch.autocast(img.device.type, enabled=False):
            z, t = F.normalize(img.float(), dim=-1), F.normalize(text.float(), dim=-1)
            visible = 1.0 - mask.float()
            if self.form == "official":
                return self._official(z, t, visible, tpar.float())
            return self._project(z, t, visible)

    def _official(self, z, t, visible, tpar) -> torch.Tensor:
        z_all, t_all = all_gather_with_grad(z), all_gather_with_grad(t)
        s = self.position_weight(all_gather_with_grad(visible))[:, None]  # [N, 1]
        i2t, t2i = tpar * z_all @ t_all.T, tpar * t_all @ z_all.T  # [N, N]
        target = torch.arange(len(z_all), device=z.device)
        weight = s.detach().squeeze(-1)
        return (F.cross_entropy(i2t * s, target) + F.cross_entropy(t2i * s, target)
                + F.cross_entropy(i2t, target, weight=weight)
                + F.cross_entropy(t2i, target, weight=weight)) / 4

    def _project(self, z, t, visible) -> torch.Tensor:
        B, Dt = z.shape
        packed = all_gather_with_grad(torch.cat([z, t, visible], dim=1))
        z_all, t_all, vis_all = packed.split([Dt, Dt, visible.shape[1]], dim=1)
        offset = get_rank() * B
        w_all = self.position_weight(vis_all)
        scale = self.logit_scale.exp().clamp(max=self.max_logit_scale)
        labels = torch.arange(B, device=z.device) + offset
        i2t = (scale * w_all[offset : offset + B, None]) * (z @ t_all.T)  # my images vs all texts
        t2i = (scale * w_all[None, :]) * (t @ z_all.T)  # my texts vs all images
        return (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)) / 2
