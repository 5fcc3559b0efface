"""The MLP's mathematics on one flat float64 parameter vector: its spec (sizes, activation, output), the
forward pass, the loss and the summed gradient of a batch (backpropagation), and feature scaling.

Pure functions of (spec, parameters, data): what a worker computes for a shard and what rmidl.mlp.MLP,
the model users hold, is built on. Layout: W1 row-major (inputs, outputs), b1, W2, b2, ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rmidl.errors import OptionError, ShapeError

__all__ = [
    "ACTIVATIONS",
    "OUTPUTS",
    "GradientSums",
    "MLPSpec",
    "check_choice",
    "check_sizes",
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
