"""Deterministic data-parallel training steps: fixed logical shards, pure per-shard gradients, ordered sums.

The training set is split once into a fixed number of logical shards (a function of the data and the
seed, never of who is present). Every minibatch takes a slice of each shard's per-epoch permutation, so
the shard `s` part of step `t` is a pure function of (weights, shard data, plan, step, s):
`compute_shard`. Parts are summed in shard order (`reduce_in_order`) and one SGD step is taken on the
flat parameter vector. Hence the weights are bitwise identical whichever threads or workers computed
which shards, as long as each part is computed with the same numpy/BLAS build on the same kind of CPU
(BLAS is pinned to one thread inside every part, so its summation order is fixed too).

The seam a cluster fills (rmidl.client.Coordinator.training_session does): an object with
`training_session(job) -> context manager of ComputeShards`. On entry it may ship each shard's data
(`job.shards[s]`, plus `job.spec` and `job.plan`, all plain arrays and dicts) to the participants
once; inside, the training loop calls
`compute_shards(step, weights, shard_ids) -> StepResult` once per step, where `weights.version`
("<step>:<hash>") names `weights.vector` so a worker that holds it needs only the version; each
participant returns `compute_shard(weights.vector, job.shards[s], plan=job.plan, spec=job.spec,
step=step, shard=s)` for its shards, and the result maps every requested shard id to its GradientSums
(recomputing a lost shard elsewhere gives the same bits), with the send / compute / gather seconds and
bytes moved. On exit it drops what it shipped. `LocalPool` is the in-process implementation.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rmidl._checks import whole
from rmidl.errors import ClusterError, OptionError, ShapeError
from rmidl.kernels import blas_pinned, resolve_threads
from rmidl.mlp import GradientSums, MLPSpec, gradient_sums

__all__ = [
    "ComputeShards",
    "LocalPool",
    "SGD",
    "ShardData",
    "ShardExecutor",
    "ShardPlan",
    "Step",
    "StepResult",
    "TrainingJob",
    "Weights",
    "compute_shard",
    "reduce_in_order",
    "shard_gradient",
    "split_shards",
]


@dataclass(frozen=True, slots=True)
class Step:
    """One optimisation step: its epoch, its index within the epoch, and its number over the run."""

    epoch: int
    index: int
    number: int


@dataclass(frozen=True, slots=True)
class ShardData:
    """One logical shard of the training set: standardised float64 features and class indices."""

    x: np.ndarray
    y: np.ndarray


@functools.lru_cache(maxsize=128)
def _permutation(seed: int, epoch: int, shard: int, size: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch, shard]).permutation(size)
    order.flags.writeable = False
    return order


@dataclass(frozen=True)
class ShardPlan:
    """Which rows of which shard each step uses.

    `samples` rows are dealt into `shards` shards (the first samples % shards get one more). An epoch's
    order interleaves the shards' permutations for that epoch (row k of shard s at position
    k * shards + s), and step i takes positions [i * samples // steps, (i + 1) * samples // steps): every
    step is non-empty, step sizes differ by at most one, each takes a contiguous slice of every shard's
    permutation, and an epoch visits every row once.
    """

    seed: int
    samples: int
    shards: int
    steps: int

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= self.samples or not 1 <= self.steps <= self.samples:
            raise OptionError(f"a plan needs 1 <= shards, steps <= samples, got {self}")

    @property
    def sizes(self) -> tuple[int, ...]:
        """Rows in each shard."""
        base, extra = divmod(self.samples, self.shards)
        return tuple(base + (s < extra) for s in range(self.shards))

    def bounds(self, index: int, shard: int) -> tuple[int, int]:
        """The slice of shard `shard`'s epoch permutation that the index-th step of an epoch takes."""
        lo, hi = index * self.samples // self.steps, (index + 1) * self.samples // self.steps
        return -(-(lo - shard) // self.shards), -(-(hi - shard) // self.shards)

    def rows(self, step: Step, shard: int) -> np.ndarray | slice:
        """The rows of shard `shard`'s data that step `step` uses, in the order they are summed.

        With one step per epoch (full batch) every row is used in stored order (a slice: no copy), since
        shuffling cannot change which rows a full-batch step sees.
        """
        if self.steps == 1:
            return slice(None)
        lo, hi = self.bounds(step.index, shard)
        return _permutation(self.seed, step.epoch, shard, self.sizes[shard])[lo:hi]

    def shard_ids(self, index: int) -> list[int]:
        """The shards that contribute rows to the index-th step of an epoch (all but empty slices)."""
        return [s for s in range(self.shards) if self.bounds(index, s)[1] > self.bounds(index, s)[0]]

    def step_samples(self, index: int) -> int:
        return (index + 1) * self.samples // self.steps - index * self.samples // self.steps

    def to_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "samples": self.samples, "shards": self.shards, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardPlan:
        if set(data) != {"seed", "samples", "shards", "steps"}:
            raise OptionError(f"a shard plan is a dict of seed, samples, shards and steps, got {data!r}")
        return cls(int(data["seed"]), int(data["samples"]), int(data["shards"]), int(data["steps"]))


def split_shards(x: np.ndarray, y: np.ndarray, *, shards: int, batch: int,
                 seed: int) -> tuple[ShardPlan, list[ShardData]]:
    """Deal a seeded permutation of the training rows into min(shards, n) shards; steps = ceil(n / batch)."""
    n = x.shape[0]
    plan = ShardPlan(seed, n, min(shards, n), math.ceil(n / min(batch, n)))
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    edges = np.cumsum((0, *plan.sizes))
    parts = [ShardData(np.ascontiguousarray(x[order[a:b]]), np.ascontiguousarray(y[order[a:b]]))
             for a, b in itertools.pairwise(edges)]
    return plan, parts


@dataclass(frozen=True)
class Weights:
    """The parameter vector after `step` updates, read-only, named by version "<step>:<content hash>"."""

    step: int
    vector: np.ndarray
    version: str = field(init=False)

    def __post_init__(self) -> None:
        vector = np.array(self.vector, dtype=np.float64)  # our own copy: versions must not change
        vector.flags.writeable = False
        digest = hashlib.blake2b(vector.data, digest_size=8).hexdigest()
        object.__setattr__(self, "vector", vector)
        object.__setattr__(self, "version", f"{self.step}:{digest}")


def shard_gradient(params: np.ndarray, x: np.ndarray, y: np.ndarray, spec: MLPSpec) -> GradientSums:
    """The pure gradient of one shard: summed data-loss gradient (flat float64), summed loss, sample count
    and correct predictions, with BLAS on one thread so every caller gets the same bits."""
    if params.dtype != np.float64 or params.shape != (spec.parameter_count,):
        raise ShapeError(f"parameters {params.shape} {params.dtype}; sizes {spec.sizes} need "
                         f"({spec.parameter_count},) float64")
    if x.dtype != np.float64 or x.ndim != 2 or x.shape[1] != spec.features or y.shape != (x.shape[0],):
        raise ShapeError(f"shard of x {x.shape} {x.dtype} and y {y.shape}; the model takes "
                         f"(n, {spec.features}) float64 and (n,)")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= spec.classes):
        raise ShapeError(f"shard labels must be class indices 0..{spec.classes - 1}")
    with blas_pinned():
        return gradient_sums(spec, params, np.ascontiguousarray(x), y)


def compute_shard(params: np.ndarray, data: ShardData, *, plan: ShardPlan, spec: MLPSpec, step: Step,
                  shard: int) -> GradientSums:
    """Shard `shard`'s part of step `step`: what a worker holding that shard's data computes."""
    if not (0 <= shard < plan.shards and 0 <= step.index < plan.steps and step.epoch >= 0):
        raise OptionError(f"shard {shard} of step {step} is outside the plan ({plan.shards} shards, "
                          f"{plan.steps} steps per epoch)")
    if data.y.shape != (plan.sizes[shard],):
        raise ShapeError(f"shard {shard} holds {data.y.shape[0]} rows; the plan gives it {plan.sizes[shard]}")
    rows = plan.rows(step, shard)
    return shard_gradient(params, data.x[rows], data.y[rows], spec)


def reduce_in_order(parts: Mapping[int, GradientSums]) -> GradientSums:
    """Sum the parts in ascending shard id, whatever order they arrived in (the fixed summation order)."""
    if not parts:
        raise ValueError("no shard parts to reduce")
    ids = sorted(parts)
    first = parts[ids[0]]
    grad = np.array(first.grad_sum, dtype=np.float64)
    loss, count, correct = first.loss_sum, first.count, first.correct
    for shard in ids[1:]:
        part = parts[shard]
        grad += part.grad_sum
        loss += part.loss_sum
        count += part.count
        correct += part.correct
    return GradientSums(grad, loss, count, correct)


class SGD:
    """Minibatch SGD with momentum (v = momentum * v + g; w -= lr * v) and L2 decay on the weights only."""

    def __init__(self, spec: MLPSpec, *, lr: float, momentum: float, weight_decay: float) -> None:
        self.lr = lr
        self.momentum = momentum
        self.decay = weight_decay * spec.decay_mask()
        self.velocity = np.zeros(spec.parameter_count)

    def step(self, params: np.ndarray, total: GradientSums) -> np.ndarray:
        """New parameters from the summed gradient of one minibatch (a new array; params is untouched)."""
        gradient = total.grad_sum / total.count
        gradient += self.decay * params
        self.velocity *= self.momentum
        self.velocity += gradient
        return params - self.lr * self.velocity


@dataclass
class StepResult:
    """What computing one step's shards returned: shard id -> GradientSums, and where the time went."""

    parts: dict[int, GradientSums]
    send_seconds: float = 0.0
    compute_seconds: float | None = None  # None: the caller counts its whole wait as compute
    gather_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True)
