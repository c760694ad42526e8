"""Launched by tests/test_contrastive.py and tests/test_consistency.py under torchrun (2 CPU
processes, gloo): each rank computes the contrastive and ACA losses, in both forms, on its slice of
one global batch under DDP, and writes its loss, the DDP-averaged parameter gradients and its
inputs' gradients to OUT/rank<r>.pt."""

import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from models.consistency import AnatomicalConsistency
from models.contrastive import ImageReportContrastive
from utils import dist as du

PER_RANK, L, LV, D, DT, K = 3, 4, 2, 6, 5, 3
FORMS = ("official", "project")


def make_data(world_size):
    g = torch.Generator().manual_seed(0)
    n = world_size * PER_RANK
    mask = torch.stack([torch.randperm(L, generator=g) >= LV for _ in range(n)]).float()  # 2 of 4
    return {"patches": torch.randn(n, LV, D, generator=g), "text": torch.randn(n, DT, generator=g),
            "mask": mask, "leaves": torch.randn(n, K, D, generator=g)}


class ToyCon(nn.Module):
    def __init__(self, form):
        super().__init__()
        torch.manual_seed(1)
        self.patch, self.text = nn.Linear(D, D), nn.Linear(DT, DT)
        self.con = ImageReportContrastive(D, DT, L, form, temperature=0.2, max_logit_scale=100.0)
        self.tpar = nn.Parameter(torch.tensor(3.0)) if form == "official" else None
        with torch.no_grad():  # a non-neutral position weight, so that it matters
            self.con.pos_weight.weight.normal_()

    def forward(self, patches, text, mask):
        return self.con(self.patch(patches), self.text(text), mask, self.tpar)


class ToyAca(nn.Module):
    def __init__(self, form):
        super().__init__()
        torch.manual_seed(2)
        self.leaf = nn.Linear(D, D)
        self.aca = AnatomicalConsistency(form, identity_weight=0.8, temperature=0.2, text_temperature=0.3)
        self.tpar = nn.Parameter(torch.tensor(4.0)) if form == "official" else None  # DDP: no unused parameter

    def forward(self, leaves, text):
        return self.aca(self.leaf(leaves), text, self.tpar)


def run(model, args):
    """(loss, parameter gradients, input gradients) of one backward."""
    inputs = [a.clone().requires_grad_(a.is_floating_point() and a.dim() == 3) for a in args]
    loss = model(*inputs)
    loss.backward()
    module = getattr(model, "module", model)
    grads = {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for k, p in module.named_parameters()}
    return loss.detach(), grads, inputs[0].grad


def main(out_dir):
    info = du.init_distributed(backend="auto", device="cpu")
    r, w = info.rank, info.world_size
    data = make_data(w)
    mine = {k: v[r * PER_RANK : (r + 1) * PER_RANK] for k, v in data.items()}
    res = {"rank": r}
    for form in FORMS:
        for name, model, args in (("con", ToyCon(form), (mine["patches"], mine["text"], mine["mask"])),
                                  ("aca", ToyAca(form), (mine["leaves"], mine["text"]))):
            res[f"{name}_{form}"] = run(DDP(model), args)
    torch.save(res, Path(out_dir) / f"rank{r}.pt")
    du.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
