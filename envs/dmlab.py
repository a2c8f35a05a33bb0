"""worldsim/DMLab-v0: real DeepMind Lab through its Python module `deepmind_lab`.

`deepmind_lab` is not on PyPI: it is built from the DeepMind Lab sources with Bazel (a
Python extension module or a pip wheel). docs/dmlab.md says how. Without it, creating the
env raises `DMLabUnavailableError` (an ImportError) that points there.

What we send to DeepMind Lab (the documented API, docs/users/python_api.md upstream):

    lab = deepmind_lab.Lab(level, ["RGB_INTERLEAVED", "DEBUG.POS.TRANS", "DEBUG.POS.ROT",
                                   "DEBUG.MAZE.LAYOUT"],
                           config={"width": "64", "height": "64", "fps": "60", ...},
                           renderer="software")
    lab.reset(seed=maze_seed)
    lab.step(np.array([look, 0, 0, move, 0, 0, 0], dtype=np.intc), num_steps=action_repeat)

Level: `contributed/dmlab30/explore_goal_locations_small` by default - DMLab-30's random
maze level (11x11 cells with the outer wall, up to 4 rooms), which generates a new maze from
the reset seed every episode. FAR trained on TECO's DMLab data (64x64 frames of random 3D
mazes, 300-frame episodes, 3 actions); TECO recorded them with its own maze level, which is
not part of upstream DeepMind Lab, so we pick the closest upstream level and make the level
a setting (`level=`). Note that in explore_goal_locations the player is respawned at a random
spawn point after reaching the goal (upstream factories/explore/goal_locations_factory.lua,
level:restart), within the episode: that shows up as a pose jump in `info["pose"]`, flagged by
`info["respawned"]`, and `worldsim record` ends the episode before that step.

Actions (our names -> the 7-int vector LOOK_LEFT_RIGHT_PIXELS_PER_FRAME,
LOOK_DOWN_UP_PIXELS_PER_FRAME, STRAFE_LEFT_RIGHT, MOVE_BACK_FORWARD, FIRE, JUMP, CROUCH),
each held for `action_repeat` frames (`num_steps`, default 4 at 60 fps, as in IMPALA/DMLab-30):

    noop        [  0, 0, 0,  0, 0, 0, 0]
    forward     [  0, 0, 0, +1, 0, 0, 0]
    backward    [  0, 0, 0, -1, 0, 0, 0]
    turn_left   [-20, 0, 0,  0, 0, 0, 0]     (look_pixels = 20, DMLab-30's action set)
    turn_right  [+20, 0, 0,  0, 0, 0, 0]

DeepMind Lab turns 0.11 * 60 * 0.96 = 6.336 degrees per look pixel per second of game time
(upstream python/tests/utils/math_utils.py), so a turn action is 20 * 6.336 * 4/60 = 8.45
degrees at 60 fps and twice that at 30 fps.
`move_step` is an estimate (Quake III's 320 units/s run speed -> 21 units = 0.21 cells per
4-frame step once at speed; the player accelerates and slides, the navigator corrects with
the pose).

Pose: DEBUG.POS.TRANS is (x, y, z) in game units, 100 per maze cell, origin at the
bottom-left corner of the maze text with y pointing up; DEBUG.POS.ROT is (pitch, yaw, roll)
in degrees, yaw counter-clockwise from +x (looking right decreases it). In our convention
(docs/ARCHITECTURE.md: x = column, y = row going down, view (cos yaw, sin yaw)):
x = X / 100, y = rows - Y / 100, yaw = -radians(yaw_dmlab); `turn_right` increases yaw as in
the embedded maze. `maze_walls` comes from the 'DEBUG.MAZE.LAYOUT' text ('*' = wall). A level
that builds no maze (upstream's debug_observations returns '' for it) gives None: the navigator
policy is then unavailable, the random walk works, and y is -Y / 100 (same axes, unknown row
offset). The DEBUG.* observations come with levels decorated by upstream's
custom_observations, as DMLab-30's are; a level without them is refused with a clear error.
"""
from __future__ import annotations

import importlib
import math
from typing import Any, Mapping

import numpy as np
from gymnasium import spaces

from envs._base import MAX_FRAME_SIDE, SimulatorEnv, as_hw

ACTION_NAMES: tuple[str, ...] = ("noop", "forward", "backward", "turn_left", "turn_right")

DEFAULT_LEVEL = "contributed/dmlab30/explore_goal_locations_small"
DOCS = "docs/dmlab.md"

