"""Typed dataclass configs turned into argparse options (cleanrl style).

Every field of a dataclass becomes `--field-name`; its type, default and `help` metadata
come from the dataclass, so a config's documentation lives in one place.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return True, args[0]
    return False, tp


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _none_or(tp: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else tp(text)

    parse.__name__ = getattr(tp, "__name__", "value")  # argparse names the type in "invalid int value"
    return parse


def _choice_or_none(choices: tuple) -> Callable[[str], Any]:
    """One of `choices` (parsed as their type) or the word "none" for None."""
    def parse(text: str) -> Any:
        if text.strip().lower() == "none":
            return None
        value = type(choices[0])(text)
        if value not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from "
                                             f"{', '.join(map(str, (*choices, 'none')))})")
        return value

    return parse


class _ExtendList(argparse.Action):
    """A list option given twice adds to the list (`--data a --data b` = `--data a b`, as record's
    --env-arg): the first use replaces the default, later ones extend it."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 (argparse's signature)
        given = namespace.__dict__.setdefault("_lists_given", set())
        before = list(getattr(namespace, self.dest)) if self.dest in given else []
        given.add(self.dest)
        setattr(namespace, self.dest, before + list(values))


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                            none_word: bool = True) -> None:
    """Add one `--field` option per dataclass field, defaulting to the dataclass default.

    none_word: an optional field takes the word "none" for None (where None is a value a user may
    choose, as "none = ..." in its help); False where None only marks an option not given."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init:
            continue
        optional, tp = _is_optional(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = field.default_factory()  # type: ignore[misc]
        else:
            default = None
        kwargs: dict[str, Any] = {"dest": field.name, "default": default}
        if typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            if optional and none_word:  # "(default: none)" in the help: the word is a choice too
                kwargs.update(type=_choice_or_none(choices), metavar="{" + ",".join(map(str, (*choices, "none"))) + "}")
            else:
                kwargs.update(type=type(choices[0]), choices=choices)
        elif typing.get_origin(tp) in (list, tuple):
            (item,) = typing.get_args(tp)[:1]
            kwargs.update(type=item, nargs="+", action=_ExtendList)
        elif tp is bool:
            kwargs.update(type=_parse_bool, metavar="BOOL")
        elif optional and none_word:  # the help texts say "none = ..."; argparse would refuse the word itself
            kwargs.update(type=_none_or(tp), metavar=flag[2:].replace("-", "_").upper())
        else:
            kwargs.update(type=tp)
        required = (field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING  # type: ignore[misc]
                    and not optional)
        default_text = ("none" if default is None
                        else " ".join(map(str, default)) if isinstance(default, (tuple, list)) else default)
        # a help text that explains its own default (e.g. "default: the checkpoint's") keeps it
        explains_default = "default:" in help_text.lower() or "(default" in help_text.lower()
        kwargs["help"] = help_text if required or explains_default else f"{help_text} (default: {default_text})".strip()
        if required:
            kwargs["required"] = True
        parser.add_argument(flag, **kwargs)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build `cls` from parsed options (fields absent from `args` keep their defaults)."""
    values = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name in overrides:
            values[field.name] = overrides[field.name]
        elif hasattr(args, field.name):
            value = getattr(args, field.name)
            if isinstance(value, list) and typing.get_origin(typing.get_type_hints(cls)[field.name]) is tuple:
                value = tuple(value)
            values[field.name] = value
    return cls(**values)
