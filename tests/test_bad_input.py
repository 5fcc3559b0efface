"""Bad input through the CLI and the Python API: one-line error naming the problem, non-zero exit,
no traceback without --debug, and the cluster still serving afterwards (issue 5's table)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import rmidl
from rmidl import errors
from rmidl.client import Coordinator
from rmidl.client.cli import main
from rmidl.client.localcluster import LocalCluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(workers=1, threads_per_worker=1) as running:
        yield running


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good and bad input files, made once."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(7)
    made = {"good": root / "good.png", "small": root / "small.png"}
    rmidl.save_image(made["good"], rng.integers(0, 256, (48, 40), dtype=np.uint8))
    rmidl.save_image(made["small"], rng.integers(0, 256, (20, 20), dtype=np.uint8))
    good_bytes = made["good"].read_bytes()
    made["corrupt"] = root / "corrupt.png"
    made["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    made["truncated"] = root / "truncated.png"
    made["truncated"].write_bytes(good_bytes[: len(good_bytes) // 2])
    made["text"] = root / "notes.txt"
    made["text"].write_text("this is not an image\n")
    made["empty"] = root / "empty.png"
    made["empty"].write_bytes(b"")
    for name, array in {
        "bank_1d": np.ones(9, np.float32),
        "bank_5d": np.ones((1, 2, 3, 3, 1, 1), np.float32),
        "bank_complex": np.ones((2, 3, 3), np.complex64),
        "bank_nan": np.array([[[1.0, np.nan], [0.0, 1.0]]], np.float32),
        "bank_inf": np.array([[[1.0, np.inf], [0.0, 1.0]]], np.float32),
        "bank_empty": np.ones((0, 3, 3), np.float32),
    }.items():
        made[name] = root / f"{name}.npy"
        np.save(made[name], array)
    made["bank_object"] = root / "bank_object.npy"
    np.save(made["bank_object"], np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return made


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


RUN = "run {good} --kernels sobel --ns {ns}"
# (case, argv template with {file} and {ns} placeholders, text the one error line must contain)
CLI_CASES: list[tuple[str, str, str]] = [
    ("missing image", "run {good}.gone --kernels sobel --ns {ns}", "good.png.gone"),
    ("corrupt image", "run {corrupt} --kernels sobel --ns {ns}", "corrupt.png"),
    ("truncated image", "run {truncated} --kernels sobel --ns {ns}", "truncated.png"),
    ("unsupported format", "run {text} --kernels sobel --ns {ns}", "notes.txt"),
    ("empty image file", "run {empty} --kernels sobel --ns {ns}", "empty.png"),
    ("bank of wrong ndim (1-D)", "run {good} --kernels {bank_1d} --ns {ns}", "bank_1d.npy"),
    ("bank of wrong ndim (6-D)", "run {good} --kernels {bank_5d} --ns {ns}", "bank_5d.npy"),
    ("bank of complex dtype", "run {good} --kernels {bank_complex} --ns {ns}", "complex"),
    ("bank of objects (pickle)", "run {good} --kernels {bank_object} --ns {ns}", "bank_object.npy"),
    ("bank with NaN", "run {good} --kernels {bank_nan} --ns {ns}", "NaN"),
    ("bank with Inf", "run {good} --kernels {bank_inf} --ns {ns}", "Inf"),
    ("empty bank", "run {good} --kernels {bank_empty} --ns {ns}", "empty"),
    ("missing bank file", "run {good} --kernels nowhere.npy --ns {ns}", "nowhere.npy"),
    ("unknown bank name", "run {good} --kernels wavelets:3 --ns {ns}", "wavelets"),
    ("malformed bank spec", "run {good} --kernels random:axb --ns {ns}", "random:axb"),
    ("kernel larger than image", "run {small} --kernels random:2x25x25 --ns {ns}", "25x25"),
    ("bad mode", RUN + " --mode diagonal", "diagonal"),
    ("malformed --ns port", "run {good} --kernels sobel --ns 127.0.0.1:http", "127.0.0.1:http"),
    ("malformed --ns address", "status --ns a:b:c", "a:b:c"),
    ("unknown worker name", "status --ns {ns} --name nosuchworker", "nosuchworker"),
    ("negative local threads", RUN + " --local-threads -2", "-2"),
    ("bad --out suffix", RUN + " --out {good}.xyz", ".xyz"),
]


@pytest.mark.parametrize(("case", "template", "needle"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_one_line_error(cluster, files, capsys, case, template, needle) -> None:
    argv = [word.format(ns=cluster.ns_address, **files) for word in template.split()]
    code, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, case
    assert len(lines) == 1, f"{case}: expected one line, got {err!r}"
    assert lines[0].startswith("rmidl: error:"), lines[0]
    assert needle in lines[0], f"{case}: {needle!r} not in {lines[0]!r}"
    assert "Traceback" not in err


def test_cli_output_over_memory_budget_is_refused_before_work(cluster, files, capsys, monkeypatch) -> None:
    monkeypatch.setenv("RMIDL_MEMORY_BUDGET", "100000")
    argv = ["run", str(files["good"]), "--kernels", "random:64x3x3", "--ns", cluster.ns_address]
    code, err = run_cli(capsys, *argv)
    assert code != 0 and err.count("\n") == 1 and "budget" in err, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["up", "--workers", "-1"], "-1"), (["up", "--workers", "2", "--threads-per-worker", "0"], "0")],
    ids=["up with negative workers", "up with zero threads per worker"],
)
def test_cli_bad_counts(capsys, argv, needle) -> None:
    code, err = run_cli(capsys, *argv)
    assert code != 0 and err.startswith("rmidl: error:") and needle in err and err.count("\n") == 1, err


def test_cli_name_server_down_fails_fast(files, capsys) -> None:
    import socket
    import time

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    code, err = run_cli(capsys, "run", str(files["good"]), "--kernels", "sobel", "--ns", f"127.0.0.1:{port}")
    assert code != 0 and str(port) in err and err.count("\n") == 1, err
    assert time.monotonic() - start < 15


def test_real_process_exit_code_and_debug_traceback(files) -> None:
    argv = [sys.executable, "-m", "rmidl.client.cli", "run", str(files["corrupt"]), "--kernels", "sobel"]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().count("\n") == 0 and "corrupt.png" in plain.stderr
    debug_argv = [*argv[:3], "--debug", *argv[3:]]
    debug = subprocess.run(debug_argv, capture_output=True, text=True, timeout=60, check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


API_CASES = [
    ("empty image", np.zeros((0, 5)), np.ones((1, 3, 3)), {}, errors.ShapeError, "empty"),
    ("image ndim 4", np.zeros((2, 5, 5, 1)), np.ones((1, 3, 3)), {}, errors.ShapeError, "(2, 5, 5, 1)"),
    ("bool image", np.ones((5, 5), bool), np.ones((1, 3, 3)), {}, errors.DTypeError, "bool"),
    ("complex kernels", np.ones((5, 5)), np.ones((1, 3, 3), complex), {}, errors.DTypeError, "complex"),
    ("channel mismatch", np.ones((6, 6, 3)), np.ones((2, 3, 3, 2)), {}, errors.ShapeError, "channel"),
    ("NaN image", np.full((6, 6), np.nan), np.ones((1, 3, 3)), {}, errors.NonFiniteInput, "NaN"),
    ("kernel larger than image", np.ones((4, 9)), np.ones((1, 5, 5)), {}, errors.KernelTooLarge, "5x5"),
    ("bad mode", np.ones((6, 6)), np.ones((1, 3, 3)), {"mode": "diagonal"}, errors.OptionError, "diagonal"),
    ("bad engine", np.ones((6, 6)), np.ones((1, 3, 3)), {"engine": "gpu"}, errors.OptionError, "gpu"),
    ("zero threads", np.ones((6, 6)), np.ones((1, 3, 3)), {"threads": 0}, errors.OptionError, "threads"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_locally_and_through_the_cluster(cluster, case) -> None:
    _, image, kernels, options, error, needle = case
    with pytest.raises(error) as raised:
        rmidl.correlate(image, kernels, **options)
    assert needle in str(raised.value) and "\n" not in str(raised.value), str(raised.value)
    if set(options) <= {"mode"}:  # the coordinator takes the same inputs and must refuse them alike
        with Coordinator(cluster.ns_address, local_threads=0) as coordinator, pytest.raises(error):
            coordinator.correlate(image, kernels, **options)


def test_cluster_still_serves_after_every_bad_input(cluster, files, capsys, tmp_path) -> None:
    out = tmp_path / "maps.npy"
    code, err = run_cli(capsys, "run", str(files["good"]), "--kernels", "random:3x5x5:4", "--ns",
                        cluster.ns_address, "--local-threads", "0", "--out", str(out))
    assert code == 0, err
    image = rmidl.load_image(files["good"]).astype(np.float64)
    bank = rmidl.load_kernels("random:3x5x5:4").astype(np.float64)
    import scipy.signal

    reference = np.stack([scipy.signal.correlate(image, k, mode="valid") for k in bank])
    got = np.load(out)
    assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max()
    with Coordinator(cluster.ns_address, local_threads=0) as coordinator:
        assert [w["name"] for w in coordinator.workers()] == ["w1"]
