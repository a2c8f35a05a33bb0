"""The Python API as a notebook uses it: wrong types and values get a clear error, never a silent
other result."""
import numpy as np
import pytest
from PIL import Image

from test_dataset import make_dataset, make_episode
from worldsim.dataset import Dataset, DatasetError
from worldsim.export import ExportConfig, ExportError, export


@pytest.fixture
def small_dataset(tmp_path):
    return make_dataset(tmp_path / "ds", [make_episode(seed=i) for i in range(13)])


def test_export_takes_one_episode_id_or_position_from_python_as_it_is(small_dataset, tmp_path):
    ds = Dataset(small_dataset)
    # a string alone was read character by character: "12" exported episodes 1 and 2 (two rows)
    rows = {}
    for name, episode in (("str", "12"), ("int", 12), ("tuple", ("12",)), ("ints", (12,)), ("np", np.int64(12))):
        out = export(ds, ExportConfig(out=str(tmp_path / f"{name}.png"), episode=episode, every=1, scale=1))
        rows[name] = np.asarray(Image.open(out))
    for image in rows.values():
        assert image.shape == rows["tuple"].shape and (image == rows["tuple"]).all()
    assert rows["tuple"].shape[0] == 8  # one episode of 8x8 frames, one row
    with pytest.raises(ExportError, match="episode 1.5"):
        export(ds, ExportConfig(out=str(tmp_path / "x.png"), episode=(1.5,)))


@pytest.mark.parametrize("name, value", [("scale", 2.5), ("every", 1.5), ("start", 0.5), ("end", 3.0),
                                         ("columns", True)])
def test_export_refuses_a_count_that_is_not_an_integer(small_dataset, tmp_path, name, value):
    # scale=2.5 wrote a strip at scale 2 (numpy's repeat truncates it)
    with pytest.raises(ExportError, match=f"--{name} must be an integer"):
        export(small_dataset, ExportConfig(out=str(tmp_path / "x.gif"), **{name: value}))
    assert not (tmp_path / "x.gif").exists()


def test_dataset_positions_are_integers(small_dataset):
    ds = Dataset(small_dataset)
    assert ds[np.int64(2)].id == ds["2"].id == ds["000002"].id == "000002"
    for key in (1.5, True, 2.0, None, slice(0, 2)):  # 1.5 and True were episode 1
        with pytest.raises(DatasetError, match="no episode"):
            ds[key]
