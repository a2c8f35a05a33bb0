"""Dataset reader: the public DMLab file, our own format, validation errors, splits."""
import json
import shutil
from collections import Counter

import imageio.v2 as imageio
import numpy as np
import pytest

from worldsim.dataset import (
    FORMAT_NAME, FORMAT_VERSION, Dataset, DatasetError, split_for_maze_seed, write_episode_atomic,
    write_json_atomic,
)

NAMES = ["noop", "forward", "backward", "turn_left", "turn_right"]


def make_episode(t=6, h=8, w=8, seed=0, poses=True):
    rng = np.random.default_rng(seed)
    ep = {"video": rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8),
          "actions": rng.integers(0, len(NAMES), t).astype(np.int64)}
    ep["actions"][0] = 0
    if poses:
        ep["poses"] = rng.random((t, 3), dtype=np.float32)
    return ep


def make_dataset(root, episodes, maze_seeds=None, lengths=None):
    """A dataset in our on-disk format, written by hand (no simulator needed)."""
    (root / "episodes").mkdir(parents=True)
    entries = []
    for i, ep in enumerate(episodes):
        eid = f"{i:06d}"
        write_episode_atomic(root / "episodes" / f"{eid}.npz", **ep)
        ms = i if maze_seeds is None else maze_seeds[i]
        length = len(ep["video"]) if lengths is None else lengths[i]
        entries.append({"id": eid, "file": f"episodes/{eid}.npz", "length": length,
                        "maze_seed": ms, "split": split_for_maze_seed(ms)})
    write_json_atomic(root / "index.json", {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "simulator": {"id": "worldsim/Maze-v0", "settings": {"resolution": [8, 8]}},
        "resolution": [8, 8], "action_names": NAMES, "policy": {"name": "random"},
        "episodes": entries})
    return root


# ----------------------------------------------------------------------------- DMLab files


def test_dmlab_example_reads(dmlab_example_path):
    ds = Dataset(dmlab_example_path)
    assert len(ds) == 1
    assert ds.resolution == (64, 64)
    assert ds.action_names == ("action_0", "action_1", "action_2")  # default: 1 + max action
    assert ds.simulator is None
    ep = ds[0]
    assert ep.video.shape == (300, 64, 64, 3) and ep.video.dtype == np.uint8
    assert ep.actions.shape == (300,) and ep.actions.dtype == np.int64
    assert ep.actions.min() >= 0 and ep.actions.max() == 2
    assert ep.poses is None and ep.maze_seed is None
    assert ds.episodes[0].length == 300


def _sideways_shift(before: np.ndarray, after: np.ndarray) -> int:
    """The horizontal shift s (pixels) that best maps `before` onto `after`: after[:, x] ~ before[:, x + s]."""
    p, q = before.astype(np.float32).mean(-1), after.astype(np.float32).mean(-1)
    w = p.shape[1]
    errors = {s: (np.abs(q[:, :w - s] - p[:, s:]) if s >= 0 else np.abs(q[:, -s:] - p[:, :w + s])).mean()
              for s in range(-12, 13)}
    return min(errors, key=errors.get)


def test_dmlab_file_actions_are_read_as_the_action_that_produced_each_frame(dmlab_example_path):
    """The real DMLab episode's turns: read through Dataset, actions[t] turns video[t-1] into video[t]
    (the project's convention), although the file stores the action taken at frame t."""
    ep = Dataset(dmlab_example_path)[0]
    raw = np.load(dmlab_example_path)["actions"]
    assert np.array_equal(ep.actions[1:], raw[:-1]) and ep.actions[0] == raw[0]
    shifts = np.array([_sideways_shift(ep.video[t - 1], ep.video[t]) for t in range(1, len(ep))])
    for turn, sign in ((0, -1), (1, +1)):  # the two turning actions of this file move the view opposite ways
        moved = np.sign(shifts[ep.actions[1:] == turn])
        assert (moved == sign).mean() > 0.9, (turn, (moved == sign).mean())


def test_this_projects_episode_file_opened_without_its_index_is_not_shifted(tmp_path):
    """Only FAR/TECO files (video and actions alone) are shifted: a recorded episode reads the same
    through its dataset and as a single file."""
    from worldsim.cli import main

    out = tmp_path / "ds"
    assert main(["record", "--env", "worldsim/Maze-v0", "--env-arg", "resolution=16", "maze_size=7", "--episodes", "1",
                 "--length", "12", "--out", str(out), "--progress", "false"]) == 0
    through_index = Dataset(out)[0]
    alone = Dataset(out / "episodes" / f"{through_index.info.id}.npz", action_names=Dataset(out).action_names)[0]
    assert np.array_equal(alone.actions, through_index.actions)


