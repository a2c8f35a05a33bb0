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
