"""The `worldsim` command: one entry point, one subcommand per job.

Each subcommand lives in its own module, which exposes `add_arguments(parser)` and
`main(args) -> int`. Modules are imported only when their subcommand runs, so
`worldsim --help` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

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
    )
    module.add_arguments(parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
    except BrokenPipeError:
        # the reader went away (`worldsim train --help | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe


def _run(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["help"] and len(argv) > 1:  # `worldsim help train` = `worldsim train --help`
        argv = [argv[1], "--help"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_level_help())
        return 0
    if argv[0] in ("-V", "--version"):
        from worldsim import __version__

        print(f"worldsim {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"worldsim: unknown command {command!r}\n", file=sys.stderr)
        print(_top_level_help(), file=sys.stderr)
        return 2
    try:  # Ctrl-C during the second the command's modules (torch) take to import, too
        parser, module = build_parser(command)
        args = parser.parse_args(rest)
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print(f"\nworldsim {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # a closed stdout: main() stops quietly
        raise
    except OSError as exc:  # the file system's refusal: a full disk, a folder that cannot exist, no permission
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"worldsim {command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