class TrainingJob:
    """Everything a participant needs besides the weights: the network spec, the plan, the shards' data."""

    spec: MLPSpec
    plan: ShardPlan
    shards: tuple[ShardData, ...]

    def compute(self, params: np.ndarray, step: Step, shard: int) -> GradientSums:
        data = self.shards[shard]
        return compute_shard(params, data, plan=self.plan, spec=self.spec, step=step, shard=shard)

    def check_result(self, step: Step, shard_ids: Sequence[int], result: StepResult) -> None:
        """Exactly the requested shards, each a float64 gradient of the right size over the rows the plan
        gives it (a missing, stale or misplaced part would change the sum): ClusterError otherwise."""
        missing = sorted(set(shard_ids) - set(result.parts))
        extra = sorted(set(result.parts) - set(shard_ids))
        if missing or extra:
            raise ClusterError(f"step {step.number}: shard results {sorted(result.parts)} do not match the "
                               f"requested shards (missing {missing}, unexpected {extra})")
        for shard, part in result.parts.items():
            lo, hi = self.plan.bounds(step.index, shard)
            grad = part.grad_sum
            if not isinstance(grad, np.ndarray) or grad.dtype != np.float64 \
                    or grad.shape != (self.spec.parameter_count,) or part.count != hi - lo:
                raise ClusterError(f"step {step.number}: shard {shard}'s part does not fit the step "
                                   f"({part.count} rows, gradient {getattr(grad, 'shape', '?')}; expected "
                                   f"{hi - lo} rows, ({self.spec.parameter_count},) float64)")


