"""DreamEnv (worldsim/Dream-v0) over a tiny random-weight checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import worldsim  # noqa: F401  (registers the gym ids)
from _tiny_world import ACTIONS, make_checkpoint
from worldsim import dream_env
from worldsim.dream_env import CheckpointNotFound, DreamEnv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def tiny_world(tiny_ckpt):
    from worldsim.world import WorldModel

    return WorldModel.load(tiny_ckpt, device="cpu")


def test_check_env(tiny_ckpt, monkeypatch):
    # Through gym.make, so that check_env also exercises the other render mode ("human").
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")
    env = gym.make("worldsim/Dream-v0", checkpoint=str(tiny_ckpt), render_mode="rgb_array", context_frames=2,
                   device="cpu").unwrapped
    check_env(env, skip_render_check=False)
    assert env.action_names == ACTIONS
    assert env.observation_space.shape == (64, 64, 3) and env.observation_space.dtype == np.uint8
    env.close()


def test_gym_make(tiny_ckpt):
    env = gym.make("worldsim/Dream-v0", checkpoint=str(tiny_ckpt), context_frames=1, device="cpu")
    obs, info = env.reset(seed=3)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    obs, reward, terminated, truncated, info = env.step(1)
    assert obs.shape == (64, 64, 3) and reward == 0.0 and not terminated and not truncated
    assert info["action"] == "forward"
    env.close()


@pytest.mark.parametrize("env_id", ["worldsim/Dream-v0", "worldsim/Maze-v0"])
def test_a_gym_made_env_survives_a_refused_first_reset(tiny_ckpt, env_id):
    """gymnasium's passive env checker, which gym.make adds, is left broken by a first reset that
    raises: the next step failed on 'cannot unpack non-iterable NoneType object', so one refused
    maze_seed killed the env for good. Ours are registered without it."""
    settings = {"checkpoint": str(tiny_ckpt), "context_frames": 1, "device": "cpu"} if "Dream" in env_id else {}
    env = gym.make(env_id, **settings)
    with pytest.raises(ValueError, match="maze_seed must be in"):
        env.reset(options={"maze_seed": -1})
    obs, info = env.reset(seed=3)
    obs, reward, terminated, truncated, info = env.step(1)
    assert obs.shape == (64, 64, 3) and not terminated
    env.close()


def _rollout(world, seed: int, actions: list[int]) -> list[np.ndarray]:
    env = DreamEnv(world=world, context_frames=2)
    obs, _ = env.reset(seed=seed)
    frames = [obs]
    for a in actions:
        frames.append(env.step(a)[0])
    env.close()
    return frames


def test_seeded_determinism(tiny_world):
    actions = [1, 1, 3, 4, 2, 0]
    a = _rollout(tiny_world, 7, actions)
    b = _rollout(tiny_world, 7, actions)
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa, fb)
    c = _rollout(tiny_world, 8, actions)
    assert not np.array_equal(a[0], c[0])  # another seed, another maze


def test_the_dream_leaves_the_callers_global_random_streams_alone(tiny_ckpt):
    """Making, resetting and stepping Dream-v0 draws from its own generators only: loading the
    checkpoint moved the caller's torch stream on by the random initial weights it then overwrote."""
    import random

    import torch

    def draws() -> tuple:
        return torch.rand(4).tolist(), np.random.rand(4).tolist(), random.random()

    def seeded() -> None:
        torch.manual_seed(11), np.random.seed(11), random.seed(11)

    seeded()
    expected = draws()
    seeded()
    env = gym.make("worldsim/Dream-v0", checkpoint=str(tiny_ckpt), context_frames=2, device="cpu")
    env.reset(seed=1)
    env.step(1)
    env.reset()
    env.close()
    assert draws() == expected


def test_the_dream_follows_the_action_it_is_given(tiny_world, monkeypatch):
    """The frame after a step depends on that step's action (same seed, same start, another action:
    another frame), and the world model is asked for exactly that action, step after step."""
    after_forward = _rollout(tiny_world, 5, [1, 1])
    after_turn = _rollout(tiny_world, 5, [1, 3])
    np.testing.assert_array_equal(after_forward[1], after_turn[1])  # same start, same first step
    assert np.abs(after_forward[2].astype(int) - after_turn[2].astype(int)).mean() > 0.1  # random weights: 0.48

    from worldsim.world import Session

    asked, real_step = [], Session.step
    monkeypatch.setattr(Session, "step", lambda self, action: asked.append(action) or real_step(self, action))
    _rollout(tiny_world, 5, [1, 3, 4, 2, 0, np.int64(3)])
    assert asked == [1, 3, 4, 2, 0, 3]


