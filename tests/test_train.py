"""`worldsim train`: end to end, exact resume, Ctrl-C, DDP on CPU, atomic state, clear errors.

Everything runs on tiny presets at 32x32 with one thread per process (the CI machines have two
shared cores; more threads than free cores makes torch much slower, not faster).
"""
from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from worldsim.cli import main

REPO = Path(__file__).resolve().parents[1]
DMLAB = REPO.parent / "shared" / "data" / "dmlab_example_300f.npz"

# seeds 47..51 hold 4 training mazes and 1 validation maze (split_for_maze_seed)
RECORD = ["record", "--episodes", "5", "--length", "12", "--start-maze-seed", "47", "--workers", "1",
          "--env-arg", "resolution=32", "maze_size=7", "--progress", "false"]
FAST = ["--preset", "tiny", "--threads", "1", "--progress", "false", "--precision", "fp32"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


RUN_CLI = "from worldsim.cli import main\nsys.exit(main(sys.argv[1:]))\n"  # the end of a patched launcher
# a launcher's line that leaves loss.png undrawn, as the no_loss_plot fixture (conftest.py) does in this process:
# rank 0 draws it at every save (matplotlib's import and text layout, seconds) while the other ranks wait for
# it at the save's barrier, and no torchrun test looks at it
NO_LOSS_PLOT = "train.plot_metrics = lambda metrics_path, png, ae_loss=None: None\n"
# A launcher's lines that make rank 1 late, as a slower machine makes it: `wait_for_rank_0()` returns once
# rank 0 has gone as far as it can without rank 1, into a collective (Dist's barrier, any_flags, means or
# max) that rank 1 has not entered yet, or once `done()` (something rank 0 does) is true; 10 s at most.
# A fixed sleep did this before, seconds spent whether rank 0 needed them or not.
RANK_1_LATE = (
    "import os, time\n"
    "from pathlib import Path\n"
    "import worldsim.ddp as ddp\n"
    "rank, here, entered = os.environ.get('RANK'), Path(__file__).parent, [0]\n"
    "def counted(fn):\n"
    "    def wrapped(self, *args, **kwargs):\n"
    "        entered[0] += 1\n"
    "        if rank == '0':\n"
    "            (here / f'rank0-in-collective-{entered[0]}').touch()\n"
    "        return fn(self, *args, **kwargs)\n"
    "    return wrapped\n"
    "for name in ('barrier', 'any_flags', 'means', 'max'):\n"
    "    setattr(ddp.Dist, name, counted(getattr(ddp.Dist, name)))\n"
    "def wait_for_rank_0(done=lambda: False):\n"
    "    start = time.monotonic()\n"
    "    while not (here / f'rank0-in-collective-{entered[0] + 1}').exists() and not done() \\\n"
    "            and time.monotonic() - start < 10:\n"
    "        time.sleep(0.01)\n")


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    """`script ARGS` on two CPU ranks (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "maze"
    assert main([*RECORD, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "both"
    rc = main(["train", "--data", str(dataset), "--out", str(run), *FAST,
               "--ae-steps", "4", "--far-steps", "3", "--checkpoint-every", "2", "--val-every", "2"])
    assert rc == 0
    return run


@pytest.fixture()
def step_clock(monkeypatch):
    """`step_clock(seconds)`: the clock a stage's time limit is read from (`time.perf_counter` in
    worldsim.train, which `Trainer.fit` calls) moves on `seconds` with each optimiser step and stands
    still otherwise, so a limit of L seconds ends a stage after exactly L / seconds steps on any machine
    (the step ends with `ema_update`: that is where the clock moves). Other `time` uses are the real ones."""
    import types

    import worldsim.train as train_mod

    clock = {"now": 1000.0, "per_step": 0.0}
    real_update = train_mod.ema_update

    def ema_update(*args, **kwargs):
        real_update(*args, **kwargs)
        clock["now"] += clock["per_step"]

    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.perf_counter = lambda: clock["now"]
    monkeypatch.setattr(train_mod, "time", fake_time)
    monkeypatch.setattr(train_mod, "ema_update", ema_update)

    def set_seconds_per_step(seconds: float) -> None:
        clock["per_step"] = seconds

    return set_seconds_per_step


def _state_tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "state" / "weights.safetensors"))


def _script(name: str):
    """scripts/NAME.py as a module, to call its `main(argv)` in this process: a fresh interpreter costs
    seconds of imports, so each test runs a script once as users do and its other inputs here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_both_stages(trained, dataset):
    from worldsim.world import WorldModel

    for name in ("config.json", "metrics.jsonl", "loss.png", "checkpoint/config.json", "checkpoint/model.safetensors",
                 "checkpoint/README.md", "autoencoder/config.json", "state/state.json", "state/weights.safetensors"):
        assert (trained / name).is_file(), name
    assert list((trained / "preview").glob("step-*.gif")), "no preview GIF"
    assert list((trained / "latents").glob("*-train-*.npy")), "no latent cache"
    rows = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"ae", "far"}
    assert any("val_loss" in r for r in rows if r["stage"] == "far")
    # the export says which step its validation loss was measured at (weights may be newer)
    last_val = [r for r in rows if r["stage"] == "far" and "val_loss" in r][-1]
    extra = json.loads((trained / "checkpoint" / "config.json").read_text())["extra"]
    assert extra["val_step"] == last_val["step"] and extra["val_loss"] == pytest.approx(last_val["val_loss"])
    assert f"(EMA, step {last_val['step']}): {last_val['val_loss']:.4f}" in (trained / "checkpoint" / "README.md").read_text()
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    config = json.loads((trained / "config.json").read_text())
    assert config["train"]["preset"] == "tiny" and config["far"]["num_actions"] == 5
    assert config["data"]["resolution"] == [32, 32]
    state = json.loads((trained / "state" / "state.json").read_text())
    assert state["stage"] == "far" and state["step"] == 3 and state["finished"]

    world = WorldModel.load(trained / "checkpoint", device="cpu")
    assert world.action_names == ("noop", "forward", "backward", "turn_left", "turn_right")
    assert world.config["step"] == 3
    from worldsim.dataset import Dataset

    ep = Dataset(dataset)[0]
    session = world.new_session(ep.video[:3], ep.actions[:3], steps=2, seed=0)
    frame = session.step(1)
    assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8


def test_new_run_refuses_existing_folder(trained, dataset, capsys):
    rc = main(["train", "--data", str(dataset), "--out", str(trained), *FAST])
    assert rc == 2
    assert "--resume" in capsys.readouterr().err


# ----------------------------------------------------------------------------- resume


def test_resume_continues_exactly(dataset, tmp_path, no_loss_plot):
    common = ["--data", str(dataset), *FAST, "--cosine", "false", "--checkpoint-every", "100", "--val-every", "0",
              "--preview-every", "-1"]
    straight = tmp_path / "straight"
    assert main(["train", *common, "--out", str(straight), "--ae-steps", "4", "--far-steps", "4"]) == 0
    split = tmp_path / "split"
    assert main(["train", *common, "--out", str(split), "--stage", "ae", "--ae-steps", "2"]) == 0
    assert json.loads((split / "state" / "state.json").read_text())["step"] == 2
    assert main(["train", "--resume", str(split), "--stage", "both", "--ae-steps", "4", "--far-steps", "2"]) == 0
    assert main(["train", "--resume", str(split), "--far-steps", "4"]) == 0
    rows = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["stage"], r["step"]) for r in rows if "loss" in r]
    assert sorted(logged) == sorted(set(logged)) and ("far", 4) in logged  # no step logged twice
    a, b = _state_tensors(straight), _state_tensors(split)
    assert set(a) == set(b)
    for k in a:
        if k.startswith("rng."):
            continue
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # and the exported autoencoders (finished in both) are the same
    ae_a = json.loads((straight / "autoencoder" / "config.json").read_text())["weights_sha256"]
    ae_b = json.loads((split / "autoencoder" / "config.json").read_text())["weights_sha256"]
    assert ae_a == ae_b


