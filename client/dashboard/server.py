"""The status page's HTTP server (the standard library's ThreadingHTTPServer): `/` the page, with the
current figures inline so it renders without a round trip, and `/api/status` the JSON it polls."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from rmidl._served import Served
from rmidl.config import Config
from rmidl.errors import OptionError

from ..jobboard import JobBoard
from .view import ClusterView

__all__ = ["Dashboard", "serve_dashboard"]

log = logging.getLogger(__name__)

POLL_MS = 1000
"""How often the page asks for fresh figures."""
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")


class Dashboard(Served):
    """A running status page: `.url`, `.port`; `close()` stops it and its view."""

    def __init__(self, view: ClusterView, host: str, port: int) -> None:
        self.view = view
        self._page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
        httpd = ThreadingHTTPServer((host, port), _handler(self, host))
        httpd.daemon_threads = True
        name = f"rmidl-dashboard-{httpd.server_address[1]}"
        thread = threading.Thread(target=httpd.serve_forever, name=name, daemon=True)
        super().__init__(httpd, thread, host)
        thread.start()

    def page(self) -> str:
        """The page with the current figures inline (`</` escaped: JSON inside a script element)."""
        initial = json.dumps(self.view.snapshot()).replace("</", "<\\/")
        return self._page.replace("__INITIAL__", initial).replace("__POLL_MS__", str(POLL_MS))

    def close(self) -> None:
        """Stop serving and stop the view (idempotent)."""
        super().close()
        self.view.close()

    def __enter__(self) -> Dashboard:
        return self


def _handler(dashboard: Dashboard, bound: str) -> type[BaseHTTPRequestHandler]:
    """The request handler of one dashboard: GET only, and on loopback only requests naming a loopback
    host (a web page elsewhere cannot read the figures through a DNS name pointed at 127.0.0.1)."""
    from rmidl.remote.security import is_loopback

    loopback = is_loopback(bound)

    class Handler(BaseHTTPRequestHandler):
        server_version = "rmidl-dashboard"

        def do_GET(self) -> None:
            if loopback and _host_name(self.headers.get("Host") or "") not in _LOOPBACK_NAMES:
                self._send(HTTPStatus.FORBIDDEN, "text/plain", b"this page answers loopback names only\n")
                return
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, "text/html; charset=utf-8", dashboard.page().encode("utf-8"))
            elif path == "/api/status":
                body = json.dumps(dashboard.view.snapshot()).encode("utf-8")
                self._send(HTTPStatus.OK, "application/json", body)
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

        def _send(self, status: HTTPStatus, kind: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


def _host_name(header: str) -> str:
    """The host of a Host header: "127.0.0.1:8787" -> "127.0.0.1", "[::1]:80" -> "[::1]"."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0]


def serve_dashboard(ns: str | None = None, *, port: int = 0, host: str = "127.0.0.1",
                    config: Config | None = None, boards: Sequence[JobBoard] = (),
                    skip_feeds: Sequence[str] = (), interval: float = 1.0) -> Dashboard:
    """Serve the status page on host:port (port 0: any free one; `.url` says where) for the cluster of
    name server `ns` (its workers, and the jobs coordinators publish there) and the jobs of `boards` in
    this process. The page has no authentication: past loopback anyone who reaches it reads it, so a
    non-loopback `host` is served with a loud warning."""
    from rmidl.remote.security import is_loopback

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise OptionError(f"dashboard port {port!r} must be 0-65535 (0: any free port)")
    if not is_loopback(host):
        log.warning("!!! the dashboard on %s:%d has no authentication: anyone who can reach it sees the "
                    "cluster's workers and jobs !!!", host, port)
    view = ClusterView(ns, config or Config(), boards=boards, skip_feeds=skip_feeds, interval=interval)
    try:
        dashboard = Dashboard(view, host, port)
    except OSError as error:
        view.close()
        raise OptionError(f"cannot serve the dashboard on {host}:{port}: {error.strerror or error}") from None
    log.info("dashboard at %s", dashboard.url)
    return dashboard
