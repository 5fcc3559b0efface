"""Cluster files: how `rmidl up` tells the same user's later commands (and `Coordinator()`) where its
name server is and which secret its daemons want, so they need no `--ns` and no secret typed, while
other local users can read neither.

One JSON file per running cluster, `<pid>.json`, in `$XDG_RUNTIME_DIR/rmidl/` when that is set and
private, else `~/.cache/rmidl/` (or only in RMIDL_CLUSTER_DIR when set); the directory is 0700 and
each file 0600, written atomically. A file
whose process is gone is stale: it is ignored and removed. A file another user owns, or that others
may read, is refused: its secret is not a secret any more.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from rmidl._files import atomic_write, read_small, shown
from rmidl.config import Config
from rmidl.errors import ConfigError, RegistryError

__all__ = [
    "LOCAL",
    "ClusterFile",
    "Resolved",
    "cluster_directory",
    "find",
    "find_local_cluster",
    "new_secret",
    "read",
    "remove",
    "require",
    "resolve",
    "secret_for",
    "write",
]

logger = logging.getLogger(__name__)

FORMAT = 1
"""Version of the file's layout; a file of another version is refused with a message saying so."""
MAX_BYTES = 16 * 1024
_PRIVATE = 0o700
_SECRET_BYTES = 32
LOCAL = "local"
"""The address that means "the running local cluster of this user, from its cluster file"."""


@dataclass(frozen=True)
class ClusterFile:
    """A running local cluster as its cluster file describes it."""

    path: Path
    address: str
    """The name server's HOST:PORT, as `--ns` takes it."""
    secret: str
    pid: int
    """The process that wrote the file (`rmidl up`, or `rmidl ns --cluster-file`) and removes it on exit."""
    started: float
    """When it was written (seconds since the epoch)."""
    workers: int | None = None
    """How many workers `rmidl up` started (None: a bare name server)."""

    def config(self, base: Config | None = None) -> Config:
        """`base` (default: Config() from RMIDL_* variables) with this cluster's secret."""
        return (base or Config()).replace(secret=self.secret)

    def describe(self) -> str:
        """'local cluster 127.0.0.1:40123 (2 workers, pid 4242, /run/user/1000/rmidl/4242.json)'."""
        count = self.workers
        what = "" if count is None else f"{count} worker{'s' if count != 1 else ''}, "
        return f"local cluster {self.address} ({what}pid {self.pid}, {self.path})"

    def __repr__(self) -> str:  # never the secret
        return f"ClusterFile({self.describe()})"


def new_secret() -> str:
    """A fresh cluster secret: 32 random bytes, URL-safe text (no newline, no shell metacharacters)."""
    return secrets.token_urlsafe(_SECRET_BYTES)


def _private_dir(path: Path) -> bool:
    try:
        info = path.stat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077


def _directories(config: Config | None = None) -> list[Path]:
    """Where cluster files may be, the one new files go to first."""
    chosen = (config or Config()).cluster_dir
    if chosen:
        return [Path(chosen).expanduser()]
    found = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_absolute() and _private_dir(Path(runtime)):
        found.append(Path(runtime) / "rmidl")
    found.append(Path.home() / ".cache" / "rmidl")
    return found


def cluster_directory(config: Config | None = None) -> Path:
    """The directory new cluster files go to: `config.cluster_dir` (RMIDL_CLUSTER_DIR) if set, else
    `$XDG_RUNTIME_DIR/rmidl` if that is set and private (ours, mode 0700, as systemd makes it), else
    `~/.cache/rmidl`."""
    return _directories(config)[0]


def _make_private(directory: Path) -> None:
    """Create `directory` 0700 (parents as the umask says); tighten it if it is ours but open to others."""
    try:
        directory.mkdir(mode=_PRIVATE, parents=True, exist_ok=True)
        info = directory.lstat()
    except OSError as error:
        raise ConfigError(f"cannot create cluster directory {shown(directory)}: {error.strerror or error}") \
            from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise ConfigError(f"cluster directory {shown(directory)} is not a directory of this user; "
                          "remove it or set XDG_RUNTIME_DIR")
    if info.st_mode & 0o077:
        os.chmod(directory, _PRIVATE)


def write(address: str, secret: str, *, workers: int | None = None, pid: int | None = None,
          config: Config | None = None) -> Path:
    """Write the cluster file of the name server at `address` (this process's unless `pid`) into
    `cluster_directory(config)`; return its path. Mode 0600 from the first byte, replaced atomically;
    the caller removes it on exit (`remove`)."""
    folder = cluster_directory(config)
    _make_private(folder)
    pid = os.getpid() if pid is None else pid
    path = folder / f"{pid}.json"
    record = {"format": FORMAT, "address": address, "secret": secret, "pid": pid, "started": time.time(),
              "workers": workers}
    with atomic_write(path, f"cluster file {shown(path)}", ConfigError) as handle:
        os.fchmod(handle.fileno(), 0o600)  # before the secret is in it
        handle.write((json.dumps(record, indent=1) + "\n").encode("utf-8"))
    logger.info("wrote cluster file %s for %s", path, address)
    return path


