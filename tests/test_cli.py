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


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_subcommand_help(command):
    # Runs in a subprocess so argparse's SystemExit and imports stay isolated.
    result = subprocess.run(
        [sys.executable, "-m", "worldsim", command, "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert f"worldsim {command}" in result.stdout


def test_version_and_help_for_a_command(capsys):
    from worldsim import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"worldsim {__version__}"
    result = subprocess.run([sys.executable, "-m", "worldsim", "help", "bench"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.startswith("usage: worldsim bench")
    # tuple defaults read as they are typed on the command line
    assert "(default: 16 64 256)" in " ".join(result.stdout.split())


@pytest.mark.parametrize("script", ["play.py", "train.py"])
def test_entry_scripts_help(script):
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help_into_a_closed_pipe_exits_quietly(argv):
    """`worldsim train --help | head`: the reader is gone before we write; no traceback."""
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
