"""Command-line flags generated from a pydantic settings class: one `--flag` per field, overriding the environment."""

from __future__ import annotations

import argparse
import typing
from typing import Literal

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from .errors import InputError

S = typing.TypeVar("S", bound=BaseSettings)


def add_settings_flags(parser: argparse.ArgumentParser, settings_class: type[BaseSettings], names, title: str) -> None:
    """Add `--<field-name>` for each of `names` (fields of `settings_class`); unset flags stay None."""
    group = parser.add_argument_group(title)
    for name in dict.fromkeys(names):
        field = settings_class.model_fields[name]
        flag, help = "--" + name.replace("_", "-"), f"{field.description} (default: {field.default})"
        kind = next((a for a in typing.get_args(field.annotation) if a is not type(None)), field.annotation)
        if field.annotation is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif typing.get_origin(field.annotation) is Literal:
            group.add_argument(flag, choices=typing.get_args(field.annotation), default=None, help=help)
        else:
            group.add_argument(flag, type=kind, default=None, help=help)


def settings_from_args(settings_class: type[S], args: argparse.Namespace) -> S:
    """The settings from the environment with the flags given on the command line; a bad value is an InputError."""
    given = {name: getattr(args, name) for name in settings_class.model_fields if getattr(args, name, None) is not None}
    try:
        return settings_class(**given)
    except ValidationError as exc:
        error = exc.errors()[0]
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, InputError):
            raise cause from exc
        field = ".".join(map(str, error["loc"])) or "settings"
        raise InputError(field, f"{error['msg'].removeprefix('Value error, ')} (got {error['input']!r})") from exc
