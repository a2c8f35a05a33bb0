"""The embedded maze simulator worldsim/Maze-v0 (envs/maze.py)."""
from __future__ import annotations

import json
import math
import re
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers the ids)
from envs.maze import MazeEnv
from envs._textures import SKY_COLOUR


def _check_strict(env: gym.Env) -> None:
    """check_env with its warnings turned into failures (except the no-spec notice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*not having a spec.*")
        check_env(env)


def test_check_env_direct():
    _check_strict(MazeEnv())
    _check_strict(MazeEnv(render_mode="rgb_array", resolution=32))


def test_check_env_via_make():
    env = gym.make("worldsim/Maze-v0")
    _check_strict(env.unwrapped)
    obs, info = env.reset(seed=3)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert env.unwrapped.action_names == ("noop", "forward", "backward", "turn_left", "turn_right")


def test_seeded_determinism():
    a, b = MazeEnv(), MazeEnv()
    oa, ia = a.reset(seed=123)
    ob, ib = b.reset(seed=123)
    assert ia["maze_seed"] == ib["maze_seed"]
    np.testing.assert_array_equal(oa, ob)
    actions = np.random.default_rng(0).integers(0, 5, size=50)
    for act in actions:
        oa, *_, ia = a.step(act)
        ob, *_, ib = b.step(act)
        np.testing.assert_array_equal(oa, ob)
        np.testing.assert_array_equal(ia["pose"], ib["pose"])


def test_maze_seed_option_picks_the_maze():
    env = MazeEnv()
    _, i1 = env.reset(seed=0, options={"maze_seed": 7})
    walls1 = env.maze_walls.copy()
    _, i2 = env.reset(seed=99, options={"maze_seed": 7})
    assert i1["maze_seed"] == i2["maze_seed"] == 7
    np.testing.assert_array_equal(walls1, env.maze_walls)
    o3, i3 = env.reset(seed=0, options={"maze_seed": 8})
    assert not np.array_equal(walls1, env.maze_walls)
    # Same pose in two different mazes: the pictures differ (layout and decorations).
    env2 = MazeEnv()
    env2.reset(seed=0, options={"maze_seed": 7})
    pose = env.pose
    # Use a cell that is free in both mazes.
    free = np.argwhere(~env.maze_walls & ~env2.maze_walls)[0]
    f1 = env.set_pose(free[1] + 0.5, free[0] + 0.5, 0.3)
    f2 = env2.set_pose(free[1] + 0.5, free[0] + 0.5, 0.3)
    assert not np.array_equal(f1, f2)
    assert pose.shape == (3,)


def test_maze_seeds_outside_labmazes_range_are_refused():
    """labmaze takes a C int: 2**31 used to be a pybind TypeError traceback, -5 was taken quietly."""
    env = MazeEnv()
    for bad in (2**31, -5):
        with pytest.raises(ValueError, match=r"maze_seed must be in \[0, 2\*\*31\) for MazeEnv"):
            env.reset(options={"maze_seed": bad})
    assert env.reset(options={"maze_seed": 2**31 - 1})[1]["maze_seed"] == 2**31 - 1


def test_reset_options_other_than_an_integer_maze_seed_are_refused():
    """A typo ("maze-seed") built a random maze silently; 5.7, "5" and True were taken as 5, 5 and 1."""
    env = MazeEnv()
    with pytest.raises(ValueError, match=r"unknown reset option\(s\) 'maze-seed': MazeEnv takes 'maze_seed'"):
        env.reset(seed=0, options={"maze-seed": 5})
    for bad in (5.7, "5", True):
        with pytest.raises(ValueError, match="maze_seed must be an integer"):
            env.reset(options={"maze_seed": bad})
    assert env.reset(options={"maze_seed": np.int64(5)})[1]["maze_seed"] == 5
    env.reset(options={"maze_seed": None})  # None: drawn, as without the option


def test_make_untimed_lifts_our_step_limit_and_leaves_other_envs_alone():
    """Maze-v0's default limit (1,000) is lifted even when the settings leave it out; an env of
    another package whose `max_steps` must stay a number (MiniGrid's does) is not touched."""
    from envs import make_untimed

    assert make_untimed("worldsim/Maze-v0").unwrapped.max_steps is None
    assert make_untimed("worldsim/Maze-v0", {"max_steps": 5}).unwrapped.max_steps is None

    class Counted(gym.Env):
        observation_space = gym.spaces.Discrete(1)
        action_space = gym.spaces.Discrete(1)

        def __init__(self):
            self.max_steps, self.count = 3, 0

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.count = 0
            return 0, {}

        def step(self, action):
            self.count += 1
            return 0, 0.0, False, self.count >= self.max_steps, {}

    gym.register("worldsim-test/Counted-v0", entry_point=Counted)
    try:
        env = make_untimed("worldsim-test/Counted-v0")
        env.reset()
        assert env.unwrapped.max_steps == 3 and [env.step(0)[3] for _ in range(3)] == [False, False, True]
    finally:
        gym.registry.pop("worldsim-test/Counted-v0")


def test_unseeded_resets_draw_new_mazes():
    env = MazeEnv()
    env.reset(seed=1)
    seeds = {env.reset()[1]["maze_seed"] for _ in range(5)}
    assert len(seeds) > 1


def _body_overlaps_wall(env: MazeEnv) -> bool:
    x, y, _ = env.pose
    r = env.radius
    rows = range(math.floor(y - r + 1e-5), math.floor(y + r - 1e-5) + 1)
    cols = range(math.floor(x - r + 1e-5), math.floor(x + r - 1e-5) + 1)
    return any(env.maze_walls[i, j] for i in rows for j in cols)


@pytest.mark.parametrize("yaw", [0.0, math.pi / 2, math.pi, -math.pi / 2, 0.6, 2.5, -2.0])
def test_walls_block_movement(yaw):
    env = MazeEnv()
    env.reset(seed=5)
    x, y, _ = env.pose
    env.set_pose(x, y, yaw)
    forward = env.action_names.index("forward")
    positions = []
    for _ in range(120):  # 18 cells of walking: far more than the 11x11 maze allows
        env.step(forward)
        px, py, _ = env.pose
        assert not env.maze_walls[int(py), int(px)], "entered a wall cell"
        assert not _body_overlaps_wall(env)
        positions.append((px, py))
    # Progress stops: the last steps leave the agent where it is (stuck in a corner or
    # pressed against a wall it cannot slide along any further).
    np.testing.assert_allclose(positions[-1], positions[-10], atol=1e-6)


def test_random_walk_stays_in_free_space():
    env = MazeEnv(max_steps=None)
    env.reset(seed=11)
    for act in np.random.default_rng(1).integers(0, 5, size=400):
        env.step(act)
        assert not _body_overlaps_wall(env)


def test_forward_step_size_in_open_space():
    env = MazeEnv()
    env.reset(seed=2)
    # Find a free cell with a free cell to its east and face east.
    free = ~env.maze_walls
    r, c = np.argwhere(free[:, :-1] & free[:, 1:])[0]
    env.set_pose(c + 0.5, r + 0.5, 0.0)
    _, _, _, _, info = env.step(env.action_names.index("forward"))
    np.testing.assert_allclose(info["pose"][:2], [c + 0.5 + env.move_step, r + 0.5], atol=1e-6)
    _, _, _, _, info = env.step(env.action_names.index("backward"))
    np.testing.assert_allclose(info["pose"][:2], [c + 0.5, r + 0.5], atol=1e-6)


def test_turn_360_returns_to_same_view():
    env = MazeEnv()
    first, info = env.reset(seed=4)
    n = round(2 * math.pi / env.turn_step)
    assert abs(n * env.turn_step - 2 * math.pi) < 1e-9  # 10 degree turns: 36 per circle
    for name in ("turn_left", "turn_right"):
        frame = None
        for _ in range(n):
            frame, *_ , info = env.step(env.action_names.index(name))
        differing = np.mean(np.any(frame != first, axis=-1))
        assert differing < 0.01, f"{name}: {differing:.3%} pixels differ after a full turn"
    # Right turn increases yaw (the viewer's right is (-sin yaw, cos yaw) on a rows-down map).
    yaw0 = env.pose[2]
    env.step(env.action_names.index("turn_right"))
    assert math.isclose(math.remainder(env.pose[2] - yaw0, 2 * math.pi), env.turn_step, abs_tol=1e-5)


def test_view_is_not_mirrored():
    """A wall along the viewer's right hand hides more sky on the right half of the screen."""
    env = MazeEnv()
    checked = 0
    for seed in range(3):
        env.reset(seed=seed)
        w = env.maze_walls
        for r, c in np.argwhere(~w):
            # Facing east (yaw 0) the right hand is south (row r+1), the left hand north.
            if w[r + 1, c] and w[r + 1, c + 1] and not (w[r - 1, c] or w[r - 1, c + 1] or w[r, c + 1]):
                frame = env.set_pose(c + 0.5, r + 0.5, 0.0)
                sky = np.all(frame == SKY_COLOUR, axis=-1)
                half = sky.shape[1] // 2
                assert sky[:, half:].sum() < 0.7 * sky[:, :half].sum()
                checked += 1
    assert checked > 0


def test_resolution_parameter():
    env = MazeEnv(resolution=(32, 48))
    obs, _ = env.reset(seed=0)
    assert obs.shape == (32, 48, 3) == env.observation_space.shape
    env2 = gym.make("worldsim/Maze-v0", resolution=[32, 48], maze_size=15)
    obs2, _ = env2.reset(seed=0)
    assert obs2.shape == (32, 48, 3)
    assert env2.unwrapped.maze_walls.shape == (15, 15)


def test_pose_in_info_matches_env():
    env = gym.make("worldsim/Maze-v0")
    _, info = env.reset(seed=8)
    for act in [1, 1, 3, 1, 4, 4, 2, 0]:
        pose = info["pose"]
        assert pose.dtype == np.float32 and pose.shape == (3,)
        np.testing.assert_array_equal(pose, env.unwrapped.pose)
        assert isinstance(info["maze_seed"], int)
        _, _, _, _, info = env.step(act)
    x, y, yaw = info["pose"]
    r, c = int(y), int(x)
    assert not env.unwrapped.maze_walls[r, c]
    assert -math.pi <= yaw <= math.pi


def test_start_pose_is_a_free_cell_centre():
    env = MazeEnv()
    for seed in range(5):
        _, info = env.reset(seed=seed)
        x, y, _ = info["pose"]
        assert (x % 1.0, y % 1.0) == (0.5, 0.5)
        assert not env.maze_walls[int(y), int(x)]


def test_simulator_settings_rebuild_same_simulator():
    env = MazeEnv(resolution=(48, 40), fov_deg=80.0, max_steps=30)
    settings = env.simulator_settings()
    settings = json.loads(json.dumps(settings))
    env2 = gym.make("worldsim/Maze-v0", **settings)
    o1, _ = env.reset(seed=6)
    o2, _ = env2.reset(seed=6)
    np.testing.assert_array_equal(o1, o2)
    assert env2.unwrapped.simulator_settings() == settings


def test_truncation_no_termination():
    env = MazeEnv(max_steps=20)
    env.reset(seed=0)
    for t in range(20):
        _, reward, terminated, truncated, _ = env.step(1)
        assert reward == 0.0 and not terminated
        assert truncated == (t == 19)
    with pytest.raises(RuntimeError, match="after an episode is truncated"):  # as DMLab and Memory Maze
        env.step(1)
    env.reset(seed=1)
    env.step(1)


@pytest.mark.parametrize("action", [1.5, "forward", None, 5, -1])
def test_invalid_actions_are_refused_as_given(action):
    env = MazeEnv(resolution=8)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=f"invalid action {action!r}: expected an int in \\[0, 5\\)"):
        env.step(action)
    env.step(np.int64(1))  # numpy integers are actions too


