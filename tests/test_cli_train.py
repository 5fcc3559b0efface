"""`rmidl train` and `rmidl predict`: features file -> model (+ plot) -> predictions, here and on a cluster"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rmidl
from rmidl.client.cli import main

NAMES = np.array(["cat", "dog", "eel"])
TRAIN = ["--epochs", "4", "--batch", "100", "--hidden", "16", "--shards", "4"]


@pytest.fixture
def features(tmp_path, blobs) -> Path:
    """What `rmidl features` writes: X float32, labels as indices into classes, paths."""
    x, y = blobs(n=600)
    path = tmp_path / "features.npz"
    np.savez(path, X=x.astype(np.float32), labels=y, classes=NAMES,
             paths=np.array([f"images/{i:03d}.png" for i in range(600)]))
    return path


def test_train_then_predict_here(features, tmp_path, capsys):
    model_path = tmp_path / "model.npz"
    assert main(["train", str(features), *TRAIN, "--out", str(model_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["epoch", "loss", "train", "val", "loss", "val", "seconds"]
    assert [line.split()[0] for line in out[1:5]] == ["1", "2", "3", "4"]
    assert out[5].startswith("MLP(sizes=(12, 16, 3)") and "validation accuracy" in out[5]
    assert f"model saved to {model_path}" in out[5] and f"plot {model_path.with_suffix('.png')}" in out[5]
    assert model_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = rmidl.MLP.load(model_path)
    assert list(model.classes) == list(NAMES)
    with np.load(features) as stored:
        x, labels = stored["X"], NAMES[stored["labels"]]
    expected, _ = rmidl.train(x, labels, hidden=(16,), epochs=4, batch=100, shards=4, classes=list(NAMES))
    assert np.array_equal(model.parameters, expected.parameters)

    csv_path, npz_path = tmp_path / "predictions.csv", tmp_path / "predictions.npz"
    assert main(["predict", str(model_path), str(features), "--out", str(csv_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"accuracy {100 * model.score(x, labels):.2f}% on 600 samples")
    assert lines[1] == "confusion matrix:" and lines[2].split()[-4:] == ["cat", "dog", "eel", "recall"]
    matrix = np.array([[int(v) for v in line.split()[1:4]] for line in lines[3:6]])
    predicted = model.predict(x)
    for i, true in enumerate(NAMES):
        assert [line.split()[0] for line in lines[3:6]][i] == true
        assert list(matrix[i]) == [int(np.sum((labels == true) & (predicted == p))) for p in NAMES]
    with csv_path.open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "predicted"] and rows[1] == ["images/000.png", str(predicted[0])]
    assert len(rows) == 601
    assert main(["predict", str(model_path), str(features), "--out", str(npz_path)]) == 0
    with np.load(npz_path) as written:
        assert list(written["predictions"]) == list(predicted)
        assert written["probabilities"].shape == (600, 3)


def test_predict_without_labels_counts_the_predicted_classes(features, tmp_path, capsys):
    model_path = tmp_path / "model.npz"
    assert main(["train", str(features), *TRAIN, "--out", str(model_path), "-q"]) == 0
    unlabelled = tmp_path / "unlabelled.npz"
    with np.load(features) as stored:
        np.savez(unlabelled, X=stored["X"])
    capsys.readouterr()
    assert main(["predict", str(model_path), str(unlabelled)]) == 0
    line = capsys.readouterr().out.strip()
    counts = {name: int(n) for name, n in (part.split(": ") for part in line.split("): ")[1].split(", "))}
    assert sum(counts.values()) == 600 and set(counts) == set(NAMES)


def test_train_on_a_cluster_gives_the_same_model_and_shows_the_phases(nameserver, start_worker, features,
                                                                      tmp_path, capsys):
    for _ in range(2):
        start_worker()
    here, there = tmp_path / "here.npz", tmp_path / "there.npz"
    assert main(["train", str(features), *TRAIN, "--out", str(here), "--no-plot", "-q"]) == 0
    assert main(["train", str(features), *TRAIN, "--ns", nameserver, "--out", str(there), "-v",
                 "--no-plot"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert np.array_equal(rmidl.MLP.load(here).parameters, rmidl.MLP.load(there).parameters)
    header = out.index(next(line for line in out if line.split()[:3] == ["epoch", "send", "ms"]))
    assert len(out[header + 1].split()) == 7  # epoch, five phases, KiB per step
    assert out[header + 5].startswith("per step: send ")
    assert "tasks: w0=" in out[-1] or "tasks: w1=" in out[-1]
    assert not there.with_suffix(".png").exists()


def test_quiet_prints_the_result_line_only(features, capsys):
    assert main(["train", str(features), *TRAIN, "-q"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("MLP(") and "not saved (no --out)" in out[0]


def test_without_matplotlib_training_says_so_in_one_line(features, tmp_path, capsys, monkeypatch):
    from rmidl.client.bench import plots

    why = "matplotlib is not installed; pip install 'rmidl[plot]'"
    monkeypatch.setattr(plots, "unavailable", lambda: why)
    plot = tmp_path / "curves.png"
    assert main(["train", str(features), *TRAIN, "--plot", str(plot), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "rmidl: no plot: matplotlib is not installed; pip install 'rmidl[plot]'"
    assert "no plot (matplotlib missing)" in captured.out and not plot.exists()


def test_train_and_predict_in_real_processes(features, tmp_path):
    model = tmp_path / "model.npz"
    cli = [sys.executable, "-m", "rmidl.client.cli"]
    trained = subprocess.run([*cli, "train", str(features), *TRAIN, "--out", str(model)], capture_output=True,
                             text=True, timeout=120, check=False)
    assert trained.returncode == 0, trained.stderr
    assert trained.stdout.splitlines()[-1].startswith("MLP(")
    predicted = subprocess.run([*cli, "predict", str(model), str(features)], capture_output=True, text=True,
                               timeout=120, check=False)
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.startswith("accuracy ")


def test_images_to_features_to_model_to_predictions_on_a_local_cluster(tmp_path, capsys):
    """The pipeline's last two stages after its first: texture images -> CNN features (Network) ->
    FEATURES.npz -> rmidl train on 2 workers -> rmidl predict on the disjoint test images."""
    from rmidl import datasets
    from rmidl.client.localcluster import LocalCluster

    textures = datasets.make_textures(tmp_path / "textures", per_class=10, size=48, source="procedural")
    network = rmidl.Network.from_spec("6x5x5:relu:max2,6x5x5:relu:max2", seed=0)
    files = {}
    for split, folder in (("train", textures.train), ("test", textures.test)):
        data = datasets.open(folder).read()
        files[split] = tmp_path / f"{split}.npz"
        np.savez(files[split], X=network.forward_batch(data.images, threads=1), labels=data.labels,
                 classes=np.array(textures.classes))
    model = tmp_path / "model.npz"
    with LocalCluster(workers=2) as cluster:
        argv = ["train", str(files["train"]), "--ns", cluster.ns_address, "--epochs", "10", "--batch", "16",
                "--out", str(model), "--no-plot", "-q"]
        assert main(argv) == 0
    assert "(tasks: w" in capsys.readouterr().out  # trained on the workers
    assert main(["predict", str(model), str(files["test"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("accuracy ") and "on 12 samples" in lines[0]
    assert [line.split()[0] for line in lines[3:9]] == list(textures.classes)


NET = "6x5x5:relu:gavg"


def _features(capsys, *argv: str) -> None:
    assert main(["features", *argv, "--no-cluster", "-q"]) == 0
    capsys.readouterr()


@pytest.fixture
def image_model(tmp_path, capsys) -> tuple[Path, Path]:
    """(images folder, model): `rmidl train` on the `rmidl features` of 2 classes of 8 gray 24x20 images."""
    from conftest import write_image_folder

    images = write_image_folder(tmp_path / "images", classes=2, per_class=8)
    _features(capsys, str(images), "--net", NET, "--out", str(tmp_path / "train.npz"))
    model = tmp_path / "model.npz"
    assert main(["train", str(tmp_path / "train.npz"), "--epochs", "2", "--batch", "8", "--out", str(model),
                 "--no-plot", "-q"]) == 0
    capsys.readouterr()
    return images, model


def test_predict_new_unlabelled_images(image_model, tmp_path, capsys):
    """Predict's main use: features of a glob of new images (no labels, no classes) -> class names."""
    images, model = image_model
    unlabelled = tmp_path / "new.npz"
    _features(capsys, str(images / "*" / "*.png"), "--net", NET, "--out", str(unlabelled))
    with np.load(unlabelled) as stored:
        assert "classes" not in stored.files and "labels" not in stored.files
    table = tmp_path / "predicted.csv"
    assert main(["predict", str(model), str(unlabelled), "--out", str(table)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"16 samples of features file {str(unlabelled)!r} (no labels to score): c0: ")
    with table.open() as handle:
        rows = list(csv.reader(handle))
    expected = rmidl.MLP.load(model).predict(rmidl.FeatureSet.load(unlabelled))
    assert rows[0] == ["path", "predicted"] and len(rows) == 17
    names = [f"img{i:03d}.png" for _ in range(2) for i in range(8)]
    assert [Path(path).name for path, _ in rows[1:]] == names
    assert [label for _, label in rows[1:]] == list(expected) and set(expected) <= {"c0", "c1"}
    # what rmidl features wrote for an unlabelled set before: an empty classes array
    with np.load(unlabelled) as stored:
        arrays = {name: stored[name] for name in stored.files}
    np.savez(tmp_path / "old.npz", **arrays, classes=np.array([], dtype="<U1"))
    assert main(["predict", str(model), str(tmp_path / "old.npz")]) == 0
    assert capsys.readouterr().out.startswith("16 samples of features file")


@pytest.mark.parametrize(("case", "options", "needle"), [
    ("3-channel net on RGB images", ("--color",), "on 24x20 RGB images (made RGB), but the model"),
    ("another spec of the same width", ("--net", "6x3x3:relu:gavg"),
     "network '6x3x3:relu:gavg' (fingerprint"),
    ("resized images", ("--resize", "16"), "on 19x16 gray images (resized to 16), but the model"),
])
def test_predict_refuses_features_of_another_network_or_images(image_model, tmp_path, capsys, case, options,
                                                               needle):
    images, model = image_model
    other = tmp_path / "other.npz"
    _features(capsys, str(images), "--net", NET, *options, "--out", str(other))
    assert main(["predict", str(model), str(other)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"rmidl: error: features file {str(other)!r} holds features of network ")
    assert needle in captured.err
    assert f"the model was trained on features of network {NET!r} (fingerprint " in captured.err
    assert captured.err.rstrip().endswith("on 24x20 gray images")


def test_provenance_is_checked_only_where_both_sides_know_it(image_model, tmp_path, capsys):
    """A model of Python's rmidl.train(X, y) or a user's own X/y file predicts as before; the model of
    `rmidl train` keeps the features file's provenance."""
    images, model = image_model
    trained = rmidl.FeatureSet.load(tmp_path / "train.npz")
    assert rmidl.MLP.load(model).provenance == trained.provenance is not None
    assert trained.provenance.image_shape == (24, 20)
    colour = tmp_path / "colour.npz"
    _features(capsys, str(images), "--net", NET, "--color", "--out", str(colour))
    bare, _ = rmidl.train(trained.X, trained.y, epochs=1)
    bare.save(tmp_path / "bare.npz")
    assert main(["predict", str(tmp_path / "bare.npz"), str(colour)]) == 0
    np.savez(tmp_path / "own.npz", X=trained.X, y=trained.y)
    assert main(["predict", str(model), str(tmp_path / "own.npz")]) == 0
    assert capsys.readouterr().out.startswith("accuracy ")


def test_train_without_a_cluster_says_so_as_run_and_features_do(features, capsys):
    assert main(["train", str(features), *TRAIN, "--no-plot"]) == 0
    note = "rmidl: no local cluster is running (`rmidl up` starts one): compute in this process\n"
    assert capsys.readouterr().err == note
    assert main(["train", str(features), *TRAIN, "--no-plot", "--no-cluster"]) == 0
    assert capsys.readouterr().err == ""
