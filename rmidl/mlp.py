"""The classifier on CNN features: a fully connected network (MLP) with float64 parameters in one flat vector.

Parameters live in one flat float64 vector (layer by layer: W1 row-major, b1, W2, b2, ...), so a step's
weights are one buffer to ship, hash and version; `model.weights` / `model.biases` are views into it.
`W[l]` has shape (inputs, outputs): a layer computes `a @ W + b`. The model also keeps the feature
standardisation fitted on its training data (`mean`, `scale`), so `predict` takes raw features.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rmidl._checks import as_features, as_labels, describe_classes, label_indices, number, whole
from rmidl.errors import OptionError, ShapeError
from rmidl.provenance import Provenance

if TYPE_CHECKING:
    from rmidl.featureset import FeatureSet

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "MLPSpec",
    "OUTPUTS",
    "GradientSums",
    "evaluate",
    "gradient_sums",
    "output_scores",
    "scaling_of",
]

ACTIVATIONS = ("sigmoid", "relu", "tanh")
"""Hidden-layer activations."""
OUTPUTS = ("softmax", "sigmoid")
"""Output layers: softmax with cross-entropy, or the paper's sigmoid units with squared error."""


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise OptionError(f"{name} {value!r} is not one of {', '.join(choices)}")
    return value


