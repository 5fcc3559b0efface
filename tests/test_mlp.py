"""rmidl.MLP: gradients against finite differences, predictions, the .npz file and its one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import rmidl
from rmidl import errors
from rmidl.mlp import ACTIVATIONS, OUTPUTS, MLPSpec, evaluate, gradient_sums
from rmidl.provenance import Provenance


def numeric_gradient(model: rmidl.MLP, x: np.ndarray, y: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of model.loss_and_gradient's loss, one parameter at a time."""
    base = model.parameters.copy()
    grad = np.empty_like(base)
    for i in range(base.size):
        losses = []
        for sign in (1, -1):
            shifted = base.copy()
            shifted[i] += sign * h
            model.set_parameters(shifted)
            losses.append(model.loss_and_gradient(x, y)[0])
        grad[i] = (losses[0] - losses[1]) / (2 * h)
    model.set_parameters(base)
    return grad


@pytest.mark.parametrize("sizes", [(5, 4, 3, 3), (5, 3)], ids=["two-hidden", "no-hidden"])
@pytest.mark.parametrize("decay", [0.0, 0.3])
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradient_matches_finite_differences(rng, activation, output, decay, sizes) -> None:
    model = rmidl.MLP(sizes, activation=activation, output=output, weight_decay=decay, seed=3)
    model.set_parameters(model.parameters + 0.1 * rng.standard_normal(model.parameters.size))  # biases too
    x = rng.standard_normal((7, sizes[0]))
    y = rng.integers(0, sizes[-1], 7)
    loss, analytic = model.loss_and_gradient(x, y)
    assert np.isfinite(loss) and loss > 0
    np.testing.assert_allclose(analytic, numeric_gradient(model, x, y), rtol=1e-5, atol=1e-8)


def test_loss_is_the_mean_data_loss_plus_the_penalty(rng) -> None:
    model = rmidl.MLP((4, 6, 3), weight_decay=0.5, seed=1)
    x, y = rng.standard_normal((9, 4)), rng.integers(0, 3, 9)
    probabilities = model.predict_proba(x)
    cross_entropy = -np.mean(np.log(probabilities[np.arange(9), y]))
    squares = sum(float((w**2).sum()) for w in model.weights)
    assert model.loss_and_gradient(x, y)[0] == pytest.approx(cross_entropy + 0.25 * squares, rel=1e-12)
    loss_sum, correct = evaluate(model.spec, model.parameters, x, y)
    assert loss_sum == pytest.approx(9 * cross_entropy, rel=1e-12)
    assert correct == int(np.sum(probabilities.argmax(axis=1) == y))


def test_squared_error_output_loss(rng) -> None:
    model = rmidl.MLP((4, 5, 3), output="sigmoid", seed=2)
    x, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    h = 1 / (1 + np.exp(-(x @ model.weights[0] + model.biases[0])))
    out = 1 / (1 + np.exp(-(h @ model.weights[1] + model.biases[1])))
    target = np.eye(3)[y]
    sums = gradient_sums(model.spec, model.parameters, x, y)
    assert sums.loss_sum == pytest.approx(0.5 * ((out - target) ** 2).sum(), rel=1e-12)
    np.testing.assert_allclose(model.predict_proba(x), out / out.sum(axis=1, keepdims=True), rtol=1e-12)


def test_parameters_are_one_flat_float64_vector_with_layer_views() -> None:
    model = rmidl.MLP((5, 4, 3, 2), activation="relu")
    assert model.parameters.dtype == np.float64
    assert model.parameters.shape == (5 * 4 + 4 + 4 * 3 + 3 + 3 * 2 + 2,)
    assert [w.shape for w in model.weights] == [(5, 4), (4, 3), (3, 2)]
    assert [b.shape for b in model.biases] == [(4,), (3,), (2,)]
    assert all(np.shares_memory(w, model.parameters) for w in model.weights + model.biases)
    assert not any(b.any() for b in model.biases)
    model.weights[1][0, 0] = 7.5
    assert 7.5 in model.parameters


