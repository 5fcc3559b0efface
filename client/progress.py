"""A job's progress for people: a tqdm bar on a terminal (rate and ETA), or the caller's own callback."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rmidl.errors import OptionError

__all__ = ["Progress", "progress_bar"]

Progress = Callable[[int, int], None]
"""(done, total), called from the job's threads as work finishes."""


@contextmanager
def progress_bar(progress: bool | Progress | None, total: int, *,
                 unit: str = "img") -> Iterator[Progress | None]:
    """`progress` True: a tqdm bar on stderr while the block runs (nothing when stderr is not a
    terminal); a callable: itself; False or None: nothing. Yields the callback to give the job."""
    if progress is None or progress is False:
        yield None
        return
    if progress is not True:
        if not callable(progress):
            raise OptionError(f"progress={progress!r} must be True, False or a callable (done, total)")
        yield progress
        return
    from tqdm import tqdm

    lock = threading.Lock()
    # disable=None: no bar when stderr is a file or a pipe (logs stay clean)
    with tqdm(total=total, unit=unit, file=sys.stderr, disable=None, leave=False, smoothing=0.1) as bar:

        def advance(done: int, _total: int) -> None:
            with lock:
                bar.update(done - bar.n)

        yield advance
