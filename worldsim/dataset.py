"""Dataset reader (and the small writer helpers the recorder shares).

A dataset is one of

* a folder with ``index.json`` and ``episodes/<id>.npz`` (written by ``worldsim record``);
* a single ``.npz`` file in the public FAR/TECO DeepMind Lab format (``video``, ``actions``);
* a folder of such ``.npz`` files without an index, read with its subfolders (TECO publishes
  ``dmlab/train/<shard>/<n>.npz`` and ``dmlab/test/<shard>/<n>.npz``).

``index.json`` (format version 1)::

    {
      "format": "worldsim-dataset", "format_version": 1,
      "simulator": {"id": "worldsim/Maze-v0", "settings": {...}},
      "resolution": [H, W],
      "action_names": ["noop", "forward", ...],
      "policy": {"name": "mix", ...},            # how the trajectories were chosen
      "recording": {...},                       # recorder settings (resume checks them)
      "episodes": [{"id": "000000", "file": "episodes/000000.npz", "length": 300,
                    "maze_seed": 17, "split": "train"}, ...]
    }

Every episode file holds ``video`` uint8 [T, H, W, 3], ``actions`` int [T] (read as int64;
``actions[0]`` is ``noop``, the first frame is the reset observation) and optionally
``poses`` float32 [T, 3] (x, y in maze cells, yaw in radians).

Files without an index (DMLab) carry no action names: they default to
``action_0 .. action_{n-1}`` with ``n = 1 + max action seen`` over all files, unless
``action_names=`` is passed explicitly. Their episodes have no maze seed. This project's episode
files opened without their index (a folder of them, or one file) are not of that kind: each
carries its recording's header and maze seed, so they keep their action names, simulator and
split (`split_for_maze_seed`); files of different recordings are not mixed.

An index-less folder is searched with its subfolders, sorted by path; hidden files and folders
(``.x``, such as macOS's ``._0.npz``) are skipped, and a subfolder holding its own ``index.json``
is refused (a dataset of its own: give it as its own path). A file directly in the folder has
its stem as id; deeper ones their path below the folder with ``/`` as ``-`` (``train/0/12.npz``
-> ``train-0-12``); two files with one id are refused. Splits of FAR/TECO files: the innermost
folder on the file's path named ``test``/``testing``, ``val``/``valid``/``validation`` or
``train``/``training`` (any case; the given folder's own name counts, and the one above it, so
``dmlab/test/0`` is test; folders further up do not) decides; a ``train`` folder's episodes whose hash (`split_for_id` of the path below
that folder, the same whichever folder is given) says "val" are "val", none "test". Files outside such folders
have no split of their own: training splits them by that hash (`latents.open_split`, the same
~90/5/5 as maze seeds), and only a dataset where no file has a split refuses ``split=``.

Opening a dataset reads ``index.json`` and checks that every episode file it lists exists
(without an index: reads the array headers of every file; cheap, nothing is decompressed);
``ds[i]`` loads and fully validates one episode. Any problem is a
:class:`DatasetError` whose message names the file and the problem.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import operator
import os
import shutil
import signal
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

FORMAT_NAME = "worldsim-dataset"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
EPISODES_DIR = "episodes"
SPLITS = ("train", "val", "test")
MAX_ID_BYTES = 200  # an episode id names files: episode_<id>.mp4 within the 255 bytes of a file name


class DatasetError(ValueError):
    """A dataset file is missing, corrupt or does not follow the format (message names it)."""


# ----------------------------------------------------------------------------- splits


def split_for_maze_seed(seed: int) -> str:
    """Which split a maze belongs to: ~90% "train", 5% "val", 5% "test".

    A pure function of the seed (SHA-256 of its decimal text, mod 100; not Python's salted
    ``hash``), so every dataset, recorded anywhere, holds out the same mazes.
    """
    digest = hashlib.sha256(f"worldsim-maze-{int(seed)}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    if bucket < 90:
        return "train"
    if bucket < 95:
        return "val"
    return "test"


def split_for_id(episode_id: str) -> str:
    """The split a hash of an episode id gives a file that carries no split of its own (a FAR/TECO
    file outside any train/val/test folder): ~90/5/5 as `split_for_maze_seed`."""
    return split_for_maze_seed(int(hashlib.sha256(episode_id.encode()).hexdigest()[:8], 16))


# names of the folders that decide the split of the FAR/TECO files below them (compared in lower case)
SPLIT_FOLDERS = {"train": "train", "training": "train", "test": "test", "testing": "test",
                 "val": "val", "valid": "val", "validation": "val"}


def folder_split_and_key(file: Path, given: Path) -> tuple[str | None, str]:
    """The split the folders of a FAR/TECO file name, and the key its train/val hash is taken of: its
    path below that folder ("0-12" for .../train/0/12.npz), whichever folder was given as the dataset.

    The folders that count: the one given (a file given alone: its folder), those below it, and the
    one above it, so that a shard or part of a test folder given alone (TECO's `dmlab/test/0`) stays
    held out. Not the folders further up: a home or CI folder named test must not make every dataset
    somewhere under it held out."""
    base = Path(os.path.abspath(given))
    if not base.is_dir():
        base = base.parent
    folders = (base.parent.name, base.name) + Path(os.path.abspath(file)).parent.relative_to(base).parts
    for i in range(len(folders) - 1, -1, -1):  # the innermost split folder decides
        if folders[i].lower() in SPLIT_FOLDERS:
            return SPLIT_FOLDERS[folders[i].lower()], "-".join(folders[i + 1:] + (file.stem,))
    return None, file.stem


def episode_split(info: EpisodeInfo) -> str:
    """The split training puts an episode in: its own (index, maze seed or folder), else the hash of its id."""
    return info.split if info.split is not None else split_for_id(info.id)


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class EpisodeInfo:
    id: str
    file: Path
    length: int
    maze_seed: int | None = None
    split: str | None = None
    # a FAR/TECO file (video and actions only): its actions[t] is taken at frame t, not the one
    # that produced frame t, and is read shifted by one frame
    actions_taken_at_frame: bool = False
    # the split a train/val/test folder above an index-less file names ("train" for a file whose
    # id hash moved it to "val"), None elsewhere
    folder_split: str | None = None


@dataclass(repr=False)
class Episode:
    """One loaded episode (`Dataset[i]`): its frames, actions and, where known, poses."""

    info: EpisodeInfo
    video: np.ndarray  # uint8 [T, H, W, 3]
    actions: np.ndarray  # int64 [T]
    poses: np.ndarray | None = None  # float32 [T, 3]

    def __repr__(self) -> str:  # the dataclass's printed the arrays: 22,000 characters for 300 frames
        return (f"Episode(id={self.id!r}, length={len(self)}, frame_shape={tuple(self.video.shape[1:])}, "
                f"maze_seed={self.maze_seed}, split={self.info.split!r}, poses={self.poses is not None})")

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def maze_seed(self) -> int | None:
        return self.info.maze_seed

    def __len__(self) -> int:
        return int(self.video.shape[0])


# ----------------------------------------------------------------------------- low level


def npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an .npz, read from the headers only."""
    path = Path(path)
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                    else:  # pragma: no cover - numpy writes 1.0/2.0 (3.0 for utf8 names)
                        shape, _, dtype = np.lib.format._read_array_header(fh, version)  # type: ignore[attr-defined]
                out[name[: -len(".npy")]] = (tuple(shape), np.dtype(dtype))
    except FileNotFoundError:
        raise DatasetError(f"{path}: episode file not found") from None
    except PermissionError:  # the file system's refusal, not damage: exit 1 naming the file, as in every command
        raise
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"{path}: not a valid .npz (zip) file, truncated or corrupt ({exc})") from None
    except (OSError, EOFError, ValueError, zipfile.LargeZipFile) as exc:
        raise DatasetError(f"{path}: cannot read array headers ({type(exc).__name__}: {exc})") from None
    return out


