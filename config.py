"""Command lines from dataclasses: one --name option per field, so every script takes --key=value the same way.

Kept free of torch so the data scripts start fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Optional, TypeVar

ConfigT = TypeVar("ConfigT")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of dataclass cls: help and choices from field metadata, required when there is no default.

    A bool takes true/false (a bare --flag means true); an Optional field left at None means "choose for me".
    """
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[X] -> X
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        required = field.default is dataclasses.MISSING
        options: dict[str, Any] = {"help": field.metadata.get("help", " "), "required": required,
                                   "default": argparse.SUPPRESS if required else field.default}
        if kind is bool:
            options.update(type=_parse_bool, nargs="?", const=True)
        else:
            options.update(type=kind, choices=field.metadata.get("choices"))
        parser.add_argument(f"--{field.name}", **options)


def parse_config(cls: type[ConfigT], argv: Optional[list[str]] = None, description: str = "") -> ConfigT:
    """Parse argv (--key=value or --key value) into an instance of dataclass cls."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser, cls)
    return cls(**vars(parser.parse_args(argv)))
