"""A coordinator process for the lifetime tests: one shared-memory job, then it holds its result.

`python -m dataplane_child --ns HOST:PORT` (tests/ on PYTHONPATH) prints `block NAME` for every shared
block it has mapped, then "ready", and waits until it is killed.
"""

from __future__ import annotations

import argparse
import threading

import numpy as np

from rmidl.client import Coordinator


def mapped_blocks(pid: int | str = "self") -> set[str]:
    """Names of the rmidl shared blocks process `pid` has mapped (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return set()
    return {line.split("/memfd:")[1].split()[0] for line in lines if "/memfd:rmidl_" in line}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", required=True)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(7)
    image = rng.standard_normal((300, 200)).astype(np.float32)
    kernels = rng.standard_normal((8, 5, 5)).astype(np.float32)
    coordinator = Coordinator(args.ns, local_threads=0, min_tasks=4)
    result = coordinator.correlate(image, kernels)
    assert coordinator.last_job()["shared_memory"]
    for name in sorted(mapped_blocks()):
        print("block", name, flush=True)
    print("ready", flush=True)
    threading.Event().wait()  # hold `result` (and the coordinator) until killed
    print(result.shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
