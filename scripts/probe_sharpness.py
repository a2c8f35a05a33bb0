"""Research probe: does the 360-degree-turn score reward blur or a view that does not turn?

Not part of the product. `worldsim eval`'s turn probe scores generated frames against the model's
own earlier view of the same place, with no ground truth, so a model that smears every view
could score well, and so could one that barely turns. This replays that probe (the simulator's reset frame + noops as context, then
`turn_left` for two full turns, maze seeds of the first test episodes, session seed = index) and
reports beside its score three things the probe does not see:

  sharpness   mean gradient magnitude of the generated frames / that of the simulator's frames
              along the same turn (1 = as sharp as reality; below 1 = smoother)
  motion      mean absolute change between consecutive generated frames / the same for the
              simulator's frames (below 1 = the view turns less than it should; 0 = a still image,
              which the probe would score as perfectly consistent)
  vs reality  PSNR of the generated frames against the simulator's frames

    python scripts/probe_sharpness.py checkpoints/maze-far-small runs/s15/w40/checkpoint --episodes 4

`worldsim eval` now reports sharpness and motion for its own probes and conditions too (session
19); this script stays the quick way to line several checkpoints up on the same turns.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from worldsim import metrics
from worldsim.checkpoint import CheckpointError
from worldsim.dataset import Dataset, DatasetError
from worldsim.evaluate import _probe_paths, _simulator_spec, _turn_step, make_simulator, probe_pairs
from worldsim.world import WorldModel


def gradient_energy(frames: np.ndarray) -> float:
    """Mean detail of uint8 frames [N, H, W, 3] (metrics.detail, the eval's sharpness numerator)."""
    return float(metrics.detail(frames).mean())


def probe(checkpoint: str, maze_seeds: list[int], context: int, cache: str, precision: str) -> dict[str, float]:
    world = WorldModel.load(checkpoint, device="cpu", precision=precision)
    spec = _simulator_spec(world)
    sim = make_simulator(spec)
    if sim is None:
        raise SystemExit(f"{checkpoint}: its simulator cannot be started here")
    turn = _turn_step(spec, sim)
    acts = _probe_paths(world.action_names, turn, 0, 2, with_forward=False)["turn_360"]
    noop = world.action_names.index("noop")
    move = float(getattr(sim.unwrapped, "move_step", 0.15))
    self_psnr, real_psnr, sharp_gen, sharp_real, motion_gen, motion_real = [], [], [], [], [], []
    for i, maze_seed in enumerate(maze_seeds):
        obs, info = sim.reset(seed=i, options={"maze_seed": maze_seed})
        frames, poses = [np.asarray(obs)], [np.asarray(info["pose"], np.float64)[:3]]
        for a in [noop] * (context - 1) + list(acts):
            obs, _, _, _, info = sim.step(a)
            frames.append(np.asarray(obs))
            poses.append(np.asarray(info["pose"], np.float64)[:3])
        real = np.stack(frames)
        session = world.new_session(real[:context], np.full(context, noop, np.int64), cache_mode=cache, seed=i)
        gen = np.stack([session.step(int(a)) for a in acts])
        both = np.concatenate([real[:context], gen])
        pairs = probe_pairs(np.stack(poses), context, 0.5 * move, 0.5 * turn)
        self_psnr.append(metrics.psnr(both[[t for t, _ in pairs]], both[[s for _, s in pairs]]))
        real_psnr.append(metrics.psnr(gen, real[context:]))
        sharp_gen.append(gradient_energy(gen))
        sharp_real.append(gradient_energy(real[context:]))
        motion_gen.append(metrics.frame_change(gen, real[context - 1]).mean())  # the eval's motion numerator
        motion_real.append(metrics.frame_change(real[context:], real[context - 1]).mean())
    sim.close()
    return {"self-consistency PSNR": float(np.concatenate(self_psnr).mean()),
            "PSNR vs reality": float(np.concatenate(real_psnr).mean()),
            "sharpness (generated / real)": float(np.sum(sharp_gen) / np.sum(sharp_real)),
            "motion (generated / real)": float(np.sum(motion_gen) / np.sum(motion_real))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("checkpoints", nargs="+", help="exported checkpoint folders")
    parser.add_argument("--data", default="data/maze-test", help="test split whose first maze seeds to use")
    parser.add_argument("--episodes", type=int, default=4, help="probes per checkpoint (eval's --probe-episodes)")
    parser.add_argument("--context", type=int, default=4, help="simulator frames given as context")
    parser.add_argument("--cache", default="multilevel-fast", help="cache mode (play's default: multilevel-fast)")
    parser.add_argument("--precision", default="bf16", help="fp32, bf16 (play's default on CPUs with native bf16) "
                        "or bf16-kv (elsewhere)")
    args = parser.parse_args()
    try:
        chosen = Dataset(Path(args.data)).episodes[: args.episodes]
    except DatasetError as exc:
        raise SystemExit(f"probe_sharpness: {exc}") from None
    seeds = [ep.maze_seed for ep in chosen]
    splits = "/".join(sorted({ep.split or "unsplit" for ep in chosen}))  # e.g. val with data/maze-val-nav
    print(f"360-degree turn x 2, {len(seeds)} {splits} mazes {seeds} of {args.data}, cache {args.cache}, "
          f"precision {args.precision}")
    for ck in args.checkpoints:
        try:
            row = probe(ck, seeds, args.context, args.cache, args.precision)
        except CheckpointError as exc:
            raise SystemExit(f"probe_sharpness: {exc}") from None
        print(f"{ck}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
