"""Recorder, policies and export, through the real `worldsim` entry points (tiny budgets)."""
import gc
import json
import os
import shutil
import signal
from pathlib import Path

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import pytest

import envs  # noqa: F401  (registers worldsim/Maze-v0)
from envs import recorder
from envs.maze import MazeEnv
from envs.policies import MixPolicy, NavigatorPolicy, RandomWalkPolicy, make_policy
from worldsim.cli import main
from worldsim.dataset import Dataset, DatasetError, split_for_maze_seed

TINY = ["--env", "worldsim/Maze-v0", "--env-arg", "resolution=32", "--progress", "false"]


def record_args(out, episodes=3, length=40, workers=1, *extra):
    return ["record", "--out", str(out), "--episodes", str(episodes), "--length", str(length),
            "--workers", str(workers), *TINY, *extra]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "ds"
    assert main(record_args(out, 3, 40, 1, "--policy", "mix", "--seed", "3")) == 0
    return out


def index_entries(out):
    return {e["id"]: e for e in json.loads((out / "index.json").read_text())["episodes"]}


def revisit_pairs(poses, gap=50, dist=0.5, yaw_deg=30.0):
    """(t, t') with t' > t + gap, position within `dist` cells and yaw within `yaw_deg`."""
    p = poses.astype(np.float64)
    d = np.hypot(p[:, None, 0] - p[None, :, 0], p[:, None, 1] - p[None, :, 1])
    dyaw = np.abs((p[:, None, 2] - p[None, :, 2] + np.pi) % (2 * np.pi) - np.pi)
    t = np.arange(len(p))
    ok = (d < dist) & (dyaw < np.radians(yaw_deg)) & (t[None, :] > t[:, None] + gap)
    return np.argwhere(ok)


# ----------------------------------------------------------------------------- round trip


def test_round_trip_matches_replayed_simulator(tiny_dataset):
    ds = Dataset(tiny_dataset)
    assert len(ds) == 3 and ds.resolution == (32, 32)
    assert ds.action_names == ("noop", "forward", "backward", "turn_left", "turn_right")
    assert ds.simulator["id"] == "worldsim/Maze-v0" and ds.simulator["settings"]["resolution"] == [32, 32]
    entries = index_entries(tiny_dataset)
    env = gym.make(ds.simulator["id"], **ds.simulator["settings"])
    for i, info in enumerate(ds.episodes):
        ep = ds[i]
        assert info.maze_seed == i and info.split == split_for_maze_seed(i)
        assert ep.video.shape == (40, 32, 32, 3) and ep.actions.dtype == np.int64
        assert ep.poses.shape == (40, 3) and ep.poses.dtype == np.float32
        assert ep.actions[0] == ds.action_names.index("noop")
        obs, inf = env.reset(seed=entries[info.id]["reset_seed"], options={"maze_seed": info.maze_seed})
        frames, poses = [obs], [inf["pose"]]
        for a in ep.actions[1:]:
            obs, _, _, _, inf = env.step(int(a))
            frames.append(obs)
            poses.append(inf["pose"])
        assert np.array_equal(np.stack(frames), ep.video)
        np.testing.assert_allclose(np.stack(poses), ep.poses, atol=1e-6)
    env.close()


# ----------------------------------------------------------------------------- resume


def test_resume_skips_finished_episodes(tmp_path, capsys):
    out = tmp_path / "ds"
    args = record_args(out, 4, 30, 2)  # two spawned workers
    assert main(args) == 0
    files = {k: out / "episodes" / f"{k}.npz" for k in ("000000", "000001", "000002", "000003")}
    before = {k: p.stat().st_mtime_ns for k, p in files.items()}
    original = Dataset(out)["000002"].video.copy()
    # an interrupted run: episode 2 never written, episode 3 written but not yet in the index
    files["000002"].unlink()
    index = json.loads((out / "index.json").read_text())
    index["episodes"] = [e for e in index["episodes"] if e["id"] in ("000000", "000001")]
    (out / "index.json").write_text(json.dumps(index))
    (out / "episodes" / ".000004.abc.npz.tmp").write_bytes(b"half an episode")
    capsys.readouterr()
    assert main(record_args(out, 4, 30, 1)) == 0
    assert "recorded 1 episodes" in capsys.readouterr().out
    after = {k: p.stat().st_mtime_ns for k, p in files.items()}
    assert after["000000"] == before["000000"] and after["000001"] == before["000001"]
    assert after["000003"] == before["000003"]  # adopted, not re-recorded
    ds = Dataset(out)
    ds.validate()
    assert [e.id for e in ds.episodes] == sorted(files)
    assert np.array_equal(ds["000002"].video, original)  # deterministic re-recording
    assert not list((out / "episodes").glob(".*.tmp"))
    # more episodes later: only the new ones are recorded
    assert main(record_args(out, 5, 30, 1)) == 0
    assert len(Dataset(out)) == 5
    assert {k: p.stat().st_mtime_ns for k, p in files.items()} == after
    # asking for fewer later keeps them all, and the summary counts what the dataset holds
    capsys.readouterr()
    assert main(record_args(out, 3, 30, 1)) == 0
    assert "1 worker);" in (said := capsys.readouterr().out) and "(5 episodes)" in said and len(Dataset(out)) == 5


def test_resume_adopts_episodes_the_simulator_ended_early(tmp_path, capsys):
    # Bug: an episode file missing from the index was adopted only when it had exactly
    # --length frames, so episodes truncated by the simulator's max_steps were re-recorded.
    out = tmp_path / "ds"
    args = record_args(out, 2, 20, 1, "--env-arg", "max_steps=9")
    assert main(args) == 0
    assert [e.length for e in Dataset(out).episodes] == [10, 10]  # reset frame + 9 steps
    file = out / "episodes" / "000001.npz"
    before = file.stat().st_mtime_ns
    index = json.loads((out / "index.json").read_text())
    index["episodes"] = index["episodes"][:1]
    (out / "index.json").write_text(json.dumps(index))
    capsys.readouterr()
    assert main(args) == 0
    assert "recorded 0 episodes" in capsys.readouterr().out
    assert file.stat().st_mtime_ns == before
    ds = Dataset(out)
    ds.validate()
    assert [e.length for e in ds.episodes] == [10, 10]


