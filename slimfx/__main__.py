"""``python -m slimfx``: the command line (what ``torchrun -m slimfx compile ...`` starts)."""

import sys

from slimfx.cli import main

sys.exit(main())
