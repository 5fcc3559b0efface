"""Every table of bad input in one place: the Python API (rmidl and the Coordinator, locally and on a
cluster) and every `rmidl` command. Each case must give one error line naming the problem, the error
class or exit code the table says, no traceback without --debug, nothing written, and the cluster must
go on serving."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import write_image_folder
from lying_files import header_only_png, lying_npy, write_zip
from reference import assert_close, reference

import rmidl
from rmidl import errors
from rmidl.client import Coordinator
from rmidl.client.cli import main
from rmidl.client.localcluster import LocalCluster

IMAGE = np.ones((8, 9), np.float32)
BANK = np.ones((2, 3, 3), np.float32)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Two workers (w1, w2) shared by this module's tests; no test stops it or a worker of it."""
    with LocalCluster(workers=2, threads_per_worker=1) as running:
        yield running


# -- the Python API ---------------------------------------------------------------------------------------
def with_value(array: np.ndarray, index: tuple[int, ...], value: float) -> np.ndarray:
    array = array.copy()
    array[index] = value
    return array


def read_only_out() -> np.ndarray:
    out = np.empty((2, 6, 7), np.float32)
    out.flags.writeable = False
    return out


# (case id, call arguments (image, kernels, keyword options), error class, regex the message must match)
BAD_INPUT: list[tuple[str, Callable[[], tuple[Any, Any, dict[str, Any]]], type[errors.RmidlError], str]] = [
    ("image 1-d", lambda: (np.ones(5), BANK, {}), errors.ShapeError, r"\(5,\)"),
    ("image 4-d", lambda: (np.ones((2, 3, 4, 1)), BANK, {}), errors.ShapeError, r"\(2, 3, 4, 1\)"),
    ("kernels 1-d", lambda: (IMAGE, np.ones(3), {}), errors.ShapeError, r"\(3,\)"),
    ("kernels 5-d", lambda: (IMAGE, np.ones((1, 1, 1, 1, 1)), {}), errors.ShapeError, r"\(1, 1, 1, 1, 1\)"),
    ("empty image", lambda: (np.ones((0, 5)), BANK, {}), errors.ShapeError,
     r"image is empty: shape \(0, 5\)"),
    ("empty image width", lambda: (np.ones((4, 0, 3)), np.ones((1, 1, 1, 3)), {}), errors.ShapeError,
     r"\(4, 0, 3\)"),
    ("empty bank", lambda: (IMAGE, np.ones((0, 3, 3)), {}), errors.ShapeError, r"\(0, 3, 3, 1\)"),
    ("empty kernel", lambda: (IMAGE, np.ones((2, 0, 3)), {}), errors.ShapeError, r"\(2, 0, 3, 1\)"),
    ("channel mismatch", lambda: (np.ones((8, 9, 3)), np.ones((2, 3, 3, 2)), {}), errors.ShapeError,
     "2 channel.* 3"),
    ("gray image, colour bank", lambda: (IMAGE, np.ones((2, 3, 3, 3)), {}), errors.ShapeError, "3 channel"),
    ("kernel taller than image", lambda: (IMAGE, np.ones((1, 9, 3)), {}), errors.KernelTooLarge,
     "kernel 3x9 .*image 9x8"),  # sizes W x H
    ("kernel wider than image", lambda: (IMAGE, np.ones((1, 2, 10)), {}), errors.KernelTooLarge,
     "kernel 10x2 .*image 9x8"),
    ("NaN in image", lambda: (with_value(IMAGE, (3, 4), np.nan), BANK, {}), errors.NonFiniteInput,
     r"image contains NaN.*\(3, 4, 0\)"),
    ("Inf in image", lambda: (with_value(IMAGE, (0, 1), -np.inf), BANK, {}), errors.NonFiniteInput,
     "image contains Inf"),
    ("Inf before NaN", lambda: (with_value(with_value(IMAGE, (3, 4), np.nan), (0, 1), np.inf), BANK, {}),
     errors.NonFiniteInput, r"image contains Inf \(first at index \(0, 1, 0\)\)"),
    ("float64 image beyond float32", lambda: (with_value(IMAGE.astype(np.float64), (1, 1), -1e300), BANK, {}),
     errors.NonFiniteInput, r"image has values beyond the float32 range \(max \|value\| 1e\+300\)"),
    ("float64 kernels beyond float32",
     lambda: (IMAGE, with_value(BANK.astype(np.float64), (0, 0, 0), 1e39), {}), errors.NonFiniteInput,
     "kernels ha.* values beyond the float32 range"),
    ("NaN in kernels", lambda: (IMAGE, with_value(BANK, (1, 2, 0), np.nan), {}), errors.NonFiniteInput,
     r"kernels contain.*NaN.*\(1, 2, 0, 0\)"),
    ("Inf in kernels", lambda: (IMAGE, with_value(BANK, (0, 0, 0), np.inf), {}), errors.NonFiniteInput,
     "kernels contain.*Inf"),
    ("bool image", lambda: (IMAGE > 0, BANK, {}), errors.DTypeError, "bool"),
    ("complex image", lambda: (IMAGE.astype(np.complex64), BANK, {}), errors.DTypeError, "complex64"),
    ("object kernels", lambda: (IMAGE, BANK.astype(object), {}), errors.DTypeError, "object"),
    ("complex kernels", lambda: (IMAGE, BANK.astype(complex), {}), errors.DTypeError, "complex"),
    ("string image", lambda: (np.full((4, 4), "a"), BANK, {}), errors.DTypeError, "<U1"),
    ("bad mode", lambda: (IMAGE, BANK, {"mode": "circular"}), errors.OptionError, "'circular'"),
    ("bad engine", lambda: (IMAGE, BANK, {"engine": "gpu"}), errors.OptionError, "'gpu'"),
    ("array as mode", lambda: (IMAGE, BANK, {"mode": np.array(["valid", "same"])}), errors.OptionError,
     "valid"),
    ("engine not text", lambda: (IMAGE, BANK, {"engine": 3}), errors.OptionError, "engine 3"),
    ("zero threads", lambda: (IMAGE, BANK, {"threads": 0}), errors.OptionError, "threads=0"),
    ("negative threads", lambda: (IMAGE, BANK, {"threads": -2}), errors.OptionError, "threads=-2"),
    ("fractional threads", lambda: (IMAGE, BANK, {"threads": 1.5}), errors.OptionError, "threads=1.5"),
    ("bool threads", lambda: (IMAGE, BANK, {"threads": True}), errors.OptionError, "threads=True"),
    ("text threads", lambda: (IMAGE, BANK, {"threads": "2"}), errors.OptionError, "threads='2'"),
    ("out of wrong shape", lambda: (IMAGE, BANK, {"out": np.empty((2, 6, 6), np.float32)}), errors.ShapeError,
     r"\(2, 6, 6\).*\(2, 6, 7\)"),
    ("out of wrong dtype", lambda: (IMAGE, BANK, {"out": np.empty((2, 6, 7), np.float64)}), errors.DTypeError,
     "out has dtype float64, the result needs float32"),
    ("out not an array", lambda: (IMAGE, BANK, {"out": [[0.0]]}), errors.OptionError,
     "out must be a numpy array, got list"),
    ("read-only out", lambda: (IMAGE, BANK, {"out": read_only_out()}), errors.OptionError,
     "out is read-only"),
    ("broadcast out", lambda: (IMAGE, BANK, {"out": np.broadcast_to(np.float32(0), (2, 6, 7))}),
     errors.OptionError, "out is read-only"),
]



