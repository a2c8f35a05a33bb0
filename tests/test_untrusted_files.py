"""Checkpoints and datasets made by others: what a crafted file can make worldsim do.

The project promises "safetensors + JSON, never pickles"; these tests keep a file from running
code (a simulator id naming a module), from breaking the commands with a traceback or from taking
the machine's memory or minutes from a few bytes.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import uuid
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import worldsim  # noqa: F401  (registers the gym ids)
from _tiny_world import ACTIONS, MAZE, make_checkpoint


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture()
def payload(tmp_path, monkeypatch) -> tuple[str, Path]:
    """A module on sys.path that leaves a marker file when imported: (its name, the marker).
    A downloaded folder lies on sys.path as soon as it is below the folder `python play.py` or
    `python -m worldsim` runs from (`checkpoints.evil.payload` imports checkpoints/evil/payload.py)."""
    name = f"worldsim_payload_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "code-ran"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    yield name, marker
    sys.modules.pop(name, None)


def _with_simulator(ckpt: Path, folder: Path, simulator: dict) -> Path:
    shutil.copytree(ckpt, folder)
    config = json.loads((folder / "config.json").read_text())
    config["simulator"] = simulator
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_checkpoints_simulator_id_cannot_import_a_module(tiny_ckpt, tmp_path, payload):
    from envs import UntrustedSimulator
    from worldsim.dream_env import DreamEnv

    name, marker = payload
    ck = _with_simulator(tiny_ckpt, tmp_path / "evil", {"id": f"{name}:worldsim/Maze-v0", "settings": {}})
    env = DreamEnv(checkpoint=ck, device="cpu", context_frames=1)
    with pytest.raises(UntrustedSimulator, match=f"evil names the simulator '{name}:worldsim/Maze-v0'.*import "
                                                 f"the Python module '{name}'.*WORLDSIM_TRUSTED_SIMULATORS"):
        env.reset(seed=0)
    assert not marker.exists() and name not in sys.modules


def test_play_refuses_a_checkpoints_foreign_simulator_in_one_line(tiny_ckpt, tmp_path, payload, capsys):
    from worldsim.cli import main

    name, marker = payload
    ck = _with_simulator(tiny_ckpt, tmp_path / "evil", {"id": f"{name}:worldsim/Maze-v0", "settings": {}})
    for world in ("sim", "dream"):  # --world sim walks the checkpoint's simulator from its config.json alone
        rc = main(["play", "--checkpoint", str(ck), "--world", world, "--headless", "--actions", "random:2",
                   "--out", str(tmp_path / "s.gif")] + (["--device", "cpu"] if world == "dream" else []))
        err = capsys.readouterr().err
        assert rc == 2 and "worldsim play: checkpoint" in err and "Traceback" not in err
        assert not marker.exists()


def test_a_datasets_simulator_id_cannot_import_a_module(tiny_ckpt, tmp_path, payload):
    """Dream-v0 over a dataset follows the dataset's own simulator for its reality view."""
    from envs import UntrustedSimulator
    from worldsim.dataset import write_episode_atomic, write_json_atomic

    name, marker = payload
    sim = gym.make(MAZE["id"], **MAZE["settings"])
    obs, info = sim.reset(seed=1, options={"maze_seed": 3})
    root = tmp_path / "d"
    (root / "episodes").mkdir(parents=True)
    write_episode_atomic(root / "episodes" / "000000.npz", video=np.stack([obs] * 3), actions=np.zeros(3, np.int64),
                         poses=np.stack([info["pose"]] * 3))
    write_json_atomic(root / "index.json", {
        "format": "worldsim-dataset", "format_version": 1,
        "simulator": {"id": f"{name}:worldsim/Maze-v0", "settings": MAZE["settings"]},
        "resolution": [64, 64], "action_names": list(ACTIONS),
        "episodes": [{"id": "000000", "file": "episodes/000000.npz", "length": 3, "maze_seed": 3}]})
    env = gym.make("worldsim/Dream-v0", checkpoint=str(tiny_ckpt), dataset=str(root), reality=True,
                   context_frames=2, device="cpu", disable_env_checker=True)
    with pytest.warns(UserWarning, match=f"no reality view: dataset {root} names the simulator"):
        env.reset(seed=0)  # the dream starts; its reality view (a bonus that never fails the dream) does not
    assert not env.unwrapped._reality_ok and not marker.exists()
    with pytest.raises(UntrustedSimulator, match=f"dataset {root} names the simulator"):
        env.unwrapped._simulator()
    assert not marker.exists()