CELL_UNITS = 100.0                     # DeepMind Lab maze cell size in game units
DEG_PER_LOOK_PIXEL_SECOND = 0.11 * 60 * 0.96  # upstream math_utils: PIXELS_PER_FRAME_TO_DEG_PER_SECOND * TIME_DIALATION
RUN_SPEED_UNITS_PER_S = 320.0          # Quake III player speed (estimate for move_step)

# Names of the 7 action-vector slots, in DeepMind Lab's order.
ACTION_SPEC_NAMES: tuple[str, ...] = (
    "LOOK_LEFT_RIGHT_PIXELS_PER_FRAME", "LOOK_DOWN_UP_PIXELS_PER_FRAME", "STRAFE_LEFT_RIGHT",
    "MOVE_BACK_FORWARD", "FIRE", "JUMP", "CROUCH",
)

OBS_RGB = "RGB_INTERLEAVED"
OBS_POS = "DEBUG.POS.TRANS"
OBS_ROT = "DEBUG.POS.ROT"
OBS_LAYOUT = "DEBUG.MAZE.LAYOUT"


class DMLabUnavailableError(ImportError):
    """DeepMind Lab's `deepmind_lab` module is not installed (or does not load)."""


def _import_deepmind_lab() -> Any:
    try:
        return importlib.import_module("deepmind_lab")
    except ImportError as exc:
        if exc.name not in (None, "deepmind_lab"):
            # the module is there but its own imports fail: upstream's pip package __init__ imports
            # imp (gone in Python 3.12), pkg_resources (gone in setuptools 82) and dm_env (an extra)
            raise DMLabUnavailableError(
                f"DeepMind Lab's module `deepmind_lab` is installed but does not import ({exc}): the "
                "upstream pip package needs `imp` (Python <= 3.11), `pkg_resources` (pip install "
                f"'setuptools<82') and `dm_env` (pip install dm-env six); see {DOCS}") from exc
        raise DMLabUnavailableError(
            "worldsim/DMLab-v0 needs DeepMind Lab's Python module `deepmind_lab`, which is not on "
            f"PyPI and is not installed here ({exc}). Build it from the DeepMind Lab sources with "
            f"Bazel (pip wheel or extension module) as described in {DOCS}; the embedded "
            "simulator worldsim/Maze-v0 and worldsim/MemoryMaze-v0 need no build.") from exc


def parse_layout(text: str) -> np.ndarray | None:
    """DEBUG.MAZE.LAYOUT text -> bool [rows, cols] (True = wall), or None when empty.
    Lines shorter than the widest are padded with walls."""
    lines = [line for line in str(text).strip("\n").split("\n")]
    if not any(line.strip() for line in lines):
        return None
    width = max(len(line) for line in lines)
    return np.array([[ch == "*" for ch in line.ljust(width, "*")] for line in lines], dtype=bool)


