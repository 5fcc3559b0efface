"""rmidl.client: coordination only: the Coordinator (the stub side: discovery, scheduling, retries) and
LocalCluster. The command line has its own room (`cli/`), and so has the scaling study (`bench/`)."""

from __future__ import annotations

from rmidl.client.coordinator import Coordinator
from rmidl.client.dashboard import Dashboard, serve_dashboard
from rmidl.client.localcluster import LocalCluster
from rmidl.metrics import MetricsServer, serve_metrics

__all__ = ["Coordinator", "Dashboard", "LocalCluster", "MetricsServer", "serve_dashboard", "serve_metrics"]
