"""The `worldsim` command: one entry point, one subcommand per job.

Each subcommand lives in its own module, which exposes `add_arguments(parser)` and
`main(args) -> int`. Modules are imported only when their subcommand runs, so
`worldsim --help` answers at once.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from typing import Iterator

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "record": ("envs.recorder", "record trajectories from a simulator into a dataset"),
    "export": ("worldsim.export", "export dataset episodes to MP4/GIF/PNG strips"),
    "train": ("worldsim.train", "fit the autoencoder and the FAR world model on datasets"),
    "play": ("worldsim.play", "play in a generated maze with the keyboard (pygame)"),
    "eval": ("worldsim.evaluate", "evaluate memory consistency on revisits"),
    "bench": ("worldsim.bench", "benchmark the simulator and the world model's generation speed"),
}


def _top_level_help() -> str:
    lines = [
        "usage: worldsim <command> [options]",
        "",
        "A playable neural world model of a 3D maze (FAR, next-frame prediction with a",
        "multi-level KV cache).",
        "",
        "commands:",
    ]
    lines += [f"  {name:<8} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "Run `worldsim <command> --help` for the options of a command."]
    return "\n".join(lines)


def build_parser(command: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, text = SUBCOMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"worldsim {command}",
        description=(module.__doc__ or text).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # no abbreviations: `play --record x.mp4` quietly meant --record-dir, and one that works
        # today would break when a similar option is added
        allow_abbrev=False,
    )
    module.add_arguments(parser)
    return parser, module


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def stops_on_sigterm() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt, as Ctrl-C does, where nothing else handles
    it (for the scripts/ that run outside `worldsim`; main() does the same for every command)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (timeout, a scheduler, docker stop) stops a command as Ctrl-C does: its partial outputs
    # kept or removed whole, exit 130. (train installs its own handler for the steps it runs.)
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        if handlers[signal.SIGTERM] == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _stop)
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
    except BrokenPipeError:
        # the reader went away (`worldsim train --help | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe
    finally:
        for s, handler in handlers.items():
            if handler is not None:
                signal.signal(s, handler)


def _run(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["help"] and len(argv) > 1:  # `worldsim help train` = `worldsim train --help`
        if len(argv) > 2:
            print(f"worldsim: help takes one command, got {' '.join(argv[1:])}", file=sys.stderr)
            return 2
        argv = [argv[1], "--help"]
    if not argv:  # a script's empty $command must not pass for a success
        print(_top_level_help(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(_top_level_help())
        return 0
    if argv[0] in ("-V", "--version"):
        from worldsim import __version__

        print(f"worldsim {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        what = "option" if command.startswith("-") else "command"  # options come after the command
        print(f"worldsim: unknown {what} {command!r}\n", file=sys.stderr)
        print(_top_level_help(), file=sys.stderr)
        return 2
    try:  # Ctrl-C during the second the command's modules (torch) take to import, too
        parser, module = build_parser(command)
        args = parser.parse_args(rest)
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        _ignore_further_interrupts()  # a second Ctrl-C while it ends would be a traceback
        print(f"\nworldsim {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # a closed stdout: main() stops quietly
        raise
    except OSError as exc:  # the file system's refusal: a full disk, a folder that cannot exist, no permission
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"worldsim {command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


def _ignore_further_interrupts() -> None:
    """Until main() returns (it restores the handlers): the command is already stopping."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
