"""Run work over items in one background thread, a bounded number of results ahead of the consumer."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

__all__ = ["prefetched"]

log = logging.getLogger(__name__)

_JOIN_SECONDS = 30.0
T = TypeVar("T")
R = TypeVar("R")


def prefetched(work: Callable[[T], R], items: Sequence[T], depth: int) -> Iterator[R]:
    """work(item) for each item in a background thread, at most `depth` results ahead of the consumer;
    closing the iterator early stops the thread (after the item it is working on) and joins it."""
    results: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        for item in items:
            if stop.is_set():
                return
            try:
                result: tuple[str, Any] = ("result", work(item))
            except BaseException as error:  # handed to the consumer, who raises it
                result = ("error", error)
            if stop.is_set():
                return
            results.put(result)  # the consumer drains the queue after stop, so this cannot block forever
            if result[0] == "error":
                return
        if not stop.is_set():
            results.put(("done", None))

    thread = threading.Thread(target=produce, name="rmidl-dataset-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = results.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while True:
            try:
                results.get_nowait()
            except queue.Empty:
                break
        thread.join(_JOIN_SECONDS)
        if thread.is_alive():
            log.warning("dataset prefetch thread still decoding after %.0f s", _JOIN_SECONDS)
