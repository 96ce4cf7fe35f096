"""``python -m medtriad`` (and ``torchrun -m medtriad``) runs the command-line tool."""

import sys

from medtriad.cli import main

sys.exit(main())
