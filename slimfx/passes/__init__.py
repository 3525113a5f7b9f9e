"""Passes: importing this package registers every built-in pass."""
from slimfx.passes import early_exit, factorize_convs, fold_bn, prune_channels, quantize  # noqa: F401  (registers the passes)
from slimfx.passes.base import Decision, Pass, PassContext, PassResult
from slimfx.passes.manager import PassManager, PassRecord
from slimfx.passes.registry import PASSES, parse_pipeline, register

__all__ = ["Decision", "Pass", "PassContext", "PassResult", "PassManager", "PassRecord", "PASSES", "parse_pipeline", "register"]