def test_resume_applies_the_optimizer_settings_it_records(trained, tmp_path, no_loss_plot):
    """--weight-decay / --beta1 / --beta2 on --resume: config.json stores them, so the optimizer
    must use them (loading its state used to bring back the saved ones silently)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    steps = json.loads((run / "state" / "state.json").read_text())["step"]
    assert main(["train", "--resume", str(run), "--far-steps", str(steps + 1), "--weight-decay", "0.5",
                 "--beta1", "0.8", "--beta2", "0.95"]) == 0
    groups = json.loads((run / "state" / "state.json").read_text())["optimizer"]["param_groups"]
    assert [(g["weight_decay"], g["betas"]) for g in groups] == [(0.5, [0.8, 0.95]), (0.0, [0.8, 0.95])]
    assert json.loads((run / "config.json").read_text())["train"]["weight_decay"] == 0.5


def test_a_loss_that_is_not_finite_stops_the_run_before_the_optimizer_takes_it(trained, dataset, tmp_path, capsys,
                                                                                  monkeypatch):
    """The check comes before the optimizer step (so no rank's averaged weights take a bad loss):
    the optimizer stepped once per finite loss, and the last save holds finite weights."""
    import re

    from worldsim.checkpoint import load_checkpoint

    import worldsim.train as train_mod

    calls = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (calls.append(1), real_step(self, *a, **k))[1])
    # --far-lr 1e30 is refused now (above MAX_LR); with the bound lifted it diverges in a few steps, as a
    # rate that is merely too high does in many
    monkeypatch.setattr(train_mod, "MAX_LR", 1e30)
    run = tmp_path / "nan"
    rc = main(["train", "--stage", "far", "--data", str(dataset), "--out", str(run), *FAST,
               "--ae-from", str(trained / "checkpoint"), "--far-steps", "20", "--far-lr", "1e30", "--warmup", "0",
               "--grad-clip", "0", "--val-every", "0", "--checkpoint-every", "1"])
    err = capsys.readouterr().err
    bad = re.search(r"loss is (nan|inf) at step (\d+)", err)
    assert rc == 2 and bad, err
    assert len(calls) == int(bad[2]) - 1
    far = load_checkpoint(run / "checkpoint").far
    assert all(torch.isfinite(p).all() for p in far.parameters())


class _NaNGradient(torch.autograd.Function):
    """The identity forward, NaN gradients backward: a finite loss whose backward pass overflowed."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def test_a_finite_loss_with_gradients_that_are_not_finite_stops_before_the_step_and_keeps_the_last_save(
        trained, dataset, tmp_path, capsys, monkeypatch):
    """Clipping NaN gradients scales them all to NaN and AdamW applied them: the weights, the EMA and
    the next save (state and checkpoint) turned NaN, over the last good save. Now the step stops before
    the optimizer takes it, in one line naming the stage, the step and the save that was kept."""
    import worldsim.objective as obj

    from worldsim.checkpoint import load_checkpoint

    real_loss, real_step, steps, batches = obj.training_loss, torch.optim.AdamW.step, [], []

    def training_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        if torch.is_grad_enabled():  # a training batch, not validation
            batches.append(1)
            if len(batches) == 3:
                loss = _NaNGradient.apply(loss)
        return loss, stats

    monkeypatch.setattr(obj, "training_loss", training_loss)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (steps.append(1), real_step(self, *a, **k))[1])
    run = tmp_path / "nangrad"
    rc = main(["train", "--stage", "far", "--data", str(dataset), "--out", str(run), *FAST,
               "--ae-from", str(trained / "checkpoint"), "--far-steps", "6", "--val-every", "0", "--checkpoint-every", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(r"far: gradient norm is nan at step 3 \(its loss, [\d.e+-]+, was finite\): training "
                                 r"diverged; nothing was saved after step 2\. Continue from that save at a lower learning rate "
                                 r"\(--far-lr was [\d.e+-]+\) with `worldsim train --resume ", err), err
    assert len(steps) == 2
    assert json.loads((run / "state" / "state.json").read_text())["step"] == 2
    from safetensors.torch import load_file

    state = load_file(str(run / "state" / "weights.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())  # model, EMA, Adam's moments
    assert load_checkpoint(run / "checkpoint").step == 2  # loads: its tensors are finite


@pytest.mark.parametrize("val_every, message, state_saved", [
    ("1", r"ae: validation loss of the EMA weights is nan at step 1: training diverged before this stage's first save; "
          r"start it again at a lower learning rate \(--ae-lr was 10000\) with `worldsim train --resume ", False),
    # a save without a validation before it: the state is written, then its export finds NaN latents
    ("0", r"ae: cannot calibrate latent scale from latents with std nan at step 1: training diverged, and the training "
          r"state of this step is saved; start again in a new --out with a lower learning rate \(--ae-lr", True),
])
def test_an_autoencoder_that_diverges_stops_in_one_line(dataset, tmp_path, capsys, monkeypatch, val_every, message,
                                                       state_saved):
    """--ae-lr 1e4: one step leaves finite weights whose encoder gives NaN latents. The validation before
    the save stops the run before it saves; without one, the export's latent-scale calibration raised a
    ValueError traceback (exit 1). (1e4 is above MAX_LR, refused on the command line: lifted here.)"""
    import worldsim.train as train_mod

    monkeypatch.setattr(train_mod, "MAX_LR", 1e4)
    run = tmp_path / "ae"
    rc = main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(run), *FAST, "--ae-steps", "5",
               "--ae-lr", "1e4", "--warmup", "0", "--checkpoint-every", "1", "--val-every", val_every])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err) and "Traceback" not in err, err
    assert (run / "state").is_dir() == state_saved
    assert not (run / "autoencoder").exists()


def test_every_rank_stops_with_rank_0_when_its_validation_loss_is_not_finite(dataset, tmp_path):
    """Rank 0 validates alone: it stopped, and the other ranks waited for it at the save's barrier,
    ended by a closed connection, torchrun's SIGTERM or, on another machine, --ddp-timeout (whose
    line blames a slow rank). Every rank now takes the decision at the same step and says why."""
    run = tmp_path / "ddp-val"
    launcher = tmp_path / "lr_bound_lifted.py"  # --ae-lr 1e4 is above MAX_LR, refused on the command line
    launcher.write_text("import sys\nimport worldsim.train as train\ntrain.MAX_LR = 1e4\n" + RUN_CLI)
    res = _torchrun(launcher, "train", "--stage", "ae", "--data", str(dataset), "--out", str(run), *FAST,
                    "--ae-steps", "5", "--ae-lr", "1e4", "--warmup", "0", "--checkpoint-every", "1", "--val-every", "1",
                    "--device", "cpu", "--ddp-timeout", "60")
    assert res.returncode != 0
    assert "worldsim train: ae: validation loss of the EMA weights is nan at step 1: training diverged" in res.stderr, \
        res.stderr
    assert "worldsim train: ae: validation loss of the EMA weights (on rank 0) is not finite at step 1: training " \
           "diverged before this stage's first save" in res.stderr, res.stderr
    assert "another rank stopped" not in res.stderr, res.stderr
    assert not (run / "state").exists()


def test_a_training_state_that_is_not_finite_is_refused_on_resume_naming_the_tensor(trained, tmp_path, capsys):
    """A state saved by a diverged run (as worldsim saved them before the gradient check) resumed into
    'loss is nan at the next step; lower the learning rate', which no lower rate mends."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    weights = run / "state" / "weights.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.startswith("ema.") and tensors[k].is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(weights), metadata=metadata)
    rc = main(["train", "--resume", str(run), "--far-steps", "5", "--threads", "1", "--progress", "false"])
    err = capsys.readouterr().err
    assert rc == 2 and f"state: tensor {name} of the training state holds NaN or infinite values" in err, err


# ----------------------------------------------------------------------------- Ctrl-C


def test_sigint_saves_and_exits_cleanly(trained, dataset, tmp_path):
    from worldsim.checkpoint import load_checkpoint

    run = tmp_path / "sigint"
    cmd = [sys.executable, "-m", "worldsim", "train", "--data", str(dataset), "--out", str(run), *FAST,
           "--stage", "far", "--ae-from", str(trained), "--far-steps", "100000", "--checkpoint-every", "2",
           "--val-every", "0", "--preview-every", "-1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600  # a guard against a hung child, not a speed requirement
        while not (run / "state" / "state.json").is_file():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.time() < deadline, "no checkpoint after 600 s: the training child seems stuck"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert "interrupted at step" in err
    state = json.loads((run / "state" / "state.json").read_text())
    assert state["stage"] == "far" and state["step"] >= 2 and not state["finished"]
    ck = load_checkpoint(run / "checkpoint", device="cpu")
    assert ck.step == state["step"]


# ----------------------------------------------------------------------------- DDP


@pytest.fixture(scope="module")
def ddp_far_run(trained, dataset, tmp_path_factory):
    """`ddp_far_run(seq_len)`: (run folder, torchrun's result) of a far stage on two CPU ranks, launched
    once per --seq-len and read by several tests (each asserts its own behaviour of the same launch; a
    torchrun costs three fresh interpreters). Its launcher makes rank 1 late to the autoencoder copy and
    the latent cache, gives every training batch a statistic that is its rank, and reports each rank's
    gloo threads after close."""
    runs = {}

    def launch(seq_len: str) -> tuple[Path, subprocess.CompletedProcess]:
        if seq_len not in runs:
            folder = tmp_path_factory.mktemp(f"ddp-far-{seq_len}")
            launcher = folder / "late_rank1_rank_stat.py"
            launcher.write_text(
                "import os, sys, torch\n"
                "import worldsim.objective as objective\n"
                "import worldsim.train as train\n"
                + RANK_1_LATE
                + NO_LOSS_PLOT
                + "def late(fn):\n"
                "    def wrapped(*args, **kwargs):\n"
                "        if rank == '1':\n"
                "            wait_for_rank_0()\n"
                "        return fn(*args, **kwargs)\n"
                "    return wrapped\n"
                "train._ensure_autoencoder = late(train._ensure_autoencoder)\n"
                "train.build_latents = late(train.build_latents)\n"
                "real = objective.training_loss\n"
                "def training_loss(*args, **kwargs):\n"
                "    loss, stats = real(*args, **kwargs)\n"
                "    return loss, {**stats, 'rank_probe': torch.tensor(float(os.environ['RANK']))}\n"
                "objective.training_loss = training_loss\n"
                + REPORT_GLOO_THREADS_AFTER_CLOSE
                + RUN_CLI)
            run = folder / "ddp"
            res = _torchrun(launcher, "train", "--data", str(dataset), "--out", str(run), *FAST,
                            "--stage", "far", "--ae-from", str(trained), "--far-steps", "3", "--checkpoint-every", "2",
                            "--log-every", "1", "--val-every", "0", "--preview-every", "-1",
                            "--obj-random-context-length", "true", "--obj-short-context-prob", "0.5",
                            "--seq-len", seq_len, "--ddp-timeout", "60")
            runs[seq_len] = (run, res)
        return runs[seq_len]

    return launch


@pytest.mark.parametrize("seq_len", ["6", "4"])  # 4 = the tiny window: no sample has coarse frames
def test_ddp_two_cpu_ranks_hold_identical_weights(ddp_far_run, seq_len):
    run, res = ddp_far_run(seq_len)
    assert res.returncode == 0, res.stdout + res.stderr
    # every parameter reaches the loss on every rank, also when one rank draws a batch without
    # long-term context (short-context prob 0.5): no find_unused_parameters, no hang
    assert "find_unused_parameters" not in res.stderr, res.stderr
    hashes = dict(re.findall(r"\[rank (\d)\] far weights sha256 ([0-9a-f]{64})", res.stdout + res.stderr))
    assert set(hashes) == {"0", "1"}, res.stdout + res.stderr
    assert hashes["0"] == hashes["1"]
    state = json.loads((run / "state" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    assert (run / "checkpoint" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def ddp_ae_run(dataset, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(run folder, torchrun's result) of an autoencoder stage on two CPU ranks, read by two tests. Its
    launcher makes rank 1 slow to look at --out (until rank 0 waits for it or writes its config.json)
    while rank 0 writes its config.json slowly (the file's temporary twin stays until rank 1 has
    reached a collective after looking, at most 6 s), and makes rank 1 late to the frame copy."""
    folder = tmp_path_factory.mktemp("ddp-ae")
    launcher = folder / "slow_rank1.py"
    launcher.write_text(
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "import worldsim.ddp as ddp\n"
        "import worldsim.train as train\n"
        + RANK_1_LATE
        + NO_LOSS_PLOT
        + "looked, writing, built = here / 'rank1-looked', here / 'rank0-writes-config', []\n"
        "init, write, opened = train.Trainer.__init__, train.write_json_atomic, train.open_frames\n"
        "def slow_init(self, *args, **kwargs):\n"
        "    if rank == '1':\n"
        "        wait_for_rank_0(done=writing.exists)\n"
        "    init(self, *args, **kwargs)\n"
        "    built.append(True)\n"
        "def slow_write(path, obj):\n"
        "    if Path(path).name == 'config.json':\n"
        "        twin = Path(path).parent / ('.' + Path(path).name + '.race.tmp')\n"
        "        twin.write_text('being written')\n"
        "        writing.touch()\n"
        "        start = time.monotonic()\n"
        "        while not looked.exists() and time.monotonic() - start < 6:\n"
        "            time.sleep(0.01)\n"
        "        twin.unlink()\n"
        "    write(path, obj)\n"
        "def late_open_frames(*args, **kwargs):\n"
        "    if rank == '1':\n"
        "        wait_for_rank_0()\n"
        "    return opened(*args, **kwargs)\n"
        "def after_looking(fn):  # rank 1 looked at --out before its first collective once its Trainer is built\n"
        "    def wrapped(self, *args, **kwargs):\n"
        "        if rank == '1' and built:\n"
        "            looked.touch()\n"
        "        return fn(self, *args, **kwargs)\n"
        "    return wrapped\n"
        "ddp.Dist.barrier, ddp.Dist.any_flags = after_looking(ddp.Dist.barrier), after_looking(ddp.Dist.any_flags)\n"
        "train.Trainer.__init__, train.write_json_atomic = slow_init, slow_write\n"
        "train.open_frames = late_open_frames\n"
        + RUN_CLI)
    run = folder / "race"
    res = _torchrun(launcher, "train", "--stage", "ae", "--data", str(dataset), "--out", str(run), *FAST,
                    "--ae-steps", "2", "--val-every", "1", "--ddp-timeout", "60")
    return run, res


def test_a_rank_looking_at_out_while_rank_0_writes_there_does_not_refuse_the_run(ddp_ae_run):
    """Rank 1 looks at --out while rank 0 writes its config.json (both slowed in ddp_ae_run's launcher:
    the temporary twin of the file stays until rank 1 has looked): it used to take the twin for a
    started run and refuse it (1 start in 6 failed so on this machine, unslowed)."""
    run, res = ddp_ae_run
    assert res.returncode == 0, res.stdout + res.stderr
    assert "already holds a training run" not in res.stderr


def test_a_rank_late_to_the_autoencoders_frame_copy_keeps_step_with_rank_0(ddp_ae_run):
    """The autoencoder stage's ranks map one copy of the frames (RUN/frames/) that rank 0 writes: a rank
    that looks after rank 0 has written it must still wait at the same barrier, as with the latent cache.
    (Rank 1 is late to it in ddp_ae_run's launcher: it looks once rank 0 has written it and gone on to
    the next collective, or waits for rank 1 in one.)"""
    run, res = ddp_ae_run
    assert res.returncode == 0, res.stdout + res.stderr
    hashes = dict(re.findall(r"\[rank (\d)\] ae weights sha256 ([0-9a-f]{64})", res.stdout + res.stderr))
    assert set(hashes) == {"0", "1"} and hashes["0"] == hashes["1"], res.stdout + res.stderr
    assert not (run / "frames").exists()


# a launcher's lines that print each rank's gloo threads once Dist.close() ran ("[rank R] gloo threads
# after close: [...]"), in one write: the ranks share the pipe, and PYTHONUNBUFFERED=1 split a print in two.
# The threads get up to 5 s to leave: CI once saw ['gloo_tcp_loop'] on one rank right after close (the
# same test passed in earlier runs), and a thread that pthread_join has joined can still be listed in /proc/self/task while the
# kernel finishes its exit (1 of 20,000 joined native threads on this 2-core VM under load). A group that
# outlives close() (the bugs below) keeps them until the interpreter's exit, which 5 s still catches.
REPORT_GLOO_THREADS_AFTER_CLOSE = (
    "import os, sys, time\n"
    "import worldsim.ddp as ddp\n"
    "close = ddp.Dist.close\n"
    "def gloo_threads():\n"
    "    names = []\n"
    "    for t in os.listdir('/proc/self/task'):\n"
    "        try:\n"
    "            names.append(open(f'/proc/self/task/{t}/comm').read().strip())\n"
    "        except OSError:  # a thread that ended between the listing and the read\n"
    "            pass\n"
    "    return sorted(n for n in names if 'gloo' in n)\n"
    "def closed(self):\n"
    "    close(self)\n"
    "    if not os.path.isdir('/proc/self/task'):\n"
    "        return\n"
    "    start = time.monotonic()\n"
    "    while (gloo := gloo_threads()) and time.monotonic() - start < 5:\n"
    "        time.sleep(0.01)\n"
    "    sys.stdout.write(f'[rank {self.rank}] gloo threads after close: {gloo} '\n"
    "                     f'(looked for {time.monotonic() - start:.2f} s)\\n')\n"
    "    sys.stdout.flush()\n"
    "ddp.Dist.close = closed\n")


def test_a_rank_late_to_the_autoencoder_copy_and_the_latent_cache_keeps_step_with_rank_0(ddp_far_run):
    """Each rank used to decide alone whether to wait for rank 0's copy of the autoencoder and its latent
    cache: a rank 1 that looked after rank 0 had written skipped the barrier, and every later collective
    paired with the wrong one ("no train frames to train on", or a hang until --ddp-timeout). (Rank 1 is
    late to each in ddp_far_run's launcher: it looks once rank 0 has written it and gone on to the next
    collective, or waits for rank 1 in one.)"""
    run, res = ddp_far_run("6")
    assert res.returncode == 0, res.stdout + res.stderr
    hashes = dict(re.findall(r"\[rank (\d)\] far weights sha256 ([0-9a-f]{64})", res.stdout + res.stderr))
    assert set(hashes) == {"0", "1"} and hashes["0"] == hashes["1"], res.stdout + res.stderr
    # each rank's process group is gone once it closes, gloo's threads joined: a group that outlived
    # destroy_process_group (torch.distributed.nn imported after it was made, a DDP wrapper left in a
    # cycle) left a worker thread that could take the GIL during interpreter exit, and abort (SIGABRT)
    if sys.platform.startswith("linux"):
        closed = dict(re.findall(r"\[rank (\d)\] gloo threads after close: (\[[^\]]*\])", res.stdout))
        assert closed == {"0": "[]", "1": "[]"}, res.stdout


def test_a_training_stopped_by_an_error_still_frees_its_process_group_at_close(dataset, tmp_path):
    """An exception passing through train.main (a full disk at a save, Ctrl-C twice, a peer rank gone)
    held the training frames, the DDP wrapper among them, in its traceback while Dist.close() ran, so
    the process group outlived destroy_process_group and gloo's threads were still up at the exit."""
    launcher = tmp_path / "full_disk.py"
    launcher.write_text(
        "import os, sys\n"
        "import worldsim.train as train\n"
        "def full(*args, **kwargs):\n"
        "    raise OSError(28, 'No space left on device', 'state')\n"
        "train.Trainer.save_state = full\n"
        + REPORT_GLOO_THREADS_AFTER_CLOSE
        + RUN_CLI)
    res = _torchrun(launcher, "train", "--stage", "ae", "--data", str(dataset), "--out", str(tmp_path / "full"), *FAST,
                    "--ae-steps", "4", "--checkpoint-every", "2", "--val-every", "0", "--preview-every", "-1",
                    "--ddp-timeout", "60")
    assert res.returncode != 0 and "No space left on device" in res.stderr, res.stdout + res.stderr
    if sys.platform.startswith("linux"):
        closed = dict(re.findall(r"\[rank (\d)\] gloo threads after close: (\[[^\]]*\])", res.stdout))
        assert closed.get("0") == "[]", res.stdout + res.stderr


def test_a_resume_on_another_number_of_ranks_says_the_batch_of_a_step_changes(trained, tmp_path, capsys):
    """--far-batch is per rank: a run saved on 2 ranks and resumed on 1 trains on half the batch at the
    same learning rate, which the note ("same weights, a different data order") left out."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    state = json.loads((run / "state" / "state.json").read_text())
    (run / "state" / "state.json").write_text(json.dumps({**state, "world_size": 2}) + "\n")
    batch = json.loads((run / "config.json").read_text())["train"]["far_batch"]
    assert main(["train", "--resume", str(run), "--far-steps", str(state["step"] + 1), "--progress", "false",
                 "--threads", "1"]) == 0
    assert (f"note: resumed with 1 rank(s), saved with 2: same weights, a different data order from here on, and a "
            f"step's batch is now 1 x --far-batch {batch} = {batch} (--far-batch is per rank: on 2 rank(s) it made "
            f"{2 * batch}, which --far-batch {2 * batch} keeps)") in capsys.readouterr().err


def test_a_resume_on_another_number_of_ranks_that_keeps_the_batch_says_it_stays(trained, tmp_path, capsys):
    """The note's own advice: saved on 2 ranks with --far-batch B, resumed on 1 with --far-batch 2B keeps
    the batch; the note took this run's --far-batch for the saved one's and said the 2 ranks had made 4B,
    which --far-batch 4B kept."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    state = json.loads((run / "state" / "state.json").read_text())
    (run / "state" / "state.json").write_text(json.dumps({**state, "world_size": 2}) + "\n")
    batch = json.loads((run / "config.json").read_text())["train"]["far_batch"]
    assert main(["train", "--resume", str(run), "--far-steps", str(state["step"] + 1), "--progress", "false",
                 "--threads", "1", "--far-batch", str(2 * batch)]) == 0
    assert (f"note: resumed with 1 rank(s), saved with 2: same weights, a different data order from here on, and a "
            f"step's batch stays {2 * batch} (1 x --far-batch {2 * batch})") in capsys.readouterr().err


def test_a_metrics_row_of_two_ranks_averages_their_statistics_as_it_does_their_loss(ddp_far_run):
    """A row's loss was the ranks' mean but its statistics (the autoencoder's psnr, the transformer's
    noisy_frames, clean_frac, ...) were rank 0's batch alone. In ddp_far_run's launcher each rank's
    batch reports its rank as a statistic."""
    run, res = ddp_far_run("4")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["rank_probe"]) for r in rows if "loss" in r] == [(1, 0.5), (2, 0.5), (3, 0.5)]


def test_a_rank_that_fails_stops_the_others_with_one_line_and_every_rank_frees_its_process_group(
        trained, dataset, tmp_path):
    """Rank 1 fails in its second step (a bug, bad data, its memory): rank 0, waiting at the step's
    collective, printed 30 lines of gloo traceback ("Connection closed by peer ... GLHF!") under rank
    1's message; now one line that says another rank stopped and where the last save is. And a
    RuntimeError that was not an allocation failure (gloo's own among them) was re-raised by the
    out-of-memory handler, past the one that drops the training frames: both ranks' process groups
    outlived close(), gloo's threads still up at the interpreter's exit."""
    launcher = tmp_path / "rank1_fails.py"
    launcher.write_text(
        "import os, sys\n"
        "import worldsim.train as train\n"
        "real = train.step_rng\n"
        "def step_rng(seed, rank, step, stream=0):\n"
        "    if os.environ.get('RANK') == '1' and step == 1:\n"
        "        raise RuntimeError('rank 1 fails on purpose')\n"
        "    return real(seed, rank, step, stream)\n"
        "train.step_rng = step_rng\n"
        + NO_LOSS_PLOT
        + REPORT_GLOO_THREADS_AFTER_CLOSE
        + RUN_CLI)
    run = tmp_path / "fails"
    res = _torchrun(launcher, "train", "--data", str(dataset), "--out", str(run), *FAST, "--stage", "far",
                    "--ae-from", str(trained), "--far-steps", "4", "--checkpoint-every", "1", "--val-every", "0",
                    "--preview-every", "-1", "--ddp-timeout", "60")
    assert res.returncode != 0
    assert "RuntimeError: rank 1 fails on purpose" in res.stderr, res.stderr  # the failing rank's own traceback
    assert "[rank0]: Traceback" not in res.stderr, res.stderr
    line = next((x for x in res.stderr.splitlines() if x.startswith("worldsim train: rank 0: ")), "")
    assert "another rank stopped" in line and f"continue with --resume {run}" in line, res.stderr
    assert json.loads((run / "state" / "state.json").read_text())["step"] == 1
    if sys.platform.startswith("linux"):
        closed = dict(re.findall(r"\[rank (\d)\] gloo threads after close: (\[[^\]]*\])", res.stdout))
        assert closed == {"0": "[]", "1": "[]"}, res.stdout + res.stderr


# ----------------------------------------------------------------------------- units


def test_only_a_process_group_that_lost_its_peer_is_reported_as_another_rank_stopping():
    """The one-line "another rank stopped" replaces a rank's traceback: a RuntimeError with "gloo"
    anywhere in it (a dataset under /data/igloo) or nccl's failure on this rank (its GPU memory at the
    first collective) was told as another rank's, on the rank that failed, its traceback dropped."""
    import torch.distributed as tdist

    from worldsim.train import lost_peer

    # gloo's own words (torch 2.13, two CPU ranks: one killed, one slower than the timeout)
    assert lost_peer(RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
        "[127.0.0.1]:5015. This is typically caused by a remote worker crashing. GLHF!")) == \
        "Connection closed by peer [127.0.0.1]:5015"
    assert lost_peer(RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:55966: "
        "Connection reset by peer. This is typically caused by a remote worker hanging")) is not None
    assert lost_peer(RuntimeError("[C:\\a\\third_party\\gloo\\gloo\\transport\\uv\\unbound_buffer.cc:"
                                  "78] Timed out waiting 5000ms for recv operation to complete")) == \
        "Timed out waiting 5000ms for recv operation to complete"
    assert lost_peer(tdist.DistBackendError(
        "NCCL error in: ProcessGroupNCCL.cpp:3356, remote process exited or there was a network error, NCCL "
        "version 2.21.5\nncclRemoteError: socketProgress: Connection closed by remote peer")) is not None
    # this rank's own errors
    assert lost_peer(RuntimeError("/data/igloo/train/ep-0001.npz: episode file is damaged")) is None
    assert lost_peer(tdist.DistBackendError(
        "NCCL error in: ProcessGroupNCCL.cpp:3356, unhandled cuda error (run with NCCL_DEBUG=INFO for details), "
        "NCCL version 2.21.5\nncclUnhandledCudaError: Call to CUDA function failed.\nLast error:\n"
        "Cuda failure 'out of memory'")) is None
    assert lost_peer(KeyboardInterrupt()) is None and lost_peer(SystemExit(2)) is None


def test_each_rank_and_step_draws_different_samples():
    from worldsim.train import WindowSampler, step_rng

    smp = WindowSampler(np.array([50, 80, 30]), 16, "x")
    draws = {(r, s): tuple(smp.draw(step_rng(0, r, s)[0], 8)) for r in range(2) for s in range(3)}
    assert len(set(draws.values())) == len(draws)
    assert tuple(smp.draw(step_rng(0, 1, 2)[0], 8)) == draws[(1, 2)]  # a pure function of (seed, rank, step)
    for e, s in draws[(0, 0)]:
        assert s + 16 <= [50, 80, 30][e]


def test_step_rng_seeds_are_python_ints_that_runs_already_saved_keep():
    """The torch seed of a step is a non-negative int below 2**63, the same on every NumPy: on NumPy 1.x
    `np.uint64 >> 1` raised TypeError and every `worldsim train` stopped at its first step. The pinned
    values are the ones earlier runs drew, so a resume still draws what they would have."""
    from worldsim.train import step_rng

    pinned = {(0, 0, 0, 0): 2440950710608614359, (0, 10_000, 0, 0): 5411148163626478192,
              (7, 1, 123, 2): 7976359448347999313}
    for args, seed in pinned.items():
        rng, torch_seed = step_rng(*args)
        assert type(torch_seed) is int and torch_seed == seed
    assert int(step_rng(7, 1, 123, 2)[0].integers(1 << 30)) == 348267681


