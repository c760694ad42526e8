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


def observation_names(obs: torch.Tensor, threshold: float = 0.5) -> list[list[str]]:
    """Probabilities (or 0/1 labels) ``[B,14]`` -> predicted observation names per row, CheXpert
    order. "No Finding" is kept only when nothing but Support Devices is predicted beside it."""
    out = []
    for row in (obs > threshold).tolist():
        names = [n for n, on in zip(CHEXPERT_OBSERVATIONS, row) if on]
        if any(n not in (NO_FINDING, SUPPORT_DEVICES) for n in names):
            names = [n for n in names if n != NO_FINDING]
        out.append(names)
    return out


class EntityHead(nn.Module):
    def __init__(
        self, dim: int, num_observations: int = 14, num_leaves: int = 25, hidden_dim: int = 0
    ):
        super().__init__()
        self.num_observations, self.num_leaves = num_observations, num_leaves
        self.obs_head = _head(3 * dim, num_observations, hidden_dim)
        self.anat_head = _head(dim, 1, hidden_dim)            # shared over leaves
        self.anat_bias = nn.Parameter(torch.zeros(num_leaves))  # per-leaf prior
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, cls: torch.Tensor, patches: torch.Tensor, local: torch.Tensor, leaf_attn: torch.Tensor
    ):
        """``cls [B,D]``, ``patches [B,L,D]`` (encoder output), ``local [B,L,D]`` (the patch
        embeddings before any attention), ``leaf_attn [B,25,L]`` (each leaf's last-layer
        attention over the patches, heads averaged) -> (obs_logits [B,14], anat_logits [B,25])."""
        evidence = self.norm(leaf_attn.to(local.dtype) @ local)          # [B,25,D]
        pooled = torch.cat([cls, patches.mean(1), evidence.amax(1)], -1)
        obs_logits = self.obs_head(pooled)
        anat_logits = self.anat_head(evidence).squeeze(-1) + self.anat_bias
        return obs_logits, anat_logits

    @staticmethod
    def loss(obs_logits, anat_logits, labels, anatomies) -> torch.Tensor:
        """Binary cross-entropy of observations plus that of anatomy leaves (each a mean)."""
        obs = F.binary_cross_entropy_with_logits(obs_logits.float(), labels.float())
        anat = F.binary_cross_entropy_with_logits(anat_logits.float(), anatomies.float())
        return obs + anat

    @staticmethod
    def prompt(obs_probs: torch.Tensor, threshold: float = 0.5) -> list[str]:
        """Observation probabilities or 0/1 labels ``[B,14]`` -> one prompt string per row."""
        return [format_prompt(names) for names in observation_names(obs_probs, threshold)]

    @staticmethod
    def predict(obs_logits: torch.Tensor, anat_logits: torch.Tensor, threshold: float = 0.5):
        """-> (predicted observation names per row, bool anatomy leaf mask ``[B,25]``).

        A row with no leaf above the threshold gets ALL leaves on (``leaves_shown``).
        """
        entities = observation_names(obs_logits.sigmoid(), threshold)
        return entities, EntityHead.leaves_shown(anat_logits.sigmoid() > threshold)

    @staticmethod
    def leaves_shown(anat: torch.Tensor) -> torch.Tensor:
        """The leaf tokens the decoder sees: the finding leaves, or every leaf for a row with none
        (a normal study), in training (reference leaves) and at test time (predicted) alike."""
        return anat | ~anat.any(-1, keepdim=True)
