"""The `worldsim` command and the thin entry scripts answer --help without errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worldsim.cli import SUBCOMMANDS, main

REPO = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("record", "train", "play", "eval", "bench", "export"):
        assert name in out


def test_unknown_subcommand_is_an_error(capsys):
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err
    assert main(["--verbose"]) == 2 and "unknown option '--verbose'" in capsys.readouterr().err
    # nothing to do is a usage error, not a success (a script's empty $command), and help takes one command
    assert main([]) == 2
    said = capsys.readouterr()
    assert said.out == "" and "usage: worldsim <command>" in said.err
    assert main(["help", "record", "extra"]) == 2 and "help takes one command" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_subcommand_help(command, capsys):
    # In this process: a fresh interpreter per command cost seconds (train's imports torch). `python -m
    # worldsim` itself is run below (help bench, the closed pipe) and test_help_does_not_import_torch
    # runs every command's help in a fresh interpreter.
    with pytest.raises(SystemExit) as done:  # argparse's exit after the help
        main([command, "--help"])
    said = capsys.readouterr()
    assert done.value.code == 0, said.err
    assert f"worldsim {command}" in said.out


def test_version_and_help_for_a_command(capsys):
    from worldsim import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"worldsim {__version__}"
    result = subprocess.run([sys.executable, "-m", "worldsim", "help", "bench"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.startswith("usage: worldsim bench")
    # tuple defaults read as they are typed on the command line
    assert "(default: 16 64 256)" in " ".join(result.stdout.split())


@pytest.mark.parametrize("script, fresh_interpreter", [("play.py", True), ("train.py", False)])
def test_entry_scripts_help(script, fresh_interpreter, monkeypatch, capsys):
    """play.py runs as users run it; train.py's help imports torch (its options come from the model's
    config dataclasses), seconds in a fresh interpreter, so it runs as __main__ in this one."""
    if fresh_interpreter:
        result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=REPO)
        code, out, err = result.returncode, result.stdout, result.stderr
    else:
        import runpy

        monkeypatch.setattr(sys, "argv", [script, "--help"])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(REPO / script), run_name="__main__")
        code, (out, err) = done.value.code, capsys.readouterr()
    assert code == 0, err
    assert "usage:" in out


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"]])
def test_help_into_a_closed_pipe_exits_quietly(argv):
    """`worldsim train --help | head`: the reader is gone before we write; no traceback. The top-level
    help fits in stdout's buffer (the error comes at the flush); a command's help (eval's: 14 kB, over
    the 8 kB buffer) fails inside argparse's write. eval's, not train's: its help imports no torch."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE
    try:
        result = subprocess.run([sys.executable, "-m", "worldsim", *argv], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, cwd=REPO)
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.returncode in (0, 141)  # argparse itself swallows the error of its help text


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_a_folder_that_cannot_be_made_is_one_line_naming_it(capsys, tmp_path):
    rc = main(["record", "--env", "worldsim/Maze-v0", "--episodes", "1", "--length", "5", "--split", "train",
               "--out", "/proc/worldsim-no/such", "--progress", "false"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("worldsim record: /proc/worldsim-no") and err.strip().endswith("No such file or directory")


def test_a_full_disk_while_saving_tensors_is_an_oserror_naming_the_file(monkeypatch, tmp_path):
    """safetensors reports a full disk as a SafetensorError; the CLI's one-line OSError message
    needs it as the OSError it is, with the file, and a failed save leaves no temp folder."""
    import torch
    from safetensors import SafetensorError

    from worldsim import checkpoint
    from worldsim.train import swap_dir_atomic

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    target = tmp_path / "state"
    with pytest.raises(OSError) as caught:
        swap_dir_atomic(target, lambda tmp: checkpoint.save_tensors({"w": torch.zeros(2)}, tmp / "w.safetensors", {}))
    assert caught.value.errno == 28 and caught.value.strerror == "No space left on device"
    assert caught.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_the_command_loads_is_a_quiet_interrupt(monkeypatch, capsys):
    """Importing a command's modules (torch) takes about a second: a Ctrl-C then used to print a traceback."""
    import importlib

    def interrupted(name, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert main(["bench", "--preset", "tiny"]) == 130
    assert capsys.readouterr().err.strip() == "worldsim bench: interrupted"


def test_sigterm_stops_any_command_as_ctrl_c_does(tmp_path):
    """Only record and train handled SIGTERM (timeout, a scheduler, docker stop): play, export and
    eval died with 143 and left their hidden temp videos. Now each stops as on Ctrl-C: exit 130,
    a one-line message, and play keeps the video it had made."""
    import signal
    import time

    out = tmp_path / "walk.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "worldsim", "play", "--headless", "--world", "sim", "--actions",
                             "random:1000000", "--out", str(out), "--scale", "1"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))

    def frames_in_the_video() -> bool:  # ffmpeg writes the temp file once it has a frame: a video to keep
        try:
            return any(p.stat().st_size > 0 for p in tmp_path.glob(".walk*"))
        except FileNotFoundError:  # renamed or removed meanwhile: the child stopped
            return True

    deadline = time.monotonic() + 120  # a guard against a stuck child, not a speed requirement
    while not frames_in_the_video() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "kept" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["walk.mp4"]  # no temp file beside it


def test_a_second_interrupt_while_a_command_stops_is_ignored(monkeypatch, capsys):
    """The interrupt handler ignores further Ctrl-C until main() returns (a second one printed a
    KeyboardInterrupt traceback from the final flush), and main() puts the handlers back."""
    import importlib
    import signal

    before = signal.getsignal(signal.SIGINT)
    seen = []

    def interrupted(name, *args, **kwargs):
        raise KeyboardInterrupt

    real_flush = sys.stdout.flush

    def flush():
        seen.append(signal.getsignal(signal.SIGINT))
        return real_flush()

    monkeypatch.setattr(importlib, "import_module", interrupted)
    monkeypatch.setattr(sys.stdout, "flush", flush)
    assert main(["bench"]) == 130
    assert seen and seen[-1] == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) == before and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_an_optional_choice_takes_the_word_none_its_help_shows():
    """export --split says "(default: none)" but refused `--split none` as an invalid choice."""
    from worldsim.cli import build_parser

    parser, _ = build_parser("export")
    assert parser.parse_args(["ds", "--out", "x.gif", "--split", "none"]).split is None
    assert parser.parse_args(["ds", "--out", "x.gif", "--split", "val"]).split == "val"
    with pytest.raises(SystemExit):
        parser.parse_args(["ds", "--out", "x.gif", "--split", "bogus"])


