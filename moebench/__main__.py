"""`python -m moebench`: the command-line comparison (see moebench.cli)."""

import sys

from .cli import main

sys.exit(main())
