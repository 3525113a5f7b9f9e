"""Finding the user's source line behind a failure or a traced node."""

from __future__ import annotations

import os
import re
import traceback

import torch
import torch.fx as fx

_LIBRARY_DIRS = (
    os.path.dirname(torch.__file__),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # slimfx itself
)
_FRAME_LINE = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+)')


def is_user_file(path: str) -> bool:
    """True for a real file outside torch and slimfx (generated ``<...>`` code is not)."""
    if path.startswith("<"):
        return False
    return not os.path.abspath(path).startswith(_LIBRARY_DIRS)


def exception_source_line(exc: BaseException) -> str | None:
    """``path:LINE: code`` of the innermost traceback frame in user code."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if is_user_file(frame.filename):
            code = f": {frame.line.strip()}" if frame.line else ""
            return f"{frame.filename}:{frame.lineno}{code}"
    return None


def node_source_line(node: fx.Node) -> str | None:
    """``path:LINE`` of the innermost user frame fx recorded when it created ``node``."""
    frames = _FRAME_LINE.findall(node.stack_trace or "")
    user = [f"{path}:{line}" for path, line in frames if is_user_file(path)]
    return user[-1] if user else None
