"""Imports point one way: the layers of ``cdc/`` and the pure modules that import no I/O.

``cdc/wire`` (bytes <-> dataclasses) and ``cdc/core`` (the relay's rules) are pure by
folder: every module in them, and everything they import, imports no I/O library. The few
pure modules outside those folders are listed. Between the layers: wire imports only wire;
core imports wire and core; the shared plumbing in ``cdc/service`` never imports the relay's
I/O shell or its program. Checked on the source with ``ast``, following imports of other
``cdc`` modules transitively, so a pure module cannot pull asyncio in through a helper either.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import cdc

PACKAGE = Path(cdc.__file__).resolve().parent
#: Folders of ``cdc/`` whose every module is pure.
PURE_LAYERS = ("wire", "core")
#: Pure modules outside those folders.
PURE_ELSEWHERE = [
    "cdc.service.backoff",
    "cdc.service.refusals",
    "cdc.errors",
    "consumers.billing.metering",
    "consumers.notifications.templates",
    "consumers.notifications.signing",
    "consumers.notifications.targets",
    "consumers.errors",
]
#: Pure modules that import one library from FORBIDDEN for a pure part of it, and why.
ALLOWED = {
    # pamqp is the reference AMQP codec: no sockets, no asyncio (checked below).
    "cdc.wire.amqp": {"pamqp"},
    "cdc.wire.deliveries": {"pamqp"},
    # Composes SQL with psycopg.sql; opens no connection. Importing it loads psycopg.
    "cdc.core.horizon": {"psycopg"},
}
#: What the modules of a layer may import from ``cdc`` (besides the ``cdc`` package itself).
MAY_IMPORT = {
    "cdc.wire": ("cdc.wire", "cdc.errors"),
    "cdc.core": ("cdc.wire", "cdc.core", "cdc.errors"),
}
#: What the shared plumbing must not import: the relay's I/O shell and its program.
SERVICE_MUST_NOT_IMPORT = ("cdc.shell", "cdc.cli", "cdc.config", "cdc.demo", "cdc.__main__")


def _layer(name: str) -> list[str]:
    folder = PACKAGE / name
    return sorted(
        ".".join(("cdc", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for path in folder.rglob("*.py")
    )


PURE = sorted({m for layer in PURE_LAYERS for m in _layer(layer)} | set(PURE_ELSEWHERE))
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
            # ``from cdc import pgoutput`` imports the submodule cdc.wire.pgoutput.
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
    for layer in PURE_LAYERS:
        assert len(_layer(layer)) > 1, f"cdc/{layer} has no modules"
    for module in PURE:
        assert _path(module) is not None, f"{module} is missing"


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io_library(module):
    chains = _closure(module)
    bad = {
        name: " -> ".join(chain)
        for name, chain in chains.items()
        if name.split(".")[0] in FORBIDDEN and not _allowed(chain)
    }
    assert not bad, f"{module} reaches I/O libraries: {bad}"


@pytest.mark.parametrize("module", PURE)
def test_pure_module_reaches_only_pure_cdc_modules(module):
    reached = {n for n in _closure(module) if n.split(".")[0] in PACKAGES and n not in PACKAGES}
    assert reached <= set(PURE) | _packages(), f"{module} reaches {sorted(reached - set(PURE))}"


def _packages() -> set[str]:
    """The packages of ``cdc``'s layers: importing a pure module runs their ``__init__``."""
    return {m.rpartition(".")[0] for m in PURE if m.count(".") > 1}


def _cdc_imports(module: str) -> set[str]:
    return {n for n in imports_of(module) if n.startswith("cdc.")}


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_a_layer_imports_only_the_layers_below(layer):
    allowed = MAY_IMPORT[layer]
    bad = {
        module: sorted(n for n in _cdc_imports(module) if not n.startswith(allowed))
        for module in _layer(layer.removeprefix("cdc."))
    }
    assert not {m: n for m, n in bad.items() if n}, f"{layer} may import only {allowed}"


def test_the_shared_plumbing_does_not_import_the_relay():
    bad = {
        module: sorted(n for n in _cdc_imports(module) if n.startswith(SERVICE_MUST_NOT_IMPORT))
        for module in _layer("service")
    }
    assert _layer("service"), "cdc/service has no modules"
    assert not {m: n for m, n in bad.items() if n}, bad


def _allowed(chain: list[str]) -> bool:
    """Whether the chain reaches its library through a module ALLOWED to import it."""
    library = chain[-1].split(".")[0]
    return any(library in ALLOWED.get(module, ()) for module in chain)


def test_the_checker_sees_nested_and_relative_imports():
    # The relay itself is not pure: the checker must notice, or it proves nothing.
    chains = _closure("cdc.shell.relay")
    assert "asyncio" in chains
    assert chains["cdc.core.lsn"][0] == "cdc.shell.relay"
    # cdc.shell.slot imports cdc.shell.checkpoint_store inside a function: still an import.
    assert "cdc.shell.checkpoint_store" in imports_of("cdc.shell.slot")


def test_importing_the_pure_modules_loads_no_io_library():
    # Importing psycopg loads asyncio, so its ALLOWED users stay out; pamqp loads nothing
    # else from FORBIDDEN, so its users stay in and only pamqp itself may show up.
    modules = [m for m in PURE if "psycopg" not in ALLOWED.get(m, ())]
    forbidden = sorted(FORBIDDEN - {lib for m in modules for lib in ALLOWED.get(m, ())})
    code = (
        "import sys\n"
        f"import {', '.join(modules)}\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})\n"
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