def check_sizes(sizes: object) -> tuple[int, ...]:
    """(features, hidden..., classes): at least two positive integers."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise OptionError(f"sizes={sizes!r} must be a sequence (features, hidden..., classes)")
    if len(sizes) < 2:
        raise OptionError(f"sizes={tuple(sizes)!r} needs at least the feature and class counts")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise OptionError(f"sizes={tuple(sizes)!r}: every layer size must be a positive integer")
    return tuple(int(size) for size in sizes)


@dataclass(frozen=True)
class MLPSpec:
    """What a shard's gradient depends on besides weights and data: layer sizes, activation, output."""

    sizes: tuple[int, ...]
    activation: str = "sigmoid"
    output: str = "softmax"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", check_sizes(self.sizes))
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("output", self.output, OUTPUTS)
        if self.output == "softmax" and self.sizes[-1] < 2:
            raise OptionError("a softmax output needs at least 2 classes")

    @property
    def features(self) -> int:
        return self.sizes[0]

    @property
    def classes(self) -> int:
        return self.sizes[-1]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(inputs, outputs) of each layer's weight matrix."""
        return list(zip(self.sizes[:-1], self.sizes[1:], strict=True))

    @property
    def parameter_count(self) -> int:
        return sum(n_in * n_out + n_out for n_in, n_out in self.shapes)

    def views(self, flat: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(weights, biases): views of the flat vector, layer by layer."""
        if flat.shape != (self.parameter_count,):
            raise ShapeError(f"parameter vector has shape {flat.shape}; sizes {self.sizes} need "
                             f"({self.parameter_count},)")
        weights, biases, start = [], [], 0
        for n_in, n_out in self.shapes:
            weights.append(flat[start : start + n_in * n_out].reshape(n_in, n_out))
            start += n_in * n_out
            biases.append(flat[start : start + n_out])
            start += n_out
        return weights, biases

    def decay_mask(self) -> np.ndarray:
        """1.0 where the flat vector holds a weight, 0.0 at biases (weight decay spares biases)."""
        mask = np.zeros(self.parameter_count)
        weights, _ = self.views(mask)
        for w in weights:
            w[...] = 1.0
        return mask

    def initial_parameters(self, seed: int) -> np.ndarray:
        """Seeded initialisation: He-uniform into relu layers, Glorot-uniform elsewhere; zero biases."""
        rng = np.random.default_rng(seed)
        flat = np.zeros(self.parameter_count)
        weights, _ = self.views(flat)
        for layer, w in enumerate(weights):
            n_in, n_out = w.shape
            hidden_relu = self.activation == "relu" and layer < len(weights) - 1
            limit = math.sqrt(6.0 / n_in) if hidden_relu else math.sqrt(6.0 / (n_in + n_out))
            w[...] = rng.uniform(-limit, limit, size=w.shape)
        return flat

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "activation": self.activation, "output": self.output}

    @classmethod
    def from_dict(cls, data: object) -> MLPSpec:
        """Parse what to_dict wrote (e.g. off the wire); unknown or missing keys are an OptionError."""
        if not isinstance(data, dict) or set(data) != {"sizes", "activation", "output"}:
            raise OptionError(f"an MLP spec is a dict of sizes, activation and output, got {data!r}")
        return cls(tuple(data["sizes"]), data["activation"], data["output"])


@dataclass(frozen=True, slots=True)
class GradientSums:
    """One shard's contribution: gradient of the summed data loss (flat, float64), the summed loss,
    the samples it covered and how many of them the weights classified correctly."""

    grad_sum: np.ndarray
    loss_sum: float
    count: int
    correct: int


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) in place, as (1 + tanh(z / 2)) / 2: it cannot overflow (and needs no scipy)."""
    z *= 0.5
    np.tanh(z, out=z)
    z += 1.0
    z *= 0.5
    return z


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax over each row, in place (shifted by the row maximum, so exp never overflows)."""
    z -= z.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    return z


def _activate(kind: str, z: np.ndarray) -> np.ndarray:
    """Apply an activation in place (z is a fresh product) and return it."""
    if kind == "sigmoid":
        return _sigmoid(z)
    if kind == "tanh":
        return np.tanh(z, out=z)
    return np.maximum(z, 0.0, out=z)


def _derivative_from_output(kind: str, a: np.ndarray) -> np.ndarray:
    """f'(z) written in terms of a = f(z)."""
    if kind == "sigmoid":
        return a * (1.0 - a)
    if kind == "tanh":
        return 1.0 - a * a
    return (a > 0.0).astype(np.float64)


def _hidden_forward(spec: MLPSpec, weights: list[np.ndarray], biases: list[np.ndarray],
                    x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Activations of the input and each hidden layer, and the output layer's pre-activation."""
    layers = [x]
    for w, b in zip(weights[:-1], biases[:-1], strict=True):
        z = layers[-1] @ w
        z += b
        layers.append(_activate(spec.activation, z))
    logits = layers[-1] @ weights[-1]
    logits += biases[-1]
    return layers, logits


def output_scores(spec: MLPSpec, flat: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-class outputs (n, classes): softmax probabilities, or the sigmoid output units."""
    weights, biases = spec.views(flat)
    _, logits = _hidden_forward(spec, weights, biases, x)
    if spec.output == "softmax":
        return np.exp(_log_softmax(logits))
    return _sigmoid(logits)


def _loss_terms(spec: MLPSpec, logits: np.ndarray, y: np.ndarray,
                with_delta: bool) -> tuple[float, int, np.ndarray | None]:
    """Summed data loss, correct predictions and (if asked) d loss / d logits; logits are overwritten."""
    rows = np.arange(logits.shape[0])
    delta: np.ndarray | None = None
    if spec.output == "softmax":
        log_p = _log_softmax(logits)
        loss = -float(log_p[rows, y].sum())
        predicted = log_p.argmax(axis=1)
        if with_delta:
            delta = np.exp(log_p)
            delta[rows, y] -= 1.0
    else:
        out = _sigmoid(logits)
        predicted = out.argmax(axis=1)
        error = out.copy()
        error[rows, y] -= 1.0
        loss = 0.5 * float(np.einsum("ij,ij->", error, error))
        if with_delta:
            delta = error * out * (1.0 - out)
    return loss, int(np.count_nonzero(predicted == y)), delta


def evaluate(spec: MLPSpec, flat: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """(summed data loss, correct predictions) over standardised x and class indices y."""
    weights, biases = spec.views(flat)
    _, logits = _hidden_forward(spec, weights, biases, x)
    loss, correct, _ = _loss_terms(spec, logits, y, with_delta=False)
    return loss, correct


def gradient_sums(spec: MLPSpec, flat: np.ndarray, x: np.ndarray, y: np.ndarray) -> GradientSums:
    """Backpropagation over (x, y): the data loss summed over samples and its gradient (no weight decay).

    x is (n, features) float64 (standardised), y the (n,) class indices. Sums, not means, so that shards
    add up exactly to the batch's sum; the order of every operation depends only on the shapes.
    """
    weights, biases = spec.views(flat)
    grad = np.empty_like(flat)
    grad_w, grad_b = spec.views(grad)
    layers, logits = _hidden_forward(spec, weights, biases, x)
    loss, correct, delta = _loss_terms(spec, logits, y, with_delta=True)
    assert delta is not None
    for layer in range(len(weights) - 1, -1, -1):
        np.matmul(layers[layer].T, delta, out=grad_w[layer])
        np.sum(delta, axis=0, out=grad_b[layer])
        if layer:
            delta = (delta @ weights[layer].T) * _derivative_from_output(spec.activation, layers[layer])
    return GradientSums(grad, loss, x.shape[0], correct)


def scaling_of(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of each feature of a float64 (n, F) array; scale is the spread, 1 where it is 0."""
    mean = data.mean(axis=0)
    std = np.sqrt(np.mean(np.square(data - mean), axis=0))
    return mean, np.where(std > 0, std, 1.0)


class MLP:
    """A fully connected classifier: `MLP(sizes=(features, hidden..., classes))`, trained by rmidl.train.

    `activation` is the hidden layers' ("sigmoid", "relu", "tanh"); `output="softmax"` pairs softmax with
    cross-entropy, `output="sigmoid"` sigmoid units with squared error (the paper's network). The
    objective is the mean data loss plus weight_decay / 2 * (sum of squared weights; biases spared).

    `provenance` (an rmidl.provenance.Provenance, or its dict) says which network and images the
    training features came from; it is saved with the model, and predict/score refuse a FeatureSet of
    other features (raw arrays cannot say, so they are taken as they are). `predict`, `predict_proba`
    and `score` take X or a FeatureSet (score then uses its labels, as names).
    """

    def __init__(self, sizes: Sequence[int], *, activation: str = "sigmoid", output: str = "softmax",
                 seed: int = 0, weight_decay: float = 1e-4, classes: Sequence[Any] | None = None,
                 provenance: Provenance | dict[str, Any] | None = None) -> None:
        self.spec = MLPSpec(check_sizes(sizes), activation, output)
        self.seed = whole("seed", seed, lowest=0)
        self.weight_decay = number("weight_decay", weight_decay, 0.0, math.inf, open_hi=True)
        self.parameters = self.spec.initial_parameters(self.seed)
        self.classes = self._check_classes(classes)
        self.provenance = None if provenance is None else Provenance.from_dict(provenance)
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    def _check_classes(self, classes: Sequence[Any] | None) -> np.ndarray:
        if classes is None:
            return np.arange(self.spec.classes, dtype=np.int64)
        labels = as_labels(classes, len(classes), "classes")
        if len(np.unique(labels)) != len(labels):
            raise OptionError(f"classes ({describe_classes(labels)}) are not distinct")
        if len(labels) != self.spec.classes:
            raise ShapeError(f"{len(labels)} classes given for an output layer of {self.spec.classes}")
        return labels

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.spec.sizes

    @property
    def activation(self) -> str:
        return self.spec.activation

    @property
    def output(self) -> str:
        return self.spec.output

    @property
    def weights(self) -> list[np.ndarray]:
        """Weight matrices (inputs, outputs), layer by layer: views of `parameters`."""
        return self.spec.views(self.parameters)[0]

    @property
    def biases(self) -> list[np.ndarray]:
        """Bias vectors, layer by layer: views of `parameters`."""
        return self.spec.views(self.parameters)[1]

    def set_parameters(self, flat: np.ndarray) -> None:
        """Replace every parameter by a flat vector of parameter_count float64 values (copied)."""
        vector = np.array(flat, dtype=np.float64)
        self.spec.views(vector)  # checks the shape
        self.parameters = vector

    def fit_scaling(self, x: object) -> None:
        """Standardise features by the mean and spread of x (a constant feature keeps scale 1)."""
        self.mean, self.scale = scaling_of(self._check_width(as_features(x)))

    def _check_width(self, data: np.ndarray, what: str = "X") -> np.ndarray:
        if data.shape[1] != self.spec.features:
            raise ShapeError(f"{what} has {data.shape[1]} features; the model takes {self.spec.features}")
        return data

    def standardise(self, x: object, what: str = "X") -> np.ndarray:
        """Raw features -> the first layer's float64 inputs (checked, then scaled by mean/scale if set)."""
        data = self._check_width(as_features(x, what), what)
        if self.mean is not None and self.scale is not None:
            data = (data - self.mean) / self.scale
        return data

    def check_features(self, provenance: Provenance | None, where: str = "the features") -> None:
        """Refuse features of another network or image shape than the model was trained on (one
        InputError line naming both); passes when either side does not know where its features came from."""
        if self.provenance is not None:
            self.provenance.check(provenance, where)

    def _features(self, x: object) -> object:
        """X itself, or a FeatureSet's X once its provenance is checked against the model's."""
        from rmidl.featureset import FeatureSet

        if isinstance(x, FeatureSet):
            self.check_features(x.provenance, repr(x))
            return x.X
        return x

    def predict_proba(self, x: object) -> np.ndarray:
        """(samples, classes) class probabilities of X or a FeatureSet (sigmoid outputs are normalised to
        sum to 1)."""
        scores = output_scores(self.spec, self.parameters, self.standardise(self._features(x)))
        if self.spec.output == "sigmoid":
            scores /= scores.sum(axis=1, keepdims=True)
        return scores

    def predict(self, x: object) -> np.ndarray:
        """The most probable class label of each sample (of X or a FeatureSet)."""
        return self.classes[self.predict_proba(x).argmax(axis=1)]

    def score(self, x: FeatureSet | object, y: object = None) -> float:
        """Accuracy: the fraction of samples whose predicted label equals y; `score(feats)` scores a
        labelled FeatureSet against its labels (as names, feats.y). Labels must be the model's classes:
        class indices for a model of names are refused, since indices into another class list (a test set
        missing a class) would silently mis-score."""
        from rmidl.featureset import FeatureSet

        if isinstance(x, FeatureSet) and y is None:
            if x.labels is None:
                raise OptionError(f"{x!r} is unlabelled: nothing to score it against")
            y = x.y
        data = self.standardise(self._features(x))
        target = label_indices(self.classes, as_labels(y, data.shape[0]))
        scores = output_scores(self.spec, self.parameters, data)
        return float(np.mean(scores.argmax(axis=1) == target))

    def penalty(self, flat: np.ndarray | None = None) -> float:
        """weight_decay / 2 * the sum of squared weights (biases spared)."""
        weights, _ = self.spec.views(self.parameters if flat is None else flat)
        return 0.5 * self.weight_decay * sum(float(np.einsum("ij,ij->", w, w)) for w in weights)

    def loss_and_gradient(self, x: object, y: object) -> tuple[float, np.ndarray]:
        """The objective (mean data loss + penalty) over (x, y) and its flat gradient."""
        data = self.standardise(x)
        target = label_indices(self.classes, as_labels(y, data.shape[0]))
        sums = gradient_sums(self.spec, self.parameters, data, target)
        gradient = sums.grad_sum / sums.count + self.weight_decay * self.spec.decay_mask() * self.parameters
        return sums.loss_sum / sums.count + self.penalty(), gradient

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model to a .npz file (no pickle; replaced atomically); return its path."""
        from rmidl._model_file import save_model

        return save_model(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MLP:
        """Read a model save() wrote; a file of another kind, version or shape is a one-line InputError."""
        from rmidl._model_file import load_model

        return load_model(path)

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments besides classes, as JSON-ready values (what a file stores);
        `features` is the provenance's dict (None when not known)."""
        return {**self.spec.to_dict(), "seed": self.seed, "weight_decay": self.weight_decay,
                "features": None if self.provenance is None else self.provenance.to_dict()}

    def __repr__(self) -> str:
        return (f"MLP(sizes={self.sizes}, activation={self.activation!r}, output={self.output!r}, "
                f"weight_decay={self.weight_decay:g}, classes={len(self.classes)})")

