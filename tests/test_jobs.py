"""The job model: a kind the scheduler has never seen runs on the local pool and real workers, unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.signal

from rmidl.client.cost import TaskCost
from rmidl.client.jobs import JobKind
from rmidl.client.scheduler import Scheduler
from rmidl.kernels import correlate_valid
from rmidl.remote.blobs import Blob
from rmidl.remote.contract import CorrelateTask


@dataclass(frozen=True)
class ImageTask:
    task_id: int  # the image id


class ImageFeatures:
    """A features-like job: image i -> row i of an (n, F) matrix, F the flattened valid correlation maps."""

    kind = "features"

    def __init__(self, images: np.ndarray, bank: np.ndarray) -> None:
        self.images, self.bank = images, Blob.bank(bank)
        k, kh, kw, _ = bank.shape
        self.maps = (k, images.shape[1] - kh + 1, images.shape[2] - kw + 1)
        self.out = np.full((len(images), int(np.prod(self.maps))), np.nan, images.dtype)

    def tasks(self):
        return [ImageTask(i) for i in range(len(self.images))]

    def describe(self, task):
        return f"image {task.task_id}"

    def cost(self, task):
        bank = self.bank.arrays["bank"]
        return TaskCost(2.0 * bank[0].size * self.out.shape[1], self.images[0].nbytes, self.out[0].nbytes)

    def blobs(self):
        return {self.bank.content_id: self.bank}

    def accepts(self, stub):
        return True

    def misfit(self, task, stub):
        return None

    def run_local(self, task, threads):
        correlate_valid(self.images[task.task_id], self.bank.arrays["bank"], self._row(task), threads=threads)

    def request(self, task, stub):
        output = "bulk" if stub.info.bulk_port else "inline"
        return CorrelateTask(task.task_id, self.bank.content_id, (0, self.maps[0]), (0, self.maps[1]),
                             self.images[task.task_id], output)

    def accept(self, task, reply, stub):
        return stub.receive(reply.result, self._row(task), what=self.describe(task))

    def _row(self, task):
        return self.out[task.task_id].reshape(self.maps)


def _check(job: ImageFeatures, images: np.ndarray, bank: np.ndarray) -> None:
    for i, image in enumerate(images.astype(np.float64)):
        maps = [scipy.signal.correlate(image, k.astype(np.float64), mode="valid")[:, :, 0] for k in bank]
        np.testing.assert_allclose(job.out[i], np.stack(maps).ravel(), rtol=0, atol=1e-4)


def test_a_new_job_kind_runs_on_the_workers_and_on_the_pool(nameserver, start_worker, cluster_config, rng):
    from rmidl.remote.naming import list_workers
    from rmidl.remote.transport import connect_ns

    for _ in range(2):
        start_worker()
    images = rng.standard_normal((24, 20, 18, 1)).astype(np.float32)
    bank = rng.standard_normal((3, 4, 3, 1)).astype(np.float32)
    remote: JobKind[ImageTask] = ImageFeatures(images, bank)
    with connect_ns(nameserver, cluster_config) as ns:
        scheduler = Scheduler(cluster_config, local_threads=0, registry=lambda: list_workers(ns))
        try:
            scheduler.discover()
            queue = scheduler.queue(remote)
            scheduler.run(remote, queue)
        finally:
            scheduler.close()
    assert set(queue.tasks_by) <= {"w0", "w1"} and sum(queue.tasks_by.values()) == 24
    assert isinstance(remote, ImageFeatures)
    _check(remote, images, bank)
    local = ImageFeatures(images, bank)
    queue = Scheduler(cluster_config, local_threads=2).queue(local)
    Scheduler(cluster_config, local_threads=2).run(local, queue)
    assert dict(queue.tasks_by) == {"local": 24}
    _check(local, images, bank)
