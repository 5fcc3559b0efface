"""rmidl.client: the coordinator (the stub side) and the `rmidl` command line."""

from __future__ import annotations

from rmidl.client.coordinator import Coordinator

__all__ = ["Coordinator"]
