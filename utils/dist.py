"""Distributed helpers: one init for torchrun and single-process runs, CPU (gloo) and CUDA (nccl).

Every function works without a process group (world size 1) and then does nothing or returns its
input, so the engines call them unconditionally.

Gradient convention of ``all_gather_with_grad`` (the one of CLIP / MaCo implementations): every
rank gathers the global batch and computes either the same loss L over all of it, or the rows of
its own samples so that L is the mean of the per-rank losses. Backward sums the gradients of the
gathered tensor over ranks and keeps this rank's slice, so each rank's input gets ``world_size``
x dL/d(its slice); DDP's gradient averaging divides that back, and the parameter gradients equal
those of one process computing L over the global batch (tests/test_dist.py checks this).
"""
from __future__ import annotations

import builtins
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool  # True when a process group is initialised (launched by torchrun)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def device_for(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device for ``cfg.device``: auto -> cuda:LOCAL_RANK if CUDA is available else cpu;
    cuda -> cuda:LOCAL_RANK; anything else is a torch device string (cpu, cuda:1)."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def setup_print(is_main: bool) -> None:
    """Silence ``print`` on non-main ranks; ``print(..., force=True)`` prints everywhere."""
    builtin_print = getattr(builtins.print, "_original", builtins.print)

    def print(*args, force: bool = False, **kwargs):
        if is_main or force:
            builtin_print(*args, **kwargs)

    print._original = builtin_print
    builtins.print = print


def init_distributed(backend: str = "auto", device: str = "auto") -> DistInfo:
    """Initialise from torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or run
    as a single process when they are absent. Picks the device once (and sets the CUDA device);
    backend "auto" is nccl on CUDA and gloo otherwise."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    dev = device_for(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if launched and not is_dist():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://",
                                device_id=dev if backend == "nccl" else None)
    info = DistInfo(get_rank(), get_world_size(), local_rank, dev, is_dist())
    setup_print(info.rank == 0)
    return info


def comm_device() -> torch.device:
    """Where collective buffers live: the current CUDA device under nccl, else cpu."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all_gather. Backward: all_reduce (sum) the gathered gradients, keep own slice."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[dist.get_rank()]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, differentiably (convention: module docstring).
    All ranks must pass the same shape."""
    if get_world_size() == 1:
        return t
    return torch.cat(_GatherWithGrad.apply(t), dim=0)


@torch.no_grad()
def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, without gradient. Same shape on all ranks."""
    if get_world_size() == 1:
        return t.detach()
    out = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(out, t.detach().contiguous())
    return torch.cat(out, dim=0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it (no-op in one process)."""
    if get_world_size() > 1:
        dist.all_reduce(t)
    return t


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (every rank must call it)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(x):
    """Mean over ranks of a tensor (returns a new tensor) or of a number (returns a float)."""
    if get_world_size() == 1:
        return x
    if not torch.is_tensor(x):
        t = torch.tensor(float(x), dtype=torch.float64, device=comm_device())
        dist.all_reduce(t)
        return t.item() / get_world_size()
    t = x.detach().clone()
    dist.all_reduce(t)
    return t / get_world_size()


def gather_objects(obj):
    """Gather a picklable object from every rank (e.g. generated reports). Returns the list, ordered
    by rank, on rank 0 and None elsewhere. Every rank must call it."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out if is_main_process() else None


def gather_unique(rows: list[dict]) -> list[dict] | None:
    """Every rank's rows (dicts with an "index"), one per index in index order, on rank 0 (the
    padded evaluation sampler repeats a few); None elsewhere. Every rank must call it."""
    gathered = gather_objects(rows)
    if gathered is None:
        return None
    return sorted({r["index"]: r for part in reversed(gathered) for r in part}.values(),
                  key=lambda r: r["index"])


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group once every rank is done with it (a rank tearing gloo down while
    another still talks to it aborts that one)."""
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()
