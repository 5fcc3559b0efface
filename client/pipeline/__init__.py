"""Pipeline parallelism: a bounded pipeline of processors (executor) and the stage-mapped features run."""

from __future__ import annotations

from rmidl.client.pipeline.executor import Span, StageProcessors, run_pipeline
from rmidl.client.pipeline.stages import run_stages

__all__ = ["Span", "StageProcessors", "run_pipeline", "run_stages"]
