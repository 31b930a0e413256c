"""Import rules of the package (issue 16), read from the source with ``ast`` so a broken module cannot hide a rule
break: nothing outside the tooling (harness, testbed, CLI, lmms-eval plugin) imports the tooling, the checkout's
``eval/`` or ``bench/``, or lmms-eval; no module imports a deprecated alias (``vtprune.adapters``, ``.pruners``,
``.selectors``); the modules of ``vtprune`` import each other without cycles (every import statement counts, also
one inside a function or under ``TYPE_CHECKING``: a deferred import is still a dependency); and no module edits
``sys.path``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vtprune"
#: evaluation tooling: may import the core, never the other way round
TOOLING = ("vtprune.harness", "vtprune.testbed", "vtprune.cli", "vtprune.lmms_models", "vtprune.lmms_plugin")
#: top-level packages the installed library must not import: the checkout's evaluation and benchmark folders and
#: the optional lmms-eval dependency (only the tooling's lmms-eval plugin may)
OUTSIDE = ("eval", "bench", "lmms_eval")
#: the core named by the issue; the rules below hold for every non-tooling module, these must exist among them
CORE = ("vtprune.api", "vtprune.engine", "vtprune.sites", "vtprune.models", "vtprune.methods", "vtprune.ops",
        "vtprune.config", "vtprune.registry", "vtprune.plan", "vtprune.view", "vtprune.stats", "vtprune.capture",
        "vtprune.flops", "vtprune.measure")


def module_name(path: Path) -> str:
    """``vtprune/harness/runner.py`` -> ``vtprune.harness.runner``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_tooling(name: str) -> bool:
    return any(name == t or name.startswith(t + ".") for t in TOOLING)


def imported(name: str) -> set[str]:
    """Every module that ``name``'s source imports, anywhere in the file: ``vtprune`` modules resolved to the
    module file (``from .x import y`` -> ``pkg.x.y`` when that is a module, else ``pkg.x``), others by their
    top-level name."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(_resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.update(_resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in MODULES else _resolve(base)
                       for alias in node.names)
    return out


def _resolve(dotted: str) -> str:
    """The nearest module of ``vtprune`` that ``dotted`` names (itself or a parent), or its top-level package."""
    if dotted.partition(".")[0] != "vtprune":
        return dotted.partition(".")[0]
    while dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted


GRAPH = {name: imported(name) for name in MODULES}


def test_the_core_exists_outside_the_tooling():
    assert set(CORE) <= set(MODULES), sorted(set(CORE) - set(MODULES))
    assert not any(is_tooling(name) for name in CORE)


@pytest.mark.parametrize("name", [n for n in MODULES if not is_tooling(n)])
def test_the_core_never_imports_the_tooling_or_the_checkout(name):
    bad = sorted(m for m in GRAPH[name] if is_tooling(m) or m in OUTSIDE)
    assert not bad, f"{name} imports {bad}"


#: old import paths kept only for users (issue 16); the package itself imports the new homes
DEPRECATED = ("vtprune.adapters", "vtprune.pruners", "vtprune.selectors")


@pytest.mark.parametrize("name", [n for n in MODULES if n not in DEPRECATED])
def test_no_module_imports_a_deprecated_alias(name):
    assert not GRAPH[name] & set(DEPRECATED), f"{name} imports {sorted(GRAPH[name] & set(DEPRECATED))}"


@pytest.mark.parametrize("name", [n for n in MODULES if is_tooling(n)])
def test_the_tooling_never_imports_the_checkout(name):
    assert not GRAPH[name] & {"eval", "bench"}, f"{name} imports the checkout's eval/ or bench/"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v] & graph.keys()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_on_a_hand_made_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}, "e": {"d"}}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    assert cycles(GRAPH) == []


def test_resolution_of_relative_imports():
    assert "vtprune.harness.tasks" in GRAPH["vtprune.harness.runner"]  # from .tasks import Task, load_task
    assert "vtprune.errors" in GRAPH["vtprune.harness.runner"]  # from ..errors import VTPruneError
    assert "vtprune.harness.models" in GRAPH["vtprune.harness.runner"]  # from . import models


@pytest.mark.parametrize("name", list(MODULES))
def test_no_module_touches_sys_path(name):
    """The package finds its data next to its modules; adding the checkout to ``sys.path`` hid that the installed
    package could not load the testbed on its own."""
    tree = ast.parse(MODULES[name].read_text())
    uses = [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
            or isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names)]
    assert not uses, f"{name} uses sys.path at line(s) {uses}"
