"""A tiny random-weight world-model checkpoint for the Dream env and `worldsim play` tests.

Random weights are enough here: the tests check plumbing (shapes, determinism, the cache
growing, videos written), not what the frames look like. Also usable for benchmarks with the
"small" preset: `python -m tests._tiny_world OUT_DIR --preset small`.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

MAZE = {"id": "worldsim/Maze-v0", "settings": {"resolution": [64, 64], "maze_size": [9, 9], "max_steps": None}}
ACTIONS = ("noop", "forward", "backward", "turn_left", "turn_right")


def make_checkpoint(path: str | Path, preset: str = "tiny", steps: int = 2, seed: int = 0,
                    simulator: dict | None = None) -> Path:
    """Save a random-weight checkpoint of `preset` (AE + FAR) at `path`; returns the folder."""
    from worldsim.autoencoder import AE_PRESETS, Autoencoder
    from worldsim.checkpoint import save_checkpoint
    from worldsim.model import FAR, PRESETS

    torch.manual_seed(seed)
    ae_cfg = AE_PRESETS[preset]
    far_cfg = dataclasses.replace(PRESETS[preset], num_actions=len(ACTIONS),
                                  latent_channels=ae_cfg.latent_channels,
                                  latent_size=ae_cfg.resolution // ae_cfg.down_factor)
    autoencoder, far = Autoencoder(ae_cfg).eval(), FAR(far_cfg).eval()
    with torch.no_grad():  # open the zero-initialised (AdaLN-Zero, output) layers: else the
        for prm in far.parameters():  # velocity is 0 and frames ignore context, actions and sampler
            prm.add_(0.05 * torch.randn_like(prm))
    sampler = {"steps": steps} if steps is not None else None
    return save_checkpoint(path, autoencoder, far, action_names=ACTIONS, resolution=(ae_cfg.resolution,) * 2,
                           sampler=sampler, simulator=simulator or MAZE,
                           data_summary={"note": "random weights (tests)"}, step=0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint default)")
    a = parser.parse_args()
    print(make_checkpoint(a.out, a.preset, steps=a.steps))
