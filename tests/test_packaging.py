"""The package as users install it: a wheel with the licence, the SPDX licence expression and py.typed,
whose types a user's mypy run sees, and whose `python -m rmidl` is the command line."""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (the build leaves nothing in the checkout)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for name in ("rmidl", "server", "client"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"),
                           str(source)], capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0 and "No matching distribution" in done.stderr + done.stdout:
        pytest.skip(f"no build backend could be fetched: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr
    (built,) = (work / "dist").glob("rmidl-*.whl")
    return built


def test_the_wheel_carries_licence_types_and_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(info))
    assert {"rmidl/py.typed", "rmidl/__main__.py", "rmidl/data/default.png",
            "rmidl/client/dashboard/page.html"} <= names  # the status page ships with the code
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert metadata["License-Expression"] == "MIT"
    assert "Typing :: Typed" in metadata.get_all("Classifier")
    assert not any(n.startswith(("client/", "server/")) for n in names), "shipped as top-level packages"
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Copyright (c) 2026 rmidl developers" in licence


def test_pyproject_declares_the_licence_as_spdx_and_bounds_setuptools() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT" and project["project"]["license-files"] == ["LICENSE"]
    (setuptools,) = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    assert ">=77" in setuptools and "<" in setuptools


def test_a_users_mypy_sees_rmidls_types(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    script = tmp_path / "user.py"
    script.write_text("import rmidl\nfrom rmidl.client import LocalCluster\n"
                      "reveal_type(rmidl.__version__)\nreveal_type(LocalCluster.address)\n"
                      "count: int = rmidl.load_kernels('sobel')\n")
    env = {**os.environ, "PYTHONPATH": str(site), "MYPY_CACHE_DIR": str(tmp_path / "cache")}

    def mypy() -> str:
        done = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--no-incremental",
                               "--config-file", os.devnull, str(script)], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env=env, check=False)
        return done.stdout

    seen = mypy()
    assert "py.typed" not in seen and "library stubs" not in seen, seen
    assert re.search(r'Revealed type is "(builtins\.)?str"', seen), seen
    assert "Incompatible types in assignment" in seen and "ndarray" in seen, seen
    (site / "rmidl" / "py.typed").unlink()  # the check can fail: without the marker mypy sees no types
    assert "py.typed marker" in mypy()
    version = subprocess.run([sys.executable, "-m", "rmidl", "--version"], capture_output=True, text=True,
                             timeout=60, env=env, cwd=tmp_path, check=False)
    assert version.returncode == 0 and version.stdout.startswith("rmidl "), version.stderr
