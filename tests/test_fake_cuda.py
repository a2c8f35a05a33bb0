"""The model, its caches, Sessions and Dream-v0 on a faked CUDA device (tests/_fake_cuda.py): every
tensor they put on 'cuda' is a FakeTensor on 'meta', so a tensor left on the CPU (a factory without
device=, a CPU torch.Generator, an index tensor not moved) fails here as it would on a lent GPU,
before the lease is spent finding it. Device placement only: no bf16 arithmetic, no data."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    from _fake_cuda import fake_cuda
except (ImportError, AttributeError) as exc:  # torch internals (FakeTensorMode) moved: these checks cannot run here
    pytest.skip(f"fake CUDA unavailable with torch {torch.__version__}: {exc}", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("a real GPU is here: run the code on it instead", allow_module_level=True)

from test_cache import context

from worldsim.autoencoder import AE_PRESETS, Autoencoder
from worldsim.model import FAR, PRESETS
from worldsim.world import WorldModel

ACTIONS = ("noop", "forward", "backward", "turn_left", "turn_right")


def _cuda_world() -> WorldModel:
    torch.manual_seed(0)
    return WorldModel(Autoencoder(AE_PRESETS["tiny"]), FAR(PRESETS["tiny"]), ACTIONS, device="cuda")


def test_the_fake_device_catches_what_a_gpu_refuses():
    with fake_cuda() as log:
        world = _cuda_world()
        assert world.device.type == "cuda" and next(world.far.parameters()).device.type == "meta"
        session = world.new_session(*context(6), seed=0)
        x = torch.zeros(1, 4, 8, 8, device="cuda")
        with pytest.raises(RuntimeError, match="same device"):  # a CPU action index into the embedding
            session.context.velocity(x, torch.zeros(1, device="cuda"), torch.tensor([1]))
        session.generator = torch.Generator()  # a CPU generator for CUDA noise
        with pytest.raises(RuntimeError, match="generator"):
            session.step(1)
    assert any("DEVICE MIX" in k for k in log) and any("GENERATOR" in k for k in log)


@pytest.mark.parametrize("mode", ["multilevel", "multilevel-fast", "kv", "none", "sliding"])
def test_sessions_keep_every_tensor_on_the_device(mode):
    frames, actions = context(9)  # longer than the tiny window: L2 holds frames
    # Every op runs through Python here, so the cost is the passes: 2 steps run the first denoising
    # step (which encodes the frames appended since the last query) and a later one, every op that 10
    # ran. cfg 1.0 (the shipped checkpoint's) takes the unguided passes, which fuse that encoding into
    # the first step, here with play's bounded memory (the oldest L2 frames forgotten) where the mode
    # has one; 1.5 the guided ones, unbounded, with noise on context and generated frames and the
    # temperature's scaling.
    unguided = {"cfg": 1.0, "memory_frames": 4} if mode.startswith("multilevel") else {"cfg": 1.0}
    settings = [unguided, {"cfg": 1.5, "context_noise": 0.1, "generated_noise": 0.2, "temperature": 0.9}]
    with fake_cuda() as log:
        world = _cuda_world()
        for kwargs in settings:
            session = world.new_session(frames, actions, cache_mode=mode, seed=0, steps=2, **kwargs)
            assert session.step(1).shape == (64, 64, 3)
            session.predict(2)
            session.append(frames[0], 3)
            session.fork().step(4)
            session.step_latent(0)
            session.stats()
    assert not [k for k in log if "MISMATCH" in k or "MIX" in k]


def test_dream_env_on_the_device(tmp_path):
    import gymnasium as gym
    from _tiny_world import make_checkpoint

    import worldsim  # noqa: F401  (registers the ids)

    ck = make_checkpoint(tmp_path / "ck")
    with fake_cuda():
        env = gym.make("worldsim/Dream-v0", checkpoint=str(ck), context_frames=3, device="cuda")
        obs, info = env.reset(seed=0)
        for a in (1, 3, 0):
            obs, *_, info = env.step(a)
        assert obs.shape == (64, 64, 3) and info["precision"] == "bf16"
        env.close()


def test_the_training_objective_on_the_device():
    """training_loss with every option that draws or generates (rollouts through the multi-level
    cache, self-context, blind window, short context, context noise) and its backward pass."""
    import dataclasses

    from worldsim.objective import ObjectiveConfig, training_loss

    # rollout_steps 2: the rollouts' first Euler step (encoding the frame appended before it) and a later one
    cfg = dataclasses.replace(ObjectiveConfig(), rollout_prob=1.0, rollout_frames=6, rollout_steps=2, rollout_aug=0.2,
                              self_context_prob=0.5, blind_window_prob=0.5, short_context_prob=0.3,
                              context_noise_max=0.3)
    with fake_cuda() as log:
        torch.manual_seed(0)
        far = FAR(PRESETS["tiny"]).to("cuda")
        latents = torch.randn(2, 12, 4, 8, 8).to("cuda")
        actions = torch.from_numpy(np.random.default_rng(0).integers(0, 5, (2, 12))).to("cuda")
        gen = torch.Generator(device="cuda").manual_seed(0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = training_loss(far, latents, actions, generator=gen, cfg=cfg)
        loss.backward()
    assert not [k for k in log if "MISMATCH" in k or "MIX" in k]
    assert any("objective.py" in k and "all-True" in k for k in log)  # the rollout branch ran


@pytest.mark.parametrize("precision,tf32", [("fp32", False), ("bf16", True), ("auto", True)])
def test_train_fp32_on_a_gpu_is_fp32_arithmetic(monkeypatch, precision, tf32):
    """--precision fp32 on a GPU left cuDNN's convolutions (the autoencoder's) in TF32, torch's default
    (torch.backends.cudnn.allow_tf32 starts True): 10-bit mantissas, not the fp32 asked for."""
    from worldsim import train

    seen = {}

    def flags(run, resuming, dist, log):  # what the run's steps would compute with
        seen.update(device=dist.device.type, cudnn=torch.backends.cudnn.allow_tf32,
                    matmul=torch.backends.cuda.matmul.allow_tf32)
        return 0

    monkeypatch.setattr(train, "_main", flags)
    for name in ("allow_tf32",):  # torch's defaults, restored after
        monkeypatch.setattr(torch.backends.cudnn, name, True)
        monkeypatch.setattr(torch.backends.cuda.matmul, name, False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with fake_cuda():
        assert train.main(train_args(["--data", "unread", "--device", "cuda", "--precision", precision])) == 0
    assert seen == {"device": "cuda", "cudnn": tf32, "matmul": tf32}


def train_args(argv):
    from worldsim.cli import build_parser

    return build_parser("train")[0].parse_args(argv)
