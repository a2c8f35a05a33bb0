"""Frame store and latent cache for training.

`FrameStore` holds the frames of one or more datasets (one split) as uint8 arrays: the
autoencoder stage's are memory-mapped from an uncompressed copy (`frames/` in the run folder, the
cache format below with uint8 frames for latents), so a dataset larger than memory trains it;
`LatentStore` holds the same episodes encoded once by the frozen autoencoder.

The latent cache lives in the run folder, one pair of files per dataset and split:

    latents/<name>-<split>-<aehash>.npy    float16 [N_frames, C, h, w] (all episodes concatenated)
    latents/<name>-<split>-<aehash>.json   dataset path, episode ids/lengths/offsets, actions

`aehash` is the SHA-256 of the autoencoder weights (and the dataset's episode list is
checked too), so a retrained autoencoder or a changed dataset never reuses stale latents.
Files are written under a temporary name and renamed when complete. Nothing is pickled:
`.npy` is loaded with `allow_pickle=False` (memory-mapped).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from worldsim.dataset import Dataset, DatasetError, atomic_write, episode_split

LATENT_FORMAT_VERSION = 2  # 2: FAR/TECO files' actions read shifted by one frame (session 21)
# the frame cache's stand-in for an autoencoder hash: its files are frames/<name>-<split>-frames.npy
FRAMES_KEY = "frames"


def tensors_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict (order independent)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _slug(path: Path) -> str:
    text = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.resolve().name or "data")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{text}-{digest}"


def open_split(path: str | os.PathLike, split: str, action_names: Sequence[str] | None = None,
               fallback: bool = True) -> tuple[Dataset, list[int], str | None]:
    """Open dataset `path` and pick the episodes of `split`.

    Datasets with split information (an index written by `worldsim record`, this project's
    episode files, FAR/TECO files below a train/val/test folder) use it. Other files (FAR/TECO
    DMLab .npz) are split by a hash of the episode id, like maze seeds (`dataset.episode_split`);
    when that leaves a split empty and `fallback` is set, the train episodes are used and a
    warning is returned. When no episode falls in "train", the episodes a hash split (files
    outside split folders, those of a train folder) train, all of them: never those of a test
    or val folder, nor held-out mazes.
    """
    ds = Dataset(path, action_names=action_names)
    warning = None
    idx = [i for i, e in enumerate(ds.episodes) if episode_split(e) == split]
    # a hash split of a few files may leave "train" empty; held-out files (test/val folders) stay out
    hashed = [i for i, e in enumerate(ds.episodes) if e.split is None or e.folder_split == "train"]
    if not idx and split == "train":
        idx = hashed
    elif not idx and fallback and ds.episodes and all(e.split is not None for e in ds.episodes):
        idx = [i for i, e in enumerate(ds.episodes) if e.split == "train"]
        warning = f"{path}: no {split!r} episodes; using the train episodes for {split}"
    elif not idx and fallback:
        idx = [i for i, e in enumerate(ds.episodes) if episode_split(e) == "train"] or hashed
        warning = f"{path}: too few episodes to hold some out for {split!r}; validating on training episodes"
    return ds, idx, warning


@dataclass
class FrameStore:
    """Episodes of several datasets in memory: video uint8 [T,H,W,3] and actions int64 [T]."""

    videos: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # "dataset-path:episode-id"
    action_names: tuple[str, ...] = ()
    resolution: tuple[int, int] = (0, 0)
    simulator: dict | None = None

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(a) for a in self.actions], dtype=np.int64)

    @property
    def num_frames(self) -> int:
        return int(self.lengths.sum()) if self.actions else 0

    def add(self, video: np.ndarray, actions: np.ndarray, source: str) -> None:
        self.videos.append(video)
        self.actions.append(actions.astype(np.int64, copy=False))
        self.sources.append(source)

    def read(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """Episode `e`'s (video, actions), as `EpisodeReader.read` gives them."""
        return self.videos[e], self.actions[e]