class DMLabEnv(SimulatorEnv):
    """DeepMind Lab as a worldsim simulator.

    Observation space: `Box(0, 255, (H, W, 3), uint8)`, DeepMind Lab's 'RGB_INTERLEAVED'
    frame (64x64 by default, like FAR's and TECO's DMLab data).

    Action space: `Discrete(5)`, named by `action_names` (`noop, forward, backward,
    turn_left, turn_right`), each mapped to a 7-int DeepMind Lab action held for
    `action_repeat` frames (see the module docstring for the vectors).

    Reward: DeepMind Lab's reward summed over the repeated frames. Episodes end when the
    level's time limit runs out (`lab.is_running()` turns False; reported as `truncated`,
    the frame is then the last one seen, not the action's result, and `info["stale_frame"]` is
    True) or after `max_steps` steps (also `truncated`). A goal level (explore_goal_locations)
    restarts when the player reaches the goal and respawns it elsewhere in the same maze, within
    the episode: a step whose pose moved more than `respawn_distance` cells (twice what the
    player can run in a step) has `info["respawned"] = True`, its frame not the action's result.

    `reset(options={"maze_seed": k})` resets DeepMind Lab with `seed=k` (the level builds its
    maze and spawn from it); otherwise the seed is drawn from the env's RNG. `info` carries
    `pose` (float32 [x, y, yaw]) and `maze_seed`. `maze_walls` is the layout of the current
    episode (or None when the level builds no maze: its 'DEBUG.MAZE.LAYOUT' is empty).

    Args:
        level: DeepMind Lab level script name.
        resolution: int or (H, W) of the frames.
        fps: DeepMind Lab frames per second ('fps' config).
        action_repeat: frames per step (`num_steps` of `lab.step`).
        look_pixels: LOOK_LEFT_RIGHT_PIXELS_PER_FRAME of the turn actions.
        renderer: 'software' (OSMesa) or 'hardware' (EGL/GLX, GPU machines).
        level_config: extra config entries passed to the level (values are sent as str).
        max_steps: truncate after this many steps (None: only the level's time limit).
        render_mode: None or "rgb_array".
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    action_names: tuple[str, ...] = ACTION_NAMES

    def __init__(
        self,
        level: str = DEFAULT_LEVEL,
        resolution: int | tuple[int, int] | list[int] = 64,
        fps: int = 60,
        action_repeat: int = 4,
        look_pixels: int = 20,
        renderer: str = "software",
        level_config: Mapping[str, Any] | None = None,
        max_steps: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        h, w = as_hw(resolution, "resolution")
        if max(h, w) > MAX_FRAME_SIDE:  # (envs/_base.py: why the cap)
            raise ValueError(f"resolution must be at most {MAX_FRAME_SIDE} pixels a side, got {resolution!r}")
        if int(action_repeat) < 1 or int(fps) < 1:
            raise ValueError(f"action_repeat and fps must be >= 1, got {action_repeat}, {fps}")
        if renderer not in ("software", "hardware"):
            raise ValueError(f"renderer must be 'software' or 'hardware', got {renderer!r}")
        if int(look_pixels) < 1:  # 0 turns nowhere (the navigator divides by the turn); < 0 swaps left and right
            raise ValueError(f"look_pixels must be >= 1, got {look_pixels!r}")
        if max_steps is not None and int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {max_steps!r}")
        self.level = str(level)
        self.height, self.width = h, w
        self.fps = int(fps)
        self.action_repeat = int(action_repeat)
        self.look_pixels = int(look_pixels)
        self.renderer = renderer
        # Lua level scripts read booleans as "true"/"false" (Python's str gives "True")
        self.level_config = {str(k): (str(v).lower() if isinstance(v, bool) else str(v))
                             for k, v in (level_config or {}).items()}
        self.max_steps = None if max_steps is None else int(max_steps)
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "render_fps": self.fps / self.action_repeat}  # a frame per step

        frames_s = self.action_repeat / self.fps
        self.turn_step = math.radians(self.look_pixels * DEG_PER_LOOK_PIXEL_SECOND * frames_s)  # a rate per second, like moving
        self.move_step = RUN_SPEED_UNITS_PER_S * frames_s / CELL_UNITS
        # a step that moves the player farther (cells) is a respawn: twice the run speed's reach,
        # so that speed's estimate may be off by 2x; a respawn nearer than this goes unnoticed
        self.respawn_distance = 2.0 * self.move_step

        self.action_space = spaces.Discrete(len(ACTION_NAMES))
        self.observation_space = spaces.Box(0, 255, (h, w, 3), np.uint8)

        dmlab = _import_deepmind_lab()
        self.lab_config = {"width": str(w), "height": str(h), "fps": str(self.fps), **self.level_config}
        observations = [OBS_RGB, OBS_POS, OBS_ROT, OBS_LAYOUT]
        try:
            self._lab = dmlab.Lab(self.level, observations, config=self.lab_config, renderer=self.renderer)
        except ValueError as exc:
            if "Unknown observation" not in str(exc):
                raise
            # upstream adds the pose and layout observations together (debug_observations.extend)
            raise ValueError(f"DeepMind Lab level {self.level!r} lacks an observation worldsim needs ({exc}); "
                             f"the pose and maze layout come with levels decorated by custom_observations, "
                             f"as DMLab-30's are (see {DOCS})") from None
        except RuntimeError as exc:  # DeepMind Lab's way of saying: unknown level, bad setting or renderer
            raise ValueError(f"DeepMind Lab cannot start level {self.level!r} with config {self.lab_config} "
                             f"and renderer {self.renderer!r}: {exc}") from None
        self._check_action_spec(self._lab.action_spec())
        self._vectors = self._action_vectors()

        self.maze_walls: np.ndarray | None = None
        self.maze_seed: int | None = None
        self._pose = np.zeros(3, np.float64)
        self._frame = np.zeros((h, w, 3), np.uint8)
        self._steps = 0
        self._needs_reset = True

    # ------------------------------------------------------------------ public API

    def simulator_settings(self) -> dict[str, Any]:
        """JSON-able kwargs such that `gym.make("worldsim/DMLab-v0", **settings)` rebuilds
        this simulator."""
        return {
            "level": self.level,
            "resolution": [self.height, self.width],
            "fps": self.fps,
            "action_repeat": self.action_repeat,
            "look_pixels": self.look_pixels,
            "renderer": self.renderer,
            "level_config": dict(self.level_config),
            "max_steps": self.max_steps,
        }

    def action_vector(self, action: int) -> np.ndarray:
        """The 7-int np.intc vector sent to `lab.step` for one of our actions."""
        return self._vectors[int(action)].copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        maze_seed = self._pick_maze_seed(options)
        if self._lab is None:
            raise RuntimeError("DMLabEnv: closed; make a new env (gym.make('worldsim/DMLab-v0', ...))")
        self._lab.reset(seed=maze_seed)
        if not self._lab.is_running():
            raise RuntimeError(f"DeepMind Lab level {self.level!r} is not running right after reset")
        obs = self._lab.observations()
        self.maze_seed = maze_seed
        self.maze_walls = parse_layout(obs[OBS_LAYOUT])
        self._steps = 0
        self._needs_reset = False
        self._read(obs)
        return self._frame.copy(), self._info()

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._needs_reset:
            raise RuntimeError("DMLabEnv: call reset() before step() (and after an episode ends)")
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r}: expected an int in [0, {len(ACTION_NAMES)})")
        reward = float(self._lab.step(self._vectors[int(action)], num_steps=self.action_repeat))
        self._steps += 1
        truncated = ended = respawned = False
        if self._lab.is_running():
            before = self._pose[:2].copy()
            self._read(self._lab.observations())
            # farther than the player can run in a step: the level moved it (a goal level's restart)
            respawned = float(np.hypot(*(self._pose[:2] - before))) > self.respawn_distance
        else:
            # the level's time limit: DeepMind Lab shows nothing more, so the last frame and pose stay
            truncated = ended = True
        if self.max_steps is not None and self._steps >= self.max_steps:
            truncated = True
        if truncated:
            self._needs_reset = True
        info = self._info()
        if ended:  # the frame is not this action's result: a recorder must not pair the two
            info["stale_frame"] = True
        if respawned:  # nor is a respawn's: the frame shows another place than the action led to
            info["respawned"] = True
        return self._frame.copy(), reward, False, truncated, info

    def render(self) -> np.ndarray | None:
        if self.render_mode == "rgb_array":
            return self._frame.copy()
        return None

    def close(self) -> None:
        lab = getattr(self, "_lab", None)
        if lab is not None:
            lab.close()
            self._lab = None
        self._needs_reset = True  # a step now says so, not an AttributeError
        super().close()

    # ------------------------------------------------------------------ internals

    def _check_action_spec(self, spec: list[dict[str, Any]]) -> None:
        names = tuple(s["name"] for s in spec)
        if names != ACTION_SPEC_NAMES:
            raise RuntimeError(f"unexpected DeepMind Lab action spec {names}; expected {ACTION_SPEC_NAMES}")
        look = spec[0]
        lp = abs(self.look_pixels)
        if not (look["min"] <= -lp and lp <= look["max"]):
            raise ValueError(f"look_pixels={self.look_pixels} is outside DeepMind Lab's bounds "
                             f"[{look['min']}, {look['max']}]")

    def _action_vectors(self) -> list[np.ndarray]:
        index = {name: i for i, name in enumerate(ACTION_SPEC_NAMES)}
        table = {
            "noop": {},
            "forward": {"MOVE_BACK_FORWARD": 1},
            "backward": {"MOVE_BACK_FORWARD": -1},
            "turn_left": {"LOOK_LEFT_RIGHT_PIXELS_PER_FRAME": -self.look_pixels},
            "turn_right": {"LOOK_LEFT_RIGHT_PIXELS_PER_FRAME": self.look_pixels},
        }
        vectors = []
        for name in ACTION_NAMES:
            v = np.zeros(len(ACTION_SPEC_NAMES), dtype=np.intc)
            for slot, value in table[name].items():
                v[index[slot]] = value
            vectors.append(v)
        return vectors

    def _read(self, obs: Mapping[str, Any]) -> None:
        frame = np.asarray(obs[OBS_RGB])
        if frame.shape != self.observation_space.shape or frame.dtype != np.uint8:
            raise RuntimeError(f"DeepMind Lab returned {OBS_RGB} {frame.dtype}{frame.shape}, "
                               f"expected uint8{self.observation_space.shape}")
        self._frame = np.array(frame, copy=True)
        x, y = float(obs[OBS_POS][0]), float(obs[OBS_POS][1])
        yaw_deg = float(obs[OBS_ROT][1])
        rows = self.maze_walls.shape[0] if self.maze_walls is not None else 0
        self._pose[:] = (x / CELL_UNITS, rows - y / CELL_UNITS,
                         math.remainder(-math.radians(yaw_deg), 2.0 * math.pi))
