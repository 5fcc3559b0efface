"""Shared pytest fixtures: a seeded generator, an in-process name server, worker daemons, child processes."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rmidl.config import Config


@pytest.fixture(autouse=True)
def private_cluster_files(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test (and every command it starts) writes and finds cluster files in a directory of its own:
    never the user's, and never another test's (tests of several checkouts may run at once)."""
    runtime = tmp_path_factory.mktemp("runtime")
    runtime.chmod(0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("RMIDL_CLUSTER_DIR", str(runtime / "rmidl"))
    return runtime / "rmidl"


@pytest.fixture(autouse=True)
def no_kept_spectra() -> None:
    """Every test starts with no kernel spectra kept by the process (tests use the same seeded banks)."""
    from rmidl.kernels._spectra import forget_banks

    forget_banks()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink every engine's tiles so that small images cross many tile, group and chunk boundaries."""
    from rmidl.kernels import _direct, _fft, _lowering

    monkeypatch.setattr(_lowering, "SCRATCH_BYTES", 4096)
    monkeypatch.setattr(_lowering, "GEMM_COLUMNS", 16)
    monkeypatch.setattr(_direct, "TILE_BYTES", 256)
    monkeypatch.setattr(_fft, "TILE_ELEMENTS", 512)
    monkeypatch.setattr(_fft, "TEMP_BYTES", 64 << 10)


@pytest.fixture
def cluster_config() -> Config:
    """Settings of in-process daemons and their clients (no secret, no TLS; ignores RMIDL_* variables)."""
    return Config(environ={})


@pytest.fixture
def tls_config(tmp_path):
    """Process-wide 2-way TLS for Pyro5 during the test (Pyro5 keeps SSL settings per process)."""
    from pki import make_pki

    from rmidl.remote.transport import configure_pyro

    config = Config(environ={}, **make_pki(tmp_path, "good"))
    configure_pyro(config)
    try:
        yield config
    finally:
        configure_pyro(Config(environ={}))


@pytest.fixture
def nameserver(cluster_config: Config) -> Iterator[str]:
    """A name server on 127.0.0.1, port 0, serving in a thread; yields "HOST:PORT"; always shut down."""
    from rmidl.server.nameserver import address_of, start_ns

    _, daemon = start_ns("127.0.0.1", 0, config=cluster_config)
    thread = daemon.serve_in_thread()
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


@pytest.fixture
def worker(start_worker: Callable[..., Any]) -> Any:
    """One in-process worker daemon (see `start_worker`): its handle."""
    return start_worker()


@pytest.fixture
def proxy(worker: Any, cluster_config: Config) -> Iterator[Any]:
    """A Pyro5 proxy of the `worker` fixture's ConvolutionWorker, closed after the test."""
    from rmidl.remote.transport import worker_proxy

    with worker_proxy(worker.uri, cluster_config, timeout=30) as p:
        yield p


@pytest.fixture
def spectra_made(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The FFT size of every kernel spectrum the fft engine computes in this process (in-process workers
    included), in order: what a cache of spectra must save."""
    import rmidl.kernels._spectra as fft_engine

    made: list[tuple[int, int]] = []
    real = fft_engine.kernel_spectra

    def counting(kernels: np.ndarray, shape: tuple[int, int], *args: Any, **kwargs: Any) -> np.ndarray:
        made.append(shape)
        return real(kernels, shape, *args, **kwargs)

    monkeypatch.setattr(fft_engine, "kernel_spectra", counting)
    return made


class Child:
    """A child process whose stdout lines are read by a thread, so waits can have deadlines; a second
    thread drains stderr, so a chatty child never blocks on a full pipe."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.result: tuple[int, str] | None = None
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._drain_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        self._stderr.extend(self.process.stderr)

    def read_until(self, wanted: str | re.Pattern[str], timeout: float = 30.0) -> list[str]:
        """Lines up to the one equal to `wanted` (or matching it, a compiled pattern)."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {wanted!r} within {timeout}s; saw {seen}") from None
            if line is None:
                raise AssertionError(f"exited before {wanted!r}; saw {seen}; stderr: {self.stop()[1]}")
            seen.append(line)
            if line == wanted if isinstance(wanted, str) else wanted.search(line):
                return seen

    def wait_exit(self, timeout: float = 60.0) -> tuple[int, str]:
        """Wait for the child to exit on its own; returns (exit code, stderr)."""
        self.process.wait(timeout)
        return self.stop()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> tuple[int, str]:
        """Ask politely, wait with a bound, then kill; returns (exit code, stderr). Idempotent."""
        if self.result is not None:
            return self.result
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        for reader in self._readers:  # both see EOF once the child is gone
            reader.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        self.result = (self.process.returncode, "".join(self._stderr))
        return self.result


@pytest.fixture
def children() -> Iterator[Callable[..., Child]]:
    """Factory for `python -m ...` child processes (`spawn(*args, env=...)`), all killed after the test."""
    started: list[Child] = []

    def spawn(*args: str, env: dict[str, str] | None = None) -> Child:
        child = Child(*args, env=env)
        started.append(child)
        return child

    yield spawn
    for child in reversed(started):
        child.stop(signal.SIGKILL)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_metrics(url: str) -> Samples:
    """GET a Prometheus endpoint and parse it (prometheus_client's parser): {(sample name, labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode("utf-8")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture
def scrape() -> Callable[[str], Samples]:
    """scrape(url) -> {(sample name, frozenset of label items): value} of a metrics endpoint."""
    return scrape_metrics


@pytest.fixture
def wait_until() -> Callable[..., Any]:
    """wait_until(predicate, timeout=30, what=...) -> the first truthy value of predicate(), polled every
    50 ms: for state another process or a background thread reaches on its own (never a fixed sleep)."""

    def wait(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "the condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached within {timeout} s (last value {value!r})")
            time.sleep(0.05)

    return wait


def gaussian_blobs(n: int = 600, features: int = 12, classes: int = 3, spread: float = 1.0,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labelled Gaussian clusters (centres 4 apart on random axes, unit noise times spread), raw scale."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, features))
    centres *= 4.0 / np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.arange(n) % classes
    rng.shuffle(y)
    x = centres[y] + spread * rng.standard_normal((n, features))
    return 50.0 + 10.0 * x, y  # offset and scale: features as they come, not standardised


@pytest.fixture
def blobs() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """Factory of synthetic classification data: blobs(n=600, features=12, classes=3, spread=1.0, seed=0)."""
    return gaussian_blobs


def make_feature_set(x: np.ndarray, labels: np.ndarray | None, classes: Sequence[str] = (), *,
                     fingerprint: str | None = "ab12" * 16, image_shape: Sequence[int] = (48, 48)) -> Any:
    """A FeatureSet as `rmidl features` makes one, with the provenance of a network `fingerprint` on
    images of `image_shape` (fingerprint None: a set that does not say where it came from)."""
    from rmidl.featureset import FeatureSet

    network = {} if fingerprint is None else {"fingerprint": fingerprint, "spec": "6x5x5:relu:gavg",
                                                "channels": 1}
    return FeatureSet(x.astype(np.float32), labels, tuple(classes), None, np.arange(len(x)), network,
                      {"image_shape": list(image_shape), "preprocessing": {"resize": None, "crop": None,
                                                                            "gray": None}})


@pytest.fixture
def feature_set() -> Callable[..., Any]:
    """Factory of FeatureSets with provenance: feature_set(x, labels, classes, fingerprint=, image_shape=)."""
    return make_feature_set


def write_image_folder(root: Any, *, classes: int = 2, per_class: int = 5, shape: tuple[int, int] = (24, 20),
                       seed: int = 0) -> Any:
    """An ImageFolder tree of seeded 8-bit grayscale PNGs (class folders c0, c1, ...); returns `root`."""
    from pathlib import Path

    from rmidl.imaging import save_image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            save_image(folder / f"img{index:03d}.png", rng.integers(0, 256, shape, dtype=np.uint8))
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small ImageFolder dataset (2 classes x 5 PNGs of 20x24, W x H), made once per module; read-only."""
    return write_image_folder(tmp_path_factory.mktemp("dataset"))


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll `condition` until it holds, failing after `timeout` s: waiting on state, not on time."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not reached within {timeout} s"
        time.sleep(0.005)
