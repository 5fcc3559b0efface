"""Inputs that hang or lie (issue 11) and files written whole: special files, array headers claiming more
than the file holds, oversized bank specs, decompression bombs, writes failing half-way, and missing
files that are also FileNotFoundError (issue 13, item 8)."""

from __future__ import annotations

import errno
import io
import json
import os
import resource
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from lying_files import header_only_png, lying_npy, write_zip
from PIL import Image

import rmidl
from rmidl import BankError, BudgetExceeded, ImageReadError, InputError, OptionError, load_image, load_kernels
from rmidl.client.cli import main
from rmidl.client.cli.run import save
from rmidl.errors import BankNotFound, ImageNotFound
from rmidl.imaging import save_image, save_maps
from rmidl.remote.security import read_secret

MEMORY_CAP = 4 << 30
"""Address space of a child that runs a reader which might read without end (it fails, not the host)."""


def capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def child_env() -> dict[str, str]:
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------------------
# Special files: one child runs every reader on every special path, each call under an alarm, so a reader
# that blocks (a FIFO with no writer) or reads without end (/dev/zero) fails its case instead of the suite.

READERS = {"image": ImageReadError, "bank": BankError, "bank spec": BankError, "secret": OptionError,
           "bench --from": OptionError, "network": InputError}
SPECIAL = {"fifo": "is a FIFO (named pipe), not a regular file",
           "/dev/zero": "is a character device, not a regular file",
           "/dev/urandom": "is a character device, not a regular file",
           "directory": "is a directory"}

# a spec string names a file by its .npy suffix: /dev/zero is a spec, not a file; --from DIR reads
# DIR/results.json
SPECIAL_CASES = [(r, s) for r in READERS for s in SPECIAL
                 if not (r == "bank spec" and s.startswith("/dev"))
                 and not (r == "bench --from" and s == "directory")]


CHILD = textwrap.dedent("""
    import json, pathlib, signal, sys
    import rmidl
    import rmidl.network
    from rmidl.client.cli.bench import _load_earlier
    from rmidl.remote.security import read_secret

    READERS = {
        "image": rmidl.load_image,
        "bank": lambda path: rmidl.load_kernels(pathlib.Path(path)),
        "bank spec": rmidl.load_kernels,  # a string naming a file by its .npy suffix
        "secret": read_secret,
        "bench --from": _load_earlier,  # an earlier results.json
        "network": rmidl.network.load_network,
    }

    def hung(*args):
        raise TimeoutError("still reading after 5 s")

    signal.signal(signal.SIGALRM, hung)
    for case in json.loads(sys.argv[1]):
        signal.alarm(5)
        try:
            READERS[case["reader"]](case["path"])
            outcome = {"error": None, "message": "returned"}
        except BaseException as error:
            outcome = {"error": type(error).__name__, "message": str(error)[:2000]}
        finally:
            signal.alarm(0)
        print(json.dumps({**case, **outcome}), flush=True)
""")


@pytest.fixture(scope="module")
def special_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict]:
    root = tmp_path_factory.mktemp("special")
    fifo = root / "pipe.npy"  # named like a bank so that a spec string is taken as a file
    os.mkfifo(fifo)
    (root / "folder.npy").mkdir()
    paths = {"fifo": str(fifo), "/dev/zero": "/dev/zero", "/dev/urandom": "/dev/urandom",
             "directory": str(root / "folder.npy")}
    cases = [{"reader": r, "special": s, "path": paths[s]} for r, s in SPECIAL_CASES]
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120, env=child_env(), preexec_fn=capped, check=False)
    return {(o["reader"], o["special"]): o for o in map(json.loads, done.stdout.splitlines())}


@pytest.mark.parametrize(("reader", "special"), SPECIAL_CASES, ids=[f"{r}-{s}" for r, s in SPECIAL_CASES])
def test_a_special_file_is_refused_at_once(special_outcomes, reader: str, special: str) -> None:
    outcome = special_outcomes.get((reader, special))
    assert outcome is not None, "the reader killed its process (out of memory?)"
    assert outcome["error"] == READERS[reader].__name__, outcome
    assert SPECIAL[special] in outcome["message"] and "\n" not in outcome["message"], outcome


