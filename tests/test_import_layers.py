"""The package's import graph: no cycle, and no import from a lower layer to a higher one.

Read with the standard library's ``ast`` over ``orchestrator/`` (no module is imported), counting
every import that runs: module level and inside functions (the lazy imports of optional
frameworks count too), but not those under ``if TYPE_CHECKING:``, which never run. ``from pkg
import name`` counts as importing ``pkg.name`` when that is a module. The layers are the ones the
README's architecture section lists; a new module must be placed in one here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "orchestrator"

#: Bottom up. A module may import its own layer and the layers below it, nothing above.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["errors", "retry", "store_location", "storage_errors", "optional", "yaml_docs", "fork_safety",
                    "machine", "meter", "ray_runtime"]),
    ("store handle", ["manifest_faults", "manifest", "blobs", "packs", "handle"]),
    ("query, scan, access", ["query", "query.*", "access", "access.*", "scan", "diff", "stats"]),
    ("read plan and reader", ["stream", "stream.*"]),
    ("adapters", ["adapters", "adapters.*"]),
    ("ingest, train, verify", ["ingest", "ingest.*", "train", "train.batches", "train.config",
                               "train.data", "train.lineage", "train.loops", "train.metrics",
                               "train.models", "train.models.*", "train.placement", "train.position",
                               "train.progress", "train.display", "train.storage", "verify", "optimize", "vacuum",
                               "export"]),
    ("developer tooling", ["dev", "dev.*"]),
    ("facade, CLI, run driver", ["dataset", "store", "", "train.runner", "cli", "__main__", "sheet",
                                 "browse", "browse.*"]),
]


def module_names() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of this package that ``path`` imports at run time ('' is the package itself)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for n in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = []
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.append(sub if sub.removeprefix("orchestrator.") in modules else node.module)
        else:
            continue
        for name in names:
            if name == "orchestrator" or name.startswith("orchestrator."):
                found.add(name.removeprefix("orchestrator").removeprefix("."))
    return {m for m in found if m in modules}


def layer_of(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return i
    raise AssertionError(f"module orchestrator.{module} is in no layer: place it in LAYERS (and the README)")


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_imports_a_higher_layer():
    g = graph()
    upward = [f"orchestrator.{m} ({LAYERS[layer_of(m)][0]}) imports orchestrator.{d} ({LAYERS[layer_of(d)][0]})"
              for m in sorted(g) for d in sorted(g[m]) if layer_of(d) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_the_checker_sees_cycles_and_upward_imports():
    """The two checks above would fail on a bad graph (they are not vacuous)."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    g = graph()
    assert "handle" in g["store"] and "manifest" in g["handle"]  # the parser sees real imports
    assert layer_of("adapters.torch") > layer_of("stream.reader") > layer_of("handle")


def test_the_package_exports_a_sorted_all():
    import orchestrator

    assert orchestrator.__all__ == sorted(orchestrator.__all__)
    assert all(hasattr(orchestrator, name) for name in orchestrator.__all__)
