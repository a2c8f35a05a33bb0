"""The Python API as a notebook uses it: wrong types and values get a clear error, never a silent
other result."""
import numpy as np
import pytest
from PIL import Image

from test_dataset import make_dataset, make_episode
from worldsim.dataset import Dataset, DatasetError
from worldsim.export import ExportConfig, ExportError, export


@pytest.fixture
def small_dataset(tmp_path):
    return make_dataset(tmp_path / "ds", [make_episode(seed=i) for i in range(13)])


def test_export_takes_one_episode_id_or_position_from_python_as_it_is(small_dataset, tmp_path):
    ds = Dataset(small_dataset)
    # a string alone was read character by character: "12" exported episodes 1 and 2 (two rows)
    rows = {}
    for name, episode in (("str", "12"), ("int", 12), ("tuple", ("12",)), ("ints", (12,)), ("np", np.int64(12))):
        out = export(ds, ExportConfig(out=str(tmp_path / f"{name}.png"), episode=episode, every=1, scale=1))
        rows[name] = np.asarray(Image.open(out))
    for image in rows.values():
        assert image.shape == rows["tuple"].shape and (image == rows["tuple"]).all()
    assert rows["tuple"].shape[0] == 8  # one episode of 8x8 frames, one row
    with pytest.raises(ExportError, match="episode 1.5"):
        export(ds, ExportConfig(out=str(tmp_path / "x.png"), episode=(1.5,)))


@pytest.mark.parametrize("name, value", [("scale", 2.5), ("every", 1.5), ("start", 0.5), ("end", 3.0),
                                         ("columns", True)])
def test_export_refuses_a_count_that_is_not_an_integer(small_dataset, tmp_path, name, value):
    # scale=2.5 wrote a strip at scale 2 (numpy's repeat truncates it)
    with pytest.raises(ExportError, match=f"--{name} must be an integer"):
        export(small_dataset, ExportConfig(out=str(tmp_path / "x.gif"), **{name: value}))
    assert not (tmp_path / "x.gif").exists()


def test_dataset_positions_are_integers(small_dataset):
    ds = Dataset(small_dataset)
    assert ds[np.int64(2)].id == ds["2"].id == ds["000002"].id == "000002"
    for key in (1.5, True, 2.0, None, slice(0, 2)):  # 1.5 and True were episode 1
        with pytest.raises(DatasetError, match="no episode"):
            ds[key]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from _tiny_world import make_checkpoint
    from worldsim.world import WorldModel
    return WorldModel.load(make_checkpoint(tmp_path_factory.mktemp("ck") / "tiny"))


def _context(world, k=3):
    h, w = world.resolution
    return np.zeros((k, h, w, 3), np.uint8), np.zeros(k, np.int64)


def test_new_session_refuses_context_actions_that_are_not_whole_indices(world):
    frames, actions = _context(world)
    with pytest.raises(ValueError, match="whole action indices"):  # was played as actions 0, 1, 1
        world.new_session(frames, [0.5, 1.5, 1.0], seed=0)
    with pytest.raises(ValueError, match="not names.*action_names.index"):  # was "invalid literal for int()"
        world.new_session(frames, [world.action_names[0]] * 3, seed=0)
    # what is a whole index works, a list or float array included
    a = world.new_session(frames, [0, 1, 1], seed=0).step(1)
    b = world.new_session(frames, np.array([0.0, 1.0, 1.0]), seed=0).step(1)
    assert (a == b).all()
    assert world.new_session(frames[:0], [], seed=0).frame_index == 0


@pytest.mark.parametrize("name, value", [("steps", 2.5), ("steps", 0), ("seed", 1.5), ("seed", "7"),
                                         ("memory_frames", 0), ("memory_frames", 2.5), ("steps", True)])
def test_new_session_refuses_counts_that_are_not_integers_by_their_name(world, name, value):
    frames, actions = _context(world)
    with pytest.raises(ValueError, match=f"{name} must be an integer"):  # steps=2.5 ran 2 steps, seed=1.5 seed 1
        world.new_session(frames, actions, **{name: value})


