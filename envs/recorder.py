"""Record trajectories from a simulator into a dataset (`worldsim record`).

    worldsim record --env worldsim/Maze-v0 --episodes 200 --length 300 --out data/maze
    worldsim record --env worldsim/Maze-v0 --env-arg maze_size=15 resolution=32 --out data/m15

Episodes are recorded in parallel worker processes (one simulator each) and each is written
atomically to `episodes/<id>.npz` (temp file in the same folder, then rename); `index.json`
is rewritten atomically after every finished episode. Ctrl-C keeps every finished episode
and leaves a valid dataset; rerunning the same command resumes, skipping finished episodes.
A rerun with different settings (simulator, its settings, length, policy, seeds, split
filter) into the same folder is refused.

Maze seeds: episode k uses maze seed `start_maze_seed + k`, or, with `--split train|val|test`,
the k-th seed from `start_maze_seed` upward that lies in that split. The split of every
episode is `split_for_maze_seed(maze_seed)`, so no maze is ever in two splits, in this or
any other dataset.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
import zipfile
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from worldsim.cliargs import add_dataclass_arguments, dataclass_from_args
from worldsim.dataset import (
    EPISODES_DIR, FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, file_in_the_way, interrupts_held, npz_headers,
    split_for_maze_seed, try_lock, write_episode_atomic, write_json_atomic,
)


class RecordError(RuntimeError):
    """The recording cannot start (bad settings, or an existing dataset that differs)."""


@dataclass
class RecordConfig:
    out: str = field(metadata={"help": "dataset folder to create or resume"})
    env: str = field(default="worldsim/Maze-v0", metadata={"help": "Gymnasium id of the simulator"})
    env_arg: tuple[str, ...] = field(default=(), metadata={
        "help": "simulator settings as key=value (values parsed as JSON when possible), e.g. maze_size=15"})
    episodes: int = field(default=100, metadata={"help": "number of episodes in the dataset"})
    length: int = field(default=300, metadata={
        "help": "frames per episode, the first being the reset frame (an episode the simulator ends "
                "earlier, e.g. by its max_steps, is kept shorter)"})
    policy: Literal["random", "navigator", "mix"] = field(default="mix", metadata={
        "help": "exploration policy (mix: navigator or random walk, drawn per episode)"})
    workers: int | None = field(default=None, metadata={"help": "worker processes; none = number of CPU cores"})
    start_maze_seed: int = field(default=0, metadata={"help": "first maze seed"})
    split: Literal["all", "train", "val", "test"] = field(default="all", metadata={
        "help": "record only mazes of this split (seeds are drawn until enough lie in it)"})
    seed: int = field(default=0, metadata={"help": "seed of the policies and the simulator resets, 0 to 2**32 - 1"})
    compress: bool = field(default=True, metadata={"help": "zlib-compress episode files"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (on a terminal; never in a redirected log)"})


# ----------------------------------------------------------------------------- settings


def parse_env_args(items: tuple[str, ...] | list[str] | None) -> dict[str, Any]:
    """`["maze_size=15", "name=foo"]` -> `{"maze_size": 15, "name": "foo"}` (JSON values when they parse)."""
    settings: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise RecordError(f"--env-arg expects key=value, got {item!r}")
        low = text.strip().lower()
        if low in ("true", "false"):
            value: Any = low == "true"
        elif low in ("none", "null"):
            value = None
        elif low in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):  # numbers, which the simulator's range checks name
            value = float(low)
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
        settings[key] = value
    return settings


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so settings compare equal to what index.json holds."""
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON-serialisable: {o!r}")
    return json.loads(json.dumps(obj, default=default))


def _make_env(env_id: str, settings: dict[str, Any]) -> Any:
    import gymnasium as gym

    import envs  # noqa: F401  (registers the worldsim/* ids)

    try:
        return gym.make(env_id, **settings)
    except gym.error.Error as exc:
        raise RecordError(f"cannot create simulator {env_id!r}: {exc}") from None
    except (ImportError, TypeError, ValueError) as exc:
        raise RecordError(f"cannot create simulator {env_id!r} with settings {settings}: "
                          f"{type(exc).__name__}: {exc}") from None


def plan_maze_seeds(episodes: int, start: int, split: str) -> list[int]:
    """The maze seed of each episode: consecutive seeds, or the next ones inside `split`."""
    if split == "all":
        return [start + k for k in range(episodes)]
    seeds = []
    for s in count(start):
        if len(seeds) >= episodes:
            break
        if split_for_maze_seed(s) == split:
            seeds.append(s)
    return seeds


