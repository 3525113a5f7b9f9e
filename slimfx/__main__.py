"""``python -m slimfx`` and the ``slimfx`` console script: the command line (what
``torchrun -m slimfx compile ...`` starts). The CLI, and torch with it, load inside the guard,
so Ctrl-C during start-up is a clean interrupt (status 130), not a traceback."""

import sys


def run() -> int:
    try:
        from slimfx.cli import main
    except KeyboardInterrupt:
        print("slimfx: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
