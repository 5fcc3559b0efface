"""The pull queue of one job: pending tasks, who holds which, who failed which, who may still run work."""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from rmidl.errors import BudgetExceeded, TaskFailed, WorkerLost

__all__ = ["Keyed", "QueueObserver", "TaskQueue"]

log = logging.getLogger(__name__)


class Keyed(Protocol):
    """A task as the queue sees it: anything with a `task_id` unique within its job."""

    @property
    def task_id(self) -> int: ...


class QueueObserver(Protocol):
    """Told of every task attempt, of the job's end and (by the scheduler) of every result's bytes
    (`rmidl.client.jobboard.JobTrace`: the task log and the metrics); the queue calls it under its
    lock, so it must be quick and never call the queue."""

    def taken(self, task_id: int, runner: str) -> None: ...
    def finished(self, task_id: int, runner: str, outcome: str) -> None: ...
    def ended(self, error: BaseException | None) -> None: ...
    def received(self, runner: str, path: str, nbytes: int) -> None: ...


class _Unobserved:
    """The observer of a queue nobody watches."""

    def taken(self, task_id: int, runner: str) -> None: ...
    def finished(self, task_id: int, runner: str, outcome: str) -> None: ...
    def ended(self, error: BaseException | None) -> None: ...
    def received(self, runner: str, path: str, nbytes: int) -> None: ...


T = TypeVar("T", bound=Keyed)


