"""What machine a study ran on, for results.json and the tables' notes: CPU, cores, BLAS, versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import threading
import time
from typing import Any

from rmidl.kernels import available_cores

__all__ = ["machine_info", "wait_for_quiet_threads"]


def _cpu_model_and_physical_cores() -> tuple[str, int | None]:
    model, cores = "", set()
    physical = "0"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and not model:
                    model = value
                elif key == "physical id":
                    physical = value
                elif key == "core id":
                    cores.add((physical, value))
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), len(cores) or None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, BLAS kernel (threadpoolctl) and library versions of this machine."""
    from threadpoolctl import threadpool_info

    model, physical = _cpu_model_and_physical_cores()
    blas = [
        {
            "library": pool.get("internal_api"),
            "architecture": pool.get("architecture"),
            "version": pool.get("version"),
            "threads": pool.get("num_threads"),
            "file": os.path.basename(pool.get("filepath", "")),
        }
        for pool in threadpool_info()
        if pool.get("user_api") == "blas"
    ]
    versions = {
        name: _version(name)
        for name in ("rmidl", "numpy", "scipy", "Pyro5", "threadpoolctl", "matplotlib", "msgpack")
    }
    versions["python"] = platform.python_version()
    return {
        "cpu_model": model,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "usable_cores": available_cores(),
        "blas": blas,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "versions": versions,
    }


QUIET_POLLS = 3
"""Polls in a row (2 ms apart) that must see no other thread of the process running."""


def wait_for_quiet_threads(timeout: float = 2.0) -> bool:
    """Wait until no other thread of this process is running; False on timeout or without /proc.

    OpenBLAS and OpenMP helpers spin for up to ~0.2 s after a parallel call (SGEMM, torch), taking a
    core from whatever is timed next: measured, 0.108 s of the reference job became 0.137 s.
    """
    own = threading.get_native_id()
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline:
        try:
            busy = any(_running(task) for task in os.listdir("/proc/self/task") if int(task) != own)
        except OSError:
            return False
        quiet = 0 if busy else quiet + 1
        if quiet >= QUIET_POLLS:
            return True
        time.sleep(0.002)  # a polling interval: /proc has nothing to block on
    return False


def _running(task: str) -> bool:
    try:
        with open(f"/proc/self/task/{task}/stat", encoding="ascii") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "R"
    except (OSError, IndexError):
        return False  # the thread ended while we looked
