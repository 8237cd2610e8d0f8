"""`python -m flowmatch` is the `flowmatch` command (so `torchrun ... -m flowmatch train ...` works)."""

import sys

from flowmatch.cli import main

sys.exit(main())