def test_a_list_option_given_twice_adds_to_the_list():
    """`--data a --data b` used to keep only b (argparse's default for nargs="+")."""
    import argparse
    import dataclasses

    from worldsim.cliargs import add_dataclass_arguments, dataclass_from_args

    @dataclasses.dataclass
    class Config:
        data: tuple[str, ...] = ("default",)

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Config)
    assert dataclass_from_args(Config, parser.parse_args([])).data == ("default",)
    assert dataclass_from_args(Config, parser.parse_args(["--data", "a", "b"])).data == ("a", "b")
    assert dataclass_from_args(Config, parser.parse_args(["--data", "a", "--data", "b", "c"])).data == ("a", "b", "c")


def test_bad_thread_counts_and_simulator_bench_steps_are_refused(capsys):
    assert main(["bench", "--preset", "tiny", "--threads", "-1"]) == 2  # was a RuntimeError traceback
    assert "--threads must be >= 1, got -1" in capsys.readouterr().err
    for extra, message in ((["--seed", "-1"], "--seed must be from 0 to 2**32 - 1, got -1"),  # was numpy's traceback
                           (["--seed", "99999999999999999999"], "--seed must be from 0 to 2**32 - 1"),  # torch's
                           # torch's CPU generator keeps the low 32 bits: the random weights of --seed 0
                           (["--seed", str(2**32)], "--seed must be from 0 to 2**32 - 1, got 4294967296"),
                           (["--cfg", "nan"], "--cfg must be a finite number, got nan")):  # ... after building models
        assert main(["bench", "--preset", "tiny", *extra]) == 2
        assert message in capsys.readouterr().err
    from worldsim import bench_sim

    with pytest.raises(SystemExit):  # --episode-steps 0 used to loop forever
        bench_sim.main(["--steps", "20", "--episode-steps", "0"])
    assert "--episode-steps must be >= 1, got 0" in capsys.readouterr().err
    assert bench_sim.main(["--env-id", "worldsim/Nope-v0", "--steps", "2"]) == 2  # was gymnasium's traceback
    assert "bench_sim: --env-id worldsim/Nope-v0: cannot create the simulator (NameNotFound" in capsys.readouterr().err
    # a simulator whose package is missing here (DeepMind Lab's ImportError) or that takes no resolution
    assert bench_sim.main(["--env-id", "CartPole-v1", "--steps", "2"]) == 2
    assert "bench_sim: --env-id CartPole-v1: cannot create the simulator with settings {'resolution': 64} " \
           "(TypeError" in capsys.readouterr().err


