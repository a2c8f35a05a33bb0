"""Time each sampling step of play's generation at a given frame (diagnostics).

    python scripts/time_play_steps.py [--cache-mode multilevel-fast] [--precision fp32 bf16] [--frames 480] [--timed 40]
    python scripts/time_play_steps.py --precision auto --shapes shipped 8x256 6x384   # sizes for the next training run

Generates --frames random-action frames with the shipped checkpoint (not timed), then times
--timed more: prints, per sampling step, the median over the timed frames of the wall time of
`GenerationContext.velocity` (step 1 includes the cache update fused into it after a
`step_latent`), the median time per frame without decoding (`Session.step_latent`) and with it
(`Session.step`, what play runs). With --threads 1 and a second core, `step` instead runs the cache
update in a pass of its own while that core decodes the frame (world.decode_alongside): the two
medians then differ by that pass and the decode's overlap, not by the decode alone.
Several --precision values build one session each and time them in turns of 5 frames in the
same process, so the machine's drift (large on shared VMs) hits them alike. To compare two code
versions, run it twice (PYTHONPATH=...), alternating.

--shapes DEPTHxWIDTH (or DEPTHxWIDTHxHEADS; default heads: width / 64) replaces the shipped
transformer by a randomly initialised one of that size, everything else (autoencoder, tokens,
window, sampler) kept: what a larger model would cost to play, before training it. Random weights
attend differently, but the work per frame is the same. "shipped" is the checkpoint's own.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from worldsim.checkpoint import CheckpointError, load_checkpoint
from worldsim.model import FAR
from worldsim.world import WorldModel

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1] if "\n\n" in __doc__ else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--checkpoint", default="checkpoints/maze-far-small")
parser.add_argument("--cache-mode", default="multilevel-fast")
parser.add_argument("--precision", nargs="+", default=["fp32"], help="fp32, bf16, bf16-kv or auto; several are timed in turns")
parser.add_argument("--frames", type=int, default=480, help="frames generated before timing")
parser.add_argument("--timed", type=int, default=40, help="frames timed (half without decoding, half with)")
parser.add_argument("--shapes", nargs="+", default=["shipped"],
                    help="transformer sizes DEPTHxWIDTH[xHEADS] with random weights, or 'shipped'")
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()


def load_world(precision: str, shape: str) -> WorldModel:
    try:
        ck = load_checkpoint(args.checkpoint, device="cpu")
    except CheckpointError as exc:
        raise SystemExit(f"time_play_steps: {exc}") from None
    far = ck.far
    if shape != "shipped":
        try:
            depth, width, *heads = (int(n) for n in shape.lower().split("x"))
        except ValueError:
            parser.error(f"--shapes: {shape!r} is not DEPTHxWIDTH[xHEADS] or 'shipped'")
        torch.manual_seed(0)
        far = FAR(dataclasses.replace(far.config, depth=depth, width=width, heads=heads[0] if heads else width // 64))
        with torch.no_grad():  # AdaLN-Zero starts every block as the identity: give the blocks weights to run
            for p in far.parameters():
                if not p.abs().sum():
                    p.normal_(0, 0.02)
    return WorldModel(ck.autoencoder, far, ck.action_names, ck.resolution, ck.simulator, ck.sampler,
                      device="cpu", precision=precision)


torch.set_num_threads(args.threads)
turn = 5
timed = -(-args.timed // (2 * turn)) * 2 * turn  # whole turns, with and without decoding
actions = None
runs = []
for shape, precision in [(shape, precision) for shape in args.shapes for precision in args.precision]:
    world = load_world(precision, shape)
    if actions is None:  # the same random actions for every session
        actions = np.random.default_rng(0).integers(0, len(world.action_names), args.frames + timed).tolist()
    session = world.new_session(np.zeros((4, *world.resolution, 3), np.uint8), np.zeros(4, np.int64), seed=0,
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
    params = sum(p.numel() for p in world.far.parameters()) / 1e6
    label = f"{shape} ({world.far.config.depth}x{world.far.config.width}, {params:.1f}M) {args.cache_mode} {world.precision}"
    runs.append({"label": label, "session": session, "steps": step_times,
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
