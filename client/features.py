"""Coordinator.features' body: build a features job, plan it for the consumers at hand, run it with either
placement (task parallelism through the scheduler, or the stage-mapped pipeline), and keep its figures."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rmidl.config import Config
from rmidl.errors import OptionError

from .progress import Progress, progress_bar
from .scheduler import Scheduler

if TYPE_CHECKING:
    from rmidl.datasets import Dataset
    from rmidl.featureset import FeatureSet
    from rmidl.network import Network

__all__ = ["PLACEMENTS", "run_features"]

PLACEMENTS = ("tasks", "stages")
"""How a features job is spread: whole batches per runner, or each pipeline stage on its own processor."""


def run_features(scheduler: Scheduler, config: Config, dataset: Dataset | str | os.PathLike[str],
                 net: Network | str | os.PathLike[str], *, local: int, look: Callable[[int], None],
                 keep: Callable[[dict[str, Any]], None], batch: int | None, progress: bool | Progress | None,
                 load: str, placement: str, replicas: Sequence[int] | None, pipelines: int) -> FeatureSet:
    """The feature set; `keep(figures)` gets the job's figures (what Coordinator.last_job() reports) also
    when it fails. Every option is checked before the registry is looked at (`look(local)`) or anything
    is decoded but the first image."""
    from .jobs.features import FeaturesJob, feature_inputs
    from .pipeline.stages import check_replicas, run_stages

    if placement not in PLACEMENTS:
        raise OptionError(f"placement={placement!r} is not one of {', '.join(PLACEMENTS)}")
    data, network = feature_inputs(dataset, net)
    check_replicas(replicas, len(network.stages))
    with progress_bar(progress, len(data)) as report:
        job = FeaturesJob(data, network, config=config, batch=batch, load=load, progress=report)
        look(local)
        job.plan_for(scheduler.capacities(local), scheduler.usable_workers())
        queue = scheduler.queue(job)
        figures: dict[str, Any] = {"placement": placement}
        started = time.perf_counter()
        try:
            if placement == "stages":
                figures["stage_spans"] = run_stages(job, workers=scheduler.usable_workers(),
                                                    replicas=replicas, pipelines=pipelines)
            else:
                with job.running():
                    scheduler.run(job, queue, local_threads=local)
        finally:
            figures = {**job.figures(), "seconds": time.perf_counter() - started,
                       "tasks_by": dict(queue.tasks_by), "requeued": queue.requeued,
                       "moved_bytes": queue.moved_bytes, "spans": job.spans, **figures}
            keep(figures)
    return job.feature_set(figures)
