"""Launched by tests/test_dist.py under torchrun (2 CPU processes, gloo). Each rank writes what it
saw to OUT/rank<r>.pt; the test compares with one process computing the same global-batch loss."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from models.location_prior import estimate_location_prior
from utils import dist as du
from utils.logging import SmoothedValue


def make_data(world_size, per_rank=3, dim=5):
    g = torch.Generator().manual_seed(0)
    n = world_size * per_rank
    return torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)


class TwoTower(torch.nn.Module):
    def __init__(self, dim=5, out=4):
        super().__init__()
        torch.manual_seed(1)
        self.img = torch.nn.Linear(dim, out)
        self.txt = torch.nn.Linear(dim, out)

    def forward(self, x, t):
        return self.img(x), self.txt(t)


def clip_loss(a, b, temperature=0.1):
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    labels = torch.arange(len(a))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def make_prior_data(world_size, per_rank=5, size=8, leaves=3):
    """Images and anatomy targets for the location prior (uneven positives over the ranks)."""
    g = torch.Generator().manual_seed(2)
    n = world_size * per_rank
    return torch.randn(n, 3, size, size, generator=g), torch.rand(n, leaves, generator=g) < 0.4


def main(out_dir):
    info = du.init_distributed(backend="auto", device="cpu")
    r, w = info.rank, info.world_size
    print(f"plain print from rank {r}")
    print(f"forced print from rank {r}", force=True)

    x_all, t_all = make_data(w)
    n = len(x_all) // w
    x = x_all[r * n:(r + 1) * n].clone().requires_grad_(True)
    t = t_all[r * n:(r + 1) * n].clone()

    model = DDP(TwoTower())
    a, b = model(x, t)
    a_all, b_all = du.all_gather_with_grad(a), du.all_gather_with_grad(b)
    loss = clip_loss(a_all, b_all)
    loss.backward()

    meter = SmoothedValue()
    for v in [float(r + 1)] * (r + 1):  # rank 0: [1], rank 1: [2, 2]
        meter.update(v)
    meter.synchronize_between_processes()

    images, anat = make_prior_data(w)
    m = len(images) // w
    prior = estimate_location_prior(
        [{"image": images[r * m : (r + 1) * m], "anatomies": anat[r * m : (r + 1) * m]}],
        anat.shape[1],
        images.shape[-1],
        4,
        info.device,
    )

    result = {
        "location_prior": prior,
        "rank": r, "world_size": w, "distributed": info.distributed, "device": str(info.device),
        "gathered_x": du.all_gather(x), "gathered_requires_grad": du.all_gather(x).requires_grad,
        "loss": loss.detach(), "x_grad": x.grad,
        "param_grads": {k: p.grad for k, p in model.module.named_parameters()},
        "mean": du.all_reduce_mean(torch.tensor([float(r), 10.0 * r])),
        "mean_float": du.all_reduce_mean(float(r)),
        "objects": du.gather_objects({"rank": r, "ids": [f"s{r}-{i}" for i in range(r + 1)]}),
        "meter": [meter.count, meter.total, meter.global_avg],
    }
    torch.save(result, Path(out_dir) / f"rank{r}.pt")
    du.barrier()
    du.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