def test_initialisation_is_seeded() -> None:
    a, b, c = (rmidl.MLP((8, 6, 3), seed=s) for s in (4, 4, 5))
    assert np.array_equal(a.parameters, b.parameters)
    assert not np.array_equal(a.parameters, c.parameters)
    relu = rmidl.MLP((400, 256, 10), activation="relu", seed=0)
    assert np.abs(relu.weights[0]).max() <= np.sqrt(6 / 400)  # He-uniform into relu
    assert np.abs(relu.weights[1]).max() <= np.sqrt(6 / 266)  # Glorot-uniform into the output


def test_predictions_use_the_stored_scaling_and_class_labels(rng) -> None:
    model = rmidl.MLP((3, 5, 3), classes=["cat", "dog", "owl"], seed=0)
    raw = 100.0 + 20.0 * rng.standard_normal((10, 3))
    model.fit_scaling(raw)
    scaled = (raw - raw.mean(axis=0)) / raw.std(axis=0)
    plain = rmidl.MLP((3, 5, 3), seed=0)
    np.testing.assert_array_equal(model.predict_proba(raw), plain.predict_proba(scaled))
    labels = model.predict(raw)
    assert set(labels) <= {"cat", "dog", "owl"}
    assert model.score(raw, labels) == 1.0
    np.testing.assert_allclose(model.predict_proba(raw).sum(axis=1), 1.0, rtol=1e-12)


def test_constant_feature_keeps_unit_scale(rng) -> None:
    model = rmidl.MLP((2, 3, 2))
    model.fit_scaling(np.column_stack([np.full(5, 3.0), rng.standard_normal(5)]))
    assert model.scale is not None and model.scale[0] == 1.0
    assert np.isfinite(model.predict_proba(np.ones((2, 2)))).all()


@pytest.mark.parametrize("output", OUTPUTS)
def test_huge_inputs_stay_finite_without_warnings(output) -> None:
    model = rmidl.MLP((3, 4, 3), output=output, activation="sigmoid")
    proba = model.predict_proba(np.array([[1e300, -1e300, 0.0], [-1e200, 1e200, 5.0]]))
    assert np.isfinite(proba).all()


def test_save_and_load_round_trip(tmp_path, rng) -> None:
    model = rmidl.MLP((4, 6, 5, 3), activation="tanh", output="sigmoid", seed=9, weight_decay=0.01,
                      classes=[3, 10, 42])
    model.fit_scaling(rng.standard_normal((20, 4)))
    model.set_parameters(rng.standard_normal(model.parameters.size))
    path = model.save(tmp_path / "model.npz")
    loaded = rmidl.MLP.load(path)
    assert repr(loaded) == repr(model)
    assert loaded.settings() == model.settings()
    np.testing.assert_array_equal(loaded.parameters, model.parameters)
    np.testing.assert_array_equal(loaded.classes, model.classes)
    assert loaded.mean is not None and model.mean is not None and loaded.scale is not None
    np.testing.assert_array_equal(loaded.mean, model.mean)
    x = rng.standard_normal((8, 4))
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    with np.load(path, allow_pickle=False) as archive:  # plain arrays only
        assert json.loads(str(archive["settings"]))["activation"] == "tanh"


def test_save_without_scaling_and_text_classes(tmp_path) -> None:
    model = rmidl.MLP((2, 2), classes=["no", "yes"])
    model.save(tmp_path / "m.npz")
    loaded = rmidl.MLP.load(tmp_path / "m.npz")
    assert loaded.mean is None and list(loaded.classes) == ["no", "yes"]


PROVENANCE = Provenance("ab12" * 16, (200, 200), spec="24x7x7:relu:max2", channels=1,
                        preprocessing={"resize": 200})


def test_provenance_round_trips_through_the_file(tmp_path) -> None:
    model = rmidl.MLP((3, 2), provenance=PROVENANCE.to_dict())
    assert model.provenance == PROVENANCE
    loaded = rmidl.MLP.load(model.save(tmp_path / "m.npz"))
    assert loaded.provenance == PROVENANCE and loaded.settings() == model.settings()
    assert rmidl.MLP.load(rmidl.MLP((3, 2)).save(tmp_path / "bare.npz")).provenance is None