def test_a_keymap_file_that_is_not_text_is_a_keymap_error(tmp_path):
    from worldsim.keymaps import KeymapError, load_keymap

    keys = tmp_path / "keys.json"
    keys.write_bytes(bytes(range(128, 256)))
    with pytest.raises(KeymapError, match=f"{keys}: cannot read keymap JSON"):
        load_keymap(str(keys), ("noop", "forward"))


def _refuse_reading(monkeypatch, *paths: Path) -> None:
    """Path.read_text of `paths` fails as on a file without read permission (the tests may run as
    root, whom chmod 000 does not stop)."""
    import errno

    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self in paths:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)


def test_an_input_it_may_not_read_is_exit_1_naming_the_file(monkeypatch, capsys, tmp_path):
    """No permission is the file system's refusal, exit 1 in every command, as for a dataset folder it
    may not read. An index.json, an episode file, a run's config.json, play's --actions file or keymap
    without read permission were exit 2 instead, an episode file as "corrupt episode file
    (PermissionError: ...)", and record's index with the advice to move it away and rebuild it."""
    import errno

    from worldsim import dataset
    from worldsim.keymaps import load_keymap
    from worldsim.train import _read_json_object

    data = tmp_path / "ds"
    record = ["record", "--episodes", "1", "--length", "5", "--workers", "1", "--progress", "false", "--out", str(data)]
    assert main(record) == 0
    capsys.readouterr()
    index, episode = data / "index.json", data / "episodes" / "000000.npz"

    def refuse_the_episode(file, *args, **kwargs):
        if Path(file) == episode:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(dataset, "open", refuse_the_episode, raising=False)  # _load_arrays' open
    assert main(["export", str(data), "--out", str(tmp_path / "ep.gif")]) == 1
    assert capsys.readouterr().err == f"worldsim export: {episode}: Permission denied\n"
    monkeypatch.undo()

    _refuse_reading(monkeypatch, index)
    assert main(["export", str(data), "--out", str(tmp_path / "ep.gif")]) == 1
    assert capsys.readouterr().err == f"worldsim export: {index}: Permission denied\n"
    assert main(record) == 1
    assert capsys.readouterr().err == f"worldsim record: {index}: Permission denied\n"
    with pytest.raises(PermissionError):
        _read_json_object(index)  # train's reader of config.json and state.json
    with pytest.raises(PermissionError):
        load_keymap(str(index), ("noop", "forward"))
    assert main(["play", "--headless", "--world", "sim", "--actions", str(index)]) == 1
    assert capsys.readouterr().err == f"worldsim play: {index}: Permission denied\n"


