"""worldsim/DMLab-v0 against a STAND-IN `deepmind_lab` module (tests/dmlab_standin.py).

The real DeepMind Lab module is not on PyPI (docs/dmlab.md); these tests check our adapter
against a stand-in that reproduces the documented API and validates what it receives. They
do not show that real DeepMind Lab renders or moves as the stand-in does.
"""
from __future__ import annotations

import json
import math
import sys

import gymnasium as gym
import numpy as np
import pytest

import dmlab_standin
import envs  # noqa: F401  (registers worldsim/*)
from envs.dmlab import ACTION_NAMES, DEFAULT_LEVEL, DMLabUnavailableError, parse_layout


@pytest.fixture
def standin(monkeypatch):
    """Install the stand-in as `deepmind_lab` for one test."""
    monkeypatch.setitem(sys.modules, "deepmind_lab", dmlab_standin)
    dmlab_standin.INSTANCES.clear()
    yield dmlab_standin
    dmlab_standin.INSTANCES.clear()


def test_without_the_module_the_error_points_to_the_docs(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepmind_lab", None)  # import fails
    with pytest.raises(DMLabUnavailableError, match=r"docs/dmlab\.md") as err:
        gym.make("worldsim/DMLab-v0")
    assert "not on PyPI" in str(err.value) and isinstance(err.value, ImportError)


def test_an_installed_module_that_fails_to_import_is_not_called_missing(monkeypatch, tmp_path):
    """Upstream's pip package (python/pip_package/__init__.py) imports imp, dm_env and pkg_resources,
    which setuptools 82 removed: a wheel built as docs/dmlab.md says then fails on import, and the
    error said the module 'is not installed here'. A fake package with upstream's imports, not DeepMind Lab."""
    pkg = tmp_path / "deepmind_lab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import imp\nfrom deepmind_lab import dmenv_module\nimport pkg_resources\n")
    (pkg / "dmenv_module.py").write_text("import numpy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "deepmind_lab", raising=False)
    monkeypatch.delitem(sys.modules, "deepmind_lab.dmenv_module", raising=False)
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # as with setuptools >= 82
    with pytest.raises(DMLabUnavailableError) as err:
        gym.make("worldsim/DMLab-v0")
    msg = str(err.value)
    assert "is installed but does not import" in msg and "pkg_resources" in msg and "setuptools<82" in msg
    assert "docs/dmlab.md" in msg and "not installed here" not in msg


def test_standin_rejects_what_the_real_module_rejects(standin):
    """The stand-in itself validates like deepmind_lab (so the adapter tests mean something)."""
    with pytest.raises(TypeError):
        standin.Lab(DEFAULT_LEVEL, ["RGB_INTERLEAVED"], config={"width": 64})      # value not str
    with pytest.raises(TypeError):
        standin.Lab(DEFAULT_LEVEL, ("RGB_INTERLEAVED",))                            # not a list
    with pytest.raises(ValueError, match="Unknown observation"):
        standin.Lab(DEFAULT_LEVEL, ["RGB_INTERLACED_TYPO"])
    with pytest.raises(RuntimeError, match="renderer"):
        standin.Lab(DEFAULT_LEVEL, [], renderer="gpu")
    lab = standin.Lab(DEFAULT_LEVEL, ["RGB_INTERLEAVED"], config={"width": "8", "height": "8"})
    with pytest.raises(RuntimeError, match="wrong status"):
        lab.step(np.zeros(7, np.intc))
    with pytest.raises(ValueError, match="seed"):
        lab.reset(seed="3")
    lab.reset(seed=3)
    with pytest.raises(ValueError, match="dtype np.intc"):
        lab.step(np.zeros(7, np.int64))
    with pytest.raises(ValueError, match=r"shape \(7\)"):
        lab.step(np.zeros(6, np.intc))
    with pytest.raises(TypeError):
        lab.step([0] * 7)
    assert lab.observations()["RGB_INTERLEAVED"].shape == (8, 8, 3)


def test_standin_parses_int_arguments_as_the_c_module_does(standin):
    """dmlab_module.c parses step's `num_steps` and reset's `episode` with format "i", which takes
    NumPy integers (a frame count computed with NumPy works there); reset's `seed` must pass
    PyLong_Check, which a NumPy integer does not (ValueError naming its type)."""
    lab = standin.Lab(DEFAULT_LEVEL, ["RGB_INTERLEAVED"], config={"width": "8", "height": "8"})
    assert lab.reset(episode=np.int32(3), seed=7) is True
    noop = np.zeros(7, np.intc)
    assert lab.step(noop, num_steps=np.int64(4)) == 0.0
    lab.step(noop, np.uint8(2))
    assert [n for _, n in lab.steps] == [4, 2] and lab.num_steps() == 6
    for bad in (4.0, np.float64(4), "4"):
        with pytest.raises(TypeError, match="cannot be interpreted as an integer"):
            lab.step(noop, num_steps=bad)
        with pytest.raises(TypeError, match="cannot be interpreted as an integer"):
            lab.reset(episode=bad)
    with pytest.raises(OverflowError, match="signed integer is greater than maximum"):
        lab.step(noop, num_steps=np.int64(2**31))
    with pytest.raises(ValueError, match=r"'seed' must be int or None, was 'numpy\.int64'\."):
        lab.reset(seed=np.int64(7))
    with pytest.raises(ValueError, match=r"'seed' must be int or None, was 'float'\."):
        lab.reset(seed=7.0)
    assert lab.reset(seed=True) is True  # a bool is an int to PyLong_Check
    assert lab.num_steps() == 0


def test_standin_num_steps_counts_every_frame_asked_for(standin, monkeypatch):
    """The real module adds each step's whole `num_steps` to `num_steps()`, also where the level's
    time ran out partway through them; a reset starts it at 0 again."""
    monkeypatch.setitem(standin.LEVELS, DEFAULT_LEVEL, (11, 1))  # stand-in level: 1 s = 60 frames
    lab = standin.Lab(DEFAULT_LEVEL, ["RGB_INTERLEAVED"], config={"width": "8", "height": "8"})
    lab.reset(seed=1)
    noop = np.zeros(7, np.intc)
    for _ in range(8):
        lab.step(noop, num_steps=7)
    assert lab.num_steps() == 56 and lab.is_running()
    lab.step(noop, num_steps=7)  # the level ends at frame 60, 4 frames into these 7
    assert not lab.is_running() and lab.num_steps() == 63
    lab.reset(seed=1)
    assert lab.num_steps() == 0 and lab.is_running()


def test_standin_lab_receives_level_config_and_observations(standin):
    env = gym.make("worldsim/DMLab-v0", level_config={"logLevel": 1})
    (lab,) = standin.INSTANCES
    assert lab.level == "contributed/dmlab30/explore_goal_locations_small"
    assert lab.config == {"width": "64", "height": "64", "fps": "60", "logLevel": "1"}
    assert all(isinstance(v, str) for v in lab.config.values())
    assert lab.renderer == "software"
    assert lab.observation_names == ["RGB_INTERLEAVED", "DEBUG.POS.TRANS", "DEBUG.POS.ROT", "DEBUG.MAZE.LAYOUT"]
    base = env.unwrapped
    assert base.action_names == ACTION_NAMES == ("noop", "forward", "backward", "turn_left", "turn_right")
    settings = base.simulator_settings()
    assert json.loads(json.dumps(settings)) == settings
    assert gym.make("worldsim/DMLab-v0", **settings).unwrapped.simulator_settings() == settings
    env.close()


def test_standin_exact_action_vectors_and_repeat(standin):
    env = gym.make("worldsim/DMLab-v0")
    lab = standin.INSTANCES[0]
    env.reset(seed=0, options={"maze_seed": 42})
    assert lab.resets == [(-1, 42)]
    for a in range(len(ACTION_NAMES)):
        env.step(a)
    sent = [(v.tolist(), v.dtype, n) for v, n in lab.steps]
    assert sent == [
        ([0, 0, 0, 0, 0, 0, 0], np.dtype(np.intc), 4),      # noop
        ([0, 0, 0, 1, 0, 0, 0], np.dtype(np.intc), 4),      # forward
        ([0, 0, 0, -1, 0, 0, 0], np.dtype(np.intc), 4),     # backward
        ([-20, 0, 0, 0, 0, 0, 0], np.dtype(np.intc), 4),    # turn_left
        ([20, 0, 0, 0, 0, 0, 0], np.dtype(np.intc), 4),     # turn_right
    ]
    env.close()


def test_standin_pose_and_layout_conversion(standin):
    env = gym.make("worldsim/DMLab-v0").unwrapped
    lab = standin.INSTANCES[0]
    obs, info = env.reset(options={"maze_seed": 5})
    walls = env.maze_walls
    assert walls.shape == (11, 11) and walls[0].all() and walls[:, -1].all()
    assert np.array_equal(walls, np.array(lab._grid) == "*")
    x, y, yaw = (float(v) for v in info["pose"])
    X, Y, _ = lab.observations()["DEBUG.POS.TRANS"]
    assert x == pytest.approx(X / 100) and y == pytest.approx(11 - Y / 100)
    assert not walls[int(y), int(x)] and x % 1 == pytest.approx(0.5) and y % 1 == pytest.approx(0.5)
    assert yaw == pytest.approx(math.remainder(-math.radians(lab.observations()["DEBUG.POS.ROT"][1]), 2 * math.pi), abs=1e-5)
    # turn_right increases our yaw by turn_step (8.45 degrees), turn_left decreases it
    _, _, _, _, info = env.step(ACTION_NAMES.index("turn_right"))
    assert math.remainder(float(info["pose"][2]) - yaw, 2 * math.pi) == pytest.approx(env.turn_step, abs=1e-5)
    assert math.degrees(env.turn_step) == pytest.approx(8.448, abs=1e-3)
    _, _, _, _, info = env.step(ACTION_NAMES.index("turn_left"))
    assert float(info["pose"][2]) == pytest.approx(yaw, abs=1e-5)
    # forward moves along (cos yaw, sin yaw) in our frame until a wall stops it
    p0 = info["pose"].astype(np.float64)
    _, _, _, _, info = env.step(ACTION_NAMES.index("forward"))
    moved = info["pose"][:2] - p0[:2]
    assert np.linalg.norm(moved) > 1e-6  # this start (maze seed 5) has room ahead
    assert np.dot(moved / np.linalg.norm(moved), [math.cos(p0[2]), math.sin(p0[2])]) > 0.7
    assert env.move_step == pytest.approx(320 * 4 / 60 / 100)
    env.close()


def test_standin_turn_size_follows_game_time_not_frames(standin):
    """DeepMind Lab's look speed is a rate per second (upstream math_utils.calculate_angle: speed x
    0.96 x frames / fps x 6.6 degrees), so at 30 fps a 4-frame turn action turns twice as far."""
    env = gym.make("worldsim/DMLab-v0", fps=30).unwrapped
    _, info = env.reset(options={"maze_seed": 5})
    yaw = float(info["pose"][2])
    _, _, _, _, info = env.step(ACTION_NAMES.index("turn_right"))
    assert math.degrees(env.turn_step) == pytest.approx(20 * 0.96 * 4 / 30 * 0.11 * 60, abs=1e-3)  # 16.9
    assert math.remainder(float(info["pose"][2]) - yaw, 2 * math.pi) == pytest.approx(env.turn_step, abs=1e-5)
    assert env.move_step == pytest.approx(320 * 4 / 30 / 100)
    env.close()


def test_standin_the_levels_time_limit_ends_reality_not_the_dream(standin, tmp_path, capsys):
    """A real level ends on its own (90 s: 90 steps at fps 4 and 4 frames a step). The dream over it,
    which play always opens with the reality view, and a walk of the level itself go on."""
    from _tiny_world import make_checkpoint
    from worldsim.cli import main
    from worldsim.dream_env import DreamEnv

    ck = make_checkpoint(tmp_path / "ck", simulator={"id": "worldsim/DMLab-v0", "settings": {"fps": 4}})
    env = DreamEnv(ck, context_frames=2, reality=True, device="cpu")
    env.reset(seed=0)
    infos = [env.step(1)[4] for _ in range(100)]
    assert "reality_frame" in infos[0] and "reality_frame" not in infos[-1]
    assert infos[-1]["frame_index"] == infos[0]["frame_index"] + 99
    env.close()
    assert main(["play", "--world", "sim", "--checkpoint", str(ck), "--headless", "--actions", "random:100"]) == 0
    assert "the level's episode ended before action" in capsys.readouterr().err


def test_standin_level_without_a_maze(standin):
    """A level that builds no maze still has the layout observation, empty (upstream debug_observations)."""
    env = gym.make("worldsim/DMLab-v0", level="tests/empty_room_test").unwrapped
    assert "DEBUG.MAZE.LAYOUT" in standin.INSTANCES[-1].observation_names
    obs, info = env.reset(options={"maze_seed": 1})
    assert standin.INSTANCES[-1].observations()["DEBUG.MAZE.LAYOUT"] == ""
    assert env.maze_walls is None and info["pose"].shape == (3,)
    env.close()


def test_standin_level_without_debug_observations_is_named(standin, monkeypatch):
    """A level not decorated by custom_observations has no DEBUG.* observations: refused, named."""
    plain = [{"dtype": np.uint8, "name": "RGB_INTERLEAVED", "shape": (64, 64, 3)}]
    monkeypatch.setattr(standin.Lab, "_observation_spec", lambda self: plain)
    with pytest.raises(ValueError, match="level 'tests/empty_room_test' lacks an observation .*custom_observations"):
        gym.make("worldsim/DMLab-v0", level="tests/empty_room_test")


def test_standin_unknown_level_and_navigator_without_layout_are_clear_record_errors(standin, tmp_path, capsys):
    """DeepMind Lab refuses an unknown level with a RuntimeError: record names it in one line; the
    navigator on a level without a maze layout is refused before any folder is written."""
    from worldsim.cli import main

    _close_recorder_cache()
    rc = main(["record", "--env", "worldsim/DMLab-v0", "--env-arg", "level=nope/level", "--episodes", "1",
                      "--length", "5", "--out", str(tmp_path / "a"), "--progress", "false"])
    err = capsys.readouterr().err
    assert rc == 2 and "Could not find level nope/level" in err and "Traceback" not in err
    rc = main(["record", "--env", "worldsim/DMLab-v0", "--env-arg", "level=tests/empty_room_test", "--policy", "navigator",
                      "--episodes", "1", "--length", "5", "--out", str(tmp_path / "b"), "--progress", "false"])
    err = capsys.readouterr().err
    assert rc == 2 and "navigator policy cannot run here" in err and "maze layout" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    _close_recorder_cache()


def test_standin_boolean_level_config_is_sent_as_lua_reads_it(standin):
    gym.make("worldsim/DMLab-v0", level_config={"allowHoldOutLevels": True, "episodeLengthSeconds": 60})
    assert standin.INSTANCES[-1].config["allowHoldOutLevels"] == "true"
    assert standin.INSTANCES[-1].config["episodeLengthSeconds"] == "60"


def test_standin_time_limit_truncates(standin, monkeypatch):
    monkeypatch.setitem(standin.LEVELS, DEFAULT_LEVEL, (11, 1))  # stand-in level: 1 s = 60 frames
    env = gym.make("worldsim/DMLab-v0").unwrapped
    env.reset(options={"maze_seed": 2})
    steps = [env.step(0) for _ in range(15)]
    assert [s[3] for s in steps] == [False] * 14 + [True]      # 15 steps x 4 frames = 60
    # the last step's frame is the one before it: the level showed nothing of that step
    assert [bool(s[4].get("stale_frame")) for s in steps] == [False] * 14 + [True]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)
    env.reset(options={"maze_seed": 2})                          # a new episode runs again
    assert env.step(0)[3] is False
    env.close()
    env = gym.make("worldsim/DMLab-v0", max_steps=3).unwrapped  # our own limit: the frame is the step's
    env.reset(options={"maze_seed": 2})
    last = [env.step(1) for _ in range(3)][-1]
    assert last[3] is True and "stale_frame" not in last[4]
    env.close()


