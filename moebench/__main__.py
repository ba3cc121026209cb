"""`python -m moebench`: the `moebench` command (see moebench.cli)."""

import sys

from .cli import main

sys.exit(main())
