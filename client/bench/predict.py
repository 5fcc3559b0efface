"""A cost model calibrated from a scaling study, to predict N nodes x C cores over a link we cannot measure.

The model (stated once, used everywhere):
- every measured configuration enters as its median run (noise on a shared machine only adds time).
- compute: Amdahl on this machine's per-core rate, T(p) = T1 * (s + (1 - s) / p) with p cores in all,
  T1 = flops / rate; the rate and serial fraction s are fitted (least squares on relative error) to the
  core-count runs, with p capped at the usable cores (oversubscription adds no cores).
- data plane (measured configurations through the coordinator): T = T(p) + bytes moved / bandwidth, the
  bandwidth fitted to the worker runs.
- N nodes: the coordinator is one of them and computes its share; the other (N - 1) / N of the output
  crosses its link (gather) and their inputs go out over it (scatter). Transfers overlap compute and
  each other (full duplex), so T = max(compute, scatter, gather) + one task's transfer (pipeline fill).
- tasks: as many as the coordinator's planner would cut (`rmidl.client.cost.balanced_tasks`: tasks per
  core, but each at least a few round trips long, and none with a result over MAX_TASK_BYTES), the same
  cost model the planner and deadlines read.
- row bands send each remote node its band plus a (kh - 1)-row halo per task and the whole bank;
  kernel groups send each remote node the whole image and its share of the bank, and cannot use more
  nodes than kernels. Both gather the same output. The cheaper one is marked.
- keeping the maps on the nodes (the feature pipeline's choice): the same job, but what crosses the
  coordinator's link back is only what the next stage needs, the maps pooled `pool` x `pool` (the paper's
  network pools 2x2: a quarter of the maps' bytes), and each node also activates and pools its maps: the
  study's measured one-core seconds for that (relu and a 2x2 max pool of the job's maps) are added to the
  compute, spread over the cores like it.
- a dataset of images like this one: whole images are the tasks (no halo; the bank goes once) taken from
  the pull queue, so in the steady state the coordinator's node computes images at its own rate and the
  other N - 1 as fast as their cores or the coordinator's link allow, whichever is less (an image's input
  out and its result back at once, full duplex). Reported as images per second, with the maps gathered
  and with only pooled features gathered.
- `coordinator_computes=False` (a coordinator with no local threads, as `scripts/bench_netns.py` runs
  it): N remote nodes, everything crosses the coordinator's link.
The model's error on the configurations that were measured is reported beside every prediction.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from rmidl.client.bench.results import ConfigurationResult, StudyResult
from rmidl.client.cost import MAX_TASK_BYTES, ROUND_TRIP_S, balanced_tasks
from rmidl.errors import OptionError
from rmidl.geometry import halo, mode_padding

__all__ = [
    "FEATURE_POOL",
    "LINK_EFFICIENCY",
    "Calibration",
    "Prediction",
    "calibrate",
    "modelled_seconds",
    "parse_link",
    "predict",
    "predict_many",
]

logger = logging.getLogger(__name__)

LINK_EFFICIENCY = 0.94
"""TCP payload over Ethernet line rate with a 1500-byte MTU (1448 / 1538 bytes per frame)."""
FEATURE_POOL = 2
"""Pooling window of the features the nodes ship when they keep their maps (the paper's network: 2x2)."""


_LINK = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(bit|bit/s|bps|b|B|B/s|Bps|gbe)\s*$", re.IGNORECASE)
_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_link(text: str) -> tuple[str, float]:
    """'1Gbit', '10Gbit', '25Gbit', '100Mbit', '1.25GB/s' -> (label, payload bytes per second)."""
    match = _LINK.match(text)
    if not match:
        raise OptionError(f"link {text!r} is not a rate such as 1Gbit, 10Gbit, 25Gbit, 100Mbit or 1.25GB/s")
    number, prefix, unit = float(match[1]), match[2].lower(), match[3]
    if number <= 0:
        raise OptionError(f"link {text!r} must be a positive rate")
    if unit.lower() == "gbe":  # "10GbE": the number is in Gbit/s
        prefix, unit = "g", "bit"
    in_bytes = unit in ("B", "B/s", "Bps")
    rate = number * _PREFIX[prefix] * (1.0 if in_bytes else 1 / 8)
    # a byte rate is taken as payload already; a line rate loses the framing overhead
    return text.strip(), rate if in_bytes else rate * LINK_EFFICIENCY


@dataclass
class Calibration:
    """The model's parameters as fitted to one study, and how well it reproduces that study."""

    flops: float
    rate_per_core: float
    serial_fraction: float
    usable_cores: int
    dataplane_bandwidth: float | None
    dataplane_path: str | None
    input_bytes: int
    bank_bytes: int
    output_bytes: int
    n_kernels: int
    out_h: int
    halo_row_bytes: int
    measured_bytes_per_task: float | None = None
    fit: list[dict[str, Any]] = field(default_factory=list)
    stage_seconds: float = 0.0
    """One core's seconds to activate and pool one image's maps into features (0: not measured)."""

    @property
    def single_core_seconds(self) -> float:
        return self.flops / self.rate_per_core

    @property
    def stated_error(self) -> float:
        """Largest |predicted - measured| / measured over the measured configurations (0 if none)."""
        return max((abs(p["relative_error"]) for p in self.fit), default=0.0)

    @property
    def mean_error(self) -> float:
        return float(np.mean([abs(p["relative_error"]) for p in self.fit])) if self.fit else 0.0

    def bytes_per_task(self, nodes: int, cores: int) -> float:
        """Average bytes a row-band task moves (its input band with halo, its output slab)."""
        tasks = _tasks(self, nodes, cores)
        return (self.input_bytes + tasks * self.halo_row_bytes + self.output_bytes) / tasks

    def compute_seconds(self, cores: float, *, features: bool = False) -> float:
        """The job's compute on `cores` cores; `features`: with its maps activated and pooled too."""
        s = self.serial_fraction
        stage = self.stage_seconds / max(cores, 1.0) if features else 0.0
        return self.single_core_seconds * (s + (1.0 - s) / max(cores, 1.0)) + stage

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            single_core_seconds=self.single_core_seconds,
            stated_error=self.stated_error,
            mean_error=self.mean_error,
            bytes_per_task_this_machine=self.bytes_per_task(1, self.usable_cores),
        )
        return data