def test_standin_a_recording_leaves_out_the_step_the_level_ended_in(standin, monkeypatch, tmp_path):
    """The step in which the level's time ran out was saved with the frame before it, so its action
    was paired with a frame it did not produce (actions[t] must be what produced video[t])."""
    from envs.recorder import RecordConfig, record

    monkeypatch.setitem(standin.LEVELS, DEFAULT_LEVEL, (11, 1))  # 15 steps of 4 frames, the last one stale
    _close_recorder_cache()
    out = tmp_path / "ended"
    try:
        record(RecordConfig(out=str(out), env="worldsim/DMLab-v0", env_arg=("resolution=16",), episodes=1,
                            length=40, policy="random", workers=1, progress=False))
    finally:
        _close_recorder_cache()
    (ep,) = json.loads((out / "index.json").read_text())["episodes"]
    with np.load(out / ep["file"]) as data:
        video, actions, poses = data["video"], data["actions"], data["poses"]
    assert ep["length"] == len(video) == len(actions) == len(poses) == 15  # the reset's frame and 14 steps


def test_standin_goal_respawn_is_flagged(standin):
    """Against the stand-in: in DMLab-30's goal levels touching the goal gives reward 10 and restarts
    the level inside the episode (upstream goal_locations_factory.lua: the player respawns on a random
    'P' cell). The step in which that happens says so (`info["respawned"]`); the ones around it do not."""
    env = gym.make("worldsim/DMLab-v0").unwrapped
    lab = standin.INSTANCES[-1]
    _, info = env.reset(options={"maze_seed": 100})
    walls = env.maze_walls.copy()
    _, reward, _, truncated, info = env.step(ACTION_NAMES.index("forward"))
    assert reward == 0.0 and "respawned" not in info and not truncated
    before = info["pose"].astype(np.float64)
    yaw = math.radians(lab._yaw)
    lab._goal = lab._pos[:2] + 20.0 * np.array([math.cos(yaw), math.sin(yaw)])  # just ahead of the player
    _, reward, _, truncated, info = env.step(ACTION_NAMES.index("forward"))
    assert reward == 10.0 and lab.respawns == [2] and lab.is_running() and not truncated
    assert info.get("respawned") is True
    assert np.hypot(*(info["pose"][:2] - before[:2])) > env.respawn_distance
    assert np.array_equal(parse_layout(lab.observations()["DEBUG.MAZE.LAYOUT"]), walls)  # same maze
    _, _, _, _, info = env.step(ACTION_NAMES.index("turn_left"))
    assert "respawned" not in info
    env.close()


