"""Launched by tests/test_alignment.py under torchrun (2 CPU processes, gloo): each rank computes
the contrastive and ACA losses on its slice of one global batch under DDP and writes its loss,
the DDP-averaged parameter gradients and its inputs' gradients to OUT/rank<r>.pt."""
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from models.alignment import AnatomicalConsistency, ImageReportContrastive
from utils import dist as du

PER_RANK, L, LV, D, DT, K = 3, 4, 2, 6, 5, 3


def make_data(world_size):
    g = torch.Generator().manual_seed(0)
    n = world_size * PER_RANK
    # 2 of 4 masked
    mask = torch.stack([torch.randperm(L, generator=g) >= LV for _ in range(n)]).float()
    return {"patches": torch.randn(n, LV, D, generator=g), "text": torch.randn(n, DT, generator=g),
            "mask": mask, "leaves": torch.randn(n, K, D, generator=g)}


class ToyCon(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.patch, self.text = nn.Linear(D, D), nn.Linear(DT, DT)
        self.con = ImageReportContrastive(D, DT, L, temperature=0.2, max_logit_scale=100.0)
        with torch.no_grad():  # a non-neutral position weight, so that it matters
            self.con.pos_weight.weight.normal_()

    def forward(self, patches, text, mask):
        return self.con(self.patch(patches), self.text(text), mask)


class ToyAca(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.leaf = nn.Linear(D, D)
        self.aca = AnatomicalConsistency(identity_weight=0.8, temperature=0.2, text_temperature=0.3)

    def forward(self, leaves, text):
        return self.aca(self.leaf(leaves), text)


def main(out_dir):
    info = du.init_distributed(backend="auto", device="cpu")
    r, w = info.rank, info.world_size
    data = make_data(w)
    mine = {k: v[r * PER_RANK:(r + 1) * PER_RANK].clone() for k, v in data.items()}
    mine["patches"].requires_grad_(True)
    mine["leaves"].requires_grad_(True)
    res = {"rank": r}
    for name, model, args in (("con", DDP(ToyCon()), (mine["patches"], mine["text"], mine["mask"])),
                              ("aca", DDP(ToyAca()), (mine["leaves"], mine["text"]))):
        loss = model(*args)
        loss.backward()
        res[name] = {"loss": loss.detach(),
                     "grads": {k: p.grad.clone() for k, p in model.module.named_parameters()}}
    res["patches_grad"] = mine["patches"].grad
    res["leaves_grad"] = mine["leaves"].grad
    torch.save(res, Path(out_dir) / f"rank{r}.pt")
    du.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
