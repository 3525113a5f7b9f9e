"""Writing output files all or nothing: through a temporary file renamed into place."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from slimfx.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file in the same folder, renamed into place on success."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a finished file gets the usual permissions
        os.replace(tmp, target)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


class StagedOutputs:
    """Several output files written all or nothing.

    ``path(target)`` gives a temporary path beside ``target`` (same suffix, so writers that
    check it work; ``companions`` are suffixes of files the writer puts beside it, such as
    OpenVINO's ``.bin``). ``commit()`` moves every staged file into place with the usual
    permissions; leaving the ``with`` block without committing (an error, Ctrl-C) removes them.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path, tuple[str, ...]]] = []
        self._committed = False

    def path(self, target: str | Path, companions: tuple[str, ...] = ()) -> Path:
        target = Path(target)
        folder = target.parent if str(target.parent) else Path(".")
        try:
            fd, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=target.suffix, dir=folder)
        except OSError as exc:
            raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
        os.close(fd)
        staged = Path(name)
        self._staged.append((staged, target, companions))
        return staged

    def commit(self) -> None:
        mask = _umask()
        for staged, target, companions in self._staged:
            for suffix in ("", *companions):
                source = staged.with_suffix(suffix) if suffix else staged
                os.chmod(source, 0o666 & ~mask)
                os.replace(source, target.with_suffix(suffix) if suffix else target)
        self._committed = True

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._committed:
            return
        for staged, _, companions in self._staged:
            for suffix in ("", *companions):
                leftover = staged.with_suffix(suffix) if suffix else staged
                if leftover.exists():
                    leftover.unlink()
