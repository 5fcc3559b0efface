"""The web status page of a cluster: workers, their load, running jobs' progress and the newest job's
task timeline, on loopback (`rmidl dashboard`, `rmidl up --dashboard`, `Coordinator(dashboard_port=)`)."""

from .server import Dashboard, serve_dashboard

__all__ = ["Dashboard", "serve_dashboard"]
