"""One exception family for everything slimfx reports to a user.

Every message says what was wrong, where (node, module path, source line) and what to do.
The CLI prints these without a traceback and exits with status 2.
"""
from __future__ import annotations


class SlimfxError(Exception):
    """Base class of every error slimfx raises on purpose."""


class ModelSpecError(SlimfxError):
    """A MODEL argument could not be resolved into an nn.Module."""


class UnsafeModelFileError(ModelSpecError):
    """A model file would run arbitrary code when loaded and the user did not trust it."""


class CaptureError(SlimfxError):
    """torch.fx could not trace the model."""


class ShapeError(SlimfxError):
    """Shape propagation failed at a node (usually inputs of the wrong shape)."""


class PassSpecError(SlimfxError):
    """A pipeline spec names an unknown pass or option, or gives an invalid value."""


class PassOrderError(SlimfxError):
    """Two passes of a pipeline are in an order one of them forbids."""


class VerificationError(SlimfxError):
    """A graph failed lint or a numerical comparison against its reference."""


class PassError(SlimfxError):
    """A pass crashed or its result failed verification; names the pass and its history."""


class OutputError(SlimfxError):
    """An output file could not be written."""