def test_standin_a_recording_ends_before_a_goal_respawn(standin, tmp_path):
    """Against the stand-in: a respawn was recorded as the frame of the action before it (a forward
    step 'moved' the player 6 cells), breaking actions[t] -> video[t]; the episode now ends before it."""
    from envs.recorder import RecordConfig, record

    _close_recorder_cache()
    out = tmp_path / "goal"
    try:  # maze seed 100, seed 0: the navigator reaches the stand-in's goal at step 140 of 299
        record(RecordConfig(out=str(out), env="worldsim/DMLab-v0", env_arg=("resolution=16",), episodes=1,
                            length=300, policy="navigator", workers=1, progress=False, start_maze_seed=100))
        (lab,) = [lab for lab in standin.INSTANCES[1:] if lab.resets]
        step_of_respawn = lab.respawns[0]
    finally:
        _close_recorder_cache()
    (ep,) = json.loads((out / "index.json").read_text())["episodes"]
    with np.load(out / ep["file"]) as data:
        poses = data["poses"]
    assert ep["length"] == len(poses) == step_of_respawn  # the reset frame and the steps before the respawn
    step = 320 * 4 / 60 / 100  # cells a step can run
    assert np.hypot(*np.diff(poses[:, :2], axis=0).T).max() <= 2 * step


