"""A checkpoint's cached generation against uncached recomputation, on a real recorded context.

    python scripts/cache_vs_uncached.py [--checkpoint checkpoints/maze-far-small] [--data data/maze-test]
                                        [--context 24] [--generate 6] [--device cpu]

Generates the same frames (same seed, the episode's actions) with cache_mode "none" (every frame
recomputed from scratch), "multilevel" (exact: must agree up to float rounding, DESIGN.md) and
"multilevel-fast" (play's approximation: the window's keys are kept when it slides), at CFG 1 and
1.5, and prints the largest latent difference from "none". The tests check the same agreement on a
small random model (tests/test_cache.py); this checks the weights a user plays.
"""
from __future__ import annotations

import argparse

import torch

from worldsim.dataset import Dataset
from worldsim.world import WorldModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/maze-far-small")
    parser.add_argument("--data", default="data/maze-test")
    parser.add_argument("--episode", type=int, default=0)
    parser.add_argument("--context", type=int, default=24, help="context frames (more than the window puts some in L2)")
    parser.add_argument("--generate", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="default: cpu, fp32, where the caches must agree to float "
                        "rounding; a GPU runs the transformer under bf16 autocast, whose rounding is far larger")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = WorldModel.load(args.checkpoint, device=args.device)
    episode = Dataset(args.data)[args.episode]
    K, G = args.context, args.generate
    if K + G > len(episode.actions):
        parser.error(f"--context + --generate = {K + G} frames, the episode has {len(episode.actions)}")
    for cfg in (1.0, 1.5):
        latents = {}
        for mode in ("none", "multilevel", "multilevel-fast"):
            session = world.new_session(episode.video[:K], episode.actions[:K], cache_mode=mode, cfg=cfg, seed=0)
            latents[mode] = torch.stack([session.step_latent(int(a)) for a in episode.actions[K:K + G]])
        for mode in ("multilevel", "multilevel-fast"):
            diff = (latents[mode] - latents["none"]).abs().max().item()
            print(f"cfg {cfg}: {mode} against none, largest latent difference over {G} frames: {diff:.2g}")


if __name__ == "__main__":
    main()