def test_an_unlisted_episode_from_other_settings_is_refused_and_kept(tmp_path, capsys):
    """With its index lost, a folder's episodes are adopted only by the settings that recorded
    them: another resolution (or simulator, policy, length) is refused by file, never overwritten."""
    out = tmp_path / "ds"
    assert main(record_args(out, 2, 10, 1)) == 0
    (out / "index.json").unlink()
    files = sorted((out / "episodes").glob("*.npz"))
    before = [f.read_bytes() for f in files]
    capsys.readouterr()
    assert main(record_args(out, 2, 10, 1, "--env-arg", "resolution=16")) == 2
    err = capsys.readouterr().err
    assert str(files[0]) in err and "other settings" in err and "nothing was overwritten" in err
    assert [f.read_bytes() for f in files] == before
    # the settings that made them adopt both, recording nothing
    assert main(record_args(out, 2, 10, 1)) == 0
    assert "recorded 0 episodes" in capsys.readouterr().out
    assert [f.read_bytes() for f in files] == before


def test_a_corrupt_index_is_refused_and_rebuilt_from_the_episodes_once_moved_away(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(record_args(out, 2, 10, 1)) == 0
    before = {p.name: p.read_bytes() for p in (out / "episodes").iterdir()}
    (out / "index.json").write_text("{ half an index")
    capsys.readouterr()
    assert main(record_args(out, 2, 10, 1)) == 2
    assert "cannot read the existing index" in capsys.readouterr().err
    (out / "index.json").rename(tmp_path / "broken-index.json")
    assert main(record_args(out, 2, 10, 1)) == 0
    assert "recorded 0 episodes" in capsys.readouterr().out  # both adopted, nothing overwritten
    assert {p.name: p.read_bytes() for p in (out / "episodes").iterdir()} == before
    Dataset(out).validate()


@pytest.mark.parametrize("damaged", [b"null", b"\xff{", b'{"episodes": null}', b'{"episodes": [{"id": "000000"}]}'])
def test_a_damaged_but_parseable_index_is_refused_not_a_traceback(tmp_path, capsys, damaged):
    out = tmp_path / "ds"
    assert main(record_args(out, 1, 10, 1)) == 0
    (out / "index.json").write_bytes(damaged)
    capsys.readouterr()
    assert main(record_args(out, 1, 10, 1)) == 2
    err = capsys.readouterr().err
    assert "index.json" in err and "move it away" in err and "Traceback" not in err


def test_an_unlisted_episode_recorded_before_files_named_their_settings_is_adopted_when_it_fits(tmp_path, capsys):
    """Datasets recorded before episode files carried their settings still resume: an unlisted
    file without them is adopted when its maze, length, resolution and actions fit."""
    out = tmp_path / "ds"
    assert main(record_args(out, 2, 10, 1)) == 0
    old = out / "episodes" / "000001.npz"
    with np.load(old) as data:
        arrays = {k: data[k] for k in data.files if k != "recording"}
    np.savez(old, **arrays)  # as the recorder wrote it before
    index = json.loads((out / "index.json").read_text())
    index["episodes"] = index["episodes"][:1]
    (out / "index.json").write_text(json.dumps(index))
    before = old.read_bytes()
    capsys.readouterr()
    assert main(record_args(out, 2, 10, 1)) == 0
    assert "recorded 0 episodes" in capsys.readouterr().out and old.read_bytes() == before
    # with the index lost, 16x16 settings cannot take these 32x32 files: refused, kept
    first = out / "episodes" / "000000.npz"
    with np.load(first) as data:
        np.savez(first, **{k: data[k] for k in data.files if k != "recording"})
    (out / "index.json").unlink()
    assert main(record_args(out, 2, 10, 1, "--env-arg", "resolution=16")) == 2
    assert "do not fit these settings" in capsys.readouterr().err and old.read_bytes() == before


def test_resume_records_again_an_episode_listed_but_unreadable(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(record_args(out, 3, 10, 1)) == 0
    good = Dataset(out)["000001"].video.copy()
    broken = out / "episodes" / "000001.npz"
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated copy
    capsys.readouterr()
    assert main(record_args(out, 3, 10, 1)) == 0
    assert "recorded 1 episodes" in capsys.readouterr().out
    ds = Dataset(out)
    ds.validate()
    assert np.array_equal(ds["000001"].video, good)
    # bytes damaged inside the data, the headers intact (a disk error): the CRC tells, and it is recorded again
    data = bytearray(broken.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 100] = bytes(b ^ 0xFF for b in data[middle:middle + 100])
    broken.write_bytes(bytes(data))
    assert main(record_args(out, 3, 10, 1)) == 0
    assert "recorded 1 episodes" in capsys.readouterr().out
    ds = Dataset(out)
    ds.validate()
    assert np.array_equal(ds["000001"].video, good)



def test_an_unlisted_episode_file_of_another_maze_is_refused_and_kept(tmp_path, capsys):
    """A file without its settings (recorded before files named them) that holds another maze than the
    one this recording puts at its id (a copy under the wrong name) is not adopted: the index would
    call maze 0's frames maze 1."""
    out = tmp_path / "ds"
    assert main(record_args(out, 2, 10, 1)) == 0
    first, second = out / "episodes" / "000000.npz", out / "episodes" / "000001.npz"
    with np.load(first) as data:
        np.savez(second, **{k: data[k] for k in data.files if k != "recording"})  # maze 0 under id 000001
    index = json.loads((out / "index.json").read_text())
    index["episodes"] = index["episodes"][:1]
    (out / "index.json").write_text(json.dumps(index))
    before = second.read_bytes()
    capsys.readouterr()
    assert main(record_args(out, 2, 10, 1)) == 2
    err = capsys.readouterr().err
    assert f"{second}: is not in the dataset's index and it holds maze 0" in err and "puts maze 1" in err
    assert second.read_bytes() == before


@pytest.mark.parametrize("field, edited, listed", [("maze_seed", 7, [0, 1]), ("length", 9, [10, 10])])
def test_resume_mends_an_index_entry_that_disagrees_with_its_file(tmp_path, capsys, field, edited, listed):
    """An index entry naming another maze than the one this recording puts at its id, or another frame
    count than its file holds (an edited index; the dataset would refuse that episode at load), is not
    taken as done: the file is checked again and, being sound, listed as it is (nothing is recorded)."""
    out = tmp_path / "ds"
    assert main(record_args(out, 2, 10, 1)) == 0
    index = json.loads((out / "index.json").read_text())
    index["episodes"][1][field] = edited
    (out / "index.json").write_text(json.dumps(index))
    capsys.readouterr()
    assert main(record_args(out, 2, 10, 1)) == 0
    assert "recorded 0 episodes" in capsys.readouterr().out
    assert [e[field] for e in json.loads((out / "index.json").read_text())["episodes"]] == listed
    Dataset(out).validate()


def test_a_rerun_whose_policy_settings_differ_is_refused(tmp_path, capsys):
    """The policy's own settings (its weights, which another version of the code may change) are part of
    what made a dataset: a resume under others is refused, naming the setting."""
    out = tmp_path / "ds"
    assert main(record_args(out, 1, 10, 1, "--policy", "random")) == 0
    index = json.loads((out / "index.json").read_text())
    index["policy"]["weights"]["forward"] = 0.9
    (out / "index.json").write_text(json.dumps(index))
    capsys.readouterr()
    assert main(record_args(out, 2, 10, 1, "--policy", "random")) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "policy.weights.forward: existing 0.9, now 0.45" in err
    assert len(Dataset(out)) == 1


def test_a_length_episode_count_or_start_maze_seed_below_range_is_refused_before_anything_is_made(tmp_path, capsys):
    for episodes, length in ((1, 0), (-1, 10)):
        assert main(record_args(tmp_path / "ds", episodes, length, 1)) == 2
        assert "--episodes must be >= 0 and --length >= 1" in capsys.readouterr().err
        assert not (tmp_path / "ds").exists()
    assert main(record_args(tmp_path / "ds", 1, 10, 1, "--start-maze-seed", "-1")) == 2
    assert "--start-maze-seed must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()

def test_env_args_are_parsed_as_json_values_where_they_parse():
    assert recorder.parse_env_args(["maze_size=15", "resolution=[32, 48]", "a=true", "b=False", "c=none",
                                    "d=null", "e=1.5", "name=foo", "max-steps=inf"]) == {
        "maze_size": 15, "resolution": [32, 48], "a": True, "b": False, "c": None, "d": None, "e": 1.5,
        "name": "foo", "max_steps": float("inf")}
    with pytest.raises(recorder.RecordError, match="--env-arg expects key=value, got 'maze_size'"):
        recorder.parse_env_args(["maze_size"])

def test_record_closes_its_simulator_and_ignores_stale_temp_files(tmp_path, monkeypatch):
    # Bug: with one worker the simulator stayed open in this process after record()
    # returned (DeepMind Lab / MuJoCo renderers held until exit).
    closed = []
    real_close = MazeEnv.close
    monkeypatch.setattr(MazeEnv, "close", lambda self: (closed.append(self), real_close(self)))
    # A killed run can leave an index.json temp file and nothing else: that folder is ours.
    out = tmp_path / "ds"
    out.mkdir()
    (out / ".index.json.x1y2.tmp").write_text("{")
    assert main(record_args(out, 2, 5, 1)) == 0
    assert recorder._WORKER == {}
    assert len(closed) == 2  # the probe's simulator and the recording one
    assert not (out / ".index.json.x1y2.tmp").exists()
    assert len(Dataset(out)) == 2


def test_interrupt_keeps_finished_episodes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ds"
    real = recorder._record_task
    calls = []

    def flaky(task):
        calls.append(task["id"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(recorder, "_record_task", flaky)
    assert main(record_args(out, 4, 20, 1)) == 130
    assert "interrupted; 2/4 episodes are saved" in capsys.readouterr().err
    ds = Dataset(out)
    ds.validate()
    assert [e.id for e in ds.episodes] == ["000000", "000001"]
    monkeypatch.setattr(recorder, "_record_task", real)
    assert main(record_args(out, 4, 20, 1)) == 0
    assert len(Dataset(out)) == 4


@pytest.mark.parametrize("bad_pose, said", [
    (np.array([1.0, np.nan, 0.0]), "not at least 3 finite numbers"),
    (np.array([1.0, 2.0]), "not at least 3 finite numbers"),
    (None, "info has no 'pose'"),
    # a 7-number pose (x, y, z and a quaternion) whose repr numpy wraps over two lines: still one line
    (np.array([0.123456789, np.nan, 0.0, 0.70710678, 0.0, 0.0, 0.70710678]), "not at least 3 finite numbers"),
    (np.array([1e39, 2.0, 0.0]), "within float32's range"),  # finite here, inf in the float32 dataset
])
def test_a_simulator_pose_that_is_not_finite_stops_the_recording_naming_the_step(tmp_path, monkeypatch, capsys,
                                                                                 bad_pose, said):
    """A third-party simulator's NaN (or short, missing, or beyond float32) pose was written as it came: the recording
    finished and every later command refused the dataset (Dataset.load names the frame), or a short pose
    was a numpy broadcast traceback. Episodes already recorded stay; the bad one is not written."""
    real_info = MazeEnv._info

    def info(self):
        out = real_info(self)
        if self.maze_seed == 1 and self._steps >= 5:  # the second episode, from its 5th step on
            out["pose"] = bad_pose
        return out

    monkeypatch.setattr(MazeEnv, "_info", info)
    out = tmp_path / "ds"
    assert main(record_args(out, 3, 20, 1, "--start-maze-seed", "0")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"worldsim/Maze-v0: {out / 'episodes'}" in err and "maze seed 1, step 5" in err and said in err, err
    assert [e.id for e in Dataset(out).episodes] == ["000000"]
    assert not list((out / "episodes").glob("*000001*"))


def test_a_bad_pose_in_a_worker_process_stops_the_recording_in_one_line(tmp_path, monkeypatch, capsys):
    """The default, one worker per core: the error is raised in a spawned worker and crosses the pool.
    The simulator is a third-party module, as `--env module:Id-v0` names one, which the workers import."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "nan_pose_sim.py").write_text(
        "import numpy as np\n"
        "from gymnasium.envs.registration import register\n"
        "from envs.maze import MazeEnv\n"
        "class NaNPose(MazeEnv):\n"
        "    def _info(self):\n"
        "        out = super()._info()\n"
        "        if self.maze_seed == 1 and self._steps >= 5:\n"
        "            out['pose'] = np.array([1.0, np.nan, 0.0])\n"
        "        return out\n"
        "register(id='NaNPose-v0', entry_point='nan_pose_sim:NaNPose')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))  # spawned workers start with the parent's sys.path
    out = tmp_path / "ds"
    assert main(["record", "--out", str(out), "--episodes", "3", "--length", "20", "--workers", "2",
                 "--env", "nan_pose_sim:NaNPose-v0", "--env-arg", "resolution=32", "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"nan_pose_sim:NaNPose-v0: {out / 'episodes'}" in err and "maze seed 1, step 5" in err, err
    assert "not at least 3 finite numbers" in err and "nothing of this episode was written" in err, err
    assert "000001" not in {e.id for e in Dataset(out).episodes}
    assert not list((out / "episodes").glob("*000001*"))


def test_sigterm_stops_like_ctrl_c_and_takes_the_workers_along(tmp_path):
    """Bug: SIGTERM (timeout, a scheduler, docker stop) killed the parent with no message while its
    pool workers, orphaned, went on writing episodes and printed BrokenPipeError tracebacks."""
    import subprocess
    import sys
    import time

    out = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "-m", "worldsim", *record_args(out, 5000, 40, 2)],
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    index = out / "index.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if index.exists() and len(json.loads(index.read_text() or "{}").get("episodes", [])) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "interrupted;" in err and "Traceback" not in err
    files = sorted((out / "episodes").glob("*.npz"))
    time.sleep(1.0)  # no orphaned worker writes on
    assert sorted((out / "episodes").glob("*.npz")) == files
    assert 3 <= len(Dataset(out)) < 5000


def test_rerun_with_other_settings_is_refused(tiny_dataset, capsys):
    index_before = (tiny_dataset / "index.json").read_text()
    assert main(record_args(tiny_dataset, 3, 41, 1)) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "recording.length: existing 40, now 41" in err
    assert main(record_args(tiny_dataset, 3, 40, 1, "--env-arg", "maze_size=13")) == 2
    assert "simulator.settings.maze_size" in capsys.readouterr().err
    assert (tiny_dataset / "index.json").read_text() == index_before


def test_a_failed_start_leaves_no_empty_dataset_folder(tmp_path, capsys):
    """An unknown simulator fails before any episode: the folder it made goes again, while a
    folder the user made beforehand stays."""
    out = tmp_path / "new" / "data"
    assert main(["record", "--env", "worldsim/Nope-v0", "--episodes", "1", "--length", "5", "--out", str(out)]) != 0
    assert "cannot create simulator 'worldsim/Nope-v0'" in capsys.readouterr().err
    assert not out.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    assert main(["record", "--env", "worldsim/Nope-v0", "--episodes", "1", "--length", "5", "--out", str(mine)]) != 0
    assert mine.is_dir()


def test_maze_seeds_out_of_range_are_refused_before_any_episode(tmp_path, capsys):
    """A plan that would reach 2**31 failed at its second episode with a traceback; now nothing is written."""
    out = tmp_path / "data"
    assert main(record_args(out, 2, 5, 1, "--start-maze-seed", str(2**31 - 1))) == 2
    assert "worldsim/Maze-v0 takes maze seeds below 2**31" in capsys.readouterr().err and not out.exists()
    assert main(record_args(out, 1, 5, 1, "--start-maze-seed", "-5")) == 2
    assert "--start-maze-seed must be >= 0, got -5" in capsys.readouterr().err and not out.exists()
    # a negative --seed was Gymnasium's traceback with the navigator, and taken silently otherwise
    assert main(record_args(out, 1, 5, 1, "--seed", "-1", "--policy", "navigator")) == 2
    assert "--seed must be from 0 to 2**32 - 1, got -1" in capsys.readouterr().err and not out.exists()
    # the episode seeds keep its low 32 bits: 2**32 recorded exactly the episodes of --seed 0
    assert main(record_args(out, 1, 5, 1, "--seed", str(2**32))) == 2
    assert "--seed must be from 0 to 2**32 - 1, got 4294967296" in capsys.readouterr().err and not out.exists()
    for workers in (0, -4):  # 0 ran one worker per core, -4 one
        assert main(record_args(out, 1, 5, workers)) == 2
        assert f"--workers must be >= 1 (or none: one per CPU core), got {workers}" in capsys.readouterr().err
        assert not out.exists()
    assert main(record_args(out, 1, 5, 1, "--start-maze-seed", str(2**31 - 1))) == 0


def test_a_second_recorder_on_a_dataset_being_written_is_refused(tmp_path, capsys):
    """Two recorders on one folder would write the same episodes and index; the second is refused."""
    import fcntl

    out = tmp_path / "data"
    out.mkdir()
    with open(out / ".lock", "a") as held:  # what the first `worldsim record` holds while it writes
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(record_args(out, 1, 5, 1)) == 2
        assert f"{out}: another `worldsim record` is writing this dataset" in capsys.readouterr().err
        assert not (out / "index.json").exists()
    assert main(record_args(out, 1, 5, 1)) == 0  # free again


def test_split_filter_draws_only_that_split(tmp_path):
    out = tmp_path / "val"
    assert main(record_args(out, 3, 10, 1, "--split", "val")) == 0
    ds = Dataset(out)
    assert [e.split for e in ds.episodes] == ["val"] * 3
    assert all(split_for_maze_seed(e.maze_seed) == "val" for e in ds.episodes)
    assert len(Dataset(out, split="val")) == 3 and len(Dataset(out, split="train")) == 0


def test_episode_files_opened_without_their_index_keep_splits_and_action_names(tmp_path, capsys):
    """Bug: `--data ds/episodes` (the files without index.json) split them by a hash of the file name,
    so held-out test mazes trained, and named the actions action_0..4; the files carry their header."""
    from worldsim.latents import open_split

    out = tmp_path / "ds"
    assert main(record_args(out, 12, 4, 1, "--policy", "random")) == 0
    indexed = Dataset(out)
    plain = Dataset(out / "episodes")
    assert plain.action_names == indexed.action_names == ("noop", "forward", "backward", "turn_left", "turn_right")
    assert plain.simulator == indexed.simulator
    assert [(e.id, e.maze_seed, e.split) for e in plain.episodes] == [(e.id, e.maze_seed, e.split) for e in indexed.episodes]
    assert {e.split for e in indexed.episodes} >= {"train", "test"}  # mazes 0..11 hold both, so the check can fail
    for split in ("train", "test"):
        ds, idx, _ = open_split(out / "episodes", split)
        assert {ds.episodes[i].split for i in idx} == {split}
    with pytest.raises(DatasetError, match="differ from the given"):
        Dataset(out / "episodes", action_names=["a", "b", "c", "d", "e"])
    # a run trained on these files before they kept their names called them action_0..: said why
    with pytest.raises(DatasetError, match="trained on them before episode files opened without index.json kept"):
        Dataset(out / "episodes", action_names=[f"action_{i}" for i in range(5)])
    # files of another recording in the same folder are refused, not mixed
    other = tmp_path / "other"
    assert main(record_args(other, 1, 4, 1, "--env-arg", "turn_step_deg=20")) == 0
    shutil.copy(next((other / "episodes").glob("*.npz")), out / "episodes" / "zz.npz")
    with pytest.raises(DatasetError, match="come from different simulators"):
        Dataset(out / "episodes")


# ----------------------------------------------------------------------------- policies


def test_navigator_episodes_revisit_places(tmp_path):
    out = tmp_path / "nav"
    assert main(["record", "--out", str(out), "--episodes", "3", "--length", "300", "--workers", "1",
                 "--policy", "navigator", "--env-arg", "resolution=16", "--progress", "false"]) == 0
    ds = Dataset(out)
    turn_names = {ds.action_names.index("turn_left"), ds.action_names.index("turn_right")}
    full_turn = int(np.ceil(360 / 10))
    looked = 0
    for ep in ds:
        pairs = revisit_pairs(ep.poses)
        assert len(pairs) > 0, f"episode {ep.id} never revisits a place (pose + yaw) after 50 frames"
        # turns in place: the position stays, the yaw changes
        turning = np.isin(ep.actions[1:], list(turn_names))
        np.testing.assert_allclose(ep.poses[1:][turning, :2], ep.poses[:-1][turning, :2])
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, turning.astype(int), 0])))[::2]
        looked += int((runs >= full_turn).any())
    assert looked >= 1  # at least one full 360-degree look-around


def _navigator_in_a_maze(**settings) -> tuple[NavigatorPolicy, np.ndarray]:
    env = MazeEnv(resolution=8)
    obs, info = env.reset(seed=0, options={"maze_seed": 2})
    policy = NavigatorPolicy(np.random.default_rng(0), **settings)
    policy.reset(env, obs, info)
    return policy, np.asarray(info["pose"], dtype=np.float64)


def test_the_navigator_returns_only_to_places_older_than_min_return_age():
    """A return to a place seen 10 frames ago is still in the model's short window; eval's revisits
    need places the long-term memory alone holds. (The episodes test above revisits by chance too.)"""
    policy, pose = _navigator_in_a_maze(p_return=1.0)
    here = policy._cell(pose)
    old, recent = [tuple(int(v) for v in c) for c in policy.free if tuple(c) != here][:2]
    policy._t = 200
    policy.waypoints = [(old, 10, False), (recent, 190, False)]  # 190 and 10 frames ago
    policy._choose_target(pose)
    assert policy._target == old and policy._target_is_return == 0


def test_a_return_always_looks_around_a_full_turn():
    """Arriving back at a waypoint turns a full circle in place, whatever p_look says: the views eval
    scores as revisits and the 360-degree probe replays."""
    policy, pose = _navigator_in_a_maze(p_look=0.0)
    policy._target, policy._target_is_return = policy._cell(pose), 0
    policy._arrive(pose)
    turns = int(np.ceil(2 * np.pi / policy.turn_step - 1e-6))
    assert len(policy._queue) == turns and len(set(policy._queue)) == 1 and policy.waypoints[-1][2] is True


class MemoryMazeLike(MazeEnv):
    """The embedded maze behind Memory Maze's action names (no backward)."""

    action_names = ("noop", "forward", "turn_left", "turn_right", "forward_left", "forward_right")
    _to_maze = {0: 0, 1: 1, 2: 3, 3: 4, 4: 1, 5: 1}

    def __init__(self, **kw):
        super().__init__(**kw)
        self.action_space = gym.spaces.Discrete(6)

    def step(self, action):
        return super().step(self._to_maze[int(action)])


@pytest.mark.parametrize("name", ["random", "navigator"])
def test_policies_choose_by_name(name):
    env = MemoryMazeLike(resolution=8)
    rng = np.random.default_rng(0)
    policy = make_policy(name, rng)
    obs, info = env.reset(seed=1, options={"maze_seed": 5})
    policy.reset(env, obs, info)
    chosen = []
    for _ in range(150):
        a = policy.act(obs, info)
        assert 0 <= a < 6
        chosen.append(env.action_names[a])
        obs, _, _, _, info = env.step(a)
    assert {"forward", "turn_left", "turn_right"} <= set(chosen)
    assert "forward" in chosen


def test_policies_are_reproducible_and_need_their_actions():
    def run(policy_cls, seed):
        env = MazeEnv(resolution=8)
        policy = policy_cls(np.random.default_rng(seed))
        obs, info = env.reset(seed=0, options={"maze_seed": 2})
        policy.reset(env, obs, info)
        out = []
        for _ in range(60):
            out.append(policy.act(obs, info))
            obs, _, _, _, info = env.step(out[-1])
        return out

    for cls in (RandomWalkPolicy, NavigatorPolicy):
        assert run(cls, 7) == run(cls, 7)
    env = MazeEnv(resolution=8)
    env.action_names = ("noop", "jump")
    obs, info = env.reset(options={"maze_seed": 0})
    with pytest.raises(ValueError, match="needs actions"):
        NavigatorPolicy(np.random.default_rng(0)).reset(env, obs, info)
    for bad in ((8, 3), (0, 2)):  # (8, 3) was numpy's "low >= high" the first time the walk got stuck
        with pytest.raises(ValueError, match=r"stuck_turns must be \(low, high\) with 1 <= low <= high"):
            RandomWalkPolicy(np.random.default_rng(0), stuck_turns=bad)



def _cell_pressed_against_an_east_wall(env):
    """(x, y) of a body touching the wall east of a free cell, and of a free cell with 2 free cells east."""
    w = env.maze_walls
    r, c = np.argwhere(~w[:, :-1] & w[:, 1:])[0]
    r2, c2 = np.argwhere(~w[:, :-3] & ~w[:, 1:-2] & ~w[:, 2:-1])[0]
    return (c + 1 - env.radius - 1e-6, r + 0.5), (c2 + 0.5, r2 + 0.5)


def test_the_random_walk_turns_away_for_stuck_turns_steps_when_forward_makes_no_progress():
    """Pressed against a wall, a walk that only goes forward would record a stretch of identical frames;
    it turns for `stuck_turns` steps instead, and in open space it keeps going."""
    env = MazeEnv(resolution=8)
    env.reset(seed=0, options={"maze_seed": 2})
    (wx, wy), (ox, oy) = _cell_pressed_against_an_east_wall(env)
    turns = {env.action_names.index("turn_left"), env.action_names.index("turn_right")}
    forward = env.action_names.index("forward")

    def walk(x, y, steps):
        obs = env.set_pose(x, y, 0.0)
        info = {"pose": env.pose}
        policy = RandomWalkPolicy(np.random.default_rng(0), weights={"forward": 1.0}, max_repeat=1,
                                  stuck_turns=(3, 3))
        policy.reset(env, obs, info)
        out = []
        for _ in range(steps):
            out.append(policy.act(obs, info))
            obs, _, _, _, info = env.step(out[-1])
        return out

    blocked = walk(wx, wy, 5)
    assert blocked[0] == forward and blocked[4] == forward
    assert blocked[1] in turns and blocked[1:4] == [blocked[1]] * 3  # one direction, for 3 steps
    assert walk(ox, oy, 5) == [forward] * 5  # 0.15 cells a step is progress


def test_a_random_walk_with_max_repeat_1_draws_every_step_afresh():
    env = MazeEnv(resolution=8)
    obs, info = env.reset(seed=0, options={"maze_seed": 2})
    actions = {}
    for repeat in (1, 4):
        policy = RandomWalkPolicy(np.random.default_rng(1), weights={"turn_left": 1.0, "turn_right": 1.0},
                                  max_repeat=repeat)
        policy.reset(env, obs, info)
        actions[repeat] = np.array([policy.act(obs, info) for _ in range(400)])
    switches = {k: float(np.mean(a[1:] != a[:-1])) for k, a in actions.items()}
    assert 0.4 < switches[1] < 0.6  # two equally likely actions drawn independently switch half the time
    assert switches[4] < 0.35  # held for 1..4 steps: fewer switches


def test_make_policy_passes_its_settings_and_mix_draws_by_p_navigator():
    rng = np.random.default_rng(0)
    assert make_policy("random", rng, max_repeat=2).settings()["max_repeat"] == 2
    assert make_policy("navigator", rng, p_look=0.0, max_leg=3).settings()["max_leg"] == 3
    with pytest.raises(ValueError, match=r"unknown policy 'walk' \(choose from \['mix', 'navigator', 'random'\]\)"):
        make_policy("walk", rng)
    env = MazeEnv(resolution=8)
    for p, expected in ((1.0, "navigator"), (0.0, "random")):
        mix = make_policy("mix", np.random.default_rng(3), p_navigator=p)
        assert isinstance(mix, MixPolicy)
        for seed in range(4):
            obs, info = env.reset(seed=seed)
            mix.reset(env, obs, info)
            assert mix.episode_policy == expected


def _bfs_distances(walls, start):
    dist, frontier = {start: 0}, [start]
    while frontier:
        nxt = []
        for r, c in frontier:
            for n in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if not walls[n] and n not in dist:
                    dist[n] = dist[(r, c)] + 1
                    nxt.append(n)
        frontier = nxt
    return dist


def test_new_navigator_waypoints_lie_2_to_max_leg_steps_away():
    policy, pose = _navigator_in_a_maze(p_return=0.0, max_leg=3)
    dist = _bfs_distances(policy.walls, policy._cell(pose))
    assert any(d == 3 for d in dist.values())
    seen = set()
    for seed in range(40):
        policy.rng = np.random.default_rng(seed)
        policy.visited = set()
        policy._choose_target(pose)
        seen.add(dist[policy._target])
    assert seen == {2, 3}


def test_the_navigator_returns_to_older_waypoints_more_often():
    """Returns reach back far in the episode: a waypoint 1,000 frames old is picked ~10x as often as one
    100 frames old (weights by age), not half the time."""
    policy, pose = _navigator_in_a_maze(p_return=1.0)
    here = policy._cell(pose)
    old, recent = [tuple(int(v) for v in c) for c in policy.free if tuple(c) != here][:2]
    picked = []
    for seed in range(100):
        policy.rng = np.random.default_rng(seed)
        policy._t, policy._new_legs = 1100, 0
        policy.waypoints = [(old, 100, False), (recent, 1000, False)]  # 1,000 and 100 frames ago
        policy._choose_target(pose)
        picked.append(policy._target)
    assert picked.count(old) >= 80


def test_a_navigator_whose_forward_steps_make_no_progress_wiggles_instead_of_pushing_on():
    """Blocked (the collision radius in a corner, here every forward step), the navigator turns away after
    three forward steps that did not move it, instead of recording a wall for the rest of the episode."""
    env = MazeEnv(resolution=8)
    obs, info = env.reset(seed=0, options={"maze_seed": 2})
    policy = NavigatorPolicy(np.random.default_rng(0))
    env._move = lambda distance: None  # forward and backward are blocked wherever the body is
    policy.reset(env, obs, info)
    forward = env.action_names.index("forward")
    actions = []
    for _ in range(60):
        actions.append(policy.act(obs, info))
        obs, _, _, _, info = env.step(actions[-1])
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, np.array(actions) == forward, 0])))[::2]
    assert runs.size and runs.max() <= 5  # 3 that fail, then a wiggle's turns and its 2 forward steps

# ----------------------------------------------------------------------------- export


def test_export_gif_mp4_png(tiny_dataset, tmp_path, dmlab_example_path):
    gif, mp4, png = tmp_path / "a.gif", tmp_path / "grid.mp4", tmp_path / "strip.png"
    assert main(["export", str(tiny_dataset), "--episode", "0", "--out", str(gif), "--end", "10"]) == 0
    frames = imageio.mimread(gif)
    assert len(frames) == 10 and frames[0].shape[:2] == (64, 64)
    ds = Dataset(tiny_dataset)
    video0, video1 = ds[0].video, ds[1].video
    # the frames themselves, upscaled 2x (the default scale) by pixel repetition, GIF's palette aside
    assert np.abs(np.asarray(frames[3])[..., :3].astype(int) - video0[3].repeat(2, 0).repeat(2, 1)).mean() < 3
    assert main(["export", str(tiny_dataset), "--episode", "0", "1", "000002", "--out", str(mp4),
                 "--columns", "2", "--scale", "1"]) == 0
    with imageio.get_reader(mp4) as reader:
        grid = [np.asarray(f) for f in reader]
    # 2 x 2 tiles of 32x32 with a 1-pixel gap, padded to even sides for MP4; 40 frames, the longest episode
    assert len(grid) == 40 and grid[0].shape[:2] == (66, 66)
    assert np.abs(grid[5][:32, 33:65].astype(int) - video1[5]).mean() < 12  # tile 2, through lossy MP4
    assert main(["export", str(tiny_dataset), "--episode", "1", "--out", str(png), "--every", "20"]) == 0
    strip = imageio.imread(png)
    # frames 0 and 20, scale 2, a black line between them (the frames ran into each other without it)
    assert strip.shape == (64, 130, 3)
    assert np.array_equal(strip[:, :64], video1[0].repeat(2, 0).repeat(2, 1))
    assert not strip[:, 64:66].any()
    assert np.array_equal(strip[:, 66:], video1[20].repeat(2, 0).repeat(2, 1))
    strip = tmp_path / "dmlab.png"
    assert main(["export", str(dmlab_example_path), "--out", str(strip), "--every", "20"]) == 0
    assert imageio.imread(strip).shape == (128, 15 * 128 + 14 * 2, 3)


def test_export_gif_on_a_full_disk_says_one_line_and_keeps_the_old_one(tiny_dataset, tmp_path, full_disk, unraisable,
                                                                       capsys):
    """The one-line error was followed by imageio's GIF writer saving its frames again in its __del__: a
    22-line "Exception ignored in: PluginV3.__del__" traceback."""
    out = tmp_path / "x.gif"
    assert main(["export", str(tiny_dataset), "--episode", "0", "--out", str(out), "--end", "10"]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    full_disk(tmp_path)
    assert main(["export", str(tiny_dataset), "--episode", "1", "--out", str(out)]) == 1
    gc.collect()
    assert capsys.readouterr().err.strip() == f"worldsim export: {out}: No space left on device"
    assert unraisable == []
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.gif"]


def test_export_on_a_full_disk_names_the_cause_and_keeps_the_old_video(tiny_dataset, tmp_path, monkeypatch, capsys):
    """imageio's ffmpeg writer says "[Errno 32] Broken pipe" plus its command line (no errno) when the
    disk fills; the message was "[Errno None] None". The file system is asked instead."""
    out = tmp_path / "a.mp4"
    assert main(["export", str(tiny_dataset), "--episode", "0", "--out", str(out)]) == 0
    before = out.read_bytes()

    def broken_writer(*args, **kwargs):
        raise OSError("[Errno 32] Broken pipe\n\nFFMPEG COMMAND:\n/bin/ffmpeg -y -f rawvideo a.mp4\n")

    monkeypatch.setattr(imageio, "get_writer", broken_writer)
    monkeypatch.setattr("worldsim.dataset.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    assert main(["export", str(tiny_dataset), "--episode", "1", "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == f"worldsim export: {out}: No space left on device"
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.mp4"]

    monkeypatch.undo()  # the real writer again, but the file it finishes is cut short (ulimit -f, say)
    real = imageio.get_writer

    class CutOnClose:
        def __init__(self, path, *args, **kwargs):
            self.path, self.inner = path, real(path, *args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()
            with open(self.path, "r+b") as fh:
                fh.truncate(2000)

        def append_data(self, frame):
            self.inner.append_data(frame)

    monkeypatch.setattr(imageio, "get_writer", CutOnClose)
    assert main(["export", str(tiny_dataset), "--episode", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"worldsim export: {out}: the video writer failed (the finished file cannot be read back")
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.mp4"]


def test_export_errors_are_clear(tiny_dataset, tmp_path, capsys):
    assert main(["export", str(tiny_dataset), "--episode", "7", "--out", str(tmp_path / "x.gif")]) == 2
    assert "episode index 7 out of range" in capsys.readouterr().err
    assert main(["export", str(tiny_dataset), "--episode", "nope", "--out", str(tmp_path / "x.gif")]) == 2
    assert "no episode 'nope'" in capsys.readouterr().err
    assert main(["export", str(tiny_dataset), "--episode", "0", "-1", "--out", str(tmp_path / "x.gif")]) == 2
    assert "--episode -1: give an episode id or a position >= 0" in capsys.readouterr().err  # was the last one
    assert main(["export", str(tiny_dataset), "--out", str(tmp_path / "x.avi")]) == 2
    assert "unknown output format '.avi'" in capsys.readouterr().err
    # maze seeds 0, 1, 2 are train, train, test: with --split test, an id from train is an
    # error (it used to be read as a position within the split)
    assert main(["export", str(tiny_dataset), "--split", "test", "--episode", "000001",
                 "--out", str(tmp_path / "x.gif")]) == 2
    assert "episode '000001' is in split 'train'" in capsys.readouterr().err
    for extra, message in ((["--scale", "100000"], "--scale must be an integer from 1 to 32"),  # was a 224 TiB array
                           (["--start", "-3"], "--start must be >= 0, got -3"),
                           (["--columns", "0"], "--columns must be >= 1, got 0"),
                           (["--fps", "60"], "GIFs go up to 50 fps")):
        assert main(["export", str(tiny_dataset), "--out", str(tmp_path / "x.gif"), *extra]) == 2
        assert message in capsys.readouterr().err
    # a refused request leaves no folder behind, even where --out names one that does not exist yet
    assert main(["export", str(tiny_dataset), "--episode", "7", "--out", str(tmp_path / "new" / "x.gif")]) == 2
    assert "episode index 7 out of range" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    assert main(["export", str(tiny_dataset), "--out", str(tmp_path / "a-file" / "x.gif")]) == 2
    assert f"{tmp_path / 'a-file'} is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "clip.gif").mkdir()
    assert main(["export", str(tiny_dataset), "--out", str(tmp_path / "clip.gif")]) == 2
    assert "clip.gif: is a folder; give the output a file name" in capsys.readouterr().err
    (tmp_path / "a-file").unlink()
    (tmp_path / "clip.gif").rmdir()
    # as play --out does, a missing folder is created for the output
    assert main(["export", str(tiny_dataset), "--episode", "0", "--end", "2",
                 "--out", str(tmp_path / "videos" / "new" / "ep0.gif")]) == 0
    assert (tmp_path / "videos" / "new" / "ep0.gif").is_file()
    shutil.rmtree(tmp_path / "videos")
    # "none" is a value where the help says "none = ...": all episodes' videos side by side
    assert main(["export", str(tiny_dataset), "--episode", "0", "1", "--columns", "none", "--end", "2",
                 "--out", str(tmp_path / "row.gif")]) == 0


def test_export_into_a_folder_it_may_not_create_exits_1_as_any_refused_write(tiny_dataset, tmp_path, monkeypatch,
                                                                              capsys):
    """`--out /ro/sub/x.png` exited 2, `--out /ro/x.png` 1: no permission is the file system's refusal (exit 1,
    README), whichever write meets it first (simulated: root may write anywhere). A file in the way stays 2."""
    from pathlib import Path

    real_mkdir = Path.mkdir

    def no_permission(self, *args, **kwargs):
        if self.name == "sub":
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", no_permission)
    assert main(["export", str(tiny_dataset), "--episode", "0", "--out", str(tmp_path / "sub" / "x.png")]) == 1
    assert capsys.readouterr().err.strip() == f"worldsim export: {tmp_path / 'sub'}: Permission denied"
    (tmp_path / "file").write_text("")
    assert main(["export", str(tiny_dataset), "--episode", "0", "--out", str(tmp_path / "file" / "x.png")]) == 2
    assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("listed", [True, False])
def test_a_resume_does_not_record_over_an_episode_file_it_may_not_read(tmp_path, monkeypatch, capsys, listed):
    """An episode file without read permission (another user's, say) is the file system's refusal: exit
    1 naming it, as in every command. The resume took it for a corrupt file and recorded it again, both
    when the index listed it and when it adopted files an interruption left out of the index."""
    import errno

    from envs import recorder
    from worldsim.cli import main

    args = ["record", "--episodes", "1", "--length", "5", "--workers", "1", "--progress", "false",
            "--out", str(tmp_path)]
    assert main(args) == 0
    episode = tmp_path / "episodes" / "000000.npz"
    before = episode.read_bytes()
    if not listed:  # as an interruption after the rename and before the index's rewrite leaves it
        index = json.loads((tmp_path / "index.json").read_text())
        index["episodes"] = []
        (tmp_path / "index.json").write_text(json.dumps(index))
    real = recorder.npz_headers

    def refuse(path, *a, **k):
        if Path(path) == episode:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(recorder, "npz_headers", refuse)
    capsys.readouterr()
    assert main(args) == 1
    assert capsys.readouterr().err == f"worldsim record: {episode}: Permission denied\n"
    assert episode.read_bytes() == before
