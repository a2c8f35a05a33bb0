"""Euler flow-matching sampler with classifier-free guidance (the network only predicts).

API
    EulerSampler(steps=10, cfg_scale=1.0, shift=1.0, temperature=1.0)
      .timesteps(device) -> [steps+1] from 1 (noise) to 0 (data), shifted
      .guided_velocity(velocity_fn, x [B,...], t: float, action [B], null_action) -> [B,...]
      .sample(velocity_fn, noise [B,...], action [B], null_action) -> x0 [B,...]   (noise: standard normal)
    velocity_fn(x_t [B',...], t [B'], action [B']) -> velocity [B',...]   (e.g. GenerationContext.velocity)
    setting_problem(name, value) -> what is wrong with a number setting of config.json's `sampler`
      (cfg, shift, temperature, context_noise, generated_noise), or None: the one rule set that the
      sampler, sessions, play, eval and checkpoint loading apply

Flow matching: x_t = t*noise + (1-t)*x0 and the network predicts v = noise - x0, so
dx/dt = v and Euler steps go from t=1 to t=0: x <- x + (t_next - t) * v.
CFG: v = v_null + s * (v_cond - v_null), the null branch swapping only the action of the frame
being generated for the null class; both branches run as one batch of 2B. (The FAR code's null
branch nulls every frame's action, context included; swapping one lets both branches share one
cache of the context.) With s == 1 the null branch is skipped entirely, so CFG 1 is exactly no
guidance.
Shift (SD3's timestep shift, diffusers' FlowMatchEulerDiscreteScheduler `shift`): the uniform grid
u in [1, 0] becomes t = s*u / (1 + (s-1)*u), so s > 1 spends the few steps at high noise, where the
layout of the next frame is decided, and takes the last step from a middle level. s = 1 is the
uniform grid. With 4 steps and s = 3: 1, 0.9, 0.75, 0.5, 0.
Temperature (the sampling temperature of normalizing flows, e.g. Glow): the ODE starts from
temperature * noise instead of noise. Below 1 the sample is drawn nearer the middle of the model's
distribution: fewer invented details, which an autoregressive rollout would otherwise carry forward
as if they were real. 0 is deterministic (the same frame for every seed). 1 is plain sampling.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Upper bounds of the integer settings, checked where they are read (config.json, --steps,
# --still-frames, Dream-v0's arguments): a typo's 10**9 otherwise allocates a 4 GB timestep grid
# (steps) or a 11 TiB stack of frames (still_frames) and dies in a MemoryError, or loops for days.
MAX_STEPS = 1000          # Euler steps per frame; the models here sample in 4-50
MAX_STILL_FRAMES = 10_000  # standstill copies before a world's first frame (the shipped model: 44)

_SETTING_RULES = {  # name: (accepts, what it must be)
    "cfg": (math.isfinite, "a finite number"),
    "shift": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "temperature": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    # 1 would replace every such context frame by pure noise
    "context_noise": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "generated_noise": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def setting_problem(name: str, value: object) -> str | None:
    """"must be ..., got VALUE" when `value` cannot be the sampler setting `name`, else None."""
    accepts, must = _SETTING_RULES[name]
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars too
    return None if number and accepts(float(value)) else f"must be {must}, got {value!r}"


class EulerSampler:
    def __init__(self, steps: int = 10, cfg_scale: float = 1.0, shift: float = 1.0, temperature: float = 1.0):
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be from 1 to {MAX_STEPS}, got {steps}")
        for name, value in (("cfg", cfg_scale), ("shift", shift), ("temperature", temperature)):
            if problem := setting_problem(name, value):
                raise ValueError(f"{name} {problem}")
        self.steps = int(steps)
        self.cfg_scale = float(cfg_scale)
        self.shift = float(shift)
        self.temperature = float(temperature)

    def __repr__(self) -> str:
        return (f"EulerSampler(steps={self.steps}, cfg_scale={self.cfg_scale}, shift={self.shift}, "
                f"temperature={self.temperature})")

    def timesteps(self, device: torch.device | str = "cpu") -> torch.Tensor:
        u = torch.linspace(1.0, 0.0, self.steps + 1, device=device)
        return self.shift * u / (1.0 + (self.shift - 1.0) * u)  # exactly u when shift == 1

    def guided_velocity(
        self, velocity_fn: VelocityFn, x: torch.Tensor, t: float, action: torch.Tensor, null_action: int
    ) -> torch.Tensor:
        B = x.shape[0]
        tt = torch.full((B,), float(t), device=x.device)
        if self.cfg_scale == 1.0:
            return velocity_fn(x, tt, action)
        v = velocity_fn(
            torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([action, torch.full_like(action, null_action)])
        )  # (2B, ...): conditional half first
        v_cond, v_null = v.float().chunk(2)
        return (v_null + self.cfg_scale * (v_cond - v_null)).to(x.dtype)

    @torch.no_grad()
    def sample(
        self, velocity_fn: VelocityFn, noise: torch.Tensor, action: torch.Tensor, null_action: int
    ) -> torch.Tensor:
        ts = self.timesteps().tolist()  # on the CPU: reading them from a GPU would wait for it
        x = noise * self.temperature if self.temperature != 1.0 else noise
        for t, t_next in zip(ts[:-1], ts[1:]):
            v = self.guided_velocity(velocity_fn, x, t, action, null_action)
            x = x + (t_next - t) * v.to(x.dtype)
        return x