def test_eval_refuses_a_checkpoints_foreign_simulator(tiny_ckpt, tmp_path, payload):
    from envs import UntrustedSimulator
    from worldsim.evaluate import make_simulator, record_test_episodes
    from worldsim.world import WorldModel

    name, marker = payload
    ck = _with_simulator(tiny_ckpt, tmp_path / "evil", {"id": f"{name}:worldsim/Maze-v0", "settings": {}})
    world = WorldModel.load(ck, device="cpu")
    with pytest.raises(UntrustedSimulator):
        make_simulator(world.simulator)
    with pytest.raises(UntrustedSimulator):  # eval without --data records test mazes with it
        record_test_episodes(world, tmp_path / "rec", 1, 4, 0, False)
    assert not marker.exists() and not (tmp_path / "rec").exists()


def test_eval_names_the_checkpoint_whose_simulator_it_refuses(tiny_ckpt, tmp_path, payload, capsys):
    """Without --data eval records test mazes with the checkpoint's simulator: its refusal names the
    checkpoint's folder, as play's does (it said "the checkpoint")."""
    from worldsim.cli import main

    name, marker = payload
    ck = _with_simulator(tiny_ckpt, tmp_path / "evil", {"id": f"{name}:worldsim/Maze-v0", "settings": {}})
    rc = main(["eval", "--checkpoint", str(ck), "--out", str(tmp_path / "ev"), "--episodes", "1", "--device", "cpu",
               "--progress", "false"])
    err = capsys.readouterr().err
    assert rc == 2 and f"worldsim eval: checkpoint {ck} names the simulator" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_foreign_simulator_starts_when_the_user_lists_it(tiny_ckpt, tmp_path, payload, monkeypatch):
    """The opt-in: an exact id in $WORLDSIM_TRUSTED_SIMULATORS; worldsim's own ids need none."""
    from envs import UntrustedSimulator, check_simulator_from_file
    from worldsim.dream_env import DreamEnv

    name, marker = payload
    for own in ("worldsim/Maze-v0", "worldsim/DMLab-v0", "worldsim/MemoryMaze-v0"):
        check_simulator_from_file(own, "x")
    # an id another installed package registered runs that package's code too
    for foreign in ("CartPole-v1", "worldsim/Dream-v0", f"{name}:worldsim/Maze-v0", None):
        with pytest.raises(UntrustedSimulator):
            check_simulator_from_file(foreign, "x")
    ck = _with_simulator(tiny_ckpt, tmp_path / "mine", {"id": f"{name}:worldsim/Maze-v0", "settings": MAZE["settings"]})
    monkeypatch.setenv("WORLDSIM_TRUSTED_SIMULATORS", f"CartPole-v1, {name}:worldsim/Maze-v0")
    DreamEnv(checkpoint=ck, device="cpu", context_frames=1).reset(seed=0)
    assert marker.exists()


DEEP = "[" * 100_000 + "]" * 100_000  # 200 KB: json.loads raised RecursionError, which no command caught
HUGE_NUMBER = "9" * 5000  # over Python's 4,300 digits: a plain ValueError, not a JSONDecodeError


@pytest.mark.parametrize("text, problem", [(DEEP, "nested too deeply"), (HUGE_NUMBER, "4300 digits")],
                         ids=["nested", "huge-number"])
def test_json_nested_too_deeply_or_a_huge_number_is_a_clear_error(tiny_ckpt, tmp_path, text, problem):
    from worldsim.checkpoint import CheckpointError, read_config
    from worldsim.dataset import Dataset, DatasetError
    from worldsim.keymaps import KeymapError, load_keymap
    from worldsim.train import TrainError, _read_json_object

    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    (ck / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=f"corrupt config.json: .*{problem}"):
        read_config(ck)
    with pytest.raises(TrainError, match=f"config.json: unreadable .*{problem}"):  # --ae-init, --far-init
        _read_json_object(ck / "config.json")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "index.json").write_text(text)
    with pytest.raises(DatasetError, match=f"index.json: not valid JSON .*{problem}"):
        Dataset(tmp_path / "ds")
    (tmp_path / "keys.json").write_text(text)
    with pytest.raises(KeymapError, match=f"keys.json: cannot read keymap JSON .*{problem}"):
        load_keymap(str(tmp_path / "keys.json"), ACTIONS)


