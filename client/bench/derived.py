"""Numbers derived from a study's timings (baseline, speed-ups, efficiency, busy factor) and the paper's.

Everything here is recomputed from a StudyResult, so tables and plots always agree with results.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rmidl.client.bench.results import ConfigurationResult, StudyResult

__all__ = [
    "BUSY_THRESHOLD",
    "PAPER",
    "baseline",
    "busy_factor",
    "counted_results",
    "efficiency_rows",
    "paper_label",
    "paper_rows",
    "speedup_matrix",
]


PAPER: dict[str, Any] = {
    "source": "the paper (Java 8, 8-core 2.4 GHz Opteron 6136; 1280x720 image, 128 kernels 11x11; 10 runs)",
    "cores": [1, 2, 4, 8],
    "average_seconds": [85.9125, 49.0664, 25.3766, 14.2801],
    "speedup_reported": [1.0, 1.751, 3.385, 6.016],
}
"""The paper's Table III averages (its individual runs are not reproduced here) and reported speed-ups."""


def paper_label(cores: int) -> str:
    return f"paper: {cores} core" + ("s" if cores != 1 else "")


def counted_results(study: StudyResult) -> list[ConfigurationResult]:
    return [r for r in study.results if r.counted]


def baseline(study: StudyResult) -> tuple[str, float]:
    """The single-core time speed-ups are measured against: the 1-core configuration, else the reference."""
    for result in counted_results(study):
        if result.config.kind == "cores" and result.config.count == 1:
            return result.config.label, result.average
    return "reference run (1 thread)", study.reference_seconds


def speedup_matrix(averages: Sequence[float]) -> list[list[float]]:
    """S[i][j] = T[j] / T[i]: how many times faster configuration i is than configuration j."""
    return [[tj / ti for tj in averages] for ti in averages]


def efficiency_rows(study: StudyResult) -> list[dict[str, Any]]:
    """Per counted configuration: threads, average, speed-up over the baseline, efficiency = S / threads."""
    base_label, base = baseline(study)
    rows = []
    for result in counted_results(study):
        # a cluster behind --ns reports its threads only once it has run
        threads = result.config.threads or int(result.details.get("threads") or 0)
        speedup = base / result.average
        rows.append(
            {
                "configuration": result.config.label,
                "kind": result.config.kind,
                "threads": threads,
                "oversubscribed": result.config.oversubscribed,
                "average_seconds": result.average,
                "speedup": speedup,
                "efficiency": speedup / threads if threads else None,
                "baseline": base_label,
            }
        )
    return rows


def paper_rows() -> list[dict[str, Any]]:
    base = PAPER["average_seconds"][0]
    return [
        {
            "configuration": paper_label(cores),
            "kind": "paper",
            "threads": cores,
            "oversubscribed": False,
            "average_seconds": seconds,
            "speedup": base / seconds,
            "efficiency": base / seconds / cores,
            "baseline": paper_label(1),
        }
        for cores, seconds in zip(PAPER["cores"], PAPER["average_seconds"], strict=True)
    ]


BUSY_THRESHOLD = 1.25
"""Wall over CPU time of the 1-thread engine above which the machine is called busy."""


def busy_factor(study: StudyResult) -> float | None:
    """Median wall / median CPU seconds of the 1-core engine runs: 1.0 on an idle machine, more when
    other work held the core (the engine's one thread never waits for anything else)."""
    for result in study.results:
        if (
            result.config.kind == "cores"
            and result.config.threads == 1
            and result.counted
            and result.cpu_times
        ):
            cpu = float(np.median(result.cpu_times))
            return float(np.median(result.times)) / cpu if cpu > 0 else None
    return None
