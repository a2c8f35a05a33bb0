"""Play in a generated maze with the keyboard: every frame is dreamt by the world model.

    worldsim play                          # the shipped checkpoint (or the simulator if none)
    worldsim play --checkpoint PATH --steps 10 --fps 10
    worldsim play --world sim              # walk the real embedded simulator instead
    worldsim play --headless --actions random:200 --out session.mp4
    worldsim play --headless --benchmark   # fps at frames 20/500/2000 + resident memory

Keys (default keymap; `--keymap arrows|wasd|FILE.json` maps key names to action names):
  arrows / WASD  move forward/backward, turn left/right (hold to repeat at --fps)
  space          noop (let the world run one frame)
  R new world    P pause    F dream vs reality (real simulator side by side)
  V start/stop recording to MP4 (in --record-dir)    H help    Esc quit

The HUD shows the measured frames per second, the frame index, the world model's memory
(L2 = compressed frames that left the short window: frames, tokens, cache MB; it grows by one
frame's L2 tokens per step, up to --memory-frames) and the sampler's settings (steps, timestep shift, generated-frame
noise, temperature). In a narrow window (--scale 4 shows the dream in 256 pixels) its font steps
down from 20 to 14 pixels and its first two lines take shorter forms that keep the frame, seed,
cache size and RSS ("14.8/15 fps"; the shortest memory line leaves out the L2 token count).

Play generates with the approximate `multilevel-fast` cache by default: the exact `multilevel`
cache re-encodes the short window against the whole L2 memory once per frame, which costs about
a third of the frame rate at frame 500 on a slow 2-core CPU, while the approximate one scored
the same on the held-out test mazes (model card). `--cache-mode multilevel` plays with the exact cache, as
`worldsim eval` and `worldsim/Dream-v0` do by default.

`--headless` makes the same frames without a window: `--actions FILE` (one action name per
line, `#` comments allowed) or `random:N` (N uniform actions from `--seed`), written to `--out`
(.mp4 or .gif, one video frame per generated frame). Without a display, run with `--headless` (or set
SDL_VIDEODRIVER=dummy to drive the window code without showing anything).

This is the only module that imports pygame, and only when a window is opened.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np

from worldsim.cliargs import add_dataclass_arguments, dataclass_from_args
from worldsim.dataset import (FILE_SYSTEM_REFUSALS, GifWriter, _lock_nb, _locked_temp, caption_strip, file_in_the_way,
                              finished_video_problem, interrupts_held, mp4_frames, readable_like_any_file,
                              video_write_error)
from worldsim.keymaps import CONTROL_KEYS, KEYMAPS, KeymapError, help_lines, load_keymap

DEFAULT_SIMULATOR = {"id": "worldsim/Maze-v0", "settings": {}}
BENCH_AT = (20, 500, 2000)  # generated-frame indices where --benchmark reports fps
MAX_SCALE = 64  # headless --scale: --scale 10000 made 1 TiB video frames (a MemoryError traceback)
MAX_RANDOM_ACTIONS = 1_000_000  # --actions random:N; about 8 hours at play's 35 fps
WAKE_SECONDS = 0.05  # while waiting for the next tick, the window's events are handled this often
BENCH_WINDOW = 10  # fps at frame i = frames / seconds over the BENCH_WINDOW steps ending at i


class PlayError(RuntimeError):
    """A user-facing problem (bad option, bad actions file, no display ...): printed, exit 2; exit 1
    where the file system refused a write (a full disk, no permission), as in every command."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = 1 if errno_ in FILE_SYSTEM_REFUSALS else 2


@dataclass
class PlayConfig:
    world: Literal["auto", "dream", "sim"] = field(default="auto", metadata={
        "help": "dream: the world model; sim: walk the real embedded simulator; auto: dream if a checkpoint exists"})
    checkpoint: str | None = field(default=None, metadata={
        "help": "checkpoint folder (config.json + model.safetensors); default: the one shipped in checkpoints/"})
    steps: int | None = field(default=None, metadata={"help": "Euler sampling steps per frame (default: the checkpoint's)"})
    cfg: float | None = field(default=None, metadata={"help": "classifier-free guidance scale (default: the checkpoint's)"})
    shift: float | None = field(default=None, metadata={
        "help": "sampler timestep shift, > 0; 1 = uniform steps, > 1 = more of them at high noise (default: the checkpoint's)"})
    temperature: float | None = field(default=None, metadata={
        "help": "scale of the initial noise each frame is sampled from, >= 0; below 1 = fewer invented details, "
                "0 = deterministic, 1 = plain sampling (default: the checkpoint's)"})
    generated_noise: float | None = field(default=None, metadata={
        "help": "noise level in [0, 1) given to each generated frame before it enters the model's context (labelled "
                "with it, as training labels noised context), against drift; 0 = off (default: the checkpoint's)"})
    device: str | None = field(default=None, metadata={
        "help": "auto, cpu, cuda, cuda:1, ... (default: auto: a CUDA GPU where there is one, else the CPU)"})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads, >= 1 (default: one fewer than the cores this process may use, at most torch's "
                "default, at least 1: a thread that must share its core with another program stalls the "
                "frame for up to seconds)"})
    seed: int = field(default=0, metadata={"help": "world seed, 0 to 2**32 - 1; R (new world) uses seed+1, seed+2, ..."})
    fps: float = field(default=15.0, metadata={"help": "target frames per second; a held key repeats at this rate"})
    scale: int = field(default=8, metadata={"help": "integer upscaling of frames on screen and in videos (64x64 -> 512x512)"})
    context_frames: int = field(default=4, metadata={
        "help": "frames the real simulator shows the model before it dreams (turning in place)"})
    still_frames: int | None = field(default=None, metadata={
        "help": "copies of the first of those frames put before them, as if the player had stood still: a "
                "long-term memory to start from (default: the checkpoint's sampler.still_frames, else 0)"})
    cache_mode: Literal["multilevel-fast", "multilevel", "kv", "none", "sliding"] = field(default="multilevel-fast", metadata={
        "help": "KV cache used for generation. multilevel-fast (default): L1 short window + L2 compressed memory, "
                "the window's keys/values computed once per frame and kept when it slides (not exact; no measurable "
                "quality loss, about 1.5x the frame rate of multilevel at frame 500 on a 2-core CPU); multilevel: the "
                "same memory, exact (equals recomputation; re-encodes the window once per frame), what eval uses; "
                "sliding: the window only, no long-term memory (eval's baseline); kv: a plain KV cache of every "
                "frame, all kept fine (the paper's baseline); none: recompute the whole sequence at every sampling "
                "step (the exact reference, slow)"})
    memory_frames: int = field(default=300, metadata={
        "help": "frames the long-term memory (L2 of the multi-level caches) keeps at most, the oldest forgotten 64 "
                "at a time. 300 (the eval's episode length): deep into a game the shipped checkpoint generates at "
                "least as well from its last 300 frames as from 900 (+0.43 dB on 8 test mazes, +0.06 on 16 val "
                "mazes) and predicts the next frame far better (+2.8 to +3.0 dB), and the time per frame stops "
                "growing there (model card HISTORY, session 29); 0: keep every frame, as eval does"})
    precision: Literal["auto", "fp32", "bf16", "bf16-kv"] = field(default="auto", metadata={
        "help": "the transformer's arithmetic on CPU. auto (default): bf16 where the CPU has native bf16 "
                "(AVX512-BF16 or AMX), else bf16-kv; bf16: weights and KV cache in bfloat16 (fewer bytes to read per "
                "frame; not bit-exact, scores like fp32 on the test mazes); bf16-kv: fp32 weights, the KV cache "
                "stored and attended in bfloat16; fp32: exact, what eval uses"})
    dataset: str | None = field(default=None, metadata={"help": "start worlds from this dataset's episodes instead of the simulator"})
    episode: str | None = field(default=None, metadata={"help": "dataset episode (index or id; default: drawn from the seed)"})
    keymap: str = field(default="default", metadata={"help": f"built-in keymap ({', '.join(KEYMAPS)}) or a JSON file {{key: action}}"})
    reality: bool = field(default=False, metadata={"help": "start with the dream-vs-reality side-by-side view on (key F)"})
    record_dir: str = field(default="recordings", metadata={"help": "where V writes its MP4 recordings"})
    actions: str | None = field(default=None, metadata={"help": "headless: FILE (one action name per line) or random:N"})
    out: str | None = field(default=None, metadata={"help": "headless: the video to write, .mp4 or .gif"})
    progress: bool = field(default=True, metadata={
        "help": "headless: show a progress bar (on a terminal; never in a redirected log)"})
    headless: bool = field(default=False, metadata={"help": "no window: play --actions, write --out"})
    benchmark: bool = field(default=False, metadata={
        "help": f"headless: print fps at generated frames {', '.join(map(str, BENCH_AT))} and resident memory"})