def test_an_episode_files_recording_header_nested_too_deeply_is_a_clear_error(tmp_path):
    """Episode files opened without their index.json read the JSON header stored in them."""
    from worldsim.dataset import Dataset, DatasetError, write_episode_atomic

    write_episode_atomic(tmp_path / "0.npz", video=np.zeros((2, 8, 8, 3), np.uint8), actions=np.zeros(2, np.int64),
                         maze_seed=np.array(3), recording=np.array(DEEP))
    with pytest.raises(DatasetError, match="'recording' header or 'maze_seed' is malformed"):
        Dataset(tmp_path)


@pytest.mark.parametrize("settings, message", [
    ({"maze_size": [4001, 4001]}, r"maze_size must be at most 101 a side"),  # over 10 minutes in labmaze's C code
    ({"resolution": [20000, 20000]}, r"resolution times supersample must be at most 2048"),  # 23 GB on reset
    ({"resolution": 1024, "supersample": 3}, r"resolution times supersample must be at most 2048"),
], ids=["maze-size", "resolution", "supersample"])
def test_a_few_bytes_of_simulator_settings_cannot_take_the_machine(tiny_ckpt, tmp_path, settings, message):
    """`worldsim play --world sim --checkpoint X` walks X's simulator with the settings in its config.json
    (start_simulator; the refusal comes when it is made, before a reset could take the machine)."""
    from worldsim.checkpoint import read_config
    from worldsim.dream_env import SimulatorUnavailable, start_simulator

    ck = _with_simulator(tiny_ckpt, tmp_path / "big", {"id": "worldsim/Maze-v0", "settings": settings})
    with pytest.raises(SimulatorUnavailable, match=message):
        start_simulator(read_config(ck)["simulator"], source=f"checkpoint {ck}")


def test_the_largest_allowed_maze_and_frames_still_work():
    from envs.maze import MazeEnv

    env = MazeEnv(maze_size=[5, 101], room_max_size=4, resolution=(8, 1024), supersample=2)
    obs, info = env.reset(seed=0)
    assert obs.shape == (8, 1024, 3) and env.maze_walls.shape == (5, 101)


@pytest.mark.parametrize("eid, problem", [
    ("x/../../../escaped", "is not a plain name"), ("..", "is not a plain name"), ("a\\b", "is not a plain name"),
    ("", "is not a plain name"), ("e" * 201, "is 201 bytes long; ids name files"),
    ("\u00e9" * 101, "is 202 bytes long; ids name files")])  # bytes, not characters, fill a file name
def test_an_episode_id_that_is_not_a_plain_name_is_refused(tmp_path, eid, problem):
    """eval names its videos episode_<id>.mp4 in --out: an id holding '/' failed there after the scoring
    (exit 1, "No such file or directory"), and pointed at folders outside --out; one longer than a file
    name may be failed there too ("File name too long")."""
    from worldsim.dataset import Dataset, DatasetError, write_episode_atomic, write_json_atomic

    (tmp_path / "episodes").mkdir()
    write_episode_atomic(tmp_path / "episodes" / "0.npz", video=np.zeros((2, 8, 8, 3), np.uint8),
                         actions=np.zeros(2, np.int64))
    index = {"format": "worldsim-dataset", "format_version": 1, "resolution": [8, 8], "action_names": list(ACTIONS),
             "episodes": [{"id": "000000", "file": "episodes/0.npz", "length": 2}]}
    write_json_atomic(tmp_path / "index.json", index)
    assert Dataset(tmp_path)[0].id == "000000"
    index["episodes"][0]["id"] = eid
    write_json_atomic(tmp_path / "index.json", index)
    with pytest.raises(DatasetError, match=problem):
        Dataset(tmp_path)
    index["episodes"][0]["id"] = "e" * 200  # the longest an id may be
    write_json_atomic(tmp_path / "index.json", index)
    assert Dataset(tmp_path)[0].id == "e" * 200