def _load_arrays(path: Path, keys: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
        if magic.startswith(b"\x93NUMPY"):
            raise DatasetError(f"{path}: expected an .npz archive, found a single .npy array")
        if not magic.startswith(b"PK\x03\x04"):
            raise DatasetError(f"{path}: not a valid .npz (zip) file ({'empty' if not magic else 'wrong magic bytes'})")
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy
            raise DatasetError(f"{path}: expected an .npz archive, found a single .npy array")
        with data:
            names = set(data.files)
            for key in keys:
                if key not in names:
                    raise DatasetError(
                        f"{path}: missing array {key!r} (has: {', '.join(sorted(names)) or 'nothing'})"
                    )
                out[key] = data[key]
            for key in optional:
                if key in names:
                    out[key] = data[key]
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{path}: episode file not found") from None
    except PermissionError:  # the file system's refusal, not a "corrupt episode file": exit 1 naming the file
        raise
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"{path}: not a valid .npz (zip) file, truncated or corrupt ({exc})") from None
    except Exception as exc:  # zlib.error, EOFError, ValueError (pickled objects), OSError, ...
        raise DatasetError(f"{path}: corrupt episode file ({type(exc).__name__}: {exc})") from None
    return out


def _check_video(path: Path, shape: tuple[int, ...], dtype: np.dtype, resolution: tuple[int, int] | None) -> None:
    if dtype != np.uint8:
        raise DatasetError(f"{path}: 'video' must be uint8, got {dtype}")
    if len(shape) != 4 or shape[3] != 3:
        raise DatasetError(f"{path}: 'video' must have shape [T, H, W, 3], got {list(shape)}")
    if shape[0] < 1:
        raise DatasetError(f"{path}: 'video' has no frames")
    if resolution is not None and tuple(shape[1:3]) != tuple(resolution):
        raise DatasetError(
            f"{path}: 'video' resolution {shape[1]}x{shape[2]} differs from the dataset's "
            f"{resolution[0]}x{resolution[1]}"
        )


def _check_actions_header(path: Path, shape: tuple[int, ...], dtype: np.dtype, length: int) -> None:
    if dtype.kind not in "iu":
        raise DatasetError(f"{path}: 'actions' must be integers, got {dtype}")
    if len(shape) != 1:
        raise DatasetError(f"{path}: 'actions' must have shape [T], got {list(shape)}")
    if shape[0] != length:
        raise DatasetError(f"{path}: 'actions' has {shape[0]} entries but 'video' has {length} frames")


