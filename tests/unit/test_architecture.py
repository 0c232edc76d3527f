"""The architecture, checked: imports run one way between floors, nothing imports in a circle, every
package says what it is for, and no module grows past 400 lines without saying why.

Read from the source with `ast` (nothing is imported, so the test takes well under a second):

- Every `import` and `from ... import` counts, at any depth: an import inside a function is still a
  dependency, it only runs later. Imports under `if TYPE_CHECKING:` are left out: they never run, and
  they are the one sanctioned way to name a type from above without depending on it.
- `from a.b import c` depends on the module `a.b.c` when that is a module of the product, otherwise on
  `a.b`. `import a.b.c` depends on `a.b.c`. The implicit import of parent packages' `__init__` is not
  counted (the package `__init__` files here hold docstrings and re-exports only).
- Product packages: chimera, registry, replicas, training, loadtest, rollout, gateway. Not scanned: the
  tests, the generated stubs `chimera/v1/*_pb2*.py` and the Alembic scripts under `registry/migrations`.

The floors (lowest first) are the table `FLOORS` below, the one written statement of the layering
(README's "Architecture in a paragraph" describes it in prose). A module may import from its own floor
or below, never from above. `FORBIDDEN` adds the rules that floors cannot say (rollout has no gRPC,
training gets the load-test gate injected). A new module falls under the most specific pattern that
matches it; a module no pattern matches fails `test_every_module_has_a_floor`.

Size rule: a product module over `MAX_LINES` lines must carry, in its module docstring, a sentence
beginning with `LONG_MODULE_MARKER` ("Over 400 lines because ...") that says why it should stay whole.
"""

from __future__ import annotations

import ast
import fnmatch
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("chimera", "registry", "replicas", "training", "loadtest", "rollout", "gateway")
NOT_SCANNED = ("chimera/v1/*_pb2*.py", "registry/migrations/*")
MAX_LINES = 400
LONG_MODULE_MARKER = "Over 400 lines because"

# Lowest floor first. Patterns: "a.b" is that module (or package __init__) only; "a.b.*" is the package
# a.b and everything below it. The most specific pattern (longest stem, exact before ".*") wins.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("chimera", "chimera.*", "chimera.v1.*", "chimera.settings", "chimera.client",
                "chimera.tracing")),
    ("registry", ("registry.*",)),
    ("domain", ("replicas.*", "training.*", "loadtest.*", "rollout.*")),
    ("gateway ground", ("gateway.metrics", "gateway.drain")),
    ("gateway records", ("gateway.records.*",)),
    ("gateway serving", ("gateway.serving.*",)),
    ("gateway api", ("gateway.api.*",)),
    ("gateway process", ("gateway", "gateway.config", "gateway.server", "gateway.background")),
    ("top", ("chimera.cli.*", "chimera.demo.*", "chimera.__main__")),
]

# Packages that hold two storeys: `chimera` is both the ground floor (stubs, settings, client, tracing) and
# the top (the CLI and demo, the composition root). For the package-cycle check each storey counts as a
# package of its own, "chimera (ground)" and "chimera (top)"; otherwise every package that reads settings
# and is wired by the CLI would be "in a cycle" with chimera by construction.
TWO_STOREY = ("chimera",)

# Imports a package may never make, whatever the floors say (patterns match the imported module's full
# dotted name, third-party ones included).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "rollout": ("gateway", "gateway.*", "grpc", "grpc.*", "grpc_*", "chimera.v1.*_pb2_grpc"),
    "training": ("loadtest", "loadtest.*"),
}


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: int
    is_package: bool
    imports: list[tuple[str, int]] = field(default_factory=list)  # (imported module, line), any module
    names: list[tuple[tuple[str, ...], int]] = field(default_factory=list)  # names per import (FORBIDDEN)


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement at any depth, except the bodies of `if TYPE_CHECKING:` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


