"""The job board: every task attempt of a job in its log (runner, times, outcome), states, bounds, and
the job series it keeps balanced; fed by a real TaskQueue."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rmidl import metrics
from rmidl.client import jobboard
from rmidl.client.jobboard import JobBoard, result_path
from rmidl.client.queue import TaskQueue
from rmidl.errors import TaskFailed
from rmidl.remote.contract import BulkTicket


@dataclass(frozen=True)
class Job:
    task_id: int


def queue_of(board: JobBoard, n: int, *, attempts: int = 2) -> TaskQueue[Job]:
    """A queue of n tasks traced on `board`, with runners "w1" and "local" entered."""
    tasks = [Job(i) for i in range(n)]
    queue = TaskQueue(tasks, describe=lambda t: f"task {t.task_id}", max_attempts=attempts,
                      observer=board.trace("correlate", n))
    for runner in ("w1", "local"):
        queue.enter(runner)
    return queue


def test_the_log_has_every_attempt_with_its_runner_and_outcome() -> None:
    board = JobBoard()
    queue = queue_of(board, 3)
    assert board.jobs() == []  # not started: not shown
    first = queue.take("w1")
    second = queue.take("local")
    assert first is not None and second is not None
    live = board.jobs()[0]
    assert live["state"] == "running" and live["in_flight"] == {"w1": 1, "local": 1}
    assert sorted(row[1] for row in live["tasks"] if row[4] == "running") == ["local", "w1"]
    queue.retry("w1", first, RuntimeError("boom"))
    queue.complete("local", second)
    again = queue.take("local")
    assert again == first  # the retried task went to the front
    queue.complete("local", again)
    last = queue.take("w1")
    assert last is not None
    queue.complete("w1", last)
    job = board.jobs()[0]
    assert (job["state"], job["done"], job["failed"], job["requeued"]) == ("done", 3, 1, 1)
    assert job["by_runner"] == {"local": 2, "w1": 1} and job["in_flight"] == {}
    outcomes = [(task, runner, outcome) for task, runner, _, _, outcome in job["tasks"]]
    assert outcomes == [(0, "w1", "retried"), (1, "local", "done"), (0, "local", "done"), (2, "w1", "done")]
    for _, _, start, end, _ in job["tasks"]:
        assert 0 <= start <= end <= job["seconds"]


def test_a_failed_job_says_why_and_its_last_attempt_is_failed() -> None:
    board = JobBoard()
    queue = queue_of(board, 1, attempts=1)
    task = queue.take("w1")
    assert task is not None
    queue.retry("w1", task, RuntimeError("engine fell over"))
    assert isinstance(queue.error, TaskFailed)
    job = board.jobs()[0]
    assert job["state"] == "failed" and "engine fell over" in job["error"]
    assert job["tasks"][0][4] == "failed"


def test_a_job_that_never_started_still_ends_and_the_board_keeps_the_newest() -> None:
    board = JobBoard(keep=2)
    for _ in range(4):
        queue = queue_of(board, 2)
        queue.fail(RuntimeError("no worker"))
    jobs = board.jobs()
    assert [job["id"] for job in jobs] == [4, 3]
    assert all(job["state"] == "failed" for job in jobs)


def test_the_task_log_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(jobboard, "TASK_LOG", 5)
    board = JobBoard()
    queue = queue_of(board, 8)
    while (task := queue.take("w1")) is not None:
        queue.complete("w1", task)
        if queue.finished:
            break
    job = board.jobs()[0]
    assert [row[0] for row in job["tasks"]] == [3, 4, 5, 6, 7] and job["dropped"] == 3
    assert len(board.jobs(max_tasks=2)[0]["tasks"]) == 2


def test_the_job_gauges_go_back_to_zero(scrape) -> None:
    with metrics.serve_metrics(0) as server:
        board = JobBoard()
        queue = queue_of(board, 3)
        task = queue.take("w1")
        assert task is not None
        registry = metrics.recorder().registry  # type: ignore[attr-defined]
        gauge = registry.get_sample_value
        assert gauge("rmidl_jobs_running", {"kind": "correlate"}) >= 1
        assert gauge("rmidl_queue_depth", {"kind": "correlate"}) >= 2
        queue.fail(RuntimeError("stopped"))
        queue.complete("w1", task)  # a call that was in progress ends after the job failed
        samples = scrape(server.url)
    assert samples[("rmidl_queue_depth", frozenset({("kind", "correlate")}))] == 0
    assert samples[("rmidl_jobs_running", frozenset({("kind", "correlate")}))] == 0
    assert samples[("rmidl_tasks_in_flight", frozenset({("kind", "correlate"), ("worker", "w1")}))] == 0


@pytest.mark.parametrize(("result", "path"), [
    (None, "shm"),
    (BulkTicket("t", 8, (1, 2), "float32"), "bulk"),
    (pytest.importorskip("numpy").zeros(2), "inline"),
])
def test_result_paths(result, path) -> None:
    assert result_path(result) == path
