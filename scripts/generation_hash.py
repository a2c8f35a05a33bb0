"""Fingerprints of a checkpoint's generated frames: run it with two checkouts to show that a refactor
left generation bit-identical.

    python scripts/generation_hash.py                     # this checkout
    PYTHONPATH=/tmp/old python scripts/generation_hash.py # another (a `git clone` at the old commit)

For four settings (fp32 exact multi-level cache; bf16 and bf16-kv multilevel-fast, play's with and
without native bf16; fp32 sliding window at CFG 1.5) it generates `--generate` frames of a recorded
episode after `--context` of its frames, with a fixed seed, and prints the first 16 hex digits of the sha256 of the uint8 frames.
Compare runs with the same cores: at one torch thread with a second core, Session.step flushes each
frame into the cache on its own pass while that core decodes it (world.decode_alongside), where on
one core the cache update shares the next frame's first pass, so the three multi-level settings'
frames differ in float rounding (`taskset -c 0` prints the hashes of one core).
"""
from __future__ import annotations

import argparse
import hashlib

import numpy as np
import torch

import worldsim
from worldsim.dataset import Dataset
from worldsim.world import WorldModel

SETTINGS = (("fp32", "multilevel", None), ("bf16", "multilevel-fast", None), ("bf16-kv", "multilevel-fast", None),
            ("fp32", "sliding", 1.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/maze-far-small")
    parser.add_argument("--data", default="data/maze-test")
    parser.add_argument("--episode", type=int, default=1)
    parser.add_argument("--context", type=int, default=40)
    parser.add_argument("--generate", type=int, default=12)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # thread counts can change float sums: compare at one
    print(f"worldsim from {worldsim.__file__}")
    episode = Dataset(args.data)[args.episode]
    K, G = args.context, args.generate
    for precision, mode, cfg in SETTINGS:
        world = WorldModel.load(args.checkpoint, precision=precision)
        session = world.new_session(episode.video[:K], episode.actions[:K], cache_mode=mode, seed=args.seed, cfg=cfg)
        frames = np.stack([session.step(int(a)) for a in episode.actions[K:K + G]])
        print(f"{precision} {mode}{f' cfg {cfg:g}' if cfg else ''}: {hashlib.sha256(frames.tobytes()).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
