"""Seeds: the process-wide generators at start-up, and the per-step seed that makes a step's
randomness (masking, dropout, in-process augmentation) a pure function of where the step is in
the run."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, rank: int, epoch: int, it: int) -> int:
    """The torch seed of batch ``it`` of ``epoch`` on ``rank``: a run resumed mid-epoch draws what
    the uninterrupted run drew."""
    return (seed * 1_000_003 + rank * 7_919 + epoch * 100_003 + it) % (2**63)


M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of int64 values in [0, 2^32) (xor-shift-multiply rounds; every product stays
    below 2^63, so no overflow)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & M32
    return x ^ (x >> 16)


def sample_keys(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """[B] int64 keys of samples ``index`` [B] in ``epoch``: what a sample draws depends on (seed,
    epoch, dataset index) alone, not on the rank or the batch it landed in."""
    salt = (seed * 1_000_003 + (epoch + 1) * 7_919) & M32
    return _mix32((index.long() & M32) ^ _mix32(torch.tensor(salt)))


def sample_noise(keys: torch.Tensor, n: int, stream: int = 0) -> torch.Tensor:
    """[B, n] float32 uniform in [0, 1): the ``stream``-th set of draws of each sample key."""
    base = _mix32(keys.long()[:, None] ^ _mix32(torch.tensor(stream + 1, device=keys.device)))
    pos = torch.arange(n, device=keys.device)
    h = _mix32((base + pos * 0x61C88647) & M32)
    return (h.double() / 2**32).float()
