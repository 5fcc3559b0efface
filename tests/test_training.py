"""rmidl.train: bitwise determinism across executors, accuracy on real and synthetic data, history, errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pytest

import rmidl
from rmidl import dataparallel, errors
from rmidl.dataparallel import ComputeShards, Step, StepResult, TrainingJob, Weights, compute_shard
from rmidl.training import stratified_split

SMALL = {"hidden": (16, 8), "epochs": 3, "batch": 100, "shards": 8, "activation": "tanh"}


class RemoteLike:
    """A stand-in for a cluster: shards' data "shipped" once into fresh buffers, parts computed by the
    pure function in reverse shard order, phase timings and bytes reported like a coordinator would."""

    def __init__(self) -> None:
        self.sessions = 0
        self.versions: list[str] = []

    @contextmanager
    def training_session(self, job: TrainingJob) -> Iterator[ComputeShards]:
        self.sessions += 1
        held = [dataparallel.ShardData(s.x.copy(), s.y.copy()) for s in job.shards]
        plan, spec = dataparallel.ShardPlan.from_dict(job.plan.to_dict()), type(job.spec).from_dict(
            job.spec.to_dict())

        def compute_shards(step: Step, weights: Weights, shard_ids: Sequence[int]) -> StepResult:
            self.versions.append(weights.version)
            vector = np.frombuffer(weights.vector.tobytes(), np.float64)  # as if it came off the wire
            parts = {s: compute_shard(vector, held[s], plan=plan, spec=spec, step=step, shard=s)
                     for s in reversed(shard_ids)}
            return StepResult(parts, send_seconds=1e-3, gather_seconds=2e-3, bytes_sent=weights.vector.nbytes,
                              bytes_received=sum(p.grad_sum.nbytes for p in parts.values()))

        yield compute_shards


def test_weights_are_bitwise_identical_serial_one_thread_two_threads_and_remote_like(blobs) -> None:
    x, y = blobs(n=600)
    runs = {
        "serial": rmidl.train(x, y, threads=0, **SMALL),
        "1 thread": rmidl.train(x, y, threads=1, **SMALL),
        "2 threads": rmidl.train(x, y, threads=2, **SMALL),
        "remote-like": rmidl.train(x, y, coordinator=RemoteLike(), **SMALL),
    }
    reference, history = runs["serial"]
    assert history.settings["shards"] == 8 and history.settings["steps_per_epoch"] == 5
    for name, (model, other) in runs.items():
        assert np.array_equal(model.parameters, reference.parameters), name
        assert [e.loss for e in other.epochs] == [e.loss for e in history.epochs], name
        assert [e.val_accuracy for e in other.epochs] == [e.val_accuracy for e in history.epochs], name
    assert not np.array_equal(reference.parameters, rmidl.MLP(reference.sizes, activation="tanh").parameters)


def test_pool_threads_do_the_work(blobs, monkeypatch) -> None:
    names: set[str] = set()
    original = dataparallel.shard_gradient

    def spy(*args, **kwargs):
        names.add(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(dataparallel, "shard_gradient", spy)
    x, y = blobs(n=200)
    rmidl.train(x, y, threads=2, epochs=1, batch=200, shards=8)
    assert names and all(name.startswith("rmidl-train") for name in names)
    names.clear()
    rmidl.train(x, y, threads=0, epochs=1, batch=200, shards=8)
    assert names == {threading.current_thread().name}


def test_same_seed_same_weights_other_seed_other_weights(blobs) -> None:
    x, y = blobs(n=300)
    a, _ = rmidl.train(x, y, epochs=2, seed=1)
    b, _ = rmidl.train(x, y, epochs=2, seed=1)
    c, _ = rmidl.train(x, y, epochs=2, seed=2)
    assert np.array_equal(a.parameters, b.parameters)
    assert not np.array_equal(a.parameters, c.parameters)


def test_remote_like_executor_sees_one_version_per_step_and_its_timings_land_in_history(blobs) -> None:
    x, y = blobs(n=300)
    remote = RemoteLike()
    model, history = rmidl.train(x, y, coordinator=remote, epochs=2, batch=60, shards=4)
    steps = history.settings["steps_per_epoch"]
    assert remote.sessions == 1 and len(remote.versions) == 2 * steps == len(history.steps)
    assert len(set(remote.versions)) == len(remote.versions)
    assert [v.split(":")[0] for v in remote.versions] == [str(i) for i in range(2 * steps)]
    first = history.steps[0]
    assert (first.send, first.gather, first.bytes_sent) == (1e-3, 2e-3, model.parameters.nbytes)
    assert first.bytes_received == 4 * model.parameters.nbytes
    assert first.compute >= 0 and first.reduce >= 0 and first.update >= 0
    assert history.phase_means()["bytes_sent"] == model.parameters.nbytes


def test_synthetic_blobs_held_out_accuracy(blobs) -> None:
    x, y = blobs(n=1500, features=20, classes=5, seed=4)
    model, history = rmidl.train(x[:1000], y[:1000])
    accuracy = model.score(x[1000:], y[1000:])
    assert accuracy >= 0.95, history.table()
    assert history.epochs[-1].loss < history.epochs[0].loss
    assert history.epochs[-1].val_accuracy is not None and history.epochs[-1].val_accuracy >= 0.9


@pytest.mark.parametrize("kwargs", [{"output": "sigmoid", "lr": 1.0}, {"activation": "relu"},
                                    {"hidden": ()}, {"hidden": (32, 16), "batch": None, "lr": 0.5}],
                         ids=["paper-style output", "relu", "no hidden layer", "full batch"])
def test_other_settings_learn_blobs(blobs, kwargs) -> None:
    x, y = blobs(n=900, classes=3, seed=8)
    model, _ = rmidl.train(x[:600], y[:600], **kwargs)
    assert model.score(x[600:], y[600:]) >= 0.9


def test_digits_held_out_accuracy() -> None:
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn (rmidl[data]) is not installed")
    x, y = datasets.load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1347], order[1347:]
    model, history = rmidl.train(x[train], y[train])
    assert model.score(x[test], y[test]) >= 0.95, history.table()


def test_full_batch_is_one_step_per_epoch(blobs) -> None:
    x, y = blobs(n=200)
    _, history = rmidl.train(x, y, batch=None, epochs=4)
    assert history.settings["steps_per_epoch"] == 1
    n = history.settings["train_samples"]
    assert 155 <= n <= 165
    assert [s.samples for s in history.steps] == [n] * 4
    assert [e.samples for e in history.epochs] == [n] * 4


def test_text_labels_and_declared_classes(blobs) -> None:
    x, y = blobs(n=300)
    names = np.array(["cat", "dog", "owl"])[y]
    model, _ = rmidl.train(x, names, epochs=5)
    assert list(model.classes) == ["cat", "dog", "owl"]
    assert set(model.predict(x)) <= {"cat", "dog", "owl"}
    assert model.score(x, names) > 0.9
    with pytest.raises(errors.InputError, match="class 'yak' has no samples"):
        rmidl.train(x, names, classes=["cat", "dog", "owl", "yak"])


def test_a_feature_set_trains_whole_keeping_names_and_provenance(blobs, feature_set) -> None:
    """train(feats) == train(X, indices, classes=names) == train(X, names), bit for bit; the model keeps
    the names and the features' provenance."""
    x, y = blobs(n=300)
    feats = feature_set(x, y, ("cat", "dog", "owl"))
    whole, _ = rmidl.train(feats, epochs=5)
    indexed, _ = rmidl.train(feats.X, feats.labels, classes=feats.classes, provenance=feats.provenance,
                             epochs=5)
    named, _ = rmidl.train(feats.X, feats.y, epochs=5)
    assert list(whole.classes) == list(indexed.classes) == list(named.classes) == ["cat", "dog", "owl"]
    assert np.array_equal(whole.parameters, indexed.parameters)
    assert np.array_equal(whole.parameters, named.parameters)
    assert whole.provenance == indexed.provenance == feats.provenance and named.provenance is None
    assert whole.score(feats) == whole.score(feats.X, feats.y) > 0.9
    with pytest.raises(errors.OptionError, match="takes its labels, classes and provenance from the set"):
        rmidl.train(feats, feats.y)
    with pytest.raises(errors.InputError, match="is unlabelled"):
        rmidl.train(feature_set(x, None))
    with pytest.raises(errors.InputError, match=r"class indices 0\.\.1 into classes, but hold 0\.\.2"):
        rmidl.train(x, y, classes=["cat", "dog"])


