"""The package's shape: the node loads no lab code, and no modules import each other."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from conftest import run_python

PACKAGE = Path(__file__).resolve().parents[1] / "ldct_node"

#: What ``ldct-node serve``, ``denoise`` and the admin commands import before they run.
NODE_ENTRY_MODULES = ("ldct_node.cli", "ldct_node.service.node", "ldct_node.offline")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports when it is loaded (not inside functions)."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in modules else target)
            elif isinstance(node, ast.If | ast.Try | ast.With):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): module_level_imports(p, modules) for p in paths}


def test_the_node_loads_no_lab_module() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for name in {NODE_ENTRY_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('ldct_node'))))\n"
    )
    res = run_python(code, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = json.loads(res.stdout.splitlines()[-1])
    assert "ldct_node.service.node" in loaded
    assert [m for m in loaded if m == "ldct_node.lab" or m.startswith("ldct_node.lab.")] == []


def test_the_package_import_graph_has_no_cycles() -> None:
    graph = import_graph()
    assert graph["ldct_node.service.node"]  # the walk sees imports at all
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def walk(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                walk(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert cycles == []