@dataclass
class EpisodeReader:
    """The `split` episodes of one dataset, read from disk one at a time: what the latent cache
    encodes without holding every frame in memory (TECO's DMLab set is 40,000 episodes, about 147 GB
    of frames). Lengths and sources are known from the index or the file headers."""

    dataset: Dataset
    indices: list[int]
    path: str

    @property
    def lengths(self) -> np.ndarray:
        return np.array([self.dataset.episodes[i].length for i in self.indices], dtype=np.int64)

    @property
    def sources(self) -> list[str]:
        return [f"{self.path}:{self.dataset.episodes[i].id}" for i in self.indices]

    def read(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        ep = self.dataset.load(self.dataset.episodes[self.indices[e]])
        return ep.video, ep.actions.astype(np.int64, copy=False)


def read_episodes(path: str, split: str, action_names: Sequence[str] | None, resolution: Sequence[int] | None,
                  fallback: bool, what: str, warn: Callable[[str], None] = print) -> EpisodeReader:
    """Open dataset `path` for its `split` episodes (`open_split`), checked against the action names
    and resolution wanted (None: any), without reading an episode yet."""
    ds, idx, warning = open_split(path, split, action_names=names_for(path, action_names), fallback=fallback)
    if warning:
        warn(warning)
    check_compatible(str(path), ds.action_names, ds.resolution, action_names, resolution, what)
    return EpisodeReader(ds, idx, str(path))


def check_compatible(path: str, action_names: Sequence[str], resolution: Sequence[int],
                     want_actions: Sequence[str] | None, want_resolution: Sequence[int] | None, what: str) -> None:
    """Raise DatasetError naming `path` if its actions or resolution differ from `what`'s."""
    if want_actions is not None and tuple(action_names) != tuple(want_actions):
        raise DatasetError(
            f"{path}: action names {list(action_names)} differ from {what}'s {list(want_actions)}"
        )
    if want_resolution is not None and tuple(resolution) != tuple(want_resolution):
        raise DatasetError(
            f"{path}: resolution {resolution[0]}x{resolution[1]} differs from {what}'s "
            f"{want_resolution[0]}x{want_resolution[1]}"
        )


def holding_split(paths: Sequence[str], split: str, action_names: Sequence[str] | None = None) -> list[str]:
    """The datasets among `paths` that hold episodes of `split` themselves (no fallback)."""
    return [p for p in paths if open_split(p, split, names_for(p, action_names), fallback=False)[1]]


def load_frames(paths: Sequence[str], split: str, action_names: Sequence[str] | None = None,
                resolution: Sequence[int] | None = None, what: str = "the first dataset",
                progress: Callable[[Iterable], Iterable] | None = None,
                warn: Callable[[str], None] = print) -> FrameStore:
    """Load the `split` episodes of every dataset into a FrameStore (all must agree)."""
    store = FrameStore()
    # Fall back to training episodes only when no dataset holds the split: a separate val
    # dataset beside a train dataset must not pull the whole training set in as "val".
    fallback = split == "train" or not holding_split(paths, split, action_names)
    for path in paths:
        want_a = action_names if action_names is not None else (store.action_names or None)
        want_r = resolution if resolution is not None else (store.resolution if store.videos else None)
        reader = read_episodes(path, split, want_a, want_r, fallback,
                               what if action_names is not None else f"{paths[0]}", warn)
        store.action_names = tuple(reader.dataset.action_names)
        store.resolution = tuple(reader.dataset.resolution)  # type: ignore[assignment]
        if store.simulator is None:
            store.simulator = reader.dataset.simulator
        sources = reader.sources
        episodes = range(len(reader.indices))
        for e in (episodes if progress is None else progress(episodes)):
            store.add(*reader.read(e), sources[e])
    return store


def _has_index(path: str | os.PathLike) -> bool:
    return Path(path, "index.json").is_file()


def names_for(path: str | os.PathLike, want: Sequence[str] | None) -> tuple[str, ...] | None:
    """Action names to impose on an index-less (DMLab) file: only generic `action_<i>` names
    (its own kind), so that such a file never silently takes the names of another simulator."""
    if want is None or _has_index(path):
        return None
    if all(n == f"action_{i}" for i, n in enumerate(want)):
        return tuple(want)
    return None


@dataclass
class LatentStore:
    """Latents [T, C, h, w] (float16 arrays, possibly memory-mapped) and actions per episode."""

    latents: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(a) for a in self.actions], dtype=np.int64)

    def extend(self, other: "LatentStore") -> None:
        self.latents += other.latents
        self.actions += other.actions
        self.sources += other.sources


