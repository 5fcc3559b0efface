"""The Coordinator equals rmidl.correlate (float64 scipy reference) on the local pool and on real workers."""

from __future__ import annotations

import numpy as np
import pytest
from reference import assert_close, reference

from rmidl.client import Coordinator
from rmidl.client.cost import Capacity, TaskCost, deadline
from rmidl.client.planning import plan
from rmidl.config import Config
from rmidl.errors import (
    BudgetExceeded,
    ClusterError,
    OptionError,
    RegistryError,
    ShapeError,
    TaskFailed,
    WorkerNotFound,
)

CASES = [
    # (image shape, kernel shape, mode)
    ((37, 53), (5, 3, 3), "valid"),
    ((64, 48, 3), (9, 5, 4, 3), "same"),
    ((23, 31), (3, 6, 7), "full"),
    ((120, 90), (40, 11, 11), "valid"),
]


@pytest.mark.parametrize(("image_shape", "kernel_shape", "mode"), CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_local_pool_matches_reference(rng, image_shape, kernel_shape, mode, threads):
    image = rng.standard_normal(image_shape).astype(np.float32)
    kernels = rng.standard_normal(kernel_shape).astype(np.float32)
    with Coordinator(local_threads=threads, min_tasks=6) as coordinator:
        assert_close(coordinator.correlate(image, kernels, mode=mode), reference(image, kernels, mode))
        assert_close(coordinator.convolve(image, kernels, mode=mode),
                     reference(image, kernels, mode, flip=True))
        assert sum(coordinator.stats().values()) == coordinator.last_job()["tasks"] >= 6


def test_float64_in_float64_out(rng):
    image = rng.standard_normal((30, 40))
    kernels = rng.standard_normal((4, 3, 5))
    with Coordinator(local_threads=2) as coordinator:
        result = coordinator.correlate(image, kernels)
    assert result.dtype == np.float64
    np.testing.assert_allclose(result, reference(image, kernels, "valid"), rtol=1e-10, atol=1e-10)


def test_out_buffer_is_filled(rng):
    image = rng.standard_normal((40, 40)).astype(np.float32)
    kernels = rng.standard_normal((6, 3, 3)).astype(np.float32)
    out = np.full((6, 38, 38), np.nan, np.float32)
    with Coordinator(local_threads=2, min_tasks=4) as coordinator:
        assert coordinator.correlate(image, kernels, out=out) is out
        with pytest.raises(ShapeError, match="out has shape"):
            coordinator.correlate(image, kernels, out=np.empty((6, 38, 37), np.float32))
    assert_close(out, reference(image, kernels, "valid"))


def test_budget_refused_before_work(rng):
    config = Config(environ={}, memory_budget=1000)
    with Coordinator(local_threads=1, config=config) as coordinator, pytest.raises(
        BudgetExceeded, match=r"5x30x30 float32 .* memory budget"
    ):
        coordinator.correlate(np.ones((32, 32), np.float32), np.ones((5, 3, 3), np.float32))
    assert coordinator.stats() == {}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"local_threads": -1}, OptionError, "local_threads=-1"),
        ({"local_threads": 0}, OptionError, "local_threads=0 without a name server"),
        ({"local_threads": True}, OptionError, "local_threads=True"),
        # Checked before the name server is asked (nothing listens on port 1).
        ({"workers": ["w0"]}, OptionError, r"workers=\['w0'\] .* needs a name server"),
        ({"ns": "127.0.0.1:1", "workers": -1}, OptionError, "workers=-1 must be a non-negative"),
        ({"ns": "127.0.0.1:1", "workers": "w0"}, OptionError, "workers='w0' must be a list"),
        ({"ns": "127.0.0.1:1", "workers": []}, OptionError, r"workers=\[\] names no worker"),
        ({"ns": "127.0.0.1:1", "workers": ["w0", ""]}, OptionError, "'' is not a worker name"),
        ({"ns": "127.0.0.1:1", "workers": 0}, OptionError, "workers=0 with local_threads=0"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        Coordinator(**kwargs)


def _run_locally(job, threads: int, config: Config, *, min_tasks: int = 1):
    """Plan `job` for `threads` local pool threads and run it on a Scheduler of its own; the queue."""
    from rmidl.client.scheduler import Scheduler

    scheduler = Scheduler(config, local_threads=threads)
    job.plan_for(scheduler.capacities(threads), [], shared_memory=False, min_tasks=min_tasks)
    queue = scheduler.queue(job)
    with job.buffers():
        scheduler.run(job, queue)
    return queue


def test_local_task_failure_fails_job_naming_task(rng):
    from rmidl.client.jobs import CorrelationJob
    from rmidl.validate import prepare

    class Broken(CorrelationJob):
        def run_local(self, task, threads):
            raise RuntimeError("engine fell over")

    image = rng.standard_normal((40, 40)).astype(np.float32)
    config = Config(environ={})
    job = Broken(prepare(image, rng.standard_normal((3, 3, 3)).astype(np.float32)), config=config)
    expected = r"task \d+ \(rows .*local: RuntimeError: engine fell over"
    with pytest.raises(TaskFailed, match=expected):
        _run_locally(job, 2, config)


def test_plan_balances_and_bounds_tasks():
    cores = [Capacity("local", 50.0)] * 2
    reference_job = plan((128, 710, 1270), (128, 11, 11, 1), cores)
    assert 8 <= len(reference_job.tasks) <= 64
    covered = np.zeros((128, 710), int)
    for task in reference_job.tasks:
        covered[task.kernels[0] : task.kernels[1], task.rows[0] : task.rows[1]] += 1
    assert (covered == 1).all()
    # Results bounded by max_task_bytes: more, smaller tasks.
    small = plan((128, 710, 1270), (128, 11, 11, 1), cores, max_task_bytes=1 << 20)
    assert max(t.out_elements(1270) * 4 for t in small.tasks) <= 1 << 20
    # A tiny job on remote workers with a costly round trip is not shredded.
    remote = [Capacity("w", 50.0, cores=2, overhead_s=0.01)]
    assert len(plan((4, 20, 20), (4, 3, 3, 1), remote).tasks) == 1
    # Few rows, many kernels: kernel groups.
    wide = plan((256, 4, 500), (256, 3, 3, 1), cores)
    assert wide.group < 256


def test_deadline_has_a_floor_and_grows_with_work():
    consumer = Capacity("w", 1.0, bytes_per_s=1e6)
    small = TaskCost(flops=2 * 9 * 100, result_bytes=400)  # one row of one 3x3 kernel, 100 wide
    big = TaskCost(flops=2 * 9 * 1000 * 100 * 1000, result_bytes=4 * 1000 * 100 * 1000)
    assert deadline(small, consumer, floor=2.0) == 2.0
    assert deadline(big, consumer, floor=2.0) > 100
    # Moving the bytes counts, at the consumer's data-plane rate (none over shared memory).
    moving = TaskCost(flops=0, input_bytes=50_000_000, result_bytes=50_000_000)
    assert deadline(moving, consumer, floor=2.0) == pytest.approx(10 * 100.0)
    assert deadline(moving, Capacity("shm", 1.0), floor=2.0) == 2.0


# -- on real worker daemons (in-process, port 0) ------------------------------------------------------------


@pytest.mark.parametrize(
    "setup",  # (workers, local threads, shared memory)
    [(1, 0, True), (1, 0, False), (3, 0, True), (3, 1, False), (0, 2, True), (1, 2, True)],
)
def test_cluster_matches_reference(nameserver, start_worker, cluster_config, rng, setup):
    workers, local, shm = setup
    for _ in range(workers):
        start_worker()
    with Coordinator(nameserver, local_threads=local, shared_memory=shm, config=cluster_config,
                     min_tasks=8) as coordinator:
        assert len(coordinator.workers()) == workers
        for image_shape, kernel_shape, mode in CASES:
            image = rng.standard_normal(image_shape).astype(np.float32)
            kernels = rng.standard_normal(kernel_shape).astype(np.float32)
            assert_close(coordinator.correlate(image, kernels, mode=mode), reference(image, kernels, mode))
            job = coordinator.last_job()
            assert sum(job["tasks_by"].values()) == job["tasks"] >= 8
            assert set(job["tasks_by"]) <= {"local", *(w["name"] for w in coordinator.workers())}
            assert job["shared_memory"] == (shm and workers > 0)
        assert_close(coordinator.convolve(image, kernels, mode=mode),
                     reference(image, kernels, mode, flip=True))


def test_inline_results_without_bulk_channel(nameserver, start_worker, cluster_config, rng):
    start_worker(bulk=False)
    image = rng.standard_normal((50, 70, 3)).astype(np.float32)
    kernels = rng.standard_normal((7, 4, 5, 3)).astype(np.float32)
    with Coordinator(nameserver, local_threads=0, shared_memory=False, config=cluster_config,
                     min_tasks=5) as coordinator:
        assert_close(coordinator.correlate(image, kernels, mode="full"), reference(image, kernels, "full"))
        assert coordinator.stats() == {"w0": coordinator.last_job()["tasks"]}


def test_no_local_pool_means_no_local_calibration(nameserver, start_worker, cluster_config, rng, monkeypatch):
    """Calibrating this machine's rate costs ~0.1 s of engine work: only a local pool needs it."""
    from rmidl.client import scheduler

    def calibrate() -> float:
        raise AssertionError("calibrated although local_threads=0")

    monkeypatch.setattr(scheduler, "local_gflops", calibrate)
    start_worker()
    image = rng.standard_normal((30, 40)).astype(np.float32)
    kernels = rng.standard_normal((3, 3, 3)).astype(np.float32)
    with Coordinator(nameserver, local_threads=0, config=cluster_config) as coordinator:
        assert_close(coordinator.correlate(image, kernels), reference(image, kernels, "valid"))


def test_bank_sent_once_and_put_again_when_evicted(nameserver, start_worker, cluster_config, rng):
    handle = start_worker()
    image = rng.standard_normal((40, 40)).astype(np.float32)
    kernels = rng.standard_normal((4, 3, 3)).astype(np.float32)
    with Coordinator(nameserver, local_threads=0, config=cluster_config, min_tasks=4) as coordinator:
        coordinator.correlate(image, kernels)
        banks = handle.worker.info()["banks"]
        assert len(banks) == 1
        for bank_id in banks:
            handle.worker.drop_blob(bank_id)
        # The worker forgot the bank: the coordinator is told (BankError) and puts it again.
        assert_close(coordinator.correlate(image, kernels), reference(image, kernels, "valid"))
        assert handle.worker.info()["banks"] == banks


def test_workers_are_used_in_proportion(nameserver, start_worker, cluster_config, rng):
    for _ in range(2):
        start_worker()
    image = rng.standard_normal((200, 200)).astype(np.float32)
    kernels = rng.standard_normal((16, 5, 5)).astype(np.float32)
    with Coordinator(nameserver, local_threads=0, config=cluster_config, min_tasks=40) as coordinator:
        coordinator.correlate(image, kernels)
        # Both workers pull from one queue: neither is idle for a job of many tasks.
        assert len(coordinator.stats()) == 2


def test_shared_blocks_reused_across_jobs_give_fresh_results(nameserver, start_worker, cluster_config, rng):
    start_worker()
    with Coordinator(nameserver, local_threads=1, config=cluster_config, min_tasks=6) as coordinator:
        results, refs = [], []
        for _ in range(3):
            image = rng.standard_normal((60, 80)).astype(np.float32)
            kernels = rng.standard_normal((5, 3, 3)).astype(np.float32)
            results.append(coordinator.correlate(image, kernels))
            refs.append(reference(image, kernels, "valid"))
            assert coordinator.last_job()["shared_memory"]
        # Each result is the caller's own array: later jobs through the same blocks leave it alone.
        for result, ref in zip(results, refs, strict=True):
            assert_close(result, ref)


def test_one_coordinator_serves_concurrent_callers(nameserver, start_worker, cluster_config, rng):
    import threading

    start_worker()
    inputs = [
        (rng.standard_normal((50, 60)).astype(np.float32), rng.standard_normal((4, 3, 3)).astype(np.float32))
        for _ in range(6)
    ]
    results: dict[int, object] = {}
    with Coordinator(nameserver, local_threads=1, config=cluster_config, min_tasks=4) as coordinator:

        def work(indices: range) -> None:
            for i in indices:
                try:
                    results[i] = coordinator.correlate(*inputs[i])
                except Exception as error:  # reported by the assertions below
                    results[i] = error

        threads = [threading.Thread(target=work, args=(range(j, 6, 2),)) for j in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    for i, (image, kernels) in enumerate(inputs):
        assert isinstance(results[i], np.ndarray), results[i]
        assert_close(results[i], reference(image, kernels, "valid"))


def test_plan_keeps_tasks_under_hard_limits():
    cores = [Capacity("w", 50.0, cores=2, overhead_s=0.01)]
    # Left to itself this job is one task; limits on rows and result bytes cut it up.
    limited = plan((6, 300, 400), (6, 5, 5, 1), cores, max_task_bytes=20_000, max_band_rows=30)
    assert len(limited.tasks) > 1
    for task in limited.tasks:
        assert task.rows[1] - task.rows[0] <= 30
        assert task.out_elements(400) * 4 <= 20_000
    with pytest.raises(BudgetExceeded, match="one output row of one kernel is 4000 bytes"):
        plan((6, 300, 1000), (6, 5, 5, 1), cores, max_task_bytes=3000)


def test_tasks_fit_the_smallest_worker_message_limit(nameserver, start_worker, cluster_config, rng):
    # This worker refuses messages over 64 KiB; the coordinator's own limit is the default 256 MiB. The
    # image's bands and results would be ~100-240 KB in one task: they must be cut to fit.
    small = Config(environ={}, max_message_size=64 << 10)
    start_worker(config=small)
    image = rng.standard_normal((200, 300)).astype(np.float32)
    kernels = rng.standard_normal((6, 5, 5)).astype(np.float32)
    with Coordinator(nameserver, local_threads=0, shared_memory=False, config=cluster_config) as coordinator:
        assert coordinator.workers()[0]["name"] == "w0"
        assert_close(coordinator.correlate(image, kernels), reference(image, kernels, "valid"))
        assert coordinator.last_job()["tasks"] > 1
        with pytest.raises(BudgetExceeded, match="over the smallest worker message limit"):
            coordinator.correlate(rng.standard_normal((40, 9000)).astype(np.float32), kernels)


def test_one_task_jobs_spread_over_idle_workers(nameserver, start_worker, cluster_config, rng):
    handles = [start_worker() for _ in range(2)]
    image = rng.standard_normal((12, 12)).astype(np.float32)
    kernels = rng.standard_normal((2, 3, 3)).astype(np.float32)
    with Coordinator(nameserver, local_threads=0, config=cluster_config) as coordinator:
        for _ in range(30):
            coordinator.correlate(image, kernels)
            assert coordinator.last_job()["tasks"] == 1
    done = [h.worker.info()["tasks_done"] for h in handles]
    # Always the same worker before; at random each gets ~15 (below 5 has odds ~1e-4).
    assert sum(done) == 30 and min(done) >= 5, done


class _ParkedJob:
    """One job in a thread whose tasks park in `progress` until the block ends: lets a test act mid-job."""

    def __init__(self, coordinator: Coordinator, image: np.ndarray, kernels: np.ndarray) -> None:
        import threading

        self._release = threading.Event()
        self._parked = threading.Semaphore(0)
        self.results: list = []
        self.thread = threading.Thread(target=self._run, args=(coordinator, image, kernels))

    def _progress(self, done: int, total: int) -> None:
        self._parked.release()
        self._release.wait(30)

    def _run(self, coordinator: Coordinator, image: np.ndarray, kernels: np.ndarray) -> None:
        try:
            self.results.append(coordinator.correlate(image, kernels, progress=self._progress))
        except Exception as error:  # reported by the test's assertions on `result`
            self.results.append(error)

    def __enter__(self) -> _ParkedJob:
        self.thread.start()
        return self

    def wait_parked(self, threads: int = 1) -> None:
        for _ in range(threads):
            assert self._parked.acquire(timeout=30)

    def until(self, condition) -> bool:
        """Poll `condition` (with a deadline) while the job's discovery keeps polling the name server."""
        import time

        deadline = time.monotonic() + 30
        while not condition() and time.monotonic() < deadline:
            self.thread.join(0.05)
        return bool(condition())

    def __exit__(self, *exc: object) -> None:
        self._release.set()  # the job ends before the coordinator closes, pass or fail
        self.thread.join(60)
        assert not self.thread.is_alive()

    @property
    def result(self) -> np.ndarray:
        assert isinstance(self.results[0], np.ndarray), self.results[0]
        return self.results[0]


def test_joining_worker_with_a_smaller_message_limit_sits_out(nameserver, start_worker, cluster_config, rng):
    from rmidl.remote.transport import configure_pyro

    start_worker(name="early")
    image = rng.standard_normal((200, 300)).astype(np.float32)
    kernels = rng.standard_normal((6, 5, 5)).astype(np.float32)
    with Coordinator(nameserver, local_threads=0, shared_memory=False, config=cluster_config,
                     min_tasks=8) as coordinator:
        with _ParkedJob(coordinator, image, kernels) as job:
            job.wait_parked(cluster_config.tasks_in_flight)  # no call in flight while Pyro5's config changes
            # Tasks of ~50 KB bands were planned; this worker refuses anything over 16 KiB. In its own
            # process Pyro5 would refuse them; in this one, its unpacking does (after we restore Pyro5's
            # setting).
            start_worker(name="late", config=Config(environ={}, max_message_size=16 << 10))
            configure_pyro(cluster_config)
            assert job.until(lambda: "late" in coordinator._scheduler.workers)  # the job's discovery
        assert_close(job.result, reference(image, kernels, "valid"))
        assert coordinator.stats() == {"early": 8}
        # The next job is sized for both.
        assert_close(coordinator.correlate(image, kernels), reference(image, kernels, "valid"))
        assert set(coordinator.stats()) <= {"early", "late"}


def test_interrupted_job_stops_its_threads_taking_tasks(rng):
    """Ctrl-C in the caller (KeyboardInterrupt while it waits) must not leave the pool running the job."""
    import _thread
    import threading
    import time

    from rmidl.client.jobs import CorrelationJob
    from rmidl.validate import prepare

    calls: list[int] = []
    released = threading.Event()

    class Interrupted(CorrelationJob):
        def run_local(self, task, threads):
            calls.append(1)
            if len(calls) == 1:
                _thread.interrupt_main()  # what a Ctrl-C does to the waiting caller
            released.wait(10)  # hold every task until the caller has seen the interrupt
            super().run_local(task, threads)

    image = rng.standard_normal((64, 64)).astype(np.float32)
    config = Config(environ={})
    job = Interrupted(prepare(image, rng.standard_normal((3, 3, 3)).astype(np.float32)), config=config)
    with pytest.raises(KeyboardInterrupt):
        _run_locally(job, 2, config, min_tasks=16)
    released.set()
    end = time.monotonic() + 10
    while any(t.name.startswith("rmidl-local-") for t in threading.enumerate()):
        assert time.monotonic() < end, "pool threads still running 10 s after the interrupt"
        threading.Event().wait(0.01)
    total = len(job.tasks())
    assert total >= 16
    assert len(calls) <= 2, f"{len(calls)} of {total} tasks ran although the caller was interrupted"


# -- choosing the workers of a job --------------------------------------------------------------------------
def _job_on(coordinator: Coordinator, rng: np.random.Generator) -> dict[str, int]:
    """Run one many-task job, check it against the reference, return the tasks each runner did."""
    image = rng.standard_normal((60, 50)).astype(np.float32)
    kernels = rng.standard_normal((6, 3, 3)).astype(np.float32)
    assert_close(coordinator.correlate(image, kernels), reference(image, kernels, "valid"))
    return coordinator.stats()


def test_named_workers_only_are_used(nameserver, start_worker, cluster_config, rng):
    for name in ("a", "b", "c"):
        start_worker(name=name)
    with Coordinator(nameserver, local_threads=0, config=cluster_config, min_tasks=24,
                     workers=["c", "a"]) as coordinator:
        assert sorted(w["name"] for w in coordinator.workers()) == ["a", "c"]
        assert set(_job_on(coordinator, rng)) <= {"a", "c"}
        # Registering later does not widen the choice, even a worker named before the others.
        start_worker(name="0-early")
        assert set(_job_on(coordinator, rng)) <= {"a", "c"}
        assert sorted(w["name"] for w in coordinator.workers()) == ["a", "c"]


def test_a_count_takes_the_first_workers_in_name_order(nameserver, start_worker, cluster_config, rng):
    for name in ("w2", "w0", "w1"):  # registered out of name order
        start_worker(name=name)
    with Coordinator(nameserver, local_threads=0, config=cluster_config, min_tasks=24,
                     workers=2) as coordinator:
        assert sorted(w["name"] for w in coordinator.workers()) == ["w0", "w1"]
        assert set(_job_on(coordinator, rng)) <= {"w0", "w1"}
        start_worker(name="a0")  # sorts first, but the count was taken at construction
        assert set(_job_on(coordinator, rng)) <= {"w0", "w1"}
        assert sorted(w["name"] for w in coordinator.workers()) == ["w0", "w1"]


def test_count_zero_with_a_local_pool_leaves_the_workers_alone(nameserver, start_worker, cluster_config, rng):
    start_worker(name="w0")
    with Coordinator(nameserver, local_threads=1, config=cluster_config, min_tasks=4,
                     workers=0) as coordinator:
        assert coordinator.workers() == []
        assert set(_job_on(coordinator, rng)) == {"local"}


def test_all_workers_without_a_choice_including_late_ones(nameserver, start_worker, cluster_config, rng):
    start_worker(name="w0")
    with Coordinator(nameserver, local_threads=0, config=cluster_config) as coordinator:
        start_worker(name="w1")
        _job_on(coordinator, rng)
        assert sorted(w["name"] for w in coordinator.workers()) == ["w0", "w1"]


@pytest.mark.parametrize(
    ("workers", "match"),
    [
        (["w0", "nope"], r"no worker 'nope' registered at 127\.0\.0\.1:\d+ \(registered: w0, w1\)"),
        (3, r"workers=3 but 2 registered at 127\.0\.0\.1:\d+: w0, w1"),
    ],
)
def test_a_choice_the_name_server_cannot_supply_is_refused_up_front(
    nameserver, start_worker, cluster_config, workers, match
):
    for name in ("w0", "w1"):
        start_worker(name=name)
    with pytest.raises(WorkerNotFound, match=match):
        Coordinator(nameserver, local_threads=0, config=cluster_config, workers=workers)


def test_a_worker_registering_mid_job_is_left_out(nameserver, start_worker, cluster_config, rng):
    start_worker(name="early")
    image = rng.standard_normal((120, 80)).astype(np.float32)
    kernels = rng.standard_normal((4, 3, 3)).astype(np.float32)
    with Coordinator(nameserver, local_threads=0, config=cluster_config, min_tasks=8,
                     workers=["early"]) as coordinator:
        scheduler = coordinator._scheduler
        polls: list[dict[str, str]] = []
        registry = scheduler.discovery._registry

        def counted() -> dict[str, str]:
            found = registry()
            polls.append(found)
            return found

        scheduler.discovery._registry = counted
        with _ParkedJob(coordinator, image, kernels) as job:
            job.wait_parked()
            start_worker(name="late")
            assert job.until(lambda: any("late" in found for found in polls))  # the job's discovery saw it
            assert "late" not in scheduler.workers  # listed, yet never probed nor given a task
        assert_close(job.result, reference(image, kernels, "valid"))
        assert coordinator.stats() == {"early": coordinator.last_job()["tasks"]}


# -- options reach the workers ------------------------------------------------------------------------------
def test_an_unknown_engine_is_refused_before_any_work(nameserver, start_worker, cluster_config, rng,
                                                      monkeypatch):
    from rmidl.client import scheduler

    def calibrate() -> float:
        raise AssertionError("calibrated before the engine was checked")

    monkeypatch.setattr(scheduler, "local_gflops", calibrate)
    handle = start_worker()
    image = rng.standard_normal((30, 40)).astype(np.float32)
    kernels = rng.standard_normal((3, 3, 3)).astype(np.float32)
    for local in (0, 1):  # without a local pool nothing else would ever look at the name
        with Coordinator(nameserver, local_threads=local, config=cluster_config) as coordinator:
            with pytest.raises(OptionError, match="engine 'fast' is not one of auto, lowering"):
                coordinator.correlate(image, kernels, engine="fast")
            assert coordinator.last_job() == {}
    info = handle.worker.info()
    assert info["banks"] == [] and info["tasks_done"] == 0  # no bank sent, no task run


@pytest.mark.parametrize("engine", ["direct", "fft", "lowering"])
def test_the_engine_is_forwarded_to_workers(nameserver, start_worker, cluster_config, rng, engine):
    handle = start_worker()
    image = rng.standard_normal((40, 50)).astype(np.float32)
    kernels = rng.standard_normal((4, 5, 5)).astype(np.float32)
    with Coordinator(nameserver, local_threads=0, config=cluster_config, min_tasks=4) as coordinator:
        assert_close(coordinator.correlate(image, kernels, engine=engine, mode="same"),
                     reference(image, kernels, "same"))
        tasks = coordinator.last_job()["tasks"]
    assert handle.worker.info()["engines"] == {engine: tasks}


def test_a_closed_coordinator_refuses_work_and_says_where_it_was(rng, nameserver, start_worker) -> None:
    start_worker(name="w1")
    image = rng.random((20, 24), dtype=np.float32)
    bank = rng.standard_normal((2, 3, 3), dtype=np.float32)
    co = Coordinator(nameserver, local_threads=1)
    assert repr(co) == (f"<Coordinator name server {nameserver}: 1 of 1 worker(s) usable, local_threads=1, "
                        "shared_memory=True>")
    assert "w1" in co._repr_html_()
    co.correlate(image, bank)
    co.close()
    co.close()  # idempotent
    assert repr(co) == f"<Coordinator closed (name server {nameserver})>"
    for call in (lambda: co.correlate(image, bank), lambda: co.convolve(image, bank), co.workers,
                 co.__enter__):
        with pytest.raises(ClusterError, match="Coordinator is closed"):
            call()


def test_without_an_address_the_coordinator_uses_a_running_local_cluster(rng, nameserver, start_worker,
                                                                         private_cluster_files) -> None:
    from rmidl.remote import clusterfile

    secret = clusterfile.new_secret()
    # The worker knows the cluster's secret (a coordinator with one refuses workers that cannot prove it).
    start_worker(name="w1", config=Config(environ={}, secret=secret))
    image = rng.random((20, 24), dtype=np.float32)
    bank = rng.standard_normal((2, 3, 3), dtype=np.float32)
    with Coordinator(local_threads=1) as alone:  # none running: this process's pool
        assert alone.ns_address is None and repr(alone).startswith("<Coordinator this process only")
    path = clusterfile.write(nameserver, secret, workers=1)
    try:
        with Coordinator(local_threads=0) as co:
            assert co.ns_address == nameserver and co.config.secret
            co.correlate(image, bank)
            assert co.stats() == {"w1": co.last_job()["tasks"]}
        with Coordinator(None, local_threads=1) as here:  # None: this process only, even so
            assert here.ns_address is None
    finally:
        clusterfile.remove(path)
    with pytest.raises(RegistryError, match="no local cluster"):
        Coordinator("local")
    with pytest.raises(OptionError, match="must be 'HOST:PORT', 'local', a LocalCluster or None"):
        Coordinator(9090)  # type: ignore[arg-type]
