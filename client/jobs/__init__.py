"""Distributed job kinds: each implements `JobKind` (base.py) and the scheduler runs any of them."""

from __future__ import annotations

from rmidl.client.jobs.base import JobKind
from rmidl.client.jobs.correlation import CorrelationJob

__all__ = ["CorrelationJob", "JobKind"]
