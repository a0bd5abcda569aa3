"""The package's modules import each other without a circle (imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

import sparse_compile

PACKAGE_DIR = Path(sparse_compile.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """Package modules named by one import statement (``from a import b`` names ``a.b`` when it is a module)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = set()
    for alias in node.names:
        if f"{source}.{alias.name}" in modules:
            found.add(f"{source}.{alias.name}")
        elif source in modules:
            found.add(source)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, from every import statement in its source."""
    paths = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    modules = set(paths)
    graph = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = set().union(*(_imported(n, name, is_package, modules) for n in ast.walk(tree))) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or ``None``."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> list[str] | None:
        if module in visiting:
            return visiting[visiting.index(module):] + [module]
        if module in done:
            return None
        visiting.append(module)
        for target in sorted(graph[module]):
            cycle = visit(target)
            if cycle:
                return cycle
        visiting.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_the_import_graph_sees_imports_inside_functions_and_relative_ones():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("def f():\n    from sparse_compile.methods import base\n")
    modules = {"sparse_compile.methods", "sparse_compile.methods.base"}
    found = set().union(*(_imported(n, "sparse_compile.x", False, modules) for n in ast.walk(tree)))
    assert found == {"sparse_compile.methods.base"}


def test_no_import_circle_among_the_package_modules():
    graph = import_graph()
    assert "sparse_compile.registry" in graph["sparse_compile.options"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_methods_do_not_import_the_runtime_and_options_do_not_import_methods():
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("sparse_compile.methods"):
            assert not any(t.startswith("sparse_compile.runtime") for t in targets), module
    assert not any(t.startswith("sparse_compile.methods") for t in graph["sparse_compile.options"])