PATHS = ["rmidl", "coordinator, local pool", "coordinator, workers only"]


def _callable(path: str, function: str, ns: str, stack: Any) -> Callable[..., Any]:
    if path == "rmidl":
        return getattr(rmidl, function)  # type: ignore[no-any-return]
    options = {"local_threads": 1} if path == "coordinator, local pool" else {"ns": ns, "local_threads": 0}
    return getattr(stack.enter_context(Coordinator(**options)), function)  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("function", ["correlate", "convolve"])
@pytest.mark.parametrize(("case", "make", "error", "message"), BAD_INPUT, ids=[row[0] for row in BAD_INPUT])
def test_bad_input_raises_its_class_naming_the_value(cluster, case, make, error, message, function,
                                                     path) -> None:
    import contextlib

    image, kernels, options = make()
    with contextlib.ExitStack() as stack:
        call = _callable(path, function, cluster.ns_address, stack)
        with pytest.raises(error, match=message) as raised:
            call(image, kernels, **options)
    assert type(raised.value) is error  # not merely a subclass: the table names the class
    assert "\n" not in str(raised.value), str(raised.value)
    # Input errors are also ValueErrors (TypeError for dtypes), so callers of numpy-like APIs catch them.
    assert isinstance(raised.value, errors.InputError) and isinstance(raised.value, ValueError)


