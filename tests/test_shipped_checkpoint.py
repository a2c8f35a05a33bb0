"""The checkpoint shipped in checkpoints/maze-far-small: what `python play.py`, `worldsim eval` and
`worldsim/Dream-v0` load when given nothing. These tests load the real weights (29.4 MB)."""
from __future__ import annotations

import json

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import pytest

import envs  # noqa: F401  (registers the ids)
from worldsim import cli, dream_env, metrics
from worldsim.dataset import split_for_maze_seed

SHIPPED = dream_env.CHECKPOINTS_DIR / "maze-far-small"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def test_the_shipped_sampler_is_the_one_the_model_card_describes():
    sampler = json.loads((SHIPPED / "config.json").read_text())["sampler"]
    assert {k: sampler[k] for k in ("steps", "cfg", "shift", "generated_noise", "still_frames")} == \
        {"steps": 4, "cfg": 1.0, "shift": 2.0, "generated_noise": 0.25, "still_frames": 44}
    assert sampler.get("temperature", 1.0) == 1.0  # no key: plain sampling
    from worldsim.world import WorldModel

    assert WorldModel.load(SHIPPED).sampler["temperature"] == 1.0


def test_dream_v0_with_no_arguments_dreams_the_shipped_maze_model():
    """The dream of the default checkpoint follows the maze it starts in: its first generated frames,
    set beside the simulator's frames for the same start and actions (`reality=True`: the same seed
    gives the same dream, the simulator walking along), score 16.6 dB PSNR on average with these
    weights; uniform noise in their place scores 8.1 dB, a flat frame of each real frame's mean colour
    12.3 dB (`python tests/test_shipped_checkpoint.py` prints them)."""
    actions = ("forward", "turn_left", "turn_left", "forward")
    env = gym.make("worldsim/Dream-v0")
    try:
        obs, info = env.reset(seed=0)
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
        assert info["still_frames"] == 44 and info["frame_index"] == 48  # the standstill, then 4 look-around frames
        frames = [env.step(env.unwrapped.action_names.index(a))[0] for a in actions]
        dream, reality = dream_and_reality(env.unwrapped.world, actions)
    finally:
        env.close()
    assert env.unwrapped.checkpoint.resolve() == SHIPPED.resolve()
    assert all(np.array_equal(a, b) for a, b in zip(frames, dream))  # the dream the no-argument env dreamt
    # a dream of this maze, not a blank or noise: walls and floor differ, the view changes, and it is
    # the view the simulator shows
    assert all(f.std() > 10 for f in frames) and np.abs(frames[-1].astype(int) - obs).mean() > 1
    assert np.mean([metrics.psnr(d, r) for d, r in zip(dream, reality)]) > 13.0


def dream_and_reality(world, actions, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The dream of `world` from Dream-v0's default start for `seed`, and the simulator's frames for the
    same start and actions."""
    env = gym.make("worldsim/Dream-v0", world=world, reality=True)
    try:
        env.reset(seed=seed)
        steps = [env.step(env.unwrapped.action_names.index(a)) for a in actions]
    finally:
        env.close()
    return [s[0] for s in steps], [s[4]["reality_frame"] for s in steps]


def held_out_reconstruction_psnr() -> float:
    """Mean PSNR of the shipped autoencoder on 16 simulator frames of 4 test mazes (each maze's
    first frame and 3 random steps), encoded and decoded."""
    import torch

    from worldsim.autoencoder import frames_to_tensor, tensor_to_frames
    from worldsim.world import WorldModel

    world = WorldModel.load(SHIPPED)
    env = gym.make("worldsim/Maze-v0")
    rng = np.random.default_rng(0)
    frames = []
    for maze in [s for s in range(1000, 3000) if split_for_maze_seed(s) == "test"][:4]:
        obs, _ = env.reset(seed=maze, options={"maze_seed": maze})
        frames.append(obs)
        for _ in range(3):
            frames.append(env.step(int(rng.integers(5)))[0])
    env.close()
    x = np.stack(frames)
    with torch.no_grad():
        rec = tensor_to_frames(world.autoencoder.decode(world.autoencoder.encode(frames_to_tensor(x))))
    return float(np.mean([metrics.psnr(a, b) for a, b in zip(rec, x)]))


def test_the_shipped_autoencoder_reconstructs_held_out_maze_frames_near_its_bar():
    """30.29 dB with these weights (`python tests/test_shipped_checkpoint.py`; the bar is 30 on
    the whole test split); a broken or mismatched decoder falls far below."""
    assert held_out_reconstruction_psnr() > 29.5


def test_python_play_headless_runs_the_shipped_checkpoint(tmp_path, capsys):
    out = tmp_path / "play.mp4"
    assert cli.main(["play", "--headless", "--actions", "random:6", "--out", str(out), "--threads", "1"]) == 0
    assert "maze-far-small" in capsys.readouterr().err
    with imageio.get_reader(out) as reader:
        assert sum(1 for _ in reader) == 6


if __name__ == "__main__":
    from worldsim.world import WorldModel

    print(f"shipped autoencoder on 16 test-maze frames: {held_out_reconstruction_psnr():.2f} dB")
    dreamt, real = dream_and_reality(WorldModel.load(SHIPPED), ("forward", "turn_left", "turn_left", "forward"))
    noise = np.random.default_rng(0).integers(0, 256, (len(real), *real[0].shape), dtype=np.uint8)
    flat = [np.broadcast_to(r.reshape(-1, 3).mean(0).astype(np.uint8), r.shape) for r in real]
    for name, frames in (("the dream", dreamt), ("uniform noise", noise), ("mean-colour frames", flat)):
        print(f"{name} beside the simulator, first 4 frames of Dream-v0 seed 0: "
              f"{np.mean([metrics.psnr(f, r) for f, r in zip(frames, real)]):.2f} dB")
