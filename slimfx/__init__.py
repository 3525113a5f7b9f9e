"""slimfx: a graph-rewriting compiler for efficient neural networks in PyTorch."""

from slimfx import passes, train
from slimfx.api import CompileResult, analyze, compile
from slimfx.errors import SlimfxError
from slimfx.files.model_spec import load_model

__all__ = ["CompileResult", "SlimfxError", "analyze", "compile", "load_model", "passes", "train"]
__version__ = "0.1.0"
