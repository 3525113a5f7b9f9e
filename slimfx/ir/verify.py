"""Graph lint and numerical comparison of two graphs on the same inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from slimfx.errors import VerificationError
from slimfx.ir.graph import Graph, attribute
from slimfx.ir.meta import node_kind
from slimfx.ir.source import node_source_line
from slimfx.metrics import relative_error


def lint(graph: Graph) -> None:
    """fx's own lint plus: every module and attribute a node names exists."""
    try:
        graph.module.graph.lint()
    except Exception as exc:
        raise VerificationError(f"graph lint failed: {exc}") from exc
    for node in graph.nodes():
        if node.op in ("call_module", "get_attr"):
            try:
                attribute(graph.module, str(node.target))
            except AttributeError as exc:
                raise VerificationError(
                    f"node '{node.name}' ({node.op}) refers to '{node.target}', which the module does not have"
                ) from exc


@dataclass(frozen=True)
class Comparison:
    """How two modules' outputs compare on the same inputs."""

    relative_error: float
    reference_shapes: tuple[tuple[int, ...], ...]
    candidate_shapes: tuple[tuple[int, ...], ...]

    @property
    def shapes_match(self) -> bool:
        return self.reference_shapes == self.candidate_shapes


def run_outputs(module: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every tensor ``module`` returns for ``inputs``, flattened in order."""
    with torch.no_grad():
        return [t for t in tree_flatten(module(*inputs))[0] if isinstance(t, torch.Tensor)]


def compare_outputs(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> Comparison:
    """Shapes of both output lists and the worst relative error over their tensors."""
    ref_shapes = tuple(tuple(t.shape) for t in reference)
    new_shapes = tuple(tuple(t.shape) for t in candidate)
    if ref_shapes != new_shapes:
        return Comparison(float("inf"), ref_shapes, new_shapes)
    error = max((relative_error(r, c) for r, c in zip(reference, candidate)), default=0.0)
    return Comparison(error, ref_shapes, new_shapes)


def compare(reference: nn.Module, candidate: nn.Module, inputs: Sequence[torch.Tensor]) -> Comparison:
    """Run both modules on ``inputs`` and compare their outputs."""
    return compare_outputs(run_outputs(reference, inputs), run_outputs(candidate, inputs))


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether no floating tensor holds inf or nan."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


class _FirstNonFinite(fx.Interpreter):
    """Runs a graph and remembers the first node whose result holds inf or nan."""

    found: fx.Node | None = None

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        if self.found is None and node.op != "output":
            tensors = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
            if not all_finite(tensors):
                self.found = node
        return result


def first_non_finite(module: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> str | None:
    """Where inf or nan first appears when ``module`` runs on ``inputs`` (node, module, source
    line), or None when every value is finite."""
    interpreter = _FirstNonFinite(module)
    with torch.no_grad():
        interpreter.run(*inputs)
    node = interpreter.found
    if node is None:
        return None
    where = f"node '{node.name}'"
    if node.op == "call_module":
        where += f" (module '{node.target}', {type(module.get_submodule(str(node.target))).__name__})"
    else:
        where += f" ({node_kind(node, None)})"
    line = node_source_line(node)
    return where + (f" at {line}" if line else "")