def test_standin_look_pixels_must_turn(standin):
    """0 turned nowhere (the navigator then divided by zero) and a negative value swapped left and right."""
    for bad in (0, -20):
        with pytest.raises(ValueError, match=f"look_pixels must be >= 1, got {bad}"):
            gym.make("worldsim/DMLab-v0", look_pixels=bad)
    # --env-arg resolution=64,64 is a string: int() failed on the character ','
    with pytest.raises(ValueError, match="resolution must be an integer or a pair of integers .*got '64,64'"):
        gym.make("worldsim/DMLab-v0", resolution="64,64")
    # settings come from files made by others too: a checkpoint's resolution [20000, 20000] would have
    # DeepMind Lab render (and the recorder store) 1.2 GB frames
    with pytest.raises(ValueError, match=r"resolution must be at most 2048 pixels a side, got \[64, 20000\]"):
        gym.make("worldsim/DMLab-v0", resolution=[64, 20000])


def test_standin_a_closed_env_says_so(standin):
    """After close() a step said "'NoneType' object has no attribute 'step'", and so did a reset."""
    env = gym.make("worldsim/DMLab-v0", fps=30, action_repeat=2).unwrapped
    assert env.metadata["render_fps"] == 15  # a frame per step: 30 fps / 2 (RecordVideo plays at this rate)
    env.reset(options={"maze_seed": 2})
    env.close()
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(0)
    with pytest.raises(RuntimeError, match="closed; make a new env"):
        env.reset()
    env.close()  # twice is fine


