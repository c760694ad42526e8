"""Entity and anatomy prediction from the image tokens (what the report decoder is told at test
time).

Each leaf's evidence is the patch tokens pooled by that leaf's own last-layer attention (the very
map shown as its heatmap). A leaf's anatomy logit reads only its own evidence, through a layer
shared by all leaves plus a per-leaf bias: "is there a finding in what I look at". A shared scorer
cannot tell leaves apart, so the only way to fit the targets is for each leaf query to attend to its
own region (multiple-instance learning; this is what makes the heatmaps point without boxes).
Observations (14 CheXpert, order of vocab/observations.py) are read from [CLS, mean patch, max over
leaves of the leaf evidence]. Targets: the batch's "labels" [B,14] and "anatomies" [B,25] (the
leaves of the report's findings).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vocab.observations import CHEXPERT_OBSERVATIONS

NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"


def _head(in_dim: int, out_dim: int, hidden_dim: int) -> nn.Module:
    if hidden_dim <= 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


def format_prompt(entities: list[str]) -> str:
    """Entity names -> the decoder's text prompt: "Findings: cardiomegaly, pleural effusion." or
    "Findings: none." ("No Finding" is the empty list)."""
    names = [e.lower() for e in entities if e != NO_FINDING]
    return f"Findings: {', '.join(names) if names else 'none'}."


def observation_names(obs: torch.Tensor, threshold=0.5) -> list[list[str]]:
    """Probabilities (or 0/1 labels) ``[B,14]`` -> predicted observation names per row, CheXpert
    order. "No Finding" is kept only when nothing but Support Devices is predicted beside it."""
    out = []
    for row in (obs > threshold).tolist():
        names = [n for n, on in zip(CHEXPERT_OBSERVATIONS, row) if on]
        if any(n not in (NO_FINDING, SUPPORT_DEVICES) for n in names):
            names = [n for n in names if n != NO_FINDING]
        out.append(names)
    return out


LOSS_FORMS = ("weighted", "bce", "focal")


class EntityHead(nn.Module):
    """Observation and anatomy logits from the image tokens, with what imbalance needs: positive
    weights from the training prevalence (``set_prevalence``; the "weighted" loss), or a focal loss,
    and one decision threshold per observation and per leaf (``set_thresholds``, chosen on the
    validation split). Weights and thresholds are buffers: they travel with the checkpoint."""

    def __init__(self, dim: int, num_observations: int = 14, num_leaves: int = 25, hidden_dim: int = 0,
                 loss: str = "weighted", threshold: float = 0.5, focal_gamma: float = 2.0):
        super().__init__()
        if loss not in LOSS_FORMS:
            raise ValueError(f"model.entity.loss must be one of {', '.join(LOSS_FORMS)}, got {loss!r}")
        self.num_observations, self.num_leaves = num_observations, num_leaves
        self.loss_form, self.focal_gamma = loss, focal_gamma
        self.obs_head = _head(3 * dim, num_observations, hidden_dim)
        self.anat_head = _head(dim, 1, hidden_dim)  # shared over leaves
        self.anat_bias = nn.Parameter(torch.zeros(num_leaves))  # per-leaf prior
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("obs_pos_weight", torch.ones(num_observations))
        self.register_buffer("anat_pos_weight", torch.ones(num_leaves))
        self.register_buffer("obs_threshold", torch.full((num_observations,), float(threshold)))
        self.register_buffer("anat_threshold", torch.full((num_leaves,), float(threshold)))

    def forward(self, cls: torch.Tensor, patches: torch.Tensor, local: torch.Tensor,
                leaf_attn: torch.Tensor):
        """``cls [B,D]``, ``patches [B,L,D]`` (encoder output), ``local [B,L,D]`` (the patch
        embeddings before any attention), ``leaf_attn [B,K,L]`` (each leaf's last-layer attention
        over the patches, heads averaged) -> (obs_logits [B,14], anat_logits [B,K])."""
        evidence = self.norm(leaf_attn.to(local.dtype) @ local)  # [B,K,D]
        pooled = torch.cat([cls, patches.mean(1), evidence.amax(1)], -1)
        obs_logits = self.obs_head(pooled)
        anat_logits = self.anat_head(evidence).squeeze(-1) + self.anat_bias
        return obs_logits, anat_logits

    @torch.no_grad()
    def set_prevalence(self, labels: torch.Tensor, anatomies: torch.Tensor, max_weight: float = 20.0):
        """Positive weights (negatives / positives, in [1, max_weight]; 1 for a class without a
        positive) from the training targets ``labels [N,14]`` and ``anatomies [N,K]``."""
        for buffer, targets in ((self.obs_pos_weight, labels), (self.anat_pos_weight, anatomies)):
            positives = targets.float().sum(0)
            ratio = ((len(targets) - positives) / positives.clamp_min(1)).clamp(1.0, max_weight)
            buffer.copy_(torch.where(positives > 0, ratio, torch.ones_like(ratio)))

    @torch.no_grad()
    def set_thresholds(self, obs: torch.Tensor, anat: torch.Tensor) -> None:
        self.obs_threshold.copy_(obs)
        self.anat_threshold.copy_(anat)

    def _bce(self, logits, targets, pos_weight) -> torch.Tensor:
        logits, targets = logits.float(), targets.float()
        if self.loss_form == "focal":  # (1 - p_t)^gamma x BCE
            bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
            p_t = torch.exp(-bce)
            return ((1 - p_t) ** self.focal_gamma * bce).mean()
        weight = pos_weight if self.loss_form == "weighted" else None
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight)

    def loss(self, obs_logits, anat_logits, labels, anatomies) -> torch.Tensor:
        """The observations' loss plus the anatomy leaves' (each a mean over the batch and classes)."""
        return (self._bce(obs_logits, labels, self.obs_pos_weight)
                + self._bce(anat_logits, anatomies, self.anat_pos_weight))

    @staticmethod
    def prompt(obs_probs: torch.Tensor, threshold=0.5) -> list[str]:
        """Observation probabilities or 0/1 labels ``[B,14]`` -> one prompt string per row."""
        return [format_prompt(names) for names in observation_names(obs_probs, threshold)]

    def predict(self, obs_logits: torch.Tensor, anat_logits: torch.Tensor):
        """-> (predicted observation names per row, bool anatomy leaf mask ``[B,K]``), each class
        above its own threshold. A row with no leaf above its threshold gets ALL leaves on
        (``leaves_shown``)."""
        entities = observation_names(obs_logits.sigmoid(), self.obs_threshold)
        return entities, EntityHead.leaves_shown(anat_logits.sigmoid() > self.anat_threshold)

    @staticmethod
    def leaves_shown(anat: torch.Tensor) -> torch.Tensor:
        """The leaf tokens the decoder sees: the finding leaves, or every leaf for a row with none
        (a normal study), in training (reference leaves) and at test time (predicted) alike."""
        return anat | ~anat.any(-1, keepdim=True)


def best_f1_thresholds(probs: torch.Tensor, targets: torch.Tensor,
                       grid: torch.Tensor | None = None, default: float = 0.5) -> torch.Tensor:
    """[C] per-class thresholds maximising F1 of ``probs [N,C] > t`` against ``targets [N,C]`` over
    ``grid`` (0.05 ... 0.95); ``default`` for a class without a positive."""
    grid = torch.arange(0.05, 0.96, 0.05) if grid is None else grid
    pred = probs.float()[None] > grid[:, None, None]  # [G, N, C]
    truth = targets.bool()[None]
    tp = (pred & truth).sum(1).float()
    f1 = 2 * tp / (pred.sum(1) + truth.sum(1)).clamp_min(1)  # [G, C]
    best = grid[f1.argmax(0)]
    return torch.where(targets.bool().any(0), best, torch.full_like(best, default))