def test_session_takes_a_zero_d_integer_tensor_as_an_action_and_refuses_others_clearly(world):
    import torch

    frames, actions = _context(world)
    a = world.new_session(frames, actions, seed=0)
    b = world.new_session(frames, actions, seed=0)
    # a torch policy's argmax was refused as "action must be a whole number, got tensor(1)"
    assert (a.step(torch.tensor(1)) == b.step(1)).all()
    assert (a.step(np.array(2)) == b.step(np.int64(2))).all()
    for bad in (torch.tensor(1.5), np.array([1]), "forward", True, 1.5):
        with pytest.raises(ValueError, match="whole number"):
            a.step(bad)


def test_decode_takes_numpy_latents_and_names_a_wrong_shape(world):
    frames, _ = _context(world, 2)
    z = world.encode(frames)
    assert (world.decode(z.numpy()) == world.decode(z)).all()
    with pytest.raises(ValueError, match=r"latents must be \[\.\.\., " + ", ".join(map(str, z.shape[1:]))):
        world.decode(z[:, :-1])
    with pytest.raises(ValueError, match="latents must be"):
        world.decode(z[0, 0])


def test_dream_env_refuses_a_maze_seed_or_context_length_that_is_not_an_integer(world):
    from worldsim.dream_env import DreamEnv

    env = DreamEnv(world=world, context_frames=2)
    for seed in (7.9, "7"):  # both started maze 7, where Maze-v0 itself refuses them
        with pytest.raises(ValueError, match="maze_seed must be an integer"):
            env.reset(seed=0, options={"maze_seed": seed})
    with pytest.raises(ValueError, match="maze_seed must be in"):
        env.reset(seed=0, options={"maze_seed": -1})
    # a refused first reset of the simulator left gymnasium's env checker broken: every later reset of
    # the dream failed with "cannot unpack non-iterable NoneType object"
    assert env.reset(seed=0, options={"maze_seed": np.int64(7)})[1]["maze_seed"] == 7
    env.step(1)
    env.close()
    for frames in (2.5, "4", True):  # 2.5 was 2 frames of context
        with pytest.raises(ValueError, match="context_frames must be an integer"):
            DreamEnv(world=world, context_frames=frames)


def test_metrics_refuse_uint8_frames_scored_with_data_range_one_and_a_range_that_is_not_positive():
    from worldsim.metrics import psnr, ssim

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (2, 2, 16, 16, 3), dtype=np.uint8)
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match="data_range=1; uint8 frames"):  # psnr was -31 dB in silence
            metric(x, y, data_range=1.0)
        for bad in (0, -255.0, float("nan")):  # 0 was -inf dB
            with pytest.raises(ValueError, match="data_range must be a positive number"):
                metric(x, y, data_range=bad)
        np.testing.assert_allclose(metric(x / 255.0, y / 255.0, data_range=1.0), metric(x, y), rtol=1e-9)
    assert np.isfinite(psnr(np.minimum(x * 1.01, 257.0), y)).all()  # a float frame a little over 255 still scores


def test_reprs_of_the_main_objects_are_short_and_say_what_they_hold(world, small_dataset):
    ep = Dataset(small_dataset)[0]
    text = repr(ep)  # was the dataclass's, every array printed (22,000 characters for 300 frames)
    assert text == "Episode(id='000000', length=6, frame_shape=(8, 8, 3), maze_seed=0, split=%r, poses=True)" % (
        ep.info.split,)
    frames, actions = _context(world)
    assert repr(world).startswith(f"WorldModel(actions={list(world.action_names)}, resolution={world.resolution}")
    session = world.new_session(frames, actions, seed=0)
    assert repr(session).startswith("Session(frame_index=3, context=MultiLevelCacheContext, steps=")
    assert all(len(repr(x)) < 300 for x in (ep, world, session))


def test_the_dream_env_docstring_example_runs_as_written_in_a_fresh_interpreter(tmp_path):
    # it lacked `import worldsim`: run alone, gym.make said "Namespace worldsim not found"
    from _tiny_world import make_checkpoint
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    import worldsim.dream_env as dream_env

    root = Path(dream_env.__file__).resolve().parents[1]
    doc = dream_env.__doc__
    example = textwrap.dedent(doc[doc.index("\n\n") + 2:doc.index("\n\n`reset(seed)`")])
    assert 'checkpoint="checkpoints/maze-far-small"' in example
    # the tiny random checkpoint in its place: the same API, a second less to load and run
    example = example.replace("checkpoints/maze-far-small", str(make_checkpoint(tmp_path / "tiny")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", example + "\nprint(obs.shape, info['action'])"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("(64, 64, 3) forward")
