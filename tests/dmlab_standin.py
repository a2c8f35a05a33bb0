"""A STAND-IN for DeepMind Lab's `deepmind_lab` Python module, for tests only.

This is not DeepMind Lab. It reproduces the documented Python API of the real module
(docs/users/python_api.md and python/dmlab_module.c upstream) closely enough to test our
adapter without the Bazel-built module:

* `Lab(level, observations, config={}, renderer='software', level_cache=None)`:
  `observations` must be a list and `config` a dict (TypeError otherwise, as the C
  module's `O!` argument parsing); config keys and values must be `str` (TypeError, as
  `PyUnicode_AsUTF8` raises); `renderer` must be 'software' or 'hardware' (RuntimeError);
  an unknown level fails like `init` (RuntimeError); an unknown observation name raises
  `ValueError("Unknown observation 'X'.")`.
* `reset(episode=-1, seed=None)`: `episode` is parsed as a C int (format "i": anything with
  `__index__`, NumPy integers included; TypeError for a float or a str, OverflowError outside a
  C int); `seed` is None (one is drawn) or passes `PyLong_Check` (a Python int or bool):
  anything else, NumPy integers included, raises ValueError("'seed' must be int or None,
  was 'T'.") with T the C type name ('float', 'numpy.int64').
* `step(action, num_steps=1)`: `num_steps` is parsed as a C int like `episode`;
  `action` must be a numpy array (TypeError), of shape (7,)
  ("action must have shape (7)") and dtype np.intc ("action must have dtype np.intc")
  (ValueError); stepping a finished episode raises RuntimeError("Environment in wrong
  status to advance."). Returns the reward as a float. Stricter than the real module: action
  values outside the action spec bounds raise ValueError (the real one calls that undefined
  behaviour), and `num_steps` must be >= 1.
* `num_steps()`: the sum of the `num_steps` asked of `step` since the last `reset` (the real
  module adds the whole request, even where the episode ended partway through it).
* `observations()` (RuntimeError when not running), `is_running()`, `fps()`,
  `events()`, `close()`, `action_spec()` (list of {'min', 'max', 'name'}),
  `observation_spec()` (list of {'name', 'shape', 'dtype'}); module functions `version()`,
  `runfiles_path()`, `set_runfiles_path(path)`.

Observations: 'RGB_INTERLEAVED' (H, W, 3) uint8, 'RGB' (3, H, W), 'DEBUG.POS.TRANS' (x, y, z
game units, 100 per maze cell, origin at the bottom-left corner of the layout, y up),
'DEBUG.POS.ROT' (pitch, yaw, roll degrees; yaw counter-clockwise from +x, looking right
turns clockwise), 'VEL.TRANS', 'VEL.ROT', and 'DEBUG.MAZE.LAYOUT' (the maze's entity layer:
'*' = wall, 'P' = spawn, 'G' = goal place, as upstream's maze_generation writes it) on the
maze levels. The maze comes from labmaze seeded with the reset seed, with the room settings
of upstream's explore levels (factories/explore/factory.lua, explore_goal_locations_*.lua).
As upstream's goal_locations_factory: the reset seed picks one 'G' cell as the goal and the
player spawns on a 'P' cell; touching the goal gives reward 10 and restarts the level without
ending the episode: the player is respawned on a random 'P' cell (its pose jumps), the maze
and the goal stay, the episode's time goes on. Each respawn is logged in `respawns` (the
1-based number of the `step` call it happened in). Motion is simple
kinematics (320 units/s, 6.336 degrees per look pixel per second, as upstream's test
utilities compute it, so a frame turns more at a lower fps) with wall collision; the picture is a crude column raycast (sky,
floor, walls shaded by distance and coloured by cell), enough for frames to change with
the pose.

Every Lab instance is appended to `INSTANCES` and logs what it receives (`level`,
`observation_names`, `config`, `renderer`, `resets`, `steps`, `respawns`) for tests to inspect.
"""
from __future__ import annotations

import math
import operator

import numpy as np

INSTANCES: list["Lab"] = []

_ACTION_SPEC = [
    {"min": -512, "max": 512, "name": "LOOK_LEFT_RIGHT_PIXELS_PER_FRAME"},
    {"min": -512, "max": 512, "name": "LOOK_DOWN_UP_PIXELS_PER_FRAME"},
    {"min": -1, "max": 1, "name": "STRAFE_LEFT_RIGHT"},
    {"min": -1, "max": 1, "name": "MOVE_BACK_FORWARD"},
    {"min": 0, "max": 1, "name": "FIRE"},
    {"min": 0, "max": 1, "name": "JUMP"},
    {"min": 0, "max": 1, "name": "CROUCH"},
]

