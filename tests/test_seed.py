"""Seeds: the same (seed, rank, epoch, iteration) draws the same numbers; any other draws others."""

import random

import numpy as np
import torch

from utils.seed import seed_everything, step_seed


def test_seed_everything_repeats_every_generator():
    seed_everything(7)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_step_seed_is_a_pure_function_of_the_position():
    assert step_seed(0, 0, 3, 5) == step_seed(0, 0, 3, 5)
    seeds = {step_seed(s, r, e, i) for s in (0, 1) for r in range(4) for e in range(3) for i in range(50)}
    assert len(seeds) == 2 * 4 * 3 * 50
    assert all(0 <= s < 2**63 for s in seeds)