def test_render_rgb_array():
    env = MazeEnv(render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(env.render(), obs)


def test_no_pygame_under_envs():
    import pathlib
    import re

    root = pathlib.Path(envs.__file__).parent
    pattern = re.compile(r"^\s*(import|from)\s+pygame", re.MULTILINE)
    for path in root.rglob("*.py"):
        assert not pattern.search(path.read_text()), f"{path} imports pygame"


def test_bad_settings_and_step_before_reset_are_clear_errors():
    # Bug: resolution=0 (an int) slipped through to an empty observation space, and
    # stepping before reset failed deep in the collision code with a TypeError.
    with pytest.raises(ValueError, match="resolution must be positive"):
        MazeEnv(resolution=0)
    # what --env-arg maze_size=9,9 gives (a string): int() failed on the character ','
    for bad in ("9,9", 9.5, True, [9]):
        with pytest.raises(ValueError, match=f"maze_size must be an integer or a pair of integers .*got {re.escape(repr(bad))}"):
            MazeEnv(maze_size=bad)
    assert MazeEnv(maze_size=[9, 11]).rows == 9 and MazeEnv(maze_size=np.int64(9)).cols == 9
    with pytest.raises(ValueError, match="supersample"):
        MazeEnv(supersample=0)
    # a zero, negative or NaN step recorded a standing or backward-walking "forward" (or crashed mid-episode)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="move_step must be a positive number of cells"):
            MazeEnv(move_step=bad)
    for bad in (0.0, -10.0, float("nan"), 270.0):
        with pytest.raises(ValueError, match=r"turn_step_deg must be in \(0, 180\]"):
            MazeEnv(turn_step_deg=bad)
    # max_steps 0 cut every recording to 2 frames in silence; "abc" failed at the first step
    for bad in (0, -5, "abc", 2.5, True):
        with pytest.raises(ValueError, match="max_steps must be an integer >= 1 or None"):
            MazeEnv(max_steps=bad)
    assert MazeEnv(max_steps=1e3).max_steps == 1000  # as `--env-arg max_steps=1e3` gives it, like the other envs
    # labmaze rooms as wide as the maze break its outer wall (35 of 60 seeds at 5x5): refused when made,
    # not an AssertionError at some reset; one size smaller keeps the wall on every seed
    with pytest.raises(ValueError, match="room_max_size must be smaller than the maze's shorter side, got 5"):
        MazeEnv(maze_size=5)
    small = MazeEnv(maze_size=(5, 11), room_max_size=4, resolution=16)
    for seed in range(30):
        small.reset(seed=seed)
    env = MazeEnv(resolution=8)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(1)
    with pytest.raises(RuntimeError, match="reset"):
        env.set_pose(1.5, 1.5, 0.0)


def test_a_users_own_envs_package_is_named_when_it_shadows_ours(tmp_path):
    """An RL project's own envs/ (a common name) earlier on sys.path shadowed worldsim's simulators:
    `import worldsim` registered nothing and gym.make said "Namespace worldsim not found"."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "__init__.py").write_text("")
    done = subprocess.run([sys.executable, "-c", "import gymnasium as gym, worldsim; gym.make('worldsim/Maze-v0')"],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1
    assert (f"worldsim: the module 'envs' was imported from {tmp_path / 'envs' / '__init__.py'}, not from "
            f"worldsim's simulators package ({repo / 'envs'})") in done.stderr
    assert "rename it, or run from another folder" in done.stderr


def test_a_sourceless_install_is_not_mistaken_for_a_shadowing_envs(tmp_path):
    """The check above compared envs' __init__.py by name; a sourceless install (PyInstaller,
    `compileall -b` with the .py files removed) has __init__.pyc and was refused."""
    import compileall
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    site = tmp_path / "site"
    for package in ("worldsim", "envs"):
        shutil.copytree(repo / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    assert compileall.compile_dir(str(site), quiet=1, legacy=True)
    for source in site.rglob("*.py"):
        source.unlink()
    done = subprocess.run([sys.executable, "-c", "import gymnasium as gym, worldsim; gym.make('worldsim/Maze-v0')"],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-1500:]


# ----------------------------------------------------------------------------- mutation-audit additions


def test_turn_left_decreases_yaw_by_one_turn_step_and_undoes_turn_right():
    """turn_left is yaw - turn_step (the map is seen rows-down), the opposite of turn_right: a
    recording's actions mean what their names say."""
    env = MazeEnv(resolution=8)
    env.reset(seed=4)
    before, yaw0 = env.pose.copy(), float(env.pose[2])
    _, _, _, _, info = env.step(env.action_names.index("turn_left"))
    assert math.isclose(math.remainder(float(info["pose"][2]) - yaw0, 2 * math.pi), -math.radians(10), abs_tol=1e-5)
    np.testing.assert_array_equal(info["pose"][:2], before[:2])  # in place
    _, _, _, _, info = env.step(env.action_names.index("turn_right"))
    assert math.isclose(math.remainder(float(info["pose"][2]) - yaw0, 2 * math.pi), 0.0, abs_tol=1e-5)


