"""Loaders of a run: shards over ranks, a resumable start, the location-prior subset, device moves."""

import pytest
import torch
from torch.utils.data import Dataset

from datasets.loaders import ResumableSampler, subset_loader, to_device, train_loader
from utils.config import load_config
from utils.dist import DistInfo


class Items(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": torch.full((1,), float(i)), "id": str(i), "report": "r", "labels": torch.zeros(14),
                "anatomies": torch.zeros(25, dtype=torch.bool), "index": i}


def info(rank=0, world=1):
    return DistInfo(rank, world, rank, torch.device("cpu"), world > 1)


def test_resumable_sampler_skips_the_first_samples_of_the_epoch():
    full = ResumableSampler(range(20), num_replicas=1, rank=0, shuffle=True, seed=3)
    full.set_epoch(2)
    order = list(full)
    full.set_start(6)
    assert list(full) == order[6:] and len(full) == 14


def test_train_loader_shards_without_overlap_and_rejects_tiny_data():
    cfg = load_config(None, ["data.batch_size=2", "data.num_workers=0"])
    shards = [[i for b in train_loader(Items(10), cfg, info(r, 2)) for i in b["index"].tolist()]
              for r in range(2)]
    assert set(shards[0]).isdisjoint(shards[1]) and len(shards[0]) == len(shards[1]) == 4
    with pytest.raises(ValueError, match="data.batch_size"):
        train_loader(Items(3), load_config(None, ["data.batch_size=4", "data.num_workers=0"]), info())


def test_subset_loader_is_a_fixed_random_subset_split_over_ranks():
    cfg = load_config(None, ["data.eval_batch_size=3", "data.num_workers=0"])
    one = [i for b in subset_loader(Items(30), 10, cfg, info()) for i in b["index"].tolist()]
    two = [i for r in range(2) for b in subset_loader(Items(30), 10, cfg, info(r, 2)) for i in b["index"].tolist()]
    assert len(one) == 10 and sorted(one) == sorted(two)
    assert sorted(i for b in subset_loader(Items(30), 0, cfg, info()) for i in b["index"].tolist()) == list(range(30))


def test_to_device_moves_tensors_only():
    batch = {"image": torch.ones(2), "id": ["a", "b"]}
    out = to_device(batch, "cpu")
    assert out["id"] == ["a", "b"] and torch.equal(out["image"], batch["image"])