def test_a_version_1_model_file_still_loads_without_provenance(tmp_path) -> None:
    """What rmidl wrote before models kept their features' provenance (format version 1)."""
    model = rmidl.MLP((4, 3, 2), seed=5, classes=["a", "b"])
    path = model.save(tmp_path / "m.npz")
    settings = {key: value for key, value in model.settings().items() if key != "features"}
    old = _rewrite(path, tmp_path / "v1.npz", format_version=1, settings=json.dumps(settings))
    loaded = rmidl.MLP.load(old)
    assert loaded.provenance is None and list(loaded.classes) == ["a", "b"]
    assert np.array_equal(loaded.parameters, model.parameters)


def _rewrite(path: Path, target: Path, **changes: object) -> Path:
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    for name, value in changes.items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = np.asarray(value)
    np.savez(target, **arrays)
    return target


@pytest.fixture
def saved(tmp_path) -> Path:
    model = rmidl.MLP((4, 3, 2))
    model.fit_scaling(np.arange(20.0).reshape(5, 4))
    model.save(tmp_path / "good.npz")
    return tmp_path / "good.npz"


BAD_FILES = [
    ("features file", lambda p, t: np.savez(t, X=np.zeros((3, 4)), y=np.zeros(3)), "it holds arrays X, y"),
    ("one array", lambda p, t: np.save(t, np.zeros(3)), "single array"),
    ("text", lambda p, t: t.write_text("hello"), "not a valid .npz"),
    ("empty", lambda p, t: t.write_bytes(b""), "not a valid .npz"),
    ("other kind", lambda p, t: _rewrite(p, t, format="something.else"), "not an rmidl model (format"),
    ("newer version", lambda p, t: _rewrite(p, t, format_version=99), "format version 99"),
    ("missing parameters", lambda p, t: _rewrite(p, t, parameters=None), "parameters missing"),
    ("bad json", lambda p, t: _rewrite(p, t, settings="{not json"), "malformed settings"),
    ("unknown setting", lambda p, t: _rewrite(p, t, settings=json.dumps({"sizes": [4, 2]})), "malformed"),
    ("other shape", lambda p, t: _rewrite(p, t, parameters=np.zeros(7)), "parameters of shape (7,)"),
    ("bad sizes", lambda p, t: _rewrite(p, t, settings=json.dumps(
        {"sizes": [4, 0, 2], "activation": "relu", "output": "softmax", "seed": 0, "weight_decay": 0,
         "features": None})), "bad settings"),
    ("version 1 settings with provenance", lambda p, t: _rewrite(p, t, format_version=1),
     "malformed settings"),
    ("bad provenance", lambda p, t: _rewrite(p, t, settings=json.dumps(
        {"sizes": [4, 3, 2], "activation": "sigmoid", "output": "softmax", "seed": 0, "weight_decay": 0,
         "features": {"fingerprint": "ab", "image_shape": [0, 4]}})), "malformed features provenance"),
    ("classes", lambda p, t: _rewrite(p, t, classes=np.arange(5)), "5 classes given for an output"),
    ("mean", lambda p, t: _rewrite(p, t, mean=np.zeros(3)), "mean of shape (3,)"),
    ("half scaling", lambda p, t: _rewrite(p, t, scale=None), "only one of mean and scale"),
    ("zero scale", lambda p, t: _rewrite(p, t, scale=np.zeros(4)), "not positive"),
    ("nan", lambda p, t: _rewrite(p, t, parameters=np.full(23, np.nan)), "non-finite parameters"),
]


