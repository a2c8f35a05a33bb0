"""Well-formed but absurd values (a typo's extra zeros, a hand-edited config.json) are refused with a
message naming the file or option and the limit, before they allocate terabytes or loop for days."""
import json
import re
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


@pytest.fixture(scope="module")
def two_train_episodes(tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "d"
    assert cli.main(["record", "--out", str(data), "--episodes", "2", "--length", "8", "--split", "train",
                     "--workers", "1", "--progress", "false"]) == 0
    return data


@pytest.mark.parametrize("options, message", [
    (["--stage", "far", "--far-width", "1000000"], r"the far stage \(135,001,028,750,064 parameters"),  # 4 TB traceback
    (["--stage", "far", "--far-depth", "100000"], r"the far stage \(144,691,629,312 parameters"),  # minutes of blocks
    (["--stage", "far", "--far-batch", "10000000"], r"--far-batch 10000000 x --seq-len 4"),  # 10**7 arrays, MemoryError
    (["--stage", "ae", "--ae-batch", "10000000"], r"the autoencoder stage \(.*--ae-batch 10000000 frames of 64x64"),
])
def test_train_sizes_no_machine_could_hold_are_refused_before_the_run_starts(tmp_path, capsys, two_train_episodes,
                                                                           options, message):
    out = tmp_path / "run"
    rc = cli.main(["train", "--data", str(two_train_episodes), "--out", str(out), "--ae-from", str(SHIPPED),
                   "--seq-len", "4", "--far-steps", "1", "--ae-steps", "1", "--progress", "false", *options])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert re.search(message + r".* needs at least [\d,.]+ GiB, but this machine has [\d,.]+ GiB of memory: lower --",
                     err), err
    assert not out.exists()  # refused before the folder, the latent cache or the autoencoder copy


@pytest.mark.parametrize("options, shown", [
    (["--stage", "far", "--far-lr", "1e38"], "--far-lr must be a number from 0 to 1 (AdamW moves each weight by about "
                                             "the rate every step), got 1e+38"),  # an AdamW overflow traceback
    (["--stage", "far", "--far-lr", "3e-1", "--ae-lr", "1e4"], "--ae-lr must be a number from 0 to 1"),
    (["--stage", "far", "--far-lr", "inf"], "--far-lr must be a number from 0 to 1"),
    (["--stage", "far", "--far-lr", "nan"], "--far-lr must be a number from 0 to 1"),
    (["--stage", "far", "--far-lr=-3e-4"], "--far-lr must be a number from 0 to 1"),
])
def test_absurd_learning_rates_are_one_line_before_the_run_starts(tmp_path, capsys, two_train_episodes, options,
                                                                  shown):
    out = tmp_path / "run"
    rc = cli.main(["train", "--data", str(two_train_episodes), "--out", str(out), "--ae-from", str(SHIPPED),
                   "--seq-len", "4", "--far-steps", "1", "--far-batch", "2", "--warmup", "0", "--preset", "tiny",
                   "--threads", "1", "--progress", "false", "--preview-every", "-1", *options])
    err = capsys.readouterr().err
    assert rc == 2 and shown in err and "Traceback" not in err, err
    assert not out.exists()  # refused before the folder, the latent cache or the autoencoder copy


def test_the_memory_floor_is_a_lower_bound_for_a_run_that_trains(tmp_path, monkeypatch, capsys, two_train_episodes,
                                                                  no_loss_plot):
    """It counts weights, gradients and AdamW's moments (16 bytes a parameter) and one batch: what the
    stage's training step really holds is more. A run whose floor exceeds the machine is refused;
    one whose floor fits trains."""
    import torch

    from worldsim import train

    args = ["train", "--data", str(two_train_episodes), "--ae-from", str(SHIPPED), "--stage", "far",
            "--seq-len", "4", "--far-steps", "1", "--far-batch", "2", "--progress", "false", "--threads", "1",
            "--preview-every", "-1"]  # the floor counts no preview (and a preview never stops a run)
    seen = []
    real = train.memory_floor
    monkeypatch.setattr(train, "memory_floor", lambda run: seen.extend(real(run)) or seen)
    monkeypatch.setattr(train, "machine_memory_bytes", lambda device: 10**12)
    assert cli.main([*args, "--out", str(tmp_path / "fits")]) == 0
    (need, what, options), = seen
    far = load_checkpoint(tmp_path / "fits" / "checkpoint", device="cpu").far
    n = sum(p.numel() for p in far.parameters())
    assert f"({n:,} parameters" in what and options == "--far-batch / --seq-len / --far-width / --far-depth"
    assert 16 * n < need < 16 * n + 2 * 4 * 8 * 8 * 16 * 4 + 2 * 4 * 64 * 256 * 6 * 2 + 1  # weights+states, batch
    capsys.readouterr()
    monkeypatch.setattr(train, "machine_memory_bytes", lambda device: need - 1)
    assert cli.main([*args, "--out", str(tmp_path / "does-not")]) == 2
    assert "needs at least" in capsys.readouterr().err and not (tmp_path / "does-not").exists()


def test_running_out_of_memory_mid_run_is_one_line_that_says_how_to_go_on(tmp_path, monkeypatch, capsys,
                                                                           two_train_episodes, no_loss_plot):
    """A size past the floor that the machine still cannot hold fails in torch's allocator (a plain
    RuntimeError on the CPU) or numpy's (a MemoryError): one line naming it, the options to lower and
    the saved step to resume from, not a traceback."""
    from worldsim import train

    out = tmp_path / "run"
    args = ["train", "--data", str(two_train_episodes), "--out", str(out), "--ae-from", str(SHIPPED), "--stage", "far",
            "--seq-len", "4", "--far-batch", "2", "--progress", "false", "--threads", "1", "--preview-every", "-1",
            "--preset", "tiny"]  # a small transformer: the failure is faked, and its state saves and loads faster
    assert cli.main([*args, "--far-steps", "1"]) == 0
    capsys.readouterr()

    def allocator_fails(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 393216000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(train, "latent_batch", allocator_fails)
    assert cli.main(["train", "--resume", str(out), "--far-steps", "3"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "out of memory (RuntimeError: " in err and "393216000 bytes" in err
    assert f"{out / 'state'} holds the last saved step: --resume {out} with the smaller sizes" in err
    assert load_checkpoint(out / "checkpoint", device="cpu").step == 1  # what was saved stands

    monkeypatch.setattr(train, "latent_batch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a real bug")))
    with pytest.raises(RuntimeError, match="a real bug"):  # other RuntimeErrors keep their traceback
        cli.main(["train", "--resume", str(out), "--far-steps", "3"])


def test_a_rank_whose_own_machine_fits_refuses_with_the_rank_whose_machine_does_not(monkeypatch):
    """Machines of one run may hold different memory. The rank whose machine fitted went on to the next
    collective, where the refused rank's exit became a gloo traceback (and rank 0 made the run folder):
    every rank takes part in one vote, also where the platform says nothing of its memory, and all refuse."""
    from types import SimpleNamespace

    import torch

    from worldsim import train

    votes = []

    def any_flags(*flags):  # the other rank's machine is too small: it votes True
        votes.append(flags)
        return (True,)

    dist = SimpleNamespace(device=torch.device("cpu"), local_world_size=1, rank=0, any_flags=any_flags)
    monkeypatch.setattr(train, "memory_floor", lambda run: [(2**30, "the far stage (...)", "--far-batch")])
    for have in (2**40, None):  # this machine fits; this platform does not say
        monkeypatch.setattr(train, "machine_memory_bytes", lambda device: have)
        with pytest.raises(train.TrainError, match="rank 0: another rank's machine has too little memory"):
            train.check_memory_floor(None, dist)
    assert votes == [(False,), (False,)]
    monkeypatch.setattr(train, "machine_memory_bytes", lambda device: 2**20)  # this one is the small one
    with pytest.raises(train.TrainError, match=r"the far stage \(\.\.\.\) needs at least 1\.0 GiB, but this machine"):
        train.check_memory_floor(None, dist)
    assert votes[-1] == (True,)
