"""Export dataset episodes to MP4 / GIF videos or a PNG strip (`worldsim export`).

    worldsim export data/maze --episode 0 --out ep0.mp4
    worldsim export data/maze --episode 0 1 2 3 --out grid.gif --columns 2
    worldsim export data/maze --episode 0 --out strip.png --every 20

The format follows the extension of --out. Videos show several episodes side by side as a
grid (shorter ones hold their last frame); a PNG strip shows every k-th frame of each episode
in a row, one row per episode. Frames are upscaled by an integer --scale with nearest
neighbour. --episode takes episode ids or positions in the dataset. The output is written to
a temp file beside --out and renamed, so an existing file is never left half-written.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from worldsim.cliargs import add_dataclass_arguments, dataclass_from_args
from worldsim.dataset import (FILE_SYSTEM_REFUSALS, Dataset, DatasetError, atomic_write, finished_video_problem,
                              name_the_target, video_write_error, write_gif)

FORMATS = (".mp4", ".gif", ".png")


class ExportError(ValueError):
    """Bad export request (format, frame range, ...)."""


@dataclass
class ExportConfig:
    out: str = field(metadata={"help": "output file: .mp4, .gif or .png (strip of every k-th frame); "
                                            "a missing folder is created"})
    episode: tuple[str, ...] = field(default=("0",), metadata={
        "help": "episode ids or positions; several make a grid"})
    every: int = field(default=20, metadata={"help": "PNG strip: keep every k-th frame"})
    scale: int = field(default=2, metadata={"help": "integer upscaling factor (nearest neighbour)"})
    fps: float = field(default=15.0, metadata={"help": "frames per second of MP4/GIF"})
    start: int = field(default=0, metadata={"help": "first frame"})
    end: int | None = field(default=None, metadata={"help": "end frame, exclusive; none = episode end"})
    columns: int | None = field(default=None, metadata={"help": "grid columns for videos; none = all side by side"})
    split: Literal["train", "val", "test"] | None = field(default=None, metadata={"help": "select episodes of this split only"})


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour integer upscaling of [..., H, W, C] frames."""
    if factor == 1:
        return frames
    return frames.repeat(factor, axis=-3).repeat(factor, axis=-2)


def grid(videos: Sequence[np.ndarray], columns: int | None = None, gap: int = 1) -> np.ndarray:
    """Tile videos [T_i, H, W, 3] into one [T, rows*H, cols*W, 3] (shorter ones hold their last frame)."""
    n = len(videos)
    cols = max(1, min(columns or n, n))
    rows = -(-n // cols)
    t = max(v.shape[0] for v in videos)
    h, w = videos[0].shape[1:3]
    out = np.zeros((t, rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), np.uint8)
    for i, v in enumerate(videos):
        if v.shape[0] < t:
            v = np.concatenate([v, np.repeat(v[-1:], t - v.shape[0], axis=0)])
        r, c = divmod(i, cols)
        out[:, r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = v
    return out


def strip(videos: Sequence[np.ndarray], every: int, gap: int = 1) -> np.ndarray:
    """Every `every`-th frame of each video in a row, `gap` black pixels between frames (where one ends
    shows: a corridor's sky and floor ran on from frame to frame) and between rows; one row per video
    -> [H', W', 3]."""
    rows = []
    for v in videos:
        frames = v[::every]
        sep = np.zeros((v.shape[1], gap, 3), np.uint8)
        rows.append(np.concatenate([part for f in frames for part in (sep, f)][1:], axis=1))
    width = max(r.shape[1] for r in rows)
    h = rows[0].shape[0]
    out = np.zeros((len(rows) * h + (len(rows) - 1) * gap, width, 3), np.uint8)
    for i, r in enumerate(rows):
        out[i * (h + gap): i * (h + gap) + h, : r.shape[1]] = r
    return out


def _write(path: Path, frames_or_image: np.ndarray, fps: float) -> None:
    """Write a PNG image or a GIF/MP4 video atomically (temp file beside `path`, then rename)."""
    import imageio.v2 as imageio

    suffix = path.suffix.lower()
    if suffix == ".png":
        def write(tmp: Path) -> None:
            imageio.imwrite(tmp, frames_or_image, format="png")
    elif suffix == ".gif":
        def write(tmp: Path) -> None:
            write_gif(tmp, frames_or_image, duration=1000.0 / fps)  # not imageio's: see GifWriter
    else:
        frames = frames_or_image
        h, w = frames.shape[1:3]
        if h % 2 or w % 2:  # yuv420p needs even sizes
            frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))

        def write(tmp: Path) -> None:
            try:
                with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                        quality=8, macro_block_size=1, pixelformat="yuv420p",
                                        ffmpeg_log_level="quiet") as writer:  # errors: ours, one line
                    for f in frames:
                        writer.append_data(f)
            except OSError as exc:
                raise video_write_error(exc, tmp) from None
            problem = finished_video_problem(tmp, len(frames))
            if problem:  # an older video under this name stays as it was
                raise video_write_error(OSError(problem), tmp)

    atomic_write(path, write, suffix=f".tmp{suffix}")


