"""Scripted exploration policies for recording trajectories.

Policies choose actions by NAME and map them to indices through the simulator's
``action_names``, so they work with any simulator that has the names they use (the embedded
maze: ``noop, forward, backward, turn_left, turn_right``; Memory Maze: ``noop, forward,
turn_left, turn_right, forward_left, forward_right``). All randomness comes from the numpy
``Generator`` passed in.

Protocol (see :class:`Policy`)::

    policy = make_policy("navigator", rng)
    obs, info = env.reset(options={"maze_seed": 3})
    policy.reset(env, obs, info)
    while ...:
        obs, reward, terminated, truncated, info = env.step(policy.act(obs, info))

* :class:`RandomWalkPolicy` - DeepMind-Lab-style random walk: weighted actions held for a
  random 1..N steps, turning away when a forward move makes no progress.
* :class:`NavigatorPolicy` - walks to random waypoints along shortest paths (BFS over
  ``maze_walls``), turning in place toward the next cell centre then moving forward; at
  waypoints it sometimes looks around 360 degrees, and it later returns to earlier waypoints,
  so episodes revisit places long after they left the short context window.
* :class:`MixPolicy` - picks one of the two per episode.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Mapping

import numpy as np

FORWARD_NAMES = ("forward", "forward_left", "forward_right")
TURN_NAMES = ("turn_left", "turn_right")


def _wrap(angle: float) -> float:
    """Wrap an angle to [-pi, pi)."""
    return (angle + math.pi) % (2.0 * math.pi) - math.pi


def _unwrapped(env: Any) -> Any:
    return getattr(env, "unwrapped", env)


def _pose(info: Mapping[str, Any] | None) -> np.ndarray | None:
    if not info or info.get("pose") is None:
        return None
    return np.asarray(info["pose"], dtype=np.float64).reshape(-1)[:3]


class Policy:
    """Base class: ``reset(env, obs, info)`` once per episode, then ``act(obs, info) -> int``."""

    name = "policy"

    def __init__(self, rng: np.random.Generator) -> None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError("policies take a numpy Generator (np.random.default_rng(seed))")
        self.rng = rng
        self.index: dict[str, int] = {}

    def _bind(self, env: Any, required: tuple[str, ...]) -> Any:
        base = _unwrapped(env)
        names = tuple(getattr(base, "action_names", ()))
        missing = [n for n in required if n not in names]
        if missing:
            raise ValueError(f"{type(self).__name__} needs actions {missing}, simulator has {list(names)}")
        self.index = {n: i for i, n in enumerate(names)}
        return base

    @property
    def episode_policy(self) -> str:
        """Name of the policy that drives the current episode."""
        return self.name

    def settings(self) -> dict:
        return {"name": self.name}

    def reset(self, env: Any, obs: np.ndarray, info: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def act(self, obs: np.ndarray, info: Mapping[str, Any]) -> int:
        raise NotImplementedError


class RandomWalkPolicy(Policy):
    """Weighted random actions held for 1..max_repeat steps (DeepMind Lab style).

    Stuck detection: when the last action moved forward and neither the pose (or, without a
    pose, the observation) changed, it turns in a random direction for a few steps.
    Actions absent from the simulator are dropped from ``weights``.
    """

    name = "random"
    DEFAULT_WEIGHTS = {
        "forward": 0.45,
        "turn_left": 0.2,
        "turn_right": 0.2,
        "forward_left": 0.05,
        "forward_right": 0.05,
        "backward": 0.03,
        "noop": 0.02,
    }

    def __init__(self, rng: np.random.Generator, weights: Mapping[str, float] | None = None,
                 max_repeat: int = 4, stuck_turns: tuple[int, int] = (3, 8)) -> None:
        super().__init__(rng)
        self.weights = dict(self.DEFAULT_WEIGHTS if weights is None else weights)
        if max_repeat < 1:
            raise ValueError("max_repeat must be >= 1")
        lo, hi = stuck_turns
        if not 1 <= lo <= hi:  # else numpy's "low >= high" the first time the walk is stuck, mid-episode
            raise ValueError(f"stuck_turns must be (low, high) with 1 <= low <= high, got {tuple(stuck_turns)}")
        self.max_repeat = int(max_repeat)
        self.stuck_turns = (int(lo), int(hi))

    def settings(self) -> dict:
        return {"name": self.name, "weights": self.weights, "max_repeat": self.max_repeat,
                "stuck_turns": list(self.stuck_turns)}

    def reset(self, env: Any, obs: np.ndarray, info: Mapping[str, Any]) -> None:
        base = self._bind(env, ())
        choices = [(n, w) for n, w in self.weights.items() if n in self.index and w > 0]
        if not choices:
            raise ValueError(f"RandomWalkPolicy: none of {list(self.weights)} is an action of this simulator")
        self._choices = [self.index[n] for n, _ in choices]
        p = np.array([w for _, w in choices], dtype=np.float64)
        self._p = p / p.sum()
        self._forward = {self.index[n] for n in FORWARD_NAMES if n in self.index}
        self._turns = [self.index[n] for n in TURN_NAMES if n in self.index]
        move_step = getattr(base, "move_step", None)
        self._min_progress = 0.1 * float(move_step) if move_step else 1e-4
        self._action: int | None = None
        self._hold = 0
        self._prev_pose = _pose(info)
        self._prev_obs = None if self._prev_pose is not None else np.array(obs, copy=True)

    def _made_progress(self, obs: np.ndarray, info: Mapping[str, Any]) -> bool:
        pose = _pose(info)
        if pose is not None and self._prev_pose is not None:
            return float(np.hypot(*(pose[:2] - self._prev_pose[:2]))) >= self._min_progress
        if self._prev_obs is not None:
            return not np.array_equal(obs, self._prev_obs)
        return True

    def act(self, obs: np.ndarray, info: Mapping[str, Any]) -> int:
        stuck = self._action in self._forward and not self._made_progress(obs, info)
        self._prev_pose = _pose(info)
        self._prev_obs = None if self._prev_pose is not None else np.array(obs, copy=True)
        if stuck and self._turns:
            self._action = int(self._turns[self.rng.integers(len(self._turns))])
            lo, hi = self.stuck_turns
            self._hold = int(self.rng.integers(lo, hi + 1)) - 1
            return self._action
        if self._hold > 0 and self._action is not None:
            self._hold -= 1
            return self._action
        self._action = int(self._choices[self.rng.choice(len(self._choices), p=self._p)])
        self._hold = int(self.rng.integers(1, self.max_repeat + 1)) - 1
        return self._action


class NavigatorPolicy(Policy):
    """Shortest-path walks between waypoints, with returns and 360-degree look-arounds.

    Needs ``maze_walls``, ``move_step``, ``turn_step`` and ``info["pose"]`` from the simulator
    and the actions ``forward``, ``turn_left``, ``turn_right``.

    * A new waypoint is a random free cell 2..``max_leg`` BFS steps away (unvisited cells
      preferred). With probability ``p_return`` (always after two new waypoints in a row) it
      instead returns to an earlier waypoint reached at least ``min_return_age`` frames ago
      (older ones likelier), so the episode revisits places outside any short context window.
    * On arrival (within ``arrive_tol`` cells of the centre) it looks around a full turn in
      place with probability ``p_look``, and always when it returns to an earlier waypoint,
      so a return sees every view of the first visit again.
    * The sign of each turn action is checked against the pose as it goes, so it does not
      depend on the simulator's yaw convention.
    """

    name = "navigator"

    def __init__(self, rng: np.random.Generator, p_return: float = 0.5, p_look: float = 0.3,
                 max_leg: int = 6, min_return_age: int = 60, arrive_tol: float = 0.2) -> None:
        super().__init__(rng)
        self.p_return = float(p_return)
        self.p_look = float(p_look)
        self.max_leg = int(max_leg)
        self.min_return_age = int(min_return_age)
        self.arrive_tol = float(arrive_tol)

    def settings(self) -> dict:
        return {"name": self.name, "p_return": self.p_return, "p_look": self.p_look,
                "max_leg": self.max_leg, "min_return_age": self.min_return_age,
                "arrive_tol": self.arrive_tol}

    # -- episode state

    def reset(self, env: Any, obs: np.ndarray, info: Mapping[str, Any]) -> None:
        base = self._bind(env, ("forward", "turn_left", "turn_right"))
        walls = getattr(base, "maze_walls", None)
        if walls is None:
            raise ValueError("NavigatorPolicy needs the maze layout (env.unwrapped.maze_walls is None)")
        self.walls = np.asarray(walls, dtype=bool)
        self.move_step = float(base.move_step)
        self.turn_step = float(base.turn_step)
        pose = _pose(info)
        if pose is None:
            raise ValueError("NavigatorPolicy needs info['pose'] from the simulator")
        self.free = np.argwhere(~self.walls)  # (row, col)
        # final tolerance must be reachable with forward steps of move_step
        self._tol = max(self.arrive_tol, 0.55 * self.move_step)
        self._mid_tol = max(0.3, 0.6 * self.move_step)
        self._sign = {"turn_left": -1.0, "turn_right": 1.0}  # y-down frame; checked online
        self._t = 0
        self._last_name: str | None = None
        self._prev_pose = pose
        self._stuck = 0
        self._queue: deque[str] = deque()  # scripted actions (look-around, unstick)
        self.waypoints: list[tuple[tuple[int, int], int, bool]] = []  # (cell, frame, looked)
        self.visited: set[tuple[int, int]] = set()
        self._target: tuple[int, int] | None = None
        self._target_is_return: int | None = None
        self._leg_steps = 0
        self._leg_budget = 0
        self._new_legs = 0
        # first target: the centre of the start cell (it becomes waypoint 0)
        self._set_target(self._cell(pose), None, pose)

    def _cell(self, pose: np.ndarray) -> tuple[int, int]:
        rows, cols = self.walls.shape
        r = min(max(int(math.floor(pose[1])), 0), rows - 1)
        c = min(max(int(math.floor(pose[0])), 0), cols - 1)
        return r, c

    def _bfs(self, start: tuple[int, int]) -> dict[tuple[int, int], tuple[int, int] | None]:
        rows, cols = self.walls.shape
        parent: dict[tuple[int, int], tuple[int, int] | None] = {start: None}
        q = deque([start])
        while q:
            r, c = q.popleft()
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                n = (r + dr, c + dc)
                if 0 <= n[0] < rows and 0 <= n[1] < cols and not self.walls[n] and n not in parent:
                    parent[n] = (r, c)
                    q.append(n)
        return parent

    @staticmethod
    def _path(parent: dict, goal: tuple[int, int]) -> list[tuple[int, int]]:
        path = []
        node = goal
        while node is not None:
            path.append(node)
            node = parent[node]
        return path[::-1]

    def _set_target(self, goal: tuple[int, int], return_of: int | None, pose: np.ndarray) -> bool:
        start = self._cell(pose)
        parent = self._bfs(start)
        if goal not in parent:
            return False
        cells = self._path(parent, goal)
        # aim points: corners of the path and the goal (collinear cells dropped)
        aims = []
        for i in range(1, len(cells)):
            if i == len(cells) - 1:
                aims.append(cells[i])
                continue
            d0 = (cells[i][0] - cells[i - 1][0], cells[i][1] - cells[i - 1][1])
            d1 = (cells[i + 1][0] - cells[i][0], cells[i + 1][1] - cells[i][1])
            if d0 != d1:
                aims.append(cells[i])
        if not aims:
            aims = [goal]
        self._target = goal
        self._target_is_return = return_of
        self._aims = deque(aims)
        self._path_cells = set(cells)
        self._leg_steps = 0
        turns_full = 2.0 * math.pi / self.turn_step
        self._leg_budget = int(4 * (len(cells) / self.move_step + turns_full * (len(aims) + 1))) + 20
        return True

    def _choose_target(self, pose: np.ndarray) -> None:
        here = self._cell(pose)
        if len(self.waypoints) >= 2 and (self._new_legs >= 2 or self.rng.random() < self.p_return):
            old = [i for i, (cell, t, _) in enumerate(self.waypoints)
                   if cell != here and self._t - t >= self.min_return_age]
            if old:
                # older waypoints are likelier: returns reach back far in the episode
                age = np.array([self._t - self.waypoints[i][1] for i in old], dtype=np.float64)
                i = int(old[self.rng.choice(len(old), p=age / age.sum())])
                if self._set_target(self.waypoints[i][0], i, pose):
                    self._new_legs = 0
                    return
        self._new_legs += 1
        parent = self._bfs(here)
        dist: dict[tuple[int, int], int] = {}
        for cell in parent:
            d, node = 0, cell
            while parent[node] is not None:
                node = parent[node]
                d += 1
            dist[cell] = d
        near = [c for c, d in dist.items() if 2 <= d <= self.max_leg]
        if not near:
            near = [c for c in dist if c != here] or [here]
        fresh = [c for c in near if c not in self.visited]
        pool = fresh if fresh and self.rng.random() < 0.8 else near
        self._set_target(pool[int(self.rng.integers(len(pool)))], None, pose)

    # -- acting

    def _turn_toward(self, diff: float) -> str:
        want = 1.0 if diff > 0 else -1.0
        return "turn_right" if self._sign["turn_right"] == want else "turn_left"

    def _emit(self, name: str, pose: np.ndarray) -> int:
        self._last_name = name
        self._prev_pose = pose
        return self.index[name]

    def _arrive(self, pose: np.ndarray) -> None:
        cell = self._target
        assert cell is not None
        look = self.rng.random() < self.p_look
        if self._target_is_return is not None:
            look = True
        if look:
            n = int(math.ceil(2.0 * math.pi / self.turn_step - 1e-6))
            name = TURN_NAMES[int(self.rng.integers(2))]
            self._queue.extend([name] * n)
        self.waypoints.append((cell, self._t, look))
        self.visited.add(cell)
        self._target = None

    def act(self, obs: np.ndarray, info: Mapping[str, Any]) -> int:
        pose = _pose(info)
        if pose is None:
            raise ValueError("NavigatorPolicy needs info['pose'] from the simulator")
        self._t += 1
        last = self._last_name
        if last in TURN_NAMES:
            delta = _wrap(pose[2] - self._prev_pose[2])
            if abs(delta) > 0.25 * self.turn_step:
                self._sign[last] = 1.0 if delta > 0 else -1.0
                other = "turn_left" if last == "turn_right" else "turn_right"
                self._sign[other] = -self._sign[last]
        if last == "forward":
            moved = float(np.hypot(*(pose[:2] - self._prev_pose[:2])))
            self._stuck = self._stuck + 1 if moved < 0.1 * self.move_step else 0
        self.visited.add(self._cell(pose))

        if self._queue:
            return self._emit(self._queue.popleft(), pose)
        if self._stuck >= 3:  # blocked (collision radius, corner): wiggle, then replan
            self._stuck = 0
            name = TURN_NAMES[int(self.rng.integers(2))]
            k = int(self.rng.integers(2, 5))
            self._queue.extend([name] * k + ["forward"] * 2)
            self._target = None
            return self._emit(self._queue.popleft(), pose)

        for _ in range(4):
            if self._target is None:
                self._choose_target(pose)
            self._leg_steps += 1
            if self._leg_steps > self._leg_budget:
                self._target = None
                continue
            here = self._cell(pose)
            if here not in self._path_cells:  # drifted off the plan: replan to the same goal
                if not self._set_target(self._target, self._target_is_return, pose):  # type: ignore[arg-type]
                    self._target = None
                    continue
            while self._aims:
                r, c = self._aims[0]
                dx, dy = c + 0.5 - pose[0], r + 0.5 - pose[1]
                dist = math.hypot(dx, dy)
                tol = self._tol if len(self._aims) == 1 else self._mid_tol
                if dist <= tol:
                    self._aims.popleft()
                    continue
                diff = _wrap(math.atan2(dy, dx) - pose[2])
                if abs(diff) > 0.5 * self.turn_step + 1e-6:
                    return self._emit(self._turn_toward(diff), pose)
                return self._emit("forward", pose)
            self._arrive(pose)
            if self._queue:
                return self._emit(self._queue.popleft(), pose)
        # nothing sensible found this step (should be rare): turn in place
        return self._emit(TURN_NAMES[int(self.rng.integers(2))], pose)


class MixPolicy(Policy):
    """Per episode, the navigator with probability ``p_navigator`` (when the layout is known),
    otherwise the random walk."""

    name = "mix"

    def __init__(self, rng: np.random.Generator, p_navigator: float = 0.5) -> None:
        super().__init__(rng)
        self.p_navigator = float(p_navigator)
        self.random = RandomWalkPolicy(rng)
        self.navigator = NavigatorPolicy(rng)
        self.current: Policy = self.random

    @property
    def episode_policy(self) -> str:
        return self.current.name

    def settings(self) -> dict:
        return {"name": self.name, "p_navigator": self.p_navigator,
                "random": self.random.settings(), "navigator": self.navigator.settings()}

    def reset(self, env: Any, obs: np.ndarray, info: Mapping[str, Any]) -> None:
        use_nav = self.rng.random() < self.p_navigator
        if use_nav and getattr(_unwrapped(env), "maze_walls", None) is not None and _pose(info) is not None:
            self.current = self.navigator
        else:
            self.current = self.random
        self.current.reset(env, obs, info)

    def act(self, obs: np.ndarray, info: Mapping[str, Any]) -> int:
        return self.current.act(obs, info)


POLICIES = {"random": RandomWalkPolicy, "navigator": NavigatorPolicy, "mix": MixPolicy}


def make_policy(name: str, rng: np.random.Generator, **kwargs: Any) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (choose from {sorted(POLICIES)})") from None
    return cls(rng, **kwargs)