def test_info_reports_cache_growth(tiny_world):
    env = DreamEnv(world=tiny_world, context_frames=2, timing=True)
    _, info = env.reset(seed=0)
    assert info["frame_index"] == 2 and info["action"] is None
    window = tiny_world.far.config.window
    rows = [env.step(1)[4] for _ in range(window + 3)]
    for key in ("frame_index", "l1_frames", "l1_tokens", "l2_frames", "l2_tokens", "cache_bytes", "gen_time_s", "steps"):
        assert key in rows[-1], key
    assert [r["frame_index"] for r in rows] == list(range(3, 3 + window + 3))
    assert rows[-1]["steps"] == 2  # the checkpoint's sampler default
    assert all(r["gen_time_s"] > 0 for r in rows)
    # Once the short window is full, each frame adds exactly one frame of L2 tokens.
    l2 = [(r["l2_frames"], r["l2_tokens"]) for r in rows[-3:]]
    per_frame = tiny_world.far.config.context_tokens_per_frame
    assert l2[1][0] - l2[0][0] == 1 and l2[2][0] - l2[1][0] == 1
    assert l2[1][1] - l2[0][1] == per_frame
    assert rows[-1]["l1_frames"] <= window
    assert rows[-1]["cache_bytes"] > rows[0]["cache_bytes"]
    env.close()


@pytest.mark.parametrize("cache_mode, precision", [("none", "fp32"), ("multilevel", "bf16-kv")])
def test_info_says_the_precision_the_dream_runs(tiny_ckpt, cache_mode, precision):
    """bf16-kv is fp32 arithmetic over a bf16 KV cache: cache_mode none stores no cache and runs
    fp32 (the fp32 world's frames), but info said bf16-kv, and so did play's benchmark line."""
    env = DreamEnv(checkpoint=tiny_ckpt, device="cpu", precision="bf16-kv", cache_mode=cache_mode, context_frames=2)
    _, info = env.reset(seed=0)
    assert env.world.precision == "bf16-kv" and info["precision"] == precision
    assert env.step(1)[4]["precision"] == precision
    env.close()


