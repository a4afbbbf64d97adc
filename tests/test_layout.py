"""The package's folders follow the data flow: no import cycles, between modules or packages.

Every `import`/`from ... import` statement counts, those inside functions too (a lazy import is
still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import primekd

ROOT = Path(primekd.__file__).parent
# Each stage package may import only those before it (README, Layout).
ORDER = ("core", "engines", "evaluate", "teach", "distill", "analyze", "experiment", "cli")
# Inside these packages too, a module imports only those listed before it.
MODULE_ORDER = {"experiment": ("power_note", "answer_style", "report", "config", "stages",
                              "estimate", "heartbeat", "runner", "search_space", "tune")}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("primekd"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("primekd")}
    return {m for m in found if m in known}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return [*path, node, child]
            if child not in state and (found := visit(child, [*path, node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_no_module_imports_itself_through_others() -> None:
    assert _cycle(_graph()) is None


def test_stage_packages_import_only_earlier_ones() -> None:
    def package(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 2 or (ROOT / parts[-1]).is_dir() else None

    wrong = sorted(
        f"{a} -> {b}" for a, targets in _graph().items() for b in targets
        if package(a) in ORDER and package(b) in ORDER
        and ORDER.index(package(b)) > ORDER.index(package(a))
    )
    assert not wrong, wrong


def test_modules_inside_a_package_import_only_earlier_ones() -> None:
    graph = _graph()
    for package, order in MODULE_ORDER.items():
        prefix = f"primekd.{package}."
        inside = {m.removeprefix(prefix) for m in graph if m.startswith(prefix)}
        assert inside == set(order), f"place every {package} module in MODULE_ORDER"
        wrong = sorted(f"{a} -> {b}" for a in order for b in graph[prefix + a]
                       if b.startswith(prefix) and order.index(b.removeprefix(prefix))
                       > order.index(a))
        assert not wrong, wrong


def test_the_check_sees_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