def test_train_imports_and_reports_peak_memory_without_posix_resource(monkeypatch):
    """Windows has no `resource` module: `worldsim train` (which imported it at the top) could not
    even show its --help there. Peak memory is then left out; macOS counts ru_maxrss in bytes."""
    code = ("import sys; sys.modules['resource'] = None\n"
            "import worldsim.train as t\n"
            "assert t.peak_rss_mib() is None\n"
            "from worldsim.cli import main\n"
            "sys.exit(main(['train', '--help']))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0 and "--data" in res.stdout, res.stderr

    import resource

    from worldsim import train as train_mod

    usage = type("Usage", (), {"ru_maxrss": 3 * 2**30})()
    monkeypatch.setattr(resource, "getrusage", lambda who: usage)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert train_mod.peak_rss_mib() == 3 * 1024  # bytes there
    monkeypatch.setattr(sys, "platform", "linux")
    assert train_mod.peak_rss_mib() == 3 * 2**20  # KiB here


def test_windows_reach_the_last_frames_of_every_episode():
    """Every valid window is drawn, the last one too: an episode as long as --seq-len has one window,
    and the last frames of longer ones are trained on."""
    from worldsim.train import WindowSampler

    smp = WindowSampler(np.array([16, 20]), 16, "x")
    starts = {pick for seed in range(20) for pick in smp.draw(np.random.default_rng(seed), 50)}
    assert starts == {(0, 0), *((1, s) for s in range(5))}


def test_ema_moves_a_warmed_up_fraction_toward_the_weights():
    """The exported and played weights are the EMA: it keeps `decay` of itself, and less in the first
    steps ((1 + step) / (10 + step)), so that it does not start as the random initial weights."""
    from worldsim.train import ema_update

    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
        for p in model.parameters():
            p.fill_(1.0)
    ema_update(ema, model, 0.99, step=10_000)
    torch.testing.assert_close(ema.weight, torch.full((2, 2), 0.01))
    ema_update(ema, model, 0.99, step=0)  # warm-up: it keeps 1/10 of itself at the first step
    torch.testing.assert_close(ema.weight, torch.full((2, 2), 0.01 + 0.99 * 0.9))


def test_optimizer_state_round_trips_without_pickles():
    from worldsim.train import _flatten_optimizer, _unflatten_optimizer

    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    tensors, meta = _flatten_optimizer(opt, "optim")
    meta = json.loads(json.dumps(meta))  # what goes to disk
    m2 = torch.nn.Linear(4, 3)
    m2.load_state_dict(m.state_dict())
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1.0)
    _unflatten_optimizer(opt2, tensors, meta, "optim")
    x = torch.randn(5, 4)
    for mm, oo in ((m, opt), (m2, opt2)):
        oo.zero_grad()
        mm(x).pow(2).sum().backward()
        oo.step()
    torch.testing.assert_close(m.weight, m2.weight, rtol=0, atol=0)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)


def test_interrupted_save_keeps_the_previous_state(tmp_path):
    from worldsim.train import readable_dir, swap_dir_atomic

    final = tmp_path / "state"
    swap_dir_atomic(final, lambda d: (d / "state.json").write_text('{"step": 1}'))

    def crash(d: Path) -> None:
        (d / "state.json").write_text('{"step": 2')  # half written, then killed
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        swap_dir_atomic(final, crash)
    assert json.loads((readable_dir(final, "state.json") / "state.json").read_text()) == {"step": 1}
    assert not [p for p in tmp_path.iterdir() if p.name != "state"], "temp folder left behind"
    # killed between the two renames: only state.old exists, and it is what resume reads
    os.replace(final, tmp_path / "state.old")
    assert readable_dir(final, "state.json") == tmp_path / "state.old"
    # the next save first puts it back, so there is always one complete state on disk
    swap_dir_atomic(final, lambda d: (d / "state.json").write_text('{"step": 3}'))
    assert json.loads((final / "state.json").read_text()) == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_schedule_and_token_counts():
    from worldsim.model import PRESETS
    from worldsim.train import lr_at, tokens_per_sample

    assert lr_at(0, 100, 1.0, 10, True, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, True, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10, True, 0.1) == pytest.approx(0.1)
    assert lr_at(50, 100, 1.0, 10, False, 0.1) == 1.0
    # a wall-clock limit moves the decay on when time runs ahead of the steps, never back
    assert lr_at(20, 100, 1.0, 10, True, 0.1, time_fraction=1.0) == pytest.approx(0.1)
    assert lr_at(20, 100, 1.0, 10, True, 0.1, time_fraction=0.5) == pytest.approx(0.55)
    assert lr_at(90, 100, 1.0, 10, True, 0.1, time_fraction=0.5) == lr_at(90, 100, 1.0, 10, True, 0.1)
    assert lr_at(5, 100, 1.0, 10, True, 0.1, time_fraction=0.9) == pytest.approx(0.6)  # warm-up first
    # a warm-up that took 60% of the time: the decay spans the other 40%, from the peak to the floor
    assert lr_at(10, 1000, 1.0, 10, True, 0.1, time_fraction=0.6, warmup_end_fraction=0.6) == pytest.approx(1.0)
    assert lr_at(11, 1000, 1.0, 10, True, 0.1, time_fraction=0.8, warmup_end_fraction=0.6) == pytest.approx(0.55)
    assert lr_at(12, 1000, 1.0, 10, True, 0.1, time_fraction=1.0, warmup_end_fraction=0.6) == pytest.approx(0.1)
    paper = tokens_per_sample(PRESETS["far-b-long"], 300)  # the paper's numbers
    assert (paper["long_short"], paper["all_fine"]) == (2160, 19200)


def test_a_time_limited_stage_ends_early_at_the_floor_and_exports(trained, dataset, tmp_path, capsys, step_clock,
                                                                  no_loss_plot):
    """--far-time-limit: a GPU lent for minutes trains until the clock runs out, its learning rate at the
    cosine floor by then, and leaves a complete export, as if its steps were done. The clock is a fake
    one of 0.25 s a step: a 4 s limit is 16 steps on any machine, however slow."""
    from worldsim.train import lr_at

    step_clock(0.25)
    run = tmp_path / "timed"
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(run), *FAST,
                 "--ae-from", str(trained / "checkpoint"), "--far-steps", "100000", "--far-time-limit", "4",
                 "--warmup", "2", "--log-every", "1", "--val-every", "0", "--checkpoint-every", "100000"]) == 0
    assert "time limit of 4 s reached at step 16/100000" in capsys.readouterr().err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "lr" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    peak = max(r["lr"] for r in steps)
    # the rate of step i: the warm-up's 2 steps, then a cosine over the time left (0.5 s .. 4 s) to the floor
    expected = [lr_at(i, 100000, peak, 2, True, 0.1, time_fraction=i * 0.25 / 4, warmup_end_fraction=0.5 / 4)
                for i in range(16)]
    assert [r["lr"] for r in steps] == pytest.approx(expected, rel=1e-6)
    assert steps[-1]["lr"] < 0.115 * peak  # the last step's rate is near the floor (0.1 x peak) ...
    assert lr_at(16, 100000, peak, 2, True, 0.1, 16 * 0.25 / 4, 0.5 / 4) == pytest.approx(0.1 * peak)  # ... at it next
    assert any("val_loss" in r for r in rows)  # the final validation ran
    meta = json.loads((run / "state" / "state.json").read_text())
    assert (meta["step"], meta["seconds"], meta["finished"]) == (16, 4.0, False)
    assert meta["warmup_end_seconds"] == 0.5  # kept in seconds: a resume with another limit decays from there
    assert (run / "checkpoint" / "model.safetensors").exists()
    assert json.loads((run / "checkpoint" / "config.json").read_text())["step"] == 16  # the export is of the last step
    # resuming a run whose time is up finishes at once; a longer limit continues it to its new end
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "state" / "state.json").read_text())["step"] == 16
    assert "time limit of 4 s was already reached" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--far-time-limit", "10"]) == 0
    assert "time limit of 10 s reached at step 40/100000" in capsys.readouterr().err
    meta = json.loads((run / "state" / "state.json").read_text())
    assert (meta["step"], meta["seconds"], meta["warmup_end_seconds"]) == (40, 10.0, 0.5)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "lr" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert [r["lr"] for r in steps[16:]] == pytest.approx(
        [lr_at(i, 100000, peak, 2, True, 0.1, i * 0.25 / 10, 0.5 / 10) for i in range(16, 40)], rel=1e-6)


def test_a_time_limit_that_ends_inside_the_warm_up_says_the_rate_never_decayed(trained, dataset, tmp_path, capsys,
                                                                                step_clock, no_loss_plot):
    step_clock(0.25)
    run = tmp_path / "short"
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(run), *FAST,
                 "--ae-from", str(trained / "checkpoint"), "--far-steps", "100000", "--far-time-limit", "1",
                 "--warmup", "100000", "--val-every", "0", "--checkpoint-every", "100000"]) == 0
    err = capsys.readouterr().err
    assert "time limit of 1 s reached at step 4/100000" in err
    assert "the time ran out during the warm-up (4 of 100000 steps)" in err
    meta = json.loads((run / "state" / "state.json").read_text())
    assert (meta["step"], meta["warmup_end_seconds"]) == (4, None)


def test_datasets_that_disagree_are_named(dataset, tmp_path, capsys):
    if not DMLAB.is_file():
        pytest.skip("no DMLab example file")
    rc = main(["train", "--data", str(dataset), str(DMLAB), "--out", str(tmp_path / "r"), *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(DMLAB) in err and "action names" in err


def test_dmlab_npz_is_accepted():
    if not DMLAB.is_file():
        pytest.skip("no DMLab example file")
    from worldsim.train import probe_data

    info = probe_data([str(DMLAB)], None, "")
    assert info.resolution == (64, 64) and info.action_names[0] == "action_0"


def test_dmlab_files_of_fewer_actions_train_in_any_order(tmp_path):
    """Bug: index-less files are named by their largest action, and the first --data path set the names,
    so a file without the last action first refused the full one ("action 2 is out of range")."""
    if not DMLAB.is_file():
        pytest.skip("no DMLab example file")
    from worldsim.train import probe_data

    with np.load(DMLAB) as z:
        video, actions = z["video"], z["actions"]
    fewer = tmp_path / "fewer.npz"
    top = int(actions.max())
    np.savez(fewer, video=video, actions=np.where(actions == top, top - 1, actions))
    full = probe_data([str(DMLAB)], None, "").action_names
    assert len(full) == top + 1
    assert probe_data([str(fewer), str(DMLAB)], None, "").action_names == full
    assert probe_data([str(DMLAB), str(fewer)], None, "").action_names == full


def test_teco_test_folder_never_trains(tmp_path, capsys):
    """TECO's dmlab/test/<shard>/<n>.npz given to train: the folder was not read, and a flat folder of
    such files trained on ~90% of them by a hash of their id. Now the test folder holds no train split."""
    from worldsim.latents import load_frames

    rng = np.random.default_rng(0)
    root = tmp_path / "dmlab"
    for name in ("train/0/0", "train/0/1", "test/0/0", "test/1/0"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        np.savez(root / f"{name}.npz", video=rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8),
                 actions=rng.integers(0, 3, 8))
    frames = load_frames([str(root)], "train", warn=lambda _: None)
    assert [s.rsplit(":", 1)[1] for s in frames.sources] == ["train-0-0", "train-0-1"]
    rc = main(["train", "--data", str(root / "test"), "--out", str(tmp_path / "r"), *FAST, "--ae-steps", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{root / 'test'}: no training frames" in err and "lie in a test folder, which never trains" in err


def test_val_split_taken_from_the_dataset_that_holds_it(tmp_path, no_loss_plot):
    """A train-only dataset beside a val-only one: validation uses only the val mazes."""
    from worldsim.cli import main as cli_main
    from worldsim.latents import load_frames

    common = ["--env-arg", "resolution=32", "--length", "6", "--workers", "1", "--progress", "false"]
    assert cli_main(["record", "--out", str(tmp_path / "tr"), "--episodes", "2", "--split", "train", *common]) == 0
    assert cli_main(["record", "--out", str(tmp_path / "va"), "--episodes", "1", "--split", "val", *common]) == 0
    warnings: list[str] = []
    val = load_frames([str(tmp_path / "tr"), str(tmp_path / "va")], "val", warn=warnings.append)
    assert len(val.videos) == 1 and val.sources[0].startswith(str(tmp_path / "va"))
    assert not warnings
    # with no val mazes anywhere, the training episodes stand in, with a warning
    val = load_frames([str(tmp_path / "tr")], "val", warn=warnings.append)
    assert len(val.videos) == 2 and warnings
    # and the far stage trains on the train-only dataset while validating on the val-only one
    run = tmp_path / "run"
    assert cli_main(["train", "--data", str(tmp_path / "tr"), str(tmp_path / "va"), "--out", str(run), *FAST,
                     "--ae-steps", "2", "--far-steps", "2", "--seq-len", "4"]) == 0
    caches = sorted(p.name for p in (run / "latents").glob("*.json"))
    assert len(caches) == 2 and any(n.startswith("tr-") and "-train-" in n for n in caches) \
        and any(n.startswith("va-") and "-val-" in n for n in caches)


def test_latent_cache_is_rebuilt_when_an_episode_file_changes(dataset, tmp_path):
    """Same ids and lengths but a re-recorded file: the cached latents are stale, not reused."""
    from worldsim.latents import build_cache, load_cached, load_frames

    data = tmp_path / "maze"
    shutil.copytree(dataset, data)
    frames = load_frames([str(data)], "train", warn=lambda _: None)

    def encode(x):
        return x[..., :1].astype(np.float32).transpose(0, 3, 1, 2)  # any deterministic "encoder"

    build_cache(tmp_path / "latents", str(data), "train", "h" * 16, frames, encode)
    assert load_cached(tmp_path / "latents", str(data), "train", "h" * 16) is not None
    episode = sorted((data / "episodes").glob("*.npz"))[0]
    with np.load(episode) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["video"] = 255 - arrays["video"]  # other frames, same length
    np.savez(episode, **arrays)
    assert load_cached(tmp_path / "latents", str(data), "train", "h" * 16) is None


def _encode_red(x):
    return x[..., :1].astype(np.float32).transpose(0, 3, 1, 2)  # any deterministic "encoder"


def test_latent_cache_that_was_cut_short_or_edited_is_rebuilt_not_trusted(dataset, tmp_path):
    """A truncated .npy or a hand-edited meta file gives None (rebuild), never episodes with missing frames."""
    from worldsim.latents import build_cache, cache_paths, load_cached, load_frames

    data, cache = str(dataset), tmp_path / "latents"
    build_cache(cache, data, "train", "h" * 16, load_frames([data], "train", warn=lambda _: None), _encode_red)
    npy, meta_path = cache_paths(cache, data, "train", "h" * 16)
    good_meta, good_arr = json.loads(meta_path.read_text()), np.load(npy)
    for name, meta, arr in [
        ("meta is a list", [good_meta], good_arr),
        ("no offsets", {k: v for k, v in good_meta.items() if k != "offsets"}, good_arr),
        ("offsets shifted", {**good_meta, "offsets": [o + 1 for o in good_meta["offsets"]]}, good_arr),
        ("an action too few", {**good_meta, "actions": [a[:-1] for a in good_meta["actions"]]}, good_arr),
        ("array cut short", good_meta, good_arr[: len(good_arr) // 3]),
    ]:
        meta_path.write_text(json.dumps(meta))
        np.save(npy, arr)
        assert load_cached(cache, data, "train", "h" * 16) is None, name
    meta_path.write_text(json.dumps(good_meta))
    np.save(npy, good_arr)
    store = load_cached(cache, data, "train", "h" * 16)  # the checks refuse none of a sound cache
    assert store is not None and store.lengths.tolist() == good_meta["lengths"]
    assert [a.tolist() for a in store.actions] == good_meta["actions"]



def test_latent_cache_of_another_format_version_or_autoencoder_is_not_reused(dataset, tmp_path):
    """A cache written by an older format (FAR/TECO actions not yet shifted, version 1) or by another
    autoencoder whose hash shares the 16 characters the file name holds is rebuilt, not read."""
    from worldsim.latents import LATENT_FORMAT_VERSION, build_cache, cache_paths, load_cached, load_frames

    data, cache = str(dataset), tmp_path / "latents"
    ae = "a" * 16 + "1" * 48
    build_cache(cache, data, "train", ae, load_frames([data], "train", warn=lambda _: None), _encode_red)
    assert load_cached(cache, data, "train", ae) is not None
    other = "a" * 16 + "2" * 48
    assert cache_paths(cache, data, "train", other) == cache_paths(cache, data, "train", ae)  # one file name
    assert load_cached(cache, data, "train", other) is None
    _, meta_path = cache_paths(cache, data, "train", ae)
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "version": LATENT_FORMAT_VERSION - 1}))
    assert load_cached(cache, data, "train", ae) is None


def test_datasets_of_other_resolutions_or_action_names_are_refused_together(tmp_path):
    """Frames of two sizes cannot share one autoencoder: the second dataset is refused by name. An
    index-less file takes only generic action_<i> names from the others, never a simulator's own."""
    from worldsim.dataset import DatasetError
    from worldsim.latents import load_frames, names_for

    rng = np.random.default_rng(0)
    for name, size in (("a", 8), ("b", 16)):
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "0.npz", video=rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8),
                 actions=np.array([0, 1, 2, 1]))
    paths = [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(DatasetError, match=f"{re.escape(paths[1])}: resolution 16x16 differs from {re.escape(paths[0])}'s 8x8"):
        load_frames(paths, "train", warn=lambda _: None)
    assert names_for(paths[0], ("action_0", "action_1", "action_2")) == ("action_0", "action_1", "action_2")
    assert names_for(paths[0], ("action_0", "forward", "turn_left")) is None


def test_the_autoencoder_hash_covers_names_shapes_and_dtypes_in_any_order():
    """The latent cache is keyed by this hash: two autoencoders that differ only in a tensor's shape, dtype
    or name must not share latents; the order of the state dict must not matter."""
    import torch

    from worldsim.latents import tensors_hash

    w = torch.arange(6, dtype=torch.float32)
    base = tensors_hash({"a": w.reshape(2, 3), "b": torch.ones(2)})
    assert tensors_hash({"b": torch.ones(2), "a": w.reshape(2, 3)}) == base
    for other in ({"a": w.reshape(3, 2), "b": torch.ones(2)}, {"a": w.reshape(2, 3), "c": torch.ones(2)},
                  {"a": w.reshape(2, 3).to(torch.int32), "b": torch.ones(2)}):
        assert tensors_hash(other) != base


def test_an_episode_source_is_split_at_the_longest_dataset_path_it_starts_with():
    from worldsim.latents import split_source

    paths = ["/data/run", "/data/run:2"]  # the second begins with the first and its ':'
    assert split_source("/data/run:2:ep:7", paths) == ("/data/run:2", "ep:7")
    assert split_source("/data/run:ep", paths) == ("/data/run", "ep")

def test_latent_cache_on_a_full_disk_is_an_error_naming_it_and_leaves_no_temp_file(dataset, tmp_path, monkeypatch):
    """The cache was written through a memory map: a full disk killed the trainer with SIGBUS ("Bus
    error") and left its temp file, as large as the cache, on the full disk. Writes now fail as an
    OSError naming the cache; a temp file a killed run left is swept by the next build."""
    import builtins

    from worldsim.latents import build_cache, cache_paths, load_cached, load_frames

    data, cache = str(dataset), tmp_path / "latents"
    frames = load_frames([data], "train", warn=lambda _: None)
    cache.mkdir()
    (cache / ".left-by-a-killed-run.npy.abc.tmp.npy").write_bytes(b"\0" * 1000)
    real_open = builtins.open

    class FullDisk:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 3000:  # a few frames in
                raise OSError(28, "No space left on device")
            return self.fh.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def opener(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return FullDisk(fh) if "w" in mode and str(file).endswith(".tmp.npy") else fh

    monkeypatch.setattr(builtins, "open", opener)
    npy, _ = cache_paths(cache, data, "train", "h" * 16)
    with pytest.raises(OSError, match="No space left") as err:
        build_cache(cache, data, "train", "h" * 16, frames, _encode_red)
    assert err.value.filename == str(npy)
    assert sorted(p.name for p in cache.iterdir()) == []  # neither this temp file nor the stale one
    monkeypatch.setattr(builtins, "open", real_open)
    build_cache(cache, data, "train", "h" * 16, frames, _encode_red)
    store = load_cached(cache, data, "train", "h" * 16)
    first = frames.videos[0]
    assert np.array_equal(store.latents[0], _encode_red(first).astype(np.float16))


def test_episode_ids_and_paths_with_colons_round_trip(dataset, tmp_path):
    """Index-less folders name episodes after their files, and 'run:1.npz' is a valid file name."""
    from worldsim.latents import build_cache, load_cached, load_frames, split_source

    folder = tmp_path / "a:b" / "dm"
    folder.mkdir(parents=True)
    for i, episode in enumerate(sorted((dataset / "episodes").glob("*.npz"))[:2]):
        with np.load(episode) as z:
            np.savez(folder / f"run:{i}.npz", video=z["video"], actions=z["actions"])
    frames = load_frames([str(folder)], "train", warn=lambda _: None)
    assert [split_source(s, [str(folder)]) for s in frames.sources] == [(str(folder), "run:0"), (str(folder), "run:1")]
    build_cache(tmp_path / "latents", str(folder), "train", "h" * 16, frames, _encode_red)
    store = load_cached(tmp_path / "latents", str(folder), "train", "h" * 16)
    assert store is not None and store.sources == frames.sources
    with pytest.raises(ValueError, match="none of the datasets"):
        split_source(f"{folder}:run:0", [str(tmp_path / "other")])


def test_far_init_continues_from_an_exported_checkpoint(trained, dataset, tmp_path, capsys, no_loss_plot):
    """--far-init: a new run starts from the shipped FAR weights (fresh optimizer, shape from the checkpoint)."""
    from safetensors.torch import load_file

    fast = [*FAST, "--preview-every", "-1"]  # no preview GIF: none is looked at here, and one never stops a run
    ck = tmp_path / "shipped"  # a shipped checkpoint carries its own sampling defaults
    shutil.copytree(trained / "checkpoint", ck)
    config = json.loads((ck / "config.json").read_text())
    config["sampler"] = {**config["sampler"], "steps": 3, "cfg": 1.0}
    (ck / "config.json").write_text(json.dumps(config))
    before = {k: v for k, v in load_file(str(ck / "model.safetensors")).items() if k.startswith("far.")}
    run = tmp_path / "cont"
    # lr 0: one step leaves the weights where they started, so the export must equal the checkpoint
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(run), *fast, "--ae-from", str(ck),
                 "--far-init", str(ck), "--far-steps", "1", "--far-lr", "0", "--warmup", "0"]) == 0
    assert "weights initialised from" in capsys.readouterr().err
    after = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # the fine-tune plays like the checkpoint it started from, not with the trainer's generic defaults
    exported = json.loads((run / "checkpoint" / "config.json").read_text())["sampler"]
    assert (exported["steps"], exported["cfg"], exported["generated_noise"]) == (3, 1.0, 0.0)
    # a model trained to see its own rollout frames noised to a level plays with that level
    labelled = tmp_path / "labelled"
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(labelled), *fast, "--ae-from", str(ck),
                 "--far-init", str(ck), "--far-steps", "1", "--obj-rollout-prob", "0.5", "--obj-rollout-aug", "0.15"]) == 0
    exported = json.loads((labelled / "checkpoint" / "config.json").read_text())["sampler"]
    assert (exported["steps"], exported["cfg"], exported["generated_noise"]) == (3, 1.0, 0.15)
    # resuming keeps them even when the starting checkpoint has since been moved away
    shutil.move(ck, tmp_path / "moved")
    assert main(["train", "--resume", str(run), "--far-steps", "2"]) == 0
    exported = json.loads((run / "checkpoint" / "config.json").read_text())["sampler"]
    assert (exported["steps"], exported["cfg"]) == (3, 1.0)
    shutil.move(tmp_path / "moved", ck)

    fresh = tmp_path / "fresh"  # the same run without --far-init starts elsewhere
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(fresh), *fast, "--ae-from", str(ck),
                 "--far-steps", "1", "--far-lr", "0", "--warmup", "0"]) == 0
    other = load_file(str(fresh / "checkpoint" / "model.safetensors"))
    assert not all(torch.equal(other[k], v) for k, v in before.items())
    assert json.loads((fresh / "checkpoint" / "config.json").read_text())["sampler"]["steps"] != 3

    capsys.readouterr()
    for i, shape in enumerate((["--far-width", "96", "--far-heads", "2"], ["--far-depth", "1"])):  # only deeper
        assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(tmp_path / f"bad{i}"), *fast,
                     "--ae-from", str(ck), "--far-init", str(ck), *shape, "--far-steps", "1"]) != 0
        assert "FAR settings differ" in capsys.readouterr().err
    # the context labels are learned with the weights: a continuation keeps them, and says so
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(tmp_path / "badlabel"), *fast,
                 "--ae-from", str(ck), "--far-init", str(ck), "--far-clean-t", "-0.5", "--far-steps", "1"]) != 0
    err = capsys.readouterr().err
    assert "clean_t must stay as the weights were trained with" in err and "drop --far-clean-t" in err
    # deeper: the given blocks keep their weights, the new one starts as an identity (zero adaLN)
    deep = tmp_path / "deep"
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(deep), *fast, "--ae-from", str(ck),
                 "--far-init", str(ck), "--far-depth", "3", "--far-steps", "1", "--far-lr", "0", "--warmup", "0"]) == 0
    assert "deepened from 2 to 3 blocks, new identity blocks at [0]" in capsys.readouterr().err
    grown = load_file(str(deep / "checkpoint" / "model.safetensors"))
    assert json.loads((deep / "checkpoint" / "config.json").read_text())["far"]["depth"] == 3
    assert all(torch.equal(grown[k.replace(f"far.blocks.{i}.", f"far.blocks.{i + 1}.")], v)
               for k, v in before.items() for i in (0, 1) if k.startswith(f"far.blocks.{i}."))
    assert not grown["far.blocks.0.adaLN.1.weight"].any()
    # another window (and memory span): the same weights, trained to see more (or fewer) frames finely
    wide = tmp_path / "wide"
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(wide), *fast, "--ae-from", str(ck),
                 "--far-init", str(ck), "--far-window", "6", "--far-memory-span", "20", "--far-steps", "1",
                 "--far-lr", "0", "--warmup", "0"]) == 0
    far_config = json.loads((wide / "checkpoint" / "config.json").read_text())["far"]
    assert far_config["window"] == 6 and far_config["memory_span"] == 20
    widened = load_file(str(wide / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(widened[k], v) for k, v in before.items())
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(tmp_path / "none"), *fast,
                 "--ae-from", str(ck), "--far-init", str(tmp_path), "--far-steps", "1"]) != 0
    assert "no exported checkpoint there" in capsys.readouterr().err


