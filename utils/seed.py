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