def _episode_keys(episode: object) -> tuple[str, ...]:
    """ExportConfig.episode from Python as the command line gives it (a tuple of strings): one id
    or position alone (episode="12" was the episodes "1" and "2", a grid of the wrong two), or
    ints (episode=(1,) failed on `'int' object has no attribute 'startswith'`)."""
    keys = (episode,) if isinstance(episode, (str, int, np.integer)) else episode
    try:
        keys = tuple(keys)  # type: ignore[arg-type]
    except TypeError:
        raise ExportError(f"episode must be an episode id, a position, or a sequence of them; got {episode!r}") from None
    out = []
    for key in keys:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            out.append(str(int(key)))
        elif isinstance(key, str):
            out.append(key)
        else:
            raise ExportError(f"episode {key!r}: give an episode id (a string) or a position (an integer)")
    return tuple(out)


def export(dataset: str | os.PathLike | Dataset, cfg: ExportConfig) -> Path:
    """Export per `cfg`; returns the written path. Raises DatasetError / ExportError."""
    out = Path(cfg.out)
    suffix = out.suffix.lower()
    for name in ("scale", "every", "start", "columns", "end"):  # 2.5 was scale 2 (numpy's repeat truncates)
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise ExportError(f"--{name} must be an integer, got {value!r}")
    episodes = _episode_keys(cfg.episode)
    if suffix not in FORMATS:
        raise ExportError(f"{out}: unknown output format {out.suffix or '(no extension)'!r}; use one of {', '.join(FORMATS)}")
    if not 1 <= cfg.scale <= 32:  # the upscaled video is built in memory: 64x64 x 32 is already 2048x2048
        raise ExportError(f"--scale must be an integer from 1 to 32, got {cfg.scale}")
    if cfg.every < 1:
        raise ExportError(f"--every must be a positive integer, got {cfg.every}")
    if cfg.start < 0:
        raise ExportError(f"--start must be >= 0, got {cfg.start}")
    if cfg.columns is not None and cfg.columns < 1:
        raise ExportError(f"--columns must be >= 1, got {cfg.columns}")
    if not 0.1 <= cfg.fps <= 1000:  # also NaN and inf, which no video can store
        raise ExportError(f"--fps must be from 0.1 to 1000, got {cfg.fps}")
    if suffix == ".gif" and cfg.fps > 50:
        raise ExportError(f"--fps {cfg.fps:g}: a GIF stores frame times in 1/100 s and players slow frames under "
                          "2/100 s down, so GIFs go up to 50 fps; write an .mp4 for more")
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; give the output a file name ending in {', '.join(FORMATS)}")
    if out.parent.exists() and not out.parent.is_dir():
        raise ExportError(f"{out}: {out.parent} is a file, not a folder")
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset, split=cfg.split)
    if not episodes:
        raise ExportError("no episode given (--episode ID ...)")
    negative = [key for key in episodes if key.startswith("-") and key[1:].isdigit()]
    if negative:  # ds[-1] would quietly be the last episode; play's --episode refuses it too
        raise ExportError(f"--episode {negative[0]}: give an episode id or a position >= 0")
    videos = []
    for key in episodes:
        ep = ds[key]
        end = len(ep) if cfg.end is None else min(cfg.end, len(ep))
        if not 0 <= cfg.start < end:
            raise ExportError(f"episode {ep.id}: frame range [{cfg.start}, {end}) is empty "
                              f"(episode has {len(ep)} frames)")
        videos.append(ep.video[cfg.start:end])
    try:  # as play --out does; only now, so that a refused request leaves no new folder behind
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in FILE_SYSTEM_REFUSALS:  # no permission: exit 1 naming it, as a refused write is
            name_the_target(exc, out)
            raise
        raise ExportError(f"{out}: cannot create its folder ({exc.strerror or exc})") from None
    gap = 1
    if suffix == ".png":
        image = upscale(strip(videos, cfg.every, gap=gap), cfg.scale)
        _write(out, image, cfg.fps)
    else:
        frames = upscale(grid(videos, cfg.columns, gap=gap), cfg.scale)
        _write(out, frames, cfg.fps)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="dataset folder (index.json), a DMLab .npz, or a folder of .npz files")
    add_dataclass_arguments(parser, ExportConfig)


def main(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(ExportConfig, args)
    try:
        out = export(args.dataset, cfg)
    except (DatasetError, ExportError) as exc:
        print(f"worldsim export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
