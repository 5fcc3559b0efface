"""Everything `rmidl bench` writes into its output directory: tables, results.json and, when matplotlib is
installed, the plots (laid out like the paper's Tables III-IV and Figs. 10-11)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from rmidl.client.bench import plots
from rmidl.client.bench.derived import (
    PAPER,
    baseline,
    busy_factor,
    counted_results,
    efficiency_rows,
    speedup_matrix,
)
from rmidl.client.bench.forecast import write_prediction_tables
from rmidl.client.bench.output import write_json
from rmidl.client.bench.predict import Calibration, Prediction
from rmidl.client.bench.results import StudyResult
from rmidl.client.bench.tables import write_tables

__all__ = ["write_prediction", "write_report", "write_results_json"]

logger = logging.getLogger(__name__)


def write_results_json(study: StudyResult, path: Path) -> Path:
    """results.json: the study itself plus the derived speed-ups and efficiencies and the paper's figures."""
    data = study.to_dict()
    data["derived"] = {
        "busy_factor": busy_factor(study),
        "baseline": dict(zip(("label", "seconds"), baseline(study), strict=True)),
        "efficiency": efficiency_rows(study),
        "speedup_matrix": {
            "labels": [r.config.label for r in counted_results(study)],
            "rows_over_columns": speedup_matrix([r.average for r in counted_results(study)]),
        },
    }
    data["paper"] = PAPER
    return write_json(path, data)


def write_report(study: StudyResult, out: Path) -> list[Path]:
    """Write every table, results.json and (matplotlib permitting) every plot into `out` (created);
    return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = write_tables(study, out)
    written.append(write_results_json(study, out / "results.json"))
    skipped = plots.unavailable()
    if skipped is None:
        written.append(plots.plot_time_vs_cores(study, out / "fig10_time_vs_cores.png"))
        written.append(plots.plot_speedup(study, out / "fig11_speedup.png"))
        workers_plot = plots.plot_time_vs_workers(study, out / "time_vs_workers.png")
        if workers_plot is not None:
            written.append(workers_plot)
    else:
        logger.info("plots skipped: %s", skipped)
    logger.info("wrote %d files to %s", len(written), out)
    return written


def write_prediction(cal: Calibration, predictions: Sequence[Prediction], out: Path) -> list[Path]:
    """prediction.md / .csv and, when matplotlib is installed, its plot; return the paths written."""
    written = write_prediction_tables(cal, predictions, out)
    if plots.unavailable() is None:
        written.append(plots.plot_prediction(predictions, out / "prediction_speedup.png"))
        written.append(plots.plot_dataset_prediction(predictions, out / "prediction_dataset.png"))
    return written
