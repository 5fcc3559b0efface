"""`python -m rmidl.client.cli ...`: the `rmidl` command."""

import sys

from rmidl.client.cli import main

sys.exit(main())
