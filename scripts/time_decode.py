"""Time play's frame decoding on CPU: WorldModel.decode (channels-last decoder) against the plain
NCHW autoencoder, in turns in one process, inside a played session (diagnostics).

    python scripts/time_decode.py [--frames 480] [--timed 100] [--threads 2]

Plays --frames random-action frames with play's defaults (not timed), then --timed more, each
decoded both ways in alternating order: prints the median milliseconds per frame of each decode and
of the whole frame (sampling + the decode), and the largest difference between the two decodes'
uint8 frames (and how many values differ). The machine's drift (large on shared VMs) hits both alike.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from worldsim.autoencoder import Autoencoder, tensor_to_frames
from worldsim.checkpoint import CheckpointError
from worldsim.world import WorldModel

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1] if "\n\n" in __doc__ else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--checkpoint", default="checkpoints/maze-far-small")
parser.add_argument("--precision", default="auto")
parser.add_argument("--frames", type=int, default=480, help="frames played before timing")
parser.add_argument("--timed", type=int, default=100, help="frames timed")
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()

torch.set_num_threads(args.threads)
try:
    # on the CPU always: the plain decoder below is a CPU module, and the layouts timed are the CPU's
    # (on a GPU machine the default device would put the world on CUDA and the plain decode would fail)
    world = WorldModel.load(args.checkpoint, device="cpu", precision=args.precision)
except CheckpointError as exc:
    raise SystemExit(f"time_decode: {exc}") from None
plain = Autoencoder(world.autoencoder.config).eval()  # the NCHW layout WorldModel used before
plain.load_state_dict({k: v.contiguous() for k, v in world.autoencoder.state_dict().items()})


@torch.inference_mode()
def decode_plain(z: torch.Tensor) -> np.ndarray:
    return tensor_to_frames(plain.decode(z))


session = world.new_session(np.zeros((4, *world.resolution, 3), np.uint8), np.zeros(4, np.int64), seed=0,
                            cache_mode="multilevel-fast")  # play's default
actions = np.random.default_rng(0).integers(0, len(world.action_names), args.frames + args.timed).tolist()
for a in actions[: args.frames]:
    session.step_latent(a)
times = {"channels-last": [], "plain": []}
sample_ms, worst, differing, values = [], 0, 0, 0
for i, a in enumerate(actions[args.frames :]):
    t0 = time.perf_counter()
    z = session.step_latent(a)
    sample_ms.append((time.perf_counter() - t0) * 1000)
    outs = {}
    order = ("channels-last", "plain") if i % 2 else ("plain", "channels-last")
    for name in order:
        t0 = time.perf_counter()
        outs[name] = world.decode(z[None])[0] if name == "channels-last" else decode_plain(z[None])[0]
        times[name].append((time.perf_counter() - t0) * 1000)
    worst = max(worst, int(np.abs(outs["plain"].astype(int) - outs["channels-last"]).max()))
    differing += int((outs["plain"] != outs["channels-last"]).sum())
    values += outs["plain"].size
s = np.median(sample_ms)
print(f"{world.precision} transformer, frame ~{args.frames + args.timed // 2}: sampling {s:.1f} ms per frame (median)")
for name, ts in times.items():
    d = np.median(ts)
    print(f"  decode {name}: {d:.1f} ms (median), frame {s + d:.1f} ms -> {1000 / (s + d):.1f} fps")
print(f"  largest uint8 difference between the two decodes: {worst}, in {differing} of {values} values")