def split_source(source: str, paths: Sequence[str | os.PathLike]) -> tuple[str, str]:
    """(dataset path, episode id) of a "path:id" source made from one of `paths`: matched by
    prefix, since an id (a file name) and a path may both hold ':'."""
    for path in sorted(map(str, paths), key=len, reverse=True):
        if source.startswith(f"{path}:"):
            return path, source[len(path) + 1:]
    raise ValueError(f"episode source {source!r} comes from none of the datasets {[str(p) for p in paths]}")


def _dataset_signature(path: str, split: str, sources: list[str], lengths: list[int],
                       spelled: str | None = None) -> str:
    """Episode ids, lengths, and each episode file's size and modification time: a dataset
    re-recorded in place with the same ids and lengths (other mazes) does not reuse stale latents.
    The ids alone, so that ./data and /abs/data are one dataset (its resolved path is hashed too);
    `spelled`: the signature caches written before session 30 carry, which hashed each id behind
    the dataset's path as that run spelled it."""
    files = {e.id: e.file for e in Dataset(path).episodes}
    h = hashlib.sha256()
    h.update(str(Path(path).resolve()).encode())
    h.update(split.encode())
    for s, n in zip(sources, lengths):
        eid = split_source(s, [path])[1]
        st = os.stat(files[eid])
        key = eid if spelled is None else f"{spelled}:{eid}"
        h.update(f"{key}:{n}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def cache_paths(cache_dir: Path, path: str, split: str, ae_hash: str) -> tuple[Path, Path]:
    stem = f"{_slug(Path(path))}-{split}-{ae_hash[:16]}"
    return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"


def load_cached(cache_dir: Path, path: str, split: str, ae_hash: str, dtype: str = "<f2") -> LatentStore | None:
    """The cached latents of (dataset, split, autoencoder), or None if absent or stale. The frame
    cache is read with `ae_hash` FRAMES_KEY and `dtype` "|u1" (its `latents` are then frames)."""
    npy, meta_path = cache_paths(cache_dir, path, split, ae_hash)
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        arr = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != LATENT_FORMAT_VERSION or meta.get("ae_hash") != ae_hash:
        return None
    # the dataset must still list the same episodes
    try:
        ds, idx, _ = open_split(path, split)
        sources = [f"{path}:{ds.episodes[i].id}" for i in idx]
        lengths = [ds.episodes[i].length for i in idx]
    except DatasetError:
        return None
    try:
        if meta.get("signature") != _dataset_signature(path, split, sources, lengths) and not (
                isinstance(meta.get("dataset"), str)  # a cache from before session 30, still valid: no re-encoding
                and meta.get("signature") == _dataset_signature(path, split, sources, lengths, meta["dataset"])):
            return None
    except (OSError, KeyError):  # an episode file vanished: rebuild
        return None
    # A cache copied, cut short or edited by hand is rebuilt rather than trusted: every episode
    # must have its frames in the array and one action per frame.
    offsets, cached_lengths, actions = meta.get("offsets"), meta.get("lengths"), meta.get("actions")
    if not (isinstance(offsets, list) and isinstance(actions, list) and cached_lengths == lengths
            and len(offsets) == len(lengths) == len(actions)):
        return None
    starts = [0, *itertools.accumulate(lengths)][:len(lengths)]
    if offsets != starts or arr.ndim != 4 or arr.shape[0] != sum(lengths) or arr.dtype != np.dtype(dtype):
        return None
    store = LatentStore()
    for src, off, n, act in zip(sources, offsets, lengths, actions):
        try:
            act = np.asarray(act, dtype=np.int64)
        except (TypeError, ValueError):
            return None
        if act.shape != (n,):
            return None
        store.latents.append(arr[off:off + n])
        store.actions.append(act)
        store.sources.append(src)
    return store


def build_cache(cache_dir: Path, path: str, split: str, ae_hash: str, frames: FrameStore | EpisodeReader,
                encode: Callable[[np.ndarray], np.ndarray], batch_frames: int = 256,
                progress: Callable[[Iterable], Iterable] | None = None, dtype: str = "<f2") -> LatentStore:
    """Encode every frame of `frames` (the episodes of `path`/`split`, in memory or read one at a
    time from disk) once and write the cache.

    `encode(uint8 [B,H,W,3]) -> float [B,C,h,w]` is the frozen autoencoder's encoder; for the frame
    cache (`ae_hash` FRAMES_KEY, `dtype` "|u1") it is the identity, and the frames are stored as read.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    npy, meta_path = cache_paths(cache_dir, path, split, ae_hash)
    lengths = [int(n) for n in frames.lengths]
    sources = frames.sources
    total = int(sum(lengths))
    if total == 0:
        raise DatasetError(f"{path}: no {split} frames to encode")
    first_video, _ = frames.read(0)
    probe = encode(first_video[:1])
    del first_video
    shape = (total,) + tuple(probe.shape[1:])
    offsets: list[int] = []
    actions: list[list[int]] = []

    def write(tmp: Path) -> None:
        # plain writes in order, not a memory map: a full disk is then an OSError naming the cache,
        # where a map's page that cannot be stored kills the process with SIGBUS ("Bus error")
        pos = 0
        with open(tmp, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                      "shape": shape})
            episodes = range(len(lengths))
            for e in (episodes if progress is None else progress(episodes)):
                video, episode_actions = frames.read(e)  # one episode in memory at a time
                if len(video) != lengths[e]:
                    raise ValueError(f"{sources[e]}: {len(video)} frames read, {lengths[e]} expected")
                actions.append(episode_actions.tolist())
                offsets.append(pos)
                for s in range(0, len(video), batch_frames):
                    chunk = encode(video[s:s + batch_frames])
                    if chunk.shape[1:] != shape[1:]:
                        raise ValueError(f"encoder gave latents of shape {chunk.shape[1:]}, expected {shape[1:]}")
                    fh.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
                pos += len(video)
        if pos != total:
            raise ValueError(f"{path}: {pos} frames encoded, {total} expected")

    # a run killed while writing (SIGKILL, or SIGBUS before this wrote in order) leaves its temp
    # file; only this run's trainer writes here, so no other writer owns one
    for stale in cache_dir.glob(".*.tmp.npy"):
        stale.unlink(missing_ok=True)
    atomic_write(npy, write, suffix=".tmp.npy")
    meta = {
        "version": LATENT_FORMAT_VERSION,
        "dataset": str(path),
        "split": split,
        "ae_hash": ae_hash,
        "shape": list(shape),
        "sources": sources,
        "lengths": lengths,
        "offsets": offsets,
        "actions": actions,
        "signature": _dataset_signature(path, split, sources, lengths),
    }
    from worldsim.dataset import write_json_atomic

    write_json_atomic(meta_path, meta)
    store = load_cached(cache_dir, path, split, ae_hash, dtype)
    if store is None:  # pragma: no cover - we just wrote it
        raise RuntimeError(f"{npy}: latent cache unreadable right after writing it")
    return store