def test_standin_check_env_and_determinism(standin):
    from gymnasium.utils.env_checker import check_env

    env = gym.make("worldsim/DMLab-v0", resolution=16).unwrapped
    check_env(env, skip_render_check=True)
    a, _ = env.reset(options={"maze_seed": 9})
    b, _ = env.reset(options={"maze_seed": 9})
    assert np.array_equal(a, b)
    env.close()


def _close_recorder_cache():
    """The recorder caches its simulator between episodes in-process (workers=1); start and
    end each recording test with a fresh one, so every Lab it uses is logged by this test."""
    from envs import recorder

    cache = getattr(recorder, "_WORKER", {})
    env = cache.pop("env", None)
    if env is not None:
        env.close()
    cache.clear()


@pytest.mark.parametrize("policy", ["random", "navigator"])
def test_standin_records_through_the_recorder(standin, tmp_path, policy):
    from envs.recorder import RecordConfig, record

    _close_recorder_cache()
    out = tmp_path / policy
    cfg = RecordConfig(out=str(out), env="worldsim/DMLab-v0", env_arg=("resolution=32",),
                       episodes=2, length=40, policy=policy, workers=1, progress=False,
                       start_maze_seed=100)
    try:
        summary = record(cfg)
    finally:
        _close_recorder_cache()
    assert summary["recorded"] == 2
    index = json.loads((out / "index.json").read_text())
    assert index["simulator"]["id"] == "worldsim/DMLab-v0"
    assert index["simulator"]["settings"]["level"] == DEFAULT_LEVEL
    assert index["action_names"] == list(ACTION_NAMES) and index["resolution"] == [32, 32]
    # the first Lab is the recorder's probe (for the navigator it resets once to see the layout)
    labs = [lab for lab in standin.INSTANCES[1:] if lab.resets]
    seeds_sent = sorted(seed for lab in labs for _, seed in lab.resets)
    assert seeds_sent == [100, 101]                              # maze seed -> lab.reset(seed=)
    for lab in labs:
        assert lab.config == {"width": "32", "height": "32", "fps": "60"}
        for vec, n in lab.steps:
            assert vec.dtype == np.intc and n == 4
    for ep in index["episodes"]:
        with np.load(out / ep["file"]) as data:
            video, actions, poses = data["video"], data["actions"], data["poses"]
        assert video.shape == (40, 32, 32, 3) and video.dtype == np.uint8
        assert actions[0] == 0 and actions.dtype == np.int64
        assert poses.shape == (40, 3) and poses.dtype == np.float32
        # frames and poses are what the stand-in produced: movement shows in both
        assert len(np.unique(poses, axis=0)) > 3
        assert len({frame.tobytes() for frame in video}) > 3
        assert np.abs(np.diff(poses[:, :2], axis=0)).max() < 0.5
    # every step sent was one of our five vectors
    allowed = {(0,) * 7, (0, 0, 0, 1, 0, 0, 0), (0, 0, 0, -1, 0, 0, 0), (-20, 0, 0, 0, 0, 0, 0),
               (20, 0, 0, 0, 0, 0, 0)}
    assert all(tuple(v.tolist()) in allowed for lab in labs for v, _ in lab.steps)
    if policy == "random":
        _trainer_and_evaluator_accept(out, tmp_path, ACTION_NAMES, ["resolution=32"])


