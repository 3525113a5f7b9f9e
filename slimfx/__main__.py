"""``python -m slimfx`` and the ``slimfx`` console script: the command line (what
``torchrun -m slimfx compile ...`` starts). The CLI, and torch with it, load inside the guard,
so Ctrl-C during start-up is a clean interrupt (status 130), not a traceback."""

import sys


def run() -> int:
    try:
        _import_numpy_first()
        from slimfx.cli import main
    except KeyboardInterrupt:
        print("slimfx: interrupted", file=sys.stderr)
        return 130  # cli.EXIT_INTERRUPTED, which is not loaded yet
    return main()


def _import_numpy_first() -> None:
    """Load NumPy from Python before torch does: torch's C start-up imports NumPy itself and
    clears any error it raises, so a Ctrl-C that lands there would be lost and the run go on."""
    try:
        import numpy  # noqa: F401
    except ImportError:  # NumPy is optional for torch and for slimfx
        pass


if __name__ == "__main__":
    sys.exit(run())
