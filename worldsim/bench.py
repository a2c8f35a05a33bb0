"""Benchmark the world model's generation speed per cache mode (and optionally the simulator).

Reports seconds per generated frame for the `none` (recompute everything each denoising step),
`kv` (plain KV cache) and `multilevel` (FAR's L1 fine + L2 coarse cache) modes at several
context lengths, side by side, with the FAR paper's 256-frame rollout anchor (1341 s / 171 s /
104 s; FAR-B-Long, 50 Euler steps, on the paper's GPU) and the ratios. Random weights: timing only.

    worldsim bench --preset small --steps 10 --contexts 16 64 256
    worldsim bench --simulator true        # also time the ground-truth simulator (bench_sim)

API: add_arguments(parser); main(args) -> int; BenchConfig; time_generation(cfg) -> list[dict].
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from worldsim.cliargs import add_dataclass_arguments, dataclass_from_args

PAPER_ROLLOUT_S = {"none": 1341.0, "kv": 171.0, "multilevel": 104.0}  # 256-frame rollout, FAR paper
PAPER_FRAMES = 256


@dataclass
class BenchConfig:
    preset: Literal["tiny", "small", "far-b-long"] = field(default="small", metadata={"help": "FAR preset"})
    ae_preset: Literal["tiny", "small", "base"] = field(default="small", metadata={"help": "autoencoder preset"})
    steps: int = field(default=10, metadata={"help": "Euler steps per frame (paper: 50)"})
    cfg: float = field(default=1.5, metadata={"help": "CFG scale (1 = no null-action branch)"})
    contexts: tuple[int, ...] = field(default=(16, 64, 256), metadata={"help": "context lengths (frames)"})
    modes: tuple[str, ...] = field(default=("none", "kv", "multilevel"), metadata={
        "help": "cache modes: none, kv, multilevel, sliding, multilevel-fast"})
    frames: int = field(default=4, metadata={"help": "generated frames timed per mode and context"})
    none_frames: int = field(default=2, metadata={"help": "frames timed for the slow `none` mode"})
    device: str | None = field(default=None, metadata={
        "help": "auto, cpu, cuda, cuda:1, ... (default: auto: a CUDA GPU where there is one, else the CPU)"})
    precision: Literal["fp32", "bf16", "bf16-kv", "auto"] = field(default="fp32", metadata={
        "help": "the transformer's arithmetic on a CPU (play's default is auto: bf16 where the CPU has it, else bf16-kv; "
                "fp32 here keeps the README's table comparable; a GPU always runs bf16)"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads, >= 1 (default: torch's)"})
    seed: int = field(default=0, metadata={"help": "random seed, 0 to 2**32 - 1"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (on a terminal; never in a redirected log)"})
    simulator: bool = field(default=False, metadata={"help": "also benchmark the simulator (worldsim.bench_sim)"})
    sim_steps: int = field(default=2000, metadata={"help": "simulator steps to time"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, BenchConfig)


def _random_world(cfg: BenchConfig):
    from worldsim.autoencoder import AE_PRESETS, Autoencoder
    from worldsim.model import FAR, PRESETS
    from worldsim.world import WorldModel

    import torch  # here, not at the top: `worldsim bench --help` answers without torch's seconds of import

    torch.manual_seed(cfg.seed)
    ae_cfg = AE_PRESETS[cfg.ae_preset]
    far_cfg = dataclasses.replace(
        PRESETS[cfg.preset], latent_channels=ae_cfg.latent_channels, latent_size=ae_cfg.latent_size, num_actions=5
    )
    names = ("noop", "forward", "backward", "turn_left", "turn_right")
    return WorldModel(Autoencoder(ae_cfg), FAR(far_cfg), names, (ae_cfg.resolution,) * 2, device=cfg.device,
                      precision=cfg.precision)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def time_generation(cfg: BenchConfig) -> list[dict]:
    """One row per (mode, context): prefill seconds, seconds per generated frame, cache stats."""
    import torch

    world = _random_world(cfg)
    print(f"precision {world.precision}", flush=True)
    fc = world.far.config
    rng = np.random.default_rng(cfg.seed)
    rows = []
    from tqdm import tqdm

    # the uncached mode at long contexts takes minutes: a bar (on a terminal only) counts the frames
    per_context = sum((cfg.none_frames if mode == "none" else cfg.frames) + 1 for mode in cfg.modes)
    bar = tqdm(total=per_context * len(cfg.contexts), desc="worldsim bench", unit="frame",
               disable=None if cfg.progress else True,
               dynamic_ncols=True, file=sys.stderr)
    for K in cfg.contexts:
        latents = torch.randn(K, fc.latent_channels, fc.latent_size, fc.latent_size)
        actions = torch.as_tensor(rng.integers(0, 5, K))
        for mode in cfg.modes:
            n = cfg.none_frames if mode == "none" else cfg.frames
            session = world.new_session(
                np.zeros((0, *world.resolution, 3), np.uint8), np.zeros(0, np.int64), cache_mode=mode,
                steps=cfg.steps, cfg=cfg.cfg, seed=cfg.seed,
            )
            t0 = time.perf_counter()
            session.extend_latents(latents, actions)
            session.context.flush()  # the multi-level modes defer encoding to the next query: time it here
            _sync(world.device)
            prefill = time.perf_counter() - t0
            session.step(1)  # warm-up frame (allocator, first-call overheads): not timed
            _sync(world.device)
            bar.update(1)
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(n):
                session.step(int(actions[i % K]))
                bar.update(1)  # a bar update costs microseconds against a frame's milliseconds
            _sync(world.device)
            per_frame = (time.perf_counter() - t0) / n
            # CPU seconds too: on a shared machine wall-clock time mostly measures the neighbours
            cpu_per_frame = (time.process_time() - c0) / n
            rows.append(dict(mode=mode, context=K, s_per_frame=per_frame, cpu_s_per_frame=cpu_per_frame,
                             prefill_s=prefill, frames=n, precision=session.precision, **session.stats()))
            bar.write(f"  {mode:<10} context {K:>4}: {per_frame:8.3f} s/frame, {cpu_per_frame:.3f} CPU s/frame  "
                      f"(prefill {prefill:.2f} s, {n} frames timed, L1 {session.stats()['l1_tokens']} tok, "
                      f"L2 {session.stats()['l2_tokens']} tok)", file=sys.stdout)
            sys.stdout.flush()
    bar.close()
    return rows


def _estimate_rollout(points: dict[int, float], frames: int = PAPER_FRAMES) -> float | None:
    """Seconds for a `frames`-frame rollout from s/frame measured at a few context lengths
    (piecewise-linear in the context, flat outside the measured range)."""
    if not points:
        return None
    xs = sorted(points)
    ys = [points[x] for x in xs]
    return float(np.sum(np.interp(np.arange(frames), xs, ys)))


def report(rows: list[dict], cfg: BenchConfig, device: torch.device, threads: int) -> str:
    from worldsim.world import resolve_precision

    contexts = list(cfg.contexts)
    by = {(r["mode"], r["context"]): r["s_per_frame"] for r in rows}
    nw = max([12] + [len(m) + 2 for m in cfg.modes] + [len(m) + 8 for m in ("none", "kv") if m in cfg.modes])
    cpu_threads = f" ({threads} thread{'s' if threads != 1 else ''})" if device.type == "cpu" else ""
    precision = resolve_precision(cfg.precision, device)
    lines = [
        f"FAR generation speed: preset {cfg.preset} (ae {cfg.ae_preset}), {cfg.steps} Euler steps, CFG {cfg.cfg}, "
        f"device {device}{cpu_threads}, precision {precision}, random weights",
    ]
    # a mode whose sessions ran another precision than the header's: bf16-kv's only bf16 is the KV
    # cache, so `none` (no cache) runs fp32 there
    ran = {r["mode"]: r["precision"] for r in rows if r.get("precision", precision) != precision}
    lines += [f"{mode} runs {ran[mode]} (it stores no KV cache to keep in bf16)" for mode in ran]
    lines += [
        "",
        f"{'s/frame':<{nw}}" + "".join(f"{'ctx ' + str(k):>11}" for k in contexts)
        + f"{'est. 256-frame':>16}{'paper 256-frame':>17}",
    ]
    est = {}
    for mode in cfg.modes:
        pts = {k: by[(mode, k)] for k in contexts if (mode, k) in by}
        est[mode] = _estimate_rollout(pts)
        paper = PAPER_ROLLOUT_S.get(mode)
        lines.append(
            f"{mode:<{nw}}" + "".join(f"{by[(mode, k)]:>11.3f}" if (mode, k) in by else f"{'-':>11}" for k in contexts)
            + (f"{est[mode]:>14.0f} s" if est[mode] is not None else f"{'-':>16}")
            + (f"{paper:>15.0f} s" if paper else f"{'-':>17}")
        )
    if "multilevel" in cfg.modes:
        for mode in [m for m in ("none", "kv") if m in cfg.modes]:
            ratio = [by[(mode, k)] / by[("multilevel", k)] for k in contexts if (mode, k) in by and ("multilevel", k) in by]
            paper = PAPER_ROLLOUT_S[mode] / PAPER_ROLLOUT_S["multilevel"]
            e = est[mode] / est["multilevel"] if est.get(mode) and est.get("multilevel") else float("nan")
            lines.append(
                f"{mode + '/multi':<{nw}}" + "".join(f"{r:>10.2f}x" for r in ratio)
                + f"{e:>15.2f}x" + f"{paper:>16.2f}x"
            )
    lines += [
        "",
        "est. 256-frame = sum over a 256-frame rollout of the s/frame interpolated between the measured contexts "
        "(held flat beyond them).",
        "paper: FAR-B-Long, 50 steps, on a GPU; compare ratios, not seconds.",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    import torch

    cfg = dataclass_from_args(BenchConfig, args)
    if cfg.threads is not None and cfg.threads < 1:
        print(f"worldsim bench: --threads must be >= 1, got {cfg.threads}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from worldsim.cache import CACHE_MODES
    from worldsim.model import DeviceError, pick_device

    bad = [m for m in cfg.modes if m not in CACHE_MODES]
    if bad:
        print(f"worldsim bench: unknown cache mode(s) {bad}; choose from {CACHE_MODES}", file=sys.stderr)
        return 2
    positive = {"--steps": [cfg.steps], "--frames": [cfg.frames], "--none-frames": [cfg.none_frames],
                "--contexts": list(cfg.contexts), "--sim-steps": [cfg.sim_steps]}
    for option, values in positive.items():
        if not values or min(values) < 1:
            print(f"worldsim bench: {option} must be >= 1, got {' '.join(map(str, values)) or 'nothing'}", file=sys.stderr)
            return 2
    # numpy takes only non-negative seeds, and torch's CPU generator keeps a seed's low 32 bits: --seed 2**32
    # built the random weights of --seed 0. The bound of record, train, eval and play.
    if not 0 <= cfg.seed < 2**32:
        print(f"worldsim bench: --seed must be from 0 to 2**32 - 1, got {cfg.seed}", file=sys.stderr)
        return 2
    from worldsim.sampler import setting_problem

    if problem := setting_problem("cfg", cfg.cfg):
        print(f"worldsim bench: --cfg {problem}", file=sys.stderr)
        return 2
    try:
        device = pick_device(cfg.device)
    except DeviceError as exc:
        print(f"worldsim bench: {exc}", file=sys.stderr)
        return 2
    cfg = dataclasses.replace(cfg, device=str(device))
    print(f"timing generation ({', '.join(cfg.modes)}) at contexts {list(cfg.contexts)} on {device} ...", flush=True)
    rows = time_generation(cfg)
    print()
    print(report(rows, cfg, device, torch.get_num_threads()))

    if cfg.simulator:
        try:
            bench_sim = importlib.import_module("worldsim.bench_sim")
        except ImportError as e:
            print(f"\nsimulator benchmark unavailable ({e})")
            return 0
        result = bench_sim.benchmark_simulator(steps=cfg.sim_steps, seed=cfg.seed)
        print("\nsimulator:")
        if isinstance(result, dict):
            for k, v in result.items():
                print(f"  {k}: {v}")
        elif result is not None:
            print(f"  {result}")
    return 0
