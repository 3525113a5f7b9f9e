"""One exception family for everything slimfx reports to a user, one class per kind of problem.

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


class DataError(SlimfxError):
    """Calibration or training data is missing, empty, or not shaped like the model's inputs."""


class InvalidArgumentError(SlimfxError, ValueError):
    """A Python API function got an argument value it cannot use (also a ValueError)."""


class NonFiniteError(SlimfxError):
    """The model's weights or activations hold inf or nan, so no result could be trusted."""


class VerificationError(SlimfxError):
    """A graph failed lint or a numerical comparison against its reference."""


class RewriteError(SlimfxError):
    """A graph change was asked for on a node it does not apply to (a bug in the calling pass)."""


class PassError(SlimfxError):
    """A pass crashed or its result failed verification; names the pass and its history."""


class BackendError(SlimfxError):
    """A runtime or exporter (onnxruntime, torch's int8 kernels) is missing or cannot run the model."""


class OutputError(SlimfxError):
    """An output file could not be written."""


class StrictFailure(SlimfxError):
    """Under --strict: the compile finished with warnings, so nothing was written."""
