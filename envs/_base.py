"""What every worldsim simulator env shares (docs/ARCHITECTURE.md, "Simulators")."""
from __future__ import annotations

import operator
from typing import Any, Sequence

import gymnasium as gym
import numpy as np


# frames a side at most, for every simulator: settings come from files made by others too (a
# checkpoint's or dataset's simulator.settings), and resolution [3000, 3000] took 12.8 GB to play two
# frames of Maze-v0. Far above any frame a world model here is trained on (64x64).
MAX_FRAME_SIDE = 2048


def as_hw(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or an (H, W) / (rows, cols) pair -> a pair of positive ints (a simulator setting: a
    resolution, a maze size), or a ValueError naming it."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        h = w = int(value)
    elif (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
        h, w = (int(v) for v in value)
    else:  # "9,9" from --env-arg, a float, true: named, not a failure of int() on one character
        raise ValueError(f"{name} must be an integer or a pair of integers such as [9, 11], got {value!r}")
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return h, w


class SimulatorEnv(gym.Env):
    """Base of the simulator envs: the maze seed choice on reset, `pose` and `info`.

    Subclasses keep the pose in `self._pose` (float64 [x, y, yaw]), the current maze seed in
    `self.maze_seed`, and their step limit in `self.max_steps` (None: none), read at every step.
    """

    _pose: np.ndarray
    maze_seed: int | None
    max_steps: int | None
    # maze seeds are [0, MAZE_SEED_LIMIT): labmaze and DeepMind Lab take C ints; Memory Maze more
    MAZE_SEED_LIMIT: int = 2**31

    @property
    def pose(self) -> np.ndarray:
        """float32 [x, y, yaw]; yaw in [-pi, pi]."""
        return self._pose.astype(np.float32)

    def _pick_maze_seed(self, options: dict | None) -> int:
        """`options["maze_seed"]` when given (checked against MAZE_SEED_LIMIT), else a seed drawn
        from `self.np_random` (call after `super().reset(seed=...)`, so that the same reset seed
        gives the same maze)."""
        options = options or {}
        unknown = sorted(set(options) - {"maze_seed"})
        if unknown:  # a typo such as "maze-seed" would otherwise build a random maze silently
            raise ValueError(f"unknown reset option(s) {', '.join(map(repr, unknown))}: "
                             f"{type(self).__name__} takes 'maze_seed'")
        if options.get("maze_seed") is None:
            return int(self.np_random.integers(0, 2**31 - 1))
        try:  # 5.7, "5" or True are not maze 5 or 1
            if isinstance(options["maze_seed"], bool):
                raise TypeError
            maze_seed = operator.index(options["maze_seed"])
        except TypeError:
            raise ValueError(f"maze_seed must be an integer, got {options['maze_seed']!r}") from None
        if not 0 <= maze_seed < self.MAZE_SEED_LIMIT:
            bits = self.MAZE_SEED_LIMIT.bit_length() - 1
            raise ValueError(f"maze_seed must be in [0, 2**{bits}) for {type(self).__name__}, got {maze_seed}")
        return maze_seed

    def _info(self) -> dict[str, Any]:
        return {"pose": self.pose, "maze_seed": self.maze_seed}
