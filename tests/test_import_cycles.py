"""The package's modules import downward only: no import cycle, counting imports inside functions."""
import ast
import os
import os.path as osp

from conftest import REPO

PACKAGE = "torchreid_ext"


def _modules():
    """``{dotted module name: path}`` of every module of the package (``pkg.__init__`` as ``pkg``)."""
    found = {}
    root = osp.join(REPO, PACKAGE)
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".py"):
                rel = osp.relpath(osp.join(folder, name), REPO)[:-3].replace(os.sep, ".")
                found[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = osp.join(folder, name)
    return found


def _is_package(path: str) -> bool:
    return osp.basename(path) == "__init__.py"


def import_graph():
    """``{module: {imported package module, ...}}`` from every import statement, at any depth."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if _is_package(path) else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import pkg.mod.attr` -> the module part
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_reads_imports_inside_functions():
    graph = import_graph()
    assert "torchreid_ext.models.msfl" in graph["torchreid_ext.models"]  # a top-level import
    assert "torchreid_ext.models.complexity" in graph["torchreid_ext.builders"]  # inside model_complexity()


def test_no_import_cycles():
    graph = import_graph()
    # the package's face imports what it re-exports; a module importing the face (e.g. for
    # __version__) is an edge to every module the face imports, so it counts too
    assert cycles(graph) == []