def _contexts_given(env: DreamEnv, monkeypatch, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The frames and actions a reset hands the world model, and the reset's info."""
    given = []
    real = env.world.new_session
    monkeypatch.setattr(env.world, "new_session", lambda f, a, **kw: given.append((f, a)) or real(f, a, **kw))
    _, info = env.reset(seed=seed)
    monkeypatch.undo()
    return (*given[0], info)


def test_still_frames_put_a_standstill_before_the_start(tiny_world, tiny_ckpt, tmp_path, monkeypatch):
    """A player who stood still: copies of the first context frame with noop, so that a model always trained
    with a long-term memory starts with one; the checkpoint's sampler.still_frames is the default."""
    noop = ACTIONS.index("noop")
    env = DreamEnv(world=tiny_world, context_frames=3)
    plain, plain_actions, _ = _contexts_given(env, monkeypatch, 4)
    env.close()
    env = DreamEnv(world=tiny_world, context_frames=3, still_frames=5, reality=True)
    frames, actions, info = _contexts_given(env, monkeypatch, 4)
    assert frames.shape == (8, 64, 64, 3) and info["frame_index"] == 8 and info["still_frames"] == 5
    np.testing.assert_array_equal(frames[5:], plain)  # the same world and look-around after the standstill
    np.testing.assert_array_equal(frames[:5], np.repeat(plain[:1], 5, axis=0))
    assert actions.tolist() == [noop] * 5 + plain_actions.tolist()
    np.testing.assert_array_equal(env._frame, plain[-1])  # play shows the last look-around frame
    np.testing.assert_array_equal(info["reality_frame"], plain[-1])  # and reality stands where it ends
    _, _, _, _, info = env.step(1)
    assert info["frame_index"] == 9
    env.close()

    folder = tmp_path / "still"
    shutil.copytree(tiny_ckpt, folder)
    config = json.loads((folder / "config.json").read_text())
    config["sampler"]["still_frames"] = 6
    (folder / "config.json").write_text(json.dumps(config))
    env = gym.make("worldsim/Dream-v0", checkpoint=str(folder), context_frames=2, device="cpu").unwrapped
    assert env.still_frames == 6 and env.reset(seed=0)[1]["frame_index"] == 8
    assert DreamEnv(world=env.world, still_frames=0).still_frames == 0  # a setting of the env overrides it
    env.close()
    with pytest.raises(ValueError, match="still_frames must be an integer from 0 to 10000, got -1"):
        DreamEnv(world=tiny_world, still_frames=-1)
    monkeypatch.setitem(tiny_world.sampler, "still_frames", 2.5)  # a world built in memory, not loaded and checked
    with pytest.raises(ValueError, match="the checkpoint's sampler.still_frames must be an integer from 0 to 10000, got 2.5"):
        DreamEnv(world=tiny_world)
    monkeypatch.setattr(tiny_world, "action_names", ("action_0", *ACTIONS[1:]))  # DMLab's names: no noop
    with pytest.raises(ValueError, match="still_frames=3 needs a 'noop' action"):
        DreamEnv(world=tiny_world, still_frames=3)


def test_reality_follows_the_same_actions(tiny_world):
    env = DreamEnv(world=tiny_world, context_frames=3, reality=True)
    obs, info = env.reset(seed=5)
    np.testing.assert_array_equal(info["reality_frame"], obs)  # the context came from the simulator
    sim = gym.make(tiny_world.simulator["id"], **tiny_world.simulator["settings"]).unwrapped
    sim.reset(options={"maze_seed": info["maze_seed"]})
    yaw = info["reality_pose"][2]
    _, _, _, _, info = env.step(ACTIONS.index("turn_right"))
    assert np.isclose(np.cos(info["reality_pose"][2]), np.cos(yaw + sim.turn_step), atol=1e-4)
    for a in (1, 1, 4):
        _, _, _, _, info = env.step(a)
    # The same maze seen from the reported pose is the reality frame (float32 pose: ~exact).
    view = sim.set_pose(*(float(v) for v in info["reality_pose"]))
    assert np.abs(view.astype(int) - info["reality_frame"].astype(int)).mean() < 2.0
    env.close()


def test_starts_from_a_dataset_episode(tiny_world, tmp_path):
    from worldsim.dataset import split_for_maze_seed, write_episode_atomic, write_json_atomic

    sim = gym.make("worldsim/Maze-v0", maze_size=9)
    obs, info = sim.reset(seed=1)
    video, actions, poses = [obs], [0], [info["pose"]]
    for a in (1, 1, 3, 3, 1):
        obs, _, _, _, info = sim.step(a)
        video.append(obs)
        actions.append(a)
        poses.append(info["pose"])
    maze_seed = info["maze_seed"]
    (tmp_path / "episodes").mkdir()
    write_episode_atomic(tmp_path / "episodes" / "000000.npz", video=np.stack(video), actions=np.array(actions),
                         poses=np.stack(poses))
    write_json_atomic(tmp_path / "index.json", {
        "format": "worldsim-dataset", "format_version": 1, "simulator": tiny_world.simulator,
        "resolution": [64, 64], "action_names": list(ACTIONS),
        "episodes": [{"id": "000000", "file": "episodes/000000.npz", "length": 6, "maze_seed": maze_seed,
                      "split": split_for_maze_seed(maze_seed)}]})
    env = DreamEnv(world=tiny_world, dataset=tmp_path, episode=0, context_frames=4, reality=True)
    obs, info = env.reset(seed=0)
    np.testing.assert_array_equal(obs, video[3])
    assert info["episode"] == "000000" and info["frame_index"] == 4 and info["maze_seed"] == maze_seed
    # The real simulator is put where the context ends (maze seed + recorded pose), then follows.
    assert np.abs(info["reality_frame"].astype(int) - video[3].astype(int)).mean() < 2.0
    obs, _, _, _, info = env.step(actions[4])
    assert obs.shape == (64, 64, 3)
    assert np.abs(info["reality_frame"].astype(int) - video[4].astype(int)).mean() < 2.0
    env.close()
    # with a standstill before it: the episode's first frame repeated, the rest as before
    env = DreamEnv(world=tiny_world, dataset=tmp_path, episode=0, context_frames=4, reality=True, still_frames=2)
    obs, info = env.reset(seed=0)
    np.testing.assert_array_equal(obs, video[3])
    assert info["frame_index"] == 6 and np.abs(info["reality_frame"].astype(int) - video[3].astype(int)).mean() < 2.0
    env.close()


def test_invalid_action_is_a_clear_error(tiny_world):
    env = DreamEnv(world=tiny_world, context_frames=1)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(0)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="turn_right"):
        env.step(9)
    for bad in ("forward", None, 1.5):  # named as given, not as a -1 it was turned into; no rounding
        with pytest.raises(ValueError, match=f"invalid action {bad!r}"):
            env.step(bad)
    env.step(np.int64(1))
    env.step(2.0)  # a whole float is that action
    with pytest.raises(ValueError, match="unknown reset option.*'maze-seed'"):
        env.reset(options={"maze-seed": 3})
    with pytest.raises(ValueError, match="reset option 'episode' needs a dataset"):  # else silently ignored
        env.reset(options={"episode": 5})
    env.reset(seed=0, options={"episode": None, "maze_seed": None})  # None: draw one
    env.close()
    with pytest.raises(ValueError, match="episode=3 needs a dataset to start from"):  # was a random maze
        DreamEnv(world=tiny_world, context_frames=1, episode=3)
    with pytest.raises(ValueError, match="episode=3 needs a dataset"):  # said before any weights load
        DreamEnv(checkpoint="/nowhere/no-such-checkpoint", episode=3)