def _check_poses_header(path: Path, shape: tuple[int, ...], dtype: np.dtype, length: int) -> None:
    if dtype.kind != "f":
        raise DatasetError(f"{path}: 'poses' must be float32, got {dtype}")
    if shape != (length, 3):
        raise DatasetError(f"{path}: 'poses' must have shape [{length}, 3], got {list(shape)}")


# ----------------------------------------------------------------------------- writer helpers


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def readable_like_any_file(path: str | os.PathLike) -> None:
    """Give a file or folder from mkstemp/mkdtemp (0600/0700) the mode open()/mkdir would have,
    and so every file and folder inside a folder (safetensors, too, creates its files 0600):
    datasets, checkpoints and videos are meant to be read by the machine's other users."""
    umask = _current_umask()
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~umask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], suffix: str | None = None) -> None:
    """Call `write(tmp)` on a temp file beside `path`, flush it to disk, then rename it over
    `path`: readers (and a Ctrl-C or crash midway) see the old file or the new one, never
    half of one. The temp name is `.<name>.<random><suffix>`; `suffix` defaults to ".tmp"
    (what the recorder sweeps up after a crash); pass ".tmp.gif" etc. to writers that pick
    their format from the extension. The file gets the umask's usual permissions (mkstemp
    would leave 0600)."""
    atomic_write_all([(path, write)], suffix)


def atomic_write_all(writes: Sequence[tuple[str | os.PathLike, Callable[[Path], None]]],
                     suffix: str | None = None) -> None:
    """atomic_write for files that belong together (a checkpoint's weights and config): every one
    is written in full before any replaces its old file, so a full disk on the last one leaves
    all the old files. On failure the temp files are removed and the error names the file it
    concerns, not a temp file."""
    temps: dict[Path, str] = {}
    held: list[int] = []  # the temp files' locks, held until they are renamed: a twin is swept only when its writer is gone
    path = Path(writes[0][0])
    try:
        for target, write in writes:
            path = Path(target)
            sweep_dead_twins(path, suffix or ".tmp")
            fd, temps[path] = _locked_temp(path, suffix or ".tmp")
            if fd is not None:
                held.append(fd)
            write(Path(temps[path]))
            fd = os.open(temps[path], os.O_RDWR)  # Windows flushes only handles open for writing
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            readable_like_any_file(temps[path])
        for target, _ in writes:
            path = Path(target)
            os.replace(temps[path], path)
            del temps[path]  # only now: a failed rename still removes its temp file
    except BaseException as exc:
        for tmp in temps.values():
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError):  # a full disk or the like: name the file asked for, not the temp file
            name_the_target(exc, path)
        raise
    finally:
        for fd in held:
            os.close(fd)


def _locked_temp(path: Path, suffix: str) -> tuple[int | None, str]:
    """A new temp twin of `path` and its descriptor, flocked; None for the descriptor where there is
    no flock (Windows, which also renames no open file: the file is closed at once).

    mkstemp and the lock are two calls: in between, another process's sweep_dead_twins can take the
    unlocked file for a dead one, lock it and remove it. The writer then either failed to lock
    (the sweep holds it) or locked a file no longer at its name, and wrote by name to an unlocked
    new one that the next sweep removed under it ('No such file or directory' naming the target,
    for writes racing on one name). So such a twin is left to that sweep and another one is made."""
    for _ in range(100):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        locked = _lock_nb(fd)
        if locked is None:
            os.close(fd)
            return None, tmp
        try:
            if locked and os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return fd, tmp
        except FileNotFoundError:  # the sweep removed it before this lock was taken
            pass
        os.close(fd)
    raise OSError(errno.EAGAIN, "other processes' sweeps kept removing its temp files", str(path))


def _lock_nb(fd: int) -> bool | None:
    """An exclusive flock on `fd` if no one else holds one (True), False if someone does, None
    where there is no flock (not POSIX, or a file system that refuses it): no twin is then known to
    be dead, so none is swept."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def sweep_dead_twins(path: str | os.PathLike, suffix: str = ".tmp") -> None:
    """Remove the temp twins of `path` (`.<name>.<random><suffix>`) that writes killed mid-way left
    (SIGKILL, the out-of-memory killer: full-size hidden files, a few MB for a video, that no later
    write removed). A writer holds a lock on its twin until the rename, and the lock ends with its
    process, so a twin whose lock can be taken has no writer: one still at work in another process
    keeps its file."""
    path = Path(path)
    prefix = f".{path.name}."
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(prefix) and n.endswith(suffix)]
    except OSError:  # a missing folder: mkstemp says so next, naming the target
        return
    for name in names:
        middle = name[len(prefix):len(name) - len(suffix)]
        if not middle or not all(c.isalnum() or c == "_" for c in middle):  # not mkstemp's: someone else's file
            continue
        twin = path.parent / name
        try:
            fd = os.open(twin, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _lock_nb(fd):
                if os.path.isdir(twin):  # a checkpoint save's twin folder (checkpoint.temp_twin)
                    shutil.rmtree(twin, ignore_errors=True)
                else:
                    twin.unlink(missing_ok=True)
        except OSError:  # a read-only folder, say: the write itself will say what is wrong
            pass
        finally:
            os.close(fd)


# the file system's refusals of a write: exit 1 in every command (README), other problems with an output 2
FILE_SYSTEM_REFUSALS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The file among `path`'s parents that keeps mkdir from making it, if one does: mkdir says
    "Not a directory" or "File exists", which reads as if the folder were there, so commands name it."""
    blocker = next((p for p in Path(path).parents if p.exists()), None)
    return blocker if blocker is not None and not blocker.is_dir() else None