class TaskQueue(Generic[T]):
    """Runners (local pool threads, per-worker remote threads) take tasks, complete them or give them
    back; a task failing on `max_attempts` different runners fails the job, and so does a queue nobody
    left may take from. A runner may also be unable to hold a task (its limits): that is no failure of
    the task, which waits for someone who can, and fails the job only once nobody left can. Also the
    job's figures: tasks per runner, re-queues, bytes moved."""

    def __init__(
        self,
        tasks: Sequence[T],
        *,
        describe: Callable[[T], str],
        max_attempts: int,
        progress: Callable[[int, int], None] | None = None,
        observer: QueueObserver | None = None,
    ) -> None:
        self.max_attempts = max(1, max_attempts)
        self.total = len(tasks)
        self.done = 0
        self.requeued = 0
        self.tasks_by: Counter[str] = Counter()
        self.moved_bytes = 0
        self.moving_seconds = 0.0
        self.error: BaseException | None = None
        self._describe = describe
        self._pending: deque[T] = deque(tasks)
        self._holding: dict[int, str] = {}
        self._failed_on: dict[int, dict[str, str]] = {}
        self._cannot: dict[int, dict[str, str]] = {}
        """Per task, the runners that cannot hold it, and why (their limits): not counted as failures."""
        self._runners: Counter[str] = Counter()
        self._gone: set[str] = set()
        self._progress = progress
        self.observer: QueueObserver = observer or _Unobserved()
        self._cond = threading.Condition()

    @property
    def finished(self) -> bool:
        return self.error is not None or self.done == self.total

    # -- runners come and go -------------------------------------------------------------------------
    def enter(self, runner: str) -> None:
        """Count one more thread of `runner` (call before starting it, so the job never looks orphaned)."""
        with self._cond:
            self._runners[runner] += 1

    def leave(self, runner: str) -> None:
        with self._cond:
            self._runners[runner] -= 1
            if self._runners[runner] <= 0:
                del self._runners[runner]
            self._check_starved()
            self._cond.notify_all()

    def runners(self) -> set[str]:
        with self._cond:
            return set(self._runners)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- the queue ------------------------------------------------------------------------------------
    def take(self, runner: str, usable: Callable[[], bool] = lambda: True,
             misfit: Callable[[T], str | None] | None = None,
             prefer: Callable[[T], bool] | None = None) -> T | None:
        """Block until a task `runner` has not failed on and can hold (`misfit(task)` None) is pending;
        None once the job is over for it. With `prefer` (cheap: called under the queue's lock), the first
        such task it holds true of goes before the others (e.g. one whose data the runner holds)."""
        with self._cond:
            while True:
                if self.finished or not usable():
                    return None
                chosen = None
                for i, task in enumerate(self._pending):
                    key = task.task_id
                    if runner in self._failed_on.get(key, {}) or runner in self._cannot.get(key, {}):
                        continue
                    reason = misfit(task) if misfit is not None else None
                    if reason is not None:
                        self._cannot.setdefault(key, {})[runner] = reason
                        self._check_starved()
                        if self.finished:
                            self._cond.notify_all()
                            return None
                        continue
                    if prefer is None or prefer(task):
                        chosen = i
                        break
                    if chosen is None:
                        chosen = i
                if chosen is not None:
                    task = self._pending[chosen]
                    del self._pending[chosen]
                    self._holding[task.task_id] = runner
                    self.observer.taken(task.task_id, runner)
                    return task
                self._cond.wait()

    def complete(self, runner: str, task: T) -> None:
        with self._cond:
            self._holding.pop(task.task_id, None)
            self.done += 1
            self.tasks_by[runner] += 1
            done = self.done
            self.observer.finished(task.task_id, runner, "done")
            if done == self.total:
                self.observer.ended(None)
            self._cond.notify_all()
        if self._progress is not None:
            try:
                self._progress(done, self.total)
            except Exception as error:  # a broken progress display must not lose the job
                log.warning("progress callback failed (%r); not calling it again", error)
                self._progress = None

    def retry(self, runner: str, task: T, error: BaseException, *, runner_gone: bool = False,
              counted: bool = True) -> None:
        """Put a failed task back; fail the job once it has failed on max_attempts different runners.
        `runner_gone`: the runner died or hangs, so it no longer counts as someone who may run work.
        `counted=False`: not the task's failure (a busy worker); anyone, this runner too, may take it."""
        with self._cond:
            if runner_gone:
                self._gone.add(runner)
            self._holding.pop(task.task_id, None)
            failures = self._failed_on.setdefault(task.task_id, {})
            if counted:
                failures[runner] = f"{type(error).__name__}: {error}"
            last = len(failures) >= self.max_attempts
            self.observer.finished(task.task_id, runner, "failed" if last else "retried")
            if last:
                self._fail(TaskFailed(self._failure_message(task, failures)))
            else:
                self._pending.appendleft(task)
                self.requeued += 1
                self._check_starved()
            self._cond.notify_all()

    def cannot(self, runner: str, task: T, why: str) -> None:
        """`runner` cannot hold `task` (its limits, as it said when it refused it): back to the queue for
        others, not counted as a failure; the job fails only when nobody left can run it."""
        with self._cond:
            self._holding.pop(task.task_id, None)
            self._cannot.setdefault(task.task_id, {})[runner] = why
            self.observer.finished(task.task_id, runner, "retried")
            self._pending.appendleft(task)
            self.requeued += 1
            self._check_starved()
            self._cond.notify_all()

    def pause(self, seconds: float) -> None:
        """Wait up to `seconds` (a runner backing off a busy worker), less if the job ends meanwhile."""
        self.wait(seconds)

    def moved(self, nbytes: int, seconds: float) -> None:
        """Account result bytes that crossed the data plane (bulk or inline), for MB/s figures."""
        with self._cond:
            self.moved_bytes += nbytes
            self.moving_seconds += seconds

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._fail(error)
            self._cond.notify_all()

    def wait(self, timeout: float | None) -> bool:
        """Wait up to `timeout` s for the job to finish (all tasks done, or failed); True if it has."""
        with self._cond:
            self._cond.wait_for(lambda: self.finished, timeout)
            return self.finished

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
            self.observer.ended(error)

    def _failure_message(self, task: T, failures: dict[str, str]) -> str:
        where = "; ".join(f"{name}: {why}" for name, why in failures.items())
        return f"{self._describe(task)} failed on {len(failures)} worker(s): {where}"

    def _check_starved(self) -> None:
        """Fail now rather than wait forever when nobody is left who may run the pending work."""
        if self.finished:
            return
        active = set(self._runners) - self._gone
        if not active:
            self._fail(WorkerLost(
                f"every worker is gone with {self.total - self.done} of {self.total} tasks unfinished "
                "and there is no local pool (local_threads=0) to finish them"
            ))
            return
        for task in self._pending:
            failures = self._failed_on.get(task.task_id, {})
            cannot = self._cannot.get(task.task_id, {})
            if not active <= set(failures) | set(cannot):
                continue
            if cannot and active <= set(cannot):
                where = "; ".join(f"{name}: {why}" for name, why in cannot.items())
                self._fail(BudgetExceeded(f"{self._describe(task)} fits no participant's limits ({where})"))
            else:
                self._fail(TaskFailed(self._failure_message(task, failures) + "; no other worker is left"))
            return
