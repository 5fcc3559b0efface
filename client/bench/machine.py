"""What machine a study ran on, for results.json and the tables' notes: CPU, cores, BLAS, versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

from rmidl.kernels import available_cores

__all__ = ["machine_info"]


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