# Stand-in levels: name -> (maze size incl. outer wall or None for an empty room, episode s).
LEVELS = {
    "contributed/dmlab30/explore_goal_locations_small": (11, 90),
    "contributed/dmlab30/explore_goal_locations_large": (17, 120),
    "tests/empty_room_test": (None, 60),   # builds no maze: DEBUG.MAZE.LAYOUT is ''
}

# Room settings of the goal levels (upstream factories/explore/factory.lua defaults, with the
# overrides of explore_goal_locations_large.lua); a level not listed here has no goal.
GOAL_LEVELS = {
    "contributed/dmlab30/explore_goal_locations_small": dict(max_rooms=4, room_min_size=3, room_max_size=5,
                                                             spawns_per_room=5, objects_per_room=4),
    "contributed/dmlab30/explore_goal_locations_large": dict(max_rooms=9, room_min_size=3, room_max_size=3,
                                                             spawns_per_room=5, objects_per_room=5),
}
GOAL_REWARD = 10.0
GOAL_REACH = 30.0                # units: player and goal bounding boxes touch (Quake items: 15 + 15)

CELL = 100.0
SPEED = 320.0                    # game units per second
DEG_PER_PIXEL_SECOND = 0.11 * 60 * 0.96  # degrees per look pixel per second (upstream math_utils.calculate_angle)


def version() -> str:
    return "1.0"


_RUNFILES = ["."]


def runfiles_path() -> str:
    return _RUNFILES[0]


def set_runfiles_path(path: str) -> bool:
    if not isinstance(path, str):
        raise TypeError(f"argument 1 must be str, not {type(path).__name__}")
    _RUNFILES[0] = path
    return True


def _c_int(value: object) -> int:
    """A C `int` argument parsed with format "i": what `operator.index` takes, in a C int's range."""
    n = operator.index(value)  # TypeError: "'float' object cannot be interpreted as an integer"
    if n > 2**31 - 1:
        raise OverflowError("signed integer is greater than maximum")
    if n < -2**31:
        raise OverflowError("signed integer is less than minimum")
    return n


def _tp_name(value: object) -> str:
    """`Py_TYPE(value)->tp_name`: 'str' for built-ins and classes defined in Python, 'numpy.int64'
    for a C type such as NumPy's scalars."""
    kind = type(value)
    heap = bool(kind.__flags__ & (1 << 9))  # Py_TPFLAGS_HEAPTYPE
    return kind.__name__ if heap or kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def _check_str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("bad argument type for built-in operation")
    return value


