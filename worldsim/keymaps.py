"""Keymaps for `worldsim play`: data, not code.

A keymap maps a key *name* (as ``pygame.key.name`` spells it: ``"up"``, ``"w"``, ``"space"``)
to an action *name* of the world (``"forward"``, ``"turn_left"`` ...), never to a raw action
index: the index of an action depends on the simulator/checkpoint vocabulary, its name does
not (DESIGN.md, "Actions"). Keys stay strings here so that this module never imports pygame.

A custom keymap is a small JSON object ``{"key name": "action name", ...}`` passed with
``worldsim play --keymap FILE.json``; built-in ones are picked by name (``--keymap wasd``).

The frontend's own commands (new world, pause, ...) are a separate table, ``CONTROL_KEYS``:
a keymap cannot rebind them, which keeps Esc always able to quit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

# Built-in keymaps. "default" binds both the arrows and WASD, as the issue asks; the others
# are subsets for players who want a free hand.
KEYMAPS: dict[str, dict[str, str]] = {
    "default": {
        "up": "forward",
        "w": "forward",
        "down": "backward",
        "s": "backward",
        "left": "turn_left",
        "a": "turn_left",
        "right": "turn_right",
        "d": "turn_right",
        "space": "noop",
    },
    "arrows": {"up": "forward", "down": "backward", "left": "turn_left", "right": "turn_right", "space": "noop"},
    "wasd": {"w": "forward", "s": "backward", "a": "turn_left", "d": "turn_right", "space": "noop"},
}

# Frontend commands: key name -> command name (handled by worldsim.play, not sent to the env).
CONTROL_KEYS: dict[str, str] = {
    "r": "new_world",
    "p": "pause",
    "escape": "quit",
    "f": "reality",
    "v": "record",
    "h": "help",
}

CONTROL_HELP: dict[str, str] = {
    "new_world": "new world (fresh maze)",
    "pause": "pause / resume",
    "quit": "quit",
    "reality": "dream vs reality, side by side",
    "record": "start / stop recording to MP4",
    "help": "show / hide this help",
}


class KeymapError(ValueError):
    """A keymap is unreadable, malformed, or names actions the world does not have."""


def load_keymap(spec: str | os.PathLike, action_names: Sequence[str]) -> dict[str, str]:
    """Resolve ``spec`` (a built-in name or a JSON file) against the world's action names.

    Built-in keymaps silently drop bindings to actions the world lacks (a checkpoint trained on
    another simulator may not have ``backward``), because they were not written for that
    world. A user's JSON keymap is checked strictly: an unknown action is a mistake to report.
    """
    text = str(spec)
    if text in KEYMAPS:
        keymap = {k: a for k, a in KEYMAPS[text].items() if a in action_names}
        if not keymap:
            raise KeymapError(
                f"built-in keymap {text!r} binds none of this world's actions ({', '.join(action_names)}); "
                "pass --keymap FILE.json with {\"key\": \"action\"} entries")
        return keymap
    path = Path(text)
    if not path.exists():
        raise KeymapError(f"keymap {text!r}: neither a built-in keymap ({', '.join(KEYMAPS)}) nor an existing JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: PowerShell's UTF-8 starts with a BOM
    except PermissionError:  # the file system's refusal: exit 1 naming the file, as in every command
        raise
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, and bytes that are not UTF-8
        raise KeymapError(f"{path}: cannot read keymap JSON ({exc})") from None
    except RecursionError:  # "[[[[..." nested thousands deep
        raise KeymapError(f"{path}: cannot read keymap JSON (nested too deeply)") from None
    return validate_keymap(data, action_names, source=str(path))


def validate_keymap(data: object, action_names: Sequence[str], source: str = "keymap") -> dict[str, str]:
    if not isinstance(data, Mapping) or not data:
        raise KeymapError(f"{source}: a keymap is a non-empty JSON object {{\"key name\": \"action name\"}}")
    keymap: dict[str, str] = {}
    for key, action in data.items():
        if not isinstance(key, str) or not isinstance(action, str):
            raise KeymapError(f"{source}: entry {key!r}: {action!r}: keys and actions must be names (strings), not indices")
        name = key.lower()
        if name in CONTROL_KEYS:
            raise KeymapError(f"{source}: key {key!r} is reserved for '{CONTROL_KEYS[name]}'")
        if action not in action_names:
            raise KeymapError(f"{source}: key {key!r} maps to unknown action {action!r} "
                              f"(this world's actions: {', '.join(action_names)})")
        if name in keymap and keymap[name] != action:  # "up" and "UP" are one key: the last would win silently
            raise KeymapError(f"{source}: key {key!r} is bound twice (key names ignore case), to "
                              f"{keymap[name]!r} and {action!r}")
        keymap[name] = action
    return keymap


def help_lines(keymap: Mapping[str, str], skip: Sequence[str] = ()) -> list[str]:
    """Human-readable key bindings, one line per action / command, for the help overlay; the
    commands in `skip` are left out (F, dream vs reality, does nothing in the simulator itself)."""
    by_action: dict[str, list[str]] = {}
    for key, action in keymap.items():
        by_action.setdefault(action, []).append(key)
    # "keys<TAB>what": the frontend draws the two columns apart (its font is proportional).
    lines = [f"{' / '.join(keys)}\t{action}" for action, keys in by_action.items()]
    lines += [f"{key}\t{CONTROL_HELP[cmd]}" for key, cmd in CONTROL_KEYS.items() if cmd not in skip]
    return lines
