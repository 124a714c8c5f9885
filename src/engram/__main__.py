"""`python -m engram ...`: the `engram` command, e.g. for `torchrun -m engram train ...`."""

import sys

from engram.cli import main

sys.exit(main())
