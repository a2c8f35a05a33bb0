"""Research probe: free-running rollouts on test episodes under inference-time variants.

Not part of the product; it measures ideas before they earn a place in the sampler or the cache.
Each test episode: the first K ground-truth frames as context, then G frames generated from the
recorded actions (session seed = episode index, as `worldsim eval --seed 0`), scored by PSNR
against the ground truth, split into revisit frames and the rest with `worldsim eval`'s rule.

Variants (one per run):
  --history-guidance W   velocity = v_sliding + W * (v_multilevel - v_sliding): two caches fed
                         the same frames; W = 1 is the plain long-context model, W > 1 leans on
                         the long-term memory (history guidance), at twice the cost per frame
  --roundtrip            append decode(encode(frame)) to the context instead of the generated latent
  --context-noise S      noise the appended context latents by S (the checkpoint's sampler option)

Options that combine with any variant:
  --teacher-forced       predict each frame from the ground-truth past instead of rolling out
  --other-memory         the context frames already in L2 when generation starts come from the
                         next test episode (another maze), as `worldsim eval`'s memory control

    python scripts/probe_rollout.py --episodes 12 --history-guidance 2.0 --save runs/probe-hg2.npz
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from worldsim import metrics
from worldsim.cache import GenerationContext, make_context
from worldsim.dataset import Dataset, atomic_write
from worldsim.evaluate import memory_donor, resolve_checkpoint, with_other_memory
from worldsim.world import WorldModel


class HistoryGuidedContext(GenerationContext):
    """A multilevel and a sliding cache over the same frames, velocities extrapolated.
    Enough of a GenerationContext for Session.step/predict/append (no fork, no stats)."""

    def __init__(self, far, weight: float):
        super().__init__(far)
        self.long, self.short, self.weight = make_context(far, "multilevel"), make_context(far, "sliding"), weight

    @property
    def num_frames(self) -> int:
        return self.long.num_frames

    def extend(self, latents, actions, aug=None) -> None:
        self.long.extend(latents, actions, aug)
        self.short.extend(latents, actions, aug)

    def velocity(self, x_t, t, action):
        v_long = self.long.velocity(x_t, t, action).float()
        if self.weight == 1.0:
            return v_long
        v_short = self.short.velocity(x_t, t, action).float()
        return v_short + self.weight * (v_long - v_short)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: the shipped one")
    ap.add_argument("--data", default="data/maze-test", help="dataset with a test split")
    ap.add_argument("--episodes", type=int, default=12)
    ap.add_argument("--context", type=int, default=144)
    ap.add_argument("--generate", type=int, default=156)
    ap.add_argument("--threads", type=int, default=1)
    variant = ap.add_mutually_exclusive_group()
    variant.add_argument("--history-guidance", type=float, default=None, metavar="W")
    variant.add_argument("--roundtrip", action="store_true")
    variant.add_argument("--context-noise", type=float, default=None, metavar="S")
    ap.add_argument("--teacher-forced", action="store_true")
    ap.add_argument("--other-memory", action="store_true")
    ap.add_argument("--save", default=None, help="write per-frame PSNR and revisit masks (.npz)")
    args = ap.parse_args()
    if args.teacher_forced and args.roundtrip:
        ap.error("--roundtrip changes what a rollout appends; teacher forcing appends the ground truth")
    save = None
    if args.save:  # checked now, not after the whole probe
        save = Path(args.save if args.save.endswith(".npz") else args.save + ".npz")  # as np.savez names it
        if not save.parent.is_dir():
            ap.error(f"--save {args.save}: no folder {save.parent}")

    torch.set_num_threads(args.threads)
    world = WorldModel.load(resolve_checkpoint(args.checkpoint))
    ds = Dataset(args.data, split="test")
    window = world.far.config.window
    K, G = args.context, args.generate
    usable = [e for e in ds.episodes if e.length >= K + G]  # as `worldsim eval` picks them
    if len(usable) < args.episodes:
        ap.error(f"{args.data}: {len(usable)} test episodes have {K + G} frames, --episodes asks for {args.episodes}")
    if args.other_memory and K - window + 1 < 1:
        ap.error(f"--other-memory: the context ({K}) fits in the short window ({window}), nothing is in L2")
    rows, masks = [], []
    t0 = time.time()
    for e in range(args.episodes):
        ep = ds.load(usable[e])
        cache = HistoryGuidedContext(world.far, args.history_guidance) if args.history_guidance is not None \
            else "multilevel"
        video, actions = ep.video[:K], ep.actions[:K]
        if args.other_memory:
            # as `worldsim eval` picks them: among every episode that holds the K - W + 1 frames given
            donors = [d for d in ds.episodes if d.length >= K - window + 1]
            donor_info = memory_donor(donors, donors.index(usable[e]))
            if donor_info is None:
                raise SystemExit(f"{args.data}: no test episode of another maze than {ep.id}")
            donor = ds.load(donor_info)
            video, actions = with_other_memory(video, actions, donor.video, donor.actions, K - window + 1)
        session = world.new_session(video, actions, cache_mode=cache, seed=e, context_noise=args.context_noise)
        row = []
        for i in range(K, K + G):
            a = int(ep.actions[i])
            if args.teacher_forced:
                frame = session.predict(a)
                session.append(ep.video[i], a)
            elif args.roundtrip:
                frame = session.predict(a)
                session.append(frame, a)
            else:
                frame = session.step(a)
            row.append(float(metrics.psnr(frame, ep.video[i])))
        rows.append(np.array(row))
        masks.append(metrics.revisit_mask(ep.poses[:K + G], K, window)[0])
    flat, mask = np.concatenate(rows), np.concatenate(masks)

    def mean(values: np.ndarray) -> float | None:
        return round(float(values.mean()), 2) if values.size else None
    print(json.dumps({
        "variant": {"history_guidance": args.history_guidance, "roundtrip": args.roundtrip,
                    "context_noise": args.context_noise, "teacher_forced": args.teacher_forced,
                    "other_memory": args.other_memory},
        "episodes": args.episodes, "overall": round(float(np.mean([r.mean() for r in rows])), 2),
        "revisit": mean(flat[mask]), "rest": mean(flat[~mask]),
        "first_16": round(float(np.mean([r[:16].mean() for r in rows])), 2), "seconds": round(time.time() - t0)}))
    if save is not None:  # an interrupted or failed write keeps an earlier file whole
        try:
            atomic_write(save, lambda tmp: np.savez(tmp, psnr=np.stack(rows), revisit=np.stack(masks)),
                         suffix=".tmp.npz")
        except OSError as exc:
            raise SystemExit(f"probe_rollout: {exc}") from None


if __name__ == "__main__":
    main()
