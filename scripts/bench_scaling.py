#!/usr/bin/env python
"""Run the paper's full scaling study (1280x720 built-in image, 128 kernels 11x11, 10 runs) into bench-out/.

Usage: .venv/bin/python scripts/bench_scaling.py [extra `rmidl bench` options, which override these]
"""

from __future__ import annotations

import sys

from rmidl.client.cli import main

DEFAULTS = [
    "--kernels", "random:128x11x11", "--cores", "1,2,4,8", "--workers", "0,1,2",
    "--runs", "10", "--out", "bench-out", "--predict", "1,2,4,8,16,64", "--link", "1Gbit,10Gbit,25Gbit",
]  # fmt: skip

if __name__ == "__main__":
    # argparse keeps the last value of a repeated option, so the caller's options win
    sys.exit(main(["bench", *DEFAULTS, *sys.argv[1:]]))
