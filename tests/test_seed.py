"""Seeds: the same (seed, rank, epoch, iteration) draws the same numbers; any other draws others."""

import random

import numpy as np
import torch

from utils.seed import sample_keys, sample_noise, seed_everything, step_seed


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


def test_sample_noise_depends_on_the_sample_alone():
    keys = sample_keys(0, 3, torch.arange(8))
    noise = sample_noise(keys, 49)
    assert noise.shape == (8, 49) and noise.dtype == torch.float32
    assert 0 <= noise.min() and noise.max() < 1 and abs(noise.mean().item() - 0.5) < 0.05
    # the same sample in another batch or on another rank draws the same numbers
    torch.testing.assert_close(sample_noise(sample_keys(0, 3, torch.tensor([5, 2])), 49), noise[[5, 2]])
    # another epoch, seed or stream draws others
    assert not torch.equal(sample_noise(sample_keys(0, 4, torch.arange(8)), 49), noise)
    assert not torch.equal(sample_noise(sample_keys(1, 3, torch.arange(8)), 49), noise)
    assert not torch.equal(sample_noise(keys, 49, stream=1), noise)
    # per-sample argsort gives every permutation position roughly evenly (masking order)
    ranks = sample_noise(sample_keys(0, 0, torch.arange(4000)), 4).argsort(1)[:, 0]
    assert torch.bincount(ranks, minlength=4).min() > 900
