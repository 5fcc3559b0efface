"""Shared pytest fixtures: a seeded generator, an in-process name server and worker daemons on port 0."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from rmidl.config import Config


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def cluster_config() -> Config:
    """Settings of in-process daemons and their clients (no secret, no TLS; ignores RMIDL_* variables)."""
    return Config(environ={})


@pytest.fixture
def nameserver(cluster_config: Config) -> Iterator[str]:
    """A name server on 127.0.0.1, port 0, serving in a thread; yields "HOST:PORT"; always shut down."""
    from rmidl.server.nameserver import address_of, start_ns

    _, daemon = start_ns("127.0.0.1", 0, config=cluster_config)
    thread = threading.Thread(target=daemon.requestLoop, name="test-ns", daemon=True)
    thread.start()
    try:
        yield address_of(daemon)
    finally:
        daemon.shutdown()
        thread.join(5.0)


@pytest.fixture
def start_worker(request: pytest.FixtureRequest, cluster_config: Config) -> Iterator[Callable[..., Any]]:
    """Factory for in-process worker daemons on port 0, serving in threads and torn down after the test.

    `start_worker(name=..., **kw)` registers with the `nameserver` fixture's server when the test uses it
    (pass `ns=None` to skip); other keywords go to `rmidl.server.daemon.start_worker`. Returns the handle.
    """
    from rmidl.server.daemon import start_worker as start

    handles: list[Any] = []
    counter = iter(range(1_000_000))

    def factory(**kwargs: Any) -> Any:
        if "ns" not in kwargs and "nameserver" in request.fixturenames:
            kwargs["ns"] = request.getfixturevalue("nameserver")
        kwargs.setdefault("name", f"w{next(counter)}")
        kwargs.setdefault("config", cluster_config)
        kwargs.setdefault("threads", 1)
        handle = start(**kwargs)
        handles.append(handle)
        handle.serve_in_thread()
        return handle

    try:
        yield factory
    finally:
        for handle in reversed(handles):
            handle.close()
