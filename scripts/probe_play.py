"""Research probe: play as `play.py` plays it, each dream frame scored against the real simulator.

Not part of the product. `worldsim eval`'s play-like check (`--context 4 --generate 64`) starts
from the first frames of recorded navigator episodes and follows their actions. A game starts
otherwise: `worldsim/Dream-v0` makes its context from the simulator (a reset frame, then
`turn_left`, `--context` frames in all, after the checkpoint's `sampler.still_frames` copies of
the reset frame, or `--still-frames`), and the player walks where they like. This probe runs
Dream-v0 with `reality=True` on the maze seeds of a dataset's first episodes and gives every
checkpoint the same actions per maze: forward / turn_left / turn_right (0.5 / 0.25 / 0.25), each
held 1-4 steps, drawn from a generator seeded with 1000 + the maze's index. For each checkpoint it prints:
- mean PSNR against reality over all frames and by frame range (mean over mazes);
- sharpness and motion relative to reality (1 = as in reality);
- against the first checkpoint, the paired difference over mazes with a 95% bootstrap interval.

    python scripts/probe_play.py checkpoints/maze-far-small runs/NEW/checkpoint --data data/maze-val-nav --mazes 16

Session 23 measured with its throwaway predecessor, which drew the same actions: the seventh
version scored 12.83 at `--context 4` on the 16 mazes of `data/maze-val-nav`; the eighth (shipped
since session 24) scores 13.01 with the command above and `--split val` (session 27; bf16 on the
CPU, which `--precision auto` picks on a CPU that has it; the header says what ran).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from worldsim import metrics
from worldsim.checkpoint import CheckpointError
from worldsim.dataset import SPLITS, Dataset, DatasetError
from worldsim.dream_env import CheckpointNotFound, DreamEnv, SimulatorUnavailable
from worldsim.evaluate import _simulator_differences

RANGES = ((0, 1), (1, 16), (16, 32), (32, None))  # frame index ranges [lo, hi) of the columns; None: to the end
WALK = {"forward": 0.5, "turn_left": 0.25, "turn_right": 0.25}


def walk(action_names: tuple[str, ...] | list[str], frames: int, maze_index: int) -> list[int]:
    """The held random actions of one maze: the same for every checkpoint with these action names."""
    rng = np.random.default_rng(1000 + maze_index)
    names = list(WALK)
    actions: list[int] = []
    while len(actions) < frames:
        name = rng.choice(names, p=list(WALK.values()))
        actions += [list(action_names).index(str(name))] * int(rng.integers(1, 5))
    return actions[:frames]


def play(checkpoint: str, maze_seeds: list[int], context: int, frames: int, cache: str,
         precision: str, device: str | None, dataset_simulator: dict | None,
         still_frames: int | None = None) -> dict:
    """Per maze: PSNR per frame against reality; over all mazes: sharpness and motion ratios."""
    env = DreamEnv(checkpoint=checkpoint, context_frames=context, still_frames=still_frames, reality=True,
                   precision=precision, cache_mode=cache, device=device)
    try:
        return _play(env, checkpoint, maze_seeds, frames, dataset_simulator)
    finally:
        env.close()


def _play(env: DreamEnv, checkpoint: str, maze_seeds: list[int], frames: int, dataset_simulator: dict | None) -> dict:
    missing = [n for n in WALK if n not in env.action_names]
    if missing:
        raise SystemExit(f"{checkpoint}: the walk needs actions {missing}; the checkpoint has {env.action_names}")
    if differs := _simulator_differences(dataset_simulator, env.world.simulator):
        print(f"note: {checkpoint}: the dataset was recorded with other simulator settings ({differs}); "
              f"its maze seeds make other mazes here", flush=True)
    psnr, detail, change = [], ([], []), ([], [])
    for i, maze_seed in enumerate(maze_seeds):
        first, info = env.reset(seed=i, options={"maze_seed": int(maze_seed)})
        dream, real = [], []
        for action in walk(env.action_names, frames, i):
            obs, _, _, _, info = env.step(action)
            dream.append(obs)
            real.append(info["reality_frame"])
        dream_a, real_a = np.stack(dream), np.stack(real)
        psnr.append(metrics.psnr(dream_a, real_a))
        detail[0].append(metrics.detail(dream_a))
        detail[1].append(metrics.detail(real_a))
        change[0].append(metrics.frame_change(dream_a, first))
        change[1].append(metrics.frame_change(real_a, first))  # the same last context frame before both
    return {"psnr": psnr, "sharpness": metrics.ratio_to_truth(*detail), "motion": metrics.ratio_to_truth(*change),
            # the session's precision: --cache none under bf16-kv runs fp32 (it stores no cache)
            "ran": f"{env.world.device.type}, {info['precision']}", "still_frames": env.still_frames}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders; the first is the baseline of the differences")
    p.add_argument("--data", default="data/maze-val-nav", help="dataset whose episodes' maze seeds are played")
    p.add_argument("--split", default=None, choices=SPLITS, help="only this split of --data")
    p.add_argument("--mazes", type=int, default=16, help="how many of its first episodes' mazes")
    p.add_argument("--context", type=int, default=4, help="frames of the look-around a game starts from "
                   "(Dream-v0's context_frames; play's default is 4)")
    p.add_argument("--still-frames", type=int, default=None, help="copies of the reset frame before the "
                   "look-around (Dream-v0's still_frames; default: each checkpoint's sampler.still_frames)")
    p.add_argument("--frames", type=int, default=64, help="frames played after it")
    p.add_argument("--cache", default="multilevel-fast", help="cache mode (play's default: multilevel-fast)")
    p.add_argument("--precision", default="auto", help="transformer arithmetic on the CPU (play's default: auto, "
                   "bf16 where the CPU has it, else bf16-kv)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: as play, a GPU where there is one)")
    args = p.parse_args(argv)
    if args.mazes < 1 or args.context < 1 or args.frames < 1:
        p.error("--mazes, --context and --frames must be >= 1")
    if args.still_frames is not None and args.still_frames < 0:
        p.error("--still-frames must be >= 0")
    try:
        ds = Dataset(args.data, split=args.split)
    except (DatasetError, ValueError) as exc:
        p.error(str(exc))
    seeds = [info.maze_seed for info in ds.episodes[: args.mazes]]  # from the index: no frames loaded
    if not seeds:
        p.error(f"{args.data}: no episodes{f' in split {args.split}' if args.split else ''}")
    if any(s is None for s in seeds):
        p.error(f"{args.data}: its episodes carry no maze seeds (an index-less .npz?): nothing to rebuild the mazes from")
    if len(seeds) < args.mazes:
        print(f"note: {args.data} has {len(seeds)} episodes, fewer than --mazes {args.mazes}")

    results = []
    for ck in args.checkpoints:
        start = time.perf_counter()
        try:
            results.append(play(ck, seeds, args.context, args.frames, args.cache, args.precision, args.device,
                                ds.simulator, args.still_frames))
        except (CheckpointNotFound, CheckpointError, SimulatorUnavailable, ValueError) as exc:
            sys.exit(f"probe_play: {ck}: {str(exc).splitlines()[0]}")
        print(f"{ck}: {time.perf_counter() - start:.0f} s ({results[-1]['ran']}, {results[-1]['still_frames']} still frames)",
              flush=True)
    ranges = [(lo, args.frames if hi is None else min(hi, args.frames)) for lo, hi in RANGES if lo < args.frames]
    labels = [f"frame {lo + 1}" if hi - lo == 1 else f"frames {lo + 1}-{hi}" for lo, hi in ranges]
    print(f"\n{len(seeds)} mazes of {args.data}, context {args.context}, {args.frames} frames, "
          f"cache {args.cache}, {results[0]['ran']}; PSNR in dB against the simulator (mean over mazes)\n")
    print("| checkpoint | all frames | " + " | ".join(labels) + " | sharpness | motion |")
    print("|---|---|" + "---|" * len(labels) + "---|---|")
    for ck, r in zip(args.checkpoints, results):
        cells = [f"{np.mean([x.mean() for x in r['psnr']]):.2f}"]
        cells += [f"{np.mean([x[lo:hi].mean() for x in r['psnr']]):.2f}" for lo, hi in ranges]
        cells += ["n/a" if r[k] is None else f"{r[k]:.2f}" for k in ("sharpness", "motion")]
        print(f"| {ck} | " + " | ".join(cells) + " |")
    if len(results) > 1:
        print(f"\n| checkpoint - {args.checkpoints[0]} | dB | 95% interval | mazes ahead |\n|---|---|---|---|")
        for ck, r in zip(args.checkpoints[1:], results[1:]):
            g = metrics.paired_gap(r["psnr"], results[0]["psnr"], pooled=False)
            interval = "n/a" if g["ci_low"] is None else f"{g['ci_low']:+.2f} .. {g['ci_high']:+.2f}"
            print(f"| {ck} | {g['gap']:+.2f} | {interval} | {g['episodes_positive']} of {g['episodes']} |")


if __name__ == "__main__":
    main()
