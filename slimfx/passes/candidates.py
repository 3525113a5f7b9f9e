"""Which layers a pass may rewrite: one eligibility rule for every pass.

A layer is a candidate when it is of the pass's types, the pass's own technique accepts it
(``why_not``), its module runs at this node only and takes one input, and no ``exclude``
pattern (fnmatch on the module path, ``layer4.*``) names it. Otherwise the first reason is
kept, for the pass to report as a declined decision.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn as nn

from slimfx.ir.graph import Graph

WhyNot = Callable[[fx.Node, nn.Module], "str | None"]


def excluding_pattern(target: str, patterns: Sequence[str]) -> str | None:
    """The first of ``patterns`` that matches module path ``target``, or None."""
    return next((p for p in patterns if fnmatch.fnmatchcase(target, p)), None)


def exclusion_reason(target: str, patterns: Sequence[str]) -> str | None:
    """``"excluded by pattern 'P'"`` when a pattern names ``target``, else None."""
    pattern = excluding_pattern(target, patterns)
    return None if pattern is None else f"excluded by pattern '{pattern}'"


@dataclass
class Candidates:
    """Layers a pass may rewrite (graph order) and, by node name, why the others are left alone."""

    eligible: list[fx.Node] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)


def layer_candidates(
    graph: Graph,
    types: tuple[type, ...],
    exclude: Sequence[str] = (),
    why_not: WhyNot | None = None,
    one_input: bool = True,
) -> Candidates:
    """Every call_module node running a module of ``types``, sorted into eligible and declined
    (``one_input=False`` for layers that take several inputs, such as attention)."""
    found = Candidates()
    for node in graph.nodes():
        if node.op != "call_module" or not isinstance(graph.submodule(node), types):
            continue
        module = graph.submodule(node)
        reason = (
            (why_not(node, module) if why_not is not None else None)
            or graph.why_not_single_call(node, one_input)
            or exclusion_reason(str(node.target), exclude)
        )
        if reason is None:
            found.eligible.append(node)
        else:
            found.declined[node.name] = reason
    return found
