"""``python -m slimfx`` and the ``slimfx`` console script: the command line (what
``torchrun -m slimfx compile ...`` starts). The CLI, and torch with it, load inside the guard,
so Ctrl-C during start-up is a clean interrupt (status 130), not a traceback."""

import os
import sys

EXIT_INTERRUPTED = 130  # as cli.EXIT_INTERRUPTED, which may not be loaded yet


def run() -> int:
    try:
        _import_numpy_first()
        from slimfx.cli import main
    except KeyboardInterrupt:
        print("slimfx: interrupted", file=sys.stderr)
        _exit_interrupted()
    code = main()
    if code == EXIT_INTERRUPTED:
        _exit_interrupted()
    return code


def _import_numpy_first() -> None:
    """Load NumPy from Python before torch does: torch's C start-up imports NumPy itself and
    clears any error it raises, so a Ctrl-C that lands there would be lost and the run go on."""
    try:
        import numpy  # noqa: F401
    except ImportError:  # NumPy is optional for torch and for slimfx
        pass


def _exit_interrupted() -> None:
    """Exit with status 130 now. A Ctrl-C that landed while an extension ran Python code from C
    (pybind11 does, as torch loads) makes CPython kill itself with SIGINT at the end even when
    the KeyboardInterrupt was handled; leaving before that finalization keeps the status."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(run())
