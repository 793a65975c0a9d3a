"""Finding a worker by name: ``billing``, ``notifications`` or a dotted module path.

A worker module exposes ``SETTINGS`` (a subclass of :class:`ConsumerSettings`) and
``build(settings) -> WorkerSpec``. The two built-in workers are imported lazily, by module
path, so the runtime works (and its tests run) without them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from consumers.config import ConsumerSettings
from consumers.errors import ConfigError
from consumers.runtime.spec import WorkerSpec

BUILTIN = {
    "billing": "consumers.billing.worker",
    "notifications": "consumers.notifications.worker",
}


@dataclass(frozen=True, slots=True)
class WorkerModule:
    """What the CLI needs from a worker module."""

    name: str
    module: str
    settings: type[ConsumerSettings]
    build: Callable[[ConsumerSettings], WorkerSpec]


def module_path(name: str) -> str:
    """``billing`` -> ``consumers.billing.worker``; a dotted path is taken as is."""
    return BUILTIN.get(name, name)


def load(name: str) -> WorkerModule:
    """Import the worker ``name`` and check its two attributes; ConfigError says what is wrong."""
    path = module_path(name)
    try:
        module: ModuleType = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name and path.startswith(exc.name):
            known = ", ".join(sorted(BUILTIN))
            raise ConfigError(
                f"no worker {name!r}: module {path!r} is not importable "
                f"(built-in workers: {known}; or give a dotted module path)"
            ) from exc
        raise
    settings = getattr(module, "SETTINGS", None)
    if not (isinstance(settings, type) and issubclass(settings, ConsumerSettings)):
        raise ConfigError(f"{path}.SETTINGS must be a subclass of ConsumerSettings")
    build = getattr(module, "build", None)
    if not callable(build):
        raise ConfigError(f"{path}.build(settings) -> WorkerSpec is missing")
    return WorkerModule(name, path, settings, build)


def build_spec(worker: WorkerModule, settings: ConsumerSettings) -> WorkerSpec:
    """Call the worker's ``build`` and check it returned a usable spec."""
    spec = worker.build(settings)
    if not isinstance(spec, WorkerSpec):
        raise ConfigError(f"{worker.module}.build() returned {type(spec).__name__}, not WorkerSpec")
    if not spec.queues or not spec.routes:
        raise ConfigError(f"{worker.module}.build() declares no queues or no routes")
    return spec
