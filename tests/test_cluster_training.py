"""rmidl.train on a cluster: the same weights whoever computes, shards put once, faults, older workers."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import msgpack
import numpy as np
import pytest
from dataplane_child import mapped_blocks
from worker_doubles import CountingWorker, ForgetfulWorker, OlderWorker

import rmidl
from rmidl.client import Coordinator
from rmidl.client.cost import Capacity
from rmidl.client.localcluster import LocalCluster
from rmidl.dataparallel import ComputeShards, Step, StepResult, TrainingJob, Weights, split_shards
from rmidl.errors import BankError, BudgetExceeded, OptionError, ShapeError, WorkerLost
from rmidl.mlp import MLPSpec
from rmidl.remote.blobs import Blob
from rmidl.remote.gradient import GradientReply, GradientTask

SMALL = {"hidden": (16,), "epochs": 3, "batch": 100, "shards": 8, "activation": "tanh"}
"""480 training rows: 5 steps per epoch over 8 shards."""


def same_run(model: rmidl.MLP, history: rmidl.History, reference: tuple[rmidl.MLP, rmidl.History]) -> bool:
    ref_model, ref_history = reference
    return np.array_equal(model.parameters, ref_model.parameters) and [
        (e.loss, e.train_accuracy, e.val_accuracy) for e in history.epochs
    ] == [(e.loss, e.train_accuracy, e.val_accuracy) for e in ref_history.epochs]


@pytest.mark.parametrize("batch", [100, None], ids=["minibatch", "full batch"])
def test_weights_are_identical_whoever_computes_the_shards(nameserver, start_worker, cluster_config, blobs,
                                                           batch):
    x, y = blobs(n=600)
    settings = {**SMALL, "batch": batch}
    serial = rmidl.train(x, y, threads=0, **settings)
    for _ in range(2):
        start_worker()
    runs = {"local pool (no coordinator)": (rmidl.train(x, y, threads=2, **settings), None)}
    coordinators = {
        "coordinator, local pool only": ({"ns": None, "local_threads": 2}, {"local"}),
        "1 worker": ({"ns": nameserver, "local_threads": 0, "workers": 1}, {"w0"}),
        "2 workers": ({"ns": nameserver, "local_threads": 0}, {"w0", "w1"}),
        "2 workers over TCP": ({"ns": nameserver, "local_threads": 0, "shared_memory": False}, {"w0", "w1"}),
        "2 workers + local pool": ({"ns": nameserver, "local_threads": 1}, {"w0", "w1", "local"}),
    }
    for name, (options, who) in coordinators.items():
        with Coordinator(config=cluster_config, **options) as co:
            runs[name] = (rmidl.train(x, y, coordinator=co, **settings), who)
            figures = co.last_job()
        assert figures["kind"] == "gradient" and figures["tasks"] == sum(figures["tasks_by"].values()), name
        assert set(figures["tasks_by"]) <= who, (name, figures)
        if len(who) == 1:
            assert set(figures["tasks_by"]) == who, (name, figures)
    for name, ((model, history), _) in runs.items():
        assert same_run(model, history, serial), name


def test_a_worker_computes_a_bundles_shards_on_its_threads_to_the_same_bits(nameserver, start_worker,
                                                                            cluster_config, blobs):
    x, y = blobs(n=600)
    serial = rmidl.train(x, y, threads=0, **SMALL)
    start_worker(threads=3)
    with Coordinator(nameserver, local_threads=0, config=cluster_config) as co:
        assert same_run(*rmidl.train(x, y, coordinator=co, **SMALL), serial)
        assert co.last_job()["bundles"] <= 3  # of 3 or more of the 8 shards: computed 3 at a time


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared memory", "TCP"])
def test_phases_and_bytes_of_each_step_are_recorded(nameserver, start_worker, cluster_config, blobs,
                                                    shared_memory):
    x, y = blobs(n=600)
    start_worker()
    with Coordinator(nameserver, local_threads=0, config=cluster_config, shared_memory=shared_memory) as co:
        model, history = rmidl.train(x, y, coordinator=co, **SMALL)
    # every step covers all 8 shards; a same-host worker writes them where the coordinator reads them
    gradients = 0 if shared_memory else 8 * model.spec.parameter_count * 8
    weights = model.spec.parameter_count * 8
    assert len(history.steps) == 15
    for step in history.steps:
        assert step.send > 0 and step.compute > 0 and step.gather >= 0 and step.reduce > 0 and step.update > 0
        assert step.bytes_received == gradients
        assert step.bytes_sent >= weights
    assert history.steps[0].bytes_sent > weights  # the shards went with the first step, and only then
    assert {step.bytes_sent for step in history.steps[1:]} == {weights}


def test_shards_are_put_once_weights_once_a_step_and_all_dropped_at_the_end(nameserver, start_worker,
                                                                            cluster_config, blobs):
    x, y = blobs(n=600)
    handles = [start_worker(worker_class=CountingWorker) for _ in range(2)]
    with Coordinator(nameserver, local_threads=0, config=cluster_config) as co:
        rmidl.train(x, y, coordinator=co, **SMALL)
    held: set[str] = set()
    for handle in handles:
        puts = handle.worker.puts
        shards = {blob_id for blob_id in puts if blob_id.startswith("shard-")}
        weights = [blob_id for blob_id in puts if blob_id.startswith("weights-")]
        assert all(puts[blob_id] == 1 for blob_id in puts), puts
        assert len(weights) == 15  # each step's version, pushed to both workers
        held |= shards
        assert not [b for b in handle.worker.info()["blobs"] if b.startswith(("shard-", "weights-"))]
    assert len(held) == 8


def test_a_worker_that_lost_its_blobs_gets_them_again(nameserver, start_worker, cluster_config, blobs):
    x, y = blobs(n=600)
    serial = rmidl.train(x, y, threads=0, **SMALL)
    handle = start_worker(worker_class=ForgetfulWorker)
    with Coordinator(nameserver, local_threads=0, config=cluster_config) as co:
        assert same_run(*rmidl.train(x, y, coordinator=co, **SMALL), serial)
    assert max(handle.worker.puts.values()) > 1  # what it forgot was put again


class BeforeStep:
    """Stands in for a Coordinator and runs `action` just before step `step` of the training."""

    def __init__(self, coordinator: Coordinator, step: int, action: Callable[[], None]) -> None:
        self.coordinator, self.step, self.action = coordinator, step, action

    @contextmanager
    def training_session(self, job: TrainingJob) -> Iterator[ComputeShards]:
        with self.coordinator.training_session(job) as compute_shards:

            def wrapped(step: Step, weights: Weights, shard_ids: Sequence[int]) -> StepResult:
                if step.number == self.step:
                    self.action()
                return compute_shards(step, weights, shard_ids)

            yield wrapped


def test_a_worker_killed_mid_epoch_has_its_shards_recomputed_elsewhere(blobs, caplog):
    x, y = blobs(n=600)
    serial = rmidl.train(x, y, threads=0, **SMALL)
    before = mapped_blocks()
    with LocalCluster(workers=2) as cluster, Coordinator(cluster.ns_address, local_threads=0) as co:
        in_use: list[set[str]] = []

        def kill() -> None:
            in_use.append(mapped_blocks() - before)  # the step's gradients block (workers write there)
            cluster.kill("w2")

        killer = BeforeStep(co, 7, kill)  # epoch 2, step 3 of 5
        with caplog.at_level(logging.WARNING, logger="rmidl.client.scheduler"):
            assert same_run(*rmidl.train(x, y, coordinator=killer, **SMALL), serial)
        assert {w["name"]: w["state"] for w in co.workers()}["w2"] == "dead"
        assert any("w2 lost" in record.getMessage() for record in caplog.records)
    assert len(in_use[0]) == 1
    gc.collect()
    assert mapped_blocks() == before  # the gradients' blocks closed, also those given up after a retry


def test_a_worker_dying_inside_a_gradient_task_loses_no_work(blobs, children):
    x, y = blobs(n=600)
    serial = rmidl.train(x, y, threads=0, **SMALL)
    with LocalCluster(workers=1) as cluster:
        dying = children("worker_doubles", "--ns", cluster.ns_address, "--name", "dies",
                         "--die-in-gradient", "3", env={"PYTHONPATH": str(Path(__file__).parent)})
        dying.read_until("ready")
        with Coordinator(cluster.ns_address, local_threads=0) as co:
            assert same_run(*rmidl.train(x, y, coordinator=co, **SMALL), serial)
            assert {w["name"]: w["state"] for w in co.workers()} == {"dies": "dead", "w1": "ok"}
            assert co.last_job()["tasks_by"].get("dies", 0) <= 2  # its third task was run again on w1
        assert dying.wait_exit()[0] == -9


def test_a_worker_joining_mid_training_takes_bundles(nameserver, start_worker, cluster_config, blobs):
    x, y = blobs(n=600)
    serial = rmidl.train(x, y, threads=0, **SMALL)
    start_worker(worker_class=CountingWorker)
    joined = []
    with Coordinator(nameserver, local_threads=0, config=cluster_config) as co:

        def join() -> None:
            joined.append(start_worker(worker_class=CountingWorker))
            assert len(co.workers()) == 2  # looked up now (a job also looks every poll interval)

        assert same_run(*rmidl.train(x, y, coordinator=BeforeStep(co, 7, join), **SMALL), serial)
        assert co.last_job()["tasks_by"].get("w1", 0) > 0
    late = joined[0].worker
    assert late.gradient_calls > 0 and sum(b.startswith("weights-") for b in late.puts) == 15 - 7


def test_bundles_over_a_workers_blob_budget_go_to_the_others(nameserver, start_worker, cluster_config, blobs):
    x, y = blobs(n=600)
    serial = rmidl.train(x, y, threads=0, **SMALL)
    # a blob budget of 10 kB: less than any bundle of shards (6240 bytes each) with the weights
    small = start_worker(worker_class=CountingWorker, config=cluster_config.replace(memory_budget=40_000))
    with Coordinator(nameserver, local_threads=1, config=cluster_config) as co:
        assert same_run(*rmidl.train(x, y, coordinator=co, **SMALL), serial)
        assert set(co.last_job()["tasks_by"]) == {"local"}
    assert small.worker.gradient_calls == 0
    with Coordinator(nameserver, local_threads=0, config=cluster_config) as co, pytest.raises(
        BudgetExceeded, match=r"fits no participant's limits \(w0: its shards and weights \(\d+ bytes\) are "
                              "over the blob budget of 10000"
    ):
        rmidl.train(x, y, coordinator=co, **SMALL)


def test_a_worker_of_an_older_version_sits_training_out(nameserver, start_worker, cluster_config, blobs):
    x, y = blobs(n=600)
    old = start_worker(worker_class=OlderWorker)
    with Coordinator(nameserver, local_threads=0, config=cluster_config) as co, pytest.raises(
        WorkerLost, match=r"no worker can run gradient tasks .*w0 \(rmidl 0\.0\.9\) serves correlate only"
    ):
        rmidl.train(x, y, coordinator=co, **SMALL)
    with Coordinator(nameserver, local_threads=1, config=cluster_config) as co:
        assert same_run(*rmidl.train(x, y, coordinator=co, **SMALL), rmidl.train(x, y, threads=0, **SMALL))
        assert set(co.last_job()["tasks_by"]) == {"local"}
    assert old.worker.gradient_calls == 0 and not old.worker.puts


def test_shards_too_large_for_a_message_are_refused_before_any_moves(nameserver, start_worker,
                                                                     cluster_config, blobs):
    x, y = blobs(n=600)  # 8 shards of 60 rows: x (60, 12) and y (60,) in float64, 6240 bytes, plus framing
    small = cluster_config.replace(max_message_size=64 << 10)
    handle = start_worker(worker_class=CountingWorker, config=cluster_config.replace(max_message_size=4096))
    with Coordinator(nameserver, local_threads=0, config=cluster_config) as co, pytest.raises(
        WorkerLost, match=r"w0 takes messages of 4096 bytes, a shard needs \d+"
    ):
        rmidl.train(x, y, coordinator=co, **SMALL)
    with Coordinator(nameserver, local_threads=1, config=small) as co, pytest.raises(
        BudgetExceeded, match="a training shard of 576480 bytes does not fit max_message_size=65536"
    ):
        rmidl.train(np.repeat(x, 100, axis=1), y, coordinator=co, **SMALL)
    assert not handle.worker.puts and handle.worker.gradient_calls == 0


@pytest.mark.parametrize(("consumers", "runners", "size"), [
    ([Capacity("w1", 20.0, 1, 1e-4), Capacity("w2", 20.0, 1, 1e-4)], 4, 2),  # TASKS_PER_CORE each
    ([Capacity("w1", 160.0, 8, 1e-4), Capacity("w2", 160.0, 8, 1e-4)], 4, 8),  # all 8 threads busy
    ([Capacity("local", 20.0)] * 2 + [Capacity("w1", 160.0, 8, 1e-4)], 4, 6),  # each consumer gets one
    ([Capacity("w1", 20.0, 1, 0.05)], 2, 8),  # round trips of 50 ms: one task per runner
    ([Capacity("w1", 20.0, 1, 0.05)] * 8, 16, 1),  # more runners than shards: one shard each
])
def test_bundles_keep_every_runner_and_every_worker_thread_busy(consumers, runners, size):
    from rmidl.client.training import bundle_size

    step_flops = 2e9  # 0.1 s on 20 GFLOP/s
    assert bundle_size(16, step_flops=step_flops, consumers=consumers, runners=runners) == size


# -- the worker's side of a gradient task ----------------------------------------------------------------

@pytest.fixture
def step_job(blobs):
    """A training job of 4 shards, 3 steps per epoch, and the blobs a worker would hold for it."""
    x, y = blobs(n=90, features=5)
    spec = MLPSpec((5, 6, 3), "tanh")
    plan, parts = split_shards(x, y, shards=4, batch=30, seed=1)
    weights = Weights(4, spec.initial_parameters(2))
    shards = [Blob.shard(s, part.x, part.y) for s, part in enumerate(parts)]
    return TrainingJob(spec, plan, tuple(parts)), weights, shards


def over_the_wire(record: dict) -> dict:
    return msgpack.unpackb(msgpack.packb(record, use_bin_type=True), raw=False)


STEP = Step(1, 1, 4)


def gradient_task(job: TrainingJob, weights: Weights, shards: list[Blob], ids: Sequence[int],
                  output: str = "inline") -> GradientTask:
    return GradientTask(7, STEP, tuple((s, shards[s].content_id) for s in ids), f"weights-{weights.version}",
                        job.spec, job.plan, output)


@pytest.mark.parametrize("output", ["inline", "bulk"])
def test_a_worker_returns_the_pure_parts_of_its_shards(start_worker, cluster_config, step_job, output):
    from rmidl.client.stub import WorkerStub

    job, weights, shards = step_job
    handle = start_worker(ns=None)
    stub = WorkerStub("w", handle.uri, cluster_config)
    stub.probe()
    blobs = {f"weights-{weights.version}": Blob.weights(weights.vector, weights.version)}
    blobs.update({blob.content_id: blob for blob in shards})
    task = gradient_task(job, weights, shards, [1, 3], output)
    try:
        reply = stub.call(task, timeout=30, blobs=blobs)
        assert isinstance(reply, GradientReply) and reply.shards == (1, 3)
        gradients = np.empty(task.result_shape)
        stub.receive(reply.result, gradients, what="the task")
    finally:
        stub.close()
    for row, shard in enumerate((1, 3)):
        part = job.compute(weights.vector, task.step, shard)
        assert np.array_equal(gradients[row], part.grad_sum)
        assert (reply.loss_sums[row], reply.counts[row], reply.correct[row]) == (
            part.loss_sum, part.count, part.correct)


def test_bad_gradient_tasks_are_refused_by_the_worker(start_worker, step_job):
    job, weights, shards = step_job
    worker = start_worker(ns=None).worker
    worker.put_blob(f"weights-{weights.version}", Blob.weights(weights.vector, weights.version).to_wire())
    for blob in shards[:2]:
        worker.put_blob(blob.content_id, blob.to_wire())
    cases = [
        (gradient_task(job, weights, shards, [2]), BankError, r"shard 'shard-\w+' is not cached"),
        (GradientTask(7, STEP, ((1, shards[0].content_id),), f"weights-{weights.version}", job.spec,
                      job.plan), ShapeError, "holds shard 0, not 1"),
        (gradient_task(job, Weights(0, np.zeros(3)), shards, [0]), BankError, "weights 'weights-0:"),
        (GradientTask(7, STEP, ((0, shards[0].content_id),), f"weights-{weights.version}",
                      MLPSpec((5, 7, 3)), job.plan), ShapeError, "hold 57 values; sizes"),
    ]
    for task, error, match in cases:
        with pytest.raises(error, match=match):
            worker.gradient(over_the_wire(task.to_wire()))
    wire = over_the_wire(gradient_task(job, weights, shards, [0]).to_wire())
    for change, error, match in [
        ({"step": [0, 3, 3]}, ShapeError, "outside the plan's 3 steps"),
        ({"shards": [[1, "a"], [0, "b"]]}, ShapeError, "must be ascending"),
        ({"shards": [[4, "a"]]}, ShapeError, "plan's 4 shards"),
        ({"shards": []}, ShapeError, "must be ascending"),
        ({"output": "shm"}, ShapeError, "is not inline, bulk or shm"),
        ({"output": {"shm": {"name": "rmidl_x", "shape": [4, 3], "dtype": "float64", "pid": 1, "fd": 3,
                             "token": "t"}}}, ShapeError,
         r"shared output \(4, 3\) float64 is not \(4, 57\) float64"),
        ({"spec": {"sizes": 5}}, OptionError, "spec"),
        ({"plan": {"seed": 1}}, OptionError, "a shard plan is a dict"),
        ({"weights": ""}, BankError, "non-empty string"),
        ({"priority": 1}, ShapeError, r"unknown field\(s\) priority"),
    ]:
        with pytest.raises(error, match=match):
            worker.gradient({**wire, **change})
    assert worker.ping() == "pong"


def test_gradient_records_round_trip_and_replies_are_checked_against_their_task(step_job):
    job, weights, shards = step_job
    task = gradient_task(job, weights, shards, [0, 2], "bulk")
    assert GradientTask.from_wire(over_the_wire(task.to_wire())) == task
    gradients = np.arange(2.0 * job.spec.parameter_count).reshape(task.result_shape)
    reply = GradientReply(7, 0.5, (0, 2), (1.5, 2.5), (8, 7), (3, 4), gradients)
    back = task.parse_reply(over_the_wire(reply.to_wire()), max_bytes=1 << 20)
    assert back.shards == (0, 2) and back.counts == (8, 7) and np.array_equal(back.result, gradients)
    for wrong, match in [
        (GradientReply(8, 0.5, (0, 2), (1.5, 2.5), (8, 7), (3, 4), gradients), "names task 8"),
        (GradientReply(7, 0.5, (0, 1), (1.5, 2.5), (8, 7), (3, 4), gradients), r"shards \[0, 1\]"),
        (GradientReply(7, 0.5, (0, 2), (1.5, 2.5), (8, 7), (3, 4), gradients[:1]), "expected"),
        (GradientReply(7, 0.5, (0, 2), (1.5, 2.5), (8, 7), (3, 4), gradients.astype(np.float32)), "float32"),
        (GradientReply(7, 0.5, (0, 2), (1.5,), (8, 7), (3, 4), gradients), "loss_sums must be a list of 2"),
    ]:
        with pytest.raises(ShapeError, match=match):
            task.parse_reply(over_the_wire(wrong.to_wire()), max_bytes=1 << 20)


@pytest.mark.parametrize(("change", "match"), [
    (lambda b: Blob("shard", {**b.arrays, "x": np.full_like(b.arrays["x"], np.nan)}, b.settings), "NaN"),
    (lambda b: Blob("shard", {**b.arrays, "y": b.arrays["y"] + 0.5}, b.settings), "class indices"),
    (lambda b: Blob("shard", {**b.arrays, "y": b.arrays["y"][:-1]}, b.settings), r"y \(n,\)"),
    (lambda b: Blob("shard", b.arrays, {"shard": -1}), "setting 'shard' >= 0"),
    (lambda b: Blob("weights", {"weights": np.array([1.0, np.inf])}, {"version": "1:x"}), "Inf"),
    (lambda b: Blob("weights", {"weights": np.ones((2, 2))}, {"version": "1:x"}), "flat float64"),
])
def test_training_blobs_are_checked_when_put(step_job, change, match):
    from rmidl.errors import InputError

    blob = change(step_job[2][0])
    with pytest.raises(InputError, match=match):
        Blob.from_wire(over_the_wire(blob.to_wire()), blob_id="b", max_bytes=1 << 20)