def test_stratified_split_keeps_every_class_in_training() -> None:
    targets = np.array([0] * 50 + [1] * 10 + [2] * 1 + [3] * 2)
    train, held = stratified_split(targets, 4, 0.2, seed=0)
    assert sorted(np.concatenate([train, held])) == list(range(len(targets)))
    assert [int(np.sum(targets[held] == c)) for c in range(4)] == [10, 2, 0, 0]
    assert set(targets[train]) == {0, 1, 2, 3}
    _, none_held = stratified_split(targets, 4, 0.0, seed=0)
    assert none_held.size == 0


def test_validation_zero_has_no_validation_figures(blobs) -> None:
    x, y = blobs(n=120)
    _, history = rmidl.train(x, y, validation=0.0, epochs=2)
    assert history.settings["validation_samples"] == 0
    assert history.series("val_accuracy") == [None, None]
    assert "-" in history.table().splitlines()[1]


def test_history_table_phases_and_json(blobs) -> None:
    x, y = blobs(n=200)
    _, history = rmidl.train(x, y, epochs=3, batch=50)
    lines = history.table().splitlines()
    assert len(lines) == 4 and lines[0].split()[:2] == ["epoch", "loss"]
    assert lines[1].split()[0] == "1" and lines[3].split()[0] == "3"
    wide = history.table(phases=True).splitlines()
    assert all(name in wide[0] for name in ("send ms", "compute ms", "gather ms", "reduce ms", "update ms"))
    assert len(wide[1].split()) == len(lines[1].split()) + 6
    means = history.phase_means(epoch=2)
    assert set(means) == {"send", "compute", "gather", "reduce", "update", "bytes_sent", "bytes_received"}
    assert means["compute"] > 0 and means["send"] == 0.0 and means["bytes_sent"] == 0.0
    assert len(history.steps) == 3 * history.settings["steps_per_epoch"]
    assert json.loads(json.dumps(history.as_dict()))["epochs"][0]["epoch"] == 1
    with pytest.raises(KeyError, match="not an epoch field"):
        history.series("accuracy")