@pytest.mark.parametrize("native_bf16, expected", [(True, "ae fp32, far bf16"), (False, "fp32")])
def test_auto_precision_trains_the_transformer_in_bf16_on_cpus_that_have_it(dataset, tmp_path, capsys, monkeypatch,
                                                                              native_bf16, expected, no_loss_plot):
    """--precision auto (the default) on a CPU: bf16 autocast for the transformer stage where the
    CPU has native bf16, fp32 for the autoencoder and on other CPUs; the export says which."""
    import worldsim.world

    monkeypatch.setattr(worldsim.world, "cpu_has_native_bf16", lambda: native_bf16)
    run = tmp_path / "run"
    argv = ["train", "--data", str(dataset), "--out", str(run), "--preset", "tiny", "--threads", "1",
            "--progress", "false", "--ae-steps", "2", "--far-steps", "2", "--val-every", "2"]
    assert main(argv) == 0
    assert f"precision {expected} |" in capsys.readouterr().err
    far = "bf16" if native_bf16 else "fp32"
    assert f"precision {far}, EMA" in (run / "checkpoint" / "README.md").read_text()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_auto_precision_trains_in_fp32_where_inference_would_keep_only_its_cache_in_bf16(monkeypatch):
    """Inference's auto is bf16-kv on a CPU without native bf16 (fp32 weights, a bfloat16 KV cache),
    which training has none of: its transformer stage trained in fp32 there but said "far bf16-kv" in
    its log line, the checkpoint's model card and the export's summary."""
    import worldsim.world
    from worldsim.train import stage_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(worldsim.world, "cpu_has_native_bf16", lambda: False)
    assert stage_precision("auto", cpu, "far") == stage_precision("auto", cpu, "ae") == "fp32"
    monkeypatch.setattr(worldsim.world, "cpu_has_native_bf16", lambda: True)
    assert (stage_precision("auto", cpu, "far"), stage_precision("auto", cpu, "ae")) == ("bf16", "fp32")
    assert stage_precision("bf16", cpu, "ae") == "bf16" and stage_precision("fp32", cpu, "far") == "fp32"


def test_a_run_that_failed_before_its_first_step_can_be_started_again(dataset, tmp_path, capsys):
    """Bad --data leaves only config.json behind; the corrected command starts there, while a
    folder with real progress in it is still refused."""
    val_only = tmp_path / "val-only"
    assert main([*RECORD[:2], "1", *RECORD[3:], "--split", "val", "--out", str(val_only)]) == 0
    run = tmp_path / "run"
    assert main(["train", "--stage", "ae", "--data", str(val_only), "--out", str(run), *FAST, "--ae-steps", "1"]) == 2
    assert "no training frames" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.json"]
    assert main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(run), *FAST, "--ae-steps", "1"]) == 0
    assert (run / "autoencoder" / "config.json").is_file()
    capsys.readouterr()
    assert main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(run), *FAST, "--ae-steps", "1"]) == 2
    assert "already holds a training run" in capsys.readouterr().err


def test_a_far_run_that_failed_after_copying_its_autoencoder_can_be_started_again(trained, dataset, tmp_path, capsys,
                                                                                  no_loss_plot):
    """With --ae-from, a transformer run copies that autoencoder in before it reads the data; when
    the data then fails, the corrected command (same --ae-from) starts there instead of being
    told the folder holds a training run."""
    val_only = tmp_path / "val-only"
    assert main([*RECORD[:2], "1", *RECORD[3:], "--split", "val", "--out", str(val_only)]) == 0
    run, ae_from = tmp_path / "run", str(trained / "checkpoint")
    far = ["train", "--stage", "far", "--out", str(run), *FAST, "--ae-from", ae_from, "--far-steps", "1"]
    capsys.readouterr()
    assert main([*far, "--data", str(val_only)]) == 2
    assert "no train" in capsys.readouterr().err
    assert (run / "autoencoder" / "config.json").is_file()
    assert main([*far, "--data", str(dataset)]) == 0
    assert (run / "checkpoint" / "model.safetensors").is_file()


def test_the_run_folders_a_user_shares_read_like_any_folder(trained):
    """The exported checkpoint and the autoencoder are not left with mkdtemp's 0700."""
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("checkpoint", "autoencoder", "state"):
        assert stat.S_IMODE((trained / name).stat().st_mode) == 0o777 & ~mask, name
        for file in (trained / name).iterdir():  # the weights too: safetensors creates its files 0600
            assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file


def test_values_no_run_can_use_are_refused_before_anything_is_written(trained, dataset, tmp_path, capsys):
    """Zero batches or sequence lengths, negative rates: named errors, not tracebacks after the
    autoencoder stage; on --resume the bad override is not stored in the run's config."""
    run = tmp_path / "bad"
    for extra, message in ((["--far-batch", "0"], "--far-batch must be >= 1, got 0"),
                           (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
                           (["--ae-lr", "-1"], "--ae-lr must be a number from 0 to 1 (AdamW moves each weight by about "
                                            "the rate every step), got -1.0"),
                           (["--threads", "-1"], "--threads must be >= 1, got -1"),
                           (["--ddp-timeout", "0"], "--ddp-timeout must be a finite number > 0, got 0.0"),
                           # these trained silently on nothing (one frame), or failed in the optimizer with a traceback
                           (["--seq-len", "1"], "--seq-len must be >= 2 for the far stage"),
                           (["--beta2", "1.2"], "--beta1 and --beta2 must be in [0, 1), got 0.9 and 1.2"),
                           (["--obj-context-noise-max", "-1"], "context_noise_max must be in [0, 1], got -1.0"),
                           (["--obj-t-std", "0"], "t_std must be a finite number > 0, got 0.0"),
                           (["--obj-t-mean", "inf"], "t_mean must be a finite number, got inf"),
                           (["--obj-self-context-level", "1.5"], "self_context_level must be in [0, 1], got 1.5"),
                           # the far stage then stopped with "train stage ae first (--stage both / ae)"
                           (["--ae-steps", "0"], "--ae-steps 0 trains no autoencoder for the far stage"),
                           # an overflow traceback after config.json was written; -1 was taken
                           (["--seed", "18446744073709551616"], "--seed must be from 0 to 2**32 - 1"),
                           (["--seed", "-1"], "--seed must be from 0 to 2**32 - 1, got -1"),
                           # its steps' seeds and torch's kept the low 32 bits: the run of --seed 0, exactly
                           (["--seed", str(2**32)], "--seed must be from 0 to 2**32 - 1, got 4294967296"),
                           # these crashed mid-run (a conv channel mismatch, a zero division, math's domain error)
                           (["--ae-in-channels", "1"], "in_channels must be 3 (RGB frames), got 1"),
                           (["--ae-channels", "8", "0", "16", "16"], "channels must each be >= 1, got [8, 0, 16, 16]"),
                           (["--ae-down-factor", "0"], "down_factor must be >= 1, got 0"),
                           # options these samples can never use trained exactly as without them
                           (["--seq-len", "4", "--obj-blind-window-prob", "0.5"], "it needs samples longer than the window"),
                           (["--seq-len", "2", "--obj-rollout-prob", "0.5"], "it needs --seq-len >= 3")):
        assert main(["train", "--data", str(dataset), "--out", str(run), *FAST, *extra]) == 2, extra
        assert message in capsys.readouterr().err
        assert not run.exists()
    stored = (trained / "config.json").read_text()
    assert main(["train", "--resume", str(trained), "--far-batch", "0"]) == 2
    assert "--far-batch must be >= 1" in capsys.readouterr().err
    assert main(["train", "--resume", str(trained), "--beta2", "1.2"]) == 2  # stored, it failed every later resume
    assert "--beta1 and --beta2 must be in [0, 1)" in capsys.readouterr().err
    assert main(["train", "--resume", str(trained), "--preset", "small"]) == 2  # it would only relabel the run
    assert "--preset cannot change on resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(trained), "--seed", str(2**32)]) == 2  # a new seed: a new run's check
    assert "--seed must be from 0 to 2**32 - 1, got 4294967296" in capsys.readouterr().err
    assert (trained / "config.json").read_text() == stored
    # a decoder fine-tune with the default stage (both) would train a new transformer over its result
    assert main(["train", "--data", str(dataset), "--out", str(run), *FAST, "--ae-init", str(trained / "checkpoint"),
                 "--ae-train", "decoder"]) == 2
    assert "give --stage ae" in capsys.readouterr().err and not run.exists()


def test_a_sequence_longer_than_every_episode_is_refused_before_the_autoencoder_stage(dataset, tmp_path, capsys):
    run = tmp_path / "long"
    assert main(["train", "--data", str(dataset), "--out", str(run), *FAST, "--seq-len", "50"]) == 2
    assert "no train episode has --seq-len 50 frames (longest: 12)" in capsys.readouterr().err
    assert not (run / "autoencoder").exists()
    assert main(["train", "--data", str(dataset), "--out", str(run), *FAST, "--seq-len", "8", "--ae-steps", "1",
                 "--far-steps", "1"]) == 0  # the corrected command, in the same folder


def test_a_time_limited_autoencoder_stage_reports_the_steps_it_made(dataset, tmp_path, step_clock, no_loss_plot):
    step_clock(0.25)  # a 1 s limit: 4 steps
    run = tmp_path / "limited"
    assert main(["train", "--data", str(dataset), "--out", str(run), *FAST, "--ae-steps", "100000",
                 "--ae-time-limit", "1", "--far-steps", "1", "--val-every", "0"]) == 0
    made = json.loads((run / "autoencoder" / "config.json").read_text())["step"]
    assert made == 4
    assert json.loads((run / "checkpoint" / "config.json").read_text())["data"]["ae_steps"] == made
    assert f"{made:,} autoencoder steps" in (run / "checkpoint" / "README.md").read_text()


def test_a_save_before_the_first_metrics_line_does_not_report_a_failed_plot(dataset, tmp_path, capsys):
    run = tmp_path / "early-save"
    assert main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(run), *FAST, "--ae-steps", "2",
                 "--checkpoint-every", "1", "--log-every", "10", "--val-every", "0"]) == 0
    assert "loss plot failed" not in capsys.readouterr().err
    assert (run / "loss.png").is_file()  # drawn once the run's lines exist