# -- the command line -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good and bad input files, made once (read-only for the tests)."""
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
    made["fifo"] = root / "results.fifo"  # nobody ever writes to it: a plain open() would wait forever
    os.mkfifo(made["fifo"])
    made["huge"] = root / "huge.json"  # sparse, 64 MiB of nothing on disk: past any JSON cap we read
    with made["huge"].open("wb") as handle:
        handle.truncate(64 << 20)
    made["json_list"] = root / "list.json"
    made["json_list"].write_text("[1, 2]\n")
    for name, array in {
        "bank_1d": np.ones(9, np.float32),
        "bank_5d": np.ones((1, 2, 3, 3, 1, 1), np.float32),
        "bank_complex": np.ones((2, 3, 3), np.complex64),
        "bank_nan": np.array([[[1.0, np.nan], [0.0, 1.0]]], np.float32),
        "bank_inf": np.array([[[1.0, np.inf], [0.0, 1.0]]], np.float32),
        "bank_empty": np.ones((0, 3, 3), np.float32),
        "bank_wide": np.ones((2, 10, 45), np.float32),
    }.items():
        made[name] = root / f"{name}.npy"
        np.save(made[name], array)
    made["bank_object"] = root / "bank_object.npy"
    np.save(made["bank_object"], np.array([{"a": 1}], dtype=object), allow_pickle=True)
    made["bank_liar"] = root / "bank_liar.npy"  # its header claims 4 PiB
    made["bank_liar"].write_bytes(lying_npy((1 << 20, 1 << 20, 1 << 10)))
    tiny = lying_npy((1, 2, 2))
    made["bank_many"] = write_zip(root / "bank_many.npz", {f"a{i}.npy": tiny for i in range(3000)})
    made["bomb"] = header_only_png(root / "bomb.png", 10_000, 10_000)  # between Pillow's warning and error
    made["dataset"] = write_image_folder(root / "dataset", per_class=3)
    made["dataset_bad"] = write_image_folder(root / "dataset_bad", per_class=3)
    made["dataset_bad"].joinpath("c1", "img001.png").write_bytes(good_bytes[: len(good_bytes) // 2])
    made["dataset_mixed"] = write_image_folder(root / "dataset_mixed", per_class=3)
    rmidl.save_image(made["dataset_mixed"] / "c1" / "wide.png", np.zeros((24, 30), np.uint8))
    made["dataset_empty"] = root / "dataset_empty"
    (made["dataset_empty"] / "c0").mkdir(parents=True)
    made.update(feature_files(root))
    return made


def feature_files(root: Path) -> dict[str, Path]:
    """Features files for `rmidl train` / `rmidl predict` (600 samples x 12 features, 3 named classes)
    and a model of the same width."""
    from conftest import gaussian_blobs

    x, y = gaussian_blobs(600, 12, 3)
    names = np.array(["cat", "dog", "eel"])
    contents: dict[str, dict[str, np.ndarray]] = {
        "feat": {"X": x, "labels": y, "classes": names},
        "feat_nolabels": {"X": x},
        "feat_short": {"X": x, "y": y[:-1]},
        "feat_nan": {"X": with_value(x, (3, 4), np.nan), "y": y},
        "feat_empty_class": {"X": x, "labels": y, "classes": np.array([*names, "fox"])},
        "feat_nox": {"features": x, "y": y},
        "feat_wide": {"X": np.hstack([x, x]), "labels": y, "classes": names},
        "feat_other_classes": {"X": x, "labels": y, "classes": np.array(["ant", "bee", "cow"])},
    }
    made = {}
    for name, arrays in contents.items():
        made[name] = root / f"{name}.npz"
        np.savez(made[name], **arrays)  # type: ignore[arg-type]
    made["model"] = rmidl.MLP((12, 4, 3), classes=list(names)).save(root / "model.npz")
    return made


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def _closed_port() -> int:
    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


RUN = "run {good} --kernels sobel --ns {ns}"
BENCH = "bench --size 96x64 --kernels random:4x5x5 --runs 2 --out {tmp}/out"
FEATURES = "features {dataset} --net 2x3x3:relu:max2 --out {tmp}/f.npz -q"
# (case, argv template with {file}, {ns}, {closed} and {tmp} placeholders, exit code, text the one error
# line must contain, formatted like the template)
CLI_CASES: list[tuple[str, str, int, str]] = [
    ("missing image", "run {good}.gone --kernels sobel --ns {ns}", 2, "good.png.gone"),
    ("corrupt image", "run {corrupt} --kernels sobel --ns {ns}", 2, "corrupt.png"),
    ("truncated image", "run {truncated} --kernels sobel --ns {ns}", 2, "truncated.png"),
    ("unsupported format", "run {text} --kernels sobel --ns {ns}", 2, "notes.txt"),
    ("empty image file", "run {empty} --kernels sobel --ns {ns}", 2, "empty.png"),
    ("bank of wrong ndim (1-D)", "run {good} --kernels {bank_1d} --ns {ns}", 2, "bank_1d.npy"),
    ("bank of wrong ndim (6-D)", "run {good} --kernels {bank_5d} --ns {ns}", 2, "bank_5d.npy"),
    ("bank of complex dtype", "run {good} --kernels {bank_complex} --ns {ns}", 2, "complex"),
    ("bank of objects (pickle)", "run {good} --kernels {bank_object} --ns {ns}", 2, "bank_object.npy"),
    ("bank with NaN", "run {good} --kernels {bank_nan} --ns {ns}", 2, "NaN"),
    ("bank with Inf", "run {good} --kernels {bank_inf} --ns {ns}", 2, "Inf"),
    ("empty bank", "run {good} --kernels {bank_empty} --ns {ns}", 2, "empty"),
    ("bank whose header claims 4 PiB", "run {good} --kernels {bank_liar}", 2,
     "bank_liar.npy' is truncated or lies"),
    ("bank archive of 3000 arrays", "run {good} --kernels {bank_many}", 2, "holds 3000 arrays (a0, a1,"),
    ("decompression bomb", "run {bomb} --kernels sobel", 2, "bomb.png' is too large to decode safely"),
    ("missing bank file", "run {good} --kernels nowhere.npy --ns {ns}", 2, "nowhere.npy"),
    ("unknown bank name", "run {good} --kernels wavelets:3 --ns {ns}", 2, "wavelets"),
    ("unknown bank kind", "run {good} --kernels nosuch:3", 2, "nosuch:3"),
    ("malformed bank spec", "run {good} --kernels random:axb --ns {ns}", 2, "random:axb"),
    ("kernel larger than image", "run {small} --kernels random:2x25x25 --ns {ns}", 2, "25x25"),
    ("named bank over the memory budget", "run {good} --kernels gabor:100000x301", 2,
     "kernel bank gabor:100000x301 needs 36244748848 bytes"),
    ("named bank whose maps are over the memory budget", "run {good} --kernels random:2000000x3x3", 2,
     "kernel bank random:2000000x3x3 (2000000 kernels 3x3) makes 2000000 maps 38x46 float32 of "
     "13984000000 bytes, more than memory_budget="),
    ("kernel larger than image, local", "run {good} --kernels random:2x50x50", 2, "50x50"),
    ("kernel wider than image (sizes W x H)", "run {good} --kernels random:2x10x45", 2,
     "kernel 45x10 does not fit image 40x48"),
    ("kernel wider than image, in a file", "run {good} --kernels {bank_wide}", 2,
     "kernel 45x10 does not fit image 40x48"),
    ("bad mode", RUN + " --mode diagonal", 2, "mode 'diagonal'"),
    ("malformed --ns port", "run {good} --kernels sobel --ns 127.0.0.1:http", 2, "127.0.0.1:http"),
    ("malformed --ns", "run {good} --kernels sobel --ns host:port:x", 2, "host:port:x"),
    ("malformed --ns address", "status --ns a:b:c", 2, "a:b:c"),
    ("unknown worker name", "status --ns {ns} --name nosuchworker", 3, "no worker named 'nosuchworker'"),
    ("name server down", "status --ns {closed}", 3, "not reachable"),
    ("negative local threads", RUN + " --local-threads -2", 2, "local_threads=-2"),
    ("bad --out suffix", RUN + " --out {tmp}/maps.xyz", 2, "maps.xyz"),
    ("--out a directory named .npy", RUN + " --out {tmp}/folder.npy", 2, "folder.npy"),
    ("--out under a file", RUN + " --out {good}/maps.npy", 2, "is not a directory"),
    ("--workers naming an unknown worker", RUN + " --workers w2,nobody", 3,
     "no worker 'nobody' registered at {ns} (registered: w1, w2)"),
    ("--workers with an empty name", RUN + " --workers w1,,w2", 2,
     "--workers 'w1,,w2' is not a comma-separated list"),
    ("--workers without a cluster", "run {good} --kernels sobel --workers w1", 3,
     "no local cluster is running"),
    ("up with negative workers", "up --workers -1", 2, "workers=-1"),
    ("up with zero threads per worker", "up --workers 2 --threads-per-worker 0", 2, "threads_per_worker=0"),
    ("up with a port out of range", "up --ns-port 99999", 2, "ns_port=99999"),
    ("demo larger than its image", "demo --size 9999x1", 2, "--size '9999x1'"),
    ("bench --cores 0", BENCH + " --cores 0", 2, "--cores '0'"),
    ("bench --cores not a number", BENCH + " --cores 1,two", 2, "'1,two'"),
    ("bench --cores repeated", BENCH + " --cores 1,1", 2, "repeats"),
    ("bench --workers negative", BENCH + " --workers -1", 2, "-1"),
    ("bench --runs 0", BENCH + " --runs 0", 2, "--runs 0"),
    ("bench --size malformed", BENCH + " --size 96by64", 2, "96by64"),
    ("bench --ns malformed", BENCH + " --ns nohost", 2, "nohost"),
    ("bench --predict 0", BENCH + " --predict 0,2", 2, "--predict"),
    ("bench --link unknown", BENCH + " --predict 2 --link fast", 2, "'fast'"),
    ("bench empty kernel", BENCH + " --kernels random:4x0x5", 2, "4x0x5"),
    ("bench kernel larger than image", BENCH + " --kernels random:4x99x99", 2, "99x99"),
    ("bench --from missing", BENCH + " --from /nonexistent/results.json", 2, "/nonexistent/results.json"),
    ("bench --from a FIFO", BENCH + " --from {fifo}", 2, "results.fifo' is a FIFO (named pipe)"),
    ("bench --from a device", BENCH + " --from /dev/null", 2, "'/dev/null' is a character device"),
    ("bench --from a huge file", BENCH + " --from {huge}", 2, "huge.json' is larger than 16777216 bytes"),
    ("bench --from not JSON", BENCH + " --from {text}", 2, "notes.txt' is not JSON"),
    ("bench --from other JSON", BENCH + " --from {json_list}", 2,
     "list.json' is not a results.json of rmidl bench (it holds a list)"),
    ("features: truncated image, workers", FEATURES.replace("{dataset}", "{dataset_bad}") + " --ns {ns}", 2,
     "dataset_bad/c1/img001.png"),
    ("features: truncated image, local", FEATURES.replace("{dataset}", "{dataset_bad}"), 2, "img001.png"),
    ("features: mixed sizes", FEATURES.replace("{dataset}", "{dataset_mixed}") + " --ns {ns}", 2,
     "wide.png' is 30x24 but the dataset's images are 20x24"),  # W x H
    ("features: empty dataset", FEATURES.replace("{dataset}", "{dataset_empty}"), 2, "holds no images"),
    ("features: missing dataset", FEATURES.replace("{dataset}", "{tmp}/gone"), 2, "gone' does not exist"),
    ("features: unknown preset", "features {dataset} --net seed005 --out {tmp}/f.npz", 2, "'seed005'"),
    ("features: net larger than the images", "features {dataset} --net 2x30x30 --out {tmp}/f.npz", 2,
     "30x30 does not fit"),
    ("features: net wider than the images (W x H)", "features {dataset} --net 2x3x30 --out {tmp}/f.npz", 2,
     "kernel 30x3 does not fit maps 20x24"),
    ("features: missing net file", "features {dataset} --net {tmp}/net.npz --out {tmp}/f.npz", 2, "net.npz"),
    ("features: --out not .npz", "features {dataset} --net 2x3x3 --out {tmp}/f.csv", 2, "must end in .npz"),
    ("features: --batch 0", FEATURES + " --batch 0", 2, "batch=0"),
    ("features: --resize malformed", FEATURES + " --resize 20by20", 2, "--resize '20by20'"),
    ("features: --crop larger than images", FEATURES + " --crop 40x40", 2, "smaller than the crop 40x40"),
    ("features: --workers without a cluster", FEATURES + " --workers w1", 3, "no local cluster is running"),
    ("features: --replicas malformed", FEATURES + " --placement stages --replicas 2,x", 2, "'2,x'"),
    ("features: --replicas without stages", FEATURES + " --replicas 2", 2, "give --placement stages"),
    ("features: --replicas for other stages", FEATURES + " --placement stages --replicas 1,1", 2,
     "each of the 1 CNP stages"),
    ("bench pipeline --images 0", "bench pipeline --images 0 --out {tmp}/bp", 2, "--images 0"),
    ("bench pipeline --workers 0", "bench pipeline --workers 0 --out {tmp}/bp", 2, "--workers '0'"),
    ("bench pipeline, net larger than the images", "bench pipeline {dataset} --net 2x30x30 --out {tmp}/bp", 2,
     "30x30 does not fit"),
    ("train: labels missing", "train {feat_nolabels}", 2, "feat_nolabels.npz' has no labels"),
    ("train: labels of the wrong length", "train {feat_short}", 2, "holds 599 labels for 600 samples"),
    ("train: NaN features", "train {feat_nan} --ns {ns}", 2, "X contains NaN"),
    ("train: a class with no samples", "train {feat_empty_class} --ns {ns}", 2, "class 'fox' has no samples"),
    ("train: no X", "train {feat_nox}", 2, "has no array X (it holds features, y)"),
    ("train: missing features file", "train {feat}.gone", 2, "feat.npz.gone' does not exist"),
    ("train: a bank as features", "train {bank_1d}", 2, "is a single array (.npy), not an .npz archive"),
    ("train: hidden=0", "train {feat} --hidden 0 --ns {ns}", 2,
     "--hidden '0': every hidden layer needs a whole number of units >= 1 (--hidden none trains without"),
    ("train: --hidden malformed", "train {feat} --hidden 25,x", 2, "--hidden '25,x'"),
    ("train: --batch malformed", "train {feat} --batch many", 2, "--batch 'many'"),
    ("train: --epochs 0", "train {feat} --epochs 0", 2, "epochs=0"),
    ("train: --out not .npz", "train {feat} --out {tmp}/model.pkl", 2, "model.pkl' must end in .npz"),
    ("train: --plot not .png", "train {feat} --plot {tmp}/loss.jpg", 2, "loss.jpg' must end in .png"),
    ("train: --out under a file", "train {feat} --out {good}/model.npz", 2, "good.png' is not a directory"),
    ("train: name server down", "train {feat} --ns {closed}", 3, "not reachable"),
    ("train: unknown worker", "train {feat} --ns {ns} --workers nobody", 3, "no worker 'nobody'"),
    ("predict: features of another width", "predict {model} {feat_wide}", 2,
     "X has 24 features; the model takes 12"),
    ("predict: labels of other classes", "predict {model} {feat_other_classes}", 2,
     "label 'ant' in y is not one of the model's 3 classes (cat, dog, eel)"),
    ("predict: a features file as model", "predict {feat} {feat}", 2, "is not an rmidl model"),
    ("predict: missing model", "predict {tmp}/none.npz {feat}", 2, "none.npz' does not exist"),
    ("predict: NaN features", "predict {model} {feat_nan}", 2, "X contains NaN"),
    ("predict: --out bad suffix", "predict {model} {feat} --out {tmp}/p.txt", 2, "p.txt' must end in .csv"),
    ("bench --image missing",  # --image and --size exclude each other
     "bench --kernels random:4x5x5 --runs 2 --out {tmp}/out --image /nonexistent/p.png", 2,
     "/nonexistent/p.png"),
]


@pytest.mark.parametrize(("case", "template", "code", "needle"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_an_exit_code(cluster, files, capsys, tmp_path, case, template, code,
                                                     needle) -> None:
    """In-process through cli.main (test_real_process_exit_code_and_debug_traceback runs a real process)."""
    (tmp_path / "folder.npy").mkdir()  # an --out that passes the checks but cannot be written
    values = {"ns": cluster.ns_address, "closed": f"127.0.0.1:{_closed_port()}", "tmp": str(tmp_path),
              **{name: str(path) for name, path in files.items()}}
    got, err = run_cli(capsys, *(word.format(**values) for word in template.split()))
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, f"{case}: exit {got}, {err!r}"
    assert len(lines) == 1, f"{case}: expected one line, got {err!r}"
    assert lines[0].startswith("rmidl: error: "), lines[0]
    assert needle.format(**values) in lines[0], f"{case}: {needle!r} not in {lines[0]!r}"
    assert "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["folder.npy"], "a refused command wrote something"
    assert main(["status", "--ns", cluster.ns_address]) == 0  # the cluster still serves
    capsys.readouterr()


def test_cli_output_over_memory_budget_is_refused_before_work(cluster, files, capsys, monkeypatch) -> None:
    monkeypatch.setenv("RMIDL_MEMORY_BUDGET", "100000")
    argv = ["run", str(files["good"]), "--kernels", "random:64x3x3", "--ns", cluster.ns_address]
    code, err = run_cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and "budget" in err, err


def test_cli_refuses_a_named_bank_before_building_it(files, capsys, monkeypatch) -> None:
    """Its maps would be over the budget: known from the spec, so no minute is spent building the bank."""
    import rmidl.banks

    def built(*args: object) -> None:
        raise AssertionError("the bank was built before its size was checked")

    monkeypatch.setattr(rmidl.banks, "_gabor_chunk", built)
    for command in ("run", "bench"):
        image = [str(files["good"])] if command == "run" else ["--image", str(files["good"])]
        code, err = run_cli(capsys, command, *image, "--kernels", "gabor:2000000x3")
        assert code == 2 and err.count("\n") == 1, err
        assert "kernel bank gabor:2000000x3 (2000000 kernels 3x3) makes 2000000 maps 38x46" in err, err


def test_cli_name_server_down_fails_fast(files, capsys) -> None:
    port = _closed_port()
    start = time.monotonic()
    code, err = run_cli(capsys, "run", str(files["good"]), "--kernels", "sobel", "--ns", f"127.0.0.1:{port}")
    assert code == 3 and str(port) in err and err.count("\n") == 1, err
    assert time.monotonic() - start < 15


def test_real_process_exit_code_and_debug_traceback(files) -> None:
    argv = [sys.executable, "-m", "rmidl.client.cli", "run", str(files["corrupt"]), "--kernels", "sobel"]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().count("\n") == 0 and "corrupt.png" in plain.stderr
    debug_argv = [*argv[:3], "--debug", *argv[3:]]
    debug = subprocess.run(debug_argv, capture_output=True, text=True, timeout=60, check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_the_cluster_computes_exactly_right_after_bad_input(cluster, files, capsys, tmp_path) -> None:
    for template in ("run {corrupt} --kernels sobel --ns {ns}", "run {good} --kernels {bank_nan} --ns {ns}",
                     "run {small} --kernels random:2x25x25 --ns {ns}"):
        argv = template.format(ns=cluster.ns_address, **{k: str(v) for k, v in files.items()}).split()
        assert run_cli(capsys, *argv)[0] == 2
    out = tmp_path / "maps.npy"
    code, err = run_cli(capsys, "run", str(files["good"]), "--kernels", "random:3x5x5:4", "--ns",
                        cluster.ns_address, "--local-threads", "0", "--out", str(out))
    assert code == 0, err
    expected = reference(rmidl.load_image(files["good"]), rmidl.load_kernels("random:3x5x5:4"))
    assert_close(np.load(out), expected)
    with Coordinator(cluster.ns_address, local_threads=0) as coordinator:
        assert [w["name"] for w in coordinator.workers()] == ["w1", "w2"]
