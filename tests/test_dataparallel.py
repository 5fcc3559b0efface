"""The data-parallel core: shard plans, the pure shard gradient, ordered reduction, weight versions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rmidl import dataparallel, errors
from rmidl.dataparallel import (
    SGD,
    ShardData,
    ShardPlan,
    Step,
    StepResult,
    Weights,
    compute_shard,
    reduce_in_order,
    shard_gradient,
    split_shards,
)
from rmidl.mlp import GradientSums, MLPSpec, gradient_sums


@pytest.mark.parametrize(("samples", "batch", "shards"),
                         [(1, 1, 16), (7, 1, 3), (10, 3, 16), (100, 7, 16), (101, 32, 5), (37, 37, 4),
                          (64, 100, 8), (1000, 4096, 16)])
def test_plan_visits_every_row_once_per_epoch_in_even_nonempty_steps(samples, batch, shards) -> None:
    x = np.arange(samples, dtype=np.float64)[:, None]
    plan, parts = split_shards(x, np.zeros(samples, np.int64), shards=shards, batch=batch, seed=3)
    assert plan.shards == min(shards, samples) and plan.steps == -(-samples // min(batch, samples))
    assert [len(p.y) for p in parts] == list(plan.sizes)
    assert max(plan.sizes) - min(plan.sizes) <= 1
    for epoch in range(2):
        seen, per_step = [], []
        for index in range(plan.steps):
            step = Step(epoch, index, epoch * plan.steps + index)
            rows = [parts[s].x[plan.rows(step, s), 0] for s in plan.shard_ids(index)]
            assert all(len(r) for r in rows)
            per_step.append(sum(len(r) for r in rows))
            assert per_step[-1] == plan.step_samples(index)
            seen.extend(np.concatenate(rows))
        assert sorted(seen) == list(range(samples))
        assert max(per_step) - min(per_step) <= 1


def test_plan_is_a_pure_function_of_seed_epoch_and_shard() -> None:
    plan = ShardPlan(seed=5, samples=50, shards=4, steps=3)
    again = ShardPlan.from_dict(plan.to_dict())
    step = Step(1, 2, 5)
    assert all(np.array_equal(plan.rows(step, s), again.rows(step, s)) for s in range(4))
    other_epoch = Step(2, 2, 8)
    assert not all(np.array_equal(plan.rows(step, s), plan.rows(other_epoch, s)) for s in range(4))
    with pytest.raises(errors.OptionError, match="a shard plan is a dict"):
        ShardPlan.from_dict({"seed": 1})
    with pytest.raises(errors.OptionError, match="a plan needs"):
        ShardPlan(seed=0, samples=3, shards=4, steps=1)


@pytest.fixture
def problem(rng):
    spec = MLPSpec((9, 7, 5, 4), "tanh", "softmax")
    params = spec.initial_parameters(2) + 0.05 * rng.standard_normal(spec.parameter_count)
    x = rng.standard_normal((90, 9))
    y = rng.integers(0, 4, 90)
    return spec, params, x, y


def test_shard_sums_add_up_to_the_batch_gradient(problem) -> None:
    spec, params, x, y = problem
    plan, parts = split_shards(x, y, shards=6, batch=90, seed=1)
    step = Step(0, 0, 0)
    sums = {s: compute_shard(params, parts[s], plan=plan, spec=spec, step=step, shard=s) for s in range(6)}
    total = reduce_in_order(sums)
    whole = gradient_sums(spec, params, x, y)
    assert (total.count, total.correct) == (whole.count, whole.correct)
    assert total.loss_sum == pytest.approx(whole.loss_sum, rel=1e-12)
    np.testing.assert_allclose(total.grad_sum, whole.grad_sum, rtol=1e-10, atol=1e-12)


def test_shard_gradient_has_the_same_bits_in_any_buffer(problem) -> None:
    """A worker receives the shard into its own (possibly unaligned) memory: same bits all the same."""
    spec, params, x, y = problem
    reference = shard_gradient(params, x, y, spec)
    raw = np.zeros(x.size * 8 + 8 + 3, np.uint8)
    for offset in (1, 3, 8):  # misaligned by 1 and 3 bytes, and 8-aligned but not 16-aligned
        moved = np.frombuffer(raw.data, np.float64, x.size, offset=offset).reshape(x.shape)
        moved[...] = x
        moved_params = np.frombuffer(raw.data, np.float64, params.size, offset=offset).copy()
        moved_params[...] = params
        again = shard_gradient(moved_params, moved, y.copy(), spec)
        assert np.array_equal(again.grad_sum, reference.grad_sum)
        assert again.loss_sum == reference.loss_sum


def test_reduce_sums_in_shard_order_whatever_the_arrival_order(problem) -> None:
    spec, params, x, y = problem
    sums = {s: shard_gradient(params, x[s::5], y[s::5], spec) for s in range(5)}
    reference = reduce_in_order(sums)
    for order in itertools.permutations(range(5)):
        shuffled = {s: sums[s] for s in order}
        assert np.array_equal(reduce_in_order(shuffled).grad_sum, reference.grad_sum)
    with pytest.raises(ValueError, match="no shard parts"):
        reduce_in_order({})


def test_shard_gradient_refuses_mismatched_inputs(problem) -> None:
    spec, params, x, y = problem
    with pytest.raises(errors.ShapeError, match="parameters"):
        shard_gradient(params[:-1], x, y, spec)
    with pytest.raises(errors.ShapeError, match="the model takes"):
        shard_gradient(params, x[:, :4], y, spec)
    with pytest.raises(errors.ShapeError, match="the model takes"):
        shard_gradient(params, x.astype(np.float32), y, spec)
    with pytest.raises(errors.ShapeError, match=r"class indices 0\.\.3"):
        shard_gradient(params, x, np.full(90, 4), spec)


def test_weights_are_read_only_and_versioned_by_step_and_content() -> None:
    vector = np.arange(5.0)
    weights = Weights(3, vector)
    vector[0] = 99.0  # the caller's array is copied
    assert weights.vector[0] == 0.0 and not weights.vector.flags.writeable
    assert weights.version.startswith("3:")
    assert Weights(3, np.arange(5.0)).version == weights.version
    assert Weights(4, np.arange(5.0)).version != weights.version
    assert Weights(3, np.array([0, 1 + 2**-52, 2, 3, 4])).version != weights.version  # one ulp


def test_sgd_step_with_momentum_and_decay_on_weights_only() -> None:
    spec = MLPSpec((2, 2))
    optimizer = SGD(spec, lr=0.5, momentum=0.9, weight_decay=0.1)
    params = np.arange(1.0, 7.0)  # W (2x2) then b (2)
    grads = [np.full(6, 2.0), np.full(6, -1.0)]
    velocity = np.zeros(6)
    expected = params.copy()
    mask = np.array([1, 1, 1, 1, 0, 0.0])
    for grad in grads:
        new = optimizer.step(params, GradientSums(grad * 4, 0.0, 4, 0))
        velocity = 0.9 * velocity + grad + 0.1 * mask * expected
        expected = expected - 0.5 * velocity
        np.testing.assert_allclose(new, expected, rtol=1e-15)
        params = new


def test_job_checks_each_step_result() -> None:
    spec = MLPSpec((2, 2))
    plan, parts = split_shards(np.ones((8, 2)), np.arange(8) % 2, shards=2, batch=4, seed=0)
    job = dataparallel.TrainingJob(spec, plan, tuple(parts))
    params = np.zeros(spec.parameter_count)
    step = Step(1, 1, 3)
    good = {s: job.compute(params, step, s) for s in (0, 1)}
    job.check_result(step, [0, 1], StepResult(good))
    with pytest.raises(errors.ClusterError, match=r"step 3: .*missing \[1\], unexpected \[5\]"):
        job.check_result(step, [0, 1], StepResult({0: good[0], 5: good[1]}))
    stale = GradientSums(good[0].grad_sum, 0.0, good[0].count + 1, 0)  # another step's rows
    with pytest.raises(errors.ClusterError, match="shard 0's part does not fit the step"):
        job.check_result(step, [0, 1], StepResult({0: stale, 1: good[1]}))
    short = GradientSums(good[0].grad_sum[:-1], 0.0, good[0].count, 0)
    with pytest.raises(errors.ClusterError, match=r"gradient \(5,\)"):
        job.check_result(step, [0, 1], StepResult({0: short, 1: good[1]}))


def test_compute_shard_refuses_a_task_outside_the_plan() -> None:
    spec = MLPSpec((2, 2))
    plan, parts = split_shards(np.ones((8, 2)), np.arange(8) % 2, shards=2, batch=4, seed=0)
    params = np.zeros(spec.parameter_count)
    for step, shard in ((Step(0, 2, 2), 0), (Step(0, 0, 0), 2), (Step(-1, 0, 0), 0)):
        with pytest.raises(errors.OptionError, match="outside the plan"):
            compute_shard(params, parts[0], plan=plan, spec=spec, step=step, shard=shard)
    with pytest.raises(errors.ShapeError, match="holds 3 rows; the plan gives it 4"):
        compute_shard(params, ShardData(parts[0].x[:3], parts[0].y[:3]), plan=plan, spec=spec,
                      step=Step(0, 0, 0), shard=0)


def test_shard_data_is_what_a_worker_holds() -> None:
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10) % 2
    _, parts = split_shards(x, y, shards=3, batch=4, seed=0)
    assert all(isinstance(p, ShardData) and p.x.flags.c_contiguous and p.x.dtype == np.float64 for p in parts)
    assert sorted(np.concatenate([p.x[:, 0] for p in parts])) == list(x[:, 0])
