"""The pure foundation: config, errors over Pyro5's serializer, mode padding and task planning."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
from Pyro5.serializers import MsgpackSerializer

from rmidl import errors
from rmidl.config import Config
from rmidl.geometry import band_rows, output_shape, pad_for_mode, plan_tasks, split_range


@pytest.mark.parametrize("kernel_hw", [(1, 1), (3, 3), (4, 5), (2, 2), (1, 6), (7, 1)])
@pytest.mark.parametrize("mode", ["valid", "same", "full"])
def test_padding_turns_every_mode_into_valid(rng: np.random.Generator, kernel_hw, mode) -> None:
    image = rng.standard_normal((9, 11))
    kernel = rng.standard_normal(kernel_hw)
    padded = pad_for_mode(image, kernel_hw, mode)
    for reference_fn, as_correlation in (
        (scipy.signal.correlate, kernel),
        (scipy.signal.convolve, kernel[::-1, ::-1]),
    ):
        reference = reference_fn(image, kernel, mode=mode)
        got = scipy.signal.correlate(padded, as_correlation, mode="valid")
        assert got.shape == reference.shape == output_shape((9, 11), kernel_hw, mode)
        np.testing.assert_allclose(got, reference, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("parts", [1, 3, 8, 200])
def test_split_range_covers_without_gaps(n: int, parts: int) -> None:
    pieces = split_range(n, parts)
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(a < b for a, b in pieces)
    assert all(pieces[i][1] == pieces[i + 1][0] for i in range(len(pieces) - 1))
    assert len(pieces) == min(n, parts)


def test_plan_tasks_covers_every_output_once() -> None:
    covered = np.zeros((10, 37), int)
    for task in plan_tasks(37, 10, band=8, group=3):
        covered[slice(*task.kernels), slice(*task.rows)] += 1
        assert band_rows(task.rows, 5) == (task.rows[0], task.rows[1] + 4)
    assert (covered == 1).all()


def test_remote_errors_keep_their_class_and_message() -> None:
    errors.register_with_pyro()
    serializer = MsgpackSerializer()
    for cls in (errors.KernelTooLarge, errors.WorkerLost, errors.BudgetExceeded):
        try:
            raise cls(f"{cls.__name__} detail 13x13")
        except cls as raised:
            data = serializer.dumps(raised)
        rebuilt = serializer.loads(data)
        assert type(rebuilt) is cls and str(rebuilt) == f"{cls.__name__} detail 13x13"


def test_config_env_overrides_and_rejects_unknown() -> None:
    config = Config(environ={"RMIDL_NS_PORT": "9191", "RMIDL_SECRET": "s3"})
    assert config.ns_port == 9191 and config.secret == "s3"
    assert "***" in config.dump() and "s3" not in config.dump()
    with pytest.raises(errors.ConfigError, match="bogus"):
        Config(bogus=1)
    with pytest.raises(errors.ConfigError, match="ns_port"):
        Config(environ={"RMIDL_NS_PORT": "x"})


@pytest.mark.parametrize(
    ("variable", "value"),
    [("RMIDL_NS_PORT", "99999"), ("RMIDL_NS_PORT", "-1"), ("RMIDL_CONNECT_TIMEOUT", "-1"),
     ("RMIDL_TASKS_IN_FLIGHT", "0"), ("RMIDL_MAX_MESSAGE_SIZE", "100"), ("RMIDL_MAX_TASK_ATTEMPTS", "0"),
     ("RMIDL_SERIALIZER", "serpent"), ("RMIDL_SERIALIZER", "pickle")],
)
def test_config_refuses_values_out_of_range(variable: str, value: str) -> None:
    name = variable.removeprefix("RMIDL_").lower()
    with pytest.raises(errors.ConfigError, match=name) as raised:
        Config(environ={variable: value})
    assert value in str(raised.value)
