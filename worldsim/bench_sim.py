"""Simulator speed: frames per second of reset + step loops (steps only are counted).

Used by `worldsim bench`; also runnable alone:

    python -m worldsim.bench_sim --steps 5000 --resolution 64
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np


class SimulatorUnavailable(ValueError):
    """The simulator cannot be made here (message names it and why)."""


def benchmark_simulator(
    env_id: str = "worldsim/Maze-v0",
    steps: int = 5000,
    episode_steps: int = 500,
    seed: int = 0,
    **settings: Any,
) -> dict[str, Any]:
    """Run random actions for `steps` steps, resetting every `episode_steps` steps.

    Only `env.step` time counts towards frames/s (a step renders one frame); reset time is
    reported separately. `settings` go to `gym.make` (e.g. resolution=64). Returns a dict
    with frames_per_s (wall clock), frames_per_cpu_s (process CPU time), step_ms, reset_ms,
    steps, resets, resolution, env_id, settings.
    """
    import gymnasium as gym

    import envs  # noqa: F401  (registers the worldsim/* ids)

    # The passive checker wraps every step; it is not part of the simulator's cost.
    try:
        env = gym.make(env_id, disable_env_checker=True, **settings)
    except gym.error.Error as exc:  # an unknown id
        raise SimulatorUnavailable(f"--env-id {env_id}: cannot create the simulator ({type(exc).__name__}: {exc})") from None
    except (ImportError, TypeError, ValueError) as exc:  # a missing package (DeepMind Lab), settings it does not take
        raise SimulatorUnavailable(f"--env-id {env_id}: cannot create the simulator with settings {settings} "
                                   f"({type(exc).__name__}: {exc})") from None
    rng = np.random.default_rng(seed)
    n_actions = int(env.action_space.n)
    actions = rng.integers(0, n_actions, size=steps)
    step_time = reset_time = step_cpu = 0.0
    resets = done = 0
    obs = None
    while done < steps:
        t0 = time.perf_counter()
        obs, _ = env.reset(seed=seed + resets)
        reset_time += time.perf_counter() - t0
        resets += 1
        end = min(done + episode_steps, steps)
        t0, c0 = time.perf_counter(), time.process_time()
        while done < end:
            obs, _, terminated, truncated, _ = env.step(actions[done])
            done += 1
            if terminated or truncated:
                break
        step_time += time.perf_counter() - t0
        step_cpu += time.process_time() - c0
    env.close()
    return {
        "env_id": env_id,
        "settings": settings,
        "resolution": list(obs.shape[:2]),
        "steps": steps,
        "resets": resets,
        "frames_per_s": steps / max(step_time, 1e-12),
        # CPU time of this process: the simulator's own speed on a busy shared machine.
        "frames_per_cpu_s": steps / max(step_cpu, 1e-12),
        "step_ms": 1000 * step_time / steps,
        "reset_ms": 1000 * reset_time / resets,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--env-id", default="worldsim/Maze-v0")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--episode-steps", type=int, default=500)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "episode_steps", "resolution"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        r = benchmark_simulator(args.env_id, args.steps, args.episode_steps, args.seed,
                                resolution=args.resolution)
    except SimulatorUnavailable as exc:  # one line, not a traceback
        print(f"bench_sim: {exc}", file=sys.stderr)
        return 2
    print(f"{r['env_id']} {r['resolution'][0]}x{r['resolution'][1]}: "
          f"{r['frames_per_s']:.0f} frames/s wall clock, {r['frames_per_cpu_s']:.0f} frames/s "
          f"of process CPU time ({r['step_ms']:.3f} ms/step, "
          f"{r['reset_ms']:.2f} ms/reset, {r['steps']} steps, {r['resets']} resets)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
