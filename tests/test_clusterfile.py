"""Cluster files: private, atomic, found while their cluster runs, cleaned when it is gone, refused when
another user could have read or written them; and what `Coordinator()` is to call."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rmidl.config import Config
from rmidl.errors import ConfigError, RegistryError
from rmidl.remote import clusterfile


def test_write_then_find_and_read(private_cluster_files: Path) -> None:
    secret = clusterfile.new_secret()
    assert len(secret) >= 40 and secret != clusterfile.new_secret()
    path = clusterfile.write("127.0.0.1:40123", secret, workers=2)
    assert path == private_cluster_files / f"{os.getpid()}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(private_cluster_files.stat().st_mode) == 0o700
    assert [p.name for p in private_cluster_files.iterdir()] == [path.name], "a temporary file was left"
    (found,) = clusterfile.find()
    assert (found.address, found.secret, found.pid) == ("127.0.0.1:40123", secret, os.getpid())
    assert found.workers == 2
    assert secret not in repr(found) and "127.0.0.1:40123" in repr(found)
    address, config = clusterfile.find_local_cluster(Config(environ={}, memory_budget=12345))
    assert (address, config.secret, config.memory_budget) == ("127.0.0.1:40123", secret, 12345)
    assert clusterfile.secret_for("127.0.0.1:40123") == secret
    assert clusterfile.secret_for("127.0.0.1:1") is None
    clusterfile.remove(path)
    clusterfile.remove(path)  # gone already is fine
    assert clusterfile.find() == [] and clusterfile.find_local_cluster() is None


def test_newest_cluster_first(private_cluster_files: Path) -> None:
    clusterfile.write("127.0.0.1:1111", "s" * 20)
    parent = clusterfile.write("127.0.0.1:2222", "t" * 20, pid=os.getppid())
    assert [c.address for c in clusterfile.find()] == ["127.0.0.1:2222", "127.0.0.1:1111"]
    assert clusterfile.require().path == parent


def test_the_file_of_a_dead_process_is_stale_and_removed(private_cluster_files: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True, timeout=30)
    dead = clusterfile.write("127.0.0.1:3333", "u" * 20, pid=int(done.stdout))
    assert clusterfile.find() == [] and not dead.exists()


def test_a_pid_taken_over_by_a_newer_process_is_stale(private_cluster_files: Path) -> None:
    """This process started after the file says its cluster did: the pid is not that cluster's."""
    path = clusterfile.write("127.0.0.1:4444", "v" * 20)
    record = json.loads(path.read_text())
    record["started"] = 1000.0  # 1970: long before this process (or this boot)
    path.write_text(json.dumps(record))
    path.chmod(0o600)
    assert clusterfile.find() == [] and not path.exists()


def test_a_file_others_may_read_is_refused(private_cluster_files: Path) -> None:
    path = clusterfile.write("127.0.0.1:5555", "w" * 20)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"may be read by other users \(mode 0644\): refusing"):
        clusterfile.find()
    with pytest.raises(ConfigError, match="refusing"):
        clusterfile.read(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_file_of_another_user_is_refused(private_cluster_files: Path) -> None:
    path = clusterfile.write("127.0.0.1:6666", "x" * 20)
    os.chown(path, 4242, -1)
    with pytest.raises(ConfigError, match=r"belongs to another user \(uid 4242\)"):
        clusterfile.read(path)


def test_a_directory_open_to_others_is_made_private_again(private_cluster_files: Path) -> None:
    private_cluster_files.mkdir(mode=0o755)
    private_cluster_files.chmod(0o755)
    clusterfile.write("127.0.0.1:7777", "y" * 20)
    assert stat.S_IMODE(private_cluster_files.stat().st_mode) == 0o700


def test_files_that_are_no_cluster_files_are_refused(private_cluster_files: Path) -> None:
    private_cluster_files.mkdir(mode=0o700)
    for text, why in (("{not json", "is not a cluster file"), ('{"format": 99}', "has format 99"),
                      ('{"format": 1, "address": "a:1"}', "is not a cluster file")):
        path = private_cluster_files / "1.json"
        path.write_text(text)
        path.chmod(0o600)
        with pytest.raises(ConfigError, match=why):
            clusterfile.read(path)


def test_where_files_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RMIDL_CLUSTER_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert clusterfile.cluster_directory() == runtime / "rmidl"
    runtime.chmod(0o755)  # not private: a runtime directory others may list is not used
    assert clusterfile.cluster_directory() == tmp_path / "home" / ".cache" / "rmidl"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert clusterfile.cluster_directory() == tmp_path / "home" / ".cache" / "rmidl"
    chosen = Config(environ={}, cluster_dir=str(tmp_path / "x"))
    assert clusterfile.cluster_directory(chosen) == tmp_path / "x"


def test_none_running_is_one_clear_error(private_cluster_files: Path) -> None:
    with pytest.raises(RegistryError, match=r"no local cluster is running .*start one with `rmidl up`"):
        clusterfile.require()