def test_the_cli_refuses_special_files_in_one_line(tmp_path: Path) -> None:
    pipes = {suffix: tmp_path / f"pipe{suffix}" for suffix in (".png", ".npy", ".txt")}
    for pipe in pipes.values():
        os.mkfifo(pipe)
    image = save_image(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
    for argv, needle in [
        (["run", str(pipes[".png"]), "--kernels", "sobel"], "is a FIFO"),
        (["run", str(image), "--kernels", str(pipes[".npy"])], "is a FIFO"),
        (["run", str(image), "--kernels", "sobel", "--secret-file", str(pipes[".txt"])], "is a FIFO"),
        (["run", str(image), "--kernels", "sobel", "--secret-file", "/dev/zero"], "is a character device"),
    ]:
        done = subprocess.run([sys.executable, "-m", "rmidl.client.cli", *argv], capture_output=True,
                              text=True, timeout=60, env=child_env(), preexec_fn=capped, check=False)
        assert done.returncode == 2, (argv, done.stderr)
        assert done.stderr.count("\n") == 1 and needle in done.stderr, (argv, done.stderr)


def test_a_secret_file_must_be_small(tmp_path: Path) -> None:
    big = tmp_path / "secret"
    big.write_text("s" * 5000)
    with pytest.raises(OptionError, match=r"secret file .* is larger than 4096 bytes$"):
        read_secret(big)
    big.write_bytes(b"\xff\xfe" * 8)
    with pytest.raises(OptionError, match="is not UTF-8 text"):
        read_secret(big)


# ---------------------------------------------------------------------------------------------------------
# Array files whose header claims more than the file holds, and archives that are large or odd.

HUGE_SHAPE = (1 << 20, 1 << 20, 1 << 10)  # 4 PiB of float32: numpy would try to allocate it


def test_an_npy_header_claiming_more_than_the_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "liar.npy"
    path.write_bytes(lying_npy(HUGE_SHAPE))
    with pytest.raises(BankError, match=r"claims shape \(1048576, 1048576, 1024\) of float32 "
                                        r"\(4503599627370496 bytes\), but 16 bytes of data follow it$"):
        load_kernels(path)
    path.write_bytes(lying_npy((64, 64, 64)))  # 1 MiB claimed: within any budget, still a lie
    with pytest.raises(BankError, match=r"truncated or lies.*\(1048576 bytes\), but 16 bytes"):
        load_kernels(str(path))


def test_an_npz_member_claiming_more_than_it_holds_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "liar.npz"
    write_zip(path, {"kernels.npy": lying_npy(HUGE_SHAPE)}, zipfile.ZIP_DEFLATED)
    with pytest.raises(BankError, match=r"liar\.npz' \(array 'kernels'\) is truncated or lies"):
        load_kernels(path)


def test_an_npz_of_thousands_of_members_gives_a_short_line(tmp_path: Path) -> None:
    path = tmp_path / "many.npz"
    one = lying_npy((1, 2, 2), bytes(16))
    write_zip(path, {f"array{i}.npy": one for i in range(3000)})
    with pytest.raises(BankError) as raised:
        load_kernels(path)
    message = str(raised.value)
    assert "holds 3000 arrays (array0, array1, array2, array3, array4, ...); name the bank" in message
    assert len(message) < 300, len(message)


def patched_zip(members: dict[str, bytes], *, method: int | None = None, flags: int | None = None) -> bytes:
    """A stored zip whose local and central headers then claim another compression method or flags."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    data = bytearray(buffer.getvalue())
    for signature, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = data.find(signature)
        if method is not None:
            data[at + method_at : at + method_at + 2] = struct.pack("<H", method)
        if flags is not None:
            data[at + flag_at : at + flag_at + 2] = struct.pack("<H", flags)
    return bytes(data)


@pytest.mark.parametrize(("options", "needle"), [({"method": 98}, "compression method"),
                                                 ({"flags": 1}, "encrypted")], ids=["ppmd", "encrypted"])
def test_an_npz_zipfile_cannot_read_is_one_line(tmp_path: Path, options: dict, needle: str) -> None:
    path = tmp_path / "odd.npz"
    path.write_bytes(patched_zip({"kernels.npy": lying_npy((1, 2, 2))}, **options))
    with pytest.raises(BankError, match=rf"odd\.npz' is not a valid \.npz file: .*{needle}"):
        load_kernels(path)


def test_a_huge_spec_is_refused_from_the_spec_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """64 MB of float32 fit a 100 MB budget, but the float64 arrays a 4000x4000 Gabor kernel is computed
    in do not: refused before any of them is made."""
    monkeypatch.setenv("RMIDL_MEMORY_BUDGET", str(100_000_000))
    with pytest.raises(BudgetExceeded, match=r"gabor:1x4000 needs 832000000 bytes \(the float32 bank and "
                                             r"float64 work arrays\), more than memory_budget=100000000"):
        load_kernels("gabor:1x4000")
    with pytest.raises(BudgetExceeded, match=r"gaussian:5000 needs 100040000 bytes"):
        load_kernels("gaussian:5000")


BUILT = ["random:64x64x64", "random:16x32x32x3:2", "gabor:256x31", "gaussian:1000", "box:1000"]
CAST_BUFFERS = 256 * 1024  # numpy's buffers for a float64 -> float32 assignment (8192 elements an operand)


@pytest.mark.parametrize("spec", BUILT)
def test_builders_allocate_no_more_than_the_budget(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    """With a budget of 1.5x the bank, the builder works in chunks within it (numpy's allocations are
    traced by tracemalloc); main built float64 banks and copies, 2-5x the bank. (A single large Gabor
    kernel needs 12x its size in float64 work, so under such a budget it is refused from its spec.)"""
    nbytes = load_kernels(spec).nbytes
    budget = int(1.5 * nbytes)
    monkeypatch.setenv("RMIDL_MEMORY_BUDGET", str(budget))
    tracemalloc.start()
    try:
        bank = load_kernels(spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bank.nbytes == nbytes
    assert peak <= budget + CAST_BUFFERS, f"{spec}: peak {peak} bytes, budget {budget}"


@pytest.mark.parametrize(("spec", "needle"), [
    ("random:" + "9" * 5000 + "x3x3", "numbers must have at most 15 digits"),
    ("wavelets:" + "x" * 10_000, "unknown kernel bank"),
    ("gabor:3x7:" + "1" * 5000, "sigma 1111"),
], ids=["5000-digit count", "10000-character name", "5000-digit sigma"])
def test_long_specs_give_short_one_line_errors(spec: str, needle: str) -> None:
    with pytest.raises(BankError) as raised:
        load_kernels(spec)
    message = str(raised.value)
    assert needle in message and len(message) < 400 and "\n" not in message, message[:500]


# ---------------------------------------------------------------------------------------------------------
# Decompression bombs: our one-line error, our setting, never Pillow's warning.


def test_a_bomb_is_our_error_and_no_warning(tmp_path: Path) -> None:
    """10000x10000 lies between Pillow's warning (89 M pixels) and its error (179 M): main warned on
    stderr and then tried to decode."""
    bomb = header_only_png(tmp_path / "bomb.png", 10_000, 10_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageReadError, match=r"bomb\.png' is too large to decode safely: 10000x10000 "
                                                 r"\(W x H\) is over image_max_pixels=89478485; raise "
                                                 r"RMIDL_IMAGE_MAX_PIXELS to read it$"):
            load_image(bomb)
    assert [str(w.message) for w in caught] == []


def test_the_pixel_limit_is_our_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = header_only_png(tmp_path / "bomb.png", 10_000, 10_000)
    small = save_image(tmp_path / "small.png", np.zeros((20, 20), np.uint8))
    monkeypatch.setenv("RMIDL_IMAGE_MAX_PIXELS", str(200_000_000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageReadError, match="corrupt or truncated"):  # checked, then decoded
            load_image(bomb)
    assert [str(w.message) for w in caught] == []
    monkeypatch.setenv("RMIDL_IMAGE_MAX_PIXELS", "399")
    with pytest.raises(ImageReadError, match=r"20x20 .* over image_max_pixels=399"):
        load_image(small)
    monkeypatch.setenv("RMIDL_IMAGE_MAX_PIXELS", "400")
    assert load_image(small).shape == (20, 20)


def test_pillows_global_limit_does_not_govern_but_tiff_says_why(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    png = save_image(tmp_path / "a.png", np.zeros((20, 20), np.uint8))
    tiff = save_image(tmp_path / "a.tif", np.zeros((20, 20), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert load_image(png).shape == (20, 20)  # main: Pillow's DecompressionBombError
    with pytest.raises(ImageReadError, match=r"a 20x20 TIFF is over Pillow's own limit "
                                             r"PIL\.Image\.MAX_IMAGE_PIXELS=100"):
        load_image(tiff)


def test_the_cli_prints_one_line_for_a_bomb(tmp_path: Path) -> None:
    bomb = header_only_png(tmp_path / "bomb.png", 10_000, 10_000)
    done = subprocess.run([sys.executable, "-m", "rmidl.client.cli", "run", str(bomb), "--kernels", "sobel"],
                          capture_output=True, text=True, timeout=60, env=child_env(), check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "too large to decode safely" in done.stderr, done.stderr


def test_a_32_bit_integer_tiff_stays_int32_whatever_its_values(tmp_path: Path) -> None:
    """main returned uint16 when the values happened to fit 16 bits: the dtype depended on the data."""
    for values in ([[0, 5], [100, 7]], [[-5, 70_000], [1, 2]]):
        Image.fromarray(np.array(values, np.int32)).save(tmp_path / "a.tif")
        got = load_image(tmp_path / "a.tif")
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, values)
    sixteen = save_image(tmp_path / "a.pgm", np.array([[0, 65535]], np.uint16))  # Pillow opens it as "I"
    assert load_image(sixteen).dtype == np.uint16


# ---------------------------------------------------------------------------------------------------------
# Writes that fail half-way leave the old file whole and no temporary behind.


def half_then_full(*args: object, **kwargs: object) -> None:
    """A writer (numpy's write_array, a Pillow save handler) that writes part of its output to the stream
    it was given, then finds the disk full."""
    stream = next(arg for arg in args if hasattr(arg, "write"))
    stream.write(b"partial data " * 100)  # type: ignore[attr-defined]
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("name", ["maps.npy", "maps.npz"])
def test_run_out_failing_half_way_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     name: str) -> None:
    target = tmp_path / name
    target.write_bytes(b"the previous result")
    monkeypatch.setattr(np.lib.format, "write_array", half_then_full)
    with pytest.raises(InputError, match=rf"^cannot write --out '.*{name}': No space left on device$"):
        save(np.ones((2, 4, 4), np.float32), target)
    assert target.read_bytes() == b"the previous result"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_run_out_writes_whole_files(tmp_path: Path) -> None:
    maps = np.arange(32, dtype=np.float32).reshape(2, 4, 4)
    assert save(maps, tmp_path / "m.npy") == str(tmp_path / "m.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), maps)
    save(maps, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as archive:
        np.testing.assert_array_equal(archive["maps"], maps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npy", "m.npz"]


def test_an_image_write_failing_half_way_keeps_the_old_file(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    target = save_image(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    before = target.read_bytes()
    monkeypatch.setitem(Image.SAVE, "PNG", half_then_full)
    with pytest.raises(InputError, match=r"cannot write image '.*a\.png': No space left on device$"):
        save_image(target, np.ones((4, 4), np.uint8))
    assert target.read_bytes() == before
    with pytest.raises(InputError, match=r"cannot write image '.*map_000\.png': No space left"):
        save_maps(np.ones((2, 4, 4)), tmp_path / "maps")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "maps"]
    assert list((tmp_path / "maps").iterdir()) == []


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs sysfs (no new files, even for root)")
def test_a_directory_nobody_may_write_is_one_line() -> None:
    """Tests run as root, whom chmod does not stop; sysfs refuses new files to everyone."""
    with pytest.raises(InputError, match=r"cannot write --out '/sys/rmidl-probe\.npy': Permission denied$"):
        save(np.ones((1, 2, 2), np.float32), Path("/sys/rmidl-probe.npy"))
    with pytest.raises(InputError, match=r"cannot write image '/sys/rmidl-probe\.png': Permission denied$"):
        save_image("/sys/rmidl-probe.png", np.zeros((2, 2), np.uint8))


# ---------------------------------------------------------------------------------------------------------
# Missing files are FileNotFoundError too (issue 13, item 8), in rmidl's words.


def test_a_missing_file_is_also_a_file_not_found_error(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    for call, kind, path in [(load_image, ImageNotFound, tmp_path / "gone.png"),
                             (load_kernels, BankNotFound, tmp_path / "gone.npy"),
                             (lambda p: load_kernels(str(p)), BankNotFound, tmp_path / "gone.npz")]:
        with pytest.raises(FileNotFoundError) as raised:
            call(path)
        error = raised.value
        assert isinstance(error, kind) and isinstance(error, rmidl.InputError)
        assert error.errno == errno.ENOENT and error.filename == str(path)
        assert str(error).endswith(f"{path.name}' does not exist")  # not "[Errno 2] ..."
    assert main(["run", str(tmp_path / "gone.png"), "--kernels", "sobel"]) == 2
    assert capsys.readouterr().err.strip().endswith("gone.png' does not exist")
