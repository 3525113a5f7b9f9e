"""slimfx: a graph-rewriting compiler for efficient neural networks in PyTorch.

The names below load on first use (PEP 562), so ``import slimfx`` and the command line start
without importing torch first: Ctrl-C while torch loads is still a clean interrupt.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimfx import passes, train
    from slimfx.api import CompileResult, analyze, compile, plan_target
    from slimfx.backends.early_exit_onnx import OnnxEarlyExit
    from slimfx.errors import SlimfxError
    from slimfx.files.model_spec import load_model

_LAZY = {
    "CompileResult": "slimfx.api",
    "analyze": "slimfx.api",
    "compile": "slimfx.api",
    "plan_target": "slimfx.api",
    "OnnxEarlyExit": "slimfx.backends.early_exit_onnx",
    "SlimfxError": "slimfx.errors",
    "load_model": "slimfx.files.model_spec",
}
_SUBMODULES = ("passes", "train", "report")

__all__ = [
    "CompileResult",
    "OnnxEarlyExit",
    "SlimfxError",
    "analyze",
    "compile",
    "load_model",
    "passes",
    "plan_target",
    "train",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"slimfx.{name}")
    else:
        raise AttributeError(f"module 'slimfx' has no attribute {name!r}")
    globals()[name] = value
    return value