@pytest.mark.parametrize(("case", "make", "needle"), BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_model_file_is_one_line_error(saved, tmp_path, case, make, needle) -> None:
    target = tmp_path / ("bad.npy" if case == "one array" else "bad.npz")
    make(saved, target)
    with pytest.raises(errors.InputError) as caught:
        rmidl.MLP.load(target)
    message = str(caught.value)
    assert needle in message and str(target) in message and "\n" not in message


def test_pickled_member_is_refused(saved, tmp_path) -> None:
    with np.load(saved, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["classes"] = np.array([{"a": 1}, None], dtype=object)
    np.savez(tmp_path / "pickled.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(errors.InputError, match="pickled data, which rmidl never loads"):
        rmidl.MLP.load(tmp_path / "pickled.npz")


@pytest.mark.parametrize(("where", "needle"), [("missing.npz", "does not exist"), ("", "is a directory")])
def test_unopenable_model_path(tmp_path, where, needle) -> None:
    with pytest.raises(errors.InputError, match=needle):
        rmidl.MLP.load(tmp_path / where)


def test_a_fifo_as_model_file_is_refused_at_once(tmp_path) -> None:
    fifo = tmp_path / "model.npz"
    os.mkfifo(fifo)
    with pytest.raises(errors.InputError, match="FIFO"):  # would wait for a writer forever
        rmidl.MLP.load(fifo)


def test_a_save_failing_half_way_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "model.npz"
    rmidl.MLP((2, 2)).save(target)
    before = target.read_bytes()

    def half_then_fail(handle, **arrays):
        handle.write(b"PK half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", half_then_fail)
    with pytest.raises(errors.InputError, match="No space left"):
        rmidl.MLP((2, 3)).save(target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


def test_save_needs_npz_suffix_and_a_directory(tmp_path) -> None:
    model = rmidl.MLP((2, 2))
    with pytest.raises(errors.InputError, match=r"must end in \.npz"):
        model.save(tmp_path / "model.pkl")
    with pytest.raises(errors.InputError, match="does not exist"):
        model.save(tmp_path / "nowhere" / "model.npz")
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


PREDICT_CASES = [
    ("wrong feature count", np.zeros((2, 5)), errors.ShapeError, "X has 5 features; the model takes 4"),
    ("1-D", np.zeros(4), errors.ShapeError, "must be (samples, features)"),
    ("empty", np.zeros((0, 4)), errors.ShapeError, "empty"),
    ("nan", np.array([[0.0, np.nan, 0, 0]]), errors.NonFiniteInput, "NaN (first at index (0, 1))"),
    ("inf", np.array([[0.0, 0, 0, np.inf]]), errors.NonFiniteInput, "Inf"),
    ("complex", np.zeros((1, 4), complex), errors.DTypeError, "complex128"),
]


@pytest.mark.parametrize(("case", "x", "error", "needle"), PREDICT_CASES, ids=[c[0] for c in PREDICT_CASES])
def test_predict_bad_features(case, x, error, needle) -> None:
    with pytest.raises(error) as caught:
        rmidl.MLP((4, 3, 2)).predict(x)
    assert needle in str(caught.value)
    assert isinstance(caught.value, ValueError)  # input errors are ValueErrors too


def test_score_with_unknown_label() -> None:
    with pytest.raises(errors.OptionError, match="label 7 in y is not one of the model's 2 classes"):
        rmidl.MLP((4, 2)).score(np.zeros((2, 4)), [0, 7])
    with pytest.raises(errors.OptionError, match="text but the model's classes are numbers"):
        rmidl.MLP((4, 2)).score(np.zeros((2, 4)), ["a", "b"])


CONSTRUCTOR_CASES = [
    ({"sizes": (5,)}, "at least the feature and class counts"),
    ({"sizes": (5, 0, 3)}, "positive integer"),
    ({"sizes": "abc"}, "must be a sequence"),
    ({"sizes": (5, 1)}, "softmax output needs at least 2 classes"),
    ({"sizes": (5, 3), "activation": "gelu"}, "activation 'gelu' is not one of sigmoid, relu, tanh"),
    ({"sizes": (5, 3), "output": "linear"}, "output 'linear' is not one of softmax, sigmoid"),
    ({"sizes": (5, 3), "weight_decay": -1.0}, "weight_decay=-1.0"),
    ({"sizes": (5, 3), "weight_decay": float("nan")}, "weight_decay=nan"),
    ({"sizes": (5, 3), "seed": -2}, "seed=-2"),
    ({"sizes": (5, 3), "classes": [1, 1, 2]}, "not distinct"),
]


@pytest.mark.parametrize(("kwargs", "needle"), CONSTRUCTOR_CASES, ids=[str(c[0]) for c in CONSTRUCTOR_CASES])
def test_constructor_refuses_bad_settings(kwargs, needle) -> None:
    with pytest.raises(errors.InputError) as caught:
        rmidl.MLP(**kwargs)
    assert needle in str(caught.value)


def test_spec_round_trips_as_dict_and_refuses_junk() -> None:
    spec = MLPSpec((6, 4, 2), "relu", "sigmoid")
    assert MLPSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(errors.OptionError, match="an MLP spec is a dict"):
        MLPSpec.from_dict({"sizes": [6, 2]})
    with pytest.raises(errors.ShapeError, match="parameter vector has shape"):
        spec.views(np.zeros(3))


NAMES = ("cat", "dog", "eel")


def test_score_takes_names_or_a_feature_set_never_bare_indices_for_named_classes(rng, feature_set) -> None:
    """Index labels are ambiguous for a model of names (indices into whose list?), so they are refused;
    a FeatureSet's y is its names, and the set itself scores against them."""
    model = rmidl.MLP((4, 3), classes=list(NAMES), seed=1)
    model.set_parameters(rng.standard_normal(model.parameters.size))
    x = rng.standard_normal((40, 4))
    predicted = np.asarray(NAMES)[model.predict_proba(x).argmax(axis=1)]
    full = feature_set(x, rng.integers(0, 3, 40), NAMES)
    expected = float(np.mean(predicted == np.asarray(NAMES)[full.labels]))
    assert list(full.y) == [NAMES[i] for i in full.labels]
    assert model.score(full.X, full.y) == model.score(full) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(errors.OptionError, match=r"numbers but the model's classes are names .*a FeatureSet"):
        model.score(full.X, full.labels)
    # a test set without 'dog': its index 1 is 'eel', which the model's index 1 is not
    lacking = feature_set(x, rng.integers(0, 2, 40), ("cat", "eel"))
    truth = np.array(["cat", "eel"])[lacking.labels]
    assert model.score(lacking) == pytest.approx(float(np.mean(predicted == truth)), abs=1e-6)
    with pytest.raises(errors.OptionError, match="is unlabelled: nothing to score"):
        model.score(feature_set(x, None))
    assert list(model.predict(full)) == list(model.predict(x))


def test_features_of_another_network_or_image_shape_are_refused(rng, feature_set) -> None:
    x, labels = rng.standard_normal((10, 4)), rng.integers(0, 3, 10)
    trained = feature_set(x, labels, NAMES)
    model = rmidl.MLP((4, 3), classes=list(NAMES), provenance=trained.provenance)
    assert model.predict(feature_set(x, labels, NAMES)).shape == (10,)  # the same feature space
    for other, needle in ((feature_set(x, labels, NAMES, fingerprint="cd34" * 16), "fingerprint cd34cd34"),
                          (feature_set(x, labels, NAMES, image_shape=(40, 40, 3)), "on 40x40 RGB images")):
        for call in (model.predict, model.predict_proba, model.score):
            with pytest.raises(errors.InputError) as caught:
                call(other)
            message = str(caught.value)
            assert needle in message and "but the model was trained on features of network '6x5x5" in message
            assert "fingerprint ab12ab12" in message and "48x48 gray images" in message
    assert model.score(feature_set(x, labels, NAMES, fingerprint=None)) >= 0  # a set that does not say
    other = feature_set(x, labels, NAMES, fingerprint="cd34" * 16)
    assert rmidl.MLP((4, 3), classes=list(NAMES)).score(other) >= 0  # a model that does not say
