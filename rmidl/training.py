"""rmidl.train: minibatch SGD of an MLP on feature vectors, data-parallel over fixed logical shards.

Each step asks one `compute_shards(step, weights, shard_ids)` (see rmidl.dataparallel) for the gradient
sums of the step's shards, reduces them in shard order and takes an SGD step. `coordinator=None` uses
rmidl.dataparallel.LocalPool (our own threads, BLAS pinned to one thread each); a cluster coordinator
fills the same seam by providing `training_session(job)`. The weights never depend on which did the work.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rmidl import metrics
from rmidl._backprop import check_choice
from rmidl._checks import as_features, as_labels, describe_classes, label_indices, number, whole
from rmidl.dataparallel import (
    SGD,
    ComputeShards,
    LocalPool,
    ShardExecutor,
    Step,
    TrainingJob,
    Weights,
    reduce_in_order,
    split_shards,
)
from rmidl.errors import InputError, OptionError
from rmidl.history import EpochRecord, History, StepRecord
from rmidl.kernels import blas_pinned
from rmidl.mlp import ACTIVATIONS, MLP, OUTPUTS, GradientSums, evaluate, scaling_of
from rmidl.provenance import Provenance

if TYPE_CHECKING:
    from rmidl.featureset import FeatureSet

__all__ = ["stratified_split", "train"]

logger = logging.getLogger(__name__)

MAX_AUTO_SHARDS = 16
MIN_AUTO_SHARD_ROWS = 32
"""shards=None: a step's rows go into min(16, batch // 32) shards (at least 1): enough for 16 cores, and
rows enough per shard that its fixed cost (~0.2 ms) stays small next to its arithmetic."""

Callback = Callable[[EpochRecord, MLP], "bool | None"]


def _hidden(hidden: object) -> tuple[int, ...]:
    layers = (hidden,) if isinstance(hidden, (int, np.integer)) else hidden
    if not isinstance(layers, Sequence) or isinstance(layers, (str, bytes)):
        raise OptionError(f"hidden={hidden!r} must be a layer size or a sequence of them")
    for size in layers:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise OptionError(f"hidden={hidden!r}: every hidden layer needs a whole number of units >= 1 "
                              "(hidden=() trains without a hidden layer)")
    return tuple(int(size) for size in layers)


def _inputs(features: object, labels: object, classes: Sequence[Any] | None,
            provenance: Provenance | dict[str, Any] | None) -> tuple[object, object, Any, Any]:
    """(X, labels, classes, provenance): given as arrays, or taken from a labelled FeatureSet."""
    from rmidl.featureset import FeatureSet

    if not isinstance(features, FeatureSet):
        return features, labels, classes, provenance
    given = [name for name, value in (("labels", labels), ("classes", classes), ("provenance", provenance))
             if value is not None]
    if given:
        raise OptionError(f"train({features!r}) takes its labels, classes and provenance from the set; "
                          f"give X and y to set {', '.join(given)}")
    if features.labels is None:
        raise InputError(f"{features!r} is unlabelled: a classifier needs labels")
    return features.X, features.labels, features.classes or None, features.provenance


def _executor(coordinator: object, threads: int | None) -> ShardExecutor:
    if coordinator is None:
        return LocalPool(threads)
    if not callable(getattr(coordinator, "training_session", None)):
        raise OptionError(f"coordinator {type(coordinator).__name__} cannot run training "
                          "(it has no training_session(job))")
    return coordinator  # type: ignore[return-value]


def _classes_and_targets(labels: np.ndarray, classes: Sequence[Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """The class labels (given, or those present, sorted) and each sample's class index; integer labels
    with class names given are indices into those names."""
    if classes is None:
        known = np.unique(labels)
    else:
        known = as_labels(classes, len(classes), "classes")
        if len(np.unique(known)) != len(known):
            raise OptionError(f"classes ({describe_classes(known)}) are not distinct")
        if labels.dtype.kind in "iu" and known.dtype.kind == "U":  # indices into the names given
            if labels.size and (labels.min() < 0 or labels.max() >= len(known)):
                raise InputError(f"labels y are class indices 0..{len(known) - 1} into classes, but hold "
                                 f"{labels.min()}..{labels.max()}")
            labels = known[labels]
    if len(known) < 2:
        raise InputError(f"y holds a single class ({describe_classes(known)}); a classifier needs at least 2")
    if labels.shape[0] < len(known):
        raise InputError(f"{labels.shape[0]} samples cannot cover {len(known)} classes")
    targets = label_indices(known, labels)
    present = np.bincount(targets, minlength=len(known))
    if (present == 0).any():
        empty = known[present == 0]
        raise InputError(f"class {empty[0].item()!r} has no samples in y"
                         + (f" ({len(empty)} classes have none)" if len(empty) > 1 else ""))
    return known, targets


def stratified_split(targets: np.ndarray, classes: int, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices, sorted: about `fraction` of each class for validation, always
    leaving at least one sample of each class for training."""
    rng = np.random.default_rng([seed, 0xA11D])
    train, held = [], []
    for c in range(classes):
        rows = rng.permutation(np.flatnonzero(targets == c))
        n_val = min(len(rows) - 1, math.floor(fraction * len(rows) + 0.5))
        held.append(rows[:n_val])
        train.append(rows[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def train(
    features: FeatureSet | object,
    labels: object = None,
    /,
    *,
    hidden: int | Sequence[int] = (25,),
    activation: str = "sigmoid",
    output: str = "softmax",
    epochs: int = 30,
    batch: int | None = 64,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    seed: int = 0,
    validation: float = 0.2,
    shards: int | None = None,
    classes: Sequence[Any] | None = None,
    provenance: Provenance | dict[str, Any] | None = None,
    threads: int | None = None,
    coordinator: object = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> tuple[MLP, History]:
    """Train an MLP classifier on features (samples, features) and their labels; return (model, history).

    `train(feats)` takes a labelled FeatureSet whole: its X, its labels with their class names, and its
    provenance (which network and images made the features; the model keeps it and refuses other
    features later). With arrays, `classes` names the label set: given as names with integer labels,
    the labels are indices into it (as in a features file); `provenance` may be given too.

    Minibatch SGD with momentum on the mean loss plus L2 decay: each epoch reshuffles (seeded) and takes
    ceil(n / batch) steps; batch=None (or >= n) is full-batch gradient descent. `validation` of each class
    is held out (stratified) and scored after every epoch. Features are standardised by the training
    part's mean and spread, kept in the model. `classes` declares the label set (default: the labels in
    y, sorted). `shards` fixes the logical partition of each step (never the worker count; None: min(16,
    batch // 32), at least 1); `threads` sizes the local pool (None: every core, 0: the calling thread);
    `coordinator` replaces the pool by a cluster's training_session. `callback(record, model)` runs
    after each epoch and stops training by returning False. Same inputs, same weights, bit for bit.
    """
    layers = _hidden(hidden)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("output", output, OUTPUTS)
    epochs = whole("epochs", epochs)
    batch = None if batch is None else whole("batch", batch)
    lr = number("lr", lr, 0.0, math.inf, open_lo=True, open_hi=True)
    momentum = number("momentum", momentum, 0.0, 1.0, open_hi=True)
    validation = number("validation", validation, 0.0, 1.0, open_hi=True)
    shards = None if shards is None else whole("shards", shards)
    seed = whole("seed", seed, lowest=0)
    number("weight_decay", weight_decay, 0.0, math.inf, open_hi=True)
    if callback is not None and not callable(callback):
        raise OptionError(f"callback={callback!r} is not callable")
    executor = _executor(coordinator, threads)
    features, labels, classes, provenance = _inputs(features, labels, classes, provenance)

    x = as_features(features)
    known, targets = _classes_and_targets(as_labels(labels, x.shape[0]), classes)
    train_rows, val_rows = stratified_split(targets, len(known), validation, seed)
    model = MLP((x.shape[1], *layers, len(known)), activation=activation, output=output, seed=seed,
                weight_decay=weight_decay, classes=list(known), provenance=provenance)
    train_x = x[train_rows]  # a copy, scaled in place
    model.mean, model.scale = scaling_of(train_x)
    train_x -= model.mean
    train_x /= model.scale
    step_size = min(batch or len(train_rows), len(train_rows))
    if shards is None:
        shards = min(MAX_AUTO_SHARDS, max(1, step_size // MIN_AUTO_SHARD_ROWS))
    plan, parts = split_shards(train_x, targets[train_rows], shards=shards, batch=step_size, seed=seed)
    del train_x  # the shards hold their own copies
    job = TrainingJob(model.spec, plan, tuple(parts))
    history = History(settings={
        "sizes": list(model.sizes), "activation": activation, "output": output, "epochs": epochs,
        "batch": batch, "lr": lr, "momentum": momentum, "weight_decay": model.weight_decay, "seed": seed,
        "validation": validation, "shards": plan.shards, "steps_per_epoch": plan.steps,
        "train_samples": len(train_rows), "validation_samples": len(val_rows), "executor": repr(executor),
    })
    logger.info("training %s on %d samples (%d held out), %d shards, %d steps/epoch, %r", model,
                len(train_rows), len(val_rows), plan.shards, plan.steps, executor)
    run = _Run(job, model, SGD(model.spec, lr=lr, momentum=momentum, weight_decay=model.weight_decay),
               history, ((x[val_rows] - model.mean) / model.scale, targets[val_rows]))
    from tqdm import tqdm  # here: importing tqdm costs rmidl's import time

    with tqdm(total=epochs * plan.steps, unit="step", disable=not progress, leave=False) as bar, \
            executor.training_session(job) as compute_shards:
        for epoch in range(epochs):
            record = run.epoch(compute_shards, epoch, bar.update)
            bar.set_postfix_str(f"loss {record.loss:.4f}, val {_accuracy(record.val_accuracy)}")
            logger.debug("%s", history.row(record))
            if callback is not None and callback(record, model) is False:
                break
    return model, history


class _Run:
    """The state of one training run between steps: current weights, optimizer, history."""

    def __init__(self, job: TrainingJob, model: MLP, optimizer: SGD, history: History,
                 validation: tuple[np.ndarray, np.ndarray]) -> None:
        self.job, self.model, self.optimizer, self.history = job, model, optimizer, history
        self.val_x, self.val_y = validation
        self.weights = Weights(0, model.parameters)

    def step(self, compute_shards: ComputeShards, step: Step) -> GradientSums:
        """Compute the step's shards, reduce them in shard order, update the weights; record the phases."""
        shard_ids = self.job.plan.shard_ids(step.index)
        t0 = time.perf_counter()
        result = compute_shards(step, self.weights, shard_ids)
        t1 = time.perf_counter()
        self.job.check_result(step, shard_ids, result)
        total = reduce_in_order(result.parts)
        t2 = time.perf_counter()
        self.weights = Weights(step.number + 1, self.optimizer.step(self.weights.vector, total))
        t3 = time.perf_counter()
        compute = result.compute_seconds
        if compute is None:
            compute = max(0.0, t1 - t0 - result.send_seconds - result.gather_seconds)
        self.history.steps.append(StepRecord(
            step.epoch + 1, step.number, total.count, result.send_seconds, compute, result.gather_seconds,
            t2 - t1, t3 - t2, result.bytes_sent, result.bytes_received))
        metrics.training_step(t3 - t0, total.loss_sum / max(total.count, 1))
        return total

    def epoch(self, compute_shards: ComputeShards, epoch: int, stepped: Callable[[], object]) -> EpochRecord:
        """Every step of one epoch, then the model's weights set and the validation set scored."""
        started = time.perf_counter()
        steps = self.job.plan.steps
        loss, seen, correct = 0.0, 0, 0
        for index in range(steps):
            total = self.step(compute_shards, Step(epoch, index, epoch * steps + index))
            loss, seen, correct = loss + total.loss_sum, seen + total.count, correct + total.correct
            stepped()
        self.model.set_parameters(self.weights.vector)
        val_loss, val_accuracy = _validate(self.model, self.val_x, self.val_y)
        record = EpochRecord(epoch + 1, loss / seen, correct / seen, val_loss, val_accuracy,
                             time.perf_counter() - started, steps, seen)
        self.history.epochs.append(record)
        return record


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _validate(model: MLP, x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    """(mean loss, accuracy) of the model on the standardised validation set; (None, None) without one."""
    if not len(y):
        return None, None
    with blas_pinned():
        loss_sum, right = evaluate(model.spec, model.parameters, x, y)
    return loss_sum / len(y), right / len(y)
