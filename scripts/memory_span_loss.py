"""How the transformer's next-frame loss depends on where (and how much) long-term memory it sees.

For each episode and each end frame T, the last frame of frames 0..T-1 is noised to fixed levels
and its velocity predicted by the uncached long-short forward (the training path: the last W
frames fine, the older ones coarse), with the window clean, as at inference. The same frames and
noise are scored under each memory span (FARConfig.memory_span: 0 = frame indices) and with only
the last N frames given (`--bound`: the window and N - W frames of memory), so the differences are
paired. Lower is better.

Session 29 ran it on the 16 val mazes to ask whether the long memory's RoPE distances (up to 284
frames in the eval, against at most 95 in training) are what lowers teacher forcing:

    PYTHONPATH=. python scripts/memory_span_loss.py --data data/maze-val --split val --spans 0 63 80 95 127 160 --bound 64

Prints the mean MSE per (T, setting) and each setting's paired difference to the first --spans value.
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from worldsim.dataset import Dataset
from worldsim.world import WorldModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/maze-far-small", help="checkpoint folder")
    parser.add_argument("--data", default="data/maze-val", help="dataset folder")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"), help="episodes of this split")
    parser.add_argument("--episodes", type=int, default=16, help="episodes (the first ones of the split)")
    parser.add_argument("--ends", type=int, nargs="+", default=[64, 150, 300], help="end frames T")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="noise levels t")
    parser.add_argument("--spans", type=int, nargs="+", default=[0, 95], help="memory spans (0: frame indices)")
    parser.add_argument("--bound", type=int, default=0,
                        help="also: only the last N frames, window included (0: skip; else more than the window)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    for name, low in (("episodes", 1), ("threads", 1), ("bound", 0)):
        if getattr(args, name) < low:
            parser.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if min(args.ends) < 2:
        parser.error(f"--ends must be >= 2 frames (a context and the frame predicted), got {min(args.ends)}")
    torch.set_num_threads(args.threads)

    try:
        world = WorldModel.load(args.checkpoint, device="cpu")
        ds = Dataset(args.data, split=args.split)
    except (OSError, ValueError) as exc:  # CheckpointError and DatasetError are ValueErrors
        parser.error(str(exc))
    far, own = world.far, world.far.config
    W = own.window
    if args.bound and args.bound <= W:
        parser.error(f"--bound must be more than the window ({W} frames), got {args.bound}")
    for span in args.spans:
        try:
            dataclasses.replace(own, memory_span=span)
        except ValueError as exc:
            parser.error(f"--spans: {exc}")
    if args.episodes > len(ds):
        parser.error(f"{args.data} has {len(ds)} {args.split} episodes, not {args.episodes}")
    settings = [f"span {s}" for s in args.spans] + ([f"last {args.bound}"] if args.bound else [])
    losses: dict[tuple[int, str], list[float]] = {}
    g = torch.Generator().manual_seed(0)
    for e in range(args.episodes):
        ep = ds[e]
        z = world.encode(ep.video)[None]  # (1, T, C, h, w)
        a = torch.as_tensor(ep.actions)[None]
        for T in args.ends:
            if T > z.shape[1]:
                parser.error(f"episode {ep.id} has {z.shape[1]} frames, fewer than --ends {T}")
            for level in args.levels:
                noise = torch.randn(z.shape[2:], generator=g)
                x0 = z[0, T - 1]
                target = noise - x0
                lat = z[:, :T].clone()
                lat[0, -1] = level * noise + (1 - level) * x0
                t = torch.full((1, T), -1.0)
                t[0, -1] = level
                for name in settings:
                    kind, n = name.split()
                    lo = max(0, T - int(n)) if kind == "last" else 0
                    far.config = dataclasses.replace(own, memory_span=int(n) if kind == "span" else 0)
                    with torch.no_grad():
                        v = far(lat[:, lo:], t[:, lo:], a[:, lo:T], time_offset=lo)[0, -1]
                    losses.setdefault((T, name), []).append(float(((v - target) ** 2).mean()))
        print(f"episode {e + 1}/{args.episodes} done", flush=True)
    far.config = own
    for T in args.ends:
        base = np.array(losses[(T, settings[0])])
        for name in settings:
            d = np.array(losses[(T, name)]) - base
            print(f"T={T:4d} {name:10s} mse {np.mean(losses[(T, name)]):.4f}  vs {settings[0]} {d.mean():+.4f} "
                  f"(lower in {(d < 0).sum()} of {len(d)})")


if __name__ == "__main__":
    main()