def test_missing_default_checkpoint_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(dream_env, "CHECKPOINTS_DIR", tmp_path / "checkpoints")
    with pytest.raises(CheckpointNotFound, match="--world sim") as err:
        DreamEnv()
    assert f"none shipped in {tmp_path / 'checkpoints'}" in str(err.value) and "installed copy" not in str(err.value)
    with pytest.raises(CheckpointNotFound, match="nowhere"):
        DreamEnv(checkpoint=tmp_path / "nowhere")
    # an installed copy (`pip install .`) looks in ./checkpoints: said, with the way out
    monkeypatch.setattr(dream_env, "CHECKPOINTS_DIR", dream_env.Path("checkpoints"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFound, match=r"an installed copy looks in \./checkpoints.*pip install -e \."):
        DreamEnv()


def test_default_checkpoint_is_found(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    (root / "other").mkdir(parents=True)
    (root / "other" / "config.json").write_text(json.dumps({}))
    assert dream_env.find_default_checkpoint(root) == root / "other"
    (root / "maze-far-small").mkdir()
    (root / "maze-far-small" / "config.json").write_text(json.dumps({}))
    assert dream_env.find_default_checkpoint(root) == root / "maze-far-small"


def test_human_render_uses_the_frontend_window(tiny_world, monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")
    env = DreamEnv(world=tiny_world, context_frames=1, render_mode="human")
    env.metadata = {**env.metadata, "render_fps": 1000}  # do not pace the test
    env.reset(seed=0)
    env.step(1)
    assert env._window is not None and env._window.size == (512, 512)
    env.close()


def test_a_closed_env_says_so_and_renders_nothing(tiny_ckpt):
    env = DreamEnv(tiny_ckpt, context_frames=2, render_mode="rgb_array", device="cpu")
    env.reset(seed=0)
    env.close()
    assert env.render() is None  # in human mode this would have opened a new window
    with pytest.raises(RuntimeError, match="after close"):
        env.step(0)
    env.reset(seed=0)  # a reset opens what it needs again
    assert env.step(0)[0].shape == env.observation_space.shape
    env.close()


def test_a_dataset_of_another_resolution_is_refused_by_name(tiny_world, tmp_path):
    """Play --dataset and Dream-v0 start from recorded frames: frames of another size would be encoded
    into latents of another grid, which the transformer cannot read."""
    from worldsim.cli import main
    from worldsim.dataset import DatasetError

    out = tmp_path / "small"
    assert main(["record", "--out", str(out), "--episodes", "1", "--length", "12", "--workers", "1",
                 "--env-arg", "resolution=32", "--env-arg", "maze_size=9", "--progress", "false"]) == 0
    with pytest.raises(DatasetError, match=r"has resolution \(32, 32\) but the checkpoint has \(64, 64\)"):
        DreamEnv(world=tiny_world, dataset=str(out), context_frames=4)


def test_a_dataset_without_episodes_long_enough_is_refused_and_short_ones_are_not_drawn(tiny_world, tmp_path):
    """Random starts are drawn among the episodes that hold context_frames; with none, the error
    names the dataset (play prints it as one line), not a traceback at the first reset."""
    from worldsim.cli import main
    from worldsim.dataset import DatasetError, Dataset

    assert main(["record", "--env", "worldsim/Maze-v0", "--episodes", "1", "--length", "12", "--env-arg", "maze_size=9",
                 "--progress", "false", "--out", str(tmp_path / "d")]) == 0
    short = tmp_path / "d" / "episodes" / "000001.npz"  # a second, 3-frame episode beside the 12-frame one
    ep = Dataset(tmp_path / "d")[0]
    np.savez(short, video=ep.video[:3], actions=ep.actions[:3], poses=ep.poses[:3])
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    index["episodes"].append(dict(index["episodes"][0], id="000001", file="episodes/000001.npz", length=3))
    (tmp_path / "d" / "index.json").write_text(json.dumps(index))

    env = DreamEnv(world=tiny_world, dataset=tmp_path / "d", context_frames=8)
    assert {env.reset(seed=s)[1]["episode"] for s in range(6)} == {"000000"}
    with pytest.raises(ValueError, match="reset option 'maze_seed' needs a start from the simulator"):
        env.reset(options={"maze_seed": 3})
    with pytest.raises(DatasetError, match="episode 000001 .* 3 frames, fewer than context_frames=8"):
        env.reset(options={"episode": 1})
    for negative in (-1, "-1"):  # not quietly the last episode ("-1" is how play's --episode arrives)
        with pytest.raises(ValueError, match=f"a position >= 0, got {negative!r}"):
            env.reset(options={"episode": negative})
    assert env.reset(options={"episode": 0})[1]["episode"] == "000000"
    env.close()
    with pytest.raises(DatasetError, match=r"no episode has context_frames=20 frames \(longest: 12\)"):
        DreamEnv(world=tiny_world, dataset=tmp_path / "d", context_frames=20)


@pytest.mark.parametrize("option, value, message", [
    ("cache_mode", "bogus", "cache_mode must be one of"), ("steps", 0, "steps must be an integer from 1 to 1000"),
    ("shift", 0.0, "shift must be a finite number > 0"), ("cfg", float("nan"), "cfg must be a finite number")])
def test_sampler_options_are_checked_when_the_env_is_made(tiny_ckpt, option, value, message):
    with pytest.raises(ValueError, match=message):  # not after the weights load, at the first reset
        gym.make("worldsim/Dream-v0", checkpoint=tiny_ckpt, device="cpu", **{option: value})


def test_numpy_numbers_are_sampler_options_like_any_number(tiny_world):
    env = DreamEnv(world=tiny_world, context_frames=1, steps=np.int64(2), cfg=np.float32(1.0), shift=np.float64(2.0))
    env.reset(seed=0)
    assert env._session.sampler.steps == 2 and env._session.sampler.shift == 2.0
    env.close()


def test_a_simulator_that_cannot_start_is_named(tiny_ckpt, tmp_path):
    import shutil

    from worldsim.dream_env import SimulatorUnavailable

    ck = tmp_path / "dmlab-ck"
    shutil.copytree(tiny_ckpt, ck)
    config = json.loads((ck / "config.json").read_text())
    config["simulator"] = {"id": "worldsim/Maze-v0", "settings": {"resolution": [32, 32]}}
    (ck / "config.json").write_text(json.dumps(config))
    env = DreamEnv(checkpoint=ck, device="cpu", context_frames=1)
    with pytest.raises(SimulatorUnavailable, match=r"makes \(32, 32, 3\) frames but the checkpoint expects \(64, 64\)"):
        env.reset(seed=0)
    config["simulator"] = {"id": "worldsim/Maze-v0", "settings": {"no_such_setting": 1}}
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(SimulatorUnavailable, match="cannot start the simulator 'worldsim/Maze-v0'.*no_such_setting"):
        DreamEnv(checkpoint=ck, device="cpu", context_frames=1).reset(seed=0)


def test_an_installed_copy_finds_the_shipped_checkpoint_from_the_checkout(tmp_path, monkeypatch):
    """`pip install .` puts the package in site-packages, away from checkpoints/: it then looks in
    the folder it runs from (the checkout's root, where the README's commands run)."""
    from worldsim.dream_env import find_default_checkpoint, shipped_checkpoints_dir

    assert shipped_checkpoints_dir(REPO) == REPO / "checkpoints"  # a source checkout (editable install)
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.chdir(REPO)
    assert find_default_checkpoint(shipped_checkpoints_dir(site)).resolve() == REPO / "checkpoints" / "maze-far-small"


@pytest.fixture(scope="module")
def fresh_interpreter_run(tiny_ckpt) -> tuple[int | None, str, str]:
    """(exit status, None on a hang; stdout; stderr) of one fresh interpreter that first renders a
    DreamEnv, then runs an async vector env of dreams: the two tests below read it (a fresh
    interpreter's torch import and model load cost seconds each)."""
    script = (
        "import sys, torch, gymnasium as gym, worldsim\n"
        "from worldsim.dream_env import DreamEnv\n"
        "torch.set_num_threads(2)\n"
        "torch.ones(512, 512) @ torch.ones(512, 512)  # the parent's pool at work before the fork\n"
        "env = DreamEnv(checkpoint=sys.argv[1], render_mode='rgb_array', context_frames=1)\n"
        "env.reset(seed=0); env.step(1); env.render(); env.close()\n"
        "print('pygame imported' if 'pygame' in sys.modules else 'no pygame', flush=True)\n"
        "v = gym.make_vec('worldsim/Dream-v0', num_envs=2, vectorization_mode='async',\n"
        "                 checkpoint=sys.argv[1], context_frames=2, device='cpu')\n"
        "obs, _ = v.reset(seed=0)\n"
        "obs, *_ = v.step([1, 3])\n"
        "v.close()\n"
        "print('stepped', obs.shape)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    import signal

    # a session of its own: a hang is ended with the forked workers, which would outlive their parent
    proc = subprocess.Popen([sys.executable, "-c", script, str(tiny_ckpt)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err
    return proc.returncode, out, err


def test_env_module_does_not_import_pygame(fresh_interpreter_run):
    """An rgb_array DreamEnv made, stepped and rendered in a fresh interpreter leaves pygame unimported."""
    _, out, err = fresh_interpreter_run
    assert out.startswith("no pygame\n"), out + err[-2000:]


def test_an_async_vector_env_of_dreams_runs_after_the_parent_ran_torch_multithreaded(fresh_interpreter_run):
    """gym.make_vec(..., vectorization_mode="async") builds one env in the parent, then forks the workers;
    with torch's default threads (2 here) the workers hung for good in their first parallel op (the
    OpenMP pool does not survive a fork). A subprocess, so that a hang is a timeout, not a stuck suite."""
    returncode, out, err = fresh_interpreter_run
    if returncode is None:
        pytest.fail("the async vector env hung (no step within 180 s)")
    assert returncode == 0 and "stepped (2, 64, 64, 3)" in out, err[-2000:]


# ----------------------------------------------------------------------------- mutation-audit additions


def _one_episode_dataset(world, root: Path, length: int) -> np.ndarray:
    """A dataset of one `length`-frame episode recorded by hand in the world's simulator; returns its video."""
    from worldsim.dataset import split_for_maze_seed, write_episode_atomic, write_json_atomic

    sim = gym.make(world.simulator["id"], **world.simulator["settings"])
    obs, info = sim.reset(seed=1, options={"maze_seed": 3})
    video, poses = [obs], [info["pose"]]
    for _ in range(length - 1):
        obs, _, _, _, info = sim.step(1)
        video.append(obs)
        poses.append(info["pose"])
    (root / "episodes").mkdir(parents=True)
    write_episode_atomic(root / "episodes" / "000000.npz", video=np.stack(video),
                         actions=np.array([0] + [1] * (length - 1)), poses=np.stack(poses))
    write_json_atomic(root / "index.json", {
        "format": "worldsim-dataset", "format_version": 1, "simulator": world.simulator,
        "resolution": list(world.resolution), "action_names": list(ACTIONS),
        "episodes": [{"id": "000000", "file": "episodes/000000.npz", "length": length, "maze_seed": 3,
                      "split": split_for_maze_seed(3)}]})
    return np.stack(video)


def test_an_episode_exactly_context_frames_long_is_a_start(tiny_world, tmp_path):
    video = _one_episode_dataset(tiny_world, tmp_path / "d", 3)
    env = DreamEnv(world=tiny_world, dataset=tmp_path / "d", context_frames=3)
    obs, info = env.reset(seed=0)  # drawn: no episode= given
    assert info["episode"] == "000000"
    np.testing.assert_array_equal(obs, video[2])
    env.close()


def test_observations_returned_are_the_callers_own(tiny_world):
    """What step() and render() return belongs to the caller: drawing a HUD into it must not change
    what render() shows next."""
    env = DreamEnv(world=tiny_world, context_frames=1, render_mode="rgb_array")
    env.reset(seed=0)
    obs, *_ = env.step(1)
    kept = obs.copy()
    obs[:] = 0
    np.testing.assert_array_equal(env.render(), kept)
    env.render()[:] = 0
    np.testing.assert_array_equal(env.render(), kept)
    env.close()


def test_reality_ends_with_the_simulators_own_episode_and_the_dream_goes_on(tiny_world):
    """A DeepMind Lab level or Memory Maze ends its episode by itself: from then on the dream goes on
    without reality_frame / reality_pose, and the ended simulator is not stepped again."""
    env = DreamEnv(world=tiny_world, context_frames=2, reality=True)
    env.reset(seed=0)
    sim, calls = env._sim, []
    real_step = sim.step

    def step(action):  # the level's time runs out at its second step
        obs, reward, terminated, _, info = real_step(action)
        calls.append(action)
        return obs, reward, terminated, len(calls) >= 2, info

    sim.step = step
    assert "reality_frame" in env.step(1)[4]
    for _ in range(3):  # the level ends at the first of these
        obs, _, terminated, truncated, info = env.step(1)
        assert "reality_frame" not in info and "reality_pose" not in info
        assert obs.shape == (64, 64, 3) and not (terminated or truncated)
    assert len(calls) == 2
    env.close()


def test_the_context_turns_left_in_place_or_keeps_still(tiny_world, monkeypatch):
    """The documented start: the reset frame with noop, then turn_left steps (the model sees around
    itself), or with context_policy="noop" the same view again with noop; the frames are the simulator's."""
    noop, left = ACTIONS.index("noop"), ACTIONS.index("turn_left")
    sim = gym.make(tiny_world.simulator["id"], **tiny_world.simulator["settings"]).unwrapped

    def close(a, b):  # float32 poses: a pixel may round the other way
        return np.abs(a.astype(int) - b.astype(int)).mean() < 2.0

    for policy, action in (("turn", left), ("noop", noop)):
        env = DreamEnv(world=tiny_world, context_frames=3, context_policy=policy)
        frames, actions, info = _contexts_given(env, monkeypatch, 2)
        assert actions.tolist() == [noop, action, action]
        x, y, yaw = (float(v) for v in env._sim.unwrapped.pose)  # where the context ends
        sim.reset(options={"maze_seed": info["maze_seed"]})
        assert close(sim.set_pose(x, y, yaw), frames[-1])
        start_yaw = yaw + 2 * sim.turn_step if policy == "turn" else yaw  # turn_left decreases yaw
        assert close(sim.set_pose(x, y, start_yaw), frames[0])
        assert not close(frames[0], frames[-1]) if policy == "turn" else all(np.array_equal(f, frames[0]) for f in frames)
        env.close()


def test_the_preferred_shipped_checkpoint_wins_over_one_sorted_before_it(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("a-first-by-name", "maze-far-small"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
    assert dream_env.find_default_checkpoint(root) == root / "maze-far-small"
