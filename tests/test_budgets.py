"""Budgets are per worker: a job is planned within each worker's advertised limits, tasks a worker cannot
hold go to those that can, and a job fails (BudgetExceeded) only when no participant can hold a task."""

from __future__ import annotations

import numpy as np
import pytest
from reference import assert_close, reference

from rmidl.client import Coordinator
from rmidl.errors import BudgetExceeded


def job(rng: np.random.Generator, height: int = 100, kernels: int = 6) -> tuple[np.ndarray, np.ndarray]:
    image = rng.standard_normal((height, 200)).astype(np.float32)
    return image, rng.standard_normal((kernels, 3, 3)).astype(np.float32)


def test_a_worker_with_a_smaller_output_budget_does_not_fail_the_job(nameserver, start_worker,
                                                                      cluster_config, rng):
    start_worker(name="big")
    small = start_worker(name="small", config=cluster_config.replace(memory_budget=20_000))
    assert small.worker.info()["memory_budget"] == 20_000
    image, kernels = job(rng)
    with Coordinator(nameserver, local_threads=0, shared_memory=False, config=cluster_config,
                     min_tasks=8) as coordinator:
        for _ in range(2):
            assert_close(coordinator.correlate(image, kernels), reference(image, kernels))
        assert set(coordinator.stats()) == {"big"}  # every task is over what "small" holds


def test_tasks_are_cut_to_what_the_workers_can_hold(nameserver, start_worker, cluster_config, rng):
    budget = 40_000  # the job's output is 465 kB; a balanced plan makes tasks of ~58 kB
    for name in ("a", "b"):
        start_worker(name=name, config=cluster_config.replace(memory_budget=budget))
    image, kernels = job(rng)
    with Coordinator(nameserver, local_threads=0, shared_memory=False, config=cluster_config,
                     min_tasks=2) as coordinator:
        assert_close(coordinator.correlate(image, kernels), reference(image, kernels))
        figures = coordinator.last_job()
    largest = figures["band"] * figures["group"] * (image.shape[1] - 2) * 4
    assert largest <= budget // cluster_config.tasks_in_flight  # two in flight fit beside each other
    assert set(figures["tasks_by"]) == {"a", "b"}


def test_a_worker_too_small_for_the_bank_sits_the_job_out(nameserver, start_worker, cluster_config, rng):
    start_worker(name="big")
    tiny = start_worker(name="tiny", config=cluster_config.replace(memory_budget=400))  # 100 bytes of blobs
    image, kernels = job(rng)  # a bank of 216 bytes
    for shared_memory in (True, False):
        with Coordinator(nameserver, local_threads=0, shared_memory=shared_memory, config=cluster_config,
                         min_tasks=8) as coordinator:
            assert_close(coordinator.correlate(image, kernels), reference(image, kernels))
            assert set(coordinator.stats()) == {"big"}
    assert tiny.worker.info()["blobs"] == []


def test_the_local_pool_runs_what_no_worker_can_hold(nameserver, start_worker, cluster_config, rng):
    start_worker(name="small", config=cluster_config.replace(memory_budget=2_000))
    image, kernels = job(rng, kernels=1)
    with Coordinator(nameserver, local_threads=1, shared_memory=False, config=cluster_config,
                     min_tasks=8) as coordinator:
        assert_close(coordinator.correlate(image, kernels), reference(image, kernels))
        assert coordinator.stats().get("local", 0) > 0


@pytest.mark.parametrize(("budget", "kernels", "match"), [
    # 100 bytes of blobs, a bank of 216: the worker cannot take the job at all
    (400, 6, r"no worker can take this correlate job within its limits \(each of small sits it out\)"),
    # one output row of one kernel is 792 bytes: the worker holds the bank, but no task
    (700, 1, r"task \d+ \(rows .*\) fits no participant's limits \(small: its output of \d+ bytes is over "
             r"the memory budget of 700 bytes\)"),
])
def test_a_job_nobody_can_hold_fails_with_budget_exceeded(nameserver, start_worker, cluster_config, rng,
                                                          budget, kernels, match):
    handle = start_worker(name="small", config=cluster_config.replace(memory_budget=budget))
    image, kernels = job(rng, kernels=kernels)
    with (Coordinator(nameserver, local_threads=0, shared_memory=False, config=cluster_config) as coordinator,
          pytest.raises(BudgetExceeded, match=match)):
        coordinator.correlate(image, kernels)
    assert handle.worker.info()["tasks_done"] == 0


def test_a_bank_over_a_workers_message_limit_is_not_sent_to_it(nameserver, start_worker, cluster_config, rng):
    # the bank travels as one put_blob message: over the worker's max_message_size it would be refused
    # and the connection dropped ("not enough data"), failing the job when nobody else could run it
    small = start_worker(name="small", config=cluster_config.replace(max_message_size=200_000))
    image = rng.standard_normal((40, 40)).astype(np.float32)
    kernels = rng.standard_normal((256, 15, 15)).astype(np.float32)  # 230 kB
    with Coordinator(nameserver, local_threads=1, config=cluster_config, min_tasks=4) as coordinator:
        assert_close(coordinator.correlate(image, kernels), reference(image, kernels))
        assert set(coordinator.stats()) == {"local"}
    with Coordinator(nameserver, local_threads=0, config=cluster_config, min_tasks=4) as coordinator, \
            pytest.raises(BudgetExceeded, match="each of small sits it out"):
        coordinator.correlate(image, kernels)
    assert small.worker.info()["blobs"] == []