def test_an_index_less_folder_whose_episode_id_is_too_long_for_a_file_name_is_refused(tmp_path):
    """A folder without index.json names its episodes by their path below it ("a/b/0.npz" -> "a-b-0"):
    deep or long folder names gave ids that eval's episode_<id>.mp4 failed on after the whole scoring
    ("File name too long"), which the index.json check does not catch."""
    from worldsim.dataset import Dataset, DatasetError, write_episode_atomic

    deep = tmp_path / ("f" * 150) / ("g" * 80)
    deep.mkdir(parents=True)
    write_episode_atomic(deep / ("h" * 20 + ".npz"), video=np.zeros((2, 8, 8, 3), np.uint8),
                         actions=np.zeros(2, np.int64))
    with pytest.raises(DatasetError, match=r"h\.npz: its episode id .* is 252 bytes long"):
        Dataset(tmp_path)
    short = tmp_path / ("f" * 150) / ("g" * 40)
    deep.rename(short)
    (short / ("h" * 20 + ".npz")).rename(short / ("h" * 8 + ".npz"))  # 150 + 1 + 40 + 1 + 8 bytes: the longest
    assert Dataset(tmp_path)[0].id == f"{'f' * 150}-{'g' * 40}-{'h' * 8}"


@pytest.mark.parametrize("simulator", ["worldsim/Maze-v0", {"id": 5}, {"id": "worldsim/Maze-v0", "settings": [1]}],
                         ids=["bare-id", "id-not-a-string", "settings-not-an-object"])
def test_a_datasets_simulator_that_is_not_an_id_and_settings_is_refused_naming_the_file(tiny_ckpt, tmp_path, simulator,
                                                                                        capsys):
    """index.json's 'simulator' (play and eval start it, training copies it into the checkpoint) is checked as a
    checkpoint's is: a bare id string was an AttributeError traceback in `play --dataset`."""
    from worldsim.cli import main
    from worldsim.dataset import Dataset, DatasetError, write_episode_atomic, write_json_atomic

    sim = gym.make(MAZE["id"], **MAZE["settings"])
    obs, info = sim.reset(seed=1, options={"maze_seed": 3})
    (tmp_path / "d" / "episodes").mkdir(parents=True)
    write_episode_atomic(tmp_path / "d" / "episodes" / "0.npz", video=np.stack([obs] * 3),
                         actions=np.zeros(3, np.int64), poses=np.stack([info["pose"]] * 3))
    index = {"format": "worldsim-dataset", "format_version": 1, "simulator": MAZE, "resolution": [64, 64],
             "action_names": list(ACTIONS), "episodes": [{"id": "0", "file": "episodes/0.npz", "length": 3}]}
    write_json_atomic(tmp_path / "d" / "index.json", index)
    assert Dataset(tmp_path / "d").simulator == MAZE
    write_json_atomic(tmp_path / "d" / "index.json", {**index, "simulator": simulator})
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / 'd' / 'index.json'}: 'simulator' must be null or")):
        Dataset(tmp_path / "d")
    rc = main(["play", "--checkpoint", str(tiny_ckpt), "--dataset", str(tmp_path / "d"), "--context-frames", "2",
               "--headless", "--actions", "random:2", "--out", str(tmp_path / "p.gif"), "--device", "cpu", "--reality"])
    err = capsys.readouterr().err
    assert rc == 2 and "'simulator' must be null or" in err and "Traceback" not in err


def test_an_episode_files_simulator_that_is_not_an_id_and_settings_is_refused_naming_the_file(tmp_path):
    from worldsim.dataset import Dataset, DatasetError, write_episode_atomic

    def episode(simulator: object) -> None:
        header = {"action_names": list(ACTIONS), "simulator": simulator}
        write_episode_atomic(tmp_path / "0.npz", video=np.zeros((2, 8, 8, 3), np.uint8), actions=np.zeros(2, np.int64),
                             maze_seed=np.array(3), recording=np.array(json.dumps(header)))

    episode(MAZE)
    assert Dataset(tmp_path).simulator == MAZE
    episode("worldsim/Maze-v0")
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / '0.npz'}: its 'recording' header's 'simulator' "
                                                     "must be null or")):
        Dataset(tmp_path)