def test_a_run_draws_loss_png_once_per_save_and_not_again_at_its_end(dataset, tmp_path, monkeypatch):
    """The end of every run drew loss.png a second time from the rows its last save had just drawn
    (matplotlib: most of a tiny run's time). A resume's new rows draw again."""
    import worldsim.train as train_mod

    drawn = []
    real = train_mod.plot_metrics
    monkeypatch.setattr(train_mod, "plot_metrics", lambda *a, **k: (drawn.append(1), real(*a, **k))[1])
    run = tmp_path / "plots"
    assert main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(run), *FAST, "--ae-steps", "2",
                 "--checkpoint-every", "1", "--log-every", "1", "--val-every", "0", "--preview-every", "-1"]) == 0
    assert len(drawn) == 2 and (run / "loss.png").is_file()  # one per save; none at the end
    png = (run / "loss.png").read_bytes()
    assert main(["train", "--resume", str(run), "--ae-steps", "3", "--progress", "false"]) == 0
    assert len(drawn) == 3 and (run / "loss.png").read_bytes() != png  # step 3's save, its row on the plot


def test_model_options_do_not_take_the_word_none(dataset, tmp_path, capsys):
    """None in --far-*/--ae-*/--obj-* only means "not given: the preset's"; typed, it used to reach
    the model (--obj-t-mean none failed after the whole autoencoder stage)."""
    with pytest.raises(SystemExit):
        main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), *FAST, "--obj-t-mean", "none"])
    assert "invalid float value: 'none'" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(dataset, tmp_path, capsys):
    run = tmp_path / "nodevice"
    for device, message in (("nonsense", "device 'nonsense' is not a torch device"),
                            ("cuda:7", "device 'cuda:7': ")):
        assert main(["train", "--data", str(dataset), "--out", str(run), *FAST, "--device", device]) == 2
        assert message in capsys.readouterr().err and not run.exists()


def test_damaged_autoencoders_and_checkpoints_given_to_a_run_are_one_line(trained, dataset, tmp_path, capsys):
    """--ae-from a torn checkpoint, or an autoencoder folder whose weights are not the ones its
    config.json records, or whose config.json is empty: one line naming the folder, nothing written."""
    from safetensors.torch import load_file, save_file

    torn = tmp_path / "torn"
    shutil.copytree(trained / "checkpoint", torn)
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    foreign = tmp_path / "foreign-ae"
    shutil.copytree(trained / "autoencoder", foreign)
    tensors = load_file(str(foreign / "autoencoder.safetensors"))
    tensors["latent_scale"] = tensors["latent_scale"] * 2
    save_file(tensors, str(foreign / "autoencoder.safetensors"))
    empty = tmp_path / "empty-ae"
    shutil.copytree(trained / "autoencoder", empty)
    (empty / "config.json").write_text("")
    for source, message in ((torn, f"checkpoint {torn}: model.safetensors has"),
                            (foreign, "its tensors are not those config.json records"),
                            (empty, f"{empty / 'config.json'}: unreadable")):
        run = tmp_path / f"from-{source.name}"
        assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(run), *FAST,
                     "--ae-from", str(source), "--far-steps", "1"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_a_damaged_training_state_is_named_on_resume(trained, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    assert main(["train", "--resume", str(trained / "checkpoint")]) == 2
    assert "an exported checkpoint, not a training run" in capsys.readouterr().err
    for damage, message in (("no optimizer", "damaged training state ('optimizer' must be dict"),
                            ("one moment lost", "lack Adam's moments")):
        run = tmp_path / damage.replace(" ", "-")
        shutil.copytree(trained, run)
        state = run / "state"
        if damage == "no optimizer":
            meta = json.loads((state / "state.json").read_text())
            del meta["optimizer"]
            (state / "state.json").write_text(json.dumps(meta))
        else:
            tensors = load_file(str(state / "weights.safetensors"))
            del tensors[next(k for k in sorted(tensors) if k.startswith("optim.state.") and k.endswith(".exp_avg"))]
            save_file(tensors, str(state / "weights.safetensors"))
        assert main(["train", "--resume", str(run), "--far-steps", "5"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    # the autoencoder's config.json of the run: an AttributeError or JSONDecodeError traceback before
    for text, message in (("[1, 2]", "not a JSON object"), ("{torn", "unreadable"),
                          ('{"step": "many"}', "step must be an integer >= 0, got 'many'")):
        run = tmp_path / "ae-config"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(trained, run)
        (run / "autoencoder" / "config.json").write_text(text)
        assert main(["train", "--resume", str(run), "--far-steps", "5"]) != 0
        err = capsys.readouterr().err
        assert f"{run / 'autoencoder' / 'config.json'}: {message}" in err, err


def test_a_metrics_line_torn_by_a_full_disk_does_not_block_the_resume(trained, tmp_path, capsys, no_loss_plot):
    """A full disk or a kill can leave half a line at the end of metrics.jsonl; --resume drops it
    (the state is saved separately) instead of failing there on every try."""
    run = tmp_path / "torn"
    shutil.copytree(trained, run)
    good = (run / "metrics.jsonl").read_text()
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"stage": "far", "step": 3, "lo')
    assert main(["train", "--resume", str(run), "--far-steps", "5"]) == 0, capsys.readouterr().err
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(x) for x in lines) and lines[:len(good.splitlines())] == good.splitlines()
    assert max(json.loads(x).get("step", 0) for x in lines if '"far"' in x) == 5
    # a whole last line that lost only its newline gets it back, rather than the next record joining it
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().rstrip("\n"))
    assert main(["train", "--resume", str(run), "--far-steps", "6"]) == 0, capsys.readouterr().err
    assert all(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())
    # a bad line in the middle is the user's to look at: named, with the run's state untouched
    (run / "metrics.jsonl").write_text(good.replace("\n", "\n{oops\n", 1))
    before = (run / "state" / "state.json").read_text()
    assert main(["train", "--resume", str(run), "--far-steps", "7"]) == 2
    assert "metrics.jsonl: line 2 is not JSON" in capsys.readouterr().err
    assert (run / "state" / "state.json").read_text() == before


def test_a_stage_killed_before_its_first_save_logs_its_steps_once_after_resume(dataset, tmp_path, monkeypatch,
                                                                               capsys, no_loss_plot):
    """Bug: a far stage killed (a crash, SIGKILL) before its first save left its rows in metrics.jsonl;
    --resume trained it again from step 0 and appended the same steps again (loss.png drew both)."""
    import worldsim.train as train_mod

    run = tmp_path / "killed"
    real = train_mod.lr_at

    def crash_at_far_step_5(step, total, *args, **kwargs):
        if total == 8 and step == 5:
            raise RuntimeError("killed")
        return real(step, total, *args, **kwargs)

    monkeypatch.setattr(train_mod, "lr_at", crash_at_far_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        main(["train", "--data", str(dataset), "--out", str(run), *FAST, "--ae-steps", "3", "--far-steps", "8",
              "--checkpoint-every", "100", "--val-every", "2", "--log-every", "1", "--preview-every", "-1"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "far" for r in rows)  # the killed stage had logged, so the check can fail
    monkeypatch.setattr(train_mod, "lr_at", real)
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["stage"], r["step"], "val_loss" in r) for r in rows]
    assert len(keys) == len(set(keys)), keys
    assert {k for k in keys if k[0] == "ae"} and max(r["step"] for r in rows if r["stage"] == "far") == 8


def test_previews_come_every_preview_every_steps_not_only_at_checkpoint_saves(trained, dataset, tmp_path, capsys,
                                                                              no_loss_plot):
    """Bug: a preview was drawn only when a checkpoint save fell on a multiple of --preview-every (the
    base preset's 2,000 / 5,000 previewed every 10,000 steps)."""
    run = tmp_path / "previews"
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(run), *FAST, "--ae-from", str(trained),
                 "--far-steps", "6", "--checkpoint-every", "5", "--preview-every", "2", "--val-every", "0"]) == 0, \
        capsys.readouterr().err
    assert sorted(p.name for p in (run / "preview").glob("*.gif")) == \
        ["step-000002.gif", "step-000004.gif", "step-000006.gif"]


def test_a_preview_on_a_full_disk_names_its_file_and_leaves_no_temp_file(trained, dataset, tmp_path, full_disk,
                                                                         unraisable, capsys):
    """A failed preview left its temp file (`.step-N.gif.tmp.gif`, one per failed step), logged "preview
    failed: OSError: [Errno 28] No space left on device" without the file, and imageio's GIF writer
    printed an "Exception ignored in: PluginV3.__del__" traceback. The training goes on."""
    run = tmp_path / "full"
    full_disk(run / "preview")
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(run), *FAST, "--ae-from", str(trained),
                 "--far-steps", "2", "--checkpoint-every", "1", "--preview-every", "1", "--val-every", "0"]) == 0
    gc.collect()
    err = capsys.readouterr().err
    for step in (1, 2):
        gif = run / "preview" / f"step-00000{step}.gif"
        assert f"preview failed: OSError: [Errno 28] No space left on device: '{gif}'" in err, err
    assert "Traceback" not in err and unraisable == []
    assert list((run / "preview").iterdir()) == []


def test_preview_gif_captions_its_panels_and_frames(trained, dataset, tmp_path):
    """The preview showed two uncaptioned panels: nothing said which was the recording and which the
    model, and during the context both showed the ground truth (only thin blue / red bars told them apart)."""
    from PIL import Image

    from worldsim.dataset import Dataset
    from worldsim.train import write_preview

    ep = Dataset(dataset)[0]
    gif = tmp_path / "p.gif"
    write_preview(trained / "checkpoint", ep.video, ep.actions, 3, 2, gif)
    frames = []
    with Image.open(gif) as im:
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
    scale = 128 // ep.video.shape[1]
    h, w = ep.video.shape[1] * scale, (2 * ep.video.shape[2] + 2) * scale
    assert len(frames) == 5 and frames[0].shape[:2] == (h + 2 * 14, w)  # a caption strip above and below
    panel = w // 2
    header = [f[:14] for f in frames]
    footer = [f[-14:] for f in frames]
    ink = [f.max(-1) > 100 for f in header]  # text pixels (GIF palettes shift colours a little per frame)
    assert all(m[:, :panel].any() and m[:, panel:].any() for m in ink)  # both panels captioned
    assert np.array_equal(ink[0][:, :panel], ink[4][:, :panel])  # "ground truth" throughout
    assert not np.array_equal(ink[2][:, panel:], ink[3][:, panel:])  # "context (given)" -> "generated"
    assert len({(f.max(-1) > 100).tobytes() for f in footer}) == 5  # the frame number changes every frame
    assert tuple(header[0][:, panel:].reshape(-1, 3).max(0)) < (64, 255, 256)  # context caption in blue
    assert header[4][:, panel:, 0].max() > 200 and header[4][:, panel:, 2].max() < 128  # generated in red


def test_a_preview_sweeps_the_temp_twins_of_earlier_previews_that_a_kill_cut(trained, dataset, tmp_path):
    """A SIGKILL while step 20's preview was written left `preview/.step-000020.gif.<random>.tmp.gif`: the
    state of step 20 was already saved, so the resume never wrote that preview again and nothing removed it."""
    from worldsim.dataset import Dataset
    from worldsim.train import write_preview

    ep = Dataset(dataset)[0]
    preview = tmp_path / "preview"
    preview.mkdir()
    (preview / ".step-000020.gif.k1ll3d00.tmp.gif").write_bytes(b"GIF89a half")  # no writer holds it
    (preview / "step-000020.gif").write_bytes(b"GIF89a older")
    write_preview(trained / "checkpoint", ep.video, ep.actions, 3, 2, preview / "step-000040.gif")
    assert sorted(p.name for p in preview.iterdir()) == ["step-000020.gif", "step-000040.gif"]


def test_a_loss_plot_that_cannot_be_saved_names_loss_png_and_leaves_no_temp_file(trained, tmp_path, monkeypatch):
    """It was saved under a fixed temp name and renamed: a failed save left `.loss.png.tmp.png`."""
    import matplotlib.figure

    from worldsim.train import plot_metrics

    shutil.copy(trained / "metrics.jsonl", tmp_path / "metrics.jsonl")

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(OSError) as err:
        plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert err.value.filename == str(tmp_path / "loss.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_loss_plot_labels_its_log_axis_in_plain_numbers():
    """loss.png labelled a FAR loss between 1.3 and 2 as 1.3 x 10^0 .. 2 x 10^0 (and 6 x 10^-1 for the
    autoencoder): the log scale's scientific notation on every tick of a range inside one decade."""
    import matplotlib.pyplot as plt

    from worldsim.train import loss_figure

    rows = [{"stage": "ae", "step": s, "loss": 0.65 - 0.005 * s} for s in range(5, 65, 5)]
    rows += [{"stage": "far", "step": s, "loss": 2.0 - 0.004 * s} for s in range(5, 155, 5)]
    rows += [{"stage": "far", "step": s, "val_loss": 1.9 - 0.003 * s} for s in (20, 80, 150)]
    rows += [{"stage": "far", "step": 200 + s, "loss": 10.0 ** (-s / 100)} for s in range(0, 300, 10)]  # 3 decades
    fig = loss_figure(rows)
    try:
        fig.canvas.draw()
        for ax in fig.axes:
            assert ax.get_yscale() == "log"
            labels = [t.get_text() for t in ax.get_yticklabels(minor=False) + ax.get_yticklabels(minor=True)]
            shown = [t for t in labels if t]
            assert len(shown) >= 2, labels
            assert all("10^" not in t and "times" not in t for t in shown), labels
            assert all(float(t) > 0 for t in shown), labels  # plain numbers
        legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
        assert legends[1] == ["train", "train (mean of 2 logged steps)", "val (EMA)"], legends
    finally:
        plt.close(fig)


def test_a_resume_that_stretches_the_schedule_says_the_learning_rate_rises(trained, dataset, tmp_path, capsys,
                                                                           no_loss_plot):
    """--resume with far more steps (or the time limit set to 0, which the "time limit reached" message
    suggests) put the learning rate from its floor back near its peak without a word."""
    import worldsim.train as train_mod

    # a resume of the same schedule says nothing, even in its warm-up (where the rate still climbs)
    warm = tmp_path / "warm"
    real = train_mod.lr_at

    def crash_at_step_5(step, total, *args, **kwargs):
        if step == 5:
            raise RuntimeError("killed")
        return real(step, total, *args, **kwargs)

    train_mod.lr_at = crash_at_step_5
    try:
        with pytest.raises(RuntimeError, match="killed"):
            main(["train", "--stage", "far", "--data", str(dataset), "--out", str(warm), *FAST, "--ae-from",
                  str(trained), "--far-steps", "8", "--warmup", "20", "--checkpoint-every", "3", "--log-every", "2",
                  "--val-every", "0"])
    finally:
        train_mod.lr_at = real
    capsys.readouterr()
    assert main(["train", "--resume", str(warm)]) == 0
    assert "the learning rate rises" not in capsys.readouterr().err

    run = tmp_path / "longer"
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(run), *FAST, "--ae-from", str(trained),
                 "--far-steps", "4", "--warmup", "0", "--log-every", "1", "--val-every", "0"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--far-steps", "5"]) == 0  # one more: below its last step's rate
    assert "the learning rate rises" not in capsys.readouterr().err
    # 10 steps: the rate at step 5 (about 0.55 of the peak) is more than 1.5x the saved schedule's last one
    # (its step 4 of 5: 0.19), as 40 or any more steps would be
    assert main(["train", "--resume", str(run), "--far-steps", "10"]) == 0
    err = capsys.readouterr().err
    assert "note: far: the learning rate rises from" in err and "the schedule now spans 10 steps" in err


def test_a_resume_that_changes_the_validation_batches_says_so(trained, dataset, tmp_path, capsys, no_loss_plot):
    """The far stage's fixed validation batches are drawn with --seq-len, --far-batch, --val-batches
    and --seed (the autoencoder's with --ae-batch, --val-batches and --seed): a resume that changed one
    put a step into the val curve that no training made."""
    run = tmp_path / "val"
    shutil.copytree(trained, run)
    seq_len = json.loads((run / "config.json").read_text())["train"]["seq_len"]
    assert main(["train", "--resume", str(run), "--far-steps", "4"]) == 0
    assert "validation batches" not in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--far-steps", "5", "--seq-len", str(seq_len - 1)]) == 0
    assert (f"note: --seq-len {seq_len - 1} (it had {seq_len}) changes the far stage's validation batches: its val "
            "loss from here on is not comparable") in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--far-steps", "6"]) == 0  # recorded: said once
    assert "validation batches" not in capsys.readouterr().err
    ae_run = tmp_path / "ae"  # the autoencoder stage's are drawn with --ae-batch, --val-batches and --seed
    assert main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(ae_run), *FAST, "--ae-steps", "2",
                 "--val-every", "1"]) == 0
    ae_batch = json.loads((ae_run / "config.json").read_text())["train"]["ae_batch"]
    capsys.readouterr()
    assert main(["train", "--resume", str(ae_run), "--ae-steps", "3", "--ae-batch", str(ae_batch + 1)]) == 0
    assert (f"note: --ae-batch {ae_batch + 1} (it had {ae_batch}) changes the autoencoder stage's validation "
            "batches") in capsys.readouterr().err


def test_a_finished_autoencoder_stage_left_by_a_resume_says_nothing_of_its_validation_batches(dataset, tmp_path,
                                                                                              capsys, no_loss_plot):
    """The autoencoder stage's val batches matter to a resume only while that stage trains on: one that
    goes on to the far stage (--stage far), or has no --ae-steps left, adds no autoencoder val point,
    so a changed --seed / --val-batches there must not say the curve is not comparable."""
    run = tmp_path / "ae_done"
    assert main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(run), *FAST, "--ae-steps", "2",
                 "--val-every", "1"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--stage", "ae", "--ae-steps", "2", "--val-batches", "2"]) == 0
    assert "validation batches" not in capsys.readouterr().err  # nothing trains: no val point
    assert main(["train", "--resume", str(run), "--stage", "far", "--far-steps", "1", "--seed", "5",
                 "--val-every", "0", "--preview-every", "-1"]) == 0
    err = capsys.readouterr().err
    assert "validation batches" not in err, err