def test_dmlab_folder_and_explicit_action_names(dmlab_example_path, tmp_path):
    shutil.copy(dmlab_example_path, tmp_path / "a.npz")
    shutil.copy(dmlab_example_path, tmp_path / "b.npz")
    ds = Dataset(tmp_path, action_names=["left", "right", "forward"])
    assert [e.id for e in ds.episodes] == ["a", "b"]
    assert ds.action_names == ("left", "right", "forward")
    assert np.array_equal(ds["b"].video, ds[0].video)
    with pytest.raises(DatasetError, match="out of range"):
        Dataset(tmp_path, action_names=["only", "two"])
    with pytest.raises(DatasetError, match="split"):
        Dataset(tmp_path, split="train")  # DMLab files carry no maze seeds


def teco_file(path, t=8, size=16, seed=0):
    """A FAR/TECO-format file (`video`, `actions` only) with a small synthetic video."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, video=rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8), actions=rng.integers(0, 3, t))
    return path


def teco_tree(root, files):
    """TECO's layout, e.g. "train/0/3" -> root/train/0/3.npz; each file's video seeded by its position."""
    for i, name in enumerate(files):
        teco_file(root / f"{name}.npz", seed=i)
    return root


def test_teco_layout_is_read_with_its_subfolders_and_ids_name_the_path(tmp_path):
    """TECO publishes dmlab/train/<shard>/<n>.npz: only files directly in the folder were read."""
    root = teco_tree(tmp_path / "dmlab", ["train/1/0", "train/0/1", "train/0/0", "test/0/0", "loose"])
    ds = Dataset(root)
    # sorted by path; a file directly in the folder keeps its stem (the id hash splits have always used)
    assert [e.id for e in ds.episodes] == ["loose", "test-0-0", "train-0-0", "train-0-1", "train-1-0"]
    assert [e.file for e in ds.episodes] == [root / "loose.npz", root / "test/0/0.npz", root / "train/0/0.npz",
                                             root / "train/0/1.npz", root / "train/1/0.npz"]
    assert all(e.actions_taken_at_frame for e in ds.episodes)  # read as FAR/TECO files, shifted
    raw = np.load(root / "train/0/1.npz")
    ep = ds["train-0-1"]
    assert np.array_equal(ep.video, raw["video"]) and np.array_equal(ep.actions[1:], raw["actions"][:-1])
    # a shard folder given alone: ids below it
    assert [e.id for e in Dataset(root / "train").episodes] == ["0-0", "0-1", "1-0"]


def test_hidden_files_and_folders_are_skipped(tmp_path):
    """macOS's "._0.npz" resource forks (not zip files) made the whole folder unreadable."""
    root = teco_tree(tmp_path / "clips", ["0", "shard/1", ".cache/2"])
    (root / "._0.npz").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    (root / "shard" / "._1.npz").write_bytes(b"\x00\x05\x16\x07")
    assert [e.id for e in Dataset(root).episodes] == ["0", "shard-1"]
    only_hidden = tmp_path / "hidden"
    teco_file(only_hidden / ".tmp" / "0.npz")
    (only_hidden / "._0.npz").write_bytes(b"\x00")
    with pytest.raises(DatasetError, match="hidden.*no .npz episode files in this folder or its subfolders"):
        Dataset(only_hidden)


def test_a_worldsim_dataset_inside_an_index_less_folder_is_refused(tmp_path):
    """`--data data` holding data/maze (index.json) and DMLab files would mix two datasets."""
    make_dataset(tmp_path / "data" / "maze", [make_episode(seed=i) for i in range(2)])
    teco_file(tmp_path / "data" / "dmlab" / "0.npz")
    with pytest.raises(DatasetError, match=r"data/maze: is a worldsim dataset \(it holds index.json\) inside .*data, "
                                           r"which has no index.json; pass it as its own --data path"):
        Dataset(tmp_path / "data")
    assert len(Dataset(tmp_path / "data" / "maze")) == 2  # given itself, it reads as before
    assert [e.id for e in Dataset(tmp_path / "data" / "dmlab").episodes] == ["0"]


def test_two_files_of_one_id_are_refused_naming_both(tmp_path):
    root = teco_tree(tmp_path / "dmlab", ["train/0/1", "train/0-1"])
    with pytest.raises(DatasetError, match=r"train/0-1.npz: its episode id 'train-0-1' is also the id of .*train/0/1.npz"):
        Dataset(root)
    teco_file(tmp_path / "flat" / "train-0-1.npz")  # a flat file's stem against a nested path's id
    teco_file(tmp_path / "flat" / "train" / "0" / "1.npz")
    with pytest.raises(DatasetError, match=r"flat/train-0-1.npz: .*'train-0-1' is also the id of .*flat/train/0/1.npz"):
        Dataset(tmp_path / "flat")


