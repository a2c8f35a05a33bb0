"""Time Session.step serial against decoding alongside (world.decode_alongside), in one process.

    python scripts/time_decode_alongside.py [--turns 10] [--precision bf16-kv] [--frames 480]
    python -c "while True: pass" & python scripts/time_decode_alongside.py; kill %1   # beside a busy core

With one torch thread, play's settings (multilevel-fast, memory 300) and the shipped checkpoint, it
generates --frames frames (not timed), then plays --turns turns of 30 frames each way, forked from
the same session: serial (the decode on this thread, the cache update fused into the next frame's
first pass) and alongside (the decode on the second core while this thread flushes the frame into
the cache). The turns take the machine's drift (large on shared VMs) alike. Prints per way the wall
and process CPU ms a frame of every turn and their medians, and for the alongside decodes their wall
time over their thread's CPU time (about 1 where the second core is free, more where the decoder
waits for it: another program busy there).
"""
from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import torch

import worldsim.world as world_module
from worldsim.checkpoint import CheckpointError, load_checkpoint

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--checkpoint", default="checkpoints/maze-far-small")
parser.add_argument("--precision", default="bf16-kv", help="fp32, bf16, bf16-kv or auto")
parser.add_argument("--frames", type=int, default=480, help="frames generated before timing")
parser.add_argument("--turns", type=int, default=10, help="turns of 30 frames each way")
args = parser.parse_args()

torch.set_num_threads(1)
try:
    ck = load_checkpoint(args.checkpoint, device="cpu")
except CheckpointError as exc:
    raise SystemExit(f"time_decode_alongside: {exc}") from None
world = world_module.WorldModel(ck.autoencoder, ck.far, ck.action_names, ck.resolution, ck.simulator, ck.sampler,
                                device="cpu", precision=args.precision)
if world_module.decode_alongside(world.device) is None:
    raise SystemExit("time_decode_alongside: no second core for this process (or not one torch thread): nothing to compare")
actions = np.random.default_rng(0).integers(0, len(world.action_names), args.frames + 30).tolist()
start = world.new_session(np.zeros((4, *world.resolution, 3), np.uint8), np.zeros(4, np.int64), seed=0,
                          cache_mode="multilevel-fast", memory_frames=300)
for a in actions[: args.frames]:
    start.step_latent(a)

stretches = []
decode = world.decode


def timed_decode(latents):
    wall, cpu = time.perf_counter(), time.thread_time()
    frames = decode(latents)
    if threading.current_thread() is not threading.main_thread():  # the alongside decodes
        stretches.append((time.perf_counter() - wall) / max(time.thread_time() - cpu, 1e-6))
    return frames


world.decode = timed_decode
alongside = world_module.decode_alongside
wall: dict[str, list[float]] = {"serial": [], "alongside": []}
cpu: dict[str, list[float]] = {"serial": [], "alongside": []}
for _ in range(args.turns):
    for way in wall:
        world_module.decode_alongside = alongside if way == "alongside" else (lambda device: None)
        session = start.fork()
        w, c = time.perf_counter(), time.process_time()
        for a in actions[args.frames :]:
            session.step(a)
        wall[way].append((time.perf_counter() - w) / 30 * 1e3)
        cpu[way].append((time.process_time() - c) / 30 * 1e3)
label = f"{args.precision} multilevel-fast at frame ~{args.frames + 15}"
for way in wall:
    print(f"{way:>9} ({label}): ms a frame {' '.join(f'{x:.1f}' for x in wall[way])}, median {np.median(wall[way]):.1f}; "
          f"CPU ms a frame median {np.median(cpu[way]):.1f}")
ahead = sum(a < s for a, s in zip(wall["alongside"], wall["serial"]))
print(f"alongside ahead in {ahead} of {args.turns} turns; median ratio serial / alongside "
      f"{np.median(np.array(wall['serial']) / np.array(wall['alongside'])):.2f}")
r = np.array(stretches)
print(f"alongside decodes: wall / thread CPU time median {np.median(r):.2f} (p10 {np.percentile(r, 10):.2f}, "
      f"p90 {np.percentile(r, 90):.2f})")