def test_fewer_steps_on_resume_say_that_nothing_trains(trained, tmp_path, capsys, no_loss_plot):
    run = tmp_path / "past"
    shutil.copytree(trained, run)
    assert main(["train", "--resume", str(run), "--far-steps", "2"]) == 0
    assert "far: stopped at step 3, already past the 2 steps now asked for; nothing more to train" in \
        capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    # more autoencoder steps once the transformer trains on its latents: recorded, and nothing trained
    assert main(["train", "--resume", str(run), "--ae-steps", str(config["train"]["ae_steps"] + 4)]) == 2
    assert "so that autoencoder is fixed now and --ae-steps" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--ae-lr", "0.5"]) == 2  # its siblings too
    assert "so that autoencoder is fixed now and --ae-lr 0.5 (it had " in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text()) == config
    assert main(["train", "--resume", str(run), "--ae-steps", str(config["train"]["ae_steps"])]) == 0  # the same: fine
    capsys.readouterr()
    config["train"]["far_batch"] = "two"  # hand-edited: named with its file, not a bare TypeError
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(run)]) == 2
    assert f"{run / 'config.json'}: unreadable training config (train.far_batch must be an integer, got 'two')" in \
        capsys.readouterr().err
    config["train"]["far_batch"] = 2.5  # this one used to fail mid-run with a traceback
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(run)]) == 2
    assert "train.far_batch must be an integer, got 2.5" in capsys.readouterr().err
    config["train"]["far_batch"] = 2
    stored = json.dumps(config)
    # the model's sections too: these resumed with the default window (and exported it), failed in the
    # model's build with a traceback after the latents were encoded, or read a path letter by letter
    for section, key, value, message in (
            ("far", "window", None, "far lacks 'window'"),
            ("far", "depth", 2.0, "far.depth must be an integer, got 2.0"),
            ("autoencoder", "latent_channels", 4.0, "autoencoder.latent_channels must be an integer, got 4.0"),
            ("train", "stage", "xyz", "train.stage must be one of 'ae', 'far', 'both', got 'xyz'"),
            ("train", "data", "/tmp/data", "train.data must be a list of strings, got '/tmp/data'"),
            ("objective", "t_std", "1", "objective.t_std must be a number, got '1'")):
        edited = json.loads(stored)
        if value is None:
            del edited[section][key]
        else:
            edited[section][key] = value
        (run / "config.json").write_text(json.dumps(edited))
        assert main(["train", "--resume", str(run)]) == 2, key
        assert f"unreadable training config ({message}" in capsys.readouterr().err
    # what a run of an older version lacks resumes: options added since, and the model keys of old runs
    edited = json.loads(stored)
    for section, key in (("train", "far_save_dtype"), ("far", "memory_span"), ("far", "clean_t"),
                         ("far", "long_context_t"), ("autoencoder", "decoder_blocks_per_level")):
        del edited[section][key]
    (run / "config.json").write_text(json.dumps(edited))
    assert main(["train", "--resume", str(run)]) == 0


def test_metrics_that_cannot_be_appended_name_the_file(trained, tmp_path, capsys, no_loss_plot):
    """A full disk (here: the log path taken by a folder) stops the run with the file named, not a bare
    OS error, and the saved state stays resumable."""
    run = tmp_path / "unwritable"
    shutil.copytree(trained, run)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    assert main(["train", "--resume", str(run), "--far-steps", "5", "--log-every", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'metrics.jsonl'}: cannot append the metrics" in err and "Traceback" not in err
    (run / "metrics.jsonl").rmdir()
    assert main(["train", "--resume", str(run), "--far-steps", "5"]) == 0


def test_a_stage_that_leaves_out_the_saved_one_is_refused_on_resume(trained, dataset, tmp_path, capsys, step_clock,
                                                                    no_loss_plot):
    """--stage ae on a run saved in the far stage trained nothing (and stored stage ae for good);
    --stage far on an unfinished autoencoder stage dropped it. A finished one, or one its time limit
    ended, goes on to the far stage, and a torn metrics line left by the first stage is mended."""
    run = tmp_path / "staged"
    shutil.copytree(trained, run)
    stored = (run / "config.json").read_text()
    assert main(["train", "--resume", str(run), "--stage", "ae", "--far-steps", "5"]) == 2
    assert "saved state is in the far stage" in capsys.readouterr().err
    assert (run / "config.json").read_text() == stored

    ae_run = tmp_path / "ae-only"
    assert main(["train", "--data", str(dataset), "--out", str(ae_run), *FAST, "--stage", "ae", "--ae-steps", "2"]) == 0
    unfinished = tmp_path / "ae-killed"  # as a kill after the checkpoint of step 2 of 4 leaves it
    shutil.copytree(ae_run, unfinished)
    meta = json.loads((unfinished / "state" / "state.json").read_text())
    meta.update(finished=False, total_steps=4)
    (unfinished / "state" / "state.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["train", "--resume", str(unfinished), "--stage", "far", "--far-steps", "1"]) == 2
    assert "autoencoder stage is unfinished (step 2 of 4)" in capsys.readouterr().err
    timed = tmp_path / "ae-timed"  # the same state, its stage ended by --ae-time-limit: done
    step_clock(0.5)  # a 1 s limit: 2 steps of the 50
    assert main(["train", "--data", str(dataset), "--out", str(timed), *FAST, "--stage", "ae", "--ae-steps", "50",
                 "--ae-time-limit", "1"]) == 0
    meta = json.loads((timed / "state" / "state.json").read_text())
    assert (meta["step"], meta["total_steps"], meta["finished"], meta["seconds"]) == (2, 50, False, 1.0)
    with open(ae_run / "metrics.jsonl", "a") as fh:
        fh.write('{"stage": "ae", "step": 9, "lo')
    for finished in (ae_run, timed):
        assert main(["train", "--resume", str(finished), "--stage", "far", "--far-steps", "2",
                     "--checkpoint-every", "1"]) == 0, capsys.readouterr().err
        assert (finished / "checkpoint" / "config.json").is_file()
        assert all(json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines())


def test_an_out_folder_that_is_not_a_run_is_named_and_its_files_kept(dataset, tmp_path, capsys):
    """A folder of something else is not "a training run" to resume, and a config.json of the
    user's there is not replaced."""
    other = tmp_path / "notes"
    other.mkdir()
    (other / "config.json").write_text('{"hello": 1}')
    assert main(["train", "--data", str(dataset), "--out", str(other), *FAST, "--ae-steps", "1", "--far-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "exists and is not a worldsim run folder (it holds config.json)" in err and "--resume" not in err
    assert (other / "config.json").read_text() == '{"hello": 1}'


def test_training_on_streamed_episodes_exports_a_world_model(trained, tmp_path, capsys, no_loss_plot):
    """--stream-env: background workers record fresh train-split episodes that training samples;
    the spool is removed at the end and the checkpoint says where its data came from."""
    from worldsim.checkpoint import load_checkpoint

    out = tmp_path / "stream"
    assert main(["train", "--stream-env", "worldsim/Maze-v0", "--stream-env-arg", "resolution=32", "maze_size=7",
                 "--ae-from", str(trained / "checkpoint"), "--out", str(out), *FAST, "--far-steps", "2",
                 "--seq-len", "8", "--stream-length", "16", "--stream-buffer", "2", "--val-every", "0"]) == 0
    assert "recording worldsim/Maze-v0 episodes" in capsys.readouterr().err
    ck = load_checkpoint(out / "checkpoint")
    data = ck.config["data"]
    assert data["stream_env"] == "worldsim/Maze-v0" and data["train_episodes"] >= 2 and data["far_step"] == 2
    assert not (out / "stream").exists()
    # a streaming run started beside --data (taken, never read, before that was refused) still resumes
    config = json.loads((out / "config.json").read_text())
    config["train"]["data"] = [str(out / "never-read")]
    (out / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(out), "--far-steps", "3"]) == 0, capsys.readouterr().err
    assert "its --data" in capsys.readouterr().err and load_checkpoint(out / "checkpoint").step == 3


def test_a_stream_worker_that_stops_mid_run_is_restarted_and_one_that_keeps_stopping_ends_the_run(
        trained, tmp_path, capsys, monkeypatch, no_loss_plot):
    """A recording worker killed mid-run (the out-of-memory killer) went unnoticed: training ran to
    the end on the few buffered episodes and exited 0. The checkpoint also said it trained on the
    buffer's first fill (2 episodes), not on what it streamed. And each spawned worker imported torch,
    which it never calls (seconds at every start and restart, ~190 MiB each): its function was in
    worldsim.train."""
    import signal

    from worldsim import train as train_mod

    real = train_mod.StreamingData._restart_stopped_workers
    seen = {}

    def kill_one_at_step_2(self, step):
        if step == 2:
            if sys.platform.startswith("linux"):  # the libraries the worker has loaded by now
                seen["maps"] = Path(f"/proc/{self.procs[0].pid}/maps").read_text()
            os.kill(self.procs[0].pid, signal.SIGKILL)
            self.procs[0].join(timeout=10)
        seen["episodes"] = self.episodes_seen
        return real(self, step)

    monkeypatch.setattr(train_mod.StreamingData, "_restart_stopped_workers", kill_one_at_step_2)
    args = ["--stream-env", "worldsim/Maze-v0", "--stream-env-arg", "resolution=32", "maze_size=7",
            "--ae-from", str(trained / "checkpoint"), *FAST, "--seq-len", "8", "--stream-length", "16",
            "--stream-buffer", "2", "--val-every", "0"]
    out = tmp_path / "restarted"
    assert main(["train", *args, "--out", str(out), "--far-steps", "4"]) == 0
    assert "stream: recording worker 0 stopped (exit code -9); starting it again (restart 1 of 3)" in \
        capsys.readouterr().err
    from worldsim.checkpoint import read_config

    assert read_config(out / "checkpoint")["data"]["train_episodes"] == seen["episodes"] >= 2
    assert "libtorch" not in seen.get("maps", ""), "the recording worker loaded torch"
    monkeypatch.setattr(train_mod, "STREAM_RESTARTS", 0)
    out = tmp_path / "stopped"
    assert main(["train", *args, "--out", str(out), "--far-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "stream: recording worker 0 stopped 1 time, the last with exit code -9" in err
    assert f"continue with --resume {out}" in err


def test_a_second_train_in_a_folder_being_trained_in_is_refused(trained, tmp_path, capsys, no_loss_plot):
    """Two resumes of one run (two terminals) both wrote its state, metrics and checkpoint."""
    import fcntl

    run = tmp_path / "busy"
    shutil.copytree(trained, run)
    stored = (run / "config.json").read_text()
    with open(run / ".lock", "a") as held:  # what the other `worldsim train` holds while it trains
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["train", "--resume", str(run), "--far-steps", "5"]) == 2
        assert f"{run}: another `worldsim train` is training in this folder" in capsys.readouterr().err
    assert (run / "config.json").read_text() == stored
    assert main(["train", "--resume", str(run), "--far-steps", "4"]) == 0  # free again: it trains


def test_runs_from_before_this_sessions_checks_still_resume(trained, tmp_path, capsys, no_loss_plot):
    """A negative seed (or one from 2**32 on) and --stream-env-arg without --stream-env are refused for
    new runs now; a run that recorded them before still resumes (the second with its dead setting dropped, and said so).
    An --ae-from given again spelled another way is the same autoencoder."""
    run = tmp_path / "older"
    shutil.copytree(trained, run)
    config = json.loads((run / "config.json").read_text())
    config["train"].update(seed=-1, stream_env_arg=["maze_size=7"], ae_from=str(trained / "checkpoint"))
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(run), "--far-steps", "4", "--ae-from", str(trained / "checkpoint") + "/"]) == 0
    assert "its --stream-env-arg (maze_size=7) did nothing and is dropped" in capsys.readouterr().err
    stored = json.loads((run / "config.json").read_text())["train"]
    assert stored["seed"] == -1 and stored["stream_env_arg"] == []
    config = json.loads((run / "config.json").read_text())
    config["train"]["seed"] = 2**32
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(run), "--far-steps", "5", "--seed", str(2**32)]) == 0  # its own seed again
    # an objective refused since (rollout_aug without rollout_prob): the option given with --resume mends it
    config = json.loads((run / "config.json").read_text())
    config["objective"].update(rollout_aug=0.2, rollout_prob=0.0)
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(run), "--far-steps", "6"]) == 2
    assert "objective options given with --resume replace the stored ones" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--far-steps", "6", "--obj-rollout-prob", "0.25"]) == 0
    assert json.loads((run / "config.json").read_text())["objective"]["rollout_prob"] == 0.25


def test_a_run_trained_on_data_cannot_switch_to_streaming_on_resume(trained, capsys):
    """It streamed, said its --data "was never read and is dropped", and its card forgot the data."""
    stored = (trained / "config.json").read_text()
    assert main(["train", "--resume", str(trained), "--far-steps", "4", "--stream-env", "worldsim/Maze-v0"]) == 2
    assert "--stream-env cannot change on resume" in capsys.readouterr().err
    assert (trained / "config.json").read_text() == stored


def test_stream_with_data_is_refused_rather_than_ignoring_the_data(trained, dataset, tmp_path, capsys):
    """--data beside --stream-env was never read, yet the model card listed it as the data."""
    out = tmp_path / "both"
    assert main(["train", "--stream-env", "worldsim/Maze-v0", "--data", str(dataset), "--ae-from",
                 str(trained / "checkpoint"), "--out", str(out), *FAST, "--far-steps", "1"]) == 2
    assert "--stream-env trains on the episodes it records, not on --data" in capsys.readouterr().err
    assert not out.exists()
    # its settings without it did nothing, yet were recorded in the run's config
    assert main(["train", "--data", str(dataset), "--stream-env-arg", "maze_size=7", "--out", str(out), *FAST,
                 "--far-steps", "1"]) == 2
    assert "--stream-env-arg maze_size=7 sets the simulator of --stream-env" in capsys.readouterr().err
    assert not out.exists()


def _stream_worker_files(spool: Path, seed: int, count: int, start_step: int) -> list[Path]:
    """The first `count` episodes a stream worker (worker 0, 16x16 mazes of 7x7, 4 frames) records.

    On Linux the worker function runs in a forked child: a spawned one (as the trainer starts them)
    starts a fresh interpreter and imports the simulator again, and what these tests check is which
    mazes the function records, not how the process was started (the streaming runs above start
    theirs as the trainer does). Elsewhere it is spawned: macOS's system libraries make fork unsafe,
    and Windows has none."""
    import multiprocessing as mp

    from envs.recorder import stream_worker

    def as_if_spawned(*args) -> None:
        # a forked child inherits what a spawned one starts without: this process's SIGTERM handler (a
        # run's sets a flag, and terminate() below then stopped nothing) and torch's OpenMP pool, whose
        # threads are not in the child (a torch call there hangs where the pool had 2 or more)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        torch.set_num_threads(1)
        stream_worker(*args)

    spool.mkdir()
    forked = sys.platform.startswith("linux")
    proc = mp.get_context("fork" if forked else "spawn").Process(
        target=as_if_spawned if forked else stream_worker, daemon=True,
        args=(str(spool), "worldsim/Maze-v0", {"resolution": 16, "maze_size": 7}, "random", 4, 0, seed, count,
              start_step, os.getpid()))
    proc.start()
    deadline = time.monotonic() + 120  # a guard against a hung worker, not a speed requirement
    while len(list(spool.glob("*.npz"))) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.terminate()
    proc.join(10)
    return sorted(spool.glob("*.npz"))


def test_a_resumed_stream_records_other_mazes(tmp_path):
    """Bug: the workers' maze draws depended on (seed, worker) alone, so every start and resume of a
    streaming run trained on the same first mazes again."""
    import hashlib

    def first_episodes(start_step: int) -> list[str]:
        spool = tmp_path / f"spool{start_step}"
        files = _stream_worker_files(spool, seed=0, count=3, start_step=start_step)
        assert len(files) == 3
        return [hashlib.sha256(np.load(f)["video"].tobytes()).hexdigest() for f in files]

    assert first_episodes(0) != first_episodes(40)


def test_a_stream_worker_never_records_a_held_out_test_maze(tmp_path):
    """README: streamed mazes are never of the test split. A seed whose first maze draw is a test
    maze: the worker draws again, and no episode of the test split reaches the spool."""
    from worldsim.dataset import split_for_maze_seed

    def first_draw(seed: int) -> int:  # the worker's first draw, as it makes it
        return int(np.random.default_rng([seed, 0, 0]).integers(0, 2**31 - 1))

    seed = next(s for s in range(10_000) if split_for_maze_seed(first_draw(s)) == "test")
    names = [f.name for f in _stream_worker_files(tmp_path / "spool", seed=seed, count=2, start_step=0)]
    assert len(names) == 2 and not [n for n in names if n.startswith("test-")], names


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="_stream_worker_files forks on Linux only")
def test_the_stream_worker_checks_start_their_forked_worker_as_a_spawned_one(tmp_path, monkeypatch):
    """_stream_worker_files forks where the trainer spawns. Its child inherited a run's SIGTERM handler
    (terminate() then stopped nothing, and this process's exit waited on the worker for good) and
    torch's OpenMP pool without its threads: a worker that calls torch hung, on machines where the pool
    had 2 or more threads (CI without OMP_NUM_THREADS=1), not on those with one."""
    import multiprocessing as mp

    from envs import recorder
    from worldsim import train as train_mod

    real = recorder.stream_worker

    def a_worker_that_calls_torch(*args):
        (torch.randn(256, 256) @ torch.randn(256, 256)).sum()
        real(*args)

    monkeypatch.setattr(recorder, "stream_worker", a_worker_that_calls_torch)
    before, threads = set(mp.active_children()), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.randn(512, 512) @ torch.randn(512, 512)  # the pool's threads are up
        with train_mod.Interrupt():  # as inside a run: SIGTERM sets a flag
            files = _stream_worker_files(tmp_path / "spool", seed=0, count=1, start_step=0)
    finally:
        torch.set_num_threads(threads)
    alive = [p for p in mp.active_children() if p not in before]
    for p in alive:  # else this process's exit waits on it
        p.kill()
    assert len(files) == 1 and not alive, (files, alive)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")