def test_an_out_below_a_file_is_exit_2_naming_the_file_in_every_command(capsys, tmp_path):
    """A file in the way of --out is a problem the command explains (exit 2), as export and play said
    it; record and train exited 1 with mkdir's bare "Not a directory", eval --rescore FILE too."""
    (tmp_path / "file").write_text("")
    blocked = tmp_path / "file" / "sub" / "out"
    data = tmp_path / "ds"
    assert main(["record", "--episodes", "2", "--length", "8", "--workers", "1", "--progress", "false",
                 "--out", str(data)]) == 0
    for argv in (["record", "--episodes", "1", "--length", "5", "--workers", "1", "--progress", "false"],
                 ["train", "--preset", "tiny", "--ae-steps", "1", "--far-steps", "1", "--progress", "false",
                  "--threads", "1", "--data", str(data)]):
        capsys.readouterr()
        assert main([*argv, "--out", str(blocked)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.strip().endswith(f"{tmp_path / 'file'} is a file, not a folder"), err
    assert main(["eval", "--rescore", str(tmp_path / "file")]) == 2
    assert "--rescore takes the folder of an earlier" in capsys.readouterr().err


def test_a_refused_eval_leaves_no_empty_out_folder(capsys, tmp_path):
    """eval makes --out first, to learn at once that it may write there; a refusal after that (no such
    checkpoint or data, a bad device) left the empty folder behind. A folder that was there stays."""
    out = tmp_path / "runs" / "eval"
    for extra in (["--checkpoint", str(tmp_path / "no-checkpoint")], ["--device", "bogus"],
                  ["--data", str(tmp_path / "no-data"), "--device", "cpu"]):
        assert main(["eval", *extra, "--out", str(out), "--progress", "false"]) == 2
        assert not out.exists(), capsys.readouterr().err
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in (["--device", "bogus"], ["--checkpoint", str(tmp_path / "no-checkpoint")]):
        assert main(["eval", *extra, "--out", str(out)]) == 2
        # nor the lock it took there: a typo'd checkpoint with --out . left a .lock in the user's folder
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# every command that takes --threads, with what it needs to reach its checks
THREADS_ARGV = {"train": ["train", "--data", "no-such-data", "--preset", "tiny"], "play": ["play", "--headless"],
                "eval": ["eval"], "bench": ["bench", "--preset", "tiny"]}


@pytest.mark.parametrize("value", ["0", "-1"])
def test_threads_0_or_negative_is_refused_alike_by_every_command(capsys, value):
    """One meaning of --threads: a count >= 1; not giving it (or the word none) is each command's
    default. train took 0 for all cores where play, eval and bench refused it (and -1 said >= 0)."""
    for command, argv in THREADS_ARGV.items():
        assert main([*argv, "--threads", value]) == 2, command
        err = capsys.readouterr().err
        assert err.strip() == f"worldsim {command}: --threads must be >= 1, got {value}", err


def test_threads_help_says_the_same_in_every_command():
    from worldsim.cli import build_parser

    for command in THREADS_ARGV:
        parser, _ = build_parser(command)
        (action,) = [a for a in parser._actions if "--threads" in a.option_strings]
        assert action.help.startswith("torch CPU threads") and ">= 1 (default: " in action.help, (command, action.help)
        assert parser.parse_args(["--threads", "none"]).threads is None, command  # the default, said in words


def test_a_run_stored_with_threads_0_resumes_with_all_cores(tmp_path):
    """Runs started before 0 was refused stored threads 0 (all cores): they resume as None means."""
    from worldsim.train import RunConfig, check_numbers, config_from_args
    from worldsim.cli import build_parser

    run, _ = config_from_args(build_parser("train")[0].parse_args(["--preset", "tiny", "--data", "x"]))
    d = run.to_dict()
    d["train"]["threads"] = 0
    stored = RunConfig.from_dict(d)
    assert stored.train.threads is None
    check_numbers(stored.train, new_run=False)


@pytest.mark.parametrize("command", sorted(set(SUBCOMMANDS) - {"train"}))
def test_help_does_not_import_torch(command):
    """torch takes seconds to import; eval's --help imported it through worldsim.metrics, bench's at the
    top of its module. train's cannot skip it: its options come from the model's config dataclasses."""
    code = ("import sys\nfrom worldsim.cli import main\n"
            f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
