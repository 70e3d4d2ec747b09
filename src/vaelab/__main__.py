"""`python -m vaelab ...` (and `torchrun ... -m vaelab ...`) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