def _tasks(cal: Calibration, nodes: int, cores: int, limit: int | None = None) -> int:
    """Tasks the planner would cut the job into on `nodes` x `cores`, at most `limit` (default out_h):
    the balance, but no task's result over MAX_TASK_BYTES."""
    overhead = ROUND_TRIP_S if nodes > 1 else 0.0  # local pool threads have no round trip
    planned = balanced_tasks(cal.compute_seconds(nodes * cores), nodes * cores, overhead)
    by_size = math.ceil(cal.output_bytes / MAX_TASK_BYTES)
    return max(1, min(max(planned, by_size), cal.out_h if limit is None else limit))


def _fit_amdahl(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(T1, s) minimising the relative error of T(p) = a + b / p over (p, seconds) points, a, b >= 0."""
    ps = np.array([p for p, _ in points], float)
    ts = np.array([t for _, t in points], float)
    if len(set(ps)) < 2:
        # one core count cannot separate serial from parallel work: assume none is serial
        b = float(np.mean(ts * ps))
        return b, 0.0
    design = np.column_stack([1.0 / ts, 1.0 / (ps * ts)])
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(ts), rcond=None)
    if a < 0 or b <= 0:
        a, b = (0.0, float(np.mean(ts * ps))) if a < 0 else (float(np.mean(ts)), 0.0)
    t1 = float(a + b)
    return t1, float(a) / t1


def calibrate(study: StudyResult) -> Calibration:
    """Fit rate per core, serial fraction and data-plane bandwidth to the counted runs of `study`."""
    job = study.job
    usable = int(study.machine.get("usable_cores") or 1)
    counted = [r for r in study.results if r.counted]
    cores = [(float(min(r.config.threads, usable)), _typical(r)) for r in counted if r.config.kind == "cores"]
    if not cores:
        cores = [(1.0, study.reference_seconds)]
    t1, serial = _fit_amdahl(cores)
    _, oh, _ = job.out_shape
    _, (left, right) = mode_padding(tuple(job.kernels_shape[1:3]), job.mode)
    width = job.image_shape[1] + left + right
    cal = Calibration(
        flops=job.flops,
        rate_per_core=job.flops / t1,
        serial_fraction=serial,
        usable_cores=usable,
        dataplane_bandwidth=None,
        dataplane_path=None,
        input_bytes=job.input_bytes,
        bank_bytes=job.bank_bytes,
        output_bytes=job.output_bytes,
        n_kernels=job.kernels_shape[0],
        out_h=oh,
        halo_row_bytes=halo(job.kernels_shape[1]) * width * job.channels * job.itemsize,
        stage_seconds=float((study.extra.get("feature_stage") or {}).get("seconds", 0.0)),
    )
    remote = [r for r in counted if r.config.kind == "workers" and r.config.count > 0]
    if remote:
        # seconds per byte beyond compute, median over worker counts; a run faster than the model's
        # compute says the data plane cost nothing measurable there (0), not a negative cost
        per_byte = [
            max(0.0, _typical(r) - cal.compute_seconds(min(r.config.threads, usable)))
            / _moved_bytes(cal, r.config.count)
            for r in remote
        ]
        cost = float(np.median(per_byte))
        cal.dataplane_bandwidth = 1.0 / cost if cost > 0 else None
        tasks = [r.details.get("last_job", {}).get("tasks") for r in remote]
        per_task = [_moved_bytes(cal, r.config.count) / t for r, t in zip(remote, tasks, strict=True) if t]
        cal.measured_bytes_per_task = float(np.mean(per_task)) if per_task else None
        cal.dataplane_path = "shared memory" if study.settings.get("shared_memory") else "tcp"
    for r in counted:
        if r.config.kind == "cluster":
            continue  # its worker count and threads are not known to the model
        predicted = modelled_seconds(cal, r.config.kind, r.config.count, r.config.threads)
        cal.fit.append(
            {
                "configuration": r.config.label,
                "measured_seconds": _typical(r),
                "predicted_seconds": predicted,
                "relative_error": (predicted - _typical(r)) / _typical(r),
            }
        )
    return cal


def _typical(result: ConfigurationResult) -> float:
    """The median run: on a shared machine noise only adds time, and one stall should not move the fit."""
    return float(np.median(result.times))


def _moved_bytes(cal: Calibration, workers: int) -> float:
    # with no local threads every byte of input, bank and output passes through the data plane
    return cal.input_bytes + workers * cal.bank_bytes + cal.output_bytes


def modelled_seconds(cal: Calibration, kind: str, count: int, threads: int) -> float:
    """The model's time for a configuration of the kind measured on this machine."""
    compute = cal.compute_seconds(min(threads, cal.usable_cores))
    if kind == "workers" and count > 0 and cal.dataplane_bandwidth:
        return compute + _moved_bytes(cal, count) / cal.dataplane_bandwidth
    return compute


@dataclass(frozen=True)
class Prediction:
    """The model's time for N nodes x C cores over one link, by partitioning, and what bounds it; beside it
    the same job keeping the maps on the nodes (pooled features gathered), and a dataset's throughput."""

    nodes: int
    cores: int
    link: str
    link_bytes_per_s: float
    compute_seconds: float
    rowband_seconds: float
    kgroup_seconds: float
    scatter_seconds: float
    gather_seconds: float
    speedup: float
    ideal_speedup: int
    bound: str
    best: str
    error: float
    features_seconds: float = 0.0
    """The single image when only `pool` x `pool`-pooled maps come back."""
    features_bound: str = "compute"
    dataset_images_per_s: float = 0.0
    """Steady-state images per second of a dataset of such images, the maps gathered."""
    dataset_features_images_per_s: float = 0.0
    """The same with only pooled features gathered."""
    dataset_bound: str = "compute"
    dataset_features_bound: str = "compute"
    pool: int = FEATURE_POOL
    coordinator_computes: bool = True

    @property
    def seconds(self) -> float:
        return min(self.rowband_seconds, self.kgroup_seconds)

    @property
    def gather_bound(self) -> bool:
        return self.bound == "gather"

    @property
    def features_speedup(self) -> float:
        return self.speedup * self.seconds / self.features_seconds if self.features_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(seconds=self.seconds, gather_bound=self.gather_bound,
                    features_speedup=self.features_speedup)
        return data


def _single_image(cal: Calibration, nodes: int, cores: int, *, rate: float, output_bytes: float,
                  local: bool, features: bool = False
                  ) -> tuple[float, float, dict[str, float], dict[str, float], str]:
    """(row bands s, kernel groups s, row-band parts, kernel-group parts, the better) for one image whose
    gathered result is `output_bytes`; `local`: the coordinator is one of the nodes (its share stays);
    `features`: the nodes also activate and pool their maps."""
    remote_nodes = nodes - 1 if local else nodes
    remote = remote_nodes / nodes
    gather = output_bytes * remote / rate
    tasks = _tasks(cal, nodes, cores)
    band_scatter = (cal.input_bytes + tasks * cal.halo_row_bytes) * remote + remote_nodes * cal.bank_bytes
    group_nodes = min(nodes, cal.n_kernels)
    group_remote = group_nodes - 1 if local else group_nodes
    group_scatter = group_remote * cal.input_bytes + cal.bank_bytes * group_remote / group_nodes
    band_compute = cal.compute_seconds(nodes * cores, features=features)
    group_compute = cal.compute_seconds(group_nodes * cores, features=features)
    # pipeline fill: the first task's input arrives before compute starts, the last slab leaves after it
    rowband = max(band_compute, band_scatter / rate, gather) + (band_scatter / rate + gather) / tasks
    group_tasks = _tasks(cal, group_nodes, cores, limit=cal.n_kernels)
    kgroup = max(group_compute, group_scatter / rate, gather) + (group_scatter / rate + gather) / group_tasks
    best = "kernel groups" if kgroup < rowband * 0.99 else "row bands"
    bands = {"compute": band_compute, "scatter": band_scatter / rate, "gather": gather}
    groups = {"compute": group_compute, "scatter": group_scatter / rate, "gather": gather}
    return rowband, kgroup, bands, groups, best


def _dataset(cal: Calibration, nodes: int, cores: int, *, rate: float, output_bytes: float,
             local: bool, features: bool = False) -> tuple[float, str]:
    """(images per second, what bounds the remote nodes' part) for a stream of images like the calibrated
    one through the pull queue: the coordinator's node computes at its own pace, the others as fast as
    their cores or the coordinator's link allow (inputs out and results back at once, full duplex)."""
    per_image = cal.compute_seconds(cores, features=features)
    remote_nodes = nodes - 1 if local else nodes
    parts = {"compute": per_image / remote_nodes if remote_nodes else float("inf"),
             "scatter": cal.input_bytes / rate, "gather": output_bytes / rate}
    bound = max(parts, key=parts.__getitem__)
    own = 1.0 / per_image if local else 0.0
    return own + (1.0 / parts[bound] if remote_nodes else 0.0), bound if remote_nodes else "compute"


def predict(cal: Calibration, nodes: int, cores: int, link: tuple[str, float], *, pool: int = FEATURE_POOL,
            coordinator_computes: bool = True) -> Prediction:
    """Time and speed-up over one core for `nodes` x `cores` (nodes of this machine's per-core rate)."""
    label, rate = link
    if nodes < 1 or cores < 1 or pool < 1:
        raise OptionError(f"nodes={nodes}, cores={cores} and pool={pool} must all be at least 1")
    local = coordinator_computes
    features = cal.output_bytes / pool**2
    rowband, kgroup, bands, groups, best = _single_image(cal, nodes, cores, rate=rate,
                                                         output_bytes=cal.output_bytes, local=local)
    parts = bands if best == "row bands" else groups
    f_rowband, f_kgroup, f_bands, f_groups, f_best = _single_image(cal, nodes, cores, rate=rate,
                                                                   output_bytes=features, local=local,
                                                                   features=True)
    f_parts = f_bands if f_best == "row bands" else f_groups
    maps_rate, maps_bound = _dataset(cal, nodes, cores, rate=rate, output_bytes=cal.output_bytes, local=local)
    features_rate, features_bound = _dataset(cal, nodes, cores, rate=rate, output_bytes=features, local=local,
                                             features=True)
    return Prediction(
        nodes=nodes,
        cores=cores,
        link=label,
        link_bytes_per_s=rate,
        compute_seconds=parts["compute"],
        rowband_seconds=rowband,
        kgroup_seconds=kgroup,
        scatter_seconds=parts["scatter"],
        gather_seconds=parts["gather"],
        speedup=cal.single_core_seconds / min(rowband, kgroup),
        ideal_speedup=nodes * cores,
        bound=max(parts, key=parts.__getitem__),
        best=best,
        error=cal.stated_error,
        features_seconds=min(f_rowband, f_kgroup),
        features_bound=max(f_parts, key=f_parts.__getitem__),
        dataset_images_per_s=maps_rate,
        dataset_features_images_per_s=features_rate,
        dataset_bound=maps_bound,
        dataset_features_bound=features_bound,
        pool=pool,
        coordinator_computes=coordinator_computes,
    )


def predict_many(
    cal: Calibration, nodes: Sequence[int], cores: int, links: Sequence[tuple[str, float]], *,
    pool: int = FEATURE_POOL,
) -> list[Prediction]:
    """One prediction per (link, node count), links outermost."""
    return [predict(cal, n, cores, link, pool=pool) for link in links for n in nodes]
