"""Imports point one way: the pure modules import no I/O library.

Checked on the source with ``ast``, following imports of other ``cdc`` modules
transitively, so a pure module cannot pull asyncio in through a helper either.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import cdc

PACKAGE = Path(cdc.__file__).resolve().parent
PURE = [
    "cdc.pgoutput",
    "cdc.replication",
    "cdc.lsn",
    "cdc.watermark",
    "cdc.outbox",
    "cdc.row_headers",
    "cdc.feed",
    "cdc.service.backoff",
    "cdc.liveness",
    "cdc.service.refusals",
    "cdc.errors",
    "cdc.durations",
    "cdc.progress",
    "cdc.checkpoint",
    "cdc.status_report",
    "cdc.failover",
    "consumers.billing.metering",
    "consumers.notifications.templates",
    "consumers.notifications.signing",
    "consumers.notifications.targets",
    "consumers.errors",
]
PACKAGES = {"cdc", "consumers"}
FORBIDDEN = {"asyncio", "psycopg", "psycopg_binary", "psycopg_c", "aiormq", "aio_pika", "pamqp"}


def _path(module: str) -> Path | None:
    top, *parts = module.split(".")
    if top not in PACKAGES:
        return None
    root = PACKAGE.parent / top
    file = root.joinpath(*parts).with_suffix(".py") if parts else root / "__init__.py"
    if file.is_file():
        return file
    package = root.joinpath(*parts, "__init__.py")
    return package if package.is_file() else None


def imports_of(module: str) -> set[str]:
    """Every module named by an import statement anywhere in ``module`` (also in functions)."""
    path = _path(module)
    assert path is not None, module
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # ``from cdc import pgoutput`` imports the submodule cdc.pgoutput.
            for alias in node.names:
                if _path(f"{target}.{alias.name}") is not None:
                    found.add(f"{target}.{alias.name}")
    return found


def _closure(module: str) -> dict[str, list[str]]:
    """All modules reachable from ``module``, each with the import chain that reaches it."""
    chains = {module: [module]}
    todo = [module]
    while todo:
        current = todo.pop()
        names = imports_of(current)
        # Importing cdc.x runs cdc/__init__.py (and any intermediate package) first.
        for name in list(names):
            parts = name.split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts)))
        for name in sorted(names):
            if name in chains:
                continue
            chains[name] = [*chains[current], name]
            if name.split(".")[0] in PACKAGES and _path(name) is not None:
                todo.append(name)
    return chains


def test_the_pure_module_list_exists():
    for module in PURE:
        assert _path(module) is not None, f"{module} is missing"


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io_library(module):
    chains = _closure(module)
    bad = {
        name: " -> ".join(chain)
        for name, chain in chains.items()
        if name.split(".")[0] in FORBIDDEN
    }
    assert not bad, f"{module} reaches I/O libraries: {bad}"


@pytest.mark.parametrize("module", PURE)
def test_pure_module_reaches_only_pure_cdc_modules(module):
    reached = {n for n in _closure(module) if n.split(".")[0] in PACKAGES and n not in PACKAGES}
    assert reached <= set(PURE), f"{module} reaches {sorted(reached - set(PURE))}"


def test_the_checker_sees_nested_and_relative_imports():
    # The relay itself is not pure: the checker must notice, or it proves nothing.
    chains = _closure("cdc.relay")
    assert "asyncio" in chains
    assert chains["cdc.lsn"][0] == "cdc.relay"
    # cdc.slot imports cdc.checkpoint_store inside a function: still an import.
    assert "cdc.checkpoint_store" in imports_of("cdc.slot")


def test_importing_the_pure_modules_loads_no_io_library():
    code = (
        "import sys\n"
        f"import {', '.join(PURE)}\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parent,
        timeout=60,
    )
    assert out.stdout.strip() == ""
