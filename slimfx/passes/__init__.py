"""Passes: importing this package registers every built-in pass."""

from slimfx.passes import (  # noqa: F401  (registers the passes)
    add_exits,
    crelu,
    distill,
    drop_blocks,
    factorize_convs,
    fire,
    fold_bn,
    group_convs,
    mixconv,
    octave,
    prune_channels,
    quantize,
)
from slimfx.passes.base import Action, DataNeed, Decision, Pass, PassContext, PassResult
from slimfx.passes.manager import PassManager, PassRecord, PipelineResult
from slimfx.passes.registry import PASSES, parse_pipeline, register

__all__ = [
    "Action",
    "DataNeed",
    "Decision",
    "Pass",
    "PassContext",
    "PassResult",
    "PassManager",
    "PassRecord",
    "PipelineResult",
    "PASSES",
    "parse_pipeline",
    "register",
]
