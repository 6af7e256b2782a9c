"""`python -m treasure_engine` runs the command line."""

import sys

from treasure_engine.cli import main

sys.exit(main())