def test_observations_returned_are_the_callers_own():
    """The arrays step() and render() return belong to the caller: a frontend drawing its HUD into one
    (or a buffer reusing it) must not change what render() shows, and later steps must not change it."""
    env = MazeEnv(resolution=16, render_mode="rgb_array")
    env.reset(seed=0)
    turn = env.action_names.index("turn_left")
    obs, *_ = env.step(turn)
    kept = obs.copy()
    obs[:] = 0  # the caller draws over the observation
    np.testing.assert_array_equal(env.render(), kept)
    env.render()[:] = 0  # and over a rendered frame
    np.testing.assert_array_equal(env.render(), kept)
    mine = env.render()
    later, *_ = env.step(turn)
    assert not np.array_equal(later, kept)  # the view did change
    np.testing.assert_array_equal(mine, kept)


def test_every_setting_survives_simulator_settings():
    """A dataset or checkpoint stores simulator_settings(); the simulator rebuilt from them (dream vs
    reality, a replay) must draw the same frames: every setting differs from its default here."""
    env = MazeEnv(resolution=(24, 20), maze_size=(13, 15), max_rooms=2, room_min_size=2, room_max_size=4,
                  fov_deg=70.0, move_step=0.3, turn_step_deg=15.0, max_steps=50, supersample=2)
    settings = json.loads(json.dumps(env.simulator_settings()))
    again = gym.make("worldsim/Maze-v0", **settings).unwrapped
    for e in (env, again):
        e.reset(seed=6)
    for action in (1, 1, 3, 1, 4, 2, 0):
        o1, *_, i1 = env.step(action)
        o2, *_, i2 = again.step(action)
        np.testing.assert_array_equal(o1, o2)
        np.testing.assert_array_equal(i1["pose"], i2["pose"])
    np.testing.assert_array_equal(env.maze_walls, again.maze_walls)


