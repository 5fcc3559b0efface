"""`python -m rmidl ...`: the `rmidl` command (its code lives in rmidl.client.cli)."""

import sys

from rmidl.client.cli import main

sys.exit(main())