def test_stream_workers_end_with_a_killed_trainer(trained, tmp_path):
    """Bug: a trainer killed with SIGKILL (or SIGTERM while the stream started) left its recording worker
    running forever, orphaned."""
    import signal as signal_mod
    import time

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "worldsim", "train", "--stream-env", "worldsim/Maze-v0", "--stream-env-arg",
           "resolution=32", "maze_size=7", "--ae-from", str(trained / "checkpoint"), "--out", str(out), *FAST,
           "--far-steps", "100000", "--seq-len", "8", "--stream-length", "16", "--stream-buffer", "2",
           "--val-every", "0", "--preview-every", "-1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[int] = []
    deadline = time.monotonic() + 120
    while not children and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        except OSError:
            pass
    assert children, "the trainer started no worker"
    time.sleep(1.0)  # the worker past its start-up
    proc.send_signal(signal_mod.SIGKILL)
    proc.wait(30)
    deadline = time.monotonic() + 20
    alive = children
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [c for c in alive if Path(f"/proc/{c}").exists()
                 and "Z" not in Path(f"/proc/{c}/stat").read_text().split(")")[-1].split()[:1]]
    assert not alive, f"worker(s) {alive} outlived the trainer"


def test_a_stream_simulator_that_cannot_be_made_is_named(trained, tmp_path, capsys):
    out = tmp_path / "stream"
    assert main(["train", "--stream-env", "worldsim/Nope-v0", "--ae-from", str(trained / "checkpoint"),
                 "--out", str(out), *FAST, "--far-steps", "1"]) == 2
    assert "--stream-env worldsim/Nope-v0: cannot create the simulator (NameNotFound" in capsys.readouterr().err
    assert not out.exists()
    # episodes the simulator ends early: the advice was to raise --stream-length, already long enough
    assert main(["train", "--stream-env", "worldsim/Maze-v0", "--stream-env-arg", "resolution=32", "max_steps=3",
                 "--ae-from", str(trained / "checkpoint"), "--out", str(tmp_path / "short"), *FAST, "--far-steps", "1",
                 "--seq-len", "8", "--stream-length", "16"]) == 2
    assert ("episodes of 4 frames are shorter than --seq-len 8; the simulator ended them before --stream-length 16 "
            "(its max_steps") in capsys.readouterr().err


def test_an_out_path_that_is_a_file_is_refused_by_name(dataset, tmp_path, capsys):
    in_the_way = tmp_path / "results"
    in_the_way.write_text("not a folder")
    assert main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(in_the_way), *FAST, "--ae-steps", "1"]) == 2
    assert f"--out {in_the_way}: exists and is not a folder" in capsys.readouterr().err
    assert in_the_way.read_text() == "not a folder"


def test_a_latent_cache_copied_from_an_earlier_run_is_reused(trained, dataset, tmp_path, capsys, no_loss_plot):
    """A new run folder holding only another run's latents/ (same data, same encoder) starts,
    and reads its latents instead of encoding the frames again."""
    import shutil

    run = tmp_path / "seeded"
    shutil.copytree(trained / "latents", run / "latents")
    capsys.readouterr()
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(run), *FAST,
                 "--ae-from", str(trained / "checkpoint"), "--far-steps", "1", "--val-every", "1"]) == 0
    err = capsys.readouterr().err
    assert "encoding" not in err and (run / "checkpoint" / "model.safetensors").is_file()
    # the same dataset spelled another way (relative, with a trailing slash): the same cache
    again = tmp_path / "relative"
    shutil.copytree(trained / "latents", again / "latents")
    spelled = os.path.relpath(dataset) + os.sep
    assert main(["train", "--stage", "far", "--data", spelled, "--out", str(again), *FAST,
                 "--ae-from", str(trained / "checkpoint"), "--far-steps", "1", "--val-every", "1"]) == 0
    assert "encoding" not in capsys.readouterr().err
    # a cache written before session 30 (its signature hashed "path:id" as that run spelled the path)
    # is still valid: no re-encoding of a dataset only because the signature's formula changed
    import hashlib

    from worldsim.dataset import Dataset

    older = tmp_path / "older"
    shutil.copytree(trained / "latents", older / "latents")
    for meta_path in (older / "latents").glob("*.json"):
        meta = json.loads(meta_path.read_text())
        files = {e.id: e.file for e in Dataset(meta["dataset"]).episodes}
        h = hashlib.sha256()
        h.update(str(Path(meta["dataset"]).resolve()).encode())
        h.update(meta["split"].encode())
        for source, n in zip(meta["sources"], meta["lengths"]):
            st = os.stat(files[source[len(meta["dataset"]) + 1:]])
            h.update(f"{source}:{n}:{st.st_size}:{st.st_mtime_ns};".encode())
        meta_path.write_text(json.dumps({**meta, "signature": h.hexdigest()}))
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(older), *FAST,
                 "--ae-from", str(trained / "checkpoint"), "--far-steps", "1", "--val-every", "1"]) == 0
    assert "encoding" not in capsys.readouterr().err


def test_decoder_fine_tune_keeps_the_latents_and_re_exports_the_world_model(trained, dataset, tmp_path, capsys,
                                                                            no_loss_plot):
    """--ae-init CKPT --ae-train decoder: only the decoder learns, the encoder and latent scale stay
    bit-identical (so the checkpoint's FAR still reads the latents), and RUN/checkpoint is the
    checkpoint with the new decoder, loadable by play and eval."""
    from safetensors.torch import load_file

    from worldsim.checkpoint import load_checkpoint

    ck = trained / "checkpoint"
    before = load_file(str(ck / "model.safetensors"))
    run = tmp_path / "dec"
    assert main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(run), *FAST, "--ae-init", str(ck),
                 "--ae-train", "decoder", "--ae-steps", "3", "--ae-lr", "1e-2", "--warmup", "0"]) == 0
    said = capsys.readouterr().err
    assert "weights initialised from" in said
    assert f"paired with {ck}'s world model in {run / 'checkpoint'}" in said  # the closing line names both
    assert f"world model (transformer, encoder, sampler settings) of `{ck}`" in (run / "checkpoint" / "README.md").read_text()
    ae = load_file(str(run / "autoencoder" / "autoencoder.safetensors"))
    enc = [k for k in ae if k.startswith("encoder.")] + ["latent_scale"]
    dec = [k for k in ae if k.startswith("decoder.")]
    assert all(torch.equal(ae[k], before["autoencoder." + k]) for k in enc)
    assert not all(torch.equal(ae[k], before["autoencoder." + k]) for k in dec)

    paired = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(paired[k], v) for k, v in before.items() if k.startswith("far."))
    assert all(torch.equal(paired["autoencoder." + k], ae[k]) for k in ae)
    loaded = load_checkpoint(run / "checkpoint")
    assert loaded.step == load_checkpoint(ck).step
    assert loaded.config["extra"]["decoder_fine_tune"]["from"] == str(ck)

    # the whole autoencoder learns by default: its encoder moves too
    whole = tmp_path / "all"
    assert main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(whole), *FAST, "--ae-init", str(ck),
                 "--ae-steps", "3", "--ae-lr", "1e-2", "--warmup", "0"]) == 0
    moved = load_file(str(whole / "autoencoder" / "autoencoder.safetensors"))
    assert not all(torch.equal(moved[k], before["autoencoder." + k]) for k in enc if k != "latent_scale")
    assert not (whole / "checkpoint").exists()

    # scripts/pair_decoder.py makes the same pairing afterwards, and refuses a moved encoder (run once as
    # users run it, in a fresh interpreter; its other inputs in this process)
    script = [sys.executable, str(Path(__file__).parents[1] / "scripts" / "pair_decoder.py")]
    done = subprocess.run([*script, str(ck), str(run), str(tmp_path / "pair")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    again = load_file(str(tmp_path / "pair" / "model.safetensors"))
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "pair").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert again.keys() == paired.keys() and all(torch.equal(again[k], v) for k, v in paired.items())
    assert "after 3 decoder steps" in (tmp_path / "pair" / "README.md").read_text()
    pair_decoder = _script("pair_decoder")
    capsys.readouterr()
    # the decoder taken from an exported checkpoint: its card claims no step count (it said "after 0")
    assert pair_decoder.main([str(ck), str(run / "checkpoint"), str(tmp_path / "pair2")]) == 0, \
        capsys.readouterr().err
    card = (tmp_path / "pair2" / "README.md").read_text()
    assert f"with the decoder of `{run / 'checkpoint'}`. The encoder" in card and "decoder steps" not in card
    capsys.readouterr()
    assert pair_decoder.main([str(ck), str(whole), str(tmp_path / "bad")]) == 1
    assert "encoder differs" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))
    # an existing OUT (a run, or the checkpoint itself) was overwritten file by file; now it is refused whole
    config_before = (run / "config.json").read_text()
    assert pair_decoder.main([str(ck), str(run), str(run)]) == 1
    assert "already exists; choose a new folder" in capsys.readouterr().err
    assert (run / "config.json").read_text() == config_before

    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--ae-steps", "4", "--ae-train", "all"]) != 0
    assert "cannot change on resume" in capsys.readouterr().err
    # more steps: still decoder only; the --ae-init folder need not be where it was (the state holds the
    # weights, RUN/checkpoint the world model), and the stored shape may be given again
    moved_ck = tmp_path / "moved-away"
    shutil.move(ck, moved_ck)
    try:
        assert main(["train", "--resume", str(run), "--ae-steps", "4", "--ae-decoder-blocks-per-level",
                     str(load_checkpoint(run / "checkpoint").autoencoder.config.decoder_blocks)]) == 0, \
            capsys.readouterr().err
    finally:
        shutil.move(moved_ck, ck)
    ae = load_file(str(run / "autoencoder" / "autoencoder.safetensors"))
    assert all(torch.equal(ae[k], before["autoencoder." + k]) for k in enc)
    assert load_checkpoint(run / "checkpoint").config["extra"]["decoder_fine_tune"]["from"] == str(ck)
    assert main(["train", "--resume", str(run), "--ae-steps", "5", "--ae-latent-channels", "7"]) != 0
    assert "cannot change on resume (got --ae-latent-channels)" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(tmp_path / "x"), *FAST,
                 "--ae-train", "decoder"]) != 0
    assert "give --ae-init" in capsys.readouterr().err
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(tmp_path / "z"), *FAST,
                 "--ae-init", str(ck)]) != 0
    assert "belong to stage ae" in capsys.readouterr().err
    assert main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(tmp_path / "y"), *FAST,
                 "--ae-init", str(ck), "--ae-latent-channels", "7"]) != 0
    assert "drop --ae-latent-channels" in capsys.readouterr().err


def test_deepened_decoder_fine_tune_pairs_with_the_world_model(trained, dataset, tmp_path, capsys, no_loss_plot):
    """--ae-train decoder --ae-decoder-blocks-per-level N deepens the checkpoint's decoder: the run
    starts from its reconstructions, keeps its encoder (so its FAR still applies), and the paired
    checkpoint loads with the deeper decoder. Shrinking it, or deepening while the encoder trains,
    is refused."""
    from safetensors.torch import load_file

    from worldsim.checkpoint import load_checkpoint

    ck = trained / "checkpoint"
    base = load_checkpoint(ck).autoencoder.config
    deeper = base.decoder_blocks + 1
    run = tmp_path / "deep"
    assert main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(run), *FAST, "--ae-init", str(ck),
                 "--ae-train", "decoder", "--ae-decoder-blocks-per-level", str(deeper), "--ae-steps", "2",
                 "--warmup", "0"]) == 0
    assert f"decoder deepened from {base.decoder_blocks} to {deeper}" in capsys.readouterr().err
    paired = load_checkpoint(run / "checkpoint")
    assert paired.autoencoder.config.decoder_blocks == deeper
    assert paired.autoencoder.config.blocks_per_level == base.blocks_per_level
    before, after = load_file(str(ck / "model.safetensors")), load_file(str(run / "checkpoint" / "model.safetensors"))
    kept = [k for k in before if not k.startswith("autoencoder.decoder.")]
    assert all(torch.equal(after[k], before[k]) for k in kept)
    assert len([k for k in after if k.startswith("autoencoder.decoder.")]) > \
        len([k for k in before if k.startswith("autoencoder.decoder.")])

    for extra, message in ((["--ae-train", "decoder", "--ae-decoder-blocks-per-level", "0"], "only be deepened"),
                           (["--ae-decoder-blocks-per-level", str(deeper)], "shape comes from it")):
        capsys.readouterr()
        assert main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(tmp_path / "no"), *FAST,
                     "--ae-init", str(ck), *extra, "--ae-steps", "1"]) != 0
        assert message in capsys.readouterr().err
        assert not (tmp_path / "no" / "checkpoint").exists()


def test_mse_loss_fine_tunes_on_what_psnr_scores_and_survives_resume(trained, dataset, tmp_path, capsys, no_loss_plot):
    """--ae-loss mse trains and validates on MSE alone (the val loss is the MSE its PSNR comes
    from; the default L1 + MSE is larger), is stored in the run config so a resume keeps it, and
    is a training option, not part of the autoencoder's shape."""
    ck = trained / "checkpoint"
    runs = {}
    for kind in ("mse", "l1+mse"):
        runs[kind] = tmp_path / kind.replace("+", "")
        assert main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(runs[kind]), *FAST,
                     "--ae-init", str(ck), "--ae-train", "decoder", "--ae-loss", kind, "--ae-steps", "2",
                     "--warmup", "0", "--val-every", "2", "--val-batches", "1"]) == 0
    val = {}
    for kind, run in runs.items():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        val[kind] = [r for r in rows if "val_loss" in r][-1]
    mse_from_psnr = 4.0 * 10 ** (-val["mse"]["val_psnr"] / 10)
    assert val["mse"]["val_loss"] == pytest.approx(mse_from_psnr, rel=1e-4)
    assert val["l1+mse"]["val_loss"] > 2 * (4.0 * 10 ** (-val["l1+mse"]["val_psnr"] / 10))
    stored = json.loads((runs["mse"] / "config.json").read_text())
    assert stored["train"]["ae_loss"] == "mse" and "loss" not in stored["autoencoder"]
    assert main(["train", "--resume", str(runs["mse"]), "--ae-steps", "3", "--progress", "false"]) == 0
    assert json.loads((runs["mse"] / "config.json").read_text())["train"]["ae_loss"] == "mse"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(tmp_path / "no"), *FAST, "--ae-loss", "l2"])
    assert "invalid choice: 'l2'" in capsys.readouterr().err


def test_far_init_notes_an_autoencoder_whose_latents_differ(trained, dataset, tmp_path, capsys, no_loss_plot):
    """Continuing FAR weights on another encoder's latents is allowed but said out loud."""
    ck = trained / "checkpoint"
    other_ae = tmp_path / "other-ae"
    assert main(["train", "--stage", "ae", "--data", str(dataset), "--out", str(other_ae), *FAST, "--ae-init", str(ck),
                 "--ae-steps", "2", "--ae-lr", "1e-2", "--warmup", "0"]) == 0
    capsys.readouterr()
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(tmp_path / "far"), *FAST,
                 "--ae-from", str(other_ae), "--far-init", str(ck), "--far-steps", "1"]) == 0
    assert "encoder differs" in capsys.readouterr().err
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(tmp_path / "same"), *FAST,
                 "--ae-from", str(ck), "--far-init", str(ck), "--far-steps", "1"]) == 0
    assert "encoder differs" not in capsys.readouterr().err


