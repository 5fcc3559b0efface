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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rmidl._backprop import (
    ACTIVATIONS,
    OUTPUTS,
    GradientSums,
    MLPSpec,
    check_sizes,
    evaluate,
    gradient_sums,
    output_scores,
    scaling_of,
)
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