class ComputeShards(Protocol):
    """Compute the parts of `shard_ids` for `step` at `weights`; every requested id must be in the result."""

    def __call__(self, step: Step, weights: Weights, shard_ids: Sequence[int]) -> StepResult: ...


class ShardExecutor(Protocol):
    """Whoever computes shards for rmidl.train: the local pool, or a cluster's Coordinator."""

    def training_session(self, job: TrainingJob) -> AbstractContextManager[ComputeShards]: ...


class LocalPool:
    """Shards on our own thread pool of `threads` threads (None: every core; 0: in the calling thread)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = resolve_threads(None) if threads is None else whole("threads", threads, lowest=0)

    def __repr__(self) -> str:
        return f"LocalPool(threads={self.threads})"

    @contextmanager
    def training_session(self, job: TrainingJob) -> Iterator[ComputeShards]:
        # one pin for the whole run, so each part's own pin is only a counter increment
        with blas_pinned(), contextlib.ExitStack() as stack:
            pool = None
            if self.threads:
                pool = stack.enter_context(ThreadPoolExecutor(self.threads, thread_name_prefix="rmidl-train"))

            def compute_shards(step: Step, weights: Weights, shard_ids: Sequence[int]) -> StepResult:
                start = time.perf_counter()
                if pool is None:
                    parts = {s: job.compute(weights.vector, step, s) for s in shard_ids}
                else:
                    futures = {s: pool.submit(job.compute, weights.vector, step, s) for s in shard_ids}
                    parts = {s: future.result() for s, future in futures.items()}
                return StepResult(parts, compute_seconds=time.perf_counter() - start)

            yield compute_shards
