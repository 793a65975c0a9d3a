"""Command line flags made from a settings model, shared by ``cdc`` and the workers' CLI.

Every settings field ``x_y`` is a flag ``--x-y`` overriding ``CDC_X_Y``; a command lists
only the fields it uses, so its ``--help`` shows nothing it would ignore. Help texts are
plain sentences (argparse prints them as they are).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from cdc import __version__
from cdc.service.settings import FILE_SUFFIX, is_secret, variable


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return ",".join(_shown(v) for v in value)
    return str(value)


def flag_help(field: str, info: FieldInfo, required: bool = False) -> str:
    """``<description> (env CDC_X[ or CDC_X_FILE], default D)`` with ``%`` escaped for argparse."""
    name = variable(field)
    where = f"env {name} or {name}{FILE_SUFFIX}" if is_secret(info) else f"env {name}"
    default = None if info.is_required() else info.get_default()
    if required:
        where += ", required"
    elif default is not None and default != "":
        where += f", default {_shown(default)}"
    return f"{info.description} ({where})".replace("%", "%%")


def add_setting_flags(
    parser: argparse.ArgumentParser | Any,
    model: type[BaseSettings],
    fields: Iterable[str] | None = None,
    required: Iterable[str] = (),
    short_prefix: str = "",
) -> None:
    """One ``--name`` flag per field of ``model`` in ``fields`` (default: all of them).

    ``required`` fields say so in their help. With ``short_prefix`` (``worker_``), a field
    starting with it also answers to the flag without it (``--prefetch``) unless another
    field already has that name.
    """
    names = list(model.model_fields if fields is None else fields)
    needed = set(required)
    for field in names:
        info = model.model_fields[field]
        flags = [f"--{field.replace('_', '-')}"]
        short = field.removeprefix(short_prefix) if short_prefix else field
        if short != field and short not in model.model_fields:
            flags.append(f"--{short.replace('_', '-')}")
        parser.add_argument(
            *flags,
            dest=field,
            default=None,
            metavar=field.removeprefix(short_prefix).upper(),
            help=flag_help(field, info, field in needed),
        )


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: the installed package's version."""
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s (outbox-cdc) {__version__}"
    )


def settings_flags(args: argparse.Namespace, model: type[BaseSettings]) -> dict[str, Any]:
    """The values the command line gave for ``model``'s fields (absent flags are None)."""
    return {k: getattr(args, k, None) for k in model.model_fields}