def test_a_maze_below_5_cells_and_a_narrow_field_of_view_are_refused():
    with pytest.raises(ValueError, match="maze_size must be odd and >= 5"):
        MazeEnv(maze_size=3, room_max_size=2)
    for bad in (5.0, 170.0):
        with pytest.raises(ValueError, match=r"fov_deg must be in \[10, 170\)"):
            MazeEnv(fov_deg=bad)
    MazeEnv(fov_deg=10.0)  # the bound itself is allowed


def test_long_steps_do_not_pass_through_walls():
    """move_step takes any positive number of cells: a step longer than a wall is thick moves in sub-steps,
    else it would jump over a one-cell wall into the corridor behind it (landing clear of any wall)."""
    env = MazeEnv(resolution=8, move_step=1.5, max_steps=None)
    forward = env.action_names.index("forward")
    for seed in range(3):
        env.reset(seed=seed)
        for yaw in (0.0, math.pi / 2, math.pi, -math.pi / 2):
            x, y, _ = env.pose
            env.set_pose(x, y, yaw)
            for _ in range(12):
                start = env.pose[:2].astype(np.float64)
                env.step(forward)
                end = env.pose[:2].astype(np.float64)
                # the straight path of the step, point by point, stays out of wall cells
                for f in np.linspace(0.0, 1.0, 61):
                    px, py = start + f * (end - start)
                    assert not env.maze_walls[int(py), int(px)], f"stepped through a wall from {start} to {end}"
