"""The Euler flow-matching sampler's timestep grid and its shift (tiny, CPU, no network)."""
from __future__ import annotations

import math

import pytest
import torch

from worldsim.sampler import EulerSampler


def test_shift_one_is_the_uniform_grid_and_a_shift_moves_steps_to_high_noise():
    torch.testing.assert_close(EulerSampler(4).timesteps(), torch.linspace(1.0, 0.0, 5))
    torch.testing.assert_close(EulerSampler(4, shift=3.0).timesteps(), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    for shift in (0.5, 2.0, 5.0):
        ts = EulerSampler(7, shift=shift).timesteps()
        assert ts[0].item() == 1.0 and ts[-1].item() == 0.0  # from pure noise to data, whatever the shift
        assert bool((ts[1:] < ts[:-1]).all())
        inner, uniform = ts[1:-1], torch.linspace(1.0, 0.0, 8)[1:-1]
        assert bool((inner > uniform).all()) if shift > 1 else bool((inner < uniform).all())


def test_sample_steps_through_the_shifted_grid():
    """The network is asked at the grid's levels, and a constant velocity is integrated exactly."""
    sampler = EulerSampler(4, shift=3.0)
    asked: list[float] = []
    target = torch.full((1, 2, 3, 3), 0.25)

    def velocity(x, t, action):
        asked.append(float(t[0]))
        return noise - target  # v = noise - x0 along the straight path

    noise = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    out = sampler.sample(velocity, noise, torch.zeros(1, dtype=torch.long), null_action=0)
    assert asked == pytest.approx([1.0, 0.9, 0.75, 0.5])
    torch.testing.assert_close(out, target)


@pytest.mark.parametrize("shift", [0.0, -1.0, math.nan])
def test_a_shift_that_is_not_positive_is_refused(shift):
    with pytest.raises(ValueError, match="shift must be > 0"):
        EulerSampler(4, shift=shift)