def test_a_transformer_stored_in_bfloat16_is_exported_continued_and_converted(trained, dataset, tmp_path, capsys,
                                                                              no_loss_plot):
    """--far-save-dtype bfloat16 halves the transformer in the exported checkpoint; --far-init reads
    such a checkpoint (upcast to float32); scripts/store_far_bf16.py converts a finished one."""
    from safetensors.torch import load_file

    from worldsim.checkpoint import load_checkpoint
    from worldsim.train import export_with_decoder

    fast = [*FAST, "--preview-every", "-1"]  # no preview GIF: none is looked at here, and one never stops a run
    ck = trained / "checkpoint"
    before = load_file(str(ck / "model.safetensors"))
    rounded = {k: v.to(torch.bfloat16) for k, v in before.items() if k.startswith("far.") and v.is_floating_point()}
    run = tmp_path / "half"
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(run), *fast, "--ae-from", str(ck),
                 "--far-init", str(ck), "--far-steps", "1", "--far-lr", "0", "--warmup", "0",
                 "--far-save-dtype", "bfloat16"]) == 0
    half = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert all(half[k].dtype == torch.bfloat16 and torch.equal(half[k], v) for k, v in rounded.items())
    assert all(torch.equal(half[k], v) for k, v in before.items() if k.startswith("autoencoder."))
    assert load_checkpoint(run / "checkpoint").far_dtype == "bfloat16"

    # continuing from it trains in float32 from the rounded weights, stored as asked (float32 by default)
    cont = tmp_path / "cont"
    assert main(["train", "--stage", "far", "--data", str(dataset), "--out", str(cont), *fast,
                 "--ae-from", str(run / "checkpoint"), "--far-init", str(run / "checkpoint"), "--far-steps", "1",
                 "--far-lr", "0", "--warmup", "0"]) == 0
    full = load_file(str(cont / "checkpoint" / "model.safetensors"))
    assert all(full[k].dtype == torch.float32 and torch.equal(full[k], v.float()) for k, v in rounded.items())

    # pairing a new decoder with it keeps the transformer's storage
    paired = tmp_path / "paired"
    export_with_decoder(paired, run / "checkpoint", load_checkpoint(ck).autoencoder, 0, True)
    assert load_checkpoint(paired).far_dtype == "bfloat16"

    # the script once as users run it, in a fresh interpreter; its other inputs in this process
    script = [sys.executable, str(REPO / "scripts" / "store_far_bf16.py")]
    done = subprocess.run([*script, str(ck), str(tmp_path / "conv")], capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr
    assert "transformer stored in bfloat16" in done.stdout
    conv = load_file(str(tmp_path / "conv" / "model.safetensors"))
    assert conv.keys() == half.keys() and all(torch.equal(conv[k], v) for k, v in half.items())
    assert (tmp_path / "conv" / "README.md").read_text() == (ck / "README.md").read_text()  # the model card
    assert load_checkpoint(tmp_path / "conv").config["extra"] == load_checkpoint(ck).config["extra"]
    store_far_bf16 = _script("store_far_bf16")
    capsys.readouterr()
    assert store_far_bf16.main([str(tmp_path / "conv"), str(tmp_path / "back"), "--far-dtype", "float32"]) == 0, \
        capsys.readouterr().err
    assert load_checkpoint(tmp_path / "back").far_dtype == "float32"
    assert store_far_bf16.main([str(ck), str(tmp_path / "conv")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert store_far_bf16.main([str(tmp_path / "nothing"), str(tmp_path / "x")]) == 1
    assert "no such checkpoint folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "cont", "conv", "half", "paired"]


def test_store_far_bf16_names_the_folder_asked_for_when_it_cannot_write(trained, tmp_path, monkeypatch):
    """Its temporary twin cannot be made (no permission there; simulated, as root may write anywhere)."""
    import tempfile

    script = _script("store_far_bf16")

    def refuse(prefix="", suffix="", dir=None):
        raise PermissionError(13, "Permission denied", str(Path(dir) / f"{prefix}abc{suffix}"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(PermissionError) as caught:
        script.store(trained / "checkpoint", tmp_path / "out", "bfloat16")
    assert caught.value.filename == str(tmp_path / "out")


def test_resume_without_its_state_is_refused_and_keeps_the_checkpoint(trained, tmp_path, capsys):
    """A run whose state/ was deleted cannot be resumed: starting it over would overwrite the
    checkpoint it exported, so --resume says so and points at --far-init."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "state")
    weights = (run / "checkpoint" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--far-steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "no saved training state" in err and "--far-init" in err
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == weights


def test_a_resume_redoes_the_export_a_full_disk_or_a_kill_cut_after_the_state_was_saved(
        trained, dataset, tmp_path, capsys, no_loss_plot):
    """A run saves its state, then exports (autoencoder/, checkpoint/). When the export failed (a full
    disk, a second Ctrl-C, a kill), a resume said "done" from the state alone: the far stage then
    refused the run ("no trained autoencoder in this run") or checkpoint/ stayed at an earlier step."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    cut = json.loads((run / "checkpoint" / "config.json").read_text())
    assert cut["step"] == 3
    cut["step"] = 2  # the export of step 2 stands, the final one never landed
    (run / "checkpoint" / "config.json").write_text(json.dumps(cut))
    assert main(["train", "--resume", str(run), "--progress", "false", "--threads", "1"]) == 0
    assert "far: the export of step 3 did not complete (it holds step 2); writing it again" in capsys.readouterr().err
    assert json.loads((run / "checkpoint" / "config.json").read_text())["step"] == 3
    before = (run / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    # with the export in place a resume writes nothing again
    assert main(["train", "--resume", str(run), "--progress", "false", "--threads", "1"]) == 0
    assert "writing it again" not in capsys.readouterr().err
    assert (run / "checkpoint" / "model.safetensors").stat().st_mtime_ns == before

    # the autoencoder stage's export, cut at its end: the far stage could not start
    ae_run = tmp_path / "ae"
    assert main(["train", "--data", str(dataset), "--out", str(ae_run), *FAST, "--stage", "ae", "--ae-steps", "2",
                 "--val-every", "0"]) == 0
    shutil.rmtree(ae_run / "autoencoder")
    capsys.readouterr()
    assert main(["train", "--resume", str(ae_run), "--progress", "false", "--threads", "1"]) == 0
    assert "ae: the export of step 2 did not complete (it holds nothing); writing it again" in capsys.readouterr().err
    assert json.loads((ae_run / "autoencoder" / "config.json").read_text())["step"] == 2
    # ... and when the resume goes on with the far stage alone (--stage far): "no trained autoencoder"
    shutil.rmtree(ae_run / "autoencoder")
    assert main(["train", "--resume", str(ae_run), "--stage", "far", "--far-steps", "2", "--progress", "false",
                 "--threads", "1"]) == 0
    assert "ae: the export of step 2 did not complete (it holds nothing); writing it again" in capsys.readouterr().err
    assert json.loads((ae_run / "checkpoint" / "config.json").read_text())["step"] == 2


def test_ctrl_c_at_the_autoencoders_last_step_stops_before_the_far_stage(dataset, tmp_path, capsys, monkeypatch,
                                                                         no_loss_plot):
    """Bug: a Ctrl-C during the ae stage's last step saved it as finished, then the run encoded every
    frame and trained a far step before it stopped (minutes of work on a large dataset)."""
    import os
    import signal

    from worldsim import train as train_mod

    real = train_mod.step_rng

    def ctrl_c_during_step_3(seed, rank, step):
        if step == 2:  # the steps count from 0: this is the last of --ae-steps 3
            os.kill(os.getpid(), signal.SIGINT)
        return real(seed, rank, step)

    monkeypatch.setattr(train_mod, "step_rng", ctrl_c_during_step_3)
    run = tmp_path / "run"
    assert main(["train", "--data", str(dataset), "--out", str(run), *FAST, "--ae-steps", "3", "--far-steps", "2",
                 "--val-every", "0", "--preview-every", "-1"]) == 130
    assert "ae: interrupted at step 3; saved" in capsys.readouterr().err
    state = json.loads((run / "state" / "state.json").read_text())
    assert state["stage"] == "ae" and state["step"] == 3
    assert not (run / "latents").exists() and not (run / "checkpoint").exists()
    monkeypatch.setattr(train_mod, "step_rng", real)
    assert main(["train", "--resume", str(run), "--progress", "false", "--threads", "1"]) == 0  # the far stage next
    assert json.loads((run / "checkpoint" / "config.json").read_text())["step"] == 2


def test_a_resume_whose_autoencoder_was_swapped_is_refused(trained, tmp_path, capsys):
    """The far state records its autoencoder's hash; an autoencoder/ replaced by another one was used
    silently: the latents re-encoded with it, and the transformer trained on with them."""
    import shutil

    from worldsim.train import load_autoencoder, save_autoencoder

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ae, meta = load_autoencoder(run)
    with torch.no_grad():
        next(ae.parameters()).add_(0.01)
    save_autoencoder(run / "autoencoder", ae, {k: v for k, v in meta.items()
                                               if k not in ("format", "version", "autoencoder", "weights_sha256")})
    assert main(["train", "--resume", str(run), "--far-steps", "5", "--progress", "false", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "its transformer was trained on the latents of another autoencoder than" in err
    assert json.loads((run / "state" / "state.json").read_text())["step"] == 3  # nothing trained


def test_the_latent_cache_is_encoded_one_episode_at_a_time_and_equals_the_one_from_memory(dataset, tmp_path):
    """The far stage loaded every frame of a dataset before encoding it (TECO's DMLab set is ~147 GB
    of frames): it now reads one episode, encodes it, then reads the next, and the cache it
    writes is the one encoding from memory wrote (so existing caches stay valid)."""
    from worldsim.latents import build_cache, cache_paths, load_frames, read_episodes

    data = str(dataset)
    build_cache(tmp_path / "mem", data, "train", "h" * 16, load_frames([data], "train", warn=lambda _: None),
                _encode_red)
    reader = read_episodes(data, "train", None, None, fallback=True, what="the first dataset", warn=lambda _: None)
    events: list[str] = []
    real_read = reader.read

    def read(e):
        events.append("read")
        return real_read(e)

    def encode(x):
        events.append("encode")
        return _encode_red(x)

    reader.read = read
    build_cache(tmp_path / "disk", data, "train", "h" * 16, reader, encode)
    assert events.count("read") == len(reader.indices) + 1  # the first one twice: its first frame sizes the cache
    assert "read,read" not in ",".join(events)  # never a second episode read before the first is encoded
    (mem_npy, mem_meta), (disk_npy, disk_meta) = (cache_paths(tmp_path / d, data, "train", "h" * 16)
                                                  for d in ("mem", "disk"))
    assert mem_npy.read_bytes() == disk_npy.read_bytes()
    assert json.loads(mem_meta.read_text()) == json.loads(disk_meta.read_text())


def _episodes_read(monkeypatch) -> list:
    """Weak references to the frames of every episode read from a dataset from now on: those still
    alive are in memory."""
    import weakref

    from worldsim.dataset import Dataset

    read: list[weakref.ref] = []
    real_load = Dataset.load

    def load(self, info):
        episode = real_load(self, info)
        read.append(weakref.ref(episode.video))
        return episode

    monkeypatch.setattr(Dataset, "load", load)
    return read


def test_the_far_stage_never_loads_a_whole_dataset_into_memory(trained, dataset, tmp_path, monkeypatch):
    from worldsim import train as train_mod

    read = _episodes_read(monkeypatch)
    held_at_batches: list[int] = []
    real_batch = train_mod.latent_batch
    monkeypatch.setattr(train_mod, "latent_batch", lambda *a, **k: held_at_batches.append(
        sum(r() is not None for r in read)) or real_batch(*a, **k))
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "far"), *FAST, "--stage", "far",
                 "--ae-from", str(trained), "--far-steps", "2", "--val-every", "1", "--preview-every", "-1"]) == 0
    assert read and held_at_batches and set(held_at_batches) == {0}


def test_the_autoencoder_stage_holds_no_episode_of_its_datasets_in_memory(dataset, tmp_path, monkeypatch):
    """The autoencoder stage loaded every frame of its datasets into memory before its first step (12 KiB
    a 64x64 frame, more with the allocator's slack: a 10,000-episode dataset of 300 frames needs ~35 GiB).
    It now copies them uncompressed into RUN/frames/, one episode at a time, and samples its batches from
    a memory map of that copy, which it removes once the stage has finished."""
    from worldsim import train as train_mod
    from worldsim.dataset import Dataset

    read = _episodes_read(monkeypatch)
    held_at_batches: list[int] = []
    real_batch = train_mod.frame_batch

    def frame_batch(store, picks, device):
        held_at_batches.append(sum(r() is not None for r in read))
        return real_batch(store, picks, device)

    monkeypatch.setattr(train_mod, "frame_batch", frame_batch)
    run = tmp_path / "run"
    assert main(["train", "--data", str(dataset), "--out", str(run), *FAST, "--stage", "ae", "--ae-steps", "3",
                 "--val-every", "1"]) == 0
    assert len(read) >= len(Dataset(dataset))  # every episode read (copied) ...
    assert held_at_batches and set(held_at_batches) == {0}  # ... and none of them in memory at a batch
    assert not (run / "frames").exists()


def test_a_frame_copy_the_disk_cannot_hold_is_refused_before_a_byte_is_written(dataset, tmp_path, monkeypatch,
                                                                             capsys):
    """The autoencoder stage's uncompressed copy (~3.5 times the episode files) wrote until the disk was
    full, which stops other programs too, and only then failed; it is now refused first, with its size.
    The same command trains once the space is there (a start that failed leaves no run)."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=50_000) if Path(p).name == "frames"
                        else real(p))
    run = tmp_path / "run"
    args = ["train", "--data", str(dataset), "--out", str(run), *FAST, "--stage", "ae", "--ae-steps", "2",
            "--val-every", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (f"worldsim train: {run / 'frames'}: the autoencoder stage copies the train frames of {dataset} "
            "uncompressed here (0.") in err and "MiB) and the disk has 0.0 MiB free" in err, err
    assert list((run / "frames").iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert main(args) == 0


def test_a_resume_past_a_finished_autoencoder_stage_reads_no_frame_for_it(dataset, tmp_path, monkeypatch, no_loss_plot):
    """A resume whose saved state was the finished autoencoder stage's (the far stage had not saved yet)
    loaded every frame of its datasets into memory, then trained nothing with them and went on to the
    far stage, which encodes its latents one episode at a time."""
    from worldsim import train as train_mod
    from worldsim.dataset import Dataset

    run = tmp_path / "run"
    assert main(["train", "--data", str(dataset), "--out", str(run), *FAST, "--stage", "ae", "--ae-steps", "2",
                 "--val-every", "0"]) == 0
    events: list[str] = []
    real_load, real_far = Dataset.load, train_mod.run_far_stage
    monkeypatch.setattr(Dataset, "load", lambda self, info: events.append(f"read {info.id}") or real_load(self, info))
    monkeypatch.setattr(train_mod, "run_far_stage", lambda *a, **k: events.append("far stage") or real_far(*a, **k))
    assert main(["train", "--resume", str(run), "--stage", "both", "--far-steps", "1", "--progress", "false",
                 "--threads", "1", "--preview-every", "-1"]) == 0
    assert events[0] == "far stage" and len(events) > 1, events  # its latents read the episodes, nothing before
    assert json.loads((run / "checkpoint" / "config.json").read_text())["step"] == 1


def test_a_dataset_without_val_episodes_is_encoded_once_and_validated_on_its_train_store(dataset, trained,
                                                                                          tmp_path, capsys,
                                                                                          monkeypatch, no_loss_plot):
    """With no val episodes anywhere, val fell back to the train episodes and encoded them all a second
    time into a byte-identical cache (65 s each on a 72,000-frame dataset, helper-measured)."""
    from worldsim.dataset import Dataset

    data = tmp_path / "train-only"
    shutil.copytree(dataset, data)
    index = json.loads((data / "index.json").read_text())
    index["episodes"] = [e for e in index["episodes"] if e["split"] == "train"]
    (data / "index.json").write_text(json.dumps(index))
    assert len(Dataset(data)) >= 1 and not Dataset(data, split="val").episodes
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *FAST, "--stage", "far", "--ae-from",
                 str(trained), "--far-steps", "2", "--val-every", "1", "--preview-every", "-1"]) == 0
    assert "note: no val frames; validating on train episodes" in capsys.readouterr().err
    assert len(list((run / "latents").glob("*.npy"))) == 1
    # the autoencoder stage held the train frames twice in memory (its val fell back to them); it now
    # copies them once into RUN/frames/
    from worldsim import train as train_mod

    opened, real = [], train_mod.open_frames
    monkeypatch.setattr(train_mod, "open_frames", lambda trainer, readers, split, together: opened.append(split)
                        or real(trainer, readers, split, together))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "ae"), *FAST, "--stage", "ae",
                 "--ae-steps", "2", "--val-every", "1"]) == 0
    assert opened == ["train"]
    assert "note: no val episodes; validating the autoencoder on train frames" in capsys.readouterr().err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows)
    # each validation row says what it measured on, and loss.png's legend says it (it said "val (EMA)")
    ae_rows = [json.loads(line) for line in (tmp_path / "ae" / "metrics.jsonl").read_text().splitlines()]
    for stage_rows in (rows, ae_rows):
        assert all(r["val_on"] == "train" for r in stage_rows if "val_loss" in r)
        assert all("val_on" not in r for r in stage_rows if "val_loss" not in r)  # train rows: as before
    _assert_val_legend(ae_rows + rows, "val (EMA, on train episodes)")


def _assert_val_legend(rows: list[dict], expected: str) -> None:
    import matplotlib.pyplot as plt

    from worldsim.train import loss_figure

    fig = loss_figure(rows)
    try:
        for ax in fig.axes:
            assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == expected
    finally:
        plt.close(fig)


def test_validation_rows_on_val_episodes_say_so(trained):
    """A run with val episodes: its validation rows say `"val_on": "val"` and the legend stays "val (EMA)"."""
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val_loss" in r]
    assert {r["stage"] for r in vals} == {"ae", "far"} and all(r["val_on"] == "val" for r in vals)
    _assert_val_legend(rows, "val (EMA)")


def test_loss_plot_names_each_stages_loss():
    """loss.png's y axes said only "loss": the autoencoder's is its --ae-loss (L1 + MSE, or MSE) on
    pixels in [-1, 1], the far stage's the flow-matching velocity MSE."""
    import matplotlib.pyplot as plt

    from worldsim.train import loss_figure

    rows = [{"stage": s, "step": k, "loss": 1.0 / k} for s in ("ae", "far") for k in range(1, 20)]
    for ae_loss, ae_label in (("l1+mse", "L1 + MSE of pixels in [-1, 1]"), ("mse", "MSE of pixels in [-1, 1]"),
                              (None, "reconstruction loss")):
        fig = loss_figure(rows, ae_loss=ae_loss)
        try:
            assert [ax.get_ylabel() for ax in fig.axes] == [ae_label, "flow-matching velocity MSE"]
            assert [ax.get_title() for ax in fig.axes] == ["autoencoder: reconstruction loss",
                                                          "FAR: flow-matching loss"]
        finally:
            plt.close(fig)
    # mixed rows (a resume that gained val episodes) say so too
    mixed = rows + [{"stage": "far", "step": 5, "val_loss": 0.2, "val_on": "train"},
                    {"stage": "far", "step": 10, "val_loss": 0.1, "val_on": "val"}]
    fig = loss_figure(mixed)
    try:
        assert fig.axes[1].get_legend().get_texts()[-1].get_text() == "val (EMA, partly on train episodes)"
    finally:
        plt.close(fig)


def test_the_trainer_names_its_ae_loss_on_loss_png(trained, monkeypatch):
    """Trainer.plot hands the run's --ae-loss to the plot."""
    import worldsim.train as train_mod

    seen = {}
    monkeypatch.setattr(train_mod, "loss_figure", lambda rows, **kw: seen.update(kw))
    from types import SimpleNamespace

    train_mod.Trainer.plot(SimpleNamespace(dist=SimpleNamespace(is_main=True), metrics_path=trained / "metrics.jsonl",
                                           out=trained, run=SimpleNamespace(train=SimpleNamespace(ae_loss="mse")),
                                           log=print, plotted=None))
    assert seen == {"ae_loss": "mse"}


def test_preview_captions_fit_with_pillows_older_bitmap_font(tmp_path, monkeypatch):
    """Sized on Pillow 13's default font (FreeType, ~5 px a character): with the 6-pixel bitmap font
    that Pillow before 10.1 (declared pillow>=9.2) draws, "model: context (given)" ran 7 px past a
    64x64 preview's 260-pixel width and was cut off at the edge."""
    from _tiny_world import make_checkpoint
    from PIL import Image, ImageFont

    from worldsim.train import write_preview

    if hasattr(ImageFont, "load_default_imagefont"):  # Pillow >= 10.1 draws FreeType by default
        bitmap = ImageFont.load_default_imagefont()
        monkeypatch.setattr(ImageFont, "load_default", lambda *a, **k: bitmap)
    ck = make_checkpoint(tmp_path / "ck")
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    gif = tmp_path / "p.gif"
    write_preview(ck, video, np.zeros(4, np.int64), 2, 2, gif)
    with Image.open(gif) as im:
        headers = []
        for i in range(im.n_frames):
            im.seek(i)
            headers.append(np.asarray(im.convert("RGB"))[:14])
    assert headers[0].shape[1] == 260
    for h in headers:
        ink = h.max(-1) > 100
        assert ink[:, 135:].any() and not ink[:, -3:].any()  # the model's caption written, not cut at the edge
