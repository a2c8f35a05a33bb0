"""Time each sampling step of play's generation at a given frame (throwaway-grade diagnostics).

    python scripts/time_play_steps.py [--cache-mode multilevel-fast] [--precision fp32] [--frames 480] [--timed 40]

Generates --frames random-action frames with the shipped checkpoint (not timed), then times
--timed more: prints, per sampling step, the median over the timed frames of the wall time of
`GenerationContext.velocity` (step 1 includes the cache update fused into it), and the mean
time per frame without decoding. Run it twice with two code versions (PYTHONPATH=...) to
compare them on one machine; this machine's speed drifts, so alternate the versions.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from worldsim.world import WorldModel

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--checkpoint", default="checkpoints/maze-far-small")
parser.add_argument("--cache-mode", default="multilevel-fast")
parser.add_argument("--precision", default="fp32", help="fp32, bf16 or auto (WorldModel precision)")
parser.add_argument("--frames", type=int, default=480, help="frames generated before timing")
parser.add_argument("--timed", type=int, default=40, help="frames timed")
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()

torch.set_num_threads(args.threads)
world = WorldModel.load(args.checkpoint, precision=args.precision)
rng = np.random.default_rng(0)
session = world.new_session(np.zeros((4, 64, 64, 3), np.uint8), np.zeros(4, np.int64), seed=0,
                            cache_mode=args.cache_mode)
for _ in range(args.frames):
    session.step_latent(int(rng.integers(len(world.action_names))))
velocity, times = session.context.velocity, []


def timed_velocity(*a):
    start = time.perf_counter()
    out = velocity(*a)
    times.append(time.perf_counter() - start)
    return out


session.context.velocity = timed_velocity
start = time.perf_counter()
for _ in range(args.timed):
    session.step_latent(int(rng.integers(len(world.action_names))))
per_frame = (time.perf_counter() - start) / args.timed
steps = np.array(times).reshape(args.timed, -1) * 1000
print(f"{args.cache_mode} {world.precision} at frame ~{args.frames + args.timed // 2}: per-step ms (median over frames) "
      f"{np.median(steps, 0).round(1).tolist()}, {per_frame * 1000:.1f} ms per frame without decoding")
