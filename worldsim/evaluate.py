"""Memory-consistency evaluation of a world-model checkpoint (`worldsim eval`).

    worldsim eval --data data/maze --episodes 8 --out runs/eval
    worldsim eval --checkpoint checkpoints/maze-far-small --context 144 --generate 156 --out runs/eval

1. Ground truth. Held-out mazes: the `test` split of `--data` (or, without `--data`, test-split
   mazes recorded now with the revisiting navigator into `<out>/data`); `--split val` scores the
   validation mazes instead, to choose settings (e.g. `--shift`) without looking at the test ones.
   Files without split information (the public FAR/TECO DMLab .npz files) are scored whole,
   unless the checkpoint names them as training data: then only the episodes that training held
   out by a hash of their id. FAR/TECO files below a `train`/`val`/`test` folder (TECO's
   `dmlab/test/<shard>/<n>.npz`) take its split; files beside them outside such folders are then
   split by the hash, as training splits them. The first `--context` K
   ground-truth frames are the context; the model then generates the next `--generate` G frames
   from the recorded actions. Conditions, each scored per frame against the ground truth:

   * `multilevel`  FAR with its full long context (multi-level KV cache: L1 window + L2);
   * `sliding`     the same model and seed with only the short window (no L2);
   * `copy_last`   the floor: the last context frame repeated;
   * `autoencoder` the ceiling: the ground truth encoded and decoded by the autoencoder;
   * `other_memory` the memory control (`--memory-control`, on by default): `multilevel` with the
     same seed, but the context frames already in L2 when generation starts (index < K - W + 1)
     and their actions come from the next test episode of another maze. The sliding window differs
     from `multilevel` in what the memory holds and in whether there is a long context at all
     (which the model always has in training); the control keeps a long context but a wrong one
     (which also contradicts the window: a scene cut the model never trained on), so compare its
     revisit difference with its difference on the other frames.

   `--long-cache multilevel-fast` runs the long-context condition (and teacher forcing and the
   probes below) with the approximate cache that `play` uses by default, so the numbers describe
   what a player sees; the default `multilevel` is the exact cache (the model as trained).
   `--still-frames N` starts the generated conditions as a game starts with a checkpoint whose
   `sampler.still_frames` is N: N copies of the episode's first frame (noop) before its context
   (for the memory control, of the donor's first frame). Its default is 0, whatever the checkpoint
   says: the bars score the frames given. Teacher forcing and the probes never take them.

   Teacher forcing: each frame predicted from the ground-truth past (`Session.predict`, then
   `Session.append(gt)`), multilevel cache, next to its own floor (the previous GT frame).

   Generated frames are split into *revisits* and the rest by the recorded poses: a frame is
   a revisit when its pose is within 0.5 cell and 30 degrees of a context frame with index
   < K - W + 1 (W = the model's short window, from the checkpoint config), i.e. a place the
   long-term context has seen (DESIGN.md's rule; a context frame still in the short window may
   show it too, as for 123 of the 1,675 revisit frames of the 24 test episodes at K = 144,
   W = 16; see `worldsim.metrics.revisit_mask`).

   "Overall" numbers follow TECO's protocol (which FAR's table uses): per-frame PSNR / SSIM /
   LPIPS on [0, 1] frames, averaged over the generated frames of each episode, then over
   episodes. They are printed next to FAR's reported DMLab numbers (144 -> 156: PSNR 22.3,
   SSIM 0.687, LPIPS 0.104), marked as the paper's (another dataset: a reference, not a match).
   Revisit / rest numbers are pooled over all such frames of all episodes. Each condition also
   gets `sharpness` and `motion`: the summed detail and frame-to-frame change of its frames
   (metrics.detail, metrics.frame_change) over the same sums for the ground truth. PSNR favours a
   smoother or stiller guess; these show when a gain comes from one.

   Paired differences (`gaps` in results.json, a table in results.md): long context - sliding
   window on revisit frames and overall, long context - copy floor, teacher-forced - its floor,
   each with a 95% bootstrap interval over episodes (episodes resampled, not frames: the frames
   of one episode are far from independent) and how many episodes have a positive difference.
   The revisit difference is also split by how far back the memory must reach (`revisit_by_age`:
   frames since the latest old context frame with the pose, metrics.revisit_age), to show whether
   the memory reaches beyond the sequence length the transformer was trained on.

2. Self-consistency, no ground truth: from a few simulator frames (reset frame + noops), turn
   in place (`turn_left` x N, N = round(2 pi / turn_step), repeated `--probe-loops` times) and
   go out and back (forward k, turn 180, forward k, turn 180, repeated). The simulator follows
   the same actions only to know the poses; each generated frame whose pose equals that of an
   earlier frame of the same session (0.5 move step, half a turn step) is scored against that
   earliest frame -- the model's own view of the place. Conditions: multilevel vs sliding.
   Control: the same frame scored against the earlier frame at its spot that looks most the
   other way (`opposite_view_pairs`): a model that paints every view alike scores both the same.
   With the simulator, sharpness and motion compare the generated frames with its frames along
   the same path: a view that stops turning scores well on the probe and low on motion.

3. Output in `--out`: `results.json` (every number, per-frame arrays, the config: checkpoint path
   and config, dataset, seeds), `results.md` (tables), `psnr_vs_frame.png` (mean PSNR per frame
   index and condition, revisit frames marked) and `episode_<id>.mp4` (or .gif) for the first
   `--videos` episodes: ground truth | long context | sliding window, upscaled and labelled.
   They are written into a hidden `.unfinished-eval/` in `--out` and moved into place together at the
   end (results.json last, the earlier run's first gone), so an eval killed midway into a reused
   `--out` leaves the earlier run's outputs as they were; the next eval there removes that folder.
   Session seeds are `--seed` + the episode index, so the same seed gives the same numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np

from worldsim import metrics
from worldsim.cliargs import add_dataclass_arguments, dataclass_from_args

GEN_CONDITIONS = ("multilevel", "sliding")  # model conditions of the ground-truth protocol
CONDITIONS = GEN_CONDITIONS + ("copy_last", "autoencoder")
MEMORY_CONTROL = "other_memory"  # multilevel, with the long-term context taken from another maze
CONDITION_LABELS = {
    MEMORY_CONTROL: "control: long context from another maze (multilevel)",
    "autoencoder": "ceiling: autoencoder reconstruction of the ground truth",
    "multilevel": "FAR, full long context (multilevel)",
    "sliding": "same model, sliding window only (no L2)",
    "copy_last": "floor: copy last context frame",
    "teacher_forced": "teacher-forced next frame (multilevel)",
    "teacher_copy": "floor: copy previous GT frame",
}
PAPER = {
    "label": "FAR paper (DMLab, 144 -> 156, TECO protocol; reported, not measured here)",
    "context": 144, "generate": 156, "psnr": 22.3, "ssim": 0.687, "lpips": 0.104,
}
RESULTS_FORMAT = "worldsim-eval"
RESULTS_VERSION = 1
# what results.md and the plot read from a results.json's config (a rescore redraws both)
RESULTS_CONFIG_KEYS = ("checkpoint", "dataset", "dataset_split", "context", "generate", "window", "seed")
# where a run writes its videos, tables and plot inside --out until they move into place together
UNFINISHED = ".unfinished-eval"


class EvalError(RuntimeError):
    """The evaluation cannot run (bad checkpoint/dataset combination, too-short episodes ...)."""


@dataclass
class EvalConfig:
    checkpoint: str | None = field(default=None, metadata={
        "help": "checkpoint folder (config.json + model.safetensors); default: the one shipped in checkpoints/"})
    data: str | None = field(default=None, metadata={
        "help": "dataset folder; only its --split is used (default: record mazes of that split into OUT/data)"})
    split: Literal["test", "val"] = field(default="test", metadata={
        "help": "the mazes to score: test (the held-out ones the bars are measured on) or val (to choose "
                "settings such as --shift without looking at the test mazes)"})
    out: str = field(default="runs/eval", metadata={"help": "output folder"})
    episodes: int = field(default=8, metadata={"help": "test episodes to evaluate"})
    context: int = field(default=144, metadata={"help": "ground-truth context frames K"})
    generate: int = field(default=156, metadata={"help": "frames generated after the context G"})
    steps: int | None = field(default=None, metadata={"help": "sampling steps (default: the checkpoint's)"})
    cfg: float | None = field(default=None, metadata={"help": "classifier-free guidance scale (default: the checkpoint's)"})
    shift: float | None = field(default=None, metadata={
        "help": "sampler timestep shift, > 0; 1 = uniform steps, > 1 = more of them at high noise (default: the checkpoint's)"})
    temperature: float | None = field(default=None, metadata={
        "help": "scale of the initial noise each frame is sampled from, >= 0; below 1 = nearer the middle of the "
                "model's distribution, 0 = deterministic, 1 = plain sampling (default: the checkpoint's)"})
    generated_noise: float | None = field(default=None, metadata={
        "help": "noise level in [0, 1) given to the frames the model generates before they enter its context (they "
                "are labelled with it, as training labels noised context); 0 = off (default: the checkpoint's)"})
    still_frames: int = field(default=0, metadata={
        "help": "copies of each episode's first frame, with noop, put before the context of every generated "
                "condition, as play's start gives (play takes the checkpoint's sampler.still_frames); not for "
                "teacher forcing or the probes; 0 = the frames given, as the bars are scored"})
    seed: int = field(default=0, metadata={"help": "base seed, 0 to 2**32 - 1; each session uses seed + episode index"})
    device: str | None = field(default=None, metadata={
        "help": "auto, cpu, cuda, cuda:1, ... (default: auto: a CUDA GPU where there is one, else the CPU)"})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads, >= 1 (default: torch's; 1 is faster on a machine shared with other jobs)"})
    precision: Literal["fp32", "bf16", "bf16-kv", "auto"] = field(default="fp32", metadata={
        "help": "the transformer's arithmetic on CPU: fp32 (exact), bf16 (weights and KV cache in bfloat16), "
                "bf16-kv (fp32 weights, the KV cache in bfloat16) or auto (bf16 where the CPU has it natively, else "
                "bf16-kv: what `play` uses by default); CUDA always uses bf16 autocast"})
    long_cache: Literal["multilevel", "multilevel-fast"] = field(default="multilevel", metadata={
        "help": "cache of the long-context condition, teacher forcing and probes (multilevel: exact; "
                "multilevel-fast: what `play` uses by default, not exact)"})
    memory_frames: int = field(default=0, metadata={
        "help": "frames the long-context cache's long-term memory (L2) keeps at most, the oldest forgotten, as "
                "play's --memory-frames bounds it (for every long-context session: generation, the memory "
                "control, teacher forcing and the probes); 0 = every frame, as the bars are scored. A bound "
                "below the context shows, in the revisit table by reach, what revisits beyond it lose"})
    memory_span: int | None = field(default=None, metadata={
        "help": "the transformer's memory_span for this run: a long-term memory reaching further back than this "
                "many frames is presented spread evenly over the last that many (RoPE time positions), e.g. the "
                "furthest its training samples reached; 0 = frame indices (default: the checkpoint's)"})
    teacher_forcing: bool = field(default=True, metadata={"help": "also score teacher-forced next-frame prediction"})
    memory_control: bool = field(default=True, metadata={
        "help": "also generate with the long-term context (the frames already in L2 when generation starts) "
                "taken from another test maze: what the memory's content adds, apart from having a long context"})
    videos: int = field(default=3, metadata={"help": "episodes to write side-by-side videos for"})
    probe_episodes: int = field(default=2, metadata={
        "help": "mazes of the self-consistency probes (0: skip). Each runs its own fixed paths (a 360-degree "
                "turn, out and back) under every condition, whatever --episodes and --generate say, so they "
                "dominate a small eval: --probe-episodes 0 for a quick one"})
    probe_context: int = field(default=4, metadata={"help": "simulator frames given as context to a probe"})
    probe_forward: int = field(default=8, metadata={"help": "forward steps k of the out-and-back probe"})
    probe_loops: int = field(default=2, metadata={"help": "times each probe path is repeated"})
    record_length: int | None = field(default=None, metadata={
        "help": "frames per recorded episode without --data (default: context + generate)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (on a terminal; never in a redirected log)"})
    rescore: str | None = field(default=None, metadata={
        "help": "instead of evaluating: recompute the paired differences, results.md and the plot of an earlier "
                "run from the results.json in this folder (e.g. after an upgrade added a difference); nothing "
                "is generated"})


# ----------------------------------------------------------------------------- small helpers


def _jsonable(obj: Any) -> Any:
    """numpy -> Python, non-finite floats -> None (the JSON stays strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temp file beside `path` with the same extension (imageio and
    matplotlib pick the format from it), then rename it over `path`."""
    from worldsim.dataset import atomic_write

    atomic_write(path, write, suffix=".tmp" + Path(path).suffix)


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda p: p.write_text(text))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=None if enabled else True, dynamic_ncols=True,
                file=sys.stderr)


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}"


# ----------------------------------------------------------------------------- model side


def resolve_checkpoint(path: str | None) -> Path:
    """The given checkpoint folder, or the shipped one under checkpoints/ (clear error if none)."""
    try:
        from worldsim.dream_env import resolve_checkpoint as _resolve
    except ImportError:  # pragma: no cover - dream_env always ships with the package
        _resolve = None
    if _resolve is not None:
        try:
            return Path(_resolve(path))
        except FileNotFoundError as exc:
            raise EvalError(str(exc)) from None
    if path is None:
        from worldsim.dream_env import where_checkpoints_were_looked_for

        raise EvalError(f"no --checkpoint given and {where_checkpoints_were_looked_for()}")
    return Path(path)


def _find_key(obj: Any, names: Sequence[str]) -> Any:
    """First value of any key in `names`, searching nested dicts breadth-first."""
    queue = [obj]
    while queue:
        cur = queue.pop(0)
        if isinstance(cur, dict):
            for n in names:
                if n in cur and isinstance(cur[n], (int, float)) and not isinstance(cur[n], bool):
                    return cur[n]
            queue.extend(v for v in cur.values() if isinstance(v, dict))
    return None


def model_window(world: Any) -> int:
    """The model's short window W (frames in L1) from the checkpoint config."""
    for attr in ("window", "short_window"):
        far = getattr(world, "far", None)
        for obj in (world, far, getattr(far, "config", None), getattr(far, "cfg", None)):
            v = getattr(obj, attr, None) if obj is not None else None
            if isinstance(v, int) and not isinstance(v, bool):
                return int(v)
    v = _find_key(getattr(world, "config", {}) or {}, ("window", "short_window", "short_window_frames", "W"))
    if v is None:
        raise EvalError("cannot find the model's short window W in the checkpoint config "
                        "(looked for 'window' / 'short_window')")
    return int(v)


def _simulator_spec(world: Any) -> dict | None:
    spec = getattr(world, "simulator", None)
    if isinstance(spec, dict) and spec.get("id"):
        return spec
    return None


def make_simulator(spec: dict | None, source: str = "the checkpoint") -> Any | None:
    """The simulator a checkpoint was trained on, or None when it cannot be built here; `source` (the
    checkpoint, by its path where known) is named when its id is not one worldsim starts unasked."""
    if not spec:
        return None
    from envs import check_simulator_from_file, make_untimed  # (and registers the ids)

    check_simulator_from_file(spec.get("id"), source)  # not a simulator that is missing: said
    try:
        return make_untimed(spec["id"], spec.get("settings"))  # probes as long as asked
    except Exception:  # optional simulators (DMLab, Memory Maze) may be missing
        return None


def _turn_step(spec: dict | None, sim: Any | None) -> float | None:
    if sim is not None and getattr(sim.unwrapped, "turn_step", None):
        return float(sim.unwrapped.turn_step)
    settings = (spec or {}).get("settings") or {}
    if settings.get("turn_step"):
        return float(settings["turn_step"])
    if settings.get("turn_step_deg"):
        return math.radians(float(settings["turn_step_deg"]))
    return None


# ----------------------------------------------------------------------------- data side


def record_test_episodes(world: Any, out_dir: Path, episodes: int, length: int, seed: int,
                         progress: bool, split: str = "test", source: str = "the checkpoint") -> Path:
    """Record `episodes` mazes of `split` with the navigator for the checkpoint's simulator."""
    spec = _simulator_spec(world)
    if spec is None:
        raise EvalError("no --data given and the checkpoint records no simulator to record test mazes with")
    from envs import check_simulator_from_file
    from envs.recorder import RecordConfig, record

    check_simulator_from_file(spec.get("id"), source)
    env_args = tuple(f"{k}={json.dumps(v)}" for k, v in (spec.get("settings") or {}).items())
    cfg = RecordConfig(out=str(out_dir), env=spec["id"], env_arg=env_args, episodes=episodes, length=length,
                       policy="navigator", split=split, seed=seed, workers=1, progress=progress)
    if record(cfg)["interrupted"]:  # record() keeps what it wrote and returns; the eval must stop too
        raise KeyboardInterrupt
    return out_dir


def load_test_split(path: Path, world: Any, split: str = "test") -> tuple[Any, str]:
    """The test (or another) split of a dataset, checked against the checkpoint; returns (dataset, split note).

    Files without split information (the public FAR/TECO DMLab .npz files, which are their
    test set) are used whole, and the note says so, unless the checkpoint was trained on them:
    then only the episodes that training held out by the hash of their id are scored. Once some
    files take a split from their folder (train/val/test), the split is chosen as training
    chooses it (`latents.open_split`): by folder, the others by the hash of their id.
    """
    from worldsim.dataset import Dataset
    from worldsim.latents import names_for, open_split

    # files without an index (FAR/TECO DMLab .npz) name their actions after the checkpoint's
    names = names_for(path, world.action_names)
    whole = Dataset(path, action_names=names)
    if whole.episodes and all(e.split is None for e in whole.episodes):
        if not _trained_on(path, getattr(world, "config", None) or {}):
            ds, note = whole, "all episodes (the files carry no split information; taken as held-out)"
        else:
            ds, idx, _ = open_split(path, split, action_names=names, fallback=False)
            if not idx:
                raise EvalError(f"{path}: this checkpoint was trained on these files, which carry no split "
                                f"information, and none of their {len(ds)} episodes falls in the {split!r} part "
                                "that training holds out (by a hash of the episode id); evaluate on files it was "
                                "not trained on")
            ds.episodes = [ds.episodes[i] for i in idx]
            note = (f"the {len(idx)} episodes that training held out as {split!r} by a hash of their id "
                    "(the checkpoint was trained on these files, which carry no split information)")
    else:
        ds, note = Dataset(path, split=split, action_names=names), split
        if any(e.split is None for e in whole.episodes):
            note = (f"{split} (files by their train/val/test folder, the others by a hash of their id, "
                    "as training splits them)")
    if tuple(ds.resolution) != tuple(world.resolution):
        h, w = ds.resolution
        mh, mw = world.resolution
        raise EvalError(f"the checkpoint generates {mh}x{mw} frames but the dataset {path} holds {h}x{w} frames")
    if tuple(ds.action_names) != tuple(world.action_names):
        raise EvalError(f"the checkpoint's actions {list(world.action_names)} differ from the dataset's "
                        f"{list(ds.action_names)} ({path})")
    return ds, note


def _simulator_differences(dataset_sim: Any, checkpoint_sim: Any) -> str:
    """What differs between the simulator a dataset was recorded with and the checkpoint's, as
    "key: dataset vs checkpoint" ("" when they agree or either is unknown). Settings only one side
    records are not compared (the recorder stores them all), nor the step limit, which changes no
    frame or action."""
    if not isinstance(dataset_sim, dict) or not isinstance(checkpoint_sim, dict):
        return ""
    if dataset_sim.get("id") != checkpoint_sim.get("id"):
        return f"id: {dataset_sim.get('id')} vs {checkpoint_sim.get('id')}"
    a, b = dataset_sim.get("settings") or {}, checkpoint_sim.get("settings") or {}
    keys = sorted((set(a) & set(b)) - {"max_steps"})
    return ", ".join(f"{k}: {a[k]} vs {b[k]}" for k in keys if a[k] != b[k])


def _trained_on(path: Path, config: dict) -> bool:
    """Whether `path` is one of the datasets the checkpoint's config names (its training data,
    or a stage's in the provenance), compared as resolved paths from the current directory."""
    named: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("datasets", "data") and isinstance(value, list):
                    named.extend(v for v in value if isinstance(v, str))
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    target = Path(path).resolve()
    # a path stored relative to another directory cannot be resolved from here: match its name
    # (if wrong, this only narrows the score to the episodes training held out, and says so)
    return any(Path(p).resolve() == target or (not Path(p).exists() and Path(p).name == target.name) for p in named)


# ----------------------------------------------------------------------------- generation


def generate(world: Any, video: np.ndarray, actions: np.ndarray, context: int, count: int, cache_mode: str,
             steps: int | None, cfg: float | None, seed: int, bar: Any = None, shift: float | None = None,
             generated_noise: float | None = None, temperature: float | None = None,
             still_frames: int = 0, memory_frames: int | None = None) -> np.ndarray:
    """G frames generated after the first `context` frames from the recorded actions (after
    `still_frames` copies of the first frame with noop, as Dream-v0 starts a game); memory_frames
    bounds the long-term memory of the multi-level caches (None: every frame)."""
    from worldsim.world import with_still_frames

    noop = list(world.action_names).index("noop") if still_frames else 0  # "noop" checked by run_eval()
    frames, acts = with_still_frames(video[:context], actions[:context], still_frames, noop)
    session = world.new_session(frames, acts, cache_mode=cache_mode, steps=steps,
                                cfg=cfg, seed=seed, shift=shift, generated_noise=generated_noise,
                                temperature=temperature, memory_frames=memory_frames)
    out = np.empty((count, *video.shape[1:]), dtype=np.uint8)
    for i in range(count):
        out[i] = session.step(int(actions[context + i]))
        if bar is not None:
            bar.update(1)
    return out


def teacher_forced(world: Any, video: np.ndarray, actions: np.ndarray, context: int, count: int,
                   steps: int | None, cfg: float | None, seed: int, bar: Any = None,
                   cache_mode: str = "multilevel", shift: float | None = None,
                   temperature: float | None = None, memory_frames: int | None = None) -> np.ndarray:
    """Each frame predicted from the ground-truth past (predict, then append the GT frame)."""
    session = world.new_session(video[:context], actions[:context], cache_mode=cache_mode, steps=steps,
                                cfg=cfg, seed=seed, shift=shift, temperature=temperature,
                                memory_frames=memory_frames)
    out = np.empty((count, *video.shape[1:]), dtype=np.uint8)
    for i in range(count):
        t = context + i
        out[i] = session.predict(int(actions[t]))
        session.append(video[t], int(actions[t]))
        if bar is not None:
            bar.update(1)
    return out


def _cache_of(condition: str, cfg: "EvalConfig") -> str:
    """The cache mode that runs a model condition: --long-cache for the long-context one."""
    return cfg.long_cache if condition == "multilevel" else condition


def copy_last(video: np.ndarray, context: int, count: int) -> np.ndarray:
    return np.repeat(video[context - 1:context], count, axis=0)


def autoencoded(world: Any, video: np.ndarray, context: int, count: int) -> np.ndarray:
    """The ground truth through the autoencoder: no generation can score above it."""
    frames = video[context:context + count]
    if not hasattr(world, "encode"):  # a stand-in world without an autoencoder
        return frames
    return world.decode(world.encode(frames))


def memory_donor(usable: Sequence[Any], index: int) -> Any | None:
    """The next usable episode after `index` (cyclic) from another maze, or None."""
    me = usable[index]
    for k in range(1, len(usable)):
        other = usable[(index + k) % len(usable)]
        if other.id != me.id and (me.maze_seed is None or other.maze_seed != me.maze_seed):
            return other
    return None


def with_other_memory(video: np.ndarray, actions: np.ndarray, donor_video: np.ndarray, donor_actions: np.ndarray,
                      old: int) -> tuple[np.ndarray, np.ndarray]:
    """The episode with its first `old` frames (and their actions) replaced by the donor's."""
    if not 1 <= old <= min(len(video), len(donor_video)):
        raise ValueError(f"cannot swap the first {old} frames of episodes of {len(video)} and {len(donor_video)} frames")
    video, actions = video.copy(), actions.copy()
    video[:old], actions[:old] = donor_video[:old], donor_actions[:old]
    return video, actions


# ----------------------------------------------------------------------------- scoring


def score_episode(truth: np.ndarray, generated: dict[str, np.ndarray], poses: np.ndarray | None, context: int,
                  window: int, lpips: metrics.Lpips | None = None) -> dict[str, Any]:
    """Score any generated frames against the ground truth of one episode.

    `truth` uint8 [K + G, H, W, 3] (context + the frames to generate), `generated[name]` uint8
    [G, H, W, 3] per condition, `poses` [K + G, 3] or None. Returns per-frame metrics per
    condition (with each frame's detail and change from the frame before, see worldsim.metrics),
    the same two for the ground truth, and the revisit mask (None without poses).
    """
    count = len(truth) - context
    target = truth[context:]
    previous = truth[context - 1]  # what every condition's first frame follows
    out: dict[str, Any] = {"conditions": {},
                           "truth": {"detail": metrics.detail(target), "change": metrics.frame_change(target, previous)}}
    if poses is not None:
        mask, source = metrics.revisit_mask(poses[: context + count], context, window)
        out["revisit"] = mask
        out["revisit_source"] = source
        out["revisit_age"] = metrics.revisit_age(poses[: context + count], context, window)
    else:
        out["revisit"] = None
        out["revisit_source"] = None
        out["revisit_age"] = None
    for name, frames in generated.items():
        if frames.shape != target.shape:
            raise ValueError(f"condition {name!r}: generated frames {list(frames.shape)} vs truth {list(target.shape)}")
        out["conditions"][name] = metrics.score_frames(frames, target, lpips) | {
            "detail": metrics.detail(frames), "change": metrics.frame_change(frames, previous)}
    return out


def _metric_names(lpips_on: bool) -> tuple[str, ...]:
    return ("psnr", "ssim", "lpips") if lpips_on else ("psnr", "ssim")


def _posed(episodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The episodes with poses, which alone tell revisits from the rest (an episode file without
    poses among them used to blank the revisit numbers of the whole run)."""
    return [e for e in episodes if e["revisit"] is not None]


def aggregate(episodes: list[dict[str, Any]], names: Iterable[str], lpips_on: bool) -> dict[str, Any]:
    """Overall (TECO: mean per episode, then over episodes) and pooled revisit / rest numbers."""
    result: dict[str, Any] = {}
    posed = _posed(episodes)
    for name in names:
        per: dict[str, Any] = {}
        for m in _metric_names(lpips_on):
            vals = [e["conditions"][name][m] for e in episodes]
            ep_means = [float(np.mean(v)) for v in vals if len(v)]
            entry: dict[str, Any] = {
                "overall": float(np.mean(ep_means)) if ep_means else None,
                "overall_std_over_episodes": float(np.std(ep_means)) if ep_means else None,
            }
            if posed:
                allv = np.concatenate([e["conditions"][name][m] for e in posed])
                mask = np.concatenate([e["revisit"] for e in posed])
                entry["revisit"] = metrics.summarize(allv, mask)
                entry["rest"] = metrics.summarize(allv, ~mask)
            else:
                entry["revisit"] = entry["rest"] = None
            per[m] = entry
        if not lpips_on:
            per["lpips"] = {"overall": None, "revisit": None, "rest": None, "note": "unavailable"}
        scored = episodes and all(key in e["conditions"][name] and "truth" in e
                                  for e in episodes for key in ("detail", "change"))
        for ratio, key in (("sharpness", "detail"), ("motion", "change")):
            per[ratio] = metrics.ratio_to_truth([e["conditions"][name][key] for e in episodes],
                                                [e["truth"][key] for e in episodes]) if scored else None
        result[name] = per
    return result


def gaps(episodes: list[dict[str, Any]], tf_episodes: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """The differences the bars are about, paired per frame, each with a bootstrap CI over episodes.

    A 6-episode sample moves the revisit gap by about 1 dB (the model card shows +1.89 and +2.95 on
    two samples), so a single number cannot decide a bar; the interval says how far to trust it.
    """
    def psnr_of(eps: list[dict[str, Any]], name: str) -> list[np.ndarray]:
        return [e["conditions"][name]["psnr"] for e in eps]

    out: dict[str, Any] = {}
    posed = _posed(episodes)
    revisits = [e["revisit"] for e in posed] if posed else None
    control = bool(episodes) and all(MEMORY_CONTROL in e["conditions"] for e in episodes)
    if revisits is not None:
        out["revisit_multilevel_vs_sliding"] = metrics.paired_gap(
            psnr_of(posed, "multilevel"), psnr_of(posed, "sliding"), revisits, pooled=True, seed=seed)
    if revisits is not None and control:
        out["revisit_multilevel_vs_other_memory"] = metrics.paired_gap(
            psnr_of(posed, "multilevel"), psnr_of(posed, MEMORY_CONTROL), revisits, pooled=True, seed=seed)
        # the control changes the memory everywhere, not only where the view repeats: its effect
        # on the other frames is the baseline a revisit-specific memory effect must exceed
        out["rest_multilevel_vs_other_memory"] = metrics.paired_gap(
            psnr_of(posed, "multilevel"), psnr_of(posed, MEMORY_CONTROL), [~r for r in revisits],
            pooled=True, seed=seed)
    if control:
        out["overall_multilevel_vs_other_memory"] = metrics.paired_gap(
            psnr_of(episodes, "multilevel"), psnr_of(episodes, MEMORY_CONTROL), pooled=False, seed=seed)
    if episodes:
        out["overall_multilevel_vs_sliding"] = metrics.paired_gap(
            psnr_of(episodes, "multilevel"), psnr_of(episodes, "sliding"), pooled=False, seed=seed)
        out["overall_multilevel_vs_copy_last"] = metrics.paired_gap(
            psnr_of(episodes, "multilevel"), psnr_of(episodes, "copy_last"), pooled=False, seed=seed)
    if tf_episodes:
        out["teacher_forced_vs_copy_previous"] = metrics.paired_gap(
            psnr_of(tf_episodes, "teacher_forced"), psnr_of(tf_episodes, "teacher_copy"), pooled=False, seed=seed)
    aged = [e for e in posed if e.get("revisit_age") is not None]
    if aged and len(aged) == len(posed):
        out["revisit_by_age"] = []
        for lo, hi in REVISIT_AGE_BINS:
            masks = [(a >= lo) & (a < hi) for a in (np.asarray(e["revisit_age"]) for e in aged)]
            pooled = {name: metrics.summarize(np.concatenate(psnr_of(aged, name)), np.concatenate(masks))["mean"]
                      for name in ("multilevel", "sliding")}
            out["revisit_by_age"].append({"ages": [lo, hi if math.isfinite(hi) else None], "psnr": pooled,
                                          **metrics.paired_gap(psnr_of(aged, "multilevel"), psnr_of(aged, "sliding"),
                                                               masks, pooled=True, seed=seed)})
    return out


# how far back the memory must reach on a revisit (metrics.revisit_age), in frames
REVISIT_AGE_BINS = ((0, 64), (64, 128), (128, 192), (192, math.inf))


GAP_LABELS = {
    "revisit_multilevel_vs_sliding": "revisit frames: long context - sliding window (pooled over frames)",
    "revisit_multilevel_vs_other_memory": "revisit frames: long context - long context from another maze (pooled)",
    "rest_multilevel_vs_other_memory": "other frames: long context - long context from another maze (pooled)",
    "overall_multilevel_vs_other_memory": "all generated frames: long context - long context from another maze",
    "overall_multilevel_vs_sliding": "all generated frames: long context - sliding window",
    "overall_multilevel_vs_copy_last": "all generated frames: long context - copy-last floor",
    "teacher_forced_vs_copy_previous": "teacher-forced - copy-previous-frame floor",
}


# ----------------------------------------------------------------------------- self-consistency


def _probe_paths(names: Sequence[str], turn_step: float, forward: int, loops: int,
                 with_forward: bool) -> dict[str, list[int]]:
    n_full = max(1, round(2 * math.pi / turn_step))
    n_half = max(1, round(math.pi / turn_step))
    left = names.index("turn_left")
    paths = {"turn_360": [left] * n_full * loops}
    if with_forward and "forward" in names and forward > 0:
        fwd = names.index("forward")
        cycle = [fwd] * forward + [left] * n_half + [fwd] * forward + [left] * n_half
        paths["out_and_back"] = cycle * loops
    return paths


def probe_pairs(poses: np.ndarray, context: int, pos_tol: float, yaw_tol: float) -> list[tuple[int, int]]:
    """(t, s) pairs: generated frame t (>= context) and the earliest earlier frame s with its pose.

    Pairs where the agent stood still from s to t (e.g. a blocked move) are skipped.
    """
    pairs = []
    poses = np.asarray(poses, dtype=np.float64)
    for t in range(context, len(poses)):
        match = metrics.pose_match(poses[t:t + 1], poses[:t], pos_tol, math.degrees(yaw_tol))[0]
        if not match.any():
            continue
        s = int(np.argmax(match))
        if match[s:t].all():  # stationary since s: not a revisit
            continue
        pairs.append((t, s))
    return pairs


def opposite_view_pairs(poses: np.ndarray, pairs: list[tuple[int, int]], pos_tol: float) -> list[tuple[int, int]]:
    """A control for each probe pair (t, s): (t, u), u the earlier frame at t's position that looks
    most the other way (at least 90 degrees off; the earliest among equals). A model that paints
    every view alike scores as well against u as against s; one that remembers the place, worse."""
    poses = np.asarray(poses, dtype=np.float64)
    out = []
    for t, _ in pairs:
        # the slack of metrics.pose_match: poses come in float32, and 90 degrees is nine 10-degree turns
        near = np.hypot(poses[:t, 0] - poses[t, 0], poses[:t, 1] - poses[t, 1]) <= pos_tol + metrics.POSE_SLACK
        off = np.abs(metrics.wrap_angle(poses[:t, 2] - poses[t, 2]))
        off = np.where(near & (off >= math.pi / 2 - metrics.POSE_SLACK), off, -1.0)
        if off.max(initial=-1.0) >= 0:
            out.append((t, int(np.argmax(off))))
    return out


def _pick_probe_maze_seeds(ds: Any, count: int, seed: int, split: str = "test") -> list[int | None]:
    seeds: list[int | None] = []
    if ds is not None:
        seeds = [e.maze_seed for e in ds.episodes[:count]]
    if len(seeds) < count:
        from worldsim.dataset import split_for_maze_seed

        s = 1_000_000 + (1000 * int(seed)) % 2**30  # the same for seeds below ~1e6; below 2**31 for any seed
        while len(seeds) < count:
            if split_for_maze_seed(s) == split:
                seeds.append(s)
            s += 1
    return seeds


def self_consistency(world: Any, cfg: EvalConfig, ds: Any, bar_enabled: bool,
                     source: str = "the checkpoint") -> dict[str, Any]:
    """Turn-in-place and out-and-back probes in generated worlds (no ground truth)."""
    if cfg.probe_episodes <= 0:
        return {"skipped": "--probe-episodes 0"}
    names = tuple(world.action_names)
    if "turn_left" not in names:
        return {"skipped": f"the checkpoint's actions {list(names)} have no 'turn_left'"}
    spec = _simulator_spec(world)
    from envs import UntrustedSimulator

    try:
        sim = make_simulator(spec, source)
    except UntrustedSimulator as exc:  # probes from the dataset's episodes still run (as when it is not installed)
        print(f"worldsim eval: not starting the checkpoint's simulator: {exc}", file=sys.stderr)
        sim = None
    turn_step = _turn_step(spec, sim)
    if turn_step is None:
        return {"skipped": "the checkpoint's simulator settings do not give a turn step"}
    if sim is None and ds is None:
        return {"skipped": "the checkpoint's simulator cannot be started here and no dataset gives a context"}
    if sim is not None and tuple(sim.observation_space.shape[:2]) != tuple(world.resolution):
        h, w = sim.observation_space.shape[:2]
        mh, mw = world.resolution
        sim.close()
        return {"skipped": f"the simulator {spec['id']} makes {h}x{w} frames but the checkpoint generates {mh}x{mw}"}
    move_step = float(getattr(sim.unwrapped, "move_step", 0.15)) if sim is not None else 0.15
    pos_tol, yaw_tol = 0.5 * move_step, 0.5 * turn_step
    paths = _probe_paths(names, turn_step, cfg.probe_forward, cfg.probe_loops, with_forward=sim is not None)
    noop = names.index("noop") if "noop" in names else 0
    k_ctx = max(1, cfg.probe_context)
    total = cfg.probe_episodes * sum(len(p) for p in paths.values()) * len(GEN_CONDITIONS)
    maze_seeds = _pick_probe_maze_seeds(ds, cfg.probe_episodes, cfg.seed, cfg.split)
    window = model_window(world)
    results: dict[str, Any] = {
        "turn_step_rad": turn_step, "full_turn_steps": max(1, round(2 * math.pi / turn_step)),
        "move_step": move_step, "context_frames": k_ctx, "forward": cfg.probe_forward, "loops": cfg.probe_loops,
        "window": window, "pose_tolerance": {"cells": pos_tol, "yaw_rad": yaw_tol},
        "context_source": "simulator (reset frame + noops)" if sim is not None else "test episode (first frames)",
        "poses_from": "simulator following the same actions" if sim is not None else "dead reckoning (turns only)",
        "probes": [],
    }
    if sim is None:
        results["out_and_back"] = "unavailable: the simulator is needed to know where forward moves end"
    bar = _progress(total, "self-consistency", bar_enabled)
    try:
        for i in range(cfg.probe_episodes):
            for pname, acts in paths.items():
                seed = cfg.seed + i
                if sim is not None:
                    obs, info = sim.reset(seed=seed, options={"maze_seed": maze_seeds[i]} if maze_seeds[i] is not None else None)
                    frames, poses = [np.asarray(obs)], [np.asarray(info["pose"], np.float64)[:3]]
                    ctx_actions = [noop] * k_ctx
                    for a in ctx_actions[1:] + list(acts):
                        obs, _, _, _, info = sim.step(a)
                        frames.append(np.asarray(obs))
                        poses.append(np.asarray(info["pose"], np.float64)[:3])
                    ctx = np.stack(frames[:k_ctx])
                    real = np.stack(frames[k_ctx:])  # what the simulator shows along the probe's path
                    pose_arr = np.stack(poses)
                    maze_seed = int(info.get("maze_seed", maze_seeds[i] or -1))
                else:
                    ep = ds[i % len(ds)]
                    if len(ep) < k_ctx:
                        raise EvalError(f"episode {ep.id} has {len(ep)} frames, fewer than --probe-context {k_ctx}")
                    ctx, ctx_actions = ep.video[:k_ctx], list(ep.actions[:k_ctx])
                    real = None
                    start = ep.poses[k_ctx - 1].astype(np.float64) if ep.poses is not None else np.zeros(3)
                    if ep.poses is not None:
                        ctx_poses = ep.poses[:k_ctx].astype(np.float64)
                    else:  # only the last context frame's pose is known (the origin); NaN never matches
                        ctx_poses = np.full((k_ctx, 3), np.nan)
                        ctx_poses[-1] = start
                    pose_arr = np.concatenate([
                        ctx_poses, np.stack([start + [0.0, 0.0, -(j + 1) * turn_step] for j in range(len(acts))])])
                    maze_seed = ep.maze_seed
                pairs = probe_pairs(pose_arr, k_ctx, pos_tol, yaw_tol)
                controls = opposite_view_pairs(pose_arr, pairs, pos_tol)
                entry: dict[str, Any] = {"probe": pname, "index": i, "maze_seed": maze_seed, "seed": seed,
                                         "frames": len(acts), "pairs": [[t, s] for t, s in pairs],
                                         "pair_age": [t - s for t, s in pairs],
                                         "opposite_view_pairs": [[t, u] for t, u in controls], "conditions": {}}
                if real is not None:
                    entry["simulator"] = {"detail": metrics.detail(real), "change": metrics.frame_change(real, ctx[-1])}
                for mode in GEN_CONDITIONS:
                    session = world.new_session(ctx, np.asarray(ctx_actions, dtype=np.int64),
                                                cache_mode=_cache_of(mode, cfg),
                                                steps=cfg.steps, cfg=cfg.cfg, seed=seed, shift=cfg.shift,
                                                generated_noise=cfg.generated_noise, temperature=cfg.temperature,
                                                memory_frames=cfg.memory_frames or None)
                    gen = []
                    for a in acts:
                        gen.append(session.step(int(a)))
                        bar.update(1)
                    allf = np.concatenate([ctx, np.stack(gen)])
                    if pairs:
                        t_idx = [t for t, _ in pairs]
                        s_idx = [s for _, s in pairs]
                        sc = metrics.score_frames(allf[t_idx], allf[s_idx])
                    else:
                        sc = {"psnr": np.zeros(0), "ssim": np.zeros(0)}
                    entry["conditions"][mode] = {k: v for k, v in sc.items()}
                    entry["conditions"][mode]["psnr_opposite_view"] = (
                        metrics.psnr(allf[[t for t, _ in controls]], allf[[u for _, u in controls]])
                        if controls else np.zeros(0))
                    entry["conditions"][mode]["detail"] = metrics.detail(allf[len(ctx):])
                    entry["conditions"][mode]["change"] = metrics.frame_change(allf[len(ctx):], ctx[-1])
                results["probes"].append(entry)
    finally:
        bar.close()
        if sim is not None:
            sim.close()
    summary: dict[str, Any] = {}
    for pname in paths:
        entries = [e for e in results["probes"] if e["probe"] == pname]
        per: dict[str, Any] = {}
        for mode in GEN_CONDITIONS:
            ages = np.concatenate([np.asarray(e["pair_age"], dtype=np.int64) for e in entries]) if entries else np.zeros(0)
            row = {}
            for m in ("psnr", "ssim"):
                vals = np.concatenate([e["conditions"][mode][m] for e in entries]) if entries else np.zeros(0)
                row[m] = metrics.summarize(vals)
                # the window holds the W - 1 frames before the one generated: age W is already in L2
                row[m + "_beyond_window"] = metrics.summarize(vals, ages >= window)
            row["psnr_opposite_view"] = metrics.summarize(np.concatenate(
                [np.asarray(e["conditions"][mode].get("psnr_opposite_view", []), dtype=np.float64) for e in entries])
                if entries else np.zeros(0))
            with_sim = [e for e in entries if "simulator" in e]  # a probe without the simulator has no reality
            for ratio, key in (("sharpness", "detail"), ("motion", "change")):
                row[ratio] = metrics.ratio_to_truth([e["conditions"][mode][key] for e in with_sim],
                                                    [e["simulator"][key] for e in with_sim]) if with_sim else None
            per[mode] = row
        summary[pname] = per
    results["summary"] = summary
    return results


# ----------------------------------------------------------------------------- outputs


SEAM, SEAM_COLOUR = 2, 16  # the dark line between the panels of eval's videos: play's recorded_view's


def write_video(path: Path, truth: np.ndarray, gens: dict[str, np.ndarray], context: int,
                revisit: np.ndarray | None, fps: int = 10) -> Path:
    """Side-by-side video: ground truth | long context | sliding window (context shown as GT), the panels
    parted by a dark SEAM-pixel line (as play's dream | reality recordings): the context frames, the same
    in all three, ran into each other. The line is added between the panels, hiding none of them; the
    writer takes any size (macro_block_size=1) and an even one stays even (yuv420p)."""
    import imageio.v2 as imageio

    from worldsim.dataset import caption_strip, finished_video_problem, video_write_error, write_gif

    t_total, h, w, _ = truth.shape
    scale = max(1, 256 // max(h, w))
    panel = w * scale
    labels = ["ground truth", "long context", "sliding window"]
    cols = [truth] + [np.concatenate([truth[:context], gens[m]]) for m in GEN_CONDITIONS]
    seam = np.full((h * scale, SEAM, 3), SEAM_COLOUR, np.uint8)
    header = caption_strip(panel * len(cols) + SEAM * (len(cols) - 1),
                           [(i * (panel + SEAM), text, (255, 255, 255)) for i, text in enumerate(labels)])
    frames = []
    for t in range(t_total):
        parts = [np.kron(c[t], np.ones((scale, scale, 1), np.uint8)) for c in cols]
        row = np.concatenate([x for i, p in enumerate(parts) for x in ((seam, p) if i else (p,))], axis=1)
        if t < context:
            note = f"frame {t}  context"
        else:
            rv = revisit is not None and bool(revisit[t - context])
            note = f"frame {t}  generated" + ("  REVISIT" if rv else "")
        footer = caption_strip(row.shape[1], [(0, note, (255, 255, 255))])
        frames.append(np.concatenate([header, row, footer], axis=0))


    def write_mp4(p: Path) -> None:
        try:
            imageio.mimwrite(p, frames, fps=fps, macro_block_size=1, quality=8, format="FFMPEG",
                             ffmpeg_log_level="quiet")  # a failure is reported in one line below
        except OSError as exc:  # a full disk reads "[Errno 32] Broken pipe" and ffmpeg's command line
            raise video_write_error(exc, p) from None
        problem = finished_video_problem(p, len(frames))  # ffmpeg may cut the file without raising
        if problem:
            raise video_write_error(OSError(problem), p)

    try:
        _atomic_write(path, write_mp4)
        return path
    except Exception as exc:
        refused = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)
        if isinstance(exc, OSError) and exc.errno in refused:  # the file system (a full disk): said, on the .mp4
            raise
        # no MP4 encoder here (imageio-ffmpeg or its ffmpeg missing, an ffmpeg without libx264): a GIF
        gif = path.with_suffix(".gif")
        _atomic_write(gif, lambda p: write_gif(p, frames, duration=1000.0 / fps))
        return gif


def write_plot(path: Path, per_frame: dict[str, np.ndarray], revisit_frac: np.ndarray | None, context: int,
               title: str, capped: dict[str, np.ndarray] | None = None) -> None:
    """`capped[name]`: per frame, whether some episode's frame scored the 100 dB cap (equal to the
    truth): one such frame lifts a mean over 24 episodes by ~3.5 dB, a spike that is not the
    condition's doing, so those frames get a marker and a legend entry saying so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    idx = None
    for name, vals in per_frame.items():
        idx = context + np.arange(len(vals))
        style = "--" if name in ("copy_last", "teacher_copy") else ":" if name == "autoencoder" else "-"
        main = name == "multilevel"  # the headline condition: drawn last-on-top and thicker
        (line,) = ax.plot(idx, vals, style, label=CONDITION_LABELS.get(name, name), lw=2.2 if main else 1.2,
                          zorder=4 if main else 2)
        hit = np.asarray((capped or {}).get(name, np.zeros(len(vals), bool)), dtype=bool)
        if hit.any():
            cap_label = f"frame equal to the truth in an episode ({metrics.PSNR_CAP_DB:g} dB cap)"
            marked = cap_label in ax.get_legend_handles_labels()[1]  # one legend entry for every condition's marks
            ax.plot(idx[hit], np.asarray(vals)[hit], "x", color=line.get_color(), ms=7, zorder=5,
                    label=None if marked else cap_label)
    if revisit_frac is not None and idx is not None:
        # with many episodes nearly every index has a revisit somewhere, so the fraction is
        # shown below rather than as markers on the curves
        ax2.bar(idx, revisit_frac, width=1.0, color="tab:gray")
    # the share of the episodes whose frame at that index is a revisit (metrics.revisit_mask)
    ax2.set_ylabel("share of\nepisodes")
    ax2.set_title("revisits: share of the episodes whose frame at this index is a revisit", fontsize=9)
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("frame index (context = frames 0..%d)" % (context - 1))
    ax.set_ylabel("PSNR (dB), mean over episodes")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    _atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def plot_results(results: dict[str, Any], path: Path) -> None:
    """psnr_vs_frame.png from a results dict: run_eval's own, or a results.json read back (to redraw
    an earlier run's plot without generating again)."""
    gt, cfgd = results["ground_truth"], results["config"]
    episodes, tf_episodes = gt["episodes"], gt["teacher_forced_episodes"]

    def mean_psnr(eps: list[dict[str, Any]], name: str) -> np.ndarray:
        return np.mean([np.asarray(e["per_frame"][name]["psnr"], dtype=np.float64) for e in eps], axis=0)

    def capped_frames(eps: list[dict[str, Any]], name: str) -> np.ndarray:
        return np.any([np.asarray(e["per_frame"][name]["psnr"], dtype=np.float64) >= metrics.PSNR_CAP_DB
                       for e in eps], axis=0)

    per_frame = {name: mean_psnr(episodes, name) for name in gt["summary"]}
    capped = {name: capped_frames(episodes, name) for name in gt["summary"]}
    if tf_episodes:
        for name in ("teacher_forced", "teacher_copy"):
            per_frame[name] = mean_psnr(tf_episodes, name)
            capped[name] = capped_frames(tf_episodes, name)
    posed = [e for e in episodes if e["revisit"] is not None]  # as the revisit numbers pool them
    rfrac = np.mean([np.asarray(e["revisit"], dtype=np.float64) for e in posed], axis=0) if posed else None
    # not every line is a generated frame: the teacher-forced ones are one-step predictions from the
    # recorded frames, the autoencoder's a reconstruction; all are scored against the recording
    title = (f"PSNR against the recorded frames ({len(episodes)} {cfgd.get('split', 'test')} episodes, "
             f"K={cfgd['context']}, W={cfgd['window']})")
    if tf_episodes:
        title += "\nteacher-forced lines: one-step predictions from the recorded frames before, not rollouts"
    write_plot(Path(path), per_frame, rfrac, cfgd["context"], title, capped)


def results_markdown(res: dict[str, Any]) -> str:
    gt = res.get("ground_truth") or {}
    cfgd = res["config"]
    lines = [f"# worldsim eval: {cfgd['checkpoint']}", ""]
    lines.append(f"{cfgd.get('split', 'test').capitalize()} episodes: {gt.get('episodes_evaluated', 0)} from `{cfgd['dataset']}` "
                 f"(split: {cfgd['dataset_split']}); "
                 f"context K = {cfgd['context']}, generated G = {cfgd['generate']}, window W = {cfgd['window']}, "
                 f"steps = {cfgd.get('sampler_used', cfgd)['steps']}, cfg = {cfgd.get('sampler_used', cfgd)['cfg']}, "
                 f"shift = {cfgd.get('sampler_used', cfgd).get('shift', 1.0)}, "
                 f"temperature = {cfgd.get('sampler_used', cfgd).get('temperature', 1.0)}, "
                 f"generated noise = {cfgd.get('sampler_used', cfgd).get('generated_noise') or 0.0}, seed = {cfgd['seed']}, "
                 f"long-context cache = {cfgd.get('long_cache', 'multilevel')}"
                 + (f", still frames before the context = {cfgd['still_frames']} (generated conditions and control)"
                    if cfgd.get("still_frames") else "")
                 + (f", long-term memory bounded to {cfgd['memory_frames']} frames" if cfgd.get("memory_frames") else "")
                 + (f", memory span = {cfgd['memory_span_used']} frames" if cfgd.get("memory_span_used") else "")
                 + (f", precision = {cfgd['precision_used']}" if cfgd.get("precision_used") else "") + ". "
                 f"LPIPS: {res['metrics']['lpips']['status']}.")
    for note in res.get("notes") or []:
        lines.append(f"\n**Note:** {note}.")
    lines.append("")
    lines.append("## Ground truth: generated frames vs recorded frames")
    lines.append("")
    lines.append("Overall = TECO protocol (mean over each episode's generated frames, then over episodes); "
                 "revisit / rest = pooled over frames (revisit: pose within 0.5 cell and 30 deg of a context "
                 "frame older than the short window).")
    lines.append("")
    lines.append("| condition | PSNR | SSIM | LPIPS | PSNR revisit | SSIM revisit | PSNR rest | SSIM rest | revisit / rest frames "
                 "| sharpness | motion |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    agg = gt.get("summary", {})

    def cell(entry: Any, key: str = "mean", digits: int = 2) -> str:
        return _fmt(entry.get(key) if isinstance(entry, dict) else None, digits)

    for name in GEN_CONDITIONS + (MEMORY_CONTROL,) + CONDITIONS[len(GEN_CONDITIONS):]:
        if name not in agg:
            continue
        a = agg[name]
        nrev = a["psnr"]["revisit"]["n"] if a["psnr"]["revisit"] else None
        nrest = a["psnr"]["rest"]["n"] if a["psnr"]["rest"] else None
        lines.append(
            f"| {CONDITION_LABELS[name]} | {_fmt(a['psnr']['overall'])} | {_fmt(a['ssim']['overall'], 3)} | "
            f"{_fmt(a['lpips']['overall'], 3)} | {cell(a['psnr']['revisit'])} | {cell(a['ssim']['revisit'], digits=3)} | "
            f"{cell(a['psnr']['rest'])} | {cell(a['ssim']['rest'], digits=3)} | "
            f"{'n/a' if nrev is None else nrev} / {'n/a' if nrest is None else nrest} | "
            f"{_fmt(a.get('sharpness'))} | {_fmt(a.get('motion'))} |")
    lines.append(f"| *{PAPER['label']}* | *{PAPER['psnr']}* | *{PAPER['ssim']}* | *{PAPER['lpips']}* | | | | | | | |")
    lines += ["", "Sharpness and motion: the generated frames' detail (adjacent-pixel differences) and change from "
                  "the frame before, each summed and divided by the same for the ground truth. 1 = as in reality; "
                  "below 1 = smoother or stiller, which PSNR can reward (copying the last frame has motion 0)."]
    if (cfgd["context"], cfgd["generate"]) != (PAPER["context"], PAPER["generate"]):
        lines.append("")
        lines.append(f"Note: this run used {cfgd['context']} -> {cfgd['generate']} frames, not the paper's 144 -> 156.")
    tf = gt.get("teacher_forced_summary")
    if tf:
        lines += ["", "## Teacher-forced next-frame prediction (ground-truth past)", "",
                  "| condition | PSNR | SSIM | LPIPS | PSNR revisit | PSNR rest |", "|---|---|---|---|---|---|"]
        for name in ("teacher_forced", "teacher_copy"):
            a = tf[name]
            lines.append(f"| {CONDITION_LABELS[name]} | {_fmt(a['psnr']['overall'])} | {_fmt(a['ssim']['overall'], 3)} | "
                         f"{_fmt(a['lpips']['overall'], 3)} | {cell(a['psnr']['revisit'])} | {cell(a['psnr']['rest'])} |")
    gp = gt.get("gaps") or {}
    if gp:
        lines += ["", "## Paired PSNR differences (95% bootstrap interval over episodes)", "",
                  "Both conditions scored on the same frames; episodes resampled with replacement 2,000 times.", "",
                  "| difference | dB | 95% interval | episodes with a positive difference |", "|---|---|---|---|"]
        for key, label in GAP_LABELS.items():
            g = gp.get(key)
            if g and g["gap"] is not None:
                interval = "n/a (1 episode)" if g["ci_low"] is None else f"{g['ci_low']:+.2f} .. {g['ci_high']:+.2f}"
                lines.append(f"| {label} | {g['gap']:+.2f} | {interval} | {g['episodes_positive']} of {g['episodes']} |")
        by_age = [row for row in gp.get("revisit_by_age") or [] if row["frames"]]
        if by_age:
            trained = ((cfgd.get("checkpoint_config") or {}).get("data") or {}).get("seq_len")
            lines += ["", "Revisit frames by how far back the memory must reach (frames since the latest old context "
                          "frame with the same pose)" + (f"; the transformer was trained on {trained}-frame sequences"
                                                          if trained else "") + ":", "",
                      "| frames back | revisit frames | long context | sliding window | difference | 95% interval |",
                      "|---|---|---|---|---|---|"]
            for row in by_age:
                lo, hi = row["ages"]
                lo = max(lo, int(cfgd.get("window") or 0))  # nothing is nearer than the window
                ages = f"{lo}+" if hi is None else f"{lo}-{hi - 1}"
                interval = "n/a" if row["ci_low"] is None else f"{row['ci_low']:+.2f} .. {row['ci_high']:+.2f}"
                lines.append(f"| {ages} | {row['frames']} | {_fmt(row['psnr']['multilevel'])} | "
                             f"{_fmt(row['psnr']['sliding'])} | {row['gap']:+.2f} | {interval} |")
        if "revisit_multilevel_vs_other_memory" in gp or "overall_multilevel_vs_other_memory" in gp:
            lines += ["", "The control has a long context too, but the frames already in L2 when generation "
                          "starts come from another test maze. Long context - sliding window mixes what the memory "
                          "holds with having a long context at all (the model always trains with one); long context "
                          "- control is what the right memory adds over a wrong one (which may also mislead: it "
                          "contradicts the window). Remembering places shows as a revisit difference above the "
                          "other frames' difference."]
    if cfgd.get("memory_control_status", "on") not in ("on", "off"):
        lines += ["", f"Memory control {cfgd['memory_control_status']}."]
    sc = res.get("self_consistency") or {}
    lines += ["", "## Self-consistency in generated worlds (revisited view vs the model's own earlier frame)", ""]
    if "summary" in sc:
        lines.append(f"Full turn = {sc['full_turn_steps']} x turn_left; loops = {sc['loops']}; out-and-back k = "
                     f"{sc['forward']}; poses from {sc['poses_from']}.")
        lines.append("")
        lines.append("| probe | condition | PSNR | SSIM | pairs | PSNR (pairs out of the window, age >= W) | pairs out of the window | "
                     "control: PSNR against the opposite view | sharpness | motion |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for pname, per in sc["summary"].items():
            for mode, row in per.items():
                lines.append(f"| {pname} | {mode} | {cell(row['psnr'])} | {cell(row['ssim'], digits=3)} | {row['psnr']['n']} | "
                             f"{cell(row['psnr_beyond_window'])} | {row['psnr_beyond_window']['n']} | "
                             f"{cell(row.get('psnr_opposite_view'))} | {_fmt(row.get('sharpness'))} | "
                             f"{_fmt(row.get('motion'))} |")
        lines += ["", "Control: each revisited view scored against the earlier frame at the same spot that looks most "
                      "the other way (at least 90 degrees off). A model that remembers the place scores the probe "
                      "above its control; one that paints every view alike scores them the same. Sharpness and "
                      "motion compare the generated frames with the simulator's along the same path (1 = as in "
                      "reality): a view that stops turning scores well on the probe and shows low motion here."]
        if isinstance(sc.get("out_and_back"), str):
            lines.append(f"\nout_and_back: {sc['out_and_back']}")
    else:
        lines.append(f"skipped: {sc.get('skipped', 'n/a')}")
    lines += ["", "Metric definitions: " + res["metrics"]["definitions"]["psnr"] + " " + res["metrics"]["definitions"]["ssim"], ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run


def _definitions() -> dict[str, str]:
    return {
        "psnr": f"PSNR: 10 log10(255^2 / MSE) per frame over all HxWx3 uint8 values, capped at {metrics.PSNR_CAP_DB:g} dB.",
        "ssim": "SSIM: Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03, range 255, valid positions, "
                "mean over positions then RGB channels (= tf.image.ssim / TECO; skimage gaussian_weights=True).",
        "lpips": "LPIPS: AlexNet v0.1 (lpips package), inputs in [-1, 1], only from local weights.",
        "overall": "Overall: mean of per-frame values over each episode's generated frames, then over episodes (TECO).",
        "revisit": f"Revisit: pose within {metrics.REVISIT_DISTANCE_CELLS} cell and {metrics.REVISIT_YAW_DEGREES:g} deg "
                   "(yaw wrapped) of a context frame with index < K - W + 1 (no longer in the short window); pooled over frames.",
    }


def run_eval(cfg: EvalConfig, world: Any = None, checkpoint_path: str | Path | None = None) -> dict[str, Any]:
    """Run the whole evaluation and write every output into `cfg.out`; returns the results dict.
    A given world's transformer runs with cfg.memory_span (if set) and is given its own back."""
    far = getattr(world, "far", None)
    own = None if far is None else far.config
    try:
        with contextlib.ExitStack() as held:  # the --out folder's lock, taken inside, ends with the run
            return _run_eval(cfg, world, checkpoint_path, held)
    finally:
        if far is not None:
            far.config = own


def _with_memory_span(world: Any, span: int | None) -> None:
    if span is None or getattr(world, "far", None) is None:
        return
    try:
        world.far.config = dataclasses.replace(world.far.config, memory_span=span)
    except ValueError as exc:
        raise EvalError(f"--memory-span: {exc}") from None


def _run_eval(cfg: EvalConfig, world: Any, checkpoint_path: str | Path | None,
              held: contextlib.ExitStack) -> dict[str, Any]:
    import torch

    t_start = time.perf_counter()
    if cfg.context < 1 or cfg.generate < 1:
        raise EvalError("--context and --generate must be >= 1")
    from worldsim.sampler import MAX_STEPS, MAX_STILL_FRAMES

    if cfg.steps is not None and not 1 <= cfg.steps <= MAX_STEPS:
        raise EvalError(f"--steps must be from 1 to {MAX_STEPS}, got {cfg.steps}")
    if not 0 <= cfg.still_frames <= MAX_STILL_FRAMES:
        raise EvalError(f"--still-frames must be from 0 to {MAX_STILL_FRAMES}, got {cfg.still_frames}")
    if cfg.memory_frames < 0:
        raise EvalError(f"--memory-frames must be >= 0 (0: every frame), got {cfg.memory_frames}")
    if cfg.memory_span is not None and cfg.memory_span < 0:
        raise EvalError(f"--memory-span must be >= 0 (0: frame indices), got {cfg.memory_span}")
    if cfg.threads is not None and cfg.threads < 1:
        raise EvalError(f"--threads must be >= 1, got {cfg.threads}")
    from worldsim.sampler import setting_problem

    for name in ("cfg", "shift", "temperature", "generated_noise"):
        value = getattr(cfg, name)
        if value is not None and (problem := setting_problem(name, value)):
            raise EvalError(f"--{name.replace('_', '-')} {problem}")
    if cfg.episodes < 1:  # the self-consistency probes run after them, and the summary needs one
        raise EvalError(f"--episodes must be >= 1, got {cfg.episodes} (for mostly the probes: --episodes 1 "
                        "--teacher-forcing false --memory-control false)")
    # checked before anything runs: the probes come after the whole ground-truth run
    for name, low in (("videos", 0), ("probe_episodes", 0), ("probe_context", 1), ("probe_forward", 0),
                      ("probe_loops", 1)):
        if getattr(cfg, name) < low:
            raise EvalError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(cfg, name)}")
    # torch's CPU generator and the recorder keep a seed's low 32 bits: --seed 2**32 scored exactly the
    # sessions of --seed 0 (and from 2**63 on torch's seeding overflowed with a traceback)
    if not 0 <= cfg.seed < 2**32:
        raise EvalError(f"--seed must be from 0 to 2**32 - 1, got {cfg.seed}")
    # a session takes --seed + its episode index, below 2**32 too (WorldModel.new_session's bound): checked
    # here, not when the last episode's session refuses it
    last = 2**32 - max(cfg.episodes, cfg.probe_episodes, 1)
    if cfg.seed > last:
        raise EvalError(f"--seed {cfg.seed}: the sessions take --seed + the episode index, up to 2**32 - 1; "
                        f"give --seed <= {last} for {max(cfg.episodes, cfg.probe_episodes)} episodes")
    if cfg.data is None and cfg.record_length is not None and cfg.record_length < cfg.context + cfg.generate:
        # else recorded first and refused after (a negative one named record's options; 0 meant the default)
        raise EvalError(f"--record-length must be at least --context + --generate = {cfg.context + cfg.generate}, "
                        f"got {cfg.record_length}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # a folder it cannot write in was found only after the whole eval (22 minutes for the bars)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        from worldsim.dataset import FILE_SYSTEM_REFUSALS

        if exc.errno in FILE_SYSTEM_REFUSALS:  # no permission, a full disk: exit 1 naming it, as every command
            exc.filename = str(out)
            raise
        raise EvalError(f"--out {out}: cannot create the results folder ({exc.strerror or exc})") from None
    # Two evals into one --out write the same names (episode_<id>.mp4, results.*) and each removes the
    # videos the other's results.json lists: what is left would mix two runs. One at a time.
    from worldsim.dataset import try_lock

    lock = try_lock(out / ".lock")
    if lock is None:
        raise EvalError(f"--out {out}: another `worldsim eval` is writing its results there (locked "
                        f"{out / '.lock'}); wait for it, or choose another --out")
    held.callback(lock.close)
    # This run's videos, tables and plot are written here and moved into --out together at the end,
    # results.json last: written straight into --out, the videos of a run killed mid-way (SIGKILL, the
    # out-of-memory killer) replaced those of the run before it under the same names, beside that run's
    # results.json, which then presented them as its own. The folder is this eval's while it holds the
    # lock, so one found here was left by a killed eval and goes.
    staging = out / UNFINISHED
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(exist_ok=True)  # what could not be removed is never moved: only this run's names are
    except OSError as exc:
        exc.filename = str(staging)
        raise
    held.callback(shutil.rmtree, staging, True)  # on any end, before the lock goes (the stack unwinds in reverse)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)

    if world is None:
        from worldsim.world import WorldModel

        checkpoint_path = resolve_checkpoint(cfg.checkpoint)
        world = WorldModel.load(checkpoint_path, device=cfg.device, precision=cfg.precision)
    _with_memory_span(world, cfg.memory_span)
    # named by its path in a refusal of its simulator: "the checkpoint" left the user to guess which file
    sim_source = f"checkpoint {checkpoint_path}" if checkpoint_path is not None else "the checkpoint"
    window = model_window(world)
    if cfg.still_frames and "noop" not in world.action_names:  # the first action may move
        raise EvalError(f"--still-frames {cfg.still_frames} needs a 'noop' action; the checkpoint has "
                        f"{', '.join(world.action_names)}")

    ok, why = metrics.lpips_status()
    lpips = None
    if ok:
        try:
            lpips = metrics.Lpips(device="cpu")
        except Exception as exc:  # broken install: report, never approximate
            ok, why = False, f"failed to load ({type(exc).__name__}: {exc})"

    # data
    length = cfg.context + cfg.generate
    if cfg.data is not None:
        data_path = Path(cfg.data)
        recorded = False
    else:
        data_path = out / "data"
        record_length = length if cfg.record_length is None else cfg.record_length
        record_test_episodes(world, data_path, cfg.episodes, record_length, cfg.seed, cfg.progress, cfg.split,
                             sim_source)
        recorded = True
    ds, split_note = load_test_split(data_path, world, cfg.split)
    if len(ds) == 0:
        raise EvalError(f"{data_path}: no episodes in the {cfg.split} split")
    usable = [e for e in ds.episodes if e.length >= length]
    if not usable:
        raise EvalError(f"{data_path}: no {cfg.split} episode has {length} frames (context {cfg.context} + generate "
                        f"{cfg.generate}); the longest has {max(e.length for e in ds.episodes)}")
    chosen = usable[: cfg.episodes]
    skipped = [e.id for e in ds.episodes if e.length < length]
    notes = []  # said on stderr now and at the top of results.md
    if len(chosen) < cfg.episodes:
        notes.append(f"{len(chosen)} of the {cfg.episodes} episodes asked for: the {cfg.split} split holds "
                     f"{len(usable)} with {length} frames" + (f" ({len(skipped)} shorter skipped)" if skipped else ""))
    if cfg.split != "test" and split_note.startswith("all episodes"):
        notes.append(f"--split {cfg.split} does not apply to files without split information: every episode is scored")
    differs = _simulator_differences(ds.simulator, getattr(world, "simulator", None))
    if differs:
        notes.append(f"the dataset's simulator differs from the one the checkpoint was trained on ({differs}): "
                     "the same action names may mean other moves")
    for note in notes:
        print(f"worldsim eval: note: {note}", file=sys.stderr)

    # the control swaps the frames that are already in L2 when the first frame is generated
    old_frames = cfg.context - window + 1
    # a donor gives only its first old_frames frames: an episode too short to be scored can serve
    donors = [e for e in ds.episodes if e.length >= max(1, old_frames)]
    control = "on"
    if not cfg.memory_control:
        control = "off"
    elif old_frames < 1:
        control = (f"skipped: the context ({cfg.context}) fits in the short window ({window}), no recorded frame "
                   "is in L2" + (" (only the still frames)" if cfg.still_frames else ""))
    elif any(memory_donor(donors, donors.index(e)) is None for e in chosen):
        control = "skipped: no test episode of another maze to take the long context from"
    gen_names = GEN_CONDITIONS + ((MEMORY_CONTROL,) if control == "on" else ())
    names = CONDITIONS + ((MEMORY_CONTROL,) if control == "on" else ())

    per_ep_frames = cfg.generate * (len(gen_names) + int(cfg.teacher_forcing))
    bar = _progress(per_ep_frames * len(chosen), "eval", cfg.progress)
    episodes: list[dict[str, Any]] = []
    tf_episodes: list[dict[str, Any]] = []
    videos: list[str] = []
    timing = {"generate_s": 0.0, "frames": 0}
    interrupted = False
    write_error: OSError | None = None
    try:
        for i, info in enumerate(chosen):
            ep = ds.load(info)
            seed = cfg.seed + i
            truth = ep.video[:length]
            acts = ep.actions[:length]
            poses = ep.poses[:length] if ep.poses is not None else None
            gens: dict[str, np.ndarray] = {}
            t0 = time.perf_counter()
            for mode in GEN_CONDITIONS:
                gens[mode] = generate(world, truth, acts, cfg.context, cfg.generate, _cache_of(mode, cfg), cfg.steps,
                                      cfg.cfg, seed, bar, shift=cfg.shift, generated_noise=cfg.generated_noise,
                                      temperature=cfg.temperature, still_frames=cfg.still_frames,
                                      memory_frames=cfg.memory_frames or None)
            donor_id = None
            if control == "on":
                donor = memory_donor(donors, donors.index(info))
                dep = ds.load(donor)
                swapped, swapped_acts = with_other_memory(truth, acts, dep.video, dep.actions, old_frames)
                gens[MEMORY_CONTROL] = generate(world, swapped, swapped_acts, cfg.context, cfg.generate,
                                                _cache_of("multilevel", cfg), cfg.steps, cfg.cfg, seed, bar,
                                                shift=cfg.shift, generated_noise=cfg.generated_noise,
                                                temperature=cfg.temperature, still_frames=cfg.still_frames,
                                                memory_frames=cfg.memory_frames or None)
                donor_id = donor.id
            timing["generate_s"] += time.perf_counter() - t0
            timing["frames"] += cfg.generate * len(gen_names)
            gens["copy_last"] = copy_last(truth, cfg.context, cfg.generate)
            gens["autoencoder"] = autoencoded(world, truth, cfg.context, cfg.generate)
            scored = score_episode(truth, gens, poses, cfg.context, window, lpips)
            scored.update(id=ep.id, maze_seed=ep.maze_seed, seed=seed, length=len(ep), memory_donor=donor_id)
            episodes.append(scored)
            if cfg.teacher_forcing:
                tf = teacher_forced(world, truth, acts, cfg.context, cfg.generate, cfg.steps, cfg.cfg, seed, bar,
                                    cache_mode=cfg.long_cache, shift=cfg.shift, temperature=cfg.temperature,
                                    memory_frames=cfg.memory_frames or None)
                tgen = {"teacher_forced": tf, "teacher_copy": truth[cfg.context - 1:length - 1]}
                tsc = score_episode(truth, tgen, poses, cfg.context, window, lpips)
                tsc.update(id=ep.id)
                tf_episodes.append(tsc)
            if i < cfg.videos:
                try:
                    vpath = write_video(staging / f"episode_{ep.id}.mp4", truth, gens, cfg.context, scored["revisit"])
                except OSError as exc:  # a full disk: the episodes scored so far are still written, then it stops
                    write_error = _named_in_out(exc, staging, out)
                    break
                videos.append(vpath.name)
    except KeyboardInterrupt:  # keep what is done: finish the outputs for the episodes so far
        interrupted = True
    finally:
        bar.close()

    if cfg.teacher_forcing and len(tf_episodes) != len(episodes):  # interrupted between the two
        episodes = episodes[: len(tf_episodes)]
    if not episodes:  # interrupted before one episode was done: nothing to write
        raise KeyboardInterrupt
    lpips_on = lpips is not None
    unposed = len(episodes) - len(_posed(episodes))
    if 0 < unposed < len(episodes):
        notes.append(f"{unposed} of {len(episodes)} episodes have no poses: the revisit and rest numbers pool the "
                     f"other {len(episodes) - unposed}")
        print(f"worldsim eval: note: {notes[-1]}", file=sys.stderr)
    summary = aggregate(episodes, names, lpips_on)
    tf_summary = aggregate(tf_episodes, ("teacher_forced", "teacher_copy"), lpips_on) if tf_episodes else None
    gap_summary = gaps(episodes, tf_episodes, cfg.seed)

    sc: dict[str, Any] = {"skipped": "interrupted"}
    probes_interrupted = False
    if write_error is not None:
        sc = {"skipped": "stopped: a video could not be written"}
        notes.append(f"stopped: a video could not be written ({write_error.filename}: "
                     f"{write_error.strerror or write_error}); {len(episodes)} of {len(chosen)} episodes scored, "
                     "no probes")
    elif not interrupted:
        try:
            sc = self_consistency(world, cfg, ds, cfg.progress, sim_source)
        except KeyboardInterrupt:
            interrupted = probes_interrupted = True
        except EvalError as exc:  # e.g. --probe-context longer than the episodes: keep the ground truth
            sc = {"skipped": str(exc)}
            print(f"worldsim eval: probes skipped: {exc}", file=sys.stderr)
    if interrupted:
        notes.append("interrupted during the self-consistency probes" if probes_interrupted
                     else f"interrupted after {len(episodes)} of {len(chosen)} episodes")

    def ep_json(e: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in e.items() if k != "conditions"} | {"per_frame": e["conditions"]}

    world_config = getattr(world, "config", None)
    checkpoint_sampler = world.sampler  # config.json's over the library's defaults
    results = {
        "format": RESULTS_FORMAT, "format_version": RESULTS_VERSION,
        "interrupted": interrupted or write_error is not None,  # either way: the episodes finished, not all
        "config": asdict(cfg) | {
            "checkpoint": str(checkpoint_path) if checkpoint_path is not None else None,
            "checkpoint_config": world_config,
            "dataset": str(data_path), "dataset_recorded_here": recorded,
            "dataset_simulator": ds.simulator, "dataset_split": split_note,
            "episode_ids": [e["id"] for e in episodes], "skipped_short_episodes": skipped,
            "session_seeds": [e["seed"] for e in episodes],
            "window": window, "resolution": list(world.resolution), "action_names": list(world.action_names),
            "precision_used": getattr(world, "precision", None),  # --precision auto, resolved
            "memory_span_used": getattr(getattr(getattr(world, "far", None), "config", None), "memory_span", None),
            "conditions": {k: CONDITION_LABELS[k] for k in names},
            "memory_control_status": control, "memory_control_old_frames": max(0, old_frames),
            "memory_donor_episode_ids": [e["memory_donor"] for e in episodes] if control == "on" else [],
            # what the sessions used: the options, or the checkpoint's sampler defaults
            "sampler_used": {k: getattr(cfg, k) if getattr(cfg, k) is not None else checkpoint_sampler.get(k)
                             for k in ("steps", "cfg", "shift", "temperature", "generated_noise")}
            | {"context_noise": checkpoint_sampler.get("context_noise")},
        },
        "metrics": {"definitions": _definitions(),
                    "lpips": {"available": lpips_on, "status": why if lpips_on else f"unavailable: {why}"}},
        "paper": PAPER,
        "ground_truth": {
            "episodes_evaluated": len(episodes),
            "summary": summary,
            "teacher_forced_summary": tf_summary,
            "gaps": gap_summary,
            "episodes": [ep_json(e) for e in episodes],
            "teacher_forced_episodes": [ep_json(e) for e in tf_episodes],
        },
        "self_consistency": sc,
        "notes": notes,
        "outputs": {"json": "results.json", "markdown": "results.md", "plot": "psnr_vs_frame.png", "videos": videos},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                        "device": str(cfg.device or getattr(world, "device", "auto"))},
        "timing": {"generate_s": timing["generate_s"],
                   "s_per_generated_frame": timing["generate_s"] / max(1, timing["frames"]),
                   "total_s": time.perf_counter() - t_start},
    }
    results = _jsonable(results)

    from worldsim.dataset import interrupts_held

    if interrupted:
        print(f"worldsim eval: writing the results of the {len(episodes)} finished episode(s) ...", file=sys.stderr)
    late_error: OSError | None = None
    with interrupts_held():  # a second Ctrl-C here lost every finished episode
        # the numbers first: a disk that fills up at the plot keeps them (a full disk here keeps the
        # earlier run's outputs whole: nothing has moved yet)
        try:
            _write_text(staging / "results.json", json.dumps(results, indent=1, allow_nan=False) + "\n")
        except OSError as exc:  # named as the file in --out, as a video's and the plot's are
            raise _named_in_out(exc, staging, out) from None
        try:
            _write_text(staging / "results.md", results_markdown(results))
            plot_results(results, staging / "psnr_vs_frame.png")
        except OSError as exc:
            late_error = _named_in_out(exc, staging, out)
        _move_into_place(out, staging, videos)
    if write_error is not None:
        raise write_error
    if late_error is not None:
        raise late_error
    return results


def _named_in_out(exc: OSError, staging: Path, out: Path) -> OSError:
    """The error of a write into the staging folder, naming the file's place in --out (the user's name for it)."""
    if exc.filename is not None and Path(exc.filename).parent == staging:
        exc.filename = str(out / Path(exc.filename).name)
    return exc


def _move_into_place(out: Path, staging: Path, videos: list[str]) -> None:
    """Replace the outputs of an earlier eval in `out` with this run's, written complete in `staging`.
    Its results.json goes first and the new one comes last, so that no results.json ever stands
    beside another run's videos or plot (a kill in between leaves none: the earlier run was being
    replaced, and this one's files are in `staging` until the next eval sweeps it); renames in one
    folder, nothing copied. Files no eval listed (the user's) stay."""
    earlier = _earlier_videos(out)
    (out / "results.json").unlink(missing_ok=True)
    for name in earlier:  # an earlier eval's in a reused --out (and only those): not this run's
        if name not in videos and (out / name).is_file():
            (out / name).unlink()
    for name in videos:
        os.replace(staging / name, out / name)
    for name in ("results.md", "psnr_vs_frame.png"):
        if (staging / name).is_file():
            os.replace(staging / name, out / name)
        else:  # not written (a full disk): the earlier run's would read as this one's
            (out / name).unlink(missing_ok=True)
    os.replace(staging / "results.json", out / "results.json")


def _earlier_videos(out: Path) -> list[str]:
    """The videos an earlier eval in `out` listed in its results.json (file names, nothing else)."""
    try:
        listed = json.loads((out / "results.json").read_text())["outputs"]["videos"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [v for v in listed if isinstance(v, str) and v == Path(v).name and v.startswith("episode_")]


def results_shape_problem(results: Any) -> str | None:
    """What is wrong with the shape of a loaded results.json (None: nothing), checked before the
    per-frame numbers are read, so a hand-edited or damaged file is named rather than a traceback."""
    if not isinstance(results, dict):
        return f"a JSON {type(results).__name__}, not an object"
    if results.get("format") != RESULTS_FORMAT:
        return f"format {results.get('format')!r}, not {RESULTS_FORMAT!r}"
    if results.get("format_version") != RESULTS_VERSION:  # another version's numbers may mean other things
        return f"format_version {results.get('format_version')!r}; this worldsim reads version {RESULTS_VERSION}"
    gt = results.get("ground_truth")
    if not isinstance(results.get("config"), dict) or not isinstance(gt, dict) or not isinstance(gt.get("summary"), dict):
        return "'config' or 'ground_truth' with its 'summary' is missing or has the wrong shape"
    missing = [f"config.{key}" for key in RESULTS_CONFIG_KEYS if key not in results["config"]]
    missing += [] if isinstance(results.get("metrics"), dict) else ["metrics"]
    missing += [] if "teacher_forced_episodes" in gt else ["ground_truth.teacher_forced_episodes"]
    if missing:
        return f"no {', '.join(missing)}"
    episodes = gt.get("episodes")
    if not isinstance(episodes, list) or not episodes:
        return "'ground_truth.episodes' is missing or empty"
    tf = gt.get("teacher_forced_episodes") or []
    if not isinstance(tf, list) or not all(
            isinstance(e, dict) and isinstance(e.get("per_frame"), dict)
            and all(isinstance(per, dict) for per in e["per_frame"].values()) for e in episodes + tf):
        return "an episode without a 'per_frame' of conditions"
    # each episode is scored on the same conditions as the summary (gaps and the plot read them all)
    if any(set(e["per_frame"]) != set(gt["summary"]) for e in episodes):
        return "an episode's conditions differ from those of 'ground_truth.summary'"
    if any("revisit" not in e for e in episodes):
        return "an episode without its 'revisit' frames (null where poses are unknown)"
    if tf and not (isinstance(gt.get("teacher_forced_summary"), dict)
                   and all(set(e["per_frame"]) == set(gt["teacher_forced_summary"]) for e in tf)):
        return "teacher-forced episodes whose conditions differ from 'teacher_forced_summary' (or without it)"
    return None


def rescore(folder: str | Path) -> dict[str, Any]:
    """Recompute the paired differences, results.md and psnr_vs_frame.png of an earlier run from its
    results.json (per-frame numbers), writing all three back; returns the updated results."""
    folder = Path(folder)
    if not folder.is_dir():
        return _rescore_locked(folder)
    # An eval running into the folder moves its results in at its end: read before and written after
    # that move, a rescore replaced the new run's numbers with the old run's. Its lock, as a second eval.
    from worldsim.dataset import try_lock

    lock_existed = (folder / ".lock").exists()
    try:
        lock = try_lock(folder / ".lock")
    except OSError:  # a folder it may not write: the writes below say so, naming the file
        return _rescore_locked(folder)
    if lock is None:
        raise EvalError(f"{folder}: a `worldsim eval` is writing its results there (locked {folder / '.lock'}); "
                        f"rescore it when that eval has finished")
    try:
        return _rescore_locked(folder)
    finally:
        if not lock_existed:
            with contextlib.suppress(OSError):
                (folder / ".lock").unlink()
        lock.close()


def _rescore_locked(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"

    def arrays(eps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"conditions": {name: {m: np.asarray(v, dtype=np.float64) for m, v in per.items() if v is not None}
                                for name, per in e["per_frame"].items()},
                 "revisit": None if e.get("revisit") is None else np.asarray(e["revisit"], dtype=bool),
                 "revisit_age": None if e.get("revisit_age") is None else np.asarray(e["revisit_age"])}
                for e in eps]

    try:
        results = json.loads(path.read_text())
        problem = results_shape_problem(results)
        seed = None if problem else int(results["config"].get("seed", 0))
    except (FileNotFoundError, NotADirectoryError):  # the latter: a file given (was exit 1, "Not a directory")
        raise EvalError(f"{path}: not found (--rescore takes the folder of an earlier `worldsim eval --out`)") from None
    except (ValueError, TypeError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        raise EvalError(f"{path}: not a worldsim eval results file ({problem})")
    gt = results["ground_truth"]
    try:
        gt["gaps"] = gaps(arrays(gt["episodes"]), arrays(gt.get("teacher_forced_episodes") or []), seed)
        results = _jsonable(results)
        markdown = results_markdown(results)
        plot_results(results, folder / "psnr_vs_frame.png")
    except (KeyError, TypeError, ValueError) as exc:  # a hand-edited file the shape check let through
        raise EvalError(f"{path}: not a worldsim eval results file ({type(exc).__name__}: {exc})") from None
    _write_text(folder / "results.md", markdown)
    _write_text(path, json.dumps(results, indent=1, allow_nan=False) + "\n")
    return results


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, EvalConfig)


def _run_eval_leaving_no_empty_out(cfg: EvalConfig) -> dict[str, Any]:
    """run_eval, but a refusal (no such checkpoint or data, a bad device) or a Ctrl-C before anything
    was written does not leave behind the empty --out folder run_eval made early to check it may
    write there, nor its .lock in a folder of the user's (a typo'd checkpoint with --out .)."""
    out = Path(cfg.out)
    out_existed, lock_existed = out.exists(), (out / ".lock").exists()
    try:
        return run_eval(cfg)
    except BaseException:
        if not lock_existed:
            _remove_unheld_lock(out)
        if not out_existed:
            with contextlib.suppress(OSError):  # only an empty folder: rmdir refuses any other
                out.rmdir()
        raise


def _remove_unheld_lock(out: Path) -> None:
    """Remove out/.lock unless an eval holds it. The lock is taken again before its file goes: the
    eval whose lock refused this one may have made the folder after this one looked (both started
    into a new --out), and removing its .lock and still-empty folder left it writing nowhere and let
    a third eval lock the folder beside it."""
    from worldsim.dataset import try_lock

    with contextlib.suppress(OSError):
        lock = try_lock(out / ".lock")
        if lock is None:  # another eval's, running there
            return
        try:
            (out / ".lock").unlink()
        finally:
            lock.close()


def main(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(EvalConfig, args)
    if cfg.rescore is not None:
        default = EvalConfig()
        ignored = [f.name for f in dataclasses.fields(EvalConfig) if f.name not in ("rescore", "progress")
                   and getattr(cfg, f.name) != getattr(default, f.name)]
        if ignored:  # they were silently dropped: the folder is rewritten from its results.json alone
            print(f"worldsim eval: --rescore rewrites {cfg.rescore} in place from its results.json alone; drop "
                  f"{', '.join('--' + n.replace('_', '-') for n in ignored)}", file=sys.stderr)
            return 2
        try:
            rescore(cfg.rescore)
        except EvalError as exc:
            print(f"worldsim eval: {exc}", file=sys.stderr)
            return 2
        print((Path(cfg.rescore) / "results.md").read_text())
        print(f"rewrote {cfg.rescore}/results.json, results.md and psnr_vs_frame.png")
        return 0
    try:
        results = _run_eval_leaving_no_empty_out(cfg)
    except EvalError as exc:
        print(f"worldsim eval: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from worldsim.dataset import DatasetError

        user_facing = ("CheckpointError", "RecordError", "CheckpointNotFound", "DeviceError", "UntrustedSimulator")
        if isinstance(exc, DatasetError) or type(exc).__name__ in user_facing:
            print(f"worldsim eval: {exc}", file=sys.stderr)
            return 2
        raise
    print((Path(cfg.out) / "results.md").read_text())
    if results.get("interrupted"):
        print(f"worldsim eval: interrupted; results for the {results['ground_truth']['episodes_evaluated']} finished "
              f"episode(s) are in {cfg.out}", file=sys.stderr)
        return 130
    print(f"wrote {cfg.out}/results.json, results.md, psnr_vs_frame.png and "
          f"{len(results['outputs']['videos'])} video(s)")
    return 0
