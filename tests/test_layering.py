"""The architecture as tests: no import cycles, each layer imports only the layers below it."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import networkx as nx
import pytest

import slimfx
from slimfx.passes.base import Pass
from slimfx.passes.registry import PASSES

PACKAGE = Path(slimfx.__file__).parent

# Lowest first; a module may import modules of its own layer or of a layer below it.
LAYERS: list[tuple[str, ...]] = [
    (
        "slimfx.errors",
        "slimfx.metrics",
        "slimfx.details",
        "slimfx.ir.meta",
        "slimfx.ir.ops",
        "slimfx.ir.source",
        "slimfx.parallel",
    ),
    ("slimfx.ir", "slimfx.data", "slimfx.fidelity"),
    ("slimfx.cost_model", "slimfx.lowrank", "slimfx.prune", "slimfx.rewrites", "slimfx.files"),
    ("slimfx.quant", "slimfx.exits", "slimfx.train"),
    ("slimfx.backends",),
    ("slimfx.passes",),
    ("slimfx.target",),
    ("slimfx.report",),
    ("slimfx.api",),
    ("slimfx", "slimfx.cli", "slimfx.demo"),
]
PASS_INFRASTRUCTURE = {
    "slimfx.passes",
    "slimfx.passes.base",
    "slimfx.passes.manager",
    "slimfx.passes.registry",
    "slimfx.passes.candidates",
    "slimfx.passes.channel_order",
    "slimfx.passes.layer_rewrite",
    "slimfx.passes.rewrite_speed",
}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def source_of(name: str) -> Path:
    relative = Path(*name.split(".")[1:])
    package = PACKAGE / relative / "__init__.py"
    return package if package.exists() else (PACKAGE / relative).with_suffix(".py")


def imports_of(name: str, known: set[str]) -> set[str]:
    """slimfx modules ``name`` imports anywhere in its code (functions included), except
    under ``if TYPE_CHECKING:``; ``from package import module`` counts as the module."""
    tree = ast.parse(source_of(name).read_text())
    guarded = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("slimfx"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
    found.discard(name)
    return found


def import_graph() -> nx.DiGraph:
    known = set(module_names())
    graph = nx.DiGraph()
    for name in known:
        graph.add_node(name)
        for imported in imports_of(name, known):
            graph.add_edge(name, imported)
    return graph


def layer_of(name: str) -> int:
    best = max(
        (prefix for layer in LAYERS for prefix in layer if name == prefix or name.startswith(prefix + ".")), key=len
    )
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def test_no_module_imports_one_that_imports_it_back() -> None:
    cycles = list(nx.simple_cycles(import_graph()))
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles)


def test_each_layer_imports_only_the_layers_below_it() -> None:
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, b in import_graph().edges
        if layer_of(b) > layer_of(a)
    ]
    assert upward == []


def test_ir_data_imports_nothing_of_slimfx_and_nothing_imports_the_api() -> None:
    graph = import_graph()
    assert not [b for b in graph.successors("slimfx.ir.meta")]
    assert set(graph.predecessors("slimfx.api")) <= {"slimfx"}  # the package loads it lazily, on first use
    assert slimfx.compile is importlib.import_module("slimfx.api").compile


def test_passes_holds_pass_infrastructure_and_one_pass_per_module() -> None:
    for name in [n for n in module_names() if n.startswith("slimfx.passes")]:
        if name in PASS_INFRASTRUCTURE:
            continue
        module = importlib.import_module(name)
        defined = [
            obj
            for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, Pass) and obj.__module__ == name
        ]
        assert len(defined) == 1 and PASSES[defined[0].name] is defined[0], f"{name} must define one registered pass"


@pytest.mark.parametrize("side_channel", ["attachments", "r.name ==", "p.name =="])
def test_no_side_channel_or_branch_on_pass_names(side_channel: str) -> None:
    hits = [
        f"{path.relative_to(PACKAGE)}:{i}"
        for path in PACKAGE.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if side_channel in line
    ]
    assert hits == []
