"""Shared fixtures. CI clones the repository beside `shared/`, so shared data is found
relative to the checkout, never through an absolute path."""
import builtins
import errno
import io
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def dmlab_example_path() -> Path:
    """The public FAR/TECO DeepMind Lab example episode (300 frames, 64x64, actions 0..2)."""
    path = SHARED_DATA / "dmlab_example_300f.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found (shared/ must sit beside the checkout)")
    return path


@pytest.fixture()
def one_torch_thread():
    """Run a test with one torch thread. The CPU machines are shared: with 2 threads per process
    torch spin-waits and a tiny model step takes ~30x longer under load."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _FileOnAFullDisk(io.RawIOBase):
    """A file with `room` bytes left on its disk: writes past them fail with ENOSPC, as the kernel's
    do (buffered bytes then fail again when the file is closed). No fileno(): Pillow would write its
    encoded frames into the descriptor itself, past these writes."""

    def __init__(self, path, mode: str, room: int) -> None:
        self._file, self.name, self.room = io.FileIO(path, mode), str(path), room

    def readable(self) -> bool:
        return self._file.readable()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer) -> int:
        return self._file.readinto(buffer)

    def write(self, data) -> int:
        n = min(len(data), self.room - self._file.tell())
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._file.write(memoryview(data)[:n])

    def close(self) -> None:
        self._file.close()
        super().close()


@pytest.fixture()
def full_disk(monkeypatch):
    """`full_disk(folder, room=0)`: GIF files opened for writing in `folder` from then on (their temp
    files: the GIF writers pick the format from the name) sit on a disk with `room` bytes left."""
    real_open = builtins.open

    def fill(folder: Path, room: int = 0) -> None:
        def open_on_a_full_disk(file, mode="r", *args, **kwargs):
            if (isinstance(file, (str, os.PathLike)) and "w" in mode and "b" in mode
                    and Path(file).parent == Path(folder) and str(file).endswith(".gif")):
                raw = _FileOnAFullDisk(file, mode.replace("b", ""), room)
                return io.BufferedRandom(raw) if "+" in mode else io.BufferedWriter(raw)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_on_a_full_disk)

    return fill


@pytest.fixture()
def unraisable(monkeypatch) -> list:
    """The errors raised where Python cannot raise them (a `__del__`), which it prints as "Exception
    ignored in: ..." after the command's own message; call gc.collect() before looking."""
    seen: list = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.append(f"{info.object!r}: {info.exc_value!r}"))
    return seen


@pytest.fixture()
def no_loss_plot(monkeypatch) -> None:
    """For training runs in tests that never look at loss.png: drawing it (matplotlib's text layout, at
    every save) is most of a tiny run's time, and it changes nothing else a run does (Trainer.plot logs a
    failed plot and goes on). loss.png itself is checked by tests/test_train.py's end-to-end and loss
    plot tests."""
    import worldsim.train as train_mod

    monkeypatch.setattr(train_mod, "plot_metrics", lambda metrics_path, png, ae_loss=None: None)
