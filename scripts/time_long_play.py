"""Time generation deep into a long session, with and without a bound on the long-term memory.

    python scripts/time_long_play.py                          # 500 / 2,000 / 4,000 frames, 4,000 and 8,000 bounded
    python scripts/time_long_play.py --cases 3000:0 3000:1000 --timed 50

Each case N:B starts a session of the checkpoint (play's cache and precision by default) with N
random latent frames of context (about what a session holds after N played frames, without playing
them; bounded, they enter L2 in chunks of at most B frames), bounds its L2 to B frames (0: keep
every frame), generates 3 untimed frames, then times
--timed generated frames (decoded, as play shows them). Prints milliseconds and frames per second,
CPU milliseconds, the frames in L2 and the cache's megabytes.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from worldsim.checkpoint import CheckpointError
from worldsim.world import WorldModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/maze-far-small", help="default: %(default)s")
    ap.add_argument("--cases", nargs="+", default=["500:0", "2000:0", "4000:0", "4000:2000", "8000:2000"],
                    metavar="FRAMES:BOUND", help="context frames and L2 bound (0: none); default: %(default)s")
    ap.add_argument("--cache-mode", default="multilevel-fast", help="default: %(default)s (play's)")
    ap.add_argument("--precision", default="auto", help="default: %(default)s (play's)")
    ap.add_argument("--timed", type=int, default=30, help="generated frames timed per case; default: %(default)s")
    args = ap.parse_args()
    cases = []
    for case in args.cases:
        try:
            total, bound = (int(v) for v in case.split(":"))
        except ValueError:
            ap.error(f"--cases takes FRAMES:BOUND pairs of whole numbers (BOUND 0: none), got {case!r}")
        if total < 0 or bound < 0:
            ap.error(f"--cases: FRAMES and BOUND must be >= 0, got {case!r}")
        cases.append((total, bound))
    try:
        world = WorldModel.load(args.checkpoint, precision=args.precision)
    except CheckpointError as exc:
        raise SystemExit(f"time_long_play: {exc}") from None
    fc = world.far.config
    rng = np.random.default_rng(0)
    for total, bound in cases:
        session = world.new_session(np.zeros((0, *world.resolution, 3), np.uint8), np.zeros(0, np.int64),
                                    cache_mode=args.cache_mode, seed=0, memory_frames=bound or None)
        session.extend_latents(torch.randn(total, fc.latent_channels, fc.latent_size, fc.latent_size),
                               torch.as_tensor(rng.integers(0, len(world.action_names), total)))
        for _ in range(3):
            session.step(1)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.timed):
            session.step(int(rng.integers(0, len(world.action_names))))
        wall, cpu = (time.perf_counter() - t0) / args.timed, (time.process_time() - c0) / args.timed
        stats = session.stats()
        print(f"{total} frames, bound {bound or 'none'}: {wall * 1000:.1f} ms/frame ({1 / wall:.1f} fps), "
              f"CPU {cpu * 1000:.1f} ms, L2 {stats['l2_frames']} frames, cache {stats['cache_bytes'] / 2**20:.0f} MB "
              f"({world.precision}, {args.cache_mode}, {torch.get_num_threads()} threads)", flush=True)


if __name__ == "__main__":
    main()
