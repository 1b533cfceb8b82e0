"""The shape of the house: imports run one way (no cycle, not even one hidden inside a function), and the
collectives live in one room that imports only the standard library and torch."""
import ast
import sys
from pathlib import Path

import spkver

PACKAGE = Path(spkver.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str):
    """``(imported module, line, inside a function)`` for every import of ``name``'s source, wherever it is."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    functions = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef,
                                                                                 ast.AsyncFunctionDef))
                 for node in ast.walk(function)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                  else []))
            # "from package import module" imports the module; "from module import name" the module itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            yield target, node.lineno, id(node) in functions


def _with_parent_packages(importer: str, target: str):
    """``target`` and the packages Python imports first to reach it, except those ``importer`` is inside
    (a package's own modules run while it is being imported)."""
    parts = target.split(".")
    for depth in range(2, len(parts) + 1):
        module = ".".join(parts[:depth])
        if module in MODULES and (module == target or not importer.startswith(module + ".")):
            yield module


def _graph():
    return {name: {module for target, _, _ in _imports(name) if target in MODULES
                   for module in _with_parent_packages(name, target) if module != name}
            for name in MODULES}


def _cycles(graph):
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_package_has_no_import_cycle_not_even_through_an_import_inside_a_function():
    assert len(MODULES) > 30
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_collectives_live_in_one_module_that_imports_only_the_standard_library_and_torch():
    imported = {target.split(".")[0] for target, _, _ in _imports("spkver.distributed")}
    assert imported <= set(sys.stdlib_module_names) | {"torch", "__future__"}, imported
    collectives = ("all_reduce(", "all_gather(", "broadcast(", "reduce_scatter(")
    users = sorted(name for name, path in MODULES.items() if name != "spkver.distributed"
                   and any(f"dist.{call}" in path.read_text() for call in collectives))
    assert users == [], f"collectives outside spkver/distributed.py: {users}"
