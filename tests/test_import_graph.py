"""The import graph of the installed package: fastgpt/, and kernels/ and benchmarks/, which install
as fastgpt.kernels and fastgpt.benchmarks (pyproject.toml, package-dir).

Every module is parsed (never imported) and every import statement counts, a lazy one inside a
function as much as one at the top: a cycle through a lazy import is still two modules that each
need the other. Relative imports are resolved; `from fastgpt.x import name` is an import of the
submodule fastgpt.x.name where there is one, else of fastgpt.x. Not counted: the parent packages
an import runs first (fastgpt.a's __init__ before fastgpt.a.b; a package that imports its own
submodules would otherwise always be a cycle), and imports by a name in a string
(importlib.import_module, as the attention registry loads its built-in backends).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The package's layers, bottom up: a module imports its own layer and the layers below, never one
# above. The kernels know nothing of attention; the attention API and its registry know nothing of
# the GPT; the model knows nothing of training; the training run nothing of verification; the
# benchmarks and the GPU report sit above all of that, and the command line on top.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("fastgpt.machine", "fastgpt.kernels", "fastgpt.ext")),
    ("attention", ("fastgpt.attention", "fastgpt.ops")),
    ("model", ("fastgpt.model", "fastgpt.integrations")),
    ("run", ("fastgpt.run",)),
    ("verify", ("fastgpt.verify",)),
    ("bench", ("fastgpt.bench",)),
    ("cli", ("fastgpt.cli", "fastgpt.__main__")),
]
# Outside the layers: the package root (its public names load lazily from the layers that define
# them) and benchmarks/, the standalone experiment scripts, which may import anything and which
# nothing of the library imports.
OUTSIDE = ("fastgpt", "fastgpt.benchmarks")

Edges = dict[str, dict[str, str]]  # module -> {imported module: "file:line" of the first such import}


def package_dirs() -> dict[str, Path]:
    """pyproject.toml's package-dir: {package name: its source directory}."""
    text = (REPO / "pyproject.toml").read_text()
    table = re.search(r"^package-dir\s*=\s*\{(.*)\}", text, re.MULTILINE)
    assert table, "pyproject.toml has no package-dir table on one line"
    return {name: REPO / path for name, path in re.findall(r'"([\w.]+)"\s*=\s*"([^"]+)"', table.group(1))}


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name, with its source file."""
    found = {}
    for package, root in package_dirs().items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> dict[str, int]:
    """{imported fastgpt module: line of its first import} for the module `name` at `path`."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target and target not in known:  # `import fastgpt.a.b` also names fastgpt.a: keep the module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "fastgpt" or alias.name.startswith("fastgpt."):
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base != "fastgpt" and not base.startswith("fastgpt."):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in known else base, node.lineno)
    return found


def import_graph() -> Edges:
    found = modules()
    known = set(found)
    return {name: {target: f"{path.relative_to(REPO)}:{line}" for target, line in imports_of(name, path, known).items()}
            for name, path in found.items()}


def find_cycles(graph: Edges) -> list[list[str]]:
    """One cycle per strongly connected component that has one (Tarjan), as [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # the graph has ~60 nodes: recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_within(graph, set(c)) for c in components]


def _cycle_within(graph: Edges, component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (by name), found breadth-first."""
    start = min(component)
    parent: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:  # back home: start -> ... -> v -> start
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w in component and w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def describe(graph: Edges, cycle: list[str]) -> str:
    steps = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return "; ".join(steps)


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert {"fastgpt", "fastgpt.ext.ops", "fastgpt.kernels.flash_attention", "fastgpt.bench.common"} <= set(graph)
    # a lazy import inside a function is an edge, and `from package import submodule` names the submodule
    assert "fastgpt.ext.ops" in graph["fastgpt.attention.ext_backend"]
    assert "fastgpt.ext.build" in graph["fastgpt.ext.ops"] and "fastgpt.ext" not in graph["fastgpt.ext.ops"]


def test_the_cycle_finder_names_each_step():
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:2"}, "c": {"a": "c.py:3", "d": "c.py:4"}, "d": {}}
    (cycle,) = find_cycles(graph)
    assert cycle == ["a", "b", "c", "a"]
    assert describe(graph, cycle) == "a -> b (a.py:1); b -> c (b.py:2); c -> a (c.py:3)"
    assert find_cycles({"a": {"b": "x"}, "b": {}}) == []


def test_no_import_cycles():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (each must be broken: imports run one way):\n" + "\n".join(
        f"  {' -> '.join(c)}: {describe(graph, c)}" for c in cycles)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_of(module: str) -> int | None:
    """The index of the module's layer in LAYERS; None for the modules OUTSIDE them."""
    for i, (_, packages) in enumerate(LAYERS):
        if any(_within(module, p) for p in packages):
            return i
    if module == "fastgpt" or _within(module, "fastgpt.benchmarks"):
        return None
    raise AssertionError(f"{module} is in no layer of LAYERS: give it one")


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)  # raises for a module no layer holds


def test_each_layer_imports_only_the_layers_below():
    graph = import_graph()
    offenders = []
    for module, targets in sorted(graph.items()):
        own = layer_of(module)
        if own is None:
            continue
        for target, where in sorted(targets.items()):
            theirs = layer_of(target)
            if target == "fastgpt" or (theirs is not None and theirs > own):
                offenders.append(f"{module} ({LAYERS[own][0]}) -> {target} "
                                 f"({'the package root' if theirs is None else LAYERS[theirs][0]}) at {where}")
            elif theirs is None:  # fastgpt.benchmarks
                offenders.append(f"{module} -> {target} (the benchmark scripts) at {where}")
    assert not offenders, ("imports that climb a layer (bottom up: " + ", ".join(n for n, _ in LAYERS) +
                           "):\n  " + "\n  ".join(offenders))


def test_the_layer_rule_catches_a_climbing_import():
    # the rule itself, on a made-up graph: the model importing the trainer is refused
    assert layer_of("fastgpt.model.gpt") < layer_of("fastgpt.run.trainer")
    assert layer_of("fastgpt.cli.train") == len(LAYERS) - 1 and layer_of("fastgpt.benchmarks.ext_cpu") is None


def test_the_library_never_imports_the_tests():
    offenders = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == "tests" or n.startswith("tests.") for n in names):
                offenders.append(f"{module}:{node.lineno}")
        if "sys.path.insert" in path.read_text() or "sys.path.append" in path.read_text():
            offenders.append(f"{module}: edits sys.path")
    assert not offenders, "the library reaches into tests/ or edits sys.path: " + ", ".join(offenders)


def test_the_extension_build_imports_nothing_of_fastgpt():
    # setup.py runs fastgpt/ext/build.py standalone, and loading is its one job: it knows no client.
    assert import_graph()["fastgpt.ext.build"] == {}