@cache
def product_modules() -> dict[str, Module]:
    """Every scanned module by dotted name. Where a package `a/b/` and a module `a/b.py` both exist,
    the package wins, as it does for Python's import system (test_no_module_is_shadowed says so)."""
    modules: dict[str, Module] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if "__pycache__" in path.parts or any(fnmatch.fnmatch(rel, p) for p in NOT_SCANNED):
                continue
            source = path.read_text()
            name, is_package = _module_name(path)
            if name in modules and not is_package:
                continue
            modules[name] = Module(name, path, ast.parse(source, rel), source.count("\n"), is_package)
    for mod in modules.values():
        own_package = mod.name if mod.is_package else mod.name.rpartition(".")[0]
        for node in _runtime_imports(mod.tree):
            if isinstance(node, ast.Import):
                mod.imports.extend((alias.name, node.lineno) for alias in node.names)
                mod.names.extend(((alias.name,), node.lineno) for alias in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                anchor = own_package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                mod.imports.append((sub if sub in modules else base, node.lineno))
                mod.names.append(((base, sub), node.lineno))
    return modules


def module_graph() -> dict[str, dict[str, int]]:
    """importer -> {imported product module: first line}, product modules only, no self-edges."""
    modules = product_modules()
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for mod in modules.values():
        for target, line in mod.imports:
            while target and target not in modules:  # `import a.b.c` of a name inside a.b -> a.b
                target = target.rpartition(".")[0]
            if target and target != mod.name:
                graph[mod.name].setdefault(target, line)
    return graph


def floor_of(module: str) -> int | None:
    """Index into FLOORS of the most specific matching pattern, None when no pattern matches."""
    best: tuple[int, int] | None = None  # (specificity, floor)
    for index, (_, patterns) in enumerate(FLOORS):
        for pattern in patterns:
            if pattern.endswith(".*"):
                stem = pattern[:-2]
                hit = module == stem or module.startswith(stem + ".")
                rank = 2 * len(stem)
            else:
                hit = module == pattern
                rank = 2 * len(pattern) + 1
            if hit and (best is None or rank > best[0]):
                best = (rank, index)
    return None if best is None else best[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component of more than one node (Tarjan, then a
    breadth-first walk back to the component's first node), sorted so the message is stable."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    found = []
    for component in components:
        members = set(component)
        start = component[0]
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w not in previous:
                        previous[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while (step := previous[path[-1]]) != start:
            path.append(step)
        found.append([start, *reversed(path[1:]), start])
    return sorted(found)


def _child_of(package: str, module: str) -> str | None:
    """The direct child of `package` ("" is the root) that contains `module`, or None if outside."""
    prefix = package + "." if package else ""
    if not module.startswith(prefix) or module == package:
        return None
    return prefix + module[len(prefix):].split(".")[0]


def _node(package: str, module: str) -> str | None:
    """The package-cycle graph's node for `module` seen from `package`: its direct child there, with
    the floor appended for a TWO_STOREY child."""
    child = _child_of(package, module)
    if child in TWO_STOREY and (floor := floor_of(module)) is not None:
        return f"{child} ({FLOORS[floor][0]})"
    return child


def test_no_module_is_shadowed_by_a_package() -> None:
    """`a/b.py` next to a package `a/b/` is dead code that reads as live (Python imports the package)."""
    shadowed = sorted(
        f"{rel(path)} (shadowed by {rel(path.with_suffix(''))}/)"
        for package in PACKAGES for path in (ROOT / package).rglob("*.py")
        if (path.with_suffix("") / "__init__.py").exists())
    assert not shadowed, "modules shadowed by a package of the same name: " + ", ".join(shadowed)


def test_every_module_has_a_floor() -> None:
    unplaced = sorted(m for m in product_modules() if floor_of(m) is None)
    assert not unplaced, "modules outside every floor (add them to FLOORS): " + ", ".join(unplaced)


def test_no_import_cycle_between_modules() -> None:
    graph = {m: set(targets) for m, targets in module_graph().items()}
    found = [" -> ".join(c) for c in cycles(graph)]
    assert not found, "import cycles between modules:\n  " + "\n  ".join(found)


def test_no_import_cycle_between_packages() -> None:
    """At every level (the root, then each package), the children (sub-packages taken whole, plus the
    package's own modules) must not import each other in a circle. Cycles made only of modules are
    the previous test's business; these are the ones that pass through a sub-package."""
    modules = product_modules()
    edges = [(a, b) for a, targets in module_graph().items() for b in targets]
    packages = [""] + sorted(m.name for m in modules.values() if m.is_package)
    found = []
    for package in packages:
        graph: dict[str, set[str]] = defaultdict(set)
        for a, b in edges:
            ca, cb = _node(package, a), _node(package, b)
            if ca and cb and ca != cb:
                graph[ca].add(cb)
                graph.setdefault(cb, set())
        for cycle in cycles(graph):
            if any(modules[name].is_package for name in (n.split(" ")[0] for n in cycle) if name in modules):
                found.append(f"in {package or 'the root'}: " + " -> ".join(cycle))
    assert not found, "import cycles between packages:\n  " + "\n  ".join(found)


def test_imports_never_go_up_a_floor() -> None:
    graph = module_graph()
    violations = []
    for importer, targets in sorted(graph.items()):
        mine = floor_of(importer)
        for target, line in sorted(targets.items()):
            theirs = floor_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                violations.append(f"{importer} -> {target} (floor {FLOORS[mine][0]} -> floor "
                                  f"{FLOORS[theirs][0]}; {modules_path(importer)}:{line})")
    assert not violations, "imports from a lower floor to a higher one:\n  " + "\n  ".join(violations)


def test_forbidden_imports() -> None:
    violations = []
    for mod in sorted(product_modules().values(), key=lambda m: m.name):
        rules = FORBIDDEN.get(mod.name.split(".")[0], ())
        for names, line in mod.names:
            hits = [name for name in names if any(fnmatch.fnmatchcase(name, rule) for rule in rules)]
            if hits:
                violations.append(f"{mod.name} -> {hits[0]} ({modules_path(mod.name)}:{line})")
    assert not violations, ("imports FORBIDDEN names (rollout: no gateway, no gRPC; training: no loadtest, "
                            "the gate is injected):\n  " + "\n  ".join(sorted(set(violations))))


def test_every_package_opens_with_a_docstring() -> None:
    """A folder of modules without `__init__.py` counts as a package without a docstring (it would be
    a namespace package, which nothing here means to be)."""
    modules = product_modules().values()
    bare = {modules_path(m.name) for m in modules if m.is_package and ast.get_docstring(m.tree) is None}
    bare |= {rel(m.path.parent / "__init__.py") + " (missing)" for m in modules
             if not (m.path.parent / "__init__.py").exists()}
    assert not bare, "package __init__.py files without an opening docstring: " + ", ".join(sorted(bare))


def test_long_modules_say_why() -> None:
    long = []
    for mod in sorted(product_modules().values(), key=lambda m: m.name):
        if mod.lines > MAX_LINES and LONG_MODULE_MARKER not in (ast.get_docstring(mod.tree) or ""):
            long.append(f"{modules_path(mod.name)} ({mod.lines} lines)")
    assert not long, (f"modules over {MAX_LINES} lines whose docstring has no '{LONG_MODULE_MARKER} ...' "
                      "sentence (split them, or say why they stay whole):\n  " + "\n  ".join(long))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def modules_path(name: str) -> str:
    return rel(product_modules()[name].path)


# The checker checks itself on small made-up graphs, so a green run cannot mean a blind test.


def test_cycles_finds_each_circle_once_and_ignores_chains() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": set()}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_floors_pick_the_most_specific_pattern() -> None:
    names = [name for name, _ in FLOORS]
    assert names[floor_of("chimera.settings")] == "ground"
    assert names[floor_of("chimera.some_new_helper")] == "ground"
    assert names[floor_of("chimera.cli")] == "top"
    assert names[floor_of("chimera.cli.serve")] == "top"
    assert names[floor_of("gateway")] == "gateway process"
    assert names[floor_of("gateway.api.prediction")] == "gateway api"
    assert names[floor_of("gateway.metrics")] == "gateway ground"
    assert floor_of("gateway.something_new") is None
    assert floor_of("numpy") is None


def test_two_storey_packages_count_as_two_nodes() -> None:
    assert _node("", "chimera.settings") == "chimera (ground)"
    assert _node("", "chimera.cli") == "chimera (top)"
    assert _node("", "gateway.api.auth") == "gateway"
    assert _node("gateway", "gateway.api.auth") == "gateway.api"
    assert _node("gateway", "gateway.metrics") == "gateway.metrics"
    assert _node("gateway.api", "gateway.serving.router") is None


def test_type_checking_imports_are_left_out_and_function_imports_kept() -> None:
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import gateway\n"
                     "def f():\n    import rollout.stats\n")
    assert sorted(alias.name for node in _runtime_imports(tree) for alias in node.names) == [
        "TYPE_CHECKING", "rollout.stats"]
