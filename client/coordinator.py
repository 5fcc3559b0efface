"""The Coordinator (the RMI stub side): rmidl.correlate and rmidl.train over the local pool and the workers
in a registry."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from rmidl.config import Config
from rmidl.errors import ClusterError, OptionError
from rmidl.kernels import available_cores
from rmidl.validate import check_threads, prepare_any

from .jobs.correlation import CorrelationJob
from .scheduler import Scheduler
from .selection import AUTO, Auto, check_selection, choose, where
from .shared import SharedPool
from .watching import Watching

if TYPE_CHECKING:
    from rmidl.dataparallel import ComputeShards, TrainingJob
    from rmidl.datasets import Dataset
    from rmidl.featureset import FeatureSet
    from rmidl.network import Network
    from rmidl.remote.naming import Registry

    from .localcluster import LocalCluster

__all__ = ["AUTO", "Coordinator"]

log = logging.getLogger(__name__)


class Coordinator:
    """Runs correlations and training steps as tasks on its own thread pool and on the ConvolutionWorkers
    of a name server.

    `ns` says where the workers are: "HOST:PORT" a name server (whose registrations it keeps watching
    during a job; given no secret, the secret of a local cluster at that address is used); "local" the
    running local cluster of this user (`rmidl up`, found through its cluster file, secret included);
    a `LocalCluster`; None this process's pool alone; by default (AUTO) the local cluster when one is
    running, else this process's pool. `workers` chooses among the registered workers: None takes all
    (and those registering later), a list of names only those, an int N the first N in name order
    (fixed at construction); a name or count the name server cannot supply is a WorkerNotFound before
    any work. `local_threads=None` means every core without a name server and none with one (workers on
    this machine already use its cores). With `shared_memory=True`, workers on this host read the image
    from and write their results into shared memory, and the result returned is that shared block itself
    (an ordinary array; `rmidl.client.shared` says how long it lives); the others get their input inline
    and send results over the bulk side channel (or inline). Once closed (`close()`, or leaving its
    `with` block), every job method raises ClusterError.

    With a name server it publishes its jobs there (`rmidl.client.jobfeed`) for dashboards elsewhere;
    `metrics_port` serves Prometheus metrics of this process and `dashboard_port` a status page of its
    cluster and jobs, both on 127.0.0.1 (0: any free port; `.metrics_url`, `.dashboard_url` say where).
    """

    def __init__(
        self,
        ns: str | LocalCluster | Auto | None = AUTO,
        local_threads: int | None = None,
        shared_memory: bool = True,
        config: Config | None = None,
        *,
        min_tasks: int = 1,
        workers: Sequence[str] | int | None = None,
        metrics_port: int | None = None,
        dashboard_port: int | None = None,
    ) -> None:
        if local_threads is not None and (
            isinstance(local_threads, bool) or not isinstance(local_threads, int) or local_threads < 0
        ):
            raise OptionError(f"local_threads={local_threads!r} must be a non-negative integer")
        ns, config = where(ns, config)
        if local_threads is None:
            local_threads = 0 if ns is not None else available_cores()
        if ns is None and local_threads == 0:
            raise OptionError("local_threads=0 without a name server leaves nobody to do the work")
        selection = check_selection(workers)
        if selection is not None and ns is None:
            raise OptionError(f"workers={workers!r} chooses among registered workers: it needs a name server")
        if selection == 0 and local_threads == 0:
            raise OptionError("workers=0 with local_threads=0 leaves nobody to do the work")
        self.config = config or Config()
        self.ns_address = ns
        self.local_threads = local_threads
        self.shared_memory = shared_memory
        self.min_tasks = max(1, int(min_tasks))
        self._registry: Registry | None = None
        self._last: dict[str, Any] = {}
        self._closed = False
        self._shared = SharedPool(self._release_shm)
        if ns is not None:
            from rmidl.remote.naming import Registry
            from rmidl.remote.transport import configure_pyro

            configure_pyro(self.config)
            self._registry = Registry(ns, self.config)
        registry = self._registry
        self._scheduler = Scheduler(self.config, local_threads=local_threads,
                                    registry=registry.workers if registry else None,
                                    unregister=registry.remove if registry else None)
        self._watching: Watching | None = None
        try:
            self._watching = Watching(self._scheduler.board, ns=ns, config=self.config, workers=self._rows,
                                      metrics_port=metrics_port, dashboard_port=dashboard_port)
            if registry is not None:
                self._connect(registry, selection)
        except BaseException:
            self.close()
            raise

    # -- life cycle ----------------------------------------------------------------------------------
    def _connect(self, registry: Registry, selection: list[str] | int | None) -> None:
        found = registry.workers()  # RegistryError now if the name server is not there
        if selection is not None:
            self._scheduler.only = frozenset(choose(selection, sorted(found), registry.address))
        self._scheduler.discover()

    def close(self) -> None:
        """Close the unused shared blocks (telling workers to unmap them) and every proxy (workers keep
        running). Results still held stay valid: see `rmidl.client.shared` for how long they live.
        Idempotent; afterwards every job method raises ClusterError."""
        self._closed = True
        if self._watching is not None:
            self._watching.close()
        self._shared.close()
        self._scheduler.close()

    def _release_shm(self, names: list[str]) -> None:
        """Ask same-host workers to unmap blocks we closed at once (they notice within a second anyway)."""
        for worker in self._scheduler.usable_workers():
            if worker.shares_memory:
                worker.release_shm(names)

    def _check_open(self) -> None:
        if self._closed:
            raise ClusterError("this Coordinator is closed (make a new one to run more jobs)")

    def __enter__(self) -> Coordinator:
        self._check_open()
        return self

    def __repr__(self) -> str:
        if self._closed:
            return f"<Coordinator closed ({self._where()})>"
        workers = list(self._scheduler.workers.values())
        usable = sum(1 for w in workers if w.usable)
        return (f"<Coordinator {self._where()}: {usable} of {len(workers)} worker(s) usable, "
                f"local_threads={self.local_threads}, shared_memory={self.shared_memory}>")

    def _repr_html_(self) -> str:
        from html import escape

        rows = "".join(
            f"<tr><td>{escape(w['name'])}</td><td>{escape(str(w['host']))}</td><td>{w['threads'] or ''}</td>"
            f"<td>{escape(str(w['state']))}</td></tr>"
            for w in self._rows()
        )
        table = ("<table><tr><th>worker</th><th>host</th><th>threads</th><th>state</th></tr>"
                 f"{rows}</table>") if rows else ""
        return f"<p><b>{escape(repr(self))}</b></p>{table}"

    def _where(self) -> str:
        return f"name server {self.ns_address}" if self.ns_address else "this process only"

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- what it knows -------------------------------------------------------------------------------
    def workers(self) -> list[dict[str, Any]]:
        """The remote workers found so far: name, uri, host, cores, threads, gflops, same_host, state."""
        self._check_open()
        if self._registry is not None:
            self._scheduler.discover()
        return self._rows()

    def _rows(self) -> list[dict[str, Any]]:
        return [
            {
                "name": worker.name,
                "uri": worker.uri,
                "host": worker.info.host or worker.host,
                "cores": worker.info.cores or None,
                "threads": worker.info.threads or None,
                "gflops": worker.info.gflops or None,
                "same_host": worker.same_host,
                "state": worker.state,
            }
            for worker in self._scheduler.workers.values()
        ]

    def jobs(self) -> list[dict[str, Any]]:
        """The running jobs and the last finished ones, newest first: progress, tasks per runner, and
        each task attempt as [task_id, runner, start, end, outcome] (`rmidl.client.jobboard`)."""
        return self._scheduler.board.jobs()

    @property
    def metrics_url(self) -> str | None:
        """Where this coordinator's metrics are served (`metrics_port`), or None."""
        metrics = self._watching.metrics if self._watching else None
        return metrics.url if metrics else None

    @property
    def dashboard_url(self) -> str | None:
        """Where this coordinator's status page is served (`dashboard_port`), or None."""
        dashboard = self._watching.dashboard if self._watching else None
        return dashboard.url if dashboard else None

    def stats(self) -> dict[str, int]:
        """Tasks each worker ran in the last job ("local" is this process's pool)."""
        return dict(self._last.get("tasks_by", {}))

    def last_job(self) -> dict[str, Any]:
        """The last job's figures: tasks, tasks_by, requeued, band, group, images (per task of a batch),
        flops, shared_memory, the result
        bytes fetched over TCP (moved_bytes) and the seconds spent receiving them (moving_seconds), and
        the tasks each engine ran on the workers (engines)."""
        return dict(self._last)

    # -- rmidl.train(..., coordinator=co) ------------------------------------------------------------
    def training_session(self, job: TrainingJob) -> AbstractContextManager[ComputeShards]:
        """What `rmidl.train(X, y, coordinator=self)` trains with: each step's shards on the workers and
        the local pool (local_threads) together; same weights as serial, bit for bit. Shards go to each
        worker once and are dropped when the session ends; last_job() then holds its figures."""
        from .training import training_session

        self._check_open()
        if self._registry is not None:
            self._scheduler.discover()
        self._last = {}
        return training_session(self._scheduler, job, local_threads=self.local_threads,
                                shared=self._shared if self.shared_memory else None, figures=self._last)

    # -- the API of rmidl.correlate --------------------------------------------------------------------
    def correlate(
        self,
        image: object,
        kernels: object,
        *,
        batch: bool = False,
        mode: str = "valid",
        threads: int | None = None,
        engine: str = "auto",
        out: np.ndarray | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Same arguments and result as `rmidl.correlate` (`batch=True`: images (N, H, W[, C]) ->
        (N, K, OH, OW), tasks split by images too); `threads` overrides local_threads for this call,
        `progress(done, total)` is called as tasks finish. With same-host workers the result is the
        shared block they wrote: valid while you hold it (also after close()), recycled when it goes."""
        return self._run(image, kernels, batch=batch, mode=mode, threads=threads, engine=engine, out=out,
                         progress=progress, flip=False)

    def convolve(
        self,
        image: object,
        kernels: object,
        *,
        batch: bool = False,
        mode: str = "valid",
        threads: int | None = None,
        engine: str = "auto",
        out: np.ndarray | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Same as `rmidl.convolve`: correlation with every kernel flipped in both spatial axes."""
        return self._run(image, kernels, batch=batch, mode=mode, threads=threads, engine=engine, out=out,
                         progress=progress, flip=True)

    def _run(
        self,
        image: object,
        kernels: object,
        *,
        batch: bool,
        mode: str,
        threads: int | None,
        engine: str,
        out: np.ndarray | None,
        progress: Callable[[int, int], None] | None,
        flip: bool,
    ) -> np.ndarray:
        self._check_open()
        # Every option first: nothing below (padding, discovery, calibration, shared memory) is spent on
        # a job that cannot run, and workers get only names they know.
        local = self.local_threads if threads is None else int(check_threads(threads) or 0)
        if progress is not None and not callable(progress):
            raise OptionError(f"progress={progress!r} must be a callable (done, total) or None")
        prepared = prepare_any(image, kernels, mode, batch=batch, flip=flip)
        job = CorrelationJob(prepared, config=self.config, engine=engine, out=out)
        if prepared.images.shape[0] == 0:  # an empty batch: nothing to run anywhere
            return job.caller_out if job.caller_out is not None else np.empty(job.out_shape, prepared.dtype)
        scheduler = self._scheduler
        self._look_for_workers(local)
        job_plan = job.plan_for(scheduler.capacities(local), scheduler.usable_workers(),
                                shared_memory=self.shared_memory, min_tasks=self.min_tasks)

        with job.buffers(self._shared):
            queue = scheduler.queue(job, progress)
            try:
                scheduler.run(job, queue, local_threads=local)
            finally:
                self._last = {
                    "tasks": queue.total,
                    "tasks_by": dict(queue.tasks_by),
                    "requeued": queue.requeued,
                    "band": job_plan.band,
                    "group": job_plan.group,
                    "images": job_plan.images,
                    "flops": job_plan.flops,
                    "shared_memory": job.uses_shm,
                    "moved_bytes": queue.moved_bytes,
                    "moving_seconds": queue.moving_seconds,
                    "engines": dict(job.engines),
                }
        return job.out

    # -- a dataset through a CNN's feature stages ----------------------------------------------------
    def features(
        self,
        dataset: Dataset | str | os.PathLike[str],
        net: Network | str | os.PathLike[str],
        *,
        batch: int | None = None,
        progress: bool | Callable[[int, int], None] = True,
        threads: int | None = None,
        load: str = "auto",
        placement: str = "tasks",
        replicas: Sequence[int] | None = None,
        pipelines: int = 1,
    ) -> FeatureSet:
        """The features (n, F) of every image of `dataset` (a Dataset or what rmidl.datasets.open takes)
        through `net` (a Network, a saved network file, or a spec / preset built for the images' channels).

        placement "tasks": batches of `batch` images (None: chosen for the job) go to the workers and the
        local pool (`threads` overrides local_threads), each running the whole chain; `load` says who
        decodes (rmidl.client.jobs.features.LOADS). placement "stages": LOAD, each CNP stage and FLAT on
        processors of their own (rmidl.client.pipeline.stages: the workers, else threads here), with
        `replicas` processors per CNP stage and `pipelines` copies of the whole pipeline. `progress` True
        draws a tqdm bar on a terminal; a callable gets (images done, total).
        """
        from .features import run_features

        self._check_open()
        local = self.local_threads if threads is None else int(check_threads(threads) or 0)
        def keep(figures: dict[str, Any]) -> None:
            self._last = figures

        return run_features(self._scheduler, self.config, dataset, net, local=local,
                            look=self._look_for_workers, keep=keep, batch=batch, progress=progress, load=load,
                            placement=placement, replicas=replicas, pipelines=pipelines)

    def _look_for_workers(self, local: int) -> None:
        """Before a job: look at the registry in the background (a hung name server must not hold up the
        job; workers found join it), or, with nobody at all to run it, wait for one look."""
        if self._registry is None:
            return
        if self._scheduler.usable_workers() or local:
            self._scheduler.refresh()
        else:
            self._scheduler.discover()
