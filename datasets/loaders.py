"""Data loaders of a run: sharded over ranks, resumable part-way through an epoch, and moved to the
device."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from datasets.cxr import collate
from utils.dist import all_reduce_sum, get_world_size


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, so an epoch's order is reproducible) that can
    start part-way through its shard: ``set_start(n)`` skips the first n samples of this epoch."""

    start = 0

    def set_start(self, n: int) -> None:
        self.start = n

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def _loader(dataset, sampler, batch_size: int, data_cfg, device, drop_last: bool,
            collate_fn=collate) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=data_cfg.num_workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
    )


def train_loader(dataset, cfg, info, collate_fn=collate) -> DataLoader:
    """Shuffled per epoch (ResumableSampler), sharded over ranks, full batches only (equal shapes on
    every rank for the gathered losses). ``collate_fn``: the data set's (default: datasets.cxr's)."""
    sampler = ResumableSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                               seed=cfg.seed, drop_last=True)
    if len(sampler) < cfg.data.batch_size:
        raise ValueError(
            f"{len(dataset)} training samples over {info.world_size} ranks give fewer than "
            f"one batch of data.batch_size={cfg.data.batch_size}"
        )
    return _loader(dataset, sampler, cfg.data.batch_size, cfg.data, info.device, drop_last=True,
                   collate_fn=collate_fn)


def eval_loader(dataset, cfg, info, collate_fn=collate) -> DataLoader:
    """In order, sharded over ranks; the sampler pads the last shards (callers de-duplicate by
    index)."""
    sampler = DistributedSampler(
        dataset, num_replicas=info.world_size, rank=info.rank, shuffle=False
    )
    return _loader(dataset, sampler, cfg.data.eval_batch_size, cfg.data, info.device,
                   drop_last=False, collate_fn=collate_fn)


def subset_loader(dataset, limit: int, cfg, info) -> DataLoader:
    """A fixed random subset of ``limit`` samples (0 = all), drawn from cfg.seed, split over
    ranks."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    chosen = order[:limit] if limit > 0 else order
    shard = Subset(dataset, chosen[info.rank :: info.world_size])
    return _loader(shard, None, cfg.data.eval_batch_size, cfg.data, info.device, drop_last=False)


def to_device(batch: dict, device) -> dict:
    """Tensors to ``device`` (non_blocking); lists of ids/reports stay where they are."""
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def empty_on_any_rank(batch, device) -> bool:
    """True on every rank when ``batch`` is None (no readable sample) on any rank: the ranks then
    skip it together and their collectives stay matched."""
    empty = batch is None
    if get_world_size() > 1:
        empty = all_reduce_sum(torch.tensor([float(empty)], device=device)).item() > 0
    return empty


def skipped_counts(dataset, device) -> dict[str, int]:
    """The inputs of ``dataset`` skipped under data.skip_bad, by kind, over every rank: records
    rejected at load time (the same on every rank) and the distinct unreadable images any rank
    found so far (their flags are merged into every rank's dataset, so ``bad_summary`` names them
    all). {} for a dataset that does not count."""
    if not hasattr(dataset, "bad_counts"):
        return {}
    if hasattr(dataset, "unreadable") and get_world_size() > 1:
        flags = all_reduce_sum(dataset.unreadable().to(device=device, dtype=torch.float32))
        dataset.mark_unreadable(flags > 0)
    return dict(dataset.bad_counts())