def remove(path: str | os.PathLike[str]) -> None:
    """Remove a cluster file (gone already is fine)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        logger.warning("could not remove cluster file %s: %s", path, error.strerror or error)


def read(path: str | os.PathLike[str]) -> ClusterFile:
    """The cluster a file describes; ConfigError if another user owns it, others may read it, or it is
    not a cluster file of this version."""
    where = f"cluster file {shown(path)}"
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist") from None
    except OSError as error:
        raise ConfigError(f"cannot read {where}: {error.strerror or error}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{where} is not a regular file: refusing it")
    if info.st_uid != os.geteuid():
        raise ConfigError(f"{where} belongs to another user (uid {info.st_uid}): refusing it")
    if info.st_mode & 0o077:
        raise ConfigError(f"{where} may be read by other users (mode {stat.S_IMODE(info.st_mode):04o}): "
                          "refusing its secret; remove the file and restart the cluster")
    try:
        data = json.loads(read_small(path, where, MAX_BYTES, ConfigError))
        if data.get("format") != FORMAT:
            raise ConfigError(f"{where} has format {data.get('format')!r}, this rmidl reads {FORMAT}")
        workers = data.get("workers")
        return ClusterFile(Path(path), str(data["address"]), str(data["secret"]), int(data["pid"]),
                           float(data["started"]), None if workers is None else int(workers))
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ConfigError(f"{where} is not a cluster file ({type(error).__name__}: {error})") from None


def _process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc; None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="ascii") as machine:
            booted = next(int(line.split()[1]) for line in machine if line.startswith("btime "))
        return booted + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _running(cluster: ClusterFile) -> bool:
    """True while the process that wrote the file lives: its pid exists, is ours, and started before the
    file was written (a pid taken over later, or after a reboot, is not the cluster's)."""
    try:
        os.kill(cluster.pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or another user's process has the pid now
        return False
    start = _process_start(cluster.pid)
    return start is None or start <= cluster.started + 1.0


def find(config: Config | None = None) -> list[ClusterFile]:
    """The running local clusters of this user, newest first; stale files (their process gone) are
    removed. A file that must be refused raises ConfigError."""
    found: dict[Path, ClusterFile] = {}
    for folder in _directories(config):
        if not _private_dir(folder):
            continue  # absent, or not ours and private: nothing in it can be trusted
        for path in sorted(folder.glob("*.json")):
            cluster = read(path)
            if _running(cluster):
                found[path.resolve()] = cluster
            else:
                logger.info("removing stale cluster file %s (pid %d is gone)", path, cluster.pid)
                remove(path)
    return sorted(found.values(), key=lambda c: c.started, reverse=True)


def require(config: Config | None = None) -> ClusterFile:
    """The newest running local cluster; RegistryError saying how to start one if none is running."""
    running = find(config)
    if not running:
        where = " or ".join(str(folder) for folder in _directories(config))
        raise RegistryError(f"no local cluster is running (no cluster file in {where}): start one with "
                            "`rmidl up`, or give --ns HOST:PORT")
    return running[0]


def find_local_cluster(config: Config | None = None) -> tuple[str, Config] | None:
    """(name server address, `config` with the cluster's secret) of the newest running local cluster of
    this user, or None when none runs. What `Coordinator()` without an address is meant to use."""
    running = find(config)
    if not running:
        return None
    return running[0].address, running[0].config(config)


def secret_for(address: str, config: Config | None = None) -> str | None:
    """The secret of the running local cluster whose name server is `address`, if one is."""
    for cluster in find(config):
        if cluster.address == address:
            return cluster.secret
    return None


@dataclass(frozen=True)
class Resolved:
    """Where a client goes: a name server (None: no cluster, this process only) and the settings to reach
    it, with what to tell the user about the choice when it was not given as HOST:PORT."""

    ns: str | None
    config: Config
    note: str | None = None


def resolve(ns: str | None, config: Config, *, auto: bool, explicit_secret: bool = False,
            fallback: str | None = None) -> Resolved:
    """The one rule every client follows (the CLI's `--ns`, `Coordinator(ns=...)`).

    HOST:PORT is used as given; when no secret is configured and it is a local cluster's address, that
    cluster's secret is borrowed. `local` is the newest running local cluster (RegistryError when none
    runs). None with `auto` means the same when one runs, else no cluster (`fallback` says what happens
    then, for the note; without a fallback, none running is a RegistryError). None without `auto`: no
    cluster. A secret given explicitly wins over the cluster file's.
    """
    if ns is not None and ns != LOCAL:
        if not config.secret:
            try:
                secret = secret_for(ns, config)
            except ConfigError as error:  # a refused cluster file must not stop an explicit address
                logger.warning("%s", error)
                secret = None
            if secret:
                logger.info("using the secret of the local cluster at %s", ns)
                config = config.replace(secret=secret)
        return Resolved(ns, config)
    if ns is None and (not auto or (fallback is not None and not find(config))):
        note = None if not auto else f"no local cluster is running (`rmidl up` starts one): {fallback}"
        return Resolved(None, config, note)
    cluster = require(config)
    return Resolved(cluster.address, config if explicit_secret else cluster.config(config),
                    f"using {cluster.describe()}")