def name_the_target(exc: OSError, path: str | os.PathLike) -> None:
    """Point a file-system error (a full disk, say) at `path`, what the user asked to write, when
    it names no file or `path`'s temp twin (`.<name>.<random>.tmp`, where atomic writes work);
    an error about any other file keeps its name."""
    path = Path(path)
    twin = os.path.abspath(path.parent / f".{path.name}.")  # mkstemp names its files in full
    if exc.filename is None or os.path.abspath(exc.filename).startswith(twin):
        exc.filename = str(path)


def video_write_error(exc: BaseException, partial: str | os.PathLike) -> OSError:
    """A one-line OSError for a failed video write into `partial` (call it before removing that file).

    imageio's ffmpeg writer reports a full disk as "[Errno 32] Broken pipe" followed by ffmpeg's
    command line, with no errno, so the file system is asked whether it is full."""
    if isinstance(exc, OSError) and exc.errno not in (None, errno.EPIPE):
        return exc
    try:
        full = shutil.disk_usage(Path(partial).parent).free < 16 * 2**20
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial))
    lines = str(exc).strip().splitlines()
    return OSError(errno.EIO, f"the video writer failed ({lines[0] if lines else type(exc).__name__})", str(partial))


def finished_video_problem(path: str | os.PathLike, frames: int) -> str | None:
    """Why a just-closed MP4 is unusable (None: it holds its `frames`). The ffmpeg writer may fail
    only while finishing the file (x264 holds frames until the end; a full disk or a file-size
    limit then cuts the file) without raising, so the file is read back before it replaces anything."""
    found = mp4_frames(path)
    if found is None:
        return "the finished file cannot be read back"
    return None if found == frames else f"the finished file holds {found} of its {frames} frames"


