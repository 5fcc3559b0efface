"""The records of a scaling study and their results.json form: what ran, on which machine, how long."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from rmidl.config import Config
from rmidl.errors import RmidlError
from rmidl.geometry import output_shape

__all__ = [
    "MAX_RESULTS_BYTES",
    "SCHEMA",
    "Configuration",
    "ConfigurationResult",
    "Job",
    "StudyResult",
    "StudySettings",
    "job_of",
]

SCHEMA = 1
"""Version of the results.json layout; bump when a key changes meaning."""

MAX_RESULTS_BYTES = 16 << 20
"""Largest results.json `rmidl bench --from` reads (a study of hundreds of configurations is under 1 MiB)."""


@dataclass(frozen=True)
class Configuration:
    """One column of Table III: `kind` "cores" (engine alone), "workers" (a local cluster through the
    coordinator) or "cluster" (the workers of the name server given with --ns: the first `count` in name
    order, or all of them when `count` is 0)."""

    kind: str
    count: int
    threads: int
    label: str
    oversubscribed: bool = False


@dataclass
class ConfigurationResult:
    """Every timed run of one configuration, and how its output compared with the reference."""

    config: Configuration
    times: list[float] = field(default_factory=list)
    setup_seconds: float = 0.0
    warmup_times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    max_abs_error: float = 0.0
    tolerance: float = 0.0
    verified: bool = False
    failure: str | None = None

    @property
    def counted(self) -> bool:
        """True when the timings may enter the tables (checked and complete)."""
        return self.verified and self.failure is None and bool(self.times)

    @property
    def total(self) -> float:
        return float(sum(self.times))

    @property
    def average(self) -> float:
        return self.total / len(self.times) if self.times else float("nan")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(total=self.total, average=self.average if self.times else None, counted=self.counted)
        if self.times:
            data.update(minimum=min(self.times), maximum=max(self.times), median=float(np.median(self.times)))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConfigurationResult:
        return cls(
            config=Configuration(**data["config"]),
            times=[float(t) for t in data["times"]],
            setup_seconds=float(data.get("setup_seconds", 0.0)),
            warmup_times=[float(t) for t in data.get("warmup_times", [])],
            cpu_times=[float(t) for t in data.get("cpu_times", [])],
            details=dict(data.get("details") or {}),
            max_abs_error=float(data.get("max_abs_error", 0.0)),
            tolerance=float(data.get("tolerance", 0.0)),
            verified=bool(data.get("verified", False)),
            failure=data.get("failure"),
        )


@dataclass(frozen=True)
class Job:
    """What is computed: shapes, mode, and the work and bytes that follow from them."""

    image_shape: tuple[int, ...]
    kernels_shape: tuple[int, ...]
    mode: str
    dtype: str
    image_source: str = "array"
    kernels_source: str = "array"

    @property
    def out_shape(self) -> tuple[int, int, int]:
        h, w = self.image_shape[:2]
        k, kh, kw = self.kernels_shape[:3]
        return (k, *output_shape((h, w), (kh, kw), self.mode))

    @property
    def channels(self) -> int:
        return self.image_shape[2] if len(self.image_shape) == 3 else 1

    @property
    def flops(self) -> float:
        """Multiply-adds counted as 2 flops: 2·K·OH·OW·kh·kw·C (27.93 GFLOP for the paper's job)."""
        k, oh, ow = self.out_shape
        kh, kw = self.kernels_shape[1:3]
        return 2.0 * k * oh * ow * kh * kw * self.channels

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def input_bytes(self) -> int:
        return int(np.prod(self.image_shape)) * self.itemsize

    @property
    def bank_bytes(self) -> int:
        return int(np.prod(self.kernels_shape)) * self.itemsize

    @property
    def output_bytes(self) -> int:
        return int(np.prod(self.out_shape)) * self.itemsize

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            out_shape=list(self.out_shape),
            flops=self.flops,
            input_bytes=self.input_bytes,
            bank_bytes=self.bank_bytes,
            output_bytes=self.output_bytes,
        )
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(
            image_shape=tuple(data["image_shape"]),
            kernels_shape=tuple(data["kernels_shape"]),
            mode=data["mode"],
            dtype=data["dtype"],
            image_source=data.get("image_source", "array"),
            kernels_source=data.get("kernels_source", "array"),
        )


@dataclass(frozen=True)
class StudySettings:
    """How the study runs; the CLI builds one from its options."""

    cores: tuple[int, ...] = (1, 2, 4, 8)
    workers: tuple[int, ...] = ()
    runs: int = 10
    warmup: int = 1
    mode: str = "valid"
    threads_per_worker: int = 1
    local_threads: int = 0
    shared_memory: bool = True
    ns: str | None = None
    config: Config | None = field(default=None, repr=False, compare=False)
    """How to reach --ns (its secret); never written to results.json."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("config")
        data.update(cores=list(self.cores), workers=list(self.workers))
        return data


@dataclass
class StudyResult:
    """Everything results.json holds: machine, job, settings, reference run and every timing."""

    machine: dict[str, Any]
    job: Job
    settings: dict[str, Any]
    reference_seconds: float
    results: list[ConfigurationResult]
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat("T", "seconds"))
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[ConfigurationResult]:
        return [r for r in self.results if not r.counted]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "created": self.created,
            "machine": self.machine,
            "job": self.job.to_dict(),
            "settings": self.settings,
            "reference": {"threads": 1, "seconds": self.reference_seconds},
            "configurations": [r.to_dict() for r in self.results],
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyResult:
        if data.get("schema") != SCHEMA:
            raise RmidlError(f"results.json schema {data.get('schema')!r} is not {SCHEMA}")
        known = {"schema", "created", "machine", "job", "settings", "reference", "configurations"}
        return cls(
            machine=data["machine"],
            job=Job.from_dict(data["job"]),
            settings=data["settings"],
            reference_seconds=float(data["reference"]["seconds"]),
            results=[ConfigurationResult.from_dict(c) for c in data["configurations"]],
            created=data.get("created", ""),
            extra={k: v for k, v in data.items() if k not in known},
        )


def job_of(
    image: np.ndarray,
    kernels: np.ndarray,
    mode: str,
    *,
    image_source: str = "array",
    kernels_source: str = "array",
) -> Job:
    """The Job record of canonical arrays (as `rmidl.validate.prepare` returns them)."""
    return Job(tuple(image.shape), tuple(kernels.shape), mode, str(image.dtype), image_source, kernels_source)