def episode_id(k: int) -> str:
    return f"{k:06d}"


# ----------------------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _worker_init(env_id: str, settings: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _WORKER.clear()
    # close the simulator when the worker ends, before the interpreter's exit handlers: dm_control's
    # (Memory Maze) print tracebacks for a renderer still open then
    from multiprocessing import util

    util.Finalize(None, _close_env, exitpriority=10)
    _die_with_parent()


def _die_with_parent() -> None:
    """A worker whose parent was killed (SIGKILL, or SIGTERM before its handler) stops instead of
    recording on alone (Linux; elsewhere the parent's pool.terminate() is the only stop)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _get_env(env_id: str, settings: dict[str, Any]) -> Any:
    """The simulator of this process, kept between episodes (building one can take seconds)."""
    key = (env_id, json.dumps(settings, sort_keys=True))
    if _WORKER.get("key") != key:
        _close_env()
        _WORKER["env"] = _make_env(env_id, settings)
        _WORKER["key"] = key
    return _WORKER["env"]


def _close_env() -> None:
    """Close the cached simulator (the in-process one when recording with one worker: left
    open, a DeepMind Lab or MuJoCo simulator would hold its renderer until exit)."""
    env = _WORKER.pop("env", None)
    _WORKER.clear()
    if env is not None:
        env.close()


def episode_rngs(seed: int, maze_seed: int) -> tuple[int, np.random.Generator]:
    """(reset seed, policy generator) of the episode on `maze_seed`: the two children of
    SeedSequence([seed, maze_seed, 0x57]), each taken modulo 2**32. The index records this recipe as
    "SeedSequence([seed, maze_seed])", a string that resume compares, so it stays as it was written."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(maze_seed) & 0xFFFFFFFF, 0x57])
    reset_ss, policy_ss = ss.spawn(2)
    return int(reset_ss.generate_state(1)[0] & 0x7FFFFFFF), np.random.default_rng(policy_ss)


def _pose(info: dict[str, Any], maze_seed: int, step: int) -> np.ndarray:
    """info["pose"]'s (x, y, yaw), checked here: a simulator's NaN or missing pose recorded a dataset that
    every later command refused (Dataset.load names the frame, but the recording was already spent)."""
    where = f"maze seed {maze_seed}, step {step}"
    if info.get("pose") is None:
        raise RecordError(f"{where}: info has no 'pose', though the reset's info had one")
    try:
        pose = np.asarray(info["pose"], dtype=np.float64).reshape(-1)[:3]
    except (TypeError, ValueError):
        pose = np.empty(0)
    with np.errstate(over="ignore"):  # checked below: a finite float64 beyond float32's range is inf there
        stored = pose.astype(np.float32)  # what the dataset holds, and Dataset.load checks
    if pose.shape != (3,) or not np.isfinite(stored).all():
        # one line: numpy wraps the repr of a longer array (a 6- or 7-number pose) over several
        shown = " ".join(repr(info["pose"]).split())
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        beyond = " within float32's range (the dataset's type)" if np.isfinite(pose).all() else ""
        raise RecordError(f"{where}: info['pose'] is {shown}, not at least 3 finite numbers (x, y, yaw){beyond}")
    return stored


def record_episode(env: Any, policy_name: str, length: int, maze_seed: int, seed: int) -> dict[str, Any]:
    """Run one episode; returns the arrays to store (video, actions, poses?) and metadata."""
    from envs.policies import make_policy

    base = env.unwrapped
    names = tuple(base.action_names)
    if "noop" not in names:
        raise RecordError(f"the simulator has no 'noop' action (actions[0] must be noop): {list(names)}")
    noop = names.index("noop")
    reset_seed, rng = episode_rngs(seed, maze_seed)
    policy = make_policy(policy_name, rng)
    obs, info = env.reset(seed=reset_seed, options={"maze_seed": int(maze_seed)})
    obs = np.asarray(obs)
    video = np.empty((length, *obs.shape), dtype=np.uint8)
    actions = np.full(length, noop, dtype=np.int64)
    has_pose = info.get("pose") is not None
    poses = np.zeros((length, 3), dtype=np.float32) if has_pose else None
    video[0] = obs
    if poses is not None:
        poses[0] = _pose(info, maze_seed, 0)
    policy.reset(env, obs, info)
    n = length
    for t in range(1, length):
        a = int(policy.act(obs, info))
        obs, _, terminated, truncated, info = env.step(a)
        # DeepMind Lab: the level ended in this step and showed nothing of it, or it respawned the
        # player elsewhere (a goal level's restart): actions[t] must be what produced video[t], so the
        # step is left out and the episode ends there
        if info.get("stale_frame") or info.get("respawned"):
            n = t
            break
        video[t] = obs
        actions[t] = a
        if poses is not None:
            poses[t] = _pose(info, maze_seed, t)
        if terminated or truncated:
            n = t + 1
            break
    out = {"video": video[:n], "actions": actions[:n], "maze_seed": int(maze_seed),
           "reset_seed": reset_seed, "policy": policy.episode_policy}
    if poses is not None:
        out["poses"] = poses[:n]
    return out