def _trainer_and_evaluator_accept(dataset, tmp_path, action_names, env_args) -> None:
    """The trainer fits a few steps on the dataset, the exported checkpoint speaks its actions,
    and the evaluator scores it on held-out (test-split) mazes recorded the same way."""
    import json

    from worldsim.cli import main
    from worldsim.world import WorldModel

    run = tmp_path / "run"
    rc = main(["train", "--data", str(dataset), "--out", str(run), "--preset", "tiny", "--threads", "1",
               "--progress", "false", "--ae-steps", "2", "--far-steps", "2", "--seq-len", "6"])
    assert rc == 0
    world = WorldModel.load(run / "checkpoint", device="cpu")
    assert world.action_names == tuple(action_names)

    test_data = tmp_path / "test-mazes"
    _close_recorder_cache()
    try:
        rc = main(["record", "--env", "worldsim/DMLab-v0", "--env-arg", *env_args, "--episodes", "1", "--length", "20",
                   "--split", "test", "--policy", "random", "--workers", "1", "--progress", "false",
                   "--out", str(test_data)])
    finally:
        _close_recorder_cache()
    assert rc == 0
    rc = main(["eval", "--checkpoint", str(run / "checkpoint"), "--data", str(test_data), "--out", str(tmp_path / "eval"),
               "--episodes", "1", "--context", "12", "--generate", "8", "--steps", "1", "--probe-episodes", "0",
               "--videos", "0", "--progress", "false"])
    assert rc == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["ground_truth"]["episodes_evaluated"] == 1


def test_parse_layout_pads_ragged_lines():
    walls = parse_layout("***\n* *\n**\n")
    assert walls.tolist() == [[True, True, True], [True, False, True], [True, True, True]]
    assert parse_layout("\n") is None
