"""The shape of the import graph: no loops, and the workers use only the shared plumbing.

- No module of ``cdc`` or ``consumers`` reaches itself through imports (imports inside
  functions count: they run too, only later).
- The workers import nothing of the relay: from ``cdc`` only ``cdc.service.*``, the
  plumbing both programs share, and the relay's AMQP connection, which is also the
  workers' consuming channel (``SHARED_AMQP``).
- ``cdc.service`` imports nothing of the relay either, but its error types.

Checked on the source with ``ast``, so nothing is imported to check it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import cdc

from .test_layering import imports_of

ROOT = Path(cdc.__file__).resolve().parent.parent
PACKAGES = ("cdc", "consumers")
#: What ``cdc.service`` may import from the rest of ``cdc``: the package (its version) and
#: the error types its settings and refusal rules raise.
SERVICE_MAY_USE = {"cdc", "cdc.errors"}
#: Shared plumbing that still sits at the top of ``cdc/``: the URL checks of the settings
#: (moved into ``cdc/service/`` with the rest of the layout; then drop it here).
NOT_YET_MOVED = {"cdc.service.urls"}
#: The AMQP connection the relay publishes on, which the workers consume on too, and the
#: errors it raises: shared, but kept beside the relay's broker code that it extends.
SHARED_AMQP = {"cdc.errors", "cdc.wire.deliveries", "cdc.shell.consume_channel"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(module: str) -> set[str]:
    """The ``cdc``/``consumers`` modules ``module`` imports, anywhere in it."""
    return {name for name in imports_of(module) if name in MODULES and name != module}


GRAPH = {module: _imports(module) for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a self-import),
    each sorted: every import loop of ``graph`` is inside one of them (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_loops_and_only_loops():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"b", "c"}}) == []


def test_the_graph_sees_function_level_and_relative_imports():
    # The relay's CLI imports its commands inside functions; the graph must still see them.
    assert "cdc.shell.recovery" in GRAPH["cdc.cli"]
    assert "consumers.dlq" in GRAPH["consumers.cli"]
    assert "cdc.service.settings" in GRAPH["cdc.config"]
    assert len(MODULES) > 80


def test_no_import_loops():
    assert cycles(GRAPH) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("consumers")))
def test_workers_import_only_the_shared_plumbing_of_cdc(module):
    relay = {
        name
        for name in GRAPH[module]
        if name.split(".")[0] == "cdc"
        and not name.startswith("cdc.service")
        and name not in {"cdc", *NOT_YET_MOVED, *SHARED_AMQP}
    }
    assert not relay, f"{module} imports relay modules {sorted(relay)}: use cdc.service.*"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("cdc.service")))
def test_the_shared_plumbing_imports_nothing_of_the_relay(module):
    relay = {
        name
        for name in GRAPH[module]
        if not name.startswith("cdc.service")
        and name.split(".")[0] == "cdc"
        and name not in SERVICE_MAY_USE | NOT_YET_MOVED
    }
    assert not relay, f"{module} imports relay modules {sorted(relay)}"
    assert not any(name.startswith("consumers") for name in GRAPH[module])
