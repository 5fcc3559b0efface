"""Network specs and presets, seeded banks, and save/load of network files (round trips and bad files)."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from rmidl import BankError, InputError, OptionError, ShapeError
from rmidl.network import PRESETS, Network, Stage, load_network, parse_spec, resolve_network


def test_spec_tokens_in_any_order_with_defaults() -> None:
    net = Network.from_spec("3x5x4, 6x3:tanh:avg3s2:same:dw ,2x1x1:max2x3s1x2:linear:full,4x2x2:nopool")
    a, b, c, d = net.stages
    assert (a.bank.shape, a.activation, a.pool, a.pool_size, a.pool_stride, a.mode, a.depthwise) == (
        (3, 5, 4, 1), "relu", "max", (2, 2), None, "valid", False)
    assert (b.bank.shape, b.activation, b.pool, b.pool_size, b.pool_stride, b.mode, b.depthwise) == (
        (6, 3, 3, 1), "tanh", "avg", (3, 3), (2, 2), "same", True)
    assert (c.bank.shape, c.activation, c.pool_size, c.pool_stride, c.mode) == (
        (2, 1, 1, 6), None, (2, 3), (1, 2), "full")
    assert (d.bank.shape, d.pool) == ((4, 2, 2, 2), None)
    # each stage's own spec text parses back to the same settings
    again = Network.from_spec(",".join(stage.spec() for stage in net.stages))
    assert [s.settings() for s in again.stages] == [s.settings() for s in net.stages]
    assert again.fingerprint == net.fingerprint  # same spec text, same seed: same banks


BAD_SPECS = [
    ("", "empty"),
    ("  ", "empty"),
    ("axb", "'axb' is not a preset (seed004, seed004-full, textures), a network file or a spec"),
    ("3xb", "'3xb' is not a bank size"),
    ("25x11x11:foo", "unknown token 'foo'"),
    ("25x11x11:relu:tanh", "two activation tokens, 'relu' and 'tanh'"),
    ("25x11x11:max2:nopool", "two pool tokens"),
    ("25x11x11:same:full", "two mode tokens"),
    ("0x3x3", "sizes must be >= 1, got 0"),
    ("2x3x3:max0", "sizes must be >= 1, got 0"),
    ("2x3x3:max2s0", "sizes must be >= 1, got 0"),
    ("2x3x3,", "stage 2 ''"),
    ("seed005", "'seed005' is not a preset (seed004, seed004-full, textures), a network file or a spec such "
                "as 25x11x11:relu:max2; did you mean 'seed004'?"),
    ("texture", "did you mean 'textures'?"),
]


@pytest.mark.parametrize(("spec", "text"), BAD_SPECS)
def test_bad_specs_are_one_line_errors_naming_the_stage(spec: str, text: str) -> None:
    with pytest.raises(OptionError) as caught:
        Network.from_spec(spec)
    message = str(caught.value)
    assert text in message and "\n" not in message


def test_square_kernels_and_non_string_specs() -> None:
    assert Network.from_spec("25x11").stages[0].bank.shape == (25, 11, 11, 1)
    with pytest.raises(OptionError, match="must be a string, got int"):
        parse_spec(3)  # type: ignore[arg-type]
    for bad in (-1, 1.5, True):
        with pytest.raises(OptionError, match="seed="):
            Network.from_spec("2x3x3", seed=bad)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="channels=0"):
        Network.from_spec("2x3x3", channels=0)


def test_seeded_banks_are_deterministic_per_stage() -> None:
    net = Network.from_spec("4x3x3,5x3x3", seed=7)
    assert net == Network.from_spec("4x3x3,5x3x3", seed=7)
    assert net != Network.from_spec("4x3x3,5x3x3", seed=8)
    other = Network.from_spec("4x3x3,9x5x5", seed=7)
    np.testing.assert_array_equal(other.stages[0].bank, net.stages[0].bank)  # stage 1 unaffected
    colour = Network.from_spec("4x3x3,5x3x3", seed=7, channels=3)
    assert colour.channels == 3 and colour.stages[0].bank.shape == (4, 3, 3, 3)
    # kernels with std sqrt(2 / fan-in) (ReLU); zero-sum on the image, summing to 1 on rectified maps
    mixed = Network.from_spec("4x3x3,5x3x3:tanh,10x2x2:dw,2x3x3:sigmoid,2x3x3", seed=7)
    for stage, total in zip(mixed.stages, [0, 1, 0, 1, 1], strict=True):
        bank = stage.bank.astype(np.float64)
        fan_in = int(np.prod(bank.shape[1:]))
        gain = np.sqrt(2) if stage.activation == "relu" else 1.0
        np.testing.assert_allclose(bank.sum(axis=(1, 2, 3)), total, atol=1e-5)
        np.testing.assert_allclose(bank.std(axis=(1, 2, 3)), gain / np.sqrt(fan_in), rtol=1e-5)
    assert Network.from_spec("1x1x1:linear").stages[0].bank.item() != 0  # a lone 1x1 weight is kept


def test_presets() -> None:
    assert set(PRESETS) >= {"seed004", "seed004-full"}
    dw, full = Network.from_spec("seed004"), Network.from_spec("SEED004-full")
    for net, depthwise in ((dw, True), (full, False)):
        assert len(net.stages) == 4
        assert all(s.bank.shape[:3] == (25, 11, 11) and s.activation == "relu" and s.pool == "max"
                   and s.pool_size == (2, 2) and s.depthwise is depthwise for s in net.stages)
        assert net.output_shape((200, 200)) == (225,)
    assert full.stages[1].bank.shape == (25, 11, 11, 25) and dw.stages[1].bank.shape == (25, 11, 11, 1)
    assert repr(dw) == "Network('seed004', channels=1)"


@pytest.fixture
def random_net(rng: np.random.Generator) -> Network:
    return Network([Stage(rng.standard_normal((3, 4, 3, 2)), activation="sigmoid", pool="avg",
                          pool_size=(2, 1), pool_stride=(1, 2), mode="same"),
                    Stage(rng.standard_normal((6, 2, 2)), activation=None, pool=None, depthwise=True,
                          mode="full")], channels=2)


def test_save_load_round_trip(tmp_path: Path, random_net: Network, rng: np.random.Generator) -> None:
    path = random_net.save(tmp_path / "net.npz")
    assert path == tmp_path / "net.npz" and os.listdir(tmp_path) == ["net.npz"]  # no temporary left
    loaded = Network.load(path)
    assert loaded == random_net and loaded.channels == 2 and loaded.spec is None
    assert [s.settings() for s in loaded.stages] == [s.settings() for s in random_net.stages]
    images = rng.standard_normal((2, 9, 8, 2)).astype(np.float32)
    np.testing.assert_array_equal(loaded.forward_batch(images), random_net.forward_batch(images))
    with np.load(path, allow_pickle=False) as archive:  # plain arrays and JSON text, nothing pickled
        settings = json.loads(str(archive["settings"]))
        assert settings["format"] == "rmidl.network" and settings["version"] == 1
        assert sorted(archive.files) == ["bank_0", "bank_1", "settings"]


def test_saved_spec_survives_and_resolve_network(tmp_path: Path) -> None:
    net = Network.from_spec("seed004", seed=3)
    path = net.save(tmp_path / "seed.npz")
    assert Network.load(path).spec == "seed004" and Network.load(path) == net
    assert resolve_network(str(path)) == net
    assert resolve_network(path) == net
    assert resolve_network(net) is net
    assert resolve_network("seed004", seed=3) == net
    assert resolve_network("2x3x3", channels=3).channels == 3


def test_a_preset_name_wins_over_a_directory_or_file_of_that_name(tmp_path: Path, monkeypatch) -> None:
    # `rmidl.datasets.make_textures("textures")` then `--net textures` in the same directory: the preset
    monkeypatch.chdir(tmp_path)
    (tmp_path / "textures").mkdir()
    (tmp_path / "seed004").write_bytes(b"not a network")
    assert resolve_network("textures") == Network.from_spec("textures")
    assert resolve_network("seed004") == Network.from_spec("seed004")
    saved = Network.from_spec("2x3x3", seed=1).save(tmp_path / "mine.npz")
    saved.rename(tmp_path / "mine")  # an existing file under a name that is not a preset: the file
    assert resolve_network("mine") == Network.from_spec("2x3x3", seed=1)


def _archive(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with path.open("wb") as handle:
        np.savez(handle, **arrays)
    return path


def _settings(**changes: object) -> np.ndarray:
    settings: dict[str, object] = {"format": "rmidl.network", "version": 1, "channels": 1, "spec": None,
                                   "stages": [{"activation": "relu", "pool": "max", "pool_size": [2, 2],
                                               "pool_stride": None, "mode": "valid", "depthwise": False}]}
    settings.update(changes)
    return np.array(json.dumps(settings))


def test_the_hand_written_archive_loads(tmp_path: Path) -> None:
    bank = np.ones((2, 3, 3, 1), np.float32)
    net = load_network(_archive(tmp_path / "ok.npz", {"settings": _settings(), "bank_0": bank}))
    np.testing.assert_array_equal(net.stages[0].bank, bank)


def _bad_files(tmp_path: Path) -> list[tuple[Path, type, str]]:
    good = Network.from_spec("2x3x3").save(tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.npz").write_text("hello\n")
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "single.npy", np.ones(3))
    os.mkfifo(tmp_path / "fifo.npz")
    (tmp_path / "folder.npz").mkdir()
    bank = np.ones((2, 3, 3, 1), np.float32)
    cases = [
        ("truncated.npz", InputError, "truncated or foreign"),
        ("text.npz", InputError, "not an rmidl network file"),
        ("empty.npz", InputError, "not an rmidl network file"),
        ("single.npy", InputError, "single array"),
        ("fifo.npz", InputError, "is a FIFO (named pipe), not a regular file"),
        ("folder.npz", InputError, "is a directory"),
        ("missing.npz", InputError, "does not exist"),
    ]
    archives = {
        "foreign.npz": ({"images": np.ones((2, 3))}, InputError, "lacks array 'settings'"),
        "nojson.npz": ({"settings": np.array("{"), "bank_0": bank}, InputError, "unreadable settings"),
        "number.npz": ({"settings": np.ones(3), "bank_0": bank}, InputError, "not JSON text"),
        "format.npz": ({"settings": _settings(format="other"), "bank_0": bank}, InputError, "format is not"),
        "version.npz": ({"settings": _settings(version=99), "bank_0": bank}, InputError, "version 99"),
        "nostages.npz": ({"settings": _settings(stages=[])}, InputError, "lists no stages"),
        "nobank.npz": ({"settings": _settings()}, InputError, "lacks array 'bank_0'"),
        "unknown.npz": ({"settings": _settings(stages=[{"colour": 1}]), "bank_0": bank}, InputError,
                        "unknown settings ['colour']"),
        "badopt.npz": ({"settings": _settings(stages=[{"mode": "wrap"}]), "bank_0": bank}, OptionError,
                       "mode 'wrap'"),
        "nan.npz": ({"settings": _settings(), "bank_0": np.full((2, 3, 3, 1), np.nan)}, BankError, "NaN"),
        "chain.npz": ({"settings": _settings(channels=3), "bank_0": bank}, ShapeError, "channel"),
    }
    for name, (arrays, error, text) in archives.items():
        _archive(tmp_path / name, arrays)
        cases.append((name, error, text))
    pickled = tmp_path / "pickled.npz"
    with pickled.open("wb") as handle:
        np.savez(handle, settings=np.array([{"format": "rmidl.network"}], dtype=object), bank_0=bank)
    cases.append(("pickled.npz", InputError, "pickled data, which rmidl never loads"))
    return [(tmp_path / name, error, text) for name, error, text in cases]


def test_bad_network_files_are_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    cases = _bad_files(tmp_path)
    assert len(cases) > 15
    for path, error, text in cases:
        with pytest.raises(error) as caught:
            Network.load(path)
        message = str(caught.value)
        assert text in message, (path.name, message)
        assert str(path) in message and "\n" not in message, message


def test_write_failure_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot write network file"):
        Network.from_spec("2x3x3").save(tmp_path / "no" / "such" / "dir.npz")
    assert zipfile.is_zipfile(Network.from_spec("2x3x3").save(tmp_path / "plain"))  # no suffix added