def test_callback_sees_each_epoch_and_can_stop(blobs) -> None:
    x, y = blobs(n=200)
    seen = []

    def callback(record, model):
        seen.append((record.epoch, model.score(x, y)))
        return record.epoch < 2  # False (not None) stops

    model, history = rmidl.train(x, y, epochs=10, callback=callback)
    assert len(history.epochs) == 2 and [e for e, _ in seen] == [1, 2]
    assert seen[-1][1] == model.score(x, y)  # the model the callback saw is the one returned


def test_progress_bar_writes_to_stderr(blobs, capsys) -> None:
    x, y = blobs(n=100)
    rmidl.train(x, y, epochs=2, progress=True)
    assert "step" in capsys.readouterr().err


class Broken:
    @contextmanager
    def training_session(self, job: TrainingJob) -> Iterator[ComputeShards]:
        yield lambda step, weights, shard_ids: StepResult({})


BAD_TRAIN = [
    ("labels missing", {"y": None}, errors.InputError, "labels y are missing"),
    ("labels short", {"y": np.zeros(5)}, errors.ShapeError, "labels y has 5 entries for 60 samples"),
    ("labels 2-D", {"y": np.zeros((60, 2))}, errors.ShapeError, "one label per sample"),
    ("labels fractional", {"y": np.linspace(0, 1, 60)}, errors.OptionError, "fractional"),
    ("labels nan", {"y": np.full(60, np.nan)}, errors.NonFiniteInput, "labels y contain NaN"),
    ("labels objects", {"y": np.array([None] * 60)}, errors.OptionError, "dtype object"),
    ("features nan", {"x": "nan"}, errors.NonFiniteInput, "X contains NaN (first at index (3, 1))"),
    ("features inf", {"x": "inf"}, errors.NonFiniteInput, "X contains Inf"),
    ("features 1-D", {"x": np.zeros(60)}, errors.ShapeError, "X must be (samples, features)"),
    ("features text", {"x": np.full((60, 2), "a")}, errors.DTypeError, "X dtype <U1 is not supported"),
    ("one class", {"y": np.zeros(60)}, errors.InputError, "single class (0); a classifier needs at least 2"),
    ("fewer samples than classes", {"x": np.zeros((3, 2)), "y": [0, 1, 2], "classes": [0, 1, 2, 3]},
     errors.InputError, "3 samples cannot cover 4 classes"),
    ("class without samples", {"classes": [0, 1, 2, 9]}, errors.InputError, "class 9 has no samples"),
    ("label outside classes", {"classes": [0, 1]}, errors.OptionError, "label 2 in y is not one of"),
    ("hidden 0", {"hidden": 0}, errors.OptionError, "hidden=0: every hidden layer needs"),
    ("hidden negative", {"hidden": -3}, errors.OptionError, "hidden=-3"),
    ("hidden layer 0", {"hidden": (25, 0)}, errors.OptionError, "hidden=(25, 0)"),
    ("hidden text", {"hidden": "25"}, errors.OptionError, "hidden='25' must be"),
    ("lr 0", {"lr": 0}, errors.OptionError, "lr=0 must be a number in (0, inf)"),
    ("lr nan", {"lr": float("nan")}, errors.OptionError, "lr=nan"),
    ("lr text", {"lr": "0.1"}, errors.OptionError, "lr='0.1'"),
    ("epochs 0", {"epochs": 0}, errors.OptionError, "epochs=0 must be an integer >= 1"),
    ("epochs float", {"epochs": 2.5}, errors.OptionError, "epochs=2.5"),
    ("batch 0", {"batch": 0}, errors.OptionError, "batch=0"),
    ("momentum 1", {"momentum": 1.0}, errors.OptionError, "momentum=1.0 must be a number in [0, 1)"),
    ("validation 1", {"validation": 1}, errors.OptionError, "validation=1"),
    ("weight decay", {"weight_decay": -0.1}, errors.OptionError, "weight_decay=-0.1"),
    ("shards 0", {"shards": 0}, errors.OptionError, "shards=0"),
    ("threads -1", {"threads": -1}, errors.OptionError, "threads=-1"),
    ("seed", {"seed": -1}, errors.OptionError, "seed=-1"),
    ("activation", {"activation": "gelu"}, errors.OptionError, "activation 'gelu' is not one of"),
    ("output", {"output": "linear"}, errors.OptionError, "output 'linear' is not one of"),
    ("callback", {"callback": 3}, errors.OptionError, "callback=3 is not callable"),
    ("coordinator", {"coordinator": object()}, errors.OptionError, "coordinator object cannot run training"),
    ("executor drops shards", {"coordinator": Broken()}, errors.ClusterError, "missing [0]"),
]