def _record_task(task: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    env = _get_env(task["env"], task["settings"])
    try:
        ep = record_episode(env, task["policy"], task["length"], task["maze_seed"], task["seed"])
    except RecordError as exc:  # which simulator and which file the episode was for
        raise RecordError(f"{task['env']}: {Path(task['out']) / task['file']}: {exc}; nothing of this episode "
                          "was written") from None
    arrays = {"video": ep["video"], "actions": ep["actions"],
              "maze_seed": np.int64(ep["maze_seed"]), "reset_seed": np.int64(ep["reset_seed"]),
              "policy": np.str_(ep["policy"]), "recording": np.str_(task["signature"])}
    if "poses" in ep:
        arrays["poses"] = ep["poses"]
    out_dir = Path(task["out"])
    write_episode_atomic(out_dir / task["file"], compress=task["compress"], **arrays)
    return {"id": task["id"], "file": task["file"], "length": int(ep["video"].shape[0]),
            "maze_seed": int(ep["maze_seed"]), "split": task["split"], "policy": ep["policy"],
            "reset_seed": int(ep["reset_seed"]), "seconds": time.perf_counter() - t0}


def stream_worker(spool: str, env_id: str, settings: dict, policy: str, length: int, worker: int, seed: int,
                   max_files: int, start_step: int, parent: int) -> None:
    """`worldsim train --stream-env`'s recording worker: record episodes forever into `spool` (atomic
    .npz files), never more than `max_files` waiting; stop when the trainer that started it (`parent`)
    is gone. It imports no torch (a spawned worker starts in a fresh interpreter)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()  # a trainer killed (SIGKILL, SIGTERM at startup) leaves no recorder behind
    env = _make_env(env_id, settings)
    spool_p = Path(spool)
    # the start step too: a resumed run records new mazes, not the first ones again
    rng = np.random.default_rng([seed, worker, start_step])
    k = 0
    while os.getppid() == parent:  # where the death signal is not available
        if len(list(spool_p.glob("*.npz"))) >= max_files:
            time.sleep(0.2)
            continue
        maze_seed = int(rng.integers(0, 2**31 - 1))
        while split_for_maze_seed(maze_seed) == "test":  # never train on held-out test mazes
            maze_seed = int(rng.integers(0, 2**31 - 1))
        ep = record_episode(env, policy, length, maze_seed, seed)
        split = split_for_maze_seed(maze_seed)
        write_episode_atomic(spool_p / f"{split}-w{worker:02d}-{k:07d}.npz", compress=False,
                             video=ep["video"], actions=ep["actions"])
        k += 1


# ----------------------------------------------------------------------------- driver


def _is_temp(p: Path) -> bool:
    """A temp file of `atomic_write` (`.<name>.<random>.tmp`), left by a killed run."""
    return p.name.startswith(".") and p.name.endswith(".tmp")


def _clean_temp_files(folder: Path) -> None:
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            try:
                p.unlink()
            except OSError:
                pass


def _probe(cfg: RecordConfig, settings: dict[str, Any]) -> dict[str, Any]:
    env = _make_env(cfg.env, settings)
    try:
        base = env.unwrapped
        names = getattr(base, "action_names", None)
        if not names:
            raise RecordError(f"{cfg.env}: the simulator does not declare action_names")
        if "noop" not in names:
            raise RecordError(f"{cfg.env}: no 'noop' action (actions[0] of every episode is noop): {list(names)}")
        shape = tuple(env.observation_space.shape or ())
        if len(shape) != 3 or shape[2] != 3:
            raise RecordError(f"{cfg.env}: observations must be HxWx3 images, got shape {shape}")
        sim_settings = base.simulator_settings() if hasattr(base, "simulator_settings") else dict(settings)
        if cfg.policy == "navigator":  # its own reset checks what it needs (the layout only a reset tells)
            from envs.policies import make_policy

            obs, info = env.reset(seed=cfg.seed)
            try:
                make_policy("navigator", np.random.default_rng(0)).reset(env, obs, info)
            except ValueError as exc:
                raise RecordError(f"{cfg.env} with settings {settings}: the navigator policy cannot run here "
                                  f"({exc}); use --policy random or mix") from None
        return {"action_names": list(names), "resolution": [int(shape[0]), int(shape[1])],
                "settings": _jsonable(sim_settings), "maze_seed_limit": getattr(base, "MAZE_SEED_LIMIT", None)}
    finally:
        env.close()


def _header(cfg: RecordConfig, probe: dict[str, Any]) -> dict[str, Any]:
    from envs.policies import make_policy

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "simulator": {"id": cfg.env, "settings": probe["settings"]},
        "resolution": probe["resolution"],
        "action_names": probe["action_names"],
        "policy": _jsonable(make_policy(cfg.policy, np.random.default_rng(0)).settings()),
        "recording": {"length": cfg.length, "seed": cfg.seed, "start_maze_seed": cfg.start_maze_seed,
                      "split_filter": cfg.split, "policy": cfg.policy,
                      "episode_seeds": "SeedSequence([seed, maze_seed])"},
    }


def _compare(existing: dict[str, Any], header: dict[str, Any], index_path: Path) -> None:
    diffs: list[str] = []

    def walk(name: str, old: Any, new: Any) -> None:
        if old == new:
            return
        if isinstance(old, dict) and isinstance(new, dict):
            for k in sorted(set(old) | set(new), key=str):
                walk(f"{name}.{k}", old.get(k, "<absent>"), new.get(k, "<absent>"))
        else:
            diffs.append(f"  {name}: existing {json.dumps(old)}, now {json.dumps(new)}")

    for key in ("format", "format_version", "simulator", "resolution", "action_names", "policy", "recording"):
        walk(key, existing.get(key, "<absent>"), header[key])
    if diffs:
        raise RecordError(
            f"{index_path}: the existing dataset was recorded with different settings; refusing to mix "
            "them (use another --out folder, or the original settings to resume):\n" + "\n".join(diffs))


def recording_signature(header: dict[str, Any]) -> str:
    """What made a dataset's episodes (simulator and settings, resolution, actions, policy,
    recording options), as stored in each episode file: a file is adopted only by the same."""
    return json.dumps({k: v for k, v in header.items() if k != "episodes"}, sort_keys=True)


def _episode_frames(path: Path) -> int | None:
    """The frame count of the episode file at `path`, or None if it does not hold a readable
    video with one action per frame (a disk error, a truncated copy)."""
    try:
        headers = npz_headers(path)
        frames = int(headers["video"][0][0])
        if frames < 1 or headers["actions"][0] != (frames,):
            return None
        with zipfile.ZipFile(path) as zf:  # the data too: a flipped byte leaves the headers intact
            return frames if zf.testzip() is None else None
    except PermissionError:  # not ours to record over: exit 1 naming it, as every command says it
        raise
    except Exception:  # DatasetError, a missing array, a corrupt file
        return None


def _adopt(path: Path, entry: dict[str, Any], length: int, signature: str, header: dict[str, Any]) -> dict[str, Any] | None:
    """An episode file written before an interruption but missing from the index. Files are
    written atomically, so any readable one is complete: it may be shorter than `length`
    when the simulator ended the episode early. Returns None for an unreadable file (recorded
    again); raises RecordError for a readable one these settings did not make (never overwritten)."""
    frames = _episode_frames(path)
    if frames is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = str(data["recording"]) if "recording" in data.files else None
            maze_seed = int(data["maze_seed"]) if "maze_seed" in data.files else None
            shape = tuple(data["video"].shape[1:3])
            top = int(data["actions"].max())
            extra = {"policy": str(data["policy"]) if "policy" in data.files else None,
                     "reset_seed": int(data["reset_seed"]) if "reset_seed" in data.files else None}
    except PermissionError:  # (as in _episode_frames)
        raise
    except Exception:  # a corrupt member: record it again
        return None
    why = None
    if stored is not None and stored != signature:
        why = "it was recorded with other settings (simulator, resolution, policy or recording options)"
    elif stored is None and (list(shape) != list(header["resolution"]) or top >= len(header["action_names"])):
        # recorded before episode files named their settings: what can be checked must agree
        why = f"its frames ({shape[0]}x{shape[1]}) or actions (up to {top}) do not fit these settings"
    elif maze_seed != entry["maze_seed"] or frames > length:
        why = f"it holds maze {maze_seed} in {frames} frames, where this recording puts maze {entry['maze_seed']} in at most {length}"
    if why:
        raise RecordError(f"{path}: is not in the dataset's index and {why}; move it out of "
                          f"{path.parent} or record into another folder (nothing was overwritten)")
    return {**entry, "length": frames, **extra}


def record(cfg: RecordConfig) -> dict[str, Any]:
    """Record (or resume) a dataset; returns a summary. Raises RecordError on bad settings."""
    if cfg.episodes < 0 or cfg.length < 1:
        raise RecordError("--episodes must be >= 0 and --length >= 1")
    if cfg.start_maze_seed < 0:
        raise RecordError(f"--start-maze-seed must be >= 0, got {cfg.start_maze_seed}")
    # Below 0 Gymnasium's reset refuses it, after the first episode's setup; from 2**32 on the episode
    # seeds (episode_rngs) keep its low 32 bits, so --seed 2**32 recorded exactly the episodes of --seed 0
    if not 0 <= cfg.seed < 2**32:
        raise RecordError(f"--seed must be from 0 to 2**32 - 1, got {cfg.seed}")
    if cfg.workers is not None and cfg.workers < 1:  # 0 meant one per core, -4 one: say none for one per core
        raise RecordError(f"--workers must be >= 1 (or none: one per CPU core), got {cfg.workers}")
    settings = parse_env_args(cfg.env_arg)
    out = Path(cfg.out)
    index_path = out / INDEX_NAME
    if out.exists() and not out.is_dir():
        raise RecordError(f"{out}: exists and is not a folder")
    if out.is_dir() and not index_path.exists() and any(
            p.name not in (".lock", EPISODES_DIR) and not _is_temp(p) for p in out.iterdir()):
        raise RecordError(f"{out}: folder is not empty and holds no {INDEX_NAME}; refusing to record into it")

    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except NotADirectoryError:  # a file in the way is a problem to explain (exit 2), as export, play and eval do
        if (blocker := file_in_the_way(out)) is None:
            raise
        raise RecordError(f"{out}: {blocker} is a file, not a folder") from None
    lock = _lock(out)
    try:
        return _record_locked(cfg, settings, out)
    except BaseException:
        lock.close()
        if created:  # a bad --env or --env-arg, say: leave no empty dataset folder behind
            _remove_if_nothing_recorded(out)
        raise
    finally:
        lock.close()


def _remove_if_nothing_recorded(out: Path) -> None:
    episodes = out / EPISODES_DIR
    if episodes.is_dir() and any(episodes.iterdir()):
        return
    if all(p.name == ".lock" or p == episodes for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)


def _lock(out: Path) -> Any:
    """Hold an exclusive lock on `out/.lock` so two recorders never write one dataset."""
    fh = try_lock(out / ".lock")
    if fh is None:
        raise RecordError(f"{out}: another `worldsim record` is writing this dataset (locked {out / '.lock'})")
    return fh


def _record_locked(cfg: RecordConfig, settings: dict[str, Any], out: Path) -> dict[str, Any]:
    index_path = out / INDEX_NAME
    episodes_dir = out / EPISODES_DIR
    probe = _probe(cfg, settings)
    planned = plan_maze_seeds(cfg.episodes, cfg.start_maze_seed, cfg.split)
    limit = probe["maze_seed_limit"]
    if limit is not None and planned and planned[-1] >= limit:  # refused before the first episode, not midway
        raise RecordError(f"{cfg.env} takes maze seeds below 2**{limit.bit_length() - 1}; this plan goes up to "
                          f"{planned[-1]}: lower --start-maze-seed")
    header = _header(cfg, probe)
    signature = recording_signature(header)
    entries: dict[str, dict[str, Any]] = {}
    if index_path.exists():
        move_away = ("move it away and rerun this command to rebuild it from the episode files these settings "
                     "recorded")
        try:
            existing = json.loads(index_path.read_text())
        except PermissionError:  # no permission: exit 1 naming it, as in every command (moving it away is no fix)
            raise
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RecordError(f"{index_path}: cannot read the existing index ({exc}); {move_away}") from None
        listed = existing.get("episodes", []) if isinstance(existing, dict) else None
        if not isinstance(listed, list) or not all(
                isinstance(e, dict) and isinstance(e.get("id"), str) and isinstance(e.get("file"), str)
                for e in listed):
            raise RecordError(f"{index_path}: the existing index is damaged (not a dataset index whose 'episodes' "
                              f"entries each have an 'id' and a 'file'); {move_away}")
        _compare(existing, header, index_path)
        for e in listed:
            # a listed file that is unreadable (a disk error, a truncated copy) is recorded again
            if _episode_frames(out / e["file"]) == e.get("length"):
                entries[e["id"]] = e
    episodes_dir.mkdir(exist_ok=True)
    _clean_temp_files(episodes_dir)
    _clean_temp_files(out)  # an index.json temp file of a killed run

    def write_index() -> None:
        index = dict(header)
        index["episodes"] = [entries[k] for k in sorted(entries)]
        write_json_atomic(index_path, index)

    plan = []
    adopted = 0
    for k, maze_seed in enumerate(planned):
        eid = episode_id(k)
        entry = {"id": eid, "file": f"{EPISODES_DIR}/{eid}.npz", "length": cfg.length,
                 "maze_seed": maze_seed, "split": split_for_maze_seed(maze_seed)}
        done = entries.get(eid)
        if done is not None and done.get("maze_seed") == maze_seed:
            continue
        entries.pop(eid, None)
        if (out / entry["file"]).is_file():
            found = _adopt(out / entry["file"], entry, cfg.length, signature, header)
            if found is not None:
                entries[eid] = found
                adopted += 1
                continue
        plan.append(entry)
    write_index()

    total = cfg.episodes
    skipped = total - len(plan)
    tasks = [{**e, "env": cfg.env, "settings": settings, "policy": cfg.policy, "length": cfg.length,
              "seed": cfg.seed, "out": str(out), "compress": cfg.compress, "signature": signature} for e in plan]
    workers = max(1, min(cfg.workers or os.cpu_count() or 1, len(tasks) or 1))
    summary = {"out": str(out), "episodes": total, "recorded": 0, "skipped": skipped,
               "adopted": adopted, "frames": 0, "seconds": 0.0, "fps": 0.0, "workers": workers,
               "interrupted": False, "in_dataset": len(entries)}
    if not tasks:
        return summary

    from tqdm import tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=skipped, unit="ep", desc=f"record {out.name}",
               disable=None if cfg.progress else True, dynamic_ncols=True)  # None: only on a terminal
    pool = None
    try:
        if workers == 1:
            results: Iterator[dict[str, Any]] = map(_record_task, tasks)
        else:
            ctx = mp.get_context("spawn")
            pool = ctx.Pool(workers, initializer=_worker_init, initargs=(cfg.env, settings))
            results = pool.imap_unordered(_record_task, tasks, chunksize=1)
        for res in results:
            res.pop("seconds", None)
            with interrupts_held():  # the index, and the count the interrupt message gives, agree
                entries[res["id"]] = res
                write_index()
                summary["recorded"] += 1
                summary["frames"] += res["length"]
            elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(fps=f"{summary['frames'] / max(elapsed, 1e-9):.0f}", refresh=False)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
    except KeyboardInterrupt:
        summary["interrupted"] = True
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        else:
            _close_env()
        bar.close()
        _clean_temp_files(episodes_dir)
        summary["in_dataset"] = len(entries)
        summary["seconds"] = time.perf_counter() - t0
        summary["fps"] = summary["frames"] / max(summary["seconds"], 1e-9)
    return summary


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, RecordConfig, skip=("env_arg",))
    parser.add_argument("--env-arg", dest="env_arg", action="extend", nargs="+", default=[],
                        metavar="KEY=VALUE",
                        help="simulator setting passed to gymnasium.make (repeatable), e.g. maze_size=15")


def main(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(RecordConfig, args, env_arg=tuple(args.env_arg or ()))
    try:  # SIGTERM stops it as Ctrl-C does (cli.main's handler)
        s = record(cfg)
    except RecordError as exc:
        print(f"worldsim record: {exc}", file=sys.stderr)
        return 2
    done = s["skipped"] + s["recorded"]
    if s["interrupted"]:
        print(f"worldsim record: interrupted; {done}/{s['episodes']} episodes are saved in {s['out']} "
              "(rerun the same command to resume)", file=sys.stderr)
        return 130
    print(f"recorded {s['recorded']} episodes ({s['frames']} frames) in {s['seconds']:.1f} s "
          f"({s['fps']:.0f} frames/s, {s['workers']} worker{'s' if s['workers'] != 1 else ''}); "
          f"{s['skipped']} already done; dataset: {s['out']} ({s['in_dataset']} episodes)")
    return 0
