"""What the ``cdc`` and the workers' command lines share: flags, settings, exit codes, the loop.

Every settings field ``x_y`` is a flag ``--x-y`` overriding ``CDC_X_Y``; a command lists
only the fields it uses, so its ``--help`` shows nothing it would ignore. Help texts are
plain sentences (argparse prints them as they are). A bad setting is one line on stderr and
exit 2 in both programs; both run their event loop on uvloop and stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from cdc import __version__
from cdc.errors import ConfigError
from cdc.service.settings import FILE_SUFFIX, CdcSettings, is_secret, load, variable

#: Exit codes with one meaning in both programs (each CLI's ``--help`` lists its own).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_DRAIN_TIMEOUT = 4
#: A one-shot command (backfill, recover, prune, dlq) stopped by Ctrl-C before it finished.
EXIT_INTERRUPTED = 130

S = TypeVar("S", bound=CdcSettings)
T = TypeVar("T")


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


def read_settings(
    model: type[S], args: argparse.Namespace, needs: Sequence[str] = (), user: str = ""
) -> S | None:
    """``model`` from the environment with ``args``' flags overriding (see ``settings.load``).

    An invalid setting is printed as its one line on stderr, and None returned: the caller
    exits :data:`EXIT_USAGE` before logging is set up (the log settings may be the bad ones).
    """
    try:
        return load(model, settings_flags(args, model), needs, user)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def run_fast(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main`` on uvloop where it is installed (less event-loop CPU per event or
    message than asyncio's own loop), else on asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def on_stop_signals(stop: Callable[[], None]) -> None:
    """Call ``stop`` on SIGTERM and SIGINT (from the running event loop)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


@dataclass(frozen=True, slots=True)
class Finding:
    """One requirement of a ``--check`` (``cdc setup --check``, a worker's): met or not."""

    ok: bool
    text: str

    def line(self) -> str:
        """``ok: ...`` or ``missing: ...``."""
        return f"{'ok' if self.ok else 'missing'}: {self.text}"


def print_findings(findings: Iterable[Finding]) -> int:
    """Print one line per finding; :data:`EXIT_OK`, or :data:`EXIT_REFUSED` if one is unmet."""
    met = True
    for finding in findings:
        print(finding.line())
        met = met and finding.ok
    return EXIT_OK if met else EXIT_REFUSED
