"""An HTTP server socket served by a thread (the metrics endpoint, the status page): where it is and
one way to stop it."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["Served"]


class Served:
    """`httpd` (a socketserver with serve_forever running in `thread`) bound to `host`: `.port`, `.url`;
    `close()` stops it, releases the port and joins the thread (idempotent), as does leaving `with`."""

    def __init__(self, httpd: Any, thread: threading.Thread, host: str, *, scheme: str = "http",
                 path: str = "/") -> None:
        self._httpd = httpd
        self._thread = thread
        self._closed = False
        self.host = host
        self.port = int(httpd.server_address[1])
        self.url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{self.port}{path}"

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}{' closed' if self._closed else ''}>"
