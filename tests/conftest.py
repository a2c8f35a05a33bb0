"""Shared fixtures. CI clones the repository beside `shared/`, so shared data is found
relative to the checkout, never through an absolute path."""
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
