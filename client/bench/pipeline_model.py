"""What stage times predict for a pipeline: the paper's Eq. (2) as printed, and the bottleneck formula.

A pipeline of stages with times tau_1..tau_k per item (here a batch) takes, for m items,
    sequentially:  m * sum(tau)
    pipelined:     sum(tau) + (m - 1) * interval,   interval = max_i tau_i / r_i
since after the first item has gone through every stage, one leaves the pipeline per interval, set by
the slowest stage (a stage with r_i processors, replicated or split, counted as tau_i / r_i). On P
cores the stages share the cores, so the interval is also at least sum(tau) / P. The paper's Eq. (2)
takes the interval to be the *last* stage's time, which is only right when the last stage is the
slowest: with its own Table III (CNP1 ~23 s of ~38 s, FLAT 0.05 s) the bottleneck formula predicts
38 / 23 = 1.65x where it states 3x, and 6 pipelines ~10x where it states 18x.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PAPER_PIPELINE", "Prediction", "bottleneck_speedup", "eq2_speedup", "paper_predictions",
           "predict"]

PAPER_PIPELINE: dict[str, Any] = {
    "source": "the paper's Table III and text as issue 9 quotes them (its other rows are not reproduced)",
    "stage_seconds": {"CNP1": 23.0, "FLAT": 0.05},
    "total_seconds": 38.0,
    "pipelines": 6,
    "claimed_pipelined": 3.0,
    "claimed_combined": 18.0,
}
"""The paper's figures we have: CNP1 and FLAT of its Table III, the total, its six pipelines (one per
class), and the speed-ups it states for one pipeline and for the six."""


def eq2_speedup(times: Sequence[float], items: int) -> float:
    """The paper's Eq. (2) as printed: the bottleneck formula with the last stage's time as the interval."""
    total = sum(times)
    return items * total / (total + (items - 1) * times[-1])


def bottleneck_speedup(times: Sequence[float], items: int, *, replicas: Sequence[int] | None = None,
                       pipelines: int = 1, cores: int | None = None) -> float:
    """Sequential over pipelined makespan: each of `pipelines` copies of the pipeline takes its share of
    the items, its interval the slowest stage's tau_i / r_i, and on `cores` cores no faster than the
    work allows (all copies together: sum(tau) / cores per item)."""
    total = sum(times)
    counts = replicas or [1] * len(times)
    interval = max(t / r for t, r in zip(times, counts, strict=True))
    if cores:
        interval = max(interval, pipelines * total / cores)
    per_pipeline = math.ceil(items / pipelines)
    return items * total / (total + (per_pipeline - 1) * interval)


@dataclass(frozen=True)
class Prediction:
    """One scheme's predicted speed-ups over the sequential run, beside the measured one."""

    scheme: str
    eq2: float | None
    bottleneck: float
    on_cores: float
    measured: float | None = None

    @property
    def measured_over_predicted(self) -> float | None:
        return None if self.measured is None else self.measured / self.on_cores

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "eq2": self.eq2, "bottleneck": self.bottleneck,
                "on_cores": self.on_cores, "measured": self.measured,
                "measured_over_predicted": self.measured_over_predicted}


def predict(stage_times: Mapping[str, float], items: int, *, cores: int,
            replicas: Sequence[int] | None = None, pipelines: int = 1,
            measured: Mapping[str, float] | None = None) -> list[Prediction]:
    """Predictions for the stage-mapped pipeline and for `pipelines` copies of it, from the per-item
    times of the sequential run's stages (LOAD, CNP1.., FLAT in order); `replicas` per CNP stage."""
    names = list(stage_times)
    times = [stage_times[n] for n in names]
    full = [1, *(replicas or [1] * (len(names) - 2)), 1]
    measured = measured or {}
    one = Prediction("pipelined", eq2_speedup(times, items),
                     bottleneck_speedup(times, items, replicas=full),
                     bottleneck_speedup(times, items, replicas=full, cores=cores), measured.get("pipelined"))
    rows = [one]
    if pipelines > 1:
        copies = {"replicas": full, "pipelines": pipelines}
        rows.append(Prediction(f"combined ({pipelines} pipelines)", None,
                               bottleneck_speedup(times, items, **copies),  # type: ignore[arg-type]
                               bottleneck_speedup(times, items, cores=cores, **copies),  # type: ignore[arg-type]
                               measured.get("combined")))
    return rows


def paper_predictions() -> dict[str, float]:
    """The paper's stated speed-ups and what its own Table III predicts by the bottleneck formula
    (many items: the total over the slowest stage, CNP1; six pipelines six times that)."""
    paper = PAPER_PIPELINE
    pipelined = paper["total_seconds"] / paper["stage_seconds"]["CNP1"]
    return {"claimed_pipelined": paper["claimed_pipelined"], "corrected_pipelined": pipelined,
            "claimed_combined": paper["claimed_combined"],
            "corrected_combined": paper["pipelines"] * pipelined}
