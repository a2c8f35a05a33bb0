"""The Euler flow-matching sampler's timestep grid, its shift and its temperature (tiny, CPU, no network)."""
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


@pytest.mark.parametrize("shift", [0.0, -1.0, math.nan, math.inf])
def test_a_shift_that_is_not_positive_and_finite_is_refused(shift):
    with pytest.raises(ValueError, match="shift must be a finite number > 0"):
        EulerSampler(4, shift=shift)


def _nonlinear_velocity(x, t, action):
    return torch.tanh(3 * x) - 0.5 * x + t.view(-1, 1, 1, 1)  # depends on where the path starts


def test_temperature_scales_the_starting_noise_and_zero_is_deterministic():
    action = torch.zeros(1, dtype=torch.long)
    noise_a, noise_b = (torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    starts: list[torch.Tensor] = []

    def recording(x, t, action):
        starts.append(x.clone())
        return _nonlinear_velocity(x, t, action)

    EulerSampler(4, temperature=0.7).sample(recording, noise_a, action, null_action=0)
    torch.testing.assert_close(starts[0], 0.7 * noise_a)  # the ODE starts from the scaled noise
    EulerSampler(4, temperature=2.0).sample(recording, noise_a, action, null_action=0)
    torch.testing.assert_close(starts[4], 2.0 * noise_a)  # above 1 too: a wilder dream, not plain sampling
    plain = [EulerSampler(4).sample(_nonlinear_velocity, n, action, null_action=0) for n in (noise_a, noise_b)]
    cold = [EulerSampler(4, temperature=0.0).sample(_nonlinear_velocity, n, action, null_action=0)
            for n in (noise_a, noise_b)]
    assert not torch.allclose(plain[0], plain[1])
    torch.testing.assert_close(cold[0], cold[1])  # temperature 0: the same sample whatever the noise
    explicit_one = EulerSampler(4, temperature=1.0).sample(_nonlinear_velocity, noise_a, action, null_action=0)
    assert torch.equal(explicit_one, plain[0])  # 1 is plain sampling, bit for bit


@pytest.mark.parametrize("scale", [0.0, 0.5, 2.0])
def test_guidance_mixes_the_conditional_and_unconditional_velocities_at_any_scale(scale):
    """v_null + s (v_cond - v_null): 0 is the unconditional model, below 1 a weaker pull toward the
    action, above 1 a stronger one; only 1 skips the unconditional pass."""
    x = torch.randn(1, 2, 3, 3)

    def by_action(x_, t_, a_):  # the conditional action 2 gives 3x, the null class 5 gives 6x
        return x_ * (a_.view(-1, 1, 1, 1).float() + 1)

    v = EulerSampler(2, cfg_scale=scale).guided_velocity(by_action, x, 0.5, torch.tensor([2]), null_action=5)
    torch.testing.assert_close(v, 6 * x + scale * (3 * x - 6 * x))


@pytest.mark.parametrize("temperature", [-0.1, math.nan, math.inf])
def test_a_temperature_that_is_negative_or_not_finite_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        EulerSampler(4, temperature=temperature)


@pytest.mark.parametrize("cfg_scale", [math.nan, math.inf])
def test_a_guidance_scale_that_is_not_finite_is_refused(cfg_scale):
    # it used to be taken, and every frame came out NaN
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        EulerSampler(4, cfg_scale=cfg_scale)


def test_numpy_numbers_are_settings_like_any_number():
    import numpy as np

    sampler = EulerSampler(np.int64(4), cfg_scale=np.float32(1.5), shift=np.float64(2.0), temperature=np.float32(0.5))
    assert (sampler.steps, sampler.cfg_scale, sampler.shift, sampler.temperature) == (4, 1.5, 2.0, 0.5)
    with pytest.raises(ValueError, match="shift must be a finite number > 0"):
        EulerSampler(4, shift=np.float32("nan"))


def test_a_boolean_is_not_a_number_setting():
    """`"cfg": true` in config.json (or True from Python) is a mistake, not guidance 1.0: bool is an
    int subclass, so it must be refused by name, as every reader of the settings does."""
    from worldsim.sampler import setting_problem

    for name in ("cfg", "shift", "temperature", "context_noise", "generated_noise"):
        assert setting_problem(name, True).endswith("got True")  # 1 for cfg, shift, temperature
        assert setting_problem(name, False).endswith("got False")  # 0 for temperature and the noises
    with pytest.raises(ValueError, match="cfg must be a finite number, got True"):
        EulerSampler(4, cfg_scale=True)
