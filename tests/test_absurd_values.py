"""Well-formed but absurd values (a typo's extra zeros, a hand-edited config.json) are refused with a
message naming the file or option and the limit, before they allocate terabytes or loop for days."""
import json
import shutil
from pathlib import Path

import pytest

from worldsim import cli
from worldsim.checkpoint import CheckpointError, load_checkpoint
from worldsim.sampler import MAX_STEPS, MAX_STILL_FRAMES, EulerSampler

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "maze-far-small"


def _edited(tmp_path, section, key, value):
    path = tmp_path / "ck"
    shutil.copytree(SHIPPED, path)
    config = json.loads((path / "config.json").read_text())
    config[section][key] = value
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("section, key, value, message", [
    ("far", "width", 10**6, r"shape mismatch for far\..*model \(6, 1000000\)"),  # allocated 4 TB: a RuntimeError
    ("far", "depth", 10**5, r"says far\.depth 100000, the weights hold 6 blocks"),  # ate memory block by block
    ("autoencoder", "channels", [10**5] * 4, r"shape mismatch for autoencoder\."),  # 360 GB
    ("sampler", "steps", 10**9, rf"sampler\.steps must be an integer from 1 to {MAX_STEPS}"),  # a 4 GB grid
    ("sampler", "still_frames", 10**9, rf"sampler\.still_frames must be an integer from 0 to {MAX_STILL_FRAMES}"),
])
def test_absurd_model_sizes_in_config_json_are_refused_before_allocating(tmp_path, section, key, value, message):
    path = _edited(tmp_path, section, key, value)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path, device="cpu")
    assert str(path) in str(info.value)


def test_the_sampler_refuses_a_billion_steps():
    with pytest.raises(ValueError, match=f"from 1 to {MAX_STEPS}"):
        EulerSampler(steps=10**9)
    assert len(EulerSampler(steps=MAX_STEPS).timesteps()) == MAX_STEPS + 1


@pytest.mark.parametrize("option, value, message", [
    ("--steps", "1000000000", f"--steps must be from 1 to {MAX_STEPS}"),
    ("--still-frames", "1000000000", f"--still-frames must be from 0 to {MAX_STILL_FRAMES}"),
    ("--context-frames", "1000000000", f"--context-frames must be from 1 to {MAX_STILL_FRAMES}"),  # hung
    ("--scale", "10000", "--scale goes up to 64 in a headless video"),  # a 1 TiB frame: MemoryError
])
def test_absurd_play_options_are_one_line(tmp_path, capsys, option, value, message):
    rc = cli.main(["play", "--checkpoint", str(SHIPPED), "--headless", "--actions", "random:2",
                   "--out", str(tmp_path / "x.gif"), option, value])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.gif").exists()


def test_absurd_eval_steps_are_one_line(tmp_path, capsys):
    rc = cli.main(["eval", "--checkpoint", str(SHIPPED), "--out", str(tmp_path / "e"), "--steps", "1000000000",
                   "--still-frames", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--steps must be from 1 to {MAX_STEPS}" in err


def test_dream_env_refuses_absurd_counts():
    from worldsim.dream_env import DreamEnv

    for kwargs in ({"still_frames": 10**9}, {"context_frames": 10**9}, {"steps": 10**9}):
        with pytest.raises(ValueError, match="must be"):
            DreamEnv(checkpoint=str(SHIPPED), **kwargs)
