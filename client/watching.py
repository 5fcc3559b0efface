"""What a coordinator opens to be watched: its job feed in the name server (always, with one), and on
request a metrics port and a status page in its own process."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from rmidl.config import Config
from rmidl.metrics import MetricsServer, Reading, serve_metrics

from .jobboard import JobBoard
from .jobfeed import JobFeed

__all__ = ["Watching"]

log = logging.getLogger(__name__)


class Watching:
    """The feed, metrics endpoint and dashboard of one coordinator (each None when not opened);
    `close()` publishes the last state and stops them."""

    def __init__(self, board: JobBoard, *, ns: str | None, config: Config, metrics_port: int | None,
                 dashboard_port: int | None, workers: Callable[[], list[dict[str, Any]]]) -> None:
        self._workers = workers
        self.feed: JobFeed | None = None
        self.metrics: MetricsServer | None = None
        self.dashboard: Any = None
        try:
            if ns is not None:
                self.feed = JobFeed(board, ns, config)
            if metrics_port is not None:
                self.metrics = serve_metrics(metrics_port, config=config, readings=self._readings)
            if dashboard_port is not None:
                from .dashboard import serve_dashboard

                # its own jobs come from the board; the feed's copy of them would show twice
                self.dashboard = serve_dashboard(ns, port=dashboard_port, config=config, boards=[board],
                                                 skip_feeds=[self.feed.name] if self.feed else [])
        except BaseException:
            self.close()
            raise

    def _readings(self) -> list[Reading]:
        states = Counter(row["state"] for row in self._workers())
        return [("rmidl_coordinator_workers", "Remote workers this coordinator knows, by state (ok, dead, "
                 "quarantined)", {"state": state}, count) for state, count in sorted(states.items())]

    def close(self) -> None:
        for part in (self.feed, self.dashboard, self.metrics):
            if part is not None:
                part.close()
        self.feed = self.dashboard = self.metrics = None
