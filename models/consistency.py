"""Anatomical consistency alignment (L_aca) over the leaf-query outputs q [B, K, D] of the unmasked
pass and the reports' pooled vectors t [B, Dt], in two forms. q and t are L2-normalised; b runs over
this rank's images, b' over the global batch (N images), i and j over the K leaves.

official (SS-ACL's code): S[b, b', i, j] = Tpar q_bi . Q_b'j with the gathered Q *without* gradient,
    P[b, b'] = softmax_b'(Tpar t_b . T_b') (no gradient), target = w [i = j] + (1 - w) P[b, b']
    broadcast over (i, j) (its rows do not sum to 1; w = 0.9), and
        L_aca = - mean over (b, b', i) of sum_j target log softmax_j S[b, b', i, :].
project: S = q_bi . Q_b'j / tau with Q gathered *with* gradient; the target of anchor (b, i) is leaf
    i itself, the image pairs weighted by lambda[b, b'] = w [b = b'] + (1 - w) softmax_b'(t_b . T_b' /
    tau_t) (rows sum to 1): L_aca = - 1/(B K) sum_b sum_i sum_b' lambda log softmax_j S[b, b', i, :]_i.
The mean over ranks equals the global-batch loss (equal batch sizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.dist import all_gather, all_gather_with_grad, get_rank

FORMS = ("official", "project")


class AnatomicalConsistency(nn.Module):
    def __init__(self, form: str = "official", identity_weight: float = 0.9, temperature: float = 0.1,
                 text_temperature: float = 0.1):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"loss.aca.form must be one of {', '.join(FORMS)}, got {form!r}")
        self.form, self.identity_weight = form, identity_weight
        self.temperature, self.text_temperature = temperature, text_temperature

    def forward(self, leaf_tokens: torch.Tensor, text: torch.Tensor,
                tpar: torch.Tensor | None = None) -> torch.Tensor:
        """leaf_tokens [B, K, D], text [B, Dt]; ``tpar`` the shared scale (official form)."""
        with torch.autocast(leaf_tokens.device.type, enabled=False):
            q = F.normalize(leaf_tokens.float(), dim=-1)
            t = F.normalize(text.detach().float(), dim=-1)
            if self.form == "official":
                return self._official(q, t, tpar.float())
            return self._project(q, t)

    def _official(self, q, t, tpar) -> torch.Tensor:
        q_all, t_all = all_gather(q), all_gather(t)  # [N, K, D], [N, Dt], no gradient
        logits = tpar * torch.einsum("bid,cjd->bcij", q, q_all)  # [B, N, K, K]
        pairs = (tpar * t @ t_all.T).softmax(-1).detach()  # [B, N]
        K = q.shape[1]
        eye = torch.eye(K, device=q.device)
        target = self.identity_weight * eye + (1 - self.identity_weight) * pairs[..., None, None]
        return -(target * logits.log_softmax(-1)).sum(-1).mean()

    def pair_weights(self, t: torch.Tensor, t_all: torch.Tensor, offset: int) -> torch.Tensor:
        """Project form: lambda [B, N] of this rank's rows (inputs L2-normalised; this rank's images
        start at column ``offset``)."""
        lam = (1 - self.identity_weight) * (t @ t_all.T / self.text_temperature).softmax(-1)
        lam.diagonal(offset).add_(self.identity_weight)
        return lam

    def _project(self, q, t) -> torch.Tensor:
        B, K, D = q.shape
        packed = all_gather_with_grad(torch.cat([q.flatten(1), t], dim=1))
        q_all, t_all = packed[:, : K * D].view(-1, K, D), packed[:, K * D :].detach()
        lam = self.pair_weights(t, t_all, get_rank() * B)  # [B, N]
        logits = torch.einsum("bid,cjd->bcij", q, q_all) / self.temperature  # [B, N, K, K]
        logp_self = logits.diagonal(dim1=-2, dim2=-1) - logits.logsumexp(-1)  # [B, N, K]: j = i
        return -(lam[..., None] * logp_self).sum(1).mean()
