"""How much a dataset's training samples could teach memory: the fraction of window frames that
revisit a place seen only in the sample's long-term (coarse) part.

Draws random samples roughly as `train --obj-random-context-length true` does (L ~ U[W+1, seq-len]
consecutive frames; here from a uniformly chosen episode and start, an approximation of the
trainer's uniform choice of windows), and applies `worldsim eval`'s revisit rule (pose within 0.5
cell and 30 degrees) between each of the last W frames and the sample's older frames. Needs poses.

    python scripts/revisit_fraction.py data/maze-train-240 --seq-len 96
"""
from __future__ import annotations

import argparse

import numpy as np

from worldsim import metrics
from worldsim.dataset import Dataset, DatasetError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="dataset folder")
    ap.add_argument("--split", default="train")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[64, 96, 288], help="longest sample(s)")
    ap.add_argument("--window", type=int, default=16, help="the model's short window W")
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.window < 1 or args.samples < 1 or min(args.seq_len) < 1:
        ap.error("--window, --samples and --seq-len must be >= 1")

    try:
        ds = Dataset(args.data, split=args.split)
        first = ds[0] if len(ds) else None
    except DatasetError as exc:
        raise SystemExit(f"revisit_fraction: {exc}") from None
    if first is None or first.poses is None:
        raise SystemExit(f"{args.data}: no {args.split} episodes with poses "
                         "(a dataset recorded with --split val or test: pass the same --split here)")
    rng = np.random.default_rng(args.seed)
    W = args.window
    try:
        episodes = [ds.load(e).poses for e in ds.episodes if e.length > W]
    except DatasetError as exc:
        raise SystemExit(f"revisit_fraction: {exc}") from None
    if not episodes:
        raise SystemExit(f"{args.data}: no episode is longer than the window ({W} frames)")
    for longest in args.seq_len:
        if longest <= W:
            print(f"samples of up to {longest} frames: no long-term part (window {W})")
            continue
        fractions = []
        for _ in range(args.samples):
            poses = episodes[int(rng.integers(len(episodes)))]
            L = int(rng.integers(W + 1, min(longest, len(poses)) + 1))
            start = int(rng.integers(0, len(poses) - L + 1))
            sample = poses[start:start + L]
            old, window = sample[:L - W], sample[L - W:]
            hits = metrics.pose_match(window, old, metrics.REVISIT_DISTANCE_CELLS, metrics.REVISIT_YAW_DEGREES)
            fractions.append(hits.any(axis=1).mean())
        print(f"samples of {W + 1}..{longest} frames: {np.mean(fractions):.3f} of window frames revisit the long-term part")


if __name__ == "__main__":
    main()