class Lab:
    """Stand-in for `deepmind_lab.Lab` (see the module docstring)."""

    def __init__(self, level, observations, config=None, renderer="software", level_cache=None):
        if not isinstance(level, str):
            raise TypeError(f"argument 1 must be str, not {type(level).__name__}")
        if not isinstance(observations, list):
            raise TypeError(f"argument 2 must be list, not {type(observations).__name__}")
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise TypeError(f"argument 3 must be dict, not {type(config).__name__}")
        if not isinstance(renderer, str):
            raise TypeError(f"argument 4 must be str, not {type(renderer).__name__}")
        if renderer not in ("", "software", "hardware"):
            raise RuntimeError(f'Failed to set renderer must be "hardware" or "software" actual "{renderer}"!')
        settings = {"fps": "60", "width": "320", "height": "240"}
        for key, value in config.items():
            settings[_check_str(key)] = _check_str(value)
        for key in ("fps", "width", "height"):
            if not settings[key].isdigit() or int(settings[key]) <= 0:
                raise RuntimeError(f"Failed to apply setting '{key} = {settings[key]}' - \"bad value\"")
        if level not in LEVELS:
            raise RuntimeError(f'Failed to init environment - "Could not find level {level}"')
        INSTANCES.append(self)
        self.level = level
        self.config = dict(config)
        self.renderer = renderer
        self.level_cache = level_cache
        self.resets: list[tuple[int, int | None]] = []
        self.steps: list[tuple[np.ndarray, int]] = []
        self.respawns: list[int] = []  # the number of the step call each goal respawn happened in
        self._goal_rooms = GOAL_LEVELS.get(level)
        self._fps = int(settings["fps"])
        self._w, self._h = int(settings["width"]), int(settings["height"])
        self._size, seconds = LEVELS[level]
        self._episode_frames = seconds * self._fps
        self._spec = self._observation_spec()
        names = {s["name"] for s in self._spec}
        for name in observations:
            if not isinstance(name, str):
                raise TypeError("bad argument type for built-in operation")
            if name not in names:
                raise ValueError(f"Unknown observation '{name}'.")
        self.observation_names = list(observations)
        self._status = "uninitialized"
        self._episode = 0
        self._frames = 0       # frames the level ran this episode (its time limit counts these)
        self._num_steps = 0    # what num_steps() reports: the frames asked for

    # ------------------------------------------------------------------ API

    def reset(self, episode=-1, seed=None):
        episode = _c_int(episode)
        if seed is not None and not isinstance(seed, int):  # PyLong_Check: a NumPy integer is not one
            raise ValueError(f"'seed' must be int or None, was '{_tp_name(seed)}'.")
        if self._status == "closed":
            raise RuntimeError('Failed to start environment - "closed"')
        if episode >= 0:
            self._episode = episode
        self.resets.append((episode, seed))
        if seed is None:
            seed = int(np.random.randint(2**31))
        self._new_map(int(seed) & 0x7FFFFFFF)
        self._frames = self._num_steps = 0
        self._episode += 1
        self._status = "running"
        return True

    def step(self, action, num_steps=1):
        if not isinstance(action, np.ndarray):
            raise TypeError(f"argument 1 must be numpy.ndarray, not {type(action).__name__}")
        num_steps = _c_int(num_steps)
        if self._status != "running":
            raise RuntimeError("Environment in wrong status to advance.")
        if action.ndim != 1 or action.shape[0] != len(_ACTION_SPEC):
            raise ValueError(f"action must have shape ({len(_ACTION_SPEC)})")
        if action.dtype != np.intc:
            raise ValueError("action must have dtype np.intc")
        for value, spec in zip(action.tolist(), _ACTION_SPEC):
            if not spec["min"] <= value <= spec["max"]:
                raise ValueError(f"stand-in: {spec['name']}={value} outside [{spec['min']}, {spec['max']}]")
        if num_steps < 1:
            raise ValueError("stand-in: num_steps must be >= 1")
        self.steps.append((action.copy(), num_steps))
        self._num_steps += num_steps  # the whole request, as the real module counts it
        look, _, strafe, move = (int(v) for v in action[:4])
        reward = 0.0
        for _ in range(num_steps):
            self._advance(look, strafe, move)
            self._frames += 1
            if self._goal is not None and np.hypot(*(self._pos[:2] - self._goal)) <= GOAL_REACH:
                # upstream: the goal pickup restarts the map (quickRestart), the player respawns
                reward += GOAL_REWARD
                self._spawn()
                self.respawns.append(len(self.steps))
            if self._frames >= self._episode_frames:
                self._status = "terminated"
                break
        return reward

    def observations(self):
        if self._status != "running":
            raise RuntimeError("Environment in wrong status for call to observations()")
        out = {}
        for name in self.observation_names:
            out[name] = self._observation(name)
        return out

    def is_running(self):
        return self._status == "running"

    def num_steps(self):
        return self._num_steps

    def fps(self):
        return self._fps

    def events(self):
        if self._status not in ("running", "terminated"):
            raise RuntimeError("Environment in wrong status for call to events()")
        return []

    def close(self):
        if self._status == "closed":
            return False
        self._status = "closed"
        return True

    def action_spec(self):
        return [dict(s) for s in _ACTION_SPEC]

    def observation_spec(self):
        return [dict(s) for s in self._spec]

    # ------------------------------------------------------------------ stand-in world

    def _observation_spec(self):
        h, w = self._h, self._w
        spec = [
            {"dtype": np.uint8, "name": "RGB_INTERLEAVED", "shape": (h, w, 3)},
            {"dtype": np.uint8, "name": "RGB", "shape": (3, h, w)},
            {"dtype": np.float64, "name": "VEL.TRANS", "shape": (3,)},
            {"dtype": np.float64, "name": "VEL.ROT", "shape": (3,)},
            {"dtype": np.float64, "name": "DEBUG.POS.TRANS", "shape": (3,)},
            {"dtype": np.float64, "name": "DEBUG.POS.ROT", "shape": (3,)},
            {"dtype": str, "name": "DEBUG.MAZE.LAYOUT", "shape": ()},  # added with DEBUG.POS.* upstream
        ]
        return spec

    def _new_map(self, seed: int) -> None:
        rng = np.random.RandomState(seed)
        self._rng = rng
        if self._size is None:
            grid = np.full((7, 7), " ")
            grid[0, :] = grid[-1, :] = grid[:, 0] = grid[:, -1] = "*"
        else:
            import labmaze

            rooms = self._goal_rooms or dict(max_rooms=4, room_min_size=3, room_max_size=5)
            maze = labmaze.RandomMaze(height=self._size, width=self._size, random_seed=seed, **rooms)
            grid = np.array(maze.entity_layer)
        self._grid = grid
        self._walls = grid == "*"
        rows = grid.shape[0]
        goals = np.argwhere(grid == "G")
        self._goal = None
        if self._goal_rooms is not None and len(goals):
            r, c = goals[rng.randint(len(goals))]
            self._goal = np.array([(c + 0.5) * CELL, (rows - r - 0.5) * CELL])
        self._spawn()
        self._wall_colour = rng.randint(60, 230, size=(grid.shape[0], grid.shape[1], 3))

    def _spawn(self) -> None:
        """Place the player on a random spawn cell ('P'; any free cell where the layout has none)."""
        rows = self._grid.shape[0]
        cells = np.argwhere(self._grid == "P")
        if not len(cells):
            cells = np.argwhere(~self._walls)
        r, c = cells[self._rng.randint(len(cells))]
        self._pos = np.array([(c + 0.5) * CELL, (rows - r - 0.5) * CELL, 0.0])
        self._yaw = float(self._rng.uniform(-180.0, 180.0))
        self._vel = np.zeros(3)

    def _is_wall(self, x: float, y: float) -> bool:
        rows, cols = self._walls.shape
        c, r = int(math.floor(x / CELL)), rows - 1 - int(math.floor(y / CELL))
        return not (0 <= r < rows and 0 <= c < cols) or bool(self._walls[r, c])

    def _advance(self, look: int, strafe: int, move: int) -> None:
        self._yaw = (self._yaw - look * DEG_PER_PIXEL_SECOND / self._fps + 180.0) % 360.0 - 180.0
        yaw = math.radians(self._yaw)
        fwd = np.array([math.cos(yaw), math.sin(yaw)])
        right = np.array([math.sin(yaw), -math.cos(yaw)])
        step = (move * fwd + strafe * right) * SPEED / self._fps
        self._vel = np.array([*step * self._fps, 0.0])
        x, y = self._pos[:2]
        r = 16.0  # player radius, game units
        nx = x + step[0]
        if not self._is_wall(nx + math.copysign(r, step[0]), y):
            x = nx
        ny = y + step[1]
        if not self._is_wall(x, ny + math.copysign(r, step[1])):
            y = ny
        self._pos[:2] = (x, y)

    def _observation(self, name: str):
        if name == "RGB_INTERLEAVED":
            return self._render()
        if name == "RGB":
            return np.ascontiguousarray(np.transpose(self._render(), (2, 0, 1)))
        if name == "DEBUG.POS.TRANS":
            return self._pos.astype(np.float64).copy()
        if name == "DEBUG.POS.ROT":
            return np.array([0.0, self._yaw, 0.0])
        if name == "VEL.TRANS":
            return self._vel.copy()
        if name == "VEL.ROT":
            return np.zeros(3)
        if name == "DEBUG.MAZE.LAYOUT":  # upstream's mazeLayout stays '' unless the level calls setMaze
            return "" if self._size is None else "\n".join("".join(row) for row in self._grid) + "\n"
        raise ValueError(f"Unknown observation '{name}'.")

    def _render(self) -> np.ndarray:
        h, w = self._h, self._w
        img = np.empty((h, w, 3), np.uint8)
        img[: h // 2] = (150, 190, 240)   # sky
        img[h // 2:] = (90, 140, 70)      # floor
        rows = self._walls.shape[0]
        x0, y0 = self._pos[:2] / CELL
        for col in range(w):
            ang = math.radians(self._yaw) - math.radians(45.0) * (2.0 * (col + 0.5) / w - 1.0)
            dx, dy = math.cos(ang), math.sin(ang)
            dist = 0.0
            while dist < 20.0:
                dist += 0.05
                cx, cy = x0 + dx * dist, y0 + dy * dist
                c, r = int(math.floor(cx)), rows - 1 - int(math.floor(cy))
                if not (0 <= r < rows and 0 <= c < self._walls.shape[1]) or self._walls[r, c]:
                    break
            half = int(min(h / 2, h / (2.0 * max(dist, 1e-3))))
            shade = 1.0 / (1.0 + 0.15 * dist)
            r_, c_ = min(max(r, 0), rows - 1), min(max(c, 0), self._walls.shape[1] - 1)
            img[h // 2 - half: h // 2 + half, col] = (self._wall_colour[r_, c_] * shade).astype(np.uint8)
        return img