def mp4_frames(path: str | os.PathLike) -> int | None:
    """The video frames an MP4 holds (None: it cannot be read, such as one whose writer died before
    finishing it)."""
    import re
    import subprocess

    from imageio_ffmpeg import get_ffmpeg_exe

    # the packets counted as they are (-c copy), not decoded: 0.03 s for 1,500 frames at 512x512
    # where decoding them all took 1 s, which a player would wait for when a recording stops
    try:
        run = subprocess.run([get_ffmpeg_exe(), "-nostdin", "-i", str(path), "-map", "0:v:0", "-c", "copy",
                              "-f", "null", "-"], capture_output=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return None
    counts = re.findall(rb"frame=\s*(\d+)", run.stderr)
    if run.returncode != 0 or not counts:
        return None
    return int(counts[-1])


def try_lock(path: str | os.PathLike) -> Any:
    """An exclusive lock on the file `path` (created if missing) for one writer of a folder (a
    dataset's recorder, a run's trainer): the open file that holds it, or None when another process
    holds it. The lock ends when the file is closed or the process ends, also on SIGKILL. Where
    there is no flock (not POSIX) there is no lock."""
    fh = open(path, "a")
    try:
        import fcntl

        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - not POSIX
        pass
    except OSError:
        fh.close()
        return None
    return fh


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C or SIGTERM arrive after the block, not inside it: for a step that must not be cut in
    two, such as a frame's write into ffmpeg (imageio-ffmpeg kills ffmpeg when an interrupt lands
    there, and the video kept on Ctrl-C is lost) or an episode and its index entry.

    The handlers are swapped for one that only notes the signal, then the command's own handlers run
    for it after the block. (Blocking the signal with a mask would not do: the kernel hands it to
    any thread that does not block it, such as a torch worker, and Python then raises it in the
    main thread at once.)"""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return
    arrived: list[int] = []
    previous = {}
    try:  # swapped inside the try: an interrupt between the two swaps still restores the first
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, lambda signum, frame: arrived.append(signum))
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if arrived:
            handler = previous[arrived[0]]
            if callable(handler):  # Python's KeyboardInterrupt, cli's SIGTERM, train's stop flag
                handler(arrived[0], None)
            elif handler == signal.SIG_DFL:  # what the signal would have done: end the process
                signal.raise_signal(arrived[0])


def caption_strip(width: int, texts: Sequence[tuple[int, str | Sequence[str], tuple[int, int, int]]],
                  height: int = 16) -> np.ndarray:
    """A black strip `width` pixels wide, uint8 [height, width, 3], with each (x, text, colour) written
    from x in Pillow's default font: the captions above and below the panels of the videos and GIFs
    the tools write (eval's videos, training's previews, play's dream | reality recordings).
    `text` may be a list of ever shorter alternatives: the first that fits before the next text (or
    the strip's end) is written, so a font wider than the one it was sized on (Pillow before 10.1 draws
    a 6-pixel bitmap font) shortens a caption instead of cutting it off at the edge."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for i, (x, text, colour) in enumerate(texts):
        room = (texts[i + 1][0] if i + 1 < len(texts) else width) - x - 3
        options = [text] if isinstance(text, str) else list(text)
        text = next((t for t in options if draw.textlength(t) <= room), options[-1])
        draw.text((x + 3, (height - 12) // 2), text, fill=tuple(int(c) for c in colour))
    return np.asarray(img)


class GifWriter:
    """A GIF written with Pillow, as imageio's GIF writer does it (every frame held until close()),
    minus that writer's failure: after a failed save (a full disk) imageio keeps the frames and its
    `__del__` saves them again, printing "Exception ignored in: ...__del__" tracebacks at exit.
    Pillow, given a file name, closes the file whatever happens. `duration`: milliseconds a frame."""

    def __init__(self, path: str | os.PathLike, duration: float) -> None:
        self.path, self.duration, self.images = Path(path), duration, []

    def append_data(self, frame: np.ndarray) -> None:
        from PIL import Image

        self.images.append(Image.fromarray(np.ascontiguousarray(frame)))  # a copy, as imageio's

    def close(self) -> None:
        images, self.images = self.images, []  # tried once: a failed save is the caller's to report
        if images:
            images[0].save(self.path, format="GIF", save_all=len(images) > 1, append_images=images[1:],
                           duration=self.duration, loop=0)


def write_gif(path: str | os.PathLike, frames: Iterable[np.ndarray], duration: float) -> None:
    """Write `frames` as a GIF (see GifWriter); `duration`: milliseconds a frame."""
    writer = GifWriter(path, duration)
    for frame in frames:
        writer.append_data(frame)
    writer.close()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temp file beside `path`, then rename over it (never half-written)."""
    text = json.dumps(obj, indent=1) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_npz(fh: Any, compresslevel: int | None = 1, **arrays: Any) -> None:
    """Like `np.savez_compressed` (readable by `np.load`), with a chosen zlib level.

    Level 1 is ~3x faster than numpy's default (6) on rendered frames, for ~15% larger
    files; None stores the arrays uncompressed."""
    method = zipfile.ZIP_STORED if compresslevel is None else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(fh, "w", method, compresslevel=compresslevel) as zf:
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def write_episode_atomic(path: str | os.PathLike, compress: bool = True, **arrays: np.ndarray) -> None:
    """Write an episode .npz to a temp name in the same folder, then `os.replace` it."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            write_npz(fh, 1 if compress else None, **arrays)

    atomic_write(path, write, suffix=".npz.tmp")


# ----------------------------------------------------------------------------- dataset


def default_action_names(n: int) -> tuple[str, ...]:
    return tuple(f"action_{i}" for i in range(n))


def plain_folder_files(root: Path) -> list[tuple[Path, str]]:
    """(file, episode id) of every .npz below an index-less folder, sorted by path.

    Hidden files and folders (".x", such as macOS's "._0.npz" resource forks) are skipped. A file
    directly in `root` keeps its stem as id (the id the hash split has always used); deeper ones
    are named by their path, "train/0/12.npz" -> "train-0-12". A subfolder with its own index.json
    is a worldsim dataset and is refused, not mixed in.
    """
    root = Path(root)
    found: list[tuple[tuple[str, ...], Path]] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real = os.path.realpath(here)
        if real in seen_dirs:  # a link back up the tree (or to a folder read already) would loop
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if here != root and INDEX_NAME in filenames:
            raise DatasetError(f"{here}: is a worldsim dataset (it holds {INDEX_NAME}) inside {root}, which has no "
                               f"{INDEX_NAME}; pass it as its own --data path rather than mixing it into {root}")
        rel = here.relative_to(root).parts
        for name in filenames:
            if name.endswith(".npz") and not name.startswith(".") and (here / name).is_file():
                found.append((rel + (name,), here / name))
    out: list[tuple[Path, str]] = []
    ids: dict[str, Path] = {}
    for parts, file in sorted(found):
        eid = file.stem if len(parts) == 1 else "-".join(parts[:-1] + (file.stem,))
        if len(os.fsencode(eid)) > MAX_ID_BYTES:  # as in an index.json: eval's episode_<id>.mp4 would fail after scoring
            raise DatasetError(f"{file}: its episode id (its path below {root}, joined with '-') is "
                               f"{len(os.fsencode(eid))} bytes long; ids name files (episode_<id>.mp4), so at most "
                               f"{MAX_ID_BYTES}: shorten the folder or file names")
        if eid in ids:
            raise DatasetError(f"{file}: its episode id {eid!r} is also the id of {ids[eid]} (ids join the folders "
                               "below the dataset with '-'); rename one of them")
        ids[eid] = file
        out.append((file, eid))
    return out


def _checked_simulator(simulator: Any, what: str) -> dict | None:
    """`simulator` if it is null or {"id": "...", "settings": {...}}, else DatasetError naming `what`.
    Play and eval start it and training copies it into the checkpoint: a bare id string was an
    AttributeError traceback in play, and a checkpoint trained on it could not be loaded."""
    if simulator is not None and not (isinstance(simulator, dict) and isinstance(simulator.get("id"), str)
                                      and isinstance(simulator.get("settings") or {}, dict)):
        raise DatasetError(f'{what} must be null or {{"id": "...", "settings": {{...}}}}, got {simulator!r}')
    return simulator


class Dataset:
    """Read a recorded dataset, a FAR/TECO DMLab .npz, or a folder of such files.

    FAR/TECO files (without an index, holding `video` and `actions` only) store at `actions[t]`
    the action taken at frame t; they are read shifted by one frame to this project's convention
    (`actions[t]` produced `video[t]` from `video[t-1]`), and frame 0 repeats the file's first
    action since it has no predecessor. This project's episode files, even opened without their
    index, are read as they are.

    ``split`` keeps only the episodes of that split ("train", "val", "test"); files without a
    split of their own beside ones with it are split by the hash of their id (`episode_split`).
    ``action_names`` names the actions of index-less (DMLab) files; by default they are
    ``action_0 .. action_{n-1}`` with n = 1 + the largest action seen. With an index, or for
    this project's episode files (which carry their header), it must agree with the stored names.
    """

    def __init__(self, path: str | os.PathLike, split: str | None = None,
                 action_names: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        self.split = split
        self.index: dict[str, Any] | None = None
        self.simulator: dict | None = None
        self.policy: dict | None = None
        self.format_version: int | None = None
        if not self.path.exists():
            raise DatasetError(f"{self.path}: dataset not found")
        if self.path.is_dir() and (self.path / INDEX_NAME).exists():
            episodes = self._open_index(action_names)
        elif self.path.is_dir():
            files = plain_folder_files(self.path)
            if not files:
                raise DatasetError(f"{self.path}: no {INDEX_NAME} and no .npz episode files in this folder or its "
                                   "subfolders (hidden ones skipped)")
            episodes = self._open_plain(files, action_names)
        elif self.path.suffix == ".npz":
            episodes = self._open_plain([(self.path, self.path.stem)], action_names)
        else:
            raise DatasetError(f"{self.path}: not a dataset (expected a folder with {INDEX_NAME} or an .npz file)")
        # Split of every id, kept before filtering: an id from another split is an error,
        # not a position (ds["000003"] must never silently return another episode).
        self._split_of_id = {e.id: episode_split(e) for e in episodes}
        if split is not None:
            if episodes and all(e.split is None for e in episodes):
                raise DatasetError(f"{self.path}: has no train/val/test split information; cannot select split {split!r}")
            # beside files of train/val/test folders, the others are split by their id, as training splits them
            episodes = [e for e in episodes if episode_split(e) == split]
        self.episodes: list[EpisodeInfo] = episodes
        self._by_id = {e.id: i for i, e in enumerate(episodes)}

    # -- opening

    def _open_index(self, action_names: Sequence[str] | None) -> list[EpisodeInfo]:
        index_path = self.path / INDEX_NAME
        try:
            index = json.loads(index_path.read_text())
        except ValueError as exc:  # bad JSON, bytes that are not UTF-8, a number of over 4,300 digits
            raise DatasetError(f"{index_path}: not valid JSON ({exc})") from None
        except RecursionError:  # a few KB of "[[[[..." is a RecursionError traceback, not a JSONDecodeError
            raise DatasetError(f"{index_path}: not valid JSON (nested too deeply)") from None
        except PermissionError:  # the file system's refusal, not a bad index: exit 1 naming the file, as in every command
            raise
        except OSError as exc:
            raise DatasetError(f"{index_path}: cannot read ({exc})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
            raise DatasetError(f"{index_path}: not a worldsim dataset index (missing \"format\": \"{FORMAT_NAME}\")")
        version = index.get("format_version")
        if version != FORMAT_VERSION:
            raise DatasetError(f"{index_path}: unsupported format_version {version!r} (this reader knows {FORMAT_VERSION})")
        for key in ("resolution", "action_names", "episodes"):
            if key not in index:
                raise DatasetError(f"{index_path}: missing key {key!r}")
        try:
            h, w = (int(v) for v in index["resolution"])
        except (TypeError, ValueError):
            raise DatasetError(f"{index_path}: 'resolution' must be [H, W]") from None
        raw_names = index["action_names"]
        # a bare string would iterate as one-letter names and the error would surface later, in an episode
        if not isinstance(raw_names, list) or not all(isinstance(n, str) and n for n in raw_names):
            raise DatasetError(f"{index_path}: 'action_names' must be a list of non-empty names, got {raw_names!r}")
        names = tuple(raw_names)
        if not names:
            raise DatasetError(f"{index_path}: 'action_names' is empty")
        if len(set(names)) != len(names):
            raise DatasetError(f"{index_path}: 'action_names' repeats a name: {list(names)}")
        if not isinstance(index["episodes"], list):
            raise DatasetError(f"{index_path}: 'episodes' must be a list of episode entries, "
                               f"got {type(index['episodes']).__name__}")
        if action_names is not None and tuple(action_names) != names:
            raise DatasetError(f"{index_path}: stored action names {list(names)} differ from the given {list(action_names)}")
        self.index = index
        self.format_version = version
        self.simulator = _checked_simulator(index.get("simulator"), f"{index_path}: 'simulator'")
        self.policy = index.get("policy")
        self.resolution = (h, w)
        self.action_names = names
        episodes = []
        seen: set[str] = set()
        for n, entry in enumerate(index["episodes"]):
            try:
                eid = str(entry["id"])
                file = self.path / str(entry["file"])
                length = int(entry["length"])
                maze_seed = None if entry.get("maze_seed") is None else int(entry["maze_seed"])
                split = entry.get("split")
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetError(f"{index_path}: episode entry {n} is malformed ({exc!r})") from None
            if eid in seen:
                raise DatasetError(f"{index_path}: duplicate episode id {eid!r}")
            if not eid or eid in (".", "..") or any(c in eid for c in "/\\\0"):
                # ids name output files (eval's episode_<id>.mp4): "x/../../y" pointed a write elsewhere
                raise DatasetError(f"{index_path}: episode id {eid!r} is not a plain name (no '/', '\\' or '..')")
            if len(eid.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:  # file names stop at 255 bytes
                raise DatasetError(f"{index_path}: episode id {eid[:40]!r}... is {len(eid.encode('utf-8', 'surrogatepass'))} "
                                   f"bytes long; ids name files (episode_<id>.mp4), so at most {MAX_ID_BYTES}")
            seen.add(eid)
            if split is not None and split not in SPLITS:
                raise DatasetError(f"{index_path}: episode {eid!r} has unknown split {split!r}")
            if length < 1:
                raise DatasetError(f"{index_path}: episode {eid!r} has length {length}; an episode has >= 1 frames")
            if split is not None and maze_seed is not None and split != split_for_maze_seed(maze_seed):
                # an edited index would put a held-out maze into training (or a training maze into the test)
                raise DatasetError(f"{index_path}: episode {eid!r} is listed in split {split!r}, but its maze "
                                   f"seed {maze_seed} belongs to split {split_for_maze_seed(maze_seed)!r}")
            if not file.is_file():
                raise DatasetError(f"{file}: episode file listed in {index_path} is missing")
            episodes.append(EpisodeInfo(eid, file, length, maze_seed, split))
        return episodes

    def _open_plain(self, found: list[tuple[Path, str]],
                    action_names: Sequence[str] | None) -> list[EpisodeInfo]:
        """`found`: (file, episode id) of every file, as `plain_folder_files` gives them."""
        files = [file for file, _ in found]
        episodes = []
        resolution = None
        max_action = -1
        # this project's episode files carry their recording's header and maze seed: opened without
        # the index they keep its action names and splits (a hash of the file name would put held-out
        # mazes into training)
        recorded: dict[Path, dict[str, Any]] = {}
        for file, eid in found:
            folder_split, split_key = folder_split_and_key(file, self.path)
            headers = npz_headers(file)
            for key in ("video", "actions"):
                if key not in headers:
                    raise DatasetError(f"{file}: missing array {key!r} (has: {', '.join(sorted(headers)) or 'nothing'})")
            vshape, vdtype = headers["video"]
            _check_video(file, vshape, vdtype, resolution)
            resolution = (int(vshape[1]), int(vshape[2]))
            ashape, adtype = headers["actions"]
            _check_actions_header(file, ashape, adtype, vshape[0])
            actions = _load_arrays(file, ["actions"])["actions"]
            if actions.size and actions.min() < 0:
                raise DatasetError(f"{file}: negative action {int(actions.min())}")
            if actions.size:
                max_action = max(max_action, int(actions.max()))
            maze_seed, split = None, None
            if {"maze_seed", "recording"} <= set(headers):
                meta = _load_arrays(file, ["maze_seed", "recording"])
                try:
                    header = json.loads(str(meta["recording"]))
                    maze_seed = int(meta["maze_seed"])
                    names = header["action_names"]
                    assert isinstance(names, list) and all(isinstance(n, str) and n for n in names)
                except (ValueError, TypeError, KeyError, AssertionError, RecursionError):  # (JSON nested too deeply)
                    raise DatasetError(f"{file}: its 'recording' header or 'maze_seed' is malformed") from None
                recorded[file] = {"action_names": names,
                                  "simulator": _checked_simulator(header.get("simulator"),
                                                                  f"{file}: its 'recording' header's 'simulator'")}
                split = split_for_maze_seed(maze_seed)
                folder_split = None  # the maze decides, wherever the file lies
            elif folder_split == "train":
                # a train folder keeps the episodes its hash puts in "val" for validation, but sends
                # none to "test": the held-out ones are those of a test folder
                split = "val" if split_for_id(split_key) == "val" else "train"
            else:
                split = folder_split
            teco = set(headers) == {"video", "actions"}  # this project's files carry more (poses, maze_seed ...)
            episodes.append(EpisodeInfo(eid, file, int(vshape[0]), maze_seed, split, teco, folder_split))
        if recorded:
            first = next(iter(recorded))

            def shown(file: Path) -> str:  # the path below the folder: files of two subfolders may share a name
                return str(file.relative_to(self.path)) if self.path.is_dir() else file.name

            for file in files:
                if file not in recorded:
                    raise DatasetError(f"{self.path}: mixes worldsim episodes ({shown(first)}) with files without their "
                                       f"recording header ({shown(file)}); give them as separate --data paths")
                if recorded[file] != recorded[first]:
                    raise DatasetError(f"{self.path}: {shown(first)} and {shown(file)} come from different simulators or "
                                       f"action lists; give them as separate --data paths")
            names = tuple(recorded[first]["action_names"])
            if action_names is not None and tuple(action_names) == default_action_names(len(action_names)) != names:
                raise DatasetError(
                    f"{self.path}: these worldsim episodes name their actions {list(names)}, where the run or "
                    f"checkpoint reading them calls them {list(action_names)}: it was trained on them before episode "
                    "files opened without index.json kept their action names and maze splits (so its held-out mazes "
                    "may have been trained on); train it again")
            if action_names is not None and tuple(action_names) != names:
                raise DatasetError(f"{self.path}: stored action names {list(names)} differ from the given {list(action_names)}")
            if max_action >= len(names):
                raise DatasetError(f"{self.path}: action {max_action} is out of range for its {len(names)} action names")
            self.simulator = recorded[first]["simulator"]
            action_names = names
        if action_names is None:
            action_names = default_action_names(max_action + 1)
        elif max_action >= len(action_names):
            raise DatasetError(f"{self.path}: action {max_action} is out of range for the {len(action_names)} given action names")
        self.resolution = resolution  # type: ignore[assignment]
        self.action_names = tuple(action_names)
        return episodes

    # -- access

    def __len__(self) -> int:
        return len(self.episodes)

    def __iter__(self) -> Iterator[Episode]:
        for i in range(len(self)):
            yield self[i]

    def index_of(self, key: int | str) -> int:
        """Position of an episode given its position (int or digits) or its id."""
        if isinstance(key, str) and key in self._by_id:
            return self._by_id[key]
        if isinstance(key, str) and key in self._split_of_id:
            raise DatasetError(f"{self.path}: episode {key!r} is in split {self._split_of_id[key]!r}, "
                               f"not in the selected split {self.split!r}")
        try:  # a position is an integer or its digits: int() took 1.5 and True for episode 1
            i = int(key) if isinstance(key, str) else operator.index(key)
            if isinstance(key, bool):
                raise TypeError
        except (TypeError, ValueError):
            raise DatasetError(f"{self.path}: no episode {key!r} (ids: {self._id_summary()}; or a position, "
                               "an integer)") from None
        if not -len(self) <= i < len(self):
            where = f" in split {self.split!r}" if self.split else ""
            raise DatasetError(f"{self.path}: episode index {i} out of range (dataset has {len(self)} episodes{where})")
        return i % len(self)

    def _id_summary(self) -> str:
        ids = [e.id for e in self.episodes]
        return ", ".join(ids) if len(ids) <= 6 else f"{', '.join(ids[:3])}, ..., {ids[-1]}"

    def __getitem__(self, key: int | str) -> Episode:
        info = self.episodes[self.index_of(key)]
        return self.load(info)

    def load(self, info: EpisodeInfo) -> Episode:
        file = info.file
        try:  # the header's frame count before the frames: a header declaring 10**9 frames allocated first
            declared = npz_headers(file).get("video", ((),))[0]
        except DatasetError:  # unreadable headers: _load_arrays names the problem
            declared = ()
        if len(declared) == 4 and declared[0] != info.length:
            raise DatasetError(f"{file}: has {declared[0]} frames but the index says {info.length}")
        arrays = _load_arrays(file, ["video", "actions"], optional=["poses", "maze_seed"])
        video, actions = arrays["video"], arrays["actions"]
        _check_video(file, video.shape, video.dtype, self.resolution)
        length = video.shape[0]
        _check_actions_header(file, actions.shape, actions.dtype, length)
        if length != info.length:
            raise DatasetError(f"{file}: has {length} frames but the index says {info.length}")
        stored_seed = arrays.get("maze_seed")
        if (info.maze_seed is not None and stored_seed is not None and stored_seed.shape == ()
                and stored_seed.dtype.kind in "iu" and int(stored_seed) != info.maze_seed):
            raise DatasetError(f"{file}: was recorded in maze seed {int(stored_seed)} but the index says {info.maze_seed}")
        actions = actions.astype(np.int64, copy=False)
        if info.actions_taken_at_frame and actions.size:
            # FAR/TECO files store the action taken at frame t (it produces frame t + 1); this
            # project's actions[t] produces frame t. Frame 0 has none: it repeats the first.
            actions = np.concatenate([actions[:1], actions[:-1]])
        if actions.size and (actions.min() < 0 or actions.max() >= len(self.action_names)):
            bad = int(actions.min()) if actions.min() < 0 else int(actions.max())
            raise DatasetError(f"{file}: action {bad} out of range [0, {len(self.action_names) - 1}]")
        poses = arrays.get("poses")
        if poses is not None:
            _check_poses_header(file, poses.shape, poses.dtype, length)
            poses = poses.astype(np.float32, copy=False)
            bad_frames = np.flatnonzero(~np.isfinite(poses).all(axis=1))
            if bad_frames.size:  # eval's revisit matching would drop those frames in silence (NaN matches nothing)
                raise DatasetError(f"{file}: 'poses' holds NaN or infinite values (frame {int(bad_frames[0])}, "
                                   f"{bad_frames.size} frame(s) in all)")
        return Episode(info, video, actions, poses)

    def validate(self) -> None:
        """Load every episode once (raises DatasetError on the first bad one)."""
        for info in self.episodes:
            self.load(info)

    def __repr__(self) -> str:
        sim = self.simulator.get("id") if isinstance(self.simulator, dict) else None
        return (f"Dataset({str(self.path)!r}, episodes={len(self)}, resolution={self.resolution}, "
                f"actions={list(self.action_names)}, simulator={sim!r}, split={self.split!r})")
