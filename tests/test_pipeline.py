"""Pipeline parallelism: the bounded executor, and the stage-mapped features run (exact, placed, faults)."""

from __future__ import annotations

import itertools
import logging
import threading

import numpy as np
import pytest
from conftest import wait_for

from rmidl.client import Coordinator
from rmidl.client.pipeline import StageProcessors, run_pipeline
from rmidl.config import Config
from rmidl.datasets import open_dataset
from rmidl.errors import OptionError, ShapeError
from rmidl.network import Network

NET = "3x3x3:relu:max2,3x3x3:relu:max2:dw,2x2x2:tanh:nopool"


def test_items_flow_through_every_stage_with_bounded_buffers() -> None:
    produced, finished = [0], []
    ahead = []
    release = threading.Event()
    lock = threading.Lock()

    def first(item: int) -> int:
        with lock:
            produced[0] += 1
            ahead.append(produced[0] - len(finished))
        return item * 10

    def second(item: int) -> None:
        if not release.is_set():
            wait_for(lambda: produced[0] >= 4)  # the first stage runs as far ahead as it may
            release.set()
        with lock:
            finished.append(item)

    spans = run_pipeline(range(40), [StageProcessors("one", [("a", first)]),
                                     StageProcessors("two", [("b", second)])], in_flight=2, key=lambda x: x)
    assert sorted(finished) == [i * 10 for i in range(40)]
    # 2 waiting before stage two, 1 in it, 1 done and blocked on the full queue: never more
    assert max(ahead) <= 4
    assert [s.stage for s in spans].count("one") == 40 and {s.processor for s in spans} == {"a", "b"}
    assert all(s.end >= s.start >= 0 for s in spans)


def test_the_first_error_stops_the_pipeline_and_is_raised() -> None:
    def boom(item: int) -> int:
        if item == 3:
            raise ShapeError("item 3 is bad")
        return item

    before = threading.active_count()
    with pytest.raises(ShapeError, match="item 3"):
        run_pipeline(range(1000), [StageProcessors("one", [("a", boom), ("b", boom)]),
                                   StageProcessors("two", [("c", lambda x: x)])])
    assert threading.active_count() == before  # every processor joined


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import write_image_folder

    root = write_image_folder(tmp_path_factory.mktemp("stages"), per_class=8, shape=(30, 28))
    net = Network.from_spec(NET, seed=5)
    with Coordinator(local_threads=1, config=Config(environ={})) as coordinator:
        return root, net, coordinator.features(root, net, batch=3, progress=False).X


@pytest.mark.parametrize(("replicas", "pipelines"), [(None, 1), ([2, 1, 1], 1), (None, 2)])
def test_stage_placement_here_gives_the_task_placement_features(data, replicas, pipelines) -> None:
    root, net, expected = data
    with Coordinator(local_threads=1, config=Config(environ={})) as coordinator:
        result = coordinator.features(root, net, batch=3, progress=False, placement="stages",
                                      replicas=replicas, pipelines=pipelines)
        job = coordinator.last_job()
    np.testing.assert_array_equal(result.X, expected)
    spans = job["stage_spans"]
    stages = {s.stage for s in spans}
    assert stages == {"LOAD", "CNP1", "CNP2", "CNP3", "FLAT"}
    assert all(sum(1 for s in spans if s.stage == stage) == 6 for stage in stages)  # 16 images in 6 batches
    cnp1 = {s.processor for s in spans if s.stage == "CNP1"}
    assert len(cnp1) == (replicas or [1])[0] * pipelines
    assert job["placement"] == "stages" and set(job["stage_seconds"]) >= {"LOAD", "CNP1", "CNP3", "FLAT"}
    # a batch reaches a stage only after it left the one before
    for key in {s.key for s in spans}:
        order = sorted((s for s in spans if s.key == key), key=lambda s: s.start)
        assert [s.stage for s in order] == ["LOAD", "CNP1", "CNP2", "CNP3", "FLAT"]
        assert all(a.end <= b.start for a, b in itertools.pairwise(order))


def test_stage_placement_on_workers_survives_a_worker_dying(data, caplog) -> None:
    from rmidl.client.localcluster import LocalCluster

    root, net, expected = data
    with LocalCluster(workers=3) as cluster, Coordinator(cluster.ns_address, local_threads=0,
                                                         config=Config(environ={})) as coordinator:
        result = coordinator.features(root, net, batch=3, progress=False, placement="stages")
        on = {s.stage: s.processor for s in coordinator.last_job()["stage_spans"]}
        assert {on["CNP1"], on["CNP2"], on["CNP3"]} == {"w1", "w2", "w3"}
        np.testing.assert_array_equal(result.X, expected)

        def kill_at(done: int, total: int) -> None:
            # after the first of 16 batches: w2 (CNP2) is at most 2 + 1 + 2 + 1 + 1 batches further on
            if done >= 1 and cluster.workers["w2"].alive():
                cluster.kill("w2")

        with caplog.at_level(logging.WARNING, logger="rmidl.client.pipeline.stages"):
            again = coordinator.features(root, net, batch=1, progress=kill_at, placement="stages")
        images = open_dataset(root).read().images
        alone = [net.forward_batch(image[None], threads=1)[0] for image in images]
        np.testing.assert_array_equal(again.X, np.stack(alone))
        assert any("carries on in this process" in r.getMessage() for r in caplog.records)


def test_bad_stage_options(data) -> None:
    with Coordinator(local_threads=1, config=Config(environ={})) as coordinator:
        for options, text in [({"placement": "diagonal"}, "placement='diagonal'"),
                              ({"placement": "stages", "replicas": [1, 1]}, "each of the 3 CNP stages"),
                              ({"placement": "stages", "replicas": [1, 0, 1]}, "positive processor count"),
                              ({"placement": "stages", "pipelines": 0}, "pipelines=0")]:
            with pytest.raises(OptionError, match=text):
                coordinator.features(data[0], NET, progress=False, **options)
