"""Time each sampling step of play's generation at a given frame (diagnostics).

    python scripts/time_play_steps.py [--cache-mode multilevel-fast] [--precision fp32 bf16] [--frames 480] [--timed 40]

Generates --frames random-action frames with the shipped checkpoint (not timed), then times
--timed more: prints, per sampling step, the median over the timed frames of the wall time of
`GenerationContext.velocity` (step 1 includes the cache update fused into it), the median time
per frame without decoding (`Session.step_latent`) and with it (`Session.step`, what play runs).
Several --precision values build one session each and time them in turns of 5 frames in the
same process, so the machine's drift (large on shared VMs) hits them alike. To compare two code
versions, run it twice (PYTHONPATH=...), alternating.
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
parser.add_argument("--precision", nargs="+", default=["fp32"], help="fp32, bf16 or auto; several are timed in turns")
parser.add_argument("--frames", type=int, default=480, help="frames generated before timing")
parser.add_argument("--timed", type=int, default=40, help="frames timed (half without decoding, half with)")
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()

torch.set_num_threads(args.threads)
turn = 5
timed = -(-args.timed // (2 * turn)) * 2 * turn  # whole turns, with and without decoding
actions = None
runs = []
for precision in args.precision:
    world = WorldModel.load(args.checkpoint, precision=precision)
    if actions is None:  # the same random actions for every session
        actions = np.random.default_rng(0).integers(0, len(world.action_names), args.frames + timed).tolist()
    session = world.new_session(np.zeros((4, 64, 64, 3), np.uint8), np.zeros(4, np.int64), seed=0,
                                cache_mode=args.cache_mode)
    for a in actions[: args.frames]:
        session.step_latent(a)
    velocity, step_times = session.context.velocity, []

    def timed_velocity(*a, velocity=velocity, step_times=step_times):
        start = time.perf_counter()
        out = velocity(*a)
        step_times.append(time.perf_counter() - start)
        return out

    session.context.velocity = timed_velocity
    runs.append({"label": f"{args.cache_mode} {world.precision}", "session": session, "steps": step_times,
                 "latent": [], "frame": []})

for start in range(args.frames, args.frames + timed, 2 * turn):
    for run in runs:
        for i, (key, fn) in enumerate((("latent", run["session"].step_latent), ("frame", run["session"].step))):
            t0 = time.perf_counter()
            for a in actions[start + i * turn : start + (i + 1) * turn]:
                fn(a)
            run[key].append((time.perf_counter() - t0) / turn * 1000)
for run in runs:
    frames = len(run["latent"]) * turn * 2
    steps = np.array(run["steps"]).reshape(frames, -1) * 1000
    print(f"{run['label']} at frame ~{args.frames + timed // 2}: per-step ms (median over frames) "
          f"{np.median(steps, 0).round(1).tolist()}, {np.median(run['latent']):.1f} ms per frame without decoding, "
          f"{np.median(run['frame']):.1f} with (medians over turns of {turn} frames)")
