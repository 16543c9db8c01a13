"""The package's layers: imports point one way, function-level imports included.

    base (errors, config, hparams, io, runtime, progress, _version, checkpoint_files) → data, zoo/weights → models
    → methods, convert, catalog → augment → engine → api, export, hub, report, viz
    → cli (with cli_options, cli_bench, cli_zoo), bench, checks

``viz`` (results.png, ``kdcli viz``) sits with the API, which wires results.png into every run; it imports
nothing above the engine.

A module may import its own layer and the layers below it, never one above; and no two modules may
import each other, directly or through others (no cycles), except inside one unit: a package and its
submodules, and the zoo with its weight cache (``zoo/weights``: a zoo entry names its weights, the
cache resolves an entry's converted folder; one unit in the design). The walk reads every ``import`` and
``from ... import`` in the source with :mod:`ast`, so an import hidden inside a function counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kdcli

ROOT = Path(kdcli.__file__).parent
LAYERS: list[set[str]] = [
    {"errors", "config", "hparams", "io", "runtime", "progress", "_version", "checkpoint_files"},
    {"data", "zoo", "weights"},
    {"models"},
    {"methods", "convert", "catalog"},
    {"augment"},
    {"engine"},
    {"api", "export", "hub", "report", "viz"},
    {"cli", "cli_options", "cli_bench", "cli_zoo", "bench", "checks", "__main__", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The kdcli modules ``name`` imports (``from .x import y`` counts as ``x.y`` when that is a module)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kdcli":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kdcli")
    return {m for m in found if m != name}


def unit(module: str) -> str:
    """The layer unit of a module: its top-level subpackage or module (``kdcli`` itself is ``__init__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer() -> None:
    missing = sorted({unit(m) for m in modules()} - set(RANK))
    assert not missing, f"add these to LAYERS (and to the docstring): {missing}"


def test_no_upward_imports() -> None:
    bad = [f"{a} -> {b}" for a, targets in graph().items() for b in sorted(targets)
           if RANK[unit(b)] > RANK[unit(a)]]
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    g = graph()
    # Tarjan's strongly connected components: any component of two or more modules is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    # a package importing its own submodules (kdcli.x → kdcli.x.y → kdcli.x) is how packages re-export;
    # the zoo and the weight cache are one unit
    def cycle_unit(m: str) -> str:
        u = unit(m)
        return "zoo/weights" if u in ("zoo", "weights") else u

    real = [c for c in cycles if len({cycle_unit(m) for m in c}) > 1]
    assert not real, "import cycles:\n" + "\n".join(" ↔ ".join(c) for c in real)


def test_the_walk_sees_function_level_imports(tmp_path: Path) -> None:
    src = tmp_path / "kdcli" / "engine"
    src.mkdir(parents=True)
    f = src / "x.py"
    f.write_text("def f():\n    from ..viz import plots\n    from . import y\n")
    known = {"kdcli.engine.x": f, "kdcli.viz.plots": f, "kdcli.engine.y": f}
    assert imports("kdcli.engine.x", f, known) == {"kdcli.viz.plots", "kdcli.engine.y"}
