"""worldsim/MemoryMaze-v0: Memory Maze (MuJoCo via dm_control) behind our simulator interface.

Memory Maze (Pasukonis et al. 2022, `pip install memory-maze`) is a DeepMind-Lab-like 3D maze
built on labmaze + dm_control: a rolling-ball agent with a 64x64 egocentric camera, a new
random maze each episode, coloured target balls and varied wall textures.

We drive its dm_env API (`memory_maze.tasks.memory_maze_9x9(...)` and friends) with
`global_observables=True`, which adds `agent_pos`, `agent_dir` and `maze_layout`. The
package's own `gym` registration is not used: it imports the old `gym` package (and the
package `__init__` re-raises when `gym` is missing), so `_load_tasks()` imports the
`memory_maze.tasks` submodule without running the package `__init__`.

Rendering is offscreen OpenGL through MuJoCo: `MUJOCO_GL` defaults to `osmesa` here (needs
Debian's `libosmesa6`; works on any CPU machine). Set `MUJOCO_GL=egl` before the first import
for GPU rendering. Install steps and timings: docs/memory_maze.md.

Conventions (docs/ARCHITECTURE.md): pose = (x, y, yaw) in cells of `maze_walls` (which
includes the outer wall ring, like labmaze's entity layer), x = column, y = row (rows go
down), view direction (cos yaw, sin yaw) in (x, y). Memory Maze's `agent_pos` has its origin
at the bottom-left *inner* cell with y pointing up, so x = agent_pos[0] + 1 and
y = n_inner + 1 - agent_pos[1]; its `agent_dir` (dx, dy_up) becomes yaw = atan2(-dy_up, dx).
As in the embedded maze, `turn_right` increases yaw and `turn_left` decreases it.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import sys
import types
import weakref
from typing import Any

import numpy as np
from gymnasium import spaces

from envs._base import MAX_FRAME_SIDE, SimulatorEnv

ACTION_NAMES: tuple[str, ...] = (
    "noop", "forward", "turn_left", "turn_right", "forward_left", "forward_right",
)

# Our action name -> Memory Maze's discrete action index. Its DiscreteActionSetWrapper
# (memory_maze/tasks.py) lists, in this order: noop [0, 0], forward [-1, 0], left [0, -1],
# right [0, +1], forward+left [-1, -1], forward+right [-1, +1].
MM_ACTION_INDEX: dict[str, int] = {
    "noop": 0, "forward": 1, "turn_left": 2, "turn_right": 3, "forward_left": 4, "forward_right": 5,
}

MAZE_SIZES = (9, 11, 13, 15)

# Measured on memory-maze 1.0.3 / mujoco 3.17.0 (steady state, holding the action; the first
# step from rest is smaller because the ball accelerates): forward ~1.0 cell/s (2 m/s, cells
# are 2 m), turning ~73.6 degrees/s. At the default 4 Hz control: 0.25 cells and 18.4 degrees
# per step.
FORWARD_SPEED_CELLS_PER_S = 1.0
TURN_RATE_RAD_PER_S = math.radians(73.6)

DOCS = "docs/memory_maze.md"


class MemoryMazeUnavailableError(ImportError):
    """`memory_maze` (or MuJoCo / dm_control / an OpenGL backend) is missing or broken."""


_TASKS: types.ModuleType | None = None
# the process that rendered with MuJoCo's OpenGL context: a process forked from it (gymnasium's
# async vector env forks its workers by default) hangs for good when it sets up its own
_RENDERED_IN_PID: int | None = None


def _quiet_free_joint_warning(record: logging.LogRecord) -> bool:
    """dm_control logs this for Memory Maze's ball walker (slide joints, no free joint) on every
    build: nothing a user can act on, and it repeated for every episode `record` wrote."""
    return not record.getMessage().startswith("Cannot set velocity on Entity with no free joint")


def _load_tasks() -> types.ModuleType:
    """Import `memory_maze.tasks` without running `memory_maze/__init__.py` (which needs the
    old `gym` package and re-raises ImportError without it)."""
    global _TASKS
    if _TASKS is not None:
        return _TASKS
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    try:
        if "memory_maze.tasks" in sys.modules:
            _TASKS = sys.modules["memory_maze.tasks"]
            return _TASKS
        spec = importlib.util.find_spec("memory_maze")
        if spec is None or not spec.submodule_search_locations:
            raise MemoryMazeUnavailableError(
                "Memory Maze is not installed: `pip install 'worldsim[memory-maze]'` "
                f"(memory-maze, mujoco==3.17.0, dm-control==1.0.50) and `apt-get install -y "
                f"libosmesa6` for CPU rendering; see {DOCS}")
        if "memory_maze" not in sys.modules:
            pkg = types.ModuleType("memory_maze")
            pkg.__path__ = list(spec.submodule_search_locations)
            pkg.__spec__ = spec
            pkg.__file__ = spec.origin
            sys.modules["memory_maze"] = pkg
        _TASKS = importlib.import_module("memory_maze.tasks")
        logging.getLogger("absl").addFilter(_quiet_free_joint_warning)
        return _TASKS
    except MemoryMazeUnavailableError:
        raise
    except Exception as exc:  # ImportError, AttributeError from version skew, GL setup errors
        raise MemoryMazeUnavailableError(
            f"cannot import memory_maze.tasks ({type(exc).__name__}: {exc}); the working pins are "
            f"memory-maze==1.0.3, mujoco==3.17.0, dm-control==1.0.50 with MUJOCO_GL=osmesa "
            f"(libosmesa6) or egl; see {DOCS}") from exc


def _wrap(angle: float) -> float:
    return math.remainder(angle, 2.0 * math.pi)


class MemoryMazeEnv(SimulatorEnv):
    """Memory Maze as a worldsim simulator.

    Observation space: `Box(0, 255, (R, R, 3), uint8)`, the egocentric camera
    (R = `resolution`, 64 by default, as in the Memory Maze benchmark). With
    `target_color_in_image=True` (the benchmark's default) a thin border shows the colour of
    the current target.

    Action space: `Discrete(6)`, named by `action_names`:
        0 noop, 1 forward, 2 turn_left, 3 turn_right, 4 forward_left, 5 forward_right
    (Memory Maze's own discrete actions, same order). Per step at 4 Hz: about 0.25 cells
    forward (`move_step`) and 18.4 degrees of turn (`turn_step`, radians), steady state.

    Reward: 1.0 when the agent touches the current target (then a new target is drawn).
    Episodes never terminate; they are truncated at Memory Maze's time limit (250 s for
    9x9 = 1000 steps at 4 Hz; 500/750/1000 s for 11/13/15) or after `max_steps` steps.

    `reset(options={"maze_seed": k})` builds maze k (layout, textures, targets and start pose
    all follow from k, so the same seed gives the same frames); otherwise the maze seed is
    drawn from the env's RNG. `info` carries `pose` (float32 [x, y, yaw]) and `maze_seed`.
    `maze_walls` is the layout (bool [n+2, n+2], True = wall, outer ring included).

    Args:
        maze_size: inner maze size, one of 9, 11, 13, 15 (Memory Maze 9x9 ... 15x15).
        resolution: camera resolution (square).
        control_freq: agent steps per simulated second (Memory Maze default 4.0).
        target_color_in_image: draw the current target's colour as a border (benchmark default).
        good_visibility: Memory Maze's "Vis" variant (lower walls, targets raised).
        randomize_colors: Memory Maze's "6CL" variant (target colours shuffled per episode).
        max_steps: truncate after this many steps (None: only the task's time limit).
        render_mode: None or "rgb_array".
    """

    MAZE_SEED_LIMIT = 2**32

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    action_names: tuple[str, ...] = ACTION_NAMES

    def __init__(
        self,
        maze_size: int = 9,
        resolution: int = 64,
        control_freq: float = 4.0,
        target_color_in_image: bool = True,
        good_visibility: bool = False,
        randomize_colors: bool = False,
        max_steps: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        if int(maze_size) not in MAZE_SIZES:
            raise ValueError(f"maze_size must be one of {MAZE_SIZES} (Memory Maze sizes), got {maze_size!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        if not 8 <= int(resolution) <= MAX_FRAME_SIDE:  # (envs/_base.py: why the cap)
            raise ValueError(f"resolution must be from 8 to {MAX_FRAME_SIDE}, got {resolution!r}")
        if not float(control_freq) > 0:
            raise ValueError(f"control_freq must be > 0, got {control_freq!r}")
        if max_steps is not None and int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {max_steps!r}")
        self.maze_size = int(maze_size)
        self.resolution = int(resolution)
        self.control_freq = float(control_freq)
        self.target_color_in_image = bool(target_color_in_image)
        self.good_visibility = bool(good_visibility)
        self.randomize_colors = bool(randomize_colors)
        self.max_steps = None if max_steps is None else int(max_steps)
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "render_fps": self.control_freq}  # a frame per step
        self.move_step = FORWARD_SPEED_CELLS_PER_S / self.control_freq
        self.turn_step = TURN_RATE_RAD_PER_S / self.control_freq

        self.action_space = spaces.Discrete(len(ACTION_NAMES))
        self.observation_space = spaces.Box(0, 255, (self.resolution, self.resolution, 3), np.uint8)

        self._tasks = _load_tasks()
        self._dm: Any = None           # outermost dm_env wrapper
        self._composer: Any = None     # the dm_control composer.Environment inside it
        self.maze_walls: np.ndarray | None = None
        self.maze_seed: int | None = None
        self._pose = np.zeros(3, np.float64)
        self._frame: np.ndarray | None = None
        self._steps = 0
        self._needs_reset = True
        # Start-of-episode state of the compiled maze (see _replay_reset).
        self._compiled_seed: int | None = None
        self._start_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public API

    def simulator_settings(self) -> dict[str, Any]:
        """JSON-able kwargs such that `gym.make("worldsim/MemoryMaze-v0", **settings)` rebuilds
        this simulator."""
        return {
            "maze_size": self.maze_size,
            "resolution": self.resolution,
            "control_freq": self.control_freq,
            "target_color_in_image": self.target_color_in_image,
            "good_visibility": self.good_visibility,
            "randomize_colors": self.randomize_colors,
            "max_steps": self.max_steps,
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        maze_seed = self._pick_maze_seed(options)
        if maze_seed == self._compiled_seed and self._start_state is not None:
            ts = self._replay_reset()
        else:
            self._compiled_seed = None
            self._reseed(maze_seed)
            ts = self._dm.reset()
            global _RENDERED_IN_PID
            _RENDERED_IN_PID = os.getpid()  # its first frame is rendered
            self._compiled_seed = maze_seed
        self.maze_seed = maze_seed
        self._steps = 0
        self._needs_reset = False
        self._read(ts.observation, layout=True)
        return self._frame.copy(), self._info()

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._needs_reset:
            raise RuntimeError("MemoryMazeEnv: call reset() before step() (and after an episode ends)")
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r}: expected an int in [0, {len(ACTION_NAMES)})")
        ts = self._dm.step(MM_ACTION_INDEX[ACTION_NAMES[int(action)]])
        self._steps += 1
        self._read(ts.observation, layout=False)
        terminated = bool(ts.last() and ts.discount is not None and float(ts.discount) == 0.0)
        truncated = bool(ts.last() and not terminated)
        if self.max_steps is not None and self._steps >= self.max_steps:
            truncated = not terminated
        if terminated or truncated:
            self._needs_reset = True
        reward = float(ts.reward or 0.0)
        return self._frame.copy(), reward, terminated, truncated, self._info()

    def render(self) -> np.ndarray | None:
        if self.render_mode == "rgb_array" and self._frame is not None:
            return self._frame.copy()
        return None

    def close(self) -> None:
        # Free MuJoCo's GL context explicitly: left to interpreter exit, dm_control's render
        # executor may already be shut down and prints tracebacks.
        if self._dm is not None:
            try:
                self._dm.close()
            except Exception:
                pass
            self._dm = None
            self._composer = None
        # the next reset builds the simulator again; a step before it says so (not an AttributeError)
        self._compiled_seed, self._start_state, self._needs_reset = None, None, True
        super().close()

    def __getstate__(self) -> dict[str, Any]:
        # deepcopy and pickle end here: dm_control's physics and GL context cannot be copied
        raise TypeError("MemoryMazeEnv cannot be copied or pickled (dm_control's physics and GL context); "
                        "make another with gym.make('worldsim/MemoryMaze-v0', ...) and reset it to the same maze_seed")

    # ------------------------------------------------------------------ internals

    def _build(self, maze_seed: int) -> None:
        if _RENDERED_IN_PID not in (None, os.getpid()):
            raise RuntimeError(
                "Memory Maze cannot start in a process forked after its parent rendered Memory Maze "
                "(dm_control's render thread does not survive a fork: it would hang for good); start the "
                "workers with spawn, e.g. gym.make_vec('worldsim/MemoryMaze-v0', n, vectorization_mode='async', "
                "vector_kwargs={'context': 'spawn'})")
        make = getattr(self._tasks, f"memory_maze_{self.maze_size}x{self.maze_size}")
        try:
            self._dm = make(
                seed=maze_seed,
                global_observables=True,
                camera_resolution=self.resolution,
                control_freq=self.control_freq,
                target_color_in_image=self.target_color_in_image,
                good_visibility=self.good_visibility,
                randomize_colors=self.randomize_colors,
            )
        except Exception as exc:
            raise MemoryMazeUnavailableError(
                f"cannot build the Memory Maze task ({type(exc).__name__}: {exc}); with "
                f"MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} rendering needs libosmesa6 (osmesa) or a "
                f"GPU driver (egl); see {DOCS}") from exc
        env = self._dm
        while "_task" not in vars(env):
            env = getattr(env, "env", None)
            if env is None:
                break
        self._composer = env
        self._compiled_seed = None
        self._start_state = None
        # Remember the RNG state and current target at the start of `initialize_episode`
        # (after the maze was generated and compiled), so that a reset to the same maze can
        # skip regenerating and recompiling it (~1-4 s): see _replay_reset.
        task = getattr(env, "_task", None)
        original = getattr(type(task), "initialize_episode", None)  # the class's: no bound task to hold
        if task is None or original is None or not hasattr(task, "_current_target_ix"):
            return
        # Weak references only: a closure holding the task and this env (which holds the task) made a
        # cycle, so an env dropped without close() was freed by the cyclic collector, where
        # dm_control's render context deadlocks in its __del__ and the process hangs for good.
        owner, task_ref = weakref.ref(self), weakref.ref(task)

        def initialize_episode(physics: Any, random_state: Any) -> Any:
            this_task, this_env = task_ref(), owner()
            if this_env is not None:
                this_env._start_state = {"rng": random_state.get_state(),
                                         "target_ix": this_task._current_target_ix}
            return original(this_task, physics, random_state)

        task.initialize_episode = initialize_episode

    def _reseed(self, maze_seed: int) -> None:
        """Make the next dm_env reset produce exactly what a task freshly built with
        `seed=maze_seed` produces on its first reset, without rebuilding it (a build costs
        about as much as a reset, ~2 s). `memory_maze._memory_maze(seed=s)` draws the labmaze
        seed as the first number of RandomState(s) and hands the same RandomState to the
        composer environment; we redo exactly that. Falls back to a rebuild when the
        internals are not as expected (other memory-maze / dm_control versions)."""
        if self._dm is None:
            self._build(maze_seed)
            return
        try:
            composer_env = self._composer
            task = composer_env._task
            arena = task._maze_arena
            old = arena._maze
            rs = np.random.RandomState(maze_seed)
            maze = type(old)(
                height=old.height, width=old.width, max_rooms=old._max_rooms,
                room_min_size=old._room_min_size, room_max_size=old._room_max_size,
                max_variations=old._max_variations, spawns_per_room=old._spawns_per_room,
                objects_per_room=old._objects_per_room, simplify=True,
                random_seed=rs.randint(2147483648),
            )
            if hasattr(task, "_target_colors"):
                from memory_maze.maze import TARGET_COLORS
                task._target_colors = list(TARGET_COLORS)
            arena._maze = maze
            composer_env._random_state = rs
        except (AttributeError, TypeError, ImportError):
            self.close()
            self._build(maze_seed)

    def _replay_reset(self) -> Any:
        """Reset to the maze that is compiled now, without regenerating or recompiling it:
        restore the RNG state and the current target that `initialize_episode` saw on that
        maze's first reset, then let dm_control reset with recompiling switched off. The
        physics is reset by `reset_context` and the walker respawned from the same RNG
        state, so the frames are those of a full reset (tested)."""
        env, task, start = self._composer, self._composer._task, self._start_state
        env._random_state.set_state(start["rng"])
        task._current_target_ix = start["target_ix"]
        previous = env._recompile_mjcf_every_episode
        env._recompile_mjcf_every_episode = False
        try:
            return self._dm.reset()
        finally:
            env._recompile_mjcf_every_episode = previous

    def _read(self, obs: dict[str, Any], layout: bool) -> None:
        image = np.asarray(obs["image"], dtype=np.uint8)
        if image.shape != self.observation_space.shape:
            raise RuntimeError(f"Memory Maze returned an image of shape {image.shape}, "
                               f"expected {self.observation_space.shape}")
        self._frame = np.ascontiguousarray(image).copy()
        n = self.maze_size
        if layout:
            free = np.asarray(obs["maze_layout"]).astype(bool)  # bottom row first, inner cells
            walls = np.ones((n + 2, n + 2), dtype=bool)
            walls[1:-1, 1:-1] = ~np.flip(free, axis=0)
            self.maze_walls = walls
        pos = np.asarray(obs["agent_pos"], dtype=np.float64)
        d = np.asarray(obs["agent_dir"], dtype=np.float64)
        self._pose[:] = (pos[0] + 1.0, n + 1.0 - pos[1], _wrap(math.atan2(-d[1], d[0])))
