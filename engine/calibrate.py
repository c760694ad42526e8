"""Decision thresholds of the entity head, chosen on the validation split: each observation's and each
anatomy leaf's threshold maximises its F1 there (models/entity_head.best_f1_thresholds). They are
model buffers, so the checkpoint of that validation carries them to --eval and --predict."""

from __future__ import annotations

import torch

from datasets.loaders import to_device
from engine.optim import autocast, resolve_amp
from models.entity_head import best_f1_thresholds
from utils.checkpoint import unwrap
from utils.dist import broadcast_object, gather_objects, is_main_process


@torch.no_grad()
def calibrate_entity_thresholds(model, loader, device, amp="fp32") -> dict[str, float]:
    """Set the entity head's thresholds from ``loader`` (sharded over ranks, gathered on rank 0,
    broadcast). Returns the mean observation and leaf thresholds ({} without an entity head)."""
    net = unwrap(model)
    if not net.predicts_entities:
        return {}
    net.eval()
    dtype = resolve_amp(amp, device)
    rows = []
    for batch in loader:
        if batch is None:
            continue
        batch = to_device(batch, device)
        with autocast(device, dtype):
            obs, anat = net.entity_probabilities(batch["image"])
        rows += [(i, o, a, lab, an) for i, o, a, lab, an in zip(
            batch["index"].tolist(), obs.cpu(), anat.cpu(), batch["labels"].cpu(), batch["anatomies"].cpu())]
    gathered = gather_objects(rows)
    thresholds = None
    if is_main_process():
        unique = list({r[0]: r for part in gathered for r in part}.values())  # padded shards repeat
        obs, anat, labels, anatomies = (torch.stack([r[k] for r in unique]) for k in (1, 2, 3, 4))
        default = float(net.entity_thresholds()[0].mean())
        thresholds = (best_f1_thresholds(obs, labels, default=default),
                      best_f1_thresholds(anat, anatomies, default=default))
    obs_t, anat_t = broadcast_object(thresholds)
    net.set_entity_thresholds(obs_t.to(device), anat_t.to(device))
    return {"threshold_obs_mean": float(obs_t.mean()), "threshold_anat_mean": float(anat_t.mean())}
