"""Small fixtures for the evaluation tests: a tiny navigator dataset, a stand-in world model
(same `new_session` / `Session` interface as worldsim.world, no network) and a tiny
random-weight checkpoint built from the model engineer's "tiny" presets."""
from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_SIM_SETTINGS = {"resolution": [32, 32], "maze_size": [7, 7], "max_rooms": 1, "room_min_size": 3,
                     "room_max_size": 3, "turn_step_deg": 45.0, "move_step": 0.25}
MAZE_ID = "worldsim/Maze-v0"


def record_tiny_dataset(path: Path, episodes: int = 2, length: int = 20, seed: int = 0) -> Path:
    """A few test-split navigator episodes at 32x32 (the recorder, one process)."""
    import json

    from envs.recorder import RecordConfig, record

    env_arg = tuple(f"{k}={json.dumps(v)}" for k, v in TINY_SIM_SETTINGS.items())
    record(RecordConfig(out=str(path), env=MAZE_ID, env_arg=env_arg, episodes=episodes, length=length,
                        policy="navigator", split="test", seed=seed, workers=1, progress=False))
    return path


class FakeSession:
    """Deterministic stand-in: the next frame is the last frame darkened plus seeded noise.
    With `cache_mode="sliding"` it adds more noise, so conditions differ."""

    def __init__(self, world: "FakeWorld", frames: np.ndarray, actions: np.ndarray, cache_mode: str,
                 seed: int | None) -> None:
        self.world = world
        self.frames = [np.asarray(f) for f in frames]
        self.actions = list(actions)
        self.cache_mode = cache_mode
        self.rng = np.random.default_rng(seed)

    @property
    def frame_index(self) -> int:
        return len(self.frames)

    def predict(self, action: int) -> np.ndarray:
        amp = 6 if self.cache_mode == "multilevel" else 20
        noise = self.rng.integers(-amp, amp + 1, size=self.frames[-1].shape)
        return np.clip(self.frames[-1].astype(int) - int(action) + noise, 0, 255).astype(np.uint8)

    def append(self, frame: np.ndarray, action: int) -> None:
        self.frames.append(np.asarray(frame, dtype=np.uint8))
        self.actions.append(int(action))

    def step(self, action: int) -> np.ndarray:
        f = self.predict(action)
        self.append(f, action)
        return f

    def stats(self) -> dict:
        return {"l1_frames": min(len(self.frames), self.world.window), "l1_tokens": 0, "l2_frames": 0,
                "l2_tokens": 0, "cache_bytes": 0}


class FakeWorld:
    def __init__(self, resolution=(32, 32), window: int = 4, simulator: dict | None = None) -> None:
        self.resolution = tuple(resolution)
        self.action_names = ("noop", "forward", "backward", "turn_left", "turn_right")
        self.window = window
        self.simulator = simulator if simulator is not None else {"id": MAZE_ID, "settings": dict(TINY_SIM_SETTINGS)}
        self.config = {"far": {"window": window}, "sampler": {"steps": 1, "cfg": 1.0}, "fake": True}
        self.sessions: list[tuple[str, int | None]] = []
        self.contexts: list[np.ndarray] = []  # the context frames of every session, in order
        self.context_actions: list[np.ndarray] = []  # and their actions
        self.shifts: list[float | None] = []  # the sampler shift every session was asked for
        self.temperatures: list[float | None] = []  # and the sampling temperature
        self.memory_frames: list[int | None] = []  # and the bound on its long-term memory
        self.generated_noise: list[float | None] = []  # and the generated-frame noise level (None: not passed)

    @property
    def sampler(self) -> dict:  # as WorldModel: config.json's settings over the library's defaults
        from worldsim.checkpoint import DEFAULT_SAMPLER

        return {**DEFAULT_SAMPLER, **self.config.get("sampler", {})}

    def new_session(self, context_frames, context_actions, cache_mode="multilevel", steps=None, cfg=None, seed=None,
                    shift=None, generated_noise=None, temperature=None, memory_frames=None):
        assert len(context_frames) == len(context_actions)
        self.sessions.append((cache_mode, seed))
        self.memory_frames.append(memory_frames)
        self.shifts.append(shift)
        self.temperatures.append(temperature)
        self.generated_noise.append(generated_noise)
        self.contexts.append(np.array(context_frames))
        self.context_actions.append(np.array(context_actions))
        return FakeSession(self, context_frames, context_actions, cache_mode, seed)


def save_tiny_checkpoint(path: Path, resolution: int = 32, seed: int = 0) -> Path:
    """A random-weight checkpoint from the tiny presets, with the tiny maze as its simulator."""
    import dataclasses

    import torch

    from worldsim.autoencoder import AE_PRESETS, Autoencoder
    from worldsim.checkpoint import save_checkpoint
    from worldsim.model import FAR, PRESETS

    torch.manual_seed(seed)
    ae_cfg = dataclasses.replace(AE_PRESETS["tiny"], resolution=resolution)
    names = ("noop", "forward", "backward", "turn_left", "turn_right")
    far_cfg = dataclasses.replace(PRESETS["tiny"], num_actions=len(names), latent_channels=ae_cfg.latent_channels,
                                  latent_size=resolution // ae_cfg.down_factor)
    ae, far = Autoencoder(ae_cfg).eval(), FAR(far_cfg).eval()
    with torch.no_grad():  # open the zero-initialised (AdaLN-Zero, output) layers: else the
        for prm in far.parameters():  # velocity is 0 and frames ignore context, actions and sampler
            prm.add_(0.05 * torch.randn_like(prm))
    save_checkpoint(path, ae, far, action_names=names, resolution=(resolution, resolution),
                    sampler={"steps": 2, "cfg": 1.5, "context_noise": 0.0},
                    simulator={"id": MAZE_ID, "settings": dict(TINY_SIM_SETTINGS)})
    return path