def test_corrupt_file_in_plain_folder_is_named(dmlab_example_path, tmp_path):
    shutil.copy(dmlab_example_path, tmp_path / "good.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DatasetError, match="bad.npz.*not a valid .npz"):
        Dataset(tmp_path)


# ----------------------------------------------------------------------------- own format


def test_own_format_round_trip(tmp_path):
    eps = [make_episode(seed=i) for i in range(3)]
    ds = Dataset(make_dataset(tmp_path / "ds", eps))
    assert len(ds) == 3 and ds.action_names == tuple(NAMES) and ds.resolution == (8, 8)
    assert ds.simulator["id"] == "worldsim/Maze-v0"
    for i, ep in enumerate(ds):
        assert np.array_equal(ep.video, eps[i]["video"])
        assert np.array_equal(ep.actions, eps[i]["actions"]) and ep.actions.dtype == np.int64
        assert ep.poses.dtype == np.float32 and ep.poses.shape == (6, 3)
        assert ep.maze_seed == i
    assert ds.index_of("000002") == 2 and ds.index_of(-1) == 2
    with pytest.raises(DatasetError, match="out of range"):
        ds[3]
    with pytest.raises(DatasetError, match="no episode 'x'"):
        ds["x"]


def _corrupt_truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_not_zip(path):
    path.write_text("hello")


def _rewrite(path, **changes):
    with np.load(path) as d:
        arrays = {k: d[k] for k in d.files}
    arrays.update(changes)
    for k, v in list(arrays.items()):
        if v is None:
            del arrays[k]
    write_episode_atomic(path, **arrays)


def _declare_frames(path, frames):
    """`video`'s header declares `frames` frames over a few bytes of data (a damaged or hostile file):
    reading it allocated the declared 11 TiB before anything said the file was wrong."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (frames, 8, 8, 3)})
    actions = io.BytesIO()
    np.save(actions, np.zeros(6, np.int64))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("video.npy", header.getvalue() + bytes(64))
        z.writestr("actions.npy", actions.getvalue())


@pytest.mark.parametrize("corrupt, message", [
    (_corrupt_truncated, "not a valid .npz"),
    (lambda p: _declare_frames(p, 10**9), "has 1000000000 frames but the index says 6"),
    (_corrupt_not_zip, "not a valid .npz"),
    (lambda p: _rewrite(p, video=np.zeros((6, 8, 8, 3), np.float32)), "'video' must be uint8"),
    (lambda p: _rewrite(p, video=np.zeros((6, 8, 8), np.uint8)), r"'video' must have shape \[T, H, W, 3\]"),
    (lambda p: _rewrite(p, video=np.zeros((6, 16, 16, 3), np.uint8)), "resolution 16x16 differs"),
    (lambda p: _rewrite(p, actions=np.array([0, 1, 2, 3, 4, 5])), r"action 5 out of range \[0, 4\]"),
    (lambda p: _rewrite(p, actions=np.array([0, 1, -1, 3, 4, 0])), "action -1 out of range"),
    (lambda p: _rewrite(p, actions=np.zeros(6, np.float32)), "'actions' must be integers"),
    (lambda p: _rewrite(p, actions=np.zeros(5, np.int64)), "'actions' has 5 entries"),
    (lambda p: _rewrite(p, actions=None), "missing array 'actions'"),
    (lambda p: _rewrite(p, video=None), "missing array 'video'"),
    (lambda p: _rewrite(p, poses=np.zeros((6, 2), np.float32)), r"'poses' must have shape \[6, 3\]"),
    (lambda p: _rewrite(p, video=np.zeros((7, 8, 8, 3), np.uint8), actions=np.zeros(7, np.int64),
                        poses=None), "has 7 frames but the index says 6"),
])
def test_corrupt_episode_names_file_and_problem(tmp_path, corrupt, message):
    root = make_dataset(tmp_path / "ds", [make_episode(seed=0), make_episode(seed=1)])
    bad = root / "episodes" / "000001.npz"
    corrupt(bad)
    ds = Dataset(root)
    assert np.array_equal(ds[0].video, make_episode(seed=0)["video"])  # the good one still reads
    with pytest.raises(DatasetError, match=message) as err:
        ds[1]
    assert str(bad) in str(err.value)
    with pytest.raises(DatasetError):
        ds.validate()


def test_bad_index_and_missing_episode_file(tmp_path):
    root = make_dataset(tmp_path / "ds", [make_episode()])
    (root / "episodes" / "000000.npz").unlink()
    with pytest.raises(DatasetError, match="000000.npz: episode file listed in .* is missing"):
        Dataset(root)
    (root / "index.json").write_text("{ not json")
    with pytest.raises(DatasetError, match="index.json: not valid JSON"):
        Dataset(root)
    (root / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DatasetError, match="index.json: not a worldsim dataset"):
        Dataset(root)
    with pytest.raises(DatasetError, match="dataset not found"):
        Dataset(tmp_path / "nowhere")


@pytest.mark.parametrize("damage, message", [
    (lambda ix: ix.update(episodes=5), "'episodes' must be a list"),
    (lambda ix: ix.update(action_names="noop"), "'action_names' must be a list of non-empty names"),
    (lambda ix: ix.update(action_names=["noop", "noop", "left"]), "'action_names' repeats a name"),
    (lambda ix: ix["episodes"].__setitem__(0, "000000.npz"), "episode entry 0 is malformed"),
    (lambda ix: ix["episodes"][0].update(length=-3), "episode '000000' has length -3"),
    (lambda ix: ix["episodes"][0].update(length=0), "episode '000000' has length 0; an episode has >= 1 frames"),
    # maze seed 2 is a test maze: an edited split put it into training without a word
    (lambda ix: ix["episodes"][0].update(maze_seed=2, split="train"),
     "episode '000000' is listed in split 'train', but its maze seed 2 belongs to split 'test'"),
])
def test_damaged_index_is_refused_naming_the_index(tmp_path, damage, message):
    """A hand-edited index.json fails at open, naming itself, not later in an episode or a traceback."""
    root = make_dataset(tmp_path / "ds", [make_episode()])
    index = json.loads((root / "index.json").read_text())
    damage(index)
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match=f"index.json: {message}"):
        Dataset(root)


def test_an_index_naming_another_maze_seed_than_the_file_is_refused_at_load(tmp_path):
    root = make_dataset(tmp_path / "ds", [{**make_episode(), "maze_seed": np.int64(0)}])  # as the recorder stores it
    assert Dataset(root)[0].maze_seed == 0
    index = json.loads((root / "index.json").read_text())
    index["episodes"][0].update(maze_seed=1, split=split_for_maze_seed(1))  # the file says 0
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match="000000.npz: was recorded in maze seed 0 but the index says 1"):
        Dataset(root)[0]


def test_index_that_is_not_utf8_is_refused_naming_the_index(tmp_path):
    root = make_dataset(tmp_path / "ds", [make_episode()])
    (root / "index.json").write_bytes(b"\xff{")
    with pytest.raises(DatasetError, match="index.json: not valid JSON"):
        Dataset(root)


# ----------------------------------------------------------------------------- splits


def test_split_is_deterministic_and_balanced():
    # Fixed values: changing the function would silently move mazes between splits.
    assert [split_for_maze_seed(s) for s in range(8)] == [
        "train", "train", "test", "train", "train", "train", "test", "train"]
    assert split_for_maze_seed(51) == "val"
    # seeds at the buckets' edges (89: the last train one, 94: the last val one, 95: the first test one),
    # where a shifted boundary would move held-out test mazes into val or train
    assert [split_for_maze_seed(s) for s in (34, 83, 61)] == ["train", "val", "test"]
    seeds = range(5000)
    counts = Counter(split_for_maze_seed(s) for s in seeds)
    assert set(counts) == {"train", "val", "test"}
    assert 0.87 < counts["train"] / 5000 < 0.93
    assert 0.03 < counts["val"] / 5000 < 0.07 and 0.03 < counts["test"] / 5000 < 0.07
    assert [split_for_maze_seed(s) for s in seeds] == [split_for_maze_seed(s) for s in seeds]


def test_split_filter_partitions_a_dataset(tmp_path):
    seeds = [0, 2, 51, 1, 6, 71]  # train, test, val, train, test, val
    root = make_dataset(tmp_path / "ds", [make_episode(seed=i) for i in range(6)], maze_seeds=seeds)
    parts = {s: Dataset(root, split=s) for s in ("train", "val", "test")}
    assert {s: [e.maze_seed for e in d.episodes] for s, d in parts.items()} == {
        "train": [0, 1], "val": [51, 71], "test": [2, 6]}
    ids = [e.id for d in parts.values() for e in d.episodes]
    assert sorted(ids) == sorted(e.id for e in Dataset(root).episodes)  # disjoint and complete
    with pytest.raises(ValueError):
        Dataset(root, split="holdout")


def test_id_of_another_split_is_an_error_not_a_position(tmp_path):
    # Bug: with a split selected, the id "000003" of a train episode was read as position 3
    # of the selection and silently returned another episode.
    seeds = [2, 6, 0, 1, 3, 4]  # test, test, train, train, train, train
    root = make_dataset(tmp_path / "ds", [make_episode(seed=i) for i in range(6)], maze_seeds=seeds)
    test = Dataset(root, split="test")
    assert [e.id for e in test.episodes] == ["000000", "000001"]
    assert test["000001"].id == "000001" and test[1].id == "000001"
    with pytest.raises(DatasetError, match="episode '000003' is in split 'train'"):
        test["000003"]


# the hash (split_for_id) of these TECO-layout files, fixed so that every rule below is exercised: a train
# folder's files hash by their path below it, "0-5" to "val" and "0-15" to "test"; ep001 and ep002 to "test"
TECO_TRAIN = [f"train/0/{i}" for i in range(16)]


def test_train_val_test_folders_decide_the_split(tmp_path):
    """A user passing TECO's test folder (or its parent) to train trained on most of it: files without
    an index were split 90/5/5 by a hash of their id, wherever they lay."""
    from worldsim.dataset import split_for_id
    from worldsim.latents import open_split

    root = teco_tree(tmp_path / "dmlab", [*TECO_TRAIN, "test/0/0", "test/1/0", "Valid/0/0"])
    assert {split_for_id(f"0-{i}") for i in range(16)} == {"train", "val", "test"}  # the rules below all apply
    ds = Dataset(root)
    split = {e.id: e.split for e in ds.episodes}
    assert split["test-0-0"] == split["test-1-0"] == "test" and split["Valid-0-0"] == "val"  # any case
    # a train folder keeps its id-hash "val" episodes for validation, and holds out none as test
    assert {i for i, s in split.items() if i.startswith("train-") and s == "val"} == {"train-0-5"}
    assert split["train-0-15"] == "train"
    parts = {s: open_split(root, s) for s in ("train", "val", "test")}
    chosen = {s: sorted(ds.episodes[i].id for i in idx) for s, (ds, idx, _) in parts.items()}
    assert chosen["test"] == ["test-0-0", "test-1-0"]
    assert chosen["val"] == ["Valid-0-0", "train-0-5"]
    assert chosen["train"] == sorted(f"train-0-{i}" for i in range(16) if i != 5)
    assert all(w is None for _, _, w in parts.values())
    for s in ("train", "val", "test"):  # Dataset(split=), what export --split reads, agrees
        assert sorted(e.id for e in Dataset(root, split=s).episodes) == chosen[s]
    # the given folder's own name counts, and those above it: TECO's test folder, or one shard of it, alone
    # has nothing to train on
    assert open_split(root / "test", "train")[1] == [] and open_split(root / "test" / "0", "train")[1] == []
    assert {e.split for e in Dataset(root / "test").episodes} == {"test"}
    assert len(Dataset(root / "test", split="test")) == 2 and len(Dataset(root / "test" / "1", split="test")) == 1
    # the train folder given itself: the same episodes go to val (the hash is of the path below it)
    assert [e.id for e in Dataset(root / "train", split="val").episodes] == ["0-5"]
    assert [e.id for e in Dataset(root / "train" / "0", split="val").episodes] == ["5"]
    # a tiny train folder whose id hashes all say "val" still trains (on all of them), as a flat folder does
    tiny = teco_tree(tmp_path / "train", ["0", "12"])
    assert [e.split for e in Dataset(tiny).episodes] == ["val", "val"]
    assert open_split(tiny, "train")[1] == [0, 1]


def test_files_outside_split_folders_keep_the_hash_split_and_the_fallback_never_takes_test_files(tmp_path):
    from worldsim.latents import load_frames, open_split

    root = teco_tree(tmp_path / "dmlab", ["test/0/0", "test/0/1", "ep000", "ep001", "ep002", "ep003"])
    ds, idx, _ = open_split(root, "train")
    assert [ds.episodes[i].id for i in idx] == ["ep000", "ep003"]  # as in a flat folder of them
    ds, idx, _ = open_split(root, "test")
    assert [ds.episodes[i].id for i in idx] == ["ep001", "ep002", "test-0-0", "test-0-1"]
    assert [e.id for e in Dataset(root, split="test").episodes] == ["ep001", "ep002", "test-0-0", "test-0-1"]
    with pytest.raises(DatasetError, match="'ep000' is in split 'train'"):
        Dataset(root, split="test")["ep000"]
    # no file outside the test folder hashes to "train": the train split falls back to all the files a hash
    # splits (as a flat folder's does), never to the test folder's
    for name in ("ep000", "ep003"):
        (root / f"{name}.npz").unlink()
    ds, idx, _ = open_split(root, "train")
    assert [ds.episodes[i].id for i in idx] == ["ep001", "ep002"]
    ds, idx, warning = open_split(root, "val")  # val falls back the same way, with a warning
    assert [ds.episodes[i].id for i in idx] == ["ep001", "ep002"] and "validating on training episodes" in warning
    frames = load_frames([str(root)], "train", warn=lambda _: None)
    assert [s.rsplit(":", 1)[1] for s in frames.sources] == ["ep001", "ep002"]
    # and with only the test folder left, nothing trains
    for name in ("ep001", "ep002"):
        (root / f"{name}.npz").unlink()
    assert open_split(root, "train")[1] == [] and load_frames([str(root)], "train").videos == []


def test_export_split_test_reads_a_teco_test_folder(tmp_path, capsys):
    from worldsim.cli import main

    root = teco_tree(tmp_path / "dmlab", ["train/0/0", "test/0/0", "test/0/1"])
    out = tmp_path / "strip.png"
    assert main(["export", str(root), "--split", "test", "--episode", "test-0-1", "--out", str(out),
                 "--every", "4", "--scale", "1"]) == 0
    video = Dataset(root)["test-0-1"].video
    seam = np.zeros((video.shape[1], 1, 3), np.uint8)  # export's black line between frames
    assert np.array_equal(imageio.imread(out), np.concatenate([video[0], seam, video[4]], axis=1))
    assert main(["export", str(root / "test"), "--split", "test", "--episode", "1", "--out", str(out)]) == 0
    assert main(["export", str(root), "--split", "test", "--episode", "train-0-0", "--out", str(out)]) == 2
    assert "episode 'train-0-0' is in split 'train', not in the selected split 'test'" in capsys.readouterr().err


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from worldsim.dataset import atomic_write

    target = tmp_path / "index.json"
    write_json_atomic(target, {"a": 1})

    def failing(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, failing)
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]  # no temp file left
    assert target.stat().st_mode & 0o777 != 0o600  # not mkstemp's private mode


def test_atomic_writes_flush_through_handles_open_for_writing(tmp_path, monkeypatch):
    """Windows' fsync (FlushFileBuffers) needs a handle open for writing and fails with EBADF on a
    read-only one, which the atomic writes (a dataset's index.json, a run's checkpoint folder) used:
    this fsync refuses read-only descriptors as Windows does."""
    import errno
    import fcntl
    import os

    from worldsim.dataset import atomic_write
    from worldsim.train import swap_dir_atomic

    real_fsync = os.fsync

    def windows_fsync(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", windows_fsync)
    atomic_write(tmp_path / "index.json", lambda tmp: tmp.write_text("{}"))
    assert (tmp_path / "index.json").read_text() == "{}"
    swap_dir_atomic(tmp_path / "checkpoint", lambda tmp: (tmp / "config.json").write_text("{}"))
    assert (tmp_path / "checkpoint" / "config.json").read_text() == "{}"


def test_a_failed_atomic_write_names_the_file_asked_for_not_its_temp_twin(tmp_path):
    from worldsim.dataset import atomic_write

    target = tmp_path / "episode.npz"

    def fail(error: OSError):
        def write(tmp):
            raise error
        return write

    for error in (OSError(28, "No space left on device"),  # np.savez into a handle: no file named
                  OSError(28, "No space left on device", str(tmp_path / ".episode.npz.x1y2.tmp"))):  # the temp twin
        with pytest.raises(OSError) as caught:
            atomic_write(target, fail(error))
        assert caught.value.filename == str(target) and caught.value.errno == 28
    elsewhere = FileNotFoundError(2, "No such file or directory", str(tmp_path / "missing" / "input.json"))
    with pytest.raises(FileNotFoundError) as caught:
        atomic_write(target, fail(elsewhere))
    assert caught.value.filename == str(tmp_path / "missing" / "input.json")  # another file keeps its name
    assert list(tmp_path.iterdir()) == []


def test_a_failed_atomic_write_to_a_relative_path_names_it_too(tmp_path, monkeypatch):
    """mkstemp names its temp file in full, the target may be relative: `worldsim export d --out x.png`
    with a folder named x.png used to print the hidden temp file's name."""
    from worldsim.dataset import atomic_write

    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.png").mkdir()
    with pytest.raises(OSError) as caught:
        atomic_write("x.png", lambda tmp: tmp.write_bytes(b"png"))
    assert caught.value.filename == "x.png"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_a_folder_named_test_above_the_dataset_does_not_hold_it_out(tmp_path):
    """Folders above the given one counted for a while: a home, project or CI folder named test, val or
    training made every dataset under it held out (or all training), and this suite failed under such
    a --basetemp. Only the given folder, those below it, and the one above it count."""
    from worldsim.latents import open_split

    root = teco_tree(tmp_path / "test" / "me" / "dm", ["ep000", "ep001", "ep002", "ep003", "sub/0"])
    assert {e.split for e in Dataset(root).episodes} == {None}
    assert [Dataset(root).episodes[i].id for i in open_split(root, "train")[1]] == ["ep000", "ep003", "sub-0"]
    assert Dataset(root / "ep000.npz").episodes[0].split is None
    shard = teco_tree(tmp_path / "training" / "dmlab" / "test" / "7", ["3"])  # TECO's test shard given alone
    assert Dataset(shard).episodes[0].split == "test" and Dataset(shard / "3.npz").episodes[0].split == "test"
    part = teco_tree(tmp_path / "dmlab" / "test" / "part_a", ["0", "1", "2", "3"])  # any part of it
    assert {e.split for e in Dataset(part).episodes} == {"test"} and open_split(part, "train")[1] == []
    sub = teco_tree(tmp_path / "dmlab" / "train" / "sub", [str(i) for i in range(6)])
    assert ([e.split for e in Dataset(sub).episodes] ==
            [e.split for e in Dataset(tmp_path / "dmlab" / "train").episodes if e.id.startswith("sub-")])


def test_an_atomic_write_removes_the_temp_twins_that_killed_writes_left(tmp_path):
    """A SIGKILL (the out-of-memory killer, `kill -9`) while `worldsim export`, `eval` or `train` wrote
    a file left its hidden full-size temp twin (`.v.mp4.<random>.tmp.mp4`, a few MB for a video), and
    no later write removed it: every killed export of one file added another. A write now removes
    its target's twins whose writer is gone; one whose writer still writes (it holds a lock on it) stays."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from worldsim.dataset import atomic_write, try_lock

    repo = Path(__file__).resolve().parents[1]
    target = tmp_path / "v.gif"
    killed_mid_write = (  # the child writes half a file, then dies at once, as under SIGKILL
        "import os, signal, sys\nfrom worldsim.dataset import atomic_write\n"
        "def write(tmp):\n    tmp.write_bytes(b'half')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(sys.argv[1], write, suffix='.tmp.gif')\n")
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", killed_mid_write, str(target)], cwd=repo)
        assert run.returncode == -signal.SIGKILL
    dead = sorted(p.name for p in tmp_path.iterdir())  # the second write swept the first one's twin
    assert len(dead) == 1 and dead[0].startswith(".v.gif.") and dead[0].endswith(".tmp.gif")

    live = tmp_path / ".v.gif.l1vewr1t.tmp.gif"  # a writer at work in another process holds its twin
    live.write_bytes(b"writing")
    held = try_lock(live)
    (tmp_path / ".v.gif.notes.txt").write_text("the user's")  # not a temp twin of v.gif
    (tmp_path / ".w.gif.k1ll3d.tmp.gif").write_bytes(b"x")  # another file's twin: its own write sweeps it
    try:
        atomic_write(target, lambda tmp: tmp.write_bytes(b"GIF89a"), suffix=".tmp.gif")
    finally:
        held.close()
    assert target.read_bytes() == b"GIF89a"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".v.gif.l1vewr1t.tmp.gif", ".v.gif.notes.txt",
                                                         ".w.gif.k1ll3d.tmp.gif", "v.gif"]


# ----------------------------------------------------------------------------- mutation-audit additions


def test_the_innermost_split_folder_decides_when_the_folder_above_the_dataset_is_named_test(tmp_path):
    """`~/test/dmlab` holding TECO's train/ and test/: the folder above the given one counts (a shard of
    a test folder given alone stays held out), but a train or test folder nearer the file decides. Were
    the outermost one to win, every training file would be held out and training would find nothing."""
    root = teco_tree(tmp_path / "test" / "dmlab", ["train/0/0", "train/0/1", "test/0/0"])
    split = {e.id: e.split for e in Dataset(root).episodes}
    assert split["test-0-0"] == "test"
    # the train folder's files are "train" unless their hash moves them to "val"; never "test"
    assert {split["train-0-0"], split["train-0-1"]} <= {"train", "val"}
    assert "test" not in {split["train-0-0"], split["train-0-1"]}


def test_an_index_less_file_without_frames_is_refused_naming_it(tmp_path):
    """A video of 0 frames (an interrupted conversion, say) is no episode: refused when the folder is
    opened, naming the file, not read as an episode of length 0 that training samples from."""
    root = tmp_path / "dm"
    root.mkdir()
    np.savez(root / "a.npz", video=np.zeros((4, 8, 8, 3), np.uint8), actions=np.zeros(4, np.int64))
    np.savez(root / "b.npz", video=np.zeros((0, 8, 8, 3), np.uint8), actions=np.zeros(0, np.int64))
    with pytest.raises(DatasetError, match=r"b\.npz: 'video' has no frames"):
        Dataset(root)


def test_poses_that_are_not_floats_are_refused_naming_the_file(tmp_path):
    root = make_dataset(tmp_path / "ds", [make_episode(seed=0)])
    bad = root / "episodes" / "000000.npz"
    _rewrite(bad, poses=np.zeros((6, 3), np.int32))
    with pytest.raises(DatasetError, match=r"000000\.npz: 'poses' must be float32, got int32"):
        Dataset(root)[0]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_poses_that_are_not_finite_are_refused_naming_the_file_and_frame(tmp_path, value):
    """The recorder never writes them; eval's revisit matching dropped such frames in silence (a NaN
    or infinite pose matches no other: 54 revisit frames of a test episode became 0)."""
    root = make_dataset(tmp_path / "ds", [make_episode(seed=0)])
    bad = root / "episodes" / "000000.npz"
    poses = np.zeros((6, 3), np.float32)
    poses[2:4, 2] = value
    _rewrite(bad, poses=poses)
    with pytest.raises(DatasetError, match=r"000000\.npz: 'poses' holds NaN or infinite values \(frame 2, 2 frame"):
        Dataset(root)[0]


def test_an_index_listing_one_id_twice_is_refused(tmp_path):
    """Two entries of one id: `ds["000000"]` could only find one of them, and the other's frames would
    be trained on under a name that reads another file."""
    root = make_dataset(tmp_path / "ds", [make_episode(seed=0), make_episode(seed=1)])
    index = json.loads((root / "index.json").read_text())
    index["episodes"][1]["id"] = "000000"
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match="index.json: duplicate episode id '000000'"):
        Dataset(root)


def test_an_atomic_write_is_flushed_to_disk_before_it_replaces_the_old_file(tmp_path, monkeypatch):
    """After a power cut the renamed file must hold its data, not zero bytes: the temp file is fsynced,
    in full, before os.replace puts it in place."""
    import os

    from worldsim.dataset import atomic_write

    target = tmp_path / "index.json"
    target.write_text("old")
    real_fsync = os.fsync
    flushed = []

    def fsync(fd):
        flushed.append((os.fstat(fd).st_size, target.read_text()))  # size of what is flushed; target still old
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(target, lambda tmp: tmp.write_text("new contents"))
    assert flushed == [(len("new contents"), "old")]
    assert target.read_text() == "new contents"


@pytest.mark.parametrize("sweep_done", [False, True], ids=["sweep-holds-it", "sweep-removed-it"])
def test_an_atomic_write_keeps_its_temp_file_from_a_sweep_that_took_it_before_the_lock(tmp_path, monkeypatch,
                                                                                        sweep_done):
    """mkstemp and the writer's lock are two calls: another process's write of the same file can sweep
    the fresh, still unlocked temp file in between. The writer then wrote by name to an unlocked new file
    that the next sweep removed before the rename: writes racing on one name failed on 'No such file or
    directory' naming the target (3 processes rewriting one file: ~45 failures each in 20 s)."""
    import fcntl
    import os
    import tempfile

    from worldsim.dataset import atomic_write, sweep_dead_twins

    target = tmp_path / "index.json"
    real_mkstemp, sweeps = tempfile.mkstemp, []

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if not sweeps:  # the other process's sweep: opens and locks the first file before its writer can
            other = os.open(name, os.O_RDONLY)
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            sweeps.append((other, name))
            if sweep_done:  # and removes it, all before the writer's flock
                os.unlink(name)
                os.close(other)
        return fd, name

    def write(tmp):
        if not sweep_done:  # the sweep removes the file it holds only now, while this writer writes
            other, name = sweeps[0]
            os.unlink(name)
            os.close(other)
        tmp.write_text("new")
        sweep_dead_twins(target)  # a third write of the same file sweeps just after this one wrote

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    atomic_write(target, write)
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]