# ----------------------------------------------------------------------------- small pieces


def display_problem(environ: dict[str, str] | None = None, platform: str | None = None) -> str | None:
    """Why no window can be opened here (None if one can)."""
    env = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux"):
        return None  # Windows/macOS always have a window system when a user runs this
    if env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"):
        return None
    if env.get("SDL_VIDEODRIVER", "").lower() in ("dummy", "offscreen"):
        return None
    return ("no display found (neither DISPLAY nor WAYLAND_DISPLAY is set), so the game window cannot open.\n"
            "  Run headless instead:  worldsim play --headless --actions random:200 --out session.mp4\n"
            "  or set SDL_VIDEODRIVER=dummy to run the window code without showing anything.")


def read_actions(spec: str, action_names: Sequence[str], seed: int = 0) -> list[int]:
    """Action indices from `random:N` (seeded, uniform) or a file of action names, one a line."""
    if spec.startswith("random:"):
        text = spec[len("random:"):]
        try:
            count = int(text)
        except ValueError:
            count = -1
        if count < 1:
            raise PlayError(f"--actions {spec!r}: expected random:N with N a positive integer")
        if count > MAX_RANDOM_ACTIONS:  # a typo's extra zeros: no memory error before the first frame
            raise PlayError(f"--actions {spec!r}: N goes up to {MAX_RANDOM_ACTIONS:,} (hours of play); "
                            "for a longer walk give a file of actions")
        rng = np.random.default_rng(seed)
        return [int(a) for a in rng.integers(len(action_names), size=count)]
    path = Path(spec)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: PowerShell's "UTF-8" starts with a BOM
    except PermissionError:  # the file system's refusal: exit 1 naming the file, as in every command
        raise
    except OSError as exc:
        raise PlayError(f"--actions {spec!r}: cannot read the actions file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:  # e.g. UTF-16, which Windows PowerShell's `>` writes
        raise PlayError(f"--actions {spec!r}: not UTF-8 text; save it as UTF-8, one action name per line") from None
    actions = []
    for lineno, line in enumerate(lines, 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if name not in action_names:
            raise PlayError(f"{path}:{lineno}: unknown action {name!r} (this world's actions: {', '.join(action_names)})")
        actions.append(action_names.index(name))
    if not actions:
        raise PlayError(f"{path}: no actions in the file (one action name per line)")
    return actions


def upscale(frame: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling: crisp pixels, as on screen."""
    if scale == 1:
        return frame
    return np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)


def compose(dream: np.ndarray, reality: np.ndarray | None, side_by_side: bool) -> np.ndarray:
    """The game view: the dream alone, or dream | reality (grey where reality is unknown)."""
    if not side_by_side:
        return dream
    right = reality if reality is not None and reality.shape == dream.shape else np.full_like(dream, 64)
    return np.concatenate([dream, right], axis=1)


CAPTION_HEIGHT = 16  # pixels above a recorded dream | reality video (MP4 pads sides to multiples of 16)


def recorded_view(dream: np.ndarray, reality: np.ndarray | None, side_by_side: bool, scale: int) -> np.ndarray:
    """A recorded video frame: the view upscaled; dream | reality also gets a dark 2-pixel line over the
    seam between the panels and a caption strip above them ("dream (model)" | "reality (simulator)"), so
    a clip shown away from the window (the README's GIF) says which side is which and where one ends."""
    if not side_by_side:
        return upscale(dream, scale)
    view = upscale(compose(dream, reality, True), scale).copy()
    half = view.shape[1] // 2
    view[:, half - 1:half + 1] = 16
    return np.concatenate([_recording_captions(view.shape[1]), view], axis=0)


@functools.lru_cache(maxsize=4)
def _recording_captions(width: int) -> np.ndarray:
    """recorded_view's caption strip, drawn once per video width rather than once per recorded frame."""
    strip = caption_strip(width, [(0, ("dream (model)", "dream"), (255, 255, 255)),
                                  (width // 2, ("reality (simulator)", "reality"), (255, 255, 255))], CAPTION_HEIGHT)
    strip.flags.writeable = False  # shared by every frame of the video
    return strip


def resident_memory_bytes() -> int:
    """Current resident set size of this process (its peak where /proc is missing; 0 where neither can be read)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except Exception:
        return 0


class VideoRecorder:
    """Streams frames to an MP4 (or a GIF when the target ends in .gif, e.g. for a README);
    written to a temporary file beside the target, renamed on close.

    An MP4 streams, so memory stays flat over long sessions. A GIF is for short clips: the GIF
    writer (Pillow) holds every frame until the end, stores frame times in 1/100 s
    (15 fps becomes 60 ms a frame) and merges repeated frames into one longer frame. The rename
    means a reader never sees a half-written video. A play killed while it records (SIGKILL, the
    out-of-memory killer) leaves its hidden `.<stem>.<random>.partial.mp4|gif`, which holds what
    was recorded (ffmpeg, left alone, finishes the MP4; a GIF's frames were in memory, so its file
    is empty): the next recording into that folder keeps such a file's frames as
    `<stem>.recovered.mp4` (see `recover_dead_recordings`) and removes it if it holds none.
    """

    def __init__(self, path: str | os.PathLike, fps: float) -> None:
        import imageio.v2 as imageio

        self.path = Path(path)
        if self.path.is_dir():
            raise PlayError(f"{self.path}: is a folder; give the video a file name ending in .mp4 or .gif")
        if self.path.suffix.lower() not in (".mp4", ".gif"):  # anything else would get MP4 bytes under its name
            raise PlayError(f"{self.path}: videos are written as .mp4 or .gif; give a file name ending in one of them")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a parent that is a file, or no permission: before any frame is made
            blocker = file_in_the_way(self.path) if isinstance(exc, (FileExistsError, NotADirectoryError)) else None
            why = f"{blocker} is a file, not a folder" if blocker is not None else exc.strerror or exc
            raise PlayError(f"{self.path}: cannot create its folder ({why})", exc.errno) from None
        gif = self.path.suffix.lower() == ".gif"
        self.recovered = recover_dead_recordings(self.path.parent)  # (path, frames) of killed plays' videos
        try:  # locked until the file is renamed or removed: a file whose lock can be taken has no writer
            self._lock, tmp = _locked_temp(self.path.with_name(self.path.stem),
                                           ".partial.gif" if gif else ".partial.mp4")
        except OSError as exc:  # a folder it may not write in: name the target, not the temp twin
            raise PlayError(f"{self.path}: cannot write there ({exc.strerror or exc})", exc.errno) from None
        self.tmp = Path(tmp)
        self.frames = 0
        self.failed = False
        self.closed = False
        self.saved: Path | None = None  # where close() put the finished video
        self.shape: tuple[int, ...] | None = None
        if gif:  # not imageio's GIF writer: a failed one prints tracebacks at exit (see GifWriter)
            self._writer = GifWriter(self.tmp, duration=1000.0 / float(fps))
        else:
            # yuv420p + libx264 plays everywhere; frames are multiples of 16 for 64x64 x any scale.
            try:
                self._writer = imageio.get_writer(str(self.tmp), format="FFMPEG", fps=float(fps), codec="libx264",
                                                  quality=8, pixelformat="yuv420p", macro_block_size=16,
                                                  ffmpeg_log_level="quiet")  # a failure: our one line, not ffmpeg's
            except ImportError:  # imageio without its FFMPEG plugin (e.g. the lent GPU machine's image)
                self.tmp.unlink(missing_ok=True)
                self._release()
                raise PlayError(f"{self.path}: no MP4 encoder here (imageio-ffmpeg is not installed): "
                                "`pip install imageio-ffmpeg`, or give a file name ending in .gif") from None

    def append(self, frame: np.ndarray) -> None:
        if self.shape is None:
            self.shape = frame.shape
        elif frame.shape != self.shape:
            raise ValueError(f"recording frame shape changed from {self.shape} to {frame.shape}")
        try:
            with interrupts_held():
                self._writer.append_data(np.ascontiguousarray(frame))
                self.frames += 1  # counted before an interrupt held meanwhile is raised
        except Exception as exc:  # a full disk, say: this video is broken, so close() must not replace an older one
            self.failed = True
            raise self._write_error(exc) from None

    def _write_error(self, exc: BaseException) -> PlayError:
        """One line for a failed write: the cause (found while the partial file is still there)
        and that an older video under this name is untouched."""
        error = video_write_error(exc, self.tmp)
        kept = "the existing file is kept" if self.path.exists() else "nothing was written"
        return PlayError(f"{self.path}: cannot write the video ({error.strerror}); {kept}", error.errno)

    def close(self) -> Path | None:
        """Finish the file and move it into place; None (and no file) if nothing was recorded
        or the writer failed. A Ctrl-C or SIGTERM meanwhile waits until the video is in place (a GIF
        is written whole here, seconds for a long one), then is raised: see `saved`. Closing again
        returns what the first close did."""
        if self.closed:
            return self.saved
        self.closed = True
        with interrupts_held():
            try:
                self.saved = self._finish()
            finally:
                self._release()
        return self.saved

    def _release(self) -> None:
        """End the lock on the temp file (once it is renamed or removed, or kept when it cannot be moved)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _finish(self) -> Path | None:
        if self.failed:
            self.abort()
            return None
        try:
            self._writer.close()
        except Exception as exc:  # a full disk while the file is finished: one line naming it, as append's
            error = self._write_error(exc)
            self.tmp.unlink(missing_ok=True)
            raise error from None
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        if self.frames == 0:
            self.tmp.unlink(missing_ok=True)
            return None
        problem = None if self.tmp.suffix == ".gif" else finished_video_problem(self.tmp, self.frames)
        if problem:  # a full disk while ffmpeg finished the file: an older video under this name stays
            error = self._write_error(OSError(problem))
            self.tmp.unlink(missing_ok=True)
            raise error
        readable_like_any_file(self.tmp)  # mkstemp makes 0600
        try:
            os.replace(self.tmp, self.path)
        except OSError as exc:  # the target turned into a folder meanwhile, say: keep the frames
            raise PlayError(f"{self.path}: cannot move the finished video into place ({exc.strerror or exc}); "
                            f"its {self.frames} frames are in {self.tmp}") from None
        return self.path

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:
            if not self.failed:
                raise
        finally:
            self.tmp.unlink(missing_ok=True)
            self._release()


PARTIAL_SUFFIXES = (".partial.mp4", ".partial.gif")
FFMPEG_FINISH_S = 60.0  # an unreadable partial MP4 younger than this may still be being finished
RECOVERED = "kept the {frames} frames a killed play had recorded (left hidden) as {path}"


def recover_dead_recordings(folder: Path) -> list[tuple[Path, int]]:
    """Keep what plays killed while recording into `folder` left (SIGKILL, the out-of-memory killer:
    no cleanup ran), and remove the rest. Each hidden `.<stem>.<random>.partial.mp4|gif` no running
    play holds (its lock ends with its process) is renamed `<stem>.recovered.<ext>` (`-2`, `-3` ...
    when taken) when it holds a readable frame: ffmpeg, whose input ends with the play, finishes the
    MP4, so it is a playable recording of what was played, which the user would not find under its
    hidden name. One without (a GIF's frames were still in memory; an MP4 whose ffmpeg was killed
    too, once a minute old) is removed: such files piled up, one per killed run. Returns the kept
    (path, frames)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # a missing folder: the recorder makes it, or says why not
        return []
    kept: list[tuple[Path, int]] = []
    for name in names:
        suffix = next((s for s in PARTIAL_SUFFIXES if name.endswith(s)), None)
        stem, _, middle = name[1:len(name) - len(suffix or "")].rpartition(".")
        if suffix is None or not name.startswith(".") or not stem or not middle or \
                not all(c.isalnum() or c == "_" for c in middle):  # not mkstemp's: someone else's file
            continue
        partial = folder / name
        try:
            fd = os.open(partial, os.O_RDONLY)
        except OSError:
            continue
        try:
            if not _lock_nb(fd):  # a play still recording there (or no flock here: nothing is known to be dead)
                continue
            frames = _readable_frames(partial)
            if frames is None:  # no MP4 reader here: what it holds is unknown, so it stays for one that can tell
                continue
            if not frames:
                # ffmpeg outlives the killed play by the moment it takes to finish the file, unlocked (it
                # inherits no descriptor): an MP4 it may still be finishing is left for a later recording
                if not (suffix == ".partial.mp4" and time.time() - partial.stat().st_mtime < FFMPEG_FINISH_S):
                    partial.unlink()
                continue
            ext = suffix[len(".partial"):]
            target, n = folder / f"{stem}.recovered{ext}", 1
            while target.exists():
                n += 1
                target = folder / f"{stem}.recovered-{n}{ext}"
            readable_like_any_file(partial)  # mkstemp made it 0600
            os.replace(partial, target)
            kept.append((target, frames))
        except OSError:  # a read-only folder, say: the recording's own temp file says what is wrong next
            pass
        finally:
            os.close(fd)
    return kept


def _readable_frames(path: Path) -> int | None:
    """The frames a left-over partial video holds that can be read (0: none, or not a video; None:
    an MP4 with no ffmpeg here to read it, as in an image without imageio-ffmpeg, where a GIF is
    still recorded: counted as 0, a killed play's finished MP4 was removed, and the ImportError
    was a traceback instead of the GIF)."""
    if path.stat().st_size == 0:
        return 0
    if path.name.endswith(".mp4"):
        try:
            from imageio_ffmpeg import get_ffmpeg_exe

            get_ffmpeg_exe()  # a RuntimeError where it finds no ffmpeg binary
        except (ImportError, RuntimeError):
            return None
        return mp4_frames(path) or 0
    from PIL import Image

    count = 0
    try:
        with Image.open(path) as im:
            while True:
                im.seek(count)
                im.load()
                count += 1
    except (EOFError, OSError, ValueError):  # the end, or a GIF cut short while it was saved
        pass
    return count


class FpsMeter:
    """Frames per second over the last `window` consecutive frames (what the player gets).

    `gap()` marks a stretch without frames (no key held, paused, new world): the idle time is
    not counted as slow generation, and the last measurement stays on the HUD meanwhile. A lone
    frame after a gap (a tapped key) is measured by its own time, `frame_seconds`.
    """

    def __init__(self, window: int = 20) -> None:
        self.times: deque[float] = deque(maxlen=window)
        self.last = 0.0

    def tick(self, now: float | None = None, frame_seconds: float | None = None) -> None:
        self.times.append(time.perf_counter() if now is None else now)
        if len(self.times) < 2 and frame_seconds:
            self.last = 1.0 / frame_seconds

    def gap(self) -> None:
        if len(self.times) >= 2:
            self.last = self.fps
        self.times.clear()

    @property
    def fps(self) -> float:
        if len(self.times) < 2 or self.times[-1] <= self.times[0]:
            return self.last
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


# ----------------------------------------------------------------------------- worlds


@dataclass
class World:
    """What the game loop plays: an env (Dream or the real simulator) and how to describe it."""

    env: Any
    mode: Literal["dream", "sim"]
    action_names: tuple[str, ...]
    label: str


def open_world(config: PlayConfig, reality: bool = True, log: Callable[[str], None] | None = None) -> World:
    """Build the env to play: the Dream env over a checkpoint, or the real simulator."""
    from worldsim.dream_env import (DreamEnv, find_default_checkpoint, resolve_checkpoint, start_simulator,
                                    where_checkpoints_were_looked_for)

    log = log or (lambda text: print(text, file=sys.stderr))
    mode = config.world
    checkpoint = Path(config.checkpoint) if config.checkpoint else find_default_checkpoint()
    if mode == "auto":
        if checkpoint is None:
            log(f"worldsim play: no world-model checkpoint found (none given, {where_checkpoints_were_looked_for()}).\n"
                "  You are walking the embedded maze simulator itself (--world sim), not a dream.\n"
                "  Train a model with `worldsim train`, then play it with --checkpoint PATH.")
            mode = "sim"
        else:
            mode = "dream"
    if mode == "sim":
        spec = DEFAULT_SIMULATOR
        if config.checkpoint:  # walk the simulator that checkpoint was trained on (its config.json alone)
            from worldsim.checkpoint import read_config

            spec = read_config(config.checkpoint).get("simulator") or DEFAULT_SIMULATOR
        env = start_simulator(spec, source=f"checkpoint {config.checkpoint}")
        names = tuple(getattr(env.unwrapped, "action_names", ()))
        return World(env, "sim", names, f"simulator {spec['id']}")
    path = resolve_checkpoint(checkpoint)
    log(f"worldsim play: loading the world model from {path} ...")
    try:
        env = DreamEnv(checkpoint=path, context_frames=config.context_frames, still_frames=config.still_frames,
                       dataset=config.dataset, episode=config.episode, cache_mode=config.cache_mode,
                       memory_frames=config.memory_frames or None, steps=config.steps, cfg=config.cfg,
                       shift=config.shift, temperature=config.temperature, generated_noise=config.generated_noise,
                       device=config.device, precision=config.precision, reality=reality, timing=True)
    except ValueError as exc:  # e.g. a dataset with other actions or resolution than the checkpoint
        if type(exc).__name__ in ("DatasetError", "CheckpointError"):
            raise
        raise PlayError(str(exc)) from None
    return World(env, "dream", env.action_names, f"dream {path.name}")


# ----------------------------------------------------------------------------- window


def _import_pygame():
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    if not pygame.display.get_init():
        pygame.display.init()
    if not pygame.font.get_init():
        pygame.font.init()
    return pygame


class FrameWindow:
    """A pygame window showing scaled frames, an optional HUD strip below and a text overlay.

    Also serves `DreamEnv(render_mode="human")`, which keeps pygame out of the env module.
    """

    LINE = 18
    PAD = 4

    def __init__(self, title: str = "worldsim", scale: int = 8, fps: float | None = None, hud_lines: int = 0) -> None:
        self.pg = _import_pygame()
        self.title = title
        self.scale = max(1, int(scale))
        self.fps = fps
        self.hud_height = hud_lines * self.LINE + 2 * self.PAD if hud_lines else 0
        self.screen = None
        self.size: tuple[int, int] | None = None
        self._fonts: dict[int, Any] = {}
        self.font = self._font(20)
        self.clock = self.pg.time.Clock()

    def _fitted(self, line: str, width: int, font: Any = None) -> str:
        """`line` cut to `width` pixels with a trailing "...": a long message (a recording's path, an
        error) ran off the window; its head, and the full text on the terminal, stay readable."""
        font = font or self.font
        if font.size(line)[0] <= width:
            return line
        lo, hi = 0, len(line)  # the longest prefix that fits with the ellipsis
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if font.size(line[:mid] + "...")[0] <= width else (lo, mid - 1)
        return line[:lo] + "..."

    def _font(self, size: int):
        if size not in self._fonts:
            self._fonts[size] = self.pg.font.Font(None, size)
        return self._fonts[size]

    OVERLAY_SIZES = (20, 18, 16, 14)  # the help's font shrinks down to this to fit a small window
    HUD_SIZES = (20, 18, 16, 14)  # the HUD's likewise (20: as ever in a window 512 pixels wide)

    def hud_layout(self, hud: Sequence[str | Sequence[str]], width: int) -> tuple[Any, list[str]]:
        """The HUD's font and lines for a window `width` pixels wide (less the padding). A line given as
        ever shorter forms shows the longest that fits; the font is the largest at which every such
        line has a form that fits, so a narrow window (--scale 4: 256 pixels) keeps their numbers
        rather than cutting them with "...". A plain string (the status: messages, paths) does not
        shrink the font; it is cut at its end."""
        forms = [(line,) if isinstance(line, str) else tuple(line) for line in hud]
        shrinking = [f for f, line in zip(forms, hud) if not isinstance(line, str)]
        for size in self.HUD_SIZES:
            font = self._font(size)
            if all(any(font.size(t)[0] <= width for t in f) for f in shrinking):
                break
        chosen = [next((t for t in f if font.size(t)[0] <= width), f[-1]) for f in forms]
        return font, [self._fitted(t, width, font) for t in chosen]

    def overlay_layout(self, overlay: Sequence[str], area: Any, pad_top: int = 12) -> list[tuple[str, Any, tuple[int, int]]]:
        """Where each piece of the help goes: (text, font, (x, y)), all inside `area` (a pygame Rect).

        "keys<TAB>what" lines are two columns, the second just right of the widest key (the font is
        proportional). The largest font whose lines all fit is used; in a window too small for
        even the smallest, lines are cut with "..." and those below the area are left out, rather
        than drawn over the HUD or off the window."""
        rows = [line.split("\t", 1) for line in overlay]
        for size in self.OVERLAY_SIZES:
            font = self._font(size)
            step = font.get_linesize() + 2
            key_w = max((font.size(row[0])[0] for row in rows if len(row) == 2), default=0)
            col2 = area.x + 12 + key_w + 16
            widest = max(col2 + font.size(row[1])[0] if len(row) == 2 else area.x + 12 + font.size(row[0])[0]
                         for row in rows)
            if widest <= area.right - 8 and area.y + pad_top + len(rows) * step <= area.bottom - 4:
                break
        placed = []
        for i, row in enumerate(rows):
            y = area.y + pad_top + i * step
            if y + font.get_height() > area.bottom:
                break
            cells = list(zip(row, (area.x + 12, col2))) if len(row) == 2 else [(row[0], area.x + 12)]
            for text, x in cells:
                if not text:
                    continue
                fitted = self._fitted(text, area.right - 8 - x, font)
                if fitted != "...":
                    placed.append((fitted, font, (x, y)))
        return placed

    def label_text(self, label: str, width: int) -> str:
        """A panel's caption for a panel `width` pixels wide: its first word where the whole does not fit."""
        if self.font.size(label)[0] + 8 > width:
            label = label.split(" ", 1)[0]
        return self._fitted(label, width - 8)

    def _badge(self, text: str, colour: tuple[int, int, int], pos: tuple[int, int], anchor: str) -> Any:
        """`text` on a black box (readable over bright sky and dark floor alike); returns its Rect."""
        render = self.font.render(text, True, colour)
        rect = render.get_rect(**{anchor: pos}).inflate(8, 4)
        self.screen.fill((0, 0, 0), rect)
        self.screen.blit(render, render.get_rect(center=rect.center))
        return rect

    def show(self, frame: np.ndarray, hud: Sequence[str | Sequence[str]] = (), overlay: Sequence[str] | None = None,
             pump: bool = True, labels: Sequence[str] = (), corner: str = "", banner: str = "") -> None:
        """Draw `frame` scaled; `labels` caption equal-width panels left to right (dream | reality);
        `corner` is a red badge at the view's top right (REC), `banner` a line across its middle (PAUSED)."""
        pg = self.pg
        h, w = frame.shape[:2]
        view = (w * self.scale, h * self.scale)
        size = (view[0], view[1] + self.hud_height)
        if size != self.size:
            try:
                self.screen = pg.display.set_mode(size)
            except pg.error as exc:  # SDL's limit (16,384 pixels a side): --scale too large
                raise PlayError(f"cannot open a {size[0]}x{size[1]} window ({exc}); lower --scale") from None
            pg.display.set_caption(self.title)
            self.size = size
        surface = pg.surfarray.make_surface(np.ascontiguousarray(frame.transpose(1, 0, 2)))
        self.screen.blit(pg.transform.scale(surface, view), (0, 0))
        top = 0  # below the panel captions: the help starts there
        if overlay:
            panel = pg.Surface(view, pg.SRCALPHA)
            panel.fill((0, 0, 0, 190))
            self.screen.blit(panel, (0, 0))
        panel_w = view[0] // max(1, len(labels))
        for i, label in enumerate(labels):
            text = self.font.render(self.label_text(label, panel_w), True, (255, 255, 255), (0, 0, 0))
            self.screen.blit(text, (i * panel_w + 4, 4))
            top = max(top, 4 + text.get_height())
        if corner:
            self._badge(corner, (255, 64, 64), (view[0] - 6, 6), "topright")
        if banner and not overlay:
            self._badge(self._fitted(banner, view[0] - 16), (255, 255, 255), (view[0] // 2, view[1] // 2), "center")
        if self.hud_height:
            self.screen.fill((16, 16, 16), pg.Rect(0, view[1], size[0], self.hud_height))
            font, lines = self.hud_layout(hud, size[0] - 2 * self.PAD)
            for i, line in enumerate(lines):
                self.screen.blit(font.render(line, True, (230, 230, 230)), (self.PAD, view[1] + self.PAD + i * self.LINE))
        if overlay:
            area = pg.Rect(0, top, view[0], view[1] - top)
            for text, font, pos in self.overlay_layout(overlay, area, pad_top=6 if top else 12):
                self.screen.blit(font.render(text, True, (255, 255, 255)), pos)
        pg.display.flip()
        if pump:  # standalone use (render_mode="human"): keep the window responsive, pace it
            pg.event.pump()
            if self.fps:
                self.clock.tick(self.fps)

    def close(self) -> None:
        if self.screen is not None:
            self.pg.display.quit()
            self.screen = None
            self.size = None


# ----------------------------------------------------------------------------- the game


EventSource = Callable[[], Iterable[Any]]


class Game:
    """The interactive loop. It talks to the world only through env.reset/env.step."""

    HUD_LINES = 3

    def _event_key_name(self, name: str) -> str | None:
        """The name pygame gives key events for the key called `name` ('keypad 8' -> '[8]',
        'pageup' -> 'page up'), or None for no key: events are matched by that name."""
        try:
            canonical = self.pg.key.name(self.pg.key.key_code(name))
        except ValueError:
            return None
        return canonical or None

    def __init__(self, world: World, config: PlayConfig, keymap: dict[str, str],
                 window: FrameWindow | None = None) -> None:
        self.world = world
        self.config = config
        self.action_index = {name: i for i, name in enumerate(world.action_names)}
        self.window = window or FrameWindow(title=f"worldsim - {world.label}", scale=config.scale,
                                            hud_lines=self.HUD_LINES)
        self.pg = self.window.pg
        event_names = {key: self._event_key_name(key) for key in keymap}
        reserved = [f"{key!r} (= {name!r})" for key, name in event_names.items() if name in CONTROL_KEYS]
        if reserved:
            raise PlayError(f"keymap {config.keymap}: {', '.join(reserved)} is reserved for the game's own keys")
        self.keymap = {event_names[key]: action for key, action in keymap.items() if event_names[key]}
        unknown = [key for key, name in event_names.items() if name is None]
        if unknown:  # a misspelt key would otherwise never fire
            raise PlayError(f"keymap {config.keymap}: pygame knows no key named {', '.join(map(repr, unknown))} "
                            "(key names as pygame spells them: 'up', 'w', 'space', 'left shift', 'return')")
        spellings: dict[str, list[str]] = {}
        for key, name in event_names.items():
            spellings.setdefault(name, []).append(key)
        # one key under two spellings bound to two actions: one binding would silently replace the other
        twice = [keys for keys in spellings.values() if len({keymap[k] for k in keys}) > 1]
        if twice:
            raise PlayError(f"keymap {config.keymap}: {' and '.join(map(repr, twice[0]))} are the same key, bound "
                            f"to {' and '.join(repr(keymap[k]) for k in twice[0])}; bind it once")
        self.meter = FpsMeter()
        self.paused = False
        self.show_help = False
        self.side_by_side = bool(config.reality) and world.mode == "dream"
        self.recorder: VideoRecorder | None = None
        self.record_layout = False  # side_by_side frozen at the start of a recording
        self.recordings: list[Path] = []
        self.held: list[str] = []  # action keys held down, most recent last
        self.pending: list[str] = []  # key presses not yet played (a tap shorter than a tick)
        self.worlds = 0
        self.steps_taken = 0
        self.frame_index = 0
        self.frame: np.ndarray | None = None
        self.reality: np.ndarray | None = None
        self.info: dict[str, Any] = {}
        self.message = ""
        self.message_until = 0.0
        self.running = True
        self.seed = config.seed
        self._rss_at, self._rss = -1e9, 0.0

    # -- world

    def new_world(self) -> None:
        seed = self.config.seed + self.worlds
        self.worlds += 1
        obs, info = self.world.env.reset(seed=seed)
        self.seed = seed
        self._show(obs, info, index=int(info.get("frame_index", 0)))
        self.meter.gap()
        self.say(f"new world (seed {seed})")

    def play(self, action_name: str) -> None:
        start = time.perf_counter()
        obs, _, terminated, truncated, info = self.world.env.step(self.action_index[action_name])
        self.steps_taken += 1
        # a tapped key's frame counts at most at the target rate, which the loop keeps to
        self.meter.tick(frame_seconds=max(time.perf_counter() - start, 1.0 / self.config.fps))
        self._show(obs, info, index=int(info.get("frame_index", self.frame_index + 1)))
        if terminated or truncated:  # a real level's own time limit (--world sim over DMLab, Memory Maze)
            self.new_world()
            self.say(f"the level's episode ended: new world (seed {self.seed})")

    def _show(self, obs: np.ndarray, info: dict[str, Any], index: int) -> None:
        self.frame, self.info, self.frame_index = obs, info, index
        self.reality = info.get("reality_frame")
        if self.recorder is not None:
            self._record_frame()

    # -- recording

    def _record_frame(self) -> None:
        assert self.recorder is not None and self.frame is not None
        try:
            self.recorder.append(recorded_view(self.frame, self.reality, self.record_layout, self.config.scale))
        except PlayError as exc:  # a full disk, say: the game goes on without the recording
            recorder, self.recorder = self.recorder, None
            recorder.close()
            print(f"worldsim play: recording stopped: {exc}", file=sys.stderr)
            self.say(f"recording stopped: {exc}")

    def toggle_recording(self) -> None:
        if self.recorder is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = Path(self.config.record_dir) / f"worldsim-{stamp}.mp4"
            n = 1
            while path.exists():
                path = path.with_name(f"worldsim-{stamp}-{n}.mp4")
                n += 1
            try:
                self.recorder = VideoRecorder(path, fps=self.config.fps)
            except (PlayError, OSError) as exc:  # the game goes on without a recording
                print(f"worldsim play: cannot record: {exc}", file=sys.stderr)
                self.say(f"cannot record: {exc}")
                return
            for kept, frames in self.recorder.recovered:
                print(f"worldsim play: {RECOVERED.format(frames=frames, path=kept)}", file=sys.stderr)
            self.record_layout = self.side_by_side
            self._record_frame()  # the video starts with what is on screen now
            if self.recorder is not None:  # (a failed first frame dropped it, and said why)
                self.say(f"recording to {path.name}")
                print(f"worldsim play: recording to {path}", file=sys.stderr)
        else:
            self.stop_recording()

    def stop_recording(self) -> None:
        if self.recorder is None:
            return
        recorder, self.recorder = self.recorder, None
        frames = recorder.frames
        try:
            recorder.close()
        except PlayError as exc:  # the file could not be finished (a full disk): the game goes on
            print(f"worldsim play: {exc}", file=sys.stderr)
            self.say(str(exc))
        finally:  # also when a Ctrl-C held while the video was finished is raised now
            path = recorder.saved
            if path is not None:
                self.recordings.append(path)
                self.say(f"saved {frames} frames to {path}")
                print(f"worldsim play: saved {frames} frames to {path}", file=sys.stderr)

    # -- input

    def say(self, text: str, seconds: float = 3.0) -> None:
        self.message, self.message_until = text, time.monotonic() + seconds

    def command(self, name: str) -> None:
        if name == "quit":
            self.running = False
        elif name == "new_world":
            self.new_world()
        elif name == "pause":
            self.paused = not self.paused
            self.pending.clear()
        elif name == "help":
            self.show_help = not self.show_help
        elif name == "record":
            self.toggle_recording()
        elif name == "reality":
            if self.world.mode != "dream":
                self.say("this is already the real simulator (no model loaded)")
            elif self.recorder is not None:
                # A video keeps one frame size: the layout is fixed while recording.
                self.side_by_side = not self.side_by_side
                self.say("view changed; the recording keeps its layout")
            else:
                self.side_by_side = not self.side_by_side

    def handle(self, event: Any) -> None:
        pg = self.pg
        if event.type == pg.QUIT:
            self.running = False
        elif event.type == pg.KEYDOWN:
            key = pg.key.name(event.key)
            if key in CONTROL_KEYS:
                self.command(CONTROL_KEYS[key])
            elif key in self.keymap:  # held while paused too: a key still down at unpause walks
                if key in self.held:
                    self.held.remove(key)
                self.held.append(key)
                if not self.paused:
                    self.pending.append(key)
        elif event.type == pg.KEYUP:
            key = pg.key.name(event.key)
            if key in self.held:
                self.held.remove(key)
        elif event.type == getattr(pg, "WINDOWFOCUSLOST", None):
            self.held.clear()  # the KEYUP of a key released elsewhere never comes: stop walking

    def next_action(self) -> str | None:
        """A fresh press plays once even if released within the tick; a held key repeats."""
        if self.paused:
            return None
        if self.pending:
            return self.keymap[self.pending.pop(0)]
        if self.held:
            return self.keymap[self.held[-1]]
        return None

    # -- drawing

    def hud(self) -> list[str]:
        """The HUD's three lines, in full (as a window 512 pixels wide, --scale 8, shows them)."""
        return [line if isinstance(line, str) else line[0] for line in self.hud_forms()]

    def hud_forms(self) -> list[str | tuple[str, ...]]:
        """The HUD's lines, the first two as ever shorter forms (FrameWindow shows the longest that
        fits): at --scale 4 the full ones were cut with "..." and lost the frame, the seed, the cache
        size and the RSS, which every form keeps (the shortest memory form leaves out the L2 token
        count). The third, the status, is one string, cut at its end."""
        info = self.info
        fps = self.meter.fps  # 0 until a frame was generated: "--", not a rate of 0.0 on the first screen
        rate = f"{fps:5.1f}" if fps > 0 else "  --"
        state = "PAUSED" if self.paused else f"{rate} fps (target {self.config.fps:g})"
        short_state = "PAUSED" if self.paused else f"{rate.strip()}/{self.config.fps:g} fps"
        frame, seed = self.frame_index, self.seed
        if self.world.mode == "dream":
            top: str | tuple[str, ...] = (f"DREAM  {state}  frame {frame}  seed {seed}",
                                          f"DREAM  {short_state}  frame {frame}  seed {seed}",
                                          f"DREAM {short_state}  fr {frame}  seed {seed}")
            mb = info.get("cache_bytes", 0) / 2**20
            bound = info.get("memory_frames")
            l2, tok, l1 = info.get("l2_frames", 0), info.get("l2_tokens", 0), info.get("l1_frames", 0)
            rss = self.rss_mb()
            mem: str | tuple[str, ...] = (
                f"memory L2 {l2}{f' of {bound}' if bound else ''} fr / {tok} tok  "
                f"L1 {l1} fr  cache {mb:.1f} MB  RSS {rss:.0f} MB",
                f"L2 {l2}{f' of {bound}' if bound else ''} fr / {tok} tok  L1 {l1} fr  cache {mb:.1f} MB  RSS {rss:.0f} MB",
                f"L2 {l2}{f'/{bound}' if bound else ''} fr  L1 {l1} fr  cache {mb:.0f} MB  RSS {rss:.0f} MB")
        else:
            top = (f"SIMULATOR (no model)  {state}  frame {frame}  seed {seed}",
                   f"SIMULATOR  {short_state}  frame {frame}  seed {seed}",
                   f"SIM {short_state}  fr {frame}  seed {seed}")
            pose = info.get("pose")
            mem = ("pose x %.2f y %.2f yaw %.0f deg" % (pose[0], pose[1], np.degrees(pose[2]))
                   if pose is not None else "")
        status = []
        if self.recorder is not None:
            frames = self.recorder.frames
            status.append(f"REC {frames} frame{'' if frames == 1 else 's'}")
        if self.message and time.monotonic() < self.message_until:
            status.append(self.message)
        if not status:
            status.append("H help")
        if self.world.mode == "dream":  # last: a narrow window cuts the line's end, and these never change
            status.append(f"steps {info.get('steps', '?')} shift {info.get('shift', 1.0):g} "
                          f"temp {info.get('temperature', 1.0):g} "
                          f"noise {info.get('generated_noise', 0.0):g} {info.get('precision', '')}")
        return [top, mem, "  |  ".join(status)]

    def rss_mb(self) -> float:
        # Re-read at most once a second: the HUD shows the process growing over long sessions.
        now = time.monotonic()
        if now - self._rss_at > 1.0:
            self._rss_at, self._rss = now, resident_memory_bytes() / 2**20
        return self._rss

    def draw(self) -> None:
        if self.frame is None:
            return
        view = compose(self.frame, self.reality, self.side_by_side)
        overlay = None
        if self.show_help:
            overlay = ["worldsim play - keys", ""] + help_lines(
                self.keymap, skip=() if self.world.mode == "dream" else ("reality",))
            if self.side_by_side:
                overlay += ["", "left: dream (model)   right: reality (simulator)"]
        labels = ("DREAM (model)", "REALITY (simulator)") if self.side_by_side else ()
        self.window.show(view, self.hud_forms(), overlay, pump=False, labels=labels,
                         corner="REC" if self.recorder is not None else "",
                         banner="PAUSED - P to resume" if self.paused else "")

    # -- loop

    def run(self, events: EventSource | None = None, max_ticks: int | None = None) -> None:
        """Play until Esc / window close (or `max_ticks`); `events` replaces pygame's queue in tests."""
        events = events or self.pg.event.get
        self.new_world()
        ticks = 0
        try:
            while self.running and (max_ticks is None or ticks < max_ticks):
                started = time.perf_counter()
                for event in events():
                    self.handle(event)
                    if not self.running:
                        break
                if not self.running:
                    break
                action = self.next_action()
                if action is not None:
                    self.play(action)
                else:
                    self.meter.gap()
                self.draw()
                self.wait_for_next_tick(started + 1.0 / self.config.fps, events)
                ticks += 1
        finally:
            self.stop_recording()  # never lose a recording, even on Ctrl-C or an error

    def wait_for_next_tick(self, due: float, events: EventSource) -> None:
        """Keep to --fps, handling the events that come meanwhile: at a low --fps a tick lasts
        seconds, and Esc, the window's close, pause or help must not wait for it. A movement key
        pressed meanwhile is only queued; it plays on the next tick, at the pace --fps sets."""
        while self.running and due - time.perf_counter() > WAKE_SECONDS:
            time.sleep(WAKE_SECONDS)
            handled = False
            for event in events():
                self.handle(event)
                handled = True
                if not self.running:
                    return
            if handled:
                self.draw()
        left = due - time.perf_counter()
        if left > 0 and self.running:
            time.sleep(left)


def run_interactive(config: PlayConfig, events: EventSource | None = None, max_ticks: int | None = None,
                    world: World | None = None) -> Game:
    """Open the window and play; returns the finished Game (recordings, steps taken)."""
    world = world or open_world(config, reality=True)
    try:
        keymap = load_keymap(config.keymap, world.action_names)
        game = Game(world, config, keymap)
        try:
            game.run(events, max_ticks)
        finally:
            game.window.close()
        return game
    finally:
        world.env.close()


# ----------------------------------------------------------------------------- headless


@dataclass
class HeadlessResult:
    frames: int
    out: Path | None
    seconds: float
    benchmark: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rss_bytes: int = 0
    label: str = ""
    steps: int | None = None
    precision: str | None = None
    shift: float | None = None
    generated_noise: float | None = None
    temperature: float | None = None
    still_frames: int | None = None


def run_headless(config: PlayConfig, world: World | None = None, log: Callable[[str], None] | None = None) -> HeadlessResult:
    """Play `config.actions` without a window; write `config.out` (one video frame per step)."""
    from tqdm import tqdm

    log = log or (lambda text: print(text, file=sys.stderr))
    if not config.actions:
        raise PlayError("--headless needs --actions FILE (one action name per line) or --actions random:N")
    if config.keymap != "default":
        log(f"worldsim play: --keymap {config.keymap} is for the window; --headless plays the --actions given")
    world = world or open_world(config, reality=config.reality, log=log)
    env = world.env
    recorder = None
    bench: list[dict[str, Any]] = []
    times: deque[float] = deque(maxlen=BENCH_WINDOW)
    # CPU seconds too: on a shared machine wall-clock fps mostly measures the neighbours, while
    # process CPU time per frame (with --threads 1) is what one free core would give.
    cpu_times: deque[float] = deque(maxlen=BENCH_WINDOW)
    try:
        actions = read_actions(config.actions, world.action_names, seed=config.seed)
        obs, info = env.reset(seed=config.seed)
        ended, episode_over = 0, False  # episodes the simulator ended on its own so far
        if config.out:
            recorder = VideoRecorder(config.out, fps=config.fps)
            for path, frames in recorder.recovered:
                log(f"worldsim play: {RECOVERED.format(frames=frames, path=path)}")
        start = time.perf_counter()
        for i, action in enumerate(tqdm(actions, desc=f"worldsim play ({world.mode})", unit="frame",
                                        file=sys.stderr, disable=None if config.progress else True), 1):
            if episode_over:  # the simulator's own time limit: the walk goes on in a new world
                obs, info = env.reset(seed=config.seed + ended)
                episode_over = False
                log(f"worldsim play: the level's episode ended before action {i}; new world (seed {config.seed + ended})")
            t0, c0 = time.perf_counter(), time.process_time()
            obs, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                ended, episode_over = ended + 1, True
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            if recorder is not None:
                recorder.append(recorded_view(obs, info.get("reality_frame"), config.reality and world.mode == "dream",
                                              config.scale))
            if config.benchmark and i in BENCH_AT:
                bench.append({
                    "frame": i, "frame_index": int(info.get("frame_index", i)),
                    "fps": len(times) / max(sum(times), 1e-9),
                    "cpu_s_per_frame": sum(cpu_times) / len(cpu_times),
                    "gen_time_s": float(info.get("gen_time_s", 0.0)),
                    "l2_frames": info.get("l2_frames"), "l2_tokens": info.get("l2_tokens"),
                    "cache_mb": info.get("cache_bytes", 0) / 2**20,
                    "rss_mb": resident_memory_bytes() / 2**20,
                })
                log(f"worldsim play: benchmark at frame {i}: {bench[-1]['fps']:.2f} fps, "
                    f"{bench[-1]['cpu_s_per_frame']:.3f} CPU s/frame, RSS {bench[-1]['rss_mb']:.0f} MB")
        seconds = time.perf_counter() - start
        out = recorder.close() if recorder is not None else None
    except BaseException:
        # Ctrl-C or an error: keep what was already generated (renamed into place), then re-raise.
        # A Ctrl-C while the finished video was saved is raised once it is in place: it is kept whole.
        if recorder is not None:
            frames = recorder.frames
            try:
                recorder.close()
            except PlayError as exc:  # the first error is the one to raise; say this one too
                log(f"worldsim play: {exc}")
            finally:
                if recorder.saved is not None:
                    log(f"worldsim play: kept {frames} frames in {recorder.saved}")
        raise
    finally:
        env.close()
    return HeadlessResult(len(actions), out, seconds, bench, resident_memory_bytes(), world.label,
                          info.get("steps"), info.get("precision"), info.get("shift"), info.get("generated_noise"),
                          info.get("temperature"), info.get("still_frames"))


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, PlayConfig, skip=("headless", "benchmark", "reality"))
    # Flags rather than `--headless true`: they read as switches on the command line.
    parser.add_argument("--headless", action="store_true", help="no window: play --actions and write --out")
    parser.add_argument("--benchmark", action="store_true",
                        help=f"headless: print fps at generated frames {', '.join(map(str, BENCH_AT))} "
                             "and resident memory (default actions: random:2000)")
    parser.add_argument("--reality", action="store_true",
                        help="start with the dream-vs-reality side-by-side view (headless: record it)")


def _check(config: PlayConfig) -> None:
    if not 0.1 <= config.fps <= 1000:  # also NaN and inf, which no video can store
        raise PlayError(f"--fps must be from 0.1 to 1000, got {config.fps}")
    if config.scale < 1:
        raise PlayError(f"--scale must be >= 1, got {config.scale}")
    if config.headless and config.scale > MAX_SCALE:  # a window's is SDL's to refuse (FrameWindow.show)
        raise PlayError(f"--scale goes up to {MAX_SCALE} in a headless video (64x64 frames {64 * MAX_SCALE} pixels "
                        f"a side), got {config.scale}")
    # numpy and Gymnasium take only non-negative seeds; the 32-bit bound is every command's (record,
    # train, eval, bench: torch's CPU generator keeps a seed's low 32 bits), so one seed works in all
    if not 0 <= config.seed < 2**32:
        raise PlayError(f"--seed must be from 0 to 2**32 - 1, got {config.seed}")
    from worldsim.sampler import MAX_STEPS, MAX_STILL_FRAMES

    if not 1 <= config.context_frames <= MAX_STILL_FRAMES:
        raise PlayError(f"--context-frames must be from 1 to {MAX_STILL_FRAMES}, got {config.context_frames}")
    if config.still_frames is not None and not 0 <= config.still_frames <= MAX_STILL_FRAMES:
        raise PlayError(f"--still-frames must be from 0 to {MAX_STILL_FRAMES}, got {config.still_frames}")
    if config.steps is not None and not 1 <= config.steps <= MAX_STEPS:
        raise PlayError(f"--steps must be from 1 to {MAX_STEPS}, got {config.steps}")
    if config.memory_frames < 0:
        raise PlayError(f"--memory-frames must be >= 0 (0: no limit), got {config.memory_frames}")
    from worldsim.sampler import setting_problem

    for name in ("cfg", "shift", "temperature", "generated_noise"):
        value = getattr(config, name)
        if value is not None and (problem := setting_problem(name, value)):
            raise PlayError(f"--{name.replace('_', '-')} {problem}")
    if config.world == "sim":  # options that would be taken and silently do nothing
        dream_only = [f"--{name.replace('_', '-')}" for name in
                      ("dataset", "episode", "still_frames", "steps", "cfg", "shift", "temperature", "generated_noise")
                      if getattr(config, name) is not None]
        dream_only += ["--device"] * (config.device is not None) + ["--precision"] * (config.precision != "auto")
        dream_only += ["--context-frames"] * (config.context_frames != PlayConfig.context_frames)
        dream_only += ["--reality"] * config.reality + ["--cache-mode"] * (config.cache_mode != "multilevel-fast")
        dream_only += ["--memory-frames"] * (config.memory_frames != PlayConfig.memory_frames)
        if dream_only:
            raise PlayError(f"{', '.join(dream_only)}: for the dream; --world sim walks the simulator itself")
    elif (config.cache_mode not in ("multilevel", "multilevel-fast")
          and config.memory_frames != PlayConfig.memory_frames):  # only the multi-level caches have an L2 to bound
        raise PlayError(f"--memory-frames bounds the long-term memory of the multilevel caches; --cache-mode "
                        f"{config.cache_mode} has none")
    if config.episode is not None and config.dataset is None:
        raise PlayError("--episode picks an episode of --dataset: give --dataset too")
    if config.out is not None and not config.out.strip():
        raise PlayError("--out needs a file name ending in .mp4 or .gif")
    if config.out and config.out.lower().endswith(".gif") and config.fps > 50:
        raise PlayError(f"--fps {config.fps:g}: a GIF stores frame times in 1/100 s and players slow frames under "
                        "2/100 s down, so GIFs go up to 50 fps; write an .mp4 for more")
    if not config.headless and (config.actions or config.out):
        raise PlayError("--actions and --out are for --headless runs")
    if config.threads is not None and config.threads < 1:
        raise PlayError(f"--threads must be >= 1, got {config.threads}")


def default_threads() -> int:
    """Play's torch threads: one core left for the rest of the machine. On this project's 2-core CPU,
    with another program keeping one core busy, `play.py --headless --benchmark --actions random:510`
    played frame 500 at 6.97 fps with 2 threads and 24.04 with 1 (session 31); quiet, 2 threads were
    1.3-1.5x faster, which a window capped at --fps 15 does not show."""
    import torch

    from worldsim.model import usable_cores

    return max(1, min(torch.get_num_threads(), usable_cores() - 1))


def main(args: argparse.Namespace) -> int:
    from worldsim.dream_env import CheckpointNotFound, SimulatorUnavailable

    config = dataclass_from_args(PlayConfig, args)
    if config.benchmark:
        config.headless = True
        config.actions = config.actions or f"random:{max(BENCH_AT)}"
    try:
        _check(config)
        import torch

        torch.set_num_threads(config.threads if config.threads is not None else default_threads())
        if config.headless:
            result = run_headless(config)
            rate = result.frames / max(result.seconds, 1e-9)
            print(f"played {result.frames} frames in {result.seconds:.1f} s ({rate:.2f} fps)"
                  + (f"; wrote {result.out}" if result.out else ""))
            if config.benchmark:
                import torch

                dream = result.steps is not None  # the simulator alone has no sampler or cache to report
                print(f"benchmark: {result.label}, "
                      + (f"sampling steps {result.steps}, shift {result.shift}, temperature {result.temperature}, "
                         f"generated noise {result.generated_noise}, still frames {result.still_frames}, "
                         f"cache {config.cache_mode}, precision {result.precision}, " if dream else "")
                      + f"torch threads {torch.get_num_threads()}")
            for row in result.benchmark:
                print(f"frame {row['frame']:>5}" + (f" (model frame index {row['frame_index']})" if dream else "")
                      + f": {row['fps']:.2f} fps (last {BENCH_WINDOW} frames; {row['cpu_s_per_frame']:.3f} CPU s/frame), "
                      + (f"L2 {row['l2_frames']} frames / {row['l2_tokens']} tokens, cache {row['cache_mb']:.1f} MB, "
                         if dream else "")
                      + f"RSS {row['rss_mb']:.0f} MB")
            if config.benchmark:
                missed = [f for f in BENCH_AT if f not in {row["frame"] for row in result.benchmark}]
                if missed:  # a shorter --actions list ends first: say so, not only by their absence
                    print(f"not reached: frame{'s' if len(missed) > 1 else ''} {', '.join(map(str, missed))} "
                          f"(the walk ended after {result.frames} frames)")
                print(f"resident memory at the end: {result.rss_bytes / 2**20:.0f} MB")
            return 0
        problem = display_problem()
        if problem:
            print(f"worldsim play: {problem}", file=sys.stderr)
            return 2
        game = run_interactive(config)
        print(f"worldsim play: {game.steps_taken} frames played", file=sys.stderr)
        return 0
    except (PlayError, KeymapError, CheckpointNotFound, SimulatorUnavailable) as exc:
        print(f"worldsim play: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except ValueError as exc:  # DatasetError, CheckpointError, DeviceError and bad env options are ValueErrors
        if type(exc).__name__ in ("DatasetError", "CheckpointError", "DeviceError", "UntrustedSimulator"):
            print(f"worldsim play: {exc}", file=sys.stderr)
            return 2
        raise
