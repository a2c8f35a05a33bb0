"""worldsim/Maze-v0: a DeepMind-Lab-style first-person maze, drawn by a numpy raycaster.

The layout comes from `labmaze.RandomMaze` (the generator behind DeepMind Lab's random
mazes); the picture is made by a vectorised raycaster: every screen column's ray is walked
through the grid at once (DDA, unrolled over grid lines), floor pixels come from per-row
distances, and all colours are gathered from one precomputed texture atlas
(envs/_textures.py). Rendering is pure numpy, a few hundred microseconds per 64x64 frame.

The look follows DeepMind Lab: flat light-blue sky, light grey walls one cell high with the
eye at half height, green grass corridors, rooms floored in colours. Because the point of
this simulator is to teach a world model to *remember places*, every wall face also gets a
large poster (a shape in a saturated colour) and a tint, chosen by hashing the maze seed,
the wall cell and the face side; room walls share the room's tint. Large shapes and colours
are what survive at 64x64.

Conventions (docs/ARCHITECTURE.md):
- pose = (x, y, yaw): x = column, y = row, in cells; cell (r, c) has centre (c+.5, r+.5);
  the view direction is (cos yaw, sin yaw) in (x, y).
- The map is seen from above with rows going down (as `maze_walls` prints), so the viewer's
  right is (-sin yaw, cos yaw): `turn_right` *increases* yaw, `turn_left` decreases it.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import labmaze
import numpy as np
from gymnasium import spaces

from envs._base import MAX_FRAME_SIDE, SimulatorEnv, as_hw

from envs._textures import FLOOR_VARIANTS, SKY_INDEX, Atlas, build_atlas

ACTION_NAMES: tuple[str, ...] = ("noop", "forward", "backward", "turn_left", "turn_right")

# Face sides of a wall cell, in the order used by the face hash.
WEST, EAST, NORTH, SOUTH = 0, 1, 2, 3


def _hash(*keys: np.ndarray | int) -> np.ndarray:
    """Deterministic 64-bit mix (splitmix64 finaliser) of integer keys, vectorised.
    Python's hash() is salted per process for strings, and textures must be stable."""
    h = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for k in keys:
            h = (h ^ np.asarray(k, dtype=np.int64).astype(np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
            h = h ^ (h >> np.uint64(31))
            h = h * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(29))
    return h


def _clamp(a: np.ndarray, hi: int) -> np.ndarray:
    """Clamp integer indices to [0, hi] (np.clip has a slow Python wrapper)."""
    return np.minimum(np.maximum(a, 0), hi)


class MazeEnv(SimulatorEnv):
    """First-person random maze (embedded DeepMind-Lab-style simulator).

    Observation space: `Box(0, 255, (H, W, 3), uint8)`, the rendered first-person view
    (H = W = 64 by default; `resolution` takes an int or (H, W)).

    Action space: `Discrete(5)`, named by `action_names`:
        0 noop        stand still
        1 forward     move `move_step` cells (0.15) along the view direction
        2 backward    move `move_step` cells backward
        3 turn_left   yaw -= `turn_step` (10 degrees, 36 steps make a full turn)
        4 turn_right  yaw += `turn_step`
    Movement collides with walls: the agent is a square of half-width `radius` (0.2 cell)
    that slides along walls (x and y are resolved separately).

    Reward is always 0. Episodes never terminate; they are truncated after `max_steps`
    steps (1000 by default; None: never), after which `step` needs a `reset` first. That is the env's
    own limit: `gym.make(..., max_episode_steps=N)` can only shorten it; for longer episodes pass
    `max_steps=N` (or None). `reset(options={"maze_seed": k})` builds maze k; otherwise the
    maze seed is drawn from the env's RNG. The start is a random free cell centre with a
    random yaw. `info` carries `pose` (float32 [x, y, yaw]) and `maze_seed` (int).

    Args:
        resolution: int or (H, W) of the observation.
        maze_size: int or (rows, cols), odd, including the outer wall (labmaze's size), at most
            MAX_MAZE_SIDE a side.
        max_rooms, room_min_size, room_max_size: labmaze room settings.
        fov_deg: horizontal field of view in degrees (DeepMind Lab: 90).
        move_step: cells per forward/backward step.
        turn_step_deg: degrees per turn step.
        max_steps: truncate after this many steps (default 1000; None: never).
        supersample: render at k times the resolution and box-filter down (smoother edges,
            about k*k times slower); resolution times supersample is at most MAX_RENDER_SIDE a side.
        render_mode: None or "rgb_array".
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    action_names: tuple[str, ...] = ACTION_NAMES

    # Settings come from files made by others too (a checkpoint's or dataset's `simulator.settings`):
    # maze_size [4001, 4001] in a 7 KB config.json kept labmaze's C code busy for over 10 minutes, deaf
    # to Ctrl-C and SIGTERM (201 takes 7 s, 101 0.6 s), and resolution [3000, 3000] took 12.8 GB to
    # play two frames ([20000, 20000]: killed for memory at 23 GB on reset). The caps are far above
    # any maze or frame a world model here is trained on (11x11, 64x64).
    MAX_MAZE_SIDE = 101
    MAX_RENDER_SIDE = MAX_FRAME_SIDE

    def __init__(
        self,
        resolution: int | Sequence[int] = 64,
        maze_size: int | Sequence[int] = 11,
        max_rooms: int = 4,
        room_min_size: int = 3,
        room_max_size: int = 5,
        fov_deg: float = 90.0,
        move_step: float = 0.15,
        turn_step_deg: float = 10.0,
        max_steps: int | None = 1000,
        supersample: int = 1,
        render_mode: str | None = None,
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.height, self.width = as_hw(resolution, "resolution")
        self.rows, self.cols = as_hw(maze_size, "maze_size")
        if self.rows % 2 == 0 or self.cols % 2 == 0 or min(self.rows, self.cols) < 5:
            raise ValueError(f"maze_size must be odd and >= 5 (labmaze), got {maze_size!r}")
        if room_max_size >= min(self.rows, self.cols):  # such a room can take the outer wall away
            raise ValueError(f"room_max_size must be smaller than the maze's shorter side, got {room_max_size} for "
                             f"maze_size {self.rows}x{self.cols} (e.g. room_max_size={min(self.rows, self.cols) - 1})")
        if int(supersample) < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample!r}")
        if max(self.rows, self.cols) > self.MAX_MAZE_SIDE:
            raise ValueError(f"maze_size must be at most {self.MAX_MAZE_SIDE} a side, got {maze_size!r}")
        if max(self.height, self.width) * int(supersample) > self.MAX_RENDER_SIDE:
            raise ValueError(f"resolution times supersample must be at most {self.MAX_RENDER_SIDE} pixels a side, got "
                             f"resolution {resolution!r} and supersample {supersample!r}")
        if not 10.0 <= fov_deg < 170.0:
            raise ValueError(f"fov_deg must be in [10, 170), got {fov_deg}")
        # a zero or negative step would make "forward" stand still or walk backward, silently
        try:
            move_step, turn_step_deg = float(move_step), float(turn_step_deg)
        except (TypeError, ValueError):
            raise ValueError(f"move_step and turn_step_deg must be numbers, got {move_step!r} and {turn_step_deg!r}") from None
        if not (math.isfinite(move_step) and move_step > 0):
            raise ValueError(f"move_step must be a positive number of cells, got {move_step}")
        if not 0.0 < turn_step_deg <= 180.0:
            raise ValueError(f"turn_step_deg must be in (0, 180], got {turn_step_deg}")
        if isinstance(max_steps, float) and max_steps.is_integer():  # 1e3 on a command line, as the other envs take
            max_steps = int(max_steps)
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer))
                                      or max_steps < 1):
            raise ValueError(f"max_steps must be an integer >= 1 or None, got {max_steps!r}")
        self.max_rooms, self.room_min_size, self.room_max_size = max_rooms, room_min_size, room_max_size
        self.fov_deg = float(fov_deg)
        self.move_step = float(move_step)
        self.turn_step_deg = float(turn_step_deg)
        self.turn_step = math.radians(turn_step_deg)
        self.max_steps = max_steps
        self.supersample = int(supersample)
        self.render_mode = render_mode
        self.radius = 0.2          # collision half-width, cells
        self.wall_height = 1.0     # one cell high, like DeepMind Lab's maze walls
        self.eye_height = 0.5      # eye at half the wall height: horizon mid-screen

        self.action_space = spaces.Discrete(len(ACTION_NAMES))
        self.observation_space = spaces.Box(0, 255, (self.height, self.width, 3), np.uint8)

        self._atlas: Atlas = build_atlas()
        self._setup_camera()

        self.maze_walls: np.ndarray | None = None
        self.maze_seed: int | None = None
        self._pose = np.zeros(3, np.float64)
        self._steps = 0
        self._needs_reset = True
        self._frame: np.ndarray | None = None

    # ------------------------------------------------------------------ public API

    def simulator_settings(self) -> dict[str, Any]:
        """JSON-able kwargs such that `gym.make("worldsim/Maze-v0", **settings)` rebuilds
        this simulator (stored in datasets and checkpoints)."""
        return {
            "resolution": [self.height, self.width],
            "maze_size": [self.rows, self.cols],
            "max_rooms": self.max_rooms,
            "room_min_size": self.room_min_size,
            "room_max_size": self.room_max_size,
            "fov_deg": self.fov_deg,
            "move_step": self.move_step,
            "turn_step_deg": self.turn_step_deg,
            "max_steps": self.max_steps,
            "supersample": self.supersample,
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        maze_seed = self._pick_maze_seed(options)
        self._build_maze(maze_seed)
        free = np.argwhere(~self.maze_walls)
        r, c = free[self.np_random.integers(len(free))]
        yaw = self.np_random.uniform(-math.pi, math.pi)
        self._pose[:] = (c + 0.5, r + 0.5, yaw)
        self._steps = 0
        self._needs_reset = False
        self._frame = self._render()
        return self._frame.copy(), self._info()

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._needs_reset:
            raise RuntimeError("MazeEnv: call reset() before step() (and after an episode is truncated)")
        if not self.action_space.contains(action):  # not 1.5 taken as 1, nor "forward"
            raise ValueError(f"invalid action {action!r}: expected an int in [0, {len(ACTION_NAMES)}) "
                             f"({', '.join(ACTION_NAMES)})")
        name = ACTION_NAMES[int(action)]
        if name == "forward":
            self._move(self.move_step)
        elif name == "backward":
            self._move(-self.move_step)
        elif name == "turn_left":
            self._turn(-self.turn_step)
        elif name == "turn_right":
            self._turn(self.turn_step)
        self._steps += 1
        self._frame = self._render()
        truncated = self.max_steps is not None and self._steps >= self.max_steps
        if truncated:
            self._needs_reset = True
        return self._frame.copy(), 0.0, False, truncated, self._info()

    def render(self) -> np.ndarray | None:
        if self.render_mode == "rgb_array" and self._frame is not None:
            return self._frame.copy()
        return None

    def set_pose(self, x: float, y: float, yaw: float) -> np.ndarray:
        """Teleport (for tests and tools); returns the new frame. Does not check walls."""
        if self.maze_walls is None:
            raise RuntimeError("MazeEnv: call reset() before set_pose()")
        self._pose[:] = (x, y, math.remainder(yaw, 2 * math.pi))
        self._frame = self._render()
        return self._frame.copy()

    # ------------------------------------------------------------------ maze

    def _build_maze(self, maze_seed: int) -> None:
        maze = labmaze.RandomMaze(
            height=self.rows, width=self.cols, max_rooms=self.max_rooms,
            room_min_size=self.room_min_size, room_max_size=self.room_max_size,
            random_seed=maze_seed,
        )
        entity = np.array(maze.entity_layer)
        variation = np.array(maze.variations_layer)
        self.maze_seed = maze_seed
        self.maze_walls = entity == "*"
        border = np.concatenate([self.maze_walls[[0, -1]].ravel(), self.maze_walls[:, [0, -1]].ravel()])
        assert border.all(), "the raycaster relies on labmaze's outer wall"
        # Room letter -> room number (0 = corridor).
        letters = np.where(np.char.isalpha(variation), variation, "@").view(np.int32)
        room = np.where(self.maze_walls, 0, np.maximum(letters.reshape(variation.shape) - ord("@"), 0))
        R, C, atlas = self.rows, self.cols, self._atlas

        # Floors: corridors grass green, each room a colour picked by hashing (seed, room).
        room_colour = 1 + (_hash(maze_seed, room, 1) % np.uint64(atlas.n_floor_colours - 1)).astype(np.int64)
        floor_colour = np.where(room > 0, room_colour, 0)
        rr, cc = np.mgrid[0:R, 0:C]
        variant = (_hash(maze_seed, rr, cc, 2) % np.uint64(FLOOR_VARIANTS)).astype(np.int64)
        self._floor_tex = (floor_colour * FLOOR_VARIANTS + variant).reshape(-1)

        # Walls: one texture per (wall cell, side). The face's tint comes from the room the
        # face looks into (corridors: mostly neutral grey), its poster from a face hash.
        faces = np.arange(R * C * 4).reshape(R, C, 4)
        h = _hash(maze_seed, faces, 3)
        shape = (h % np.uint64(atlas.n_shapes)).astype(np.int64)
        colour = ((h >> np.uint64(16)) % np.uint64(atlas.n_colours)).astype(np.int64)
        corridor_tint = ((h >> np.uint64(32)) % np.uint64(2 * atlas.n_tints)).astype(np.int64)
        corridor_tint = np.where(corridor_tint >= atlas.n_tints, 0, corridor_tint)
        # Room seen through each face: the free cell on that face's side.
        padded = np.pad(room, 1)
        facing = np.stack([padded[1:-1, :-2], padded[1:-1, 2:], padded[:-2, 1:-1], padded[2:, 1:-1]], -1)
        room_tint = (_hash(maze_seed, facing, 4) % np.uint64(atlas.n_tints - 1)).astype(np.int64) + 1
        tint = np.where(facing > 0, room_tint, corridor_tint)
        self._face_tex = atlas.wall_texture_id(tint, shape, colour).reshape(-1)
        self._walls_flat = self.maze_walls.reshape(-1)

    # ------------------------------------------------------------------ motion

    def _turn(self, angle: float) -> None:
        self._pose[2] = math.remainder(self._pose[2] + angle, 2 * math.pi)

    def _move(self, distance: float) -> None:
        x, y, yaw = self._pose
        # Sub-steps keep any move shorter than a cell minus the body: no tunnelling.
        n = max(1, math.ceil(abs(distance) / 0.25))
        dx, dy = distance * math.cos(yaw) / n, distance * math.sin(yaw) / n
        for _ in range(n):
            x = self._slide(x, y, dx, axis=0)
            y = self._slide(y, x, dy, axis=1)
        self._pose[0], self._pose[1] = x, y

    def _slide(self, a: float, b: float, da: float, axis: int) -> float:
        """Move coordinate `a` by `da` (the other coordinate is `b`), stopping `radius`
        short of the first wall cell the square body would overlap."""
        if da == 0.0:
            return a
        r, eps = self.radius, 1e-6
        na = a + da
        b0, b1 = math.floor(b - r + eps), math.floor(b + r - eps)
        lead = math.floor(na + r - eps) if da > 0 else math.floor(na - r + eps)
        cells = self.maze_walls[b0:b1 + 1, lead] if axis == 0 else self.maze_walls[lead, b0:b1 + 1]
        if cells.any():
            na = lead - r - eps if da > 0 else lead + 1 + r + eps
        return na


    # ------------------------------------------------------------------ rendering

    def _setup_camera(self) -> None:
        """Per-column and per-row camera constants (independent of pose)."""
        s = self.supersample
        H, W = self.height * s, self.width * s
        self._focal = (W / 2) / math.tan(math.radians(self.fov_deg) / 2)
        # Tangent offsets of each column/row centre from the optical axis.
        self._col_tan = ((np.arange(W) + 0.5) - W / 2) / self._focal
        row_tan = ((np.arange(H) + 0.5) - H / 2) / self._focal  # positive = below horizon
        self._horizon = int(np.count_nonzero(row_tan <= 0))  # rows [0, horizon) look up
        self._row_tan = row_tan
        lower = row_tan[self._horizon:]
        self._floor_dist = self.eye_height / lower  # distance along the axis of each floor row
        atlas = self._atlas
        # Floor mip level per row: geometric mean of the texel footprint across and along.
        footprint = atlas.floor_sizes[0] * np.sqrt(self._floor_dist / self._focal
                                                   * self._floor_dist ** 2 / (self._focal * self.eye_height))
        self._floor_level = np.clip(np.round(np.log2(np.maximum(footprint, 1e-9))), 0,
                                    len(atlas.floor_sizes) - 1).astype(np.int64)
        self._floor_fog = self._fog(self._floor_dist)[:, None]
        self._col_index = np.arange(W)

    @staticmethod
    def _fog(dist: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + 0.045 * dist)

    def _cast(self, px: float, py: float, rdx: np.ndarray, rdy: np.ndarray):
        """Cast all column rays through the grid. Returns perpendicular wall distance,
        texture u in [0, 1), face index (cell*4 + side) and whether the face is E/W."""
        R, C = self.rows, self.cols
        walls = self._walls_flat
        tiny = 1e-9
        rdx = np.where(np.abs(rdx) < tiny, tiny, rdx)
        rdy = np.where(np.abs(rdy) < tiny, tiny, rdy)
        # Crossings of vertical grid lines x = k, nearest first (the DDA's x-steps).
        sx = np.where(rdx > 0, 1, -1)
        kx = (math.floor(px) + (sx > 0))[:, None] + sx[:, None] * np.arange(C)[None, :]
        tx = (kx - px) / rdx[:, None]
        colx = kx - (sx < 0)[:, None]
        yhit = py + tx * rdy[:, None]
        # Clamping is exact here: the maze's border cells are all walls, so a crossing
        # outside the grid clamps onto a wall just as the true ray would have hit one.
        rowx = _clamp(np.floor(yhit).astype(np.int64), R - 1)
        colx = _clamp(colx, C - 1)
        hitx = walls[rowx * C + colx]
        jx = hitx.argmax(axis=1)
        # Crossings of horizontal grid lines y = k (the DDA's y-steps).
        sy = np.where(rdy > 0, 1, -1)
        ky = (math.floor(py) + (sy > 0))[:, None] + sy[:, None] * np.arange(R)[None, :]
        ty = (ky - py) / rdy[:, None]
        rowy = ky - (sy < 0)[:, None]
        xhit = px + ty * rdx[:, None]
        coly = _clamp(np.floor(xhit).astype(np.int64), C - 1)
        rowy = _clamp(rowy, R - 1)
        hity = walls[rowy * C + coly]
        jy = hity.argmax(axis=1)

        i = self._col_index
        tx, ty = tx[i, jx], ty[i, jy]
        use_x = tx < ty
        dist = np.where(use_x, tx, ty)
        # Texture u runs left to right as seen by the viewer facing the face.
        fy, fx = yhit[i, jx] % 1.0, xhit[i, jy] % 1.0
        u = np.where(use_x, np.where(sx > 0, fy, 1 - fy), np.where(sy > 0, 1 - fx, fx))
        row = np.where(use_x, rowx[i, jx], rowy[i, jy])
        col = np.where(use_x, colx[i, jx], coly[i, jy])
        side = np.where(use_x, np.where(sx > 0, WEST, EAST), np.where(sy > 0, NORTH, SOUTH))
        face = (row * C + col) * 4 + side
        return dist, u, face, use_x

    def _render(self) -> np.ndarray:
        px, py, yaw = self._pose
        cy, sy = math.cos(yaw), math.sin(yaw)
        # Ray per column: view direction + tan offset * right vector (right = (-sin, cos)).
        rdx = cy - sy * self._col_tan
        rdy = sy + cy * self._col_tan
        dist, u, face, east_west = self._cast(px, py, rdx, rdy)
        atlas = self._atlas
        hz = self._horizon

        # Walls: mip level per column from the texel footprint of one pixel.
        lod = np.log2(np.maximum(atlas.wall_sizes[0] / self._focal * dist, 1.0))
        level = np.minimum(np.rint(lod).astype(np.int64), len(atlas.wall_sizes) - 1)
        size = atlas.wall_sizes[level]
        tex = self._face_tex[face]
        tu = np.minimum((u * size).astype(np.int64), size - 1)
        col_base = atlas.wall_offsets[level] + tex * size * size + tu
        # World height of each pixel were it on the wall; v runs top (0) to bottom (1).
        z = self.eye_height - self._row_tan[:, None] * dist[None, :]
        v = np.minimum(np.maximum((1.0 - z / self.wall_height) * size[None, :], 0).astype(np.int64),
                       size[None, :] - 1)
        wall_idx = col_base[None, :] + v * size[None, :]
        is_wall = (z >= 0) & (z <= self.wall_height)

        # Floor below the horizon: world point of each pixel from per-row distances.
        fd = self._floor_dist[:, None]
        fx = px + fd * rdx[None, :]
        fy = py + fd * rdy[None, :]
        cx = _clamp(fx.astype(np.int64), self.cols - 1)
        cyi = _clamp(fy.astype(np.int64), self.rows - 1)
        ftex = self._floor_tex[cyi * self.cols + cx]
        fsize = atlas.floor_sizes[self._floor_level][:, None]
        fu = ((fx % 1.0) * fsize).astype(np.int64)
        fv = ((fy % 1.0) * fsize).astype(np.int64)
        floor_idx = atlas.floor_offsets[self._floor_level][:, None] + ftex * fsize * fsize + fv * fsize + fu

        idx = np.where(is_wall, wall_idx, SKY_INDEX)
        idx[hz:] = np.where(is_wall[hz:], wall_idx[hz:], floor_idx)

        # Shading: E/W faces a little brighter than N/S faces, mild distance fog.
        wall_shade = self._fog(dist) * np.where(east_west, 1.0, 0.86)
        shade = np.where(is_wall, wall_shade[None, :], 1.0)
        shade[hz:] = np.where(is_wall[hz:], wall_shade[None, :], self._floor_fog)
        img = atlas.table[idx] * shade[..., None].astype(np.float32)
        s = self.supersample
        if s > 1:
            img = img.reshape(self.height, s, self.width, s, 3).mean(axis=(1, 3))
        return (img + 0.5).astype(np.uint8)