@pytest.mark.parametrize(("case", "change", "error", "needle"), BAD_TRAIN, ids=[c[0] for c in BAD_TRAIN])
def test_bad_training_input_is_one_line_error(blobs, case, change, error, needle) -> None:
    x, y = blobs(n=60)
    arguments = {"x": x, "y": y, "epochs": 1, **change}
    if isinstance(arguments["x"], str):
        x = x.copy()
        x[3, 1] = np.nan if arguments["x"] == "nan" else np.inf
        arguments["x"] = x
    with pytest.raises(error) as caught:
        rmidl.train(arguments.pop("x"), arguments.pop("y"), **arguments)
    assert needle in str(caught.value) and "\n" not in str(caught.value)
    if not isinstance(caught.value, errors.ClusterError):
        assert isinstance(caught.value, ValueError)


def test_float32_features_train_as_their_float64_values(blobs) -> None:
    """CNN features arrive as float32; widening is exact, so the weights equal a float64 run's."""
    x, y = blobs(n=200)
    narrow = x.astype(np.float32)
    a, _ = rmidl.train(narrow, y, epochs=2)
    b, _ = rmidl.train(narrow.astype(np.float64), y, epochs=2)
    assert np.array_equal(a.parameters, b.parameters)
    assert a.predict(narrow).tolist() == b.predict(narrow.astype(np.float64)).tolist()
