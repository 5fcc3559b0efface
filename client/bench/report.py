"""Tables, results.json and plots of a scaling study, laid out like the paper's Tables III-IV and Figs. 10-11.

Every number written here is derived from the StudyResult's timings, so the tables can always be
recomputed from results.json. The paper's own figures sit beside ours, always labelled as the paper's.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rmidl.client.bench.predict import LINK_EFFICIENCY, Calibration, Prediction
from rmidl.client.bench.study import ConfigurationResult, StudyResult

__all__ = [
    "PAPER",
    "PREDICTION_HEADER",
    "baseline",
    "efficiency_rows",
    "format_seconds",
    "markdown_table",
    "model_error",
    "prediction_block",
    "prediction_rows",
    "speedup_matrix",
    "summary",
    "write_prediction",
    "write_report",
]

logger = logging.getLogger(__name__)

PAPER: dict[str, Any] = {
    "source": "the paper (Java 8, 8-core 2.4 GHz Opteron 6136; 1280x720 image, 128 kernels 11x11; 10 runs)",
    "cores": [1, 2, 4, 8],
    "average_seconds": [85.9125, 49.0664, 25.3766, 14.2801],
    "speedup_reported": [1.0, 1.751, 3.385, 6.016],
}
"""The paper's Table III averages (its individual runs are not reproduced here) and reported speed-ups."""

OVERSUBSCRIBED_MARK = "*"
"""Appended to a configuration's label in every table when it runs more threads than the usable cores."""


def format_seconds(value: float | None) -> str:
    """Six significant digits: enough for the paper's 85.9125 and for sub-millisecond tiny runs."""
    return "" if value is None or math.isnan(value) else f"{value:.6g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured pipe table (first column left-aligned, the rest right-aligned)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _label(result: ConfigurationResult) -> str:
    return result.config.label + (OVERSUBSCRIBED_MARK if result.config.oversubscribed else "")


def _paper_label(cores: int) -> str:
    return f"paper: {cores} core" + ("s" if cores != 1 else "")


def _counted(study: StudyResult) -> list[ConfigurationResult]:
    return [r for r in study.results if r.counted]


def baseline(study: StudyResult) -> tuple[str, float]:
    """The single-core time speed-ups are measured against: the 1-core configuration, else the reference."""
    for result in _counted(study):
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
    for result in _counted(study):
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


def _paper_rows() -> list[dict[str, Any]]:
    base = PAPER["average_seconds"][0]
    return [
        {
            "configuration": _paper_label(cores),
            "kind": "paper",
            "threads": cores,
            "oversubscribed": False,
            "average_seconds": seconds,
            "speedup": base / seconds,
            "efficiency": base / seconds / cores,
            "baseline": _paper_label(1),
        }
        for cores, seconds in zip(PAPER["cores"], PAPER["average_seconds"], strict=True)
    ]


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _table3(study: StudyResult) -> tuple[list[str], list[list[object]], list[list[str]]]:
    """Table III: rows run 1..R, total, average; our configurations, then the paper's averages beside them."""
    counted = _counted(study)
    runs = max((len(r.times) for r in counted), default=0)
    header = ["run", *(_label(r) for r in counted), *(_paper_label(c) for c in PAPER["cores"])]
    paper_blank = [""] * len(PAPER["cores"])
    csv_rows: list[list[object]] = []
    md_rows: list[list[str]] = []
    for i in range(runs):
        values = [r.times[i] if i < len(r.times) else None for r in counted]
        csv_rows.append([str(i + 1), *("" if v is None else repr(v) for v in values), *paper_blank])
        md_rows.append([str(i + 1), *(format_seconds(v) for v in values), *paper_blank])
    paper_totals = [repr(t * 10) for t in PAPER["average_seconds"]]
    csv_rows.append(["total", *(repr(r.total) for r in counted), *paper_totals])
    md_rows.append(
        [
            "**total**",
            *(format_seconds(r.total) for r in counted),
            *map(format_seconds, map(float, paper_totals)),
        ]
    )
    csv_rows.append(["average", *(repr(r.average) for r in counted), *map(repr, PAPER["average_seconds"])])
    md_rows.append(
        [
            "**average**",
            *(format_seconds(r.average) for r in counted),
            *map(format_seconds, PAPER["average_seconds"]),
        ]
    )
    return header, csv_rows, md_rows


def _notes(study: StudyResult) -> list[str]:
    machine = study.machine
    blas = ", ".join(f"{b['library']} {b['version']} ({b['architecture']})" for b in machine.get("blas", []))
    job = study.job
    notes = [
        f"Ours: {machine.get('cpu_model')}, {machine.get('usable_cores')} usable cores, "
        f"BLAS {blas or 'unknown'}; "
        f"image {job.image_shape[1]}x{job.image_shape[0]} px x {job.channels} channel(s) "
        f"({job.image_source}), "
        f"kernels {'x'.join(map(str, job.kernels_shape))} (K x kh x kw x C, {job.kernels_source}), "
        f"mode {job.mode}, {job.dtype}; "
        f"{job.flops / 1e9:.4g} GFLOP per run. Times in seconds.",
        f"Each configuration ran {study.settings.get('warmup', 0)} untimed warm-up run(s) first; every run, "
        "warm-up included, was checked against a single-thread run before its time counted.",
        "results.json also keeps each run's CPU seconds in this process: on a shared machine, a wall time "
        "well above CPU / threads for the engine alone means other work held the cores.",
        f"Paper's columns: {PAPER['source']}. Its individual runs are not reproduced here, only its averages "
        "(total = 10 x average).",
    ]
    if any(r.config.oversubscribed for r in study.results):
        notes.append(
            f"Marked {OVERSUBSCRIBED_MARK}: oversubscribed, more threads than the "
            f"{machine.get('usable_cores')} usable cores; run and kept, not dropped."
        )
    versus = versus_paper(study)
    if versus:
        notes.append(versus)
    busy = busy_note(study)
    if busy:
        notes.append(busy)
    notes += [f"Not counted: {r.config.label}: {r.failure}" for r in study.results if not r.counted]
    return notes


def _write_markdown(path: Path, title: str, blocks: Sequence[str]) -> Path:
    path.write_text(f"# {title}\n\n" + "\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def write_tables(study: StudyResult, out: Path) -> list[Path]:
    """table3.md/.csv, table4.md/.csv and efficiency.md/.csv."""
    written = []
    notes = "\n".join(f"- {n}" for n in _notes(study))
    header, csv_rows, md_rows = _table3(study)
    written.append(_write_csv(out / "table3.csv", header, csv_rows))
    written.append(
        _write_markdown(
            out / "table3.md", "Table III: time per run (s)", [markdown_table(header, md_rows), notes]
        )
    )

    counted = _counted(study)
    labels = [_label(r) for r in counted]
    ours = speedup_matrix([r.average for r in counted])
    paper_labels = [_paper_label(c) for c in PAPER["cores"]]
    paper = speedup_matrix(PAPER["average_seconds"])
    all_labels = labels + paper_labels
    csv_rows4: list[list[object]] = [
        [label, *map(repr, row), *[""] * len(paper_labels)] for label, row in zip(labels, ours, strict=True)
    ]
    csv_rows4 += [
        [label, *[""] * len(labels), *map(repr, row)] for label, row in zip(paper_labels, paper, strict=True)
    ]
    written.append(_write_csv(out / "table4.csv", ["speed-up of row over column", *all_labels], csv_rows4))
    md_ours = [[label, *(f"{v:.3f}" for v in row)] for label, row in zip(labels, ours, strict=True)]
    md_paper = [[label, *(f"{v:.3f}" for v in row)] for label, row in zip(paper_labels, paper, strict=True)]
    written.append(
        _write_markdown(
            out / "table4.md",
            "Table IV: speed-up matrix (row over column = T[column] / T[row], from the averages)",
            [
                "## Ours\n\n" + markdown_table(["", *labels], md_ours),
                "## The paper's (recomputed from its Table III averages; it reports 1.751, 3.385, 6.016 "
                "for 2, 4, 8 cores over 1)\n\n" + markdown_table(["", *paper_labels], md_paper),
                notes,
            ],
        )
    )

    keys = [
        "configuration",
        "kind",
        "threads",
        "oversubscribed",
        "average_seconds",
        "speedup",
        "efficiency",
        "baseline",
    ]
    rows = efficiency_rows(study) + _paper_rows()
    written.append(
        _write_csv(out / "efficiency.csv", keys, [[_csv_value(row[k]) for k in keys] for row in rows])
    )
    md_rows_e = [_efficiency_cells(row, "{:.1%}") for row in rows]
    base_label, _ = baseline(study)
    written.append(
        _write_markdown(
            out / "efficiency.md",
            f"Efficiency: speed-up over the single core ({base_label}; paper: its 1 core) / threads",
            [
                markdown_table(
                    ["configuration", "threads", "average (s)", "speed-up", "efficiency"], md_rows_e
                ),
                notes,
            ],
        )
    )
    return written


def _efficiency_cells(row: dict[str, Any], percent: str) -> list[str]:
    """configuration (oversubscribed marked), threads, average, speed-up, efficiency as text cells."""
    return [
        row["configuration"] + (OVERSUBSCRIBED_MARK if row["oversubscribed"] else ""),
        str(row["threads"]),
        format_seconds(row["average_seconds"]),
        f"{row['speedup']:.3f}",
        "" if row["efficiency"] is None else percent.format(row["efficiency"]),
    ]


def _csv_value(value: object) -> object:
    return repr(value) if isinstance(value, float) else value


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    # Figure + Agg canvas directly: no pyplot, so no global backend state and no GUI is ever touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, which="both", alpha=0.3)
    return figure, axes


def _save(figure: Any, path: Path) -> Path:
    figure.savefig(path, format="png")
    return path


def _mark_oversubscribed(axes: Any, results: Sequence[ConfigurationResult], values: Sequence[float]) -> None:
    over = [(r.config.count, v) for r, v in zip(results, values, strict=True) if r.config.oversubscribed]
    if over:
        xs, ys = zip(*over, strict=True)
        axes.scatter(xs, ys, s=160, facecolors="none", edgecolors="red", label="oversubscribed", zorder=3)


def plot_time_vs_cores(study: StudyResult, path: Path) -> Path:
    """Fig. 10: average time against cores, ours (min-max bars) and the paper's, on a log time axis."""
    cores = [r for r in _counted(study) if r.config.kind == "cores"]
    figure, axes = _figure("Average time vs cores (cf. the paper's Fig. 10)", "cores", "average time (s)")
    if cores:
        xs = [r.config.count for r in cores]
        ys = [r.average for r in cores]
        spread = [
            [y - min(r.times) for r, y in zip(cores, ys, strict=True)],
            [max(r.times) - y for r, y in zip(cores, ys, strict=True)],
        ]
        axes.errorbar(
            xs, ys, yerr=spread, marker="o", capsize=3, label=f"ours ({study.machine.get('cpu_model')})"
        )
        _mark_oversubscribed(axes, cores, ys)
    axes.plot(
        PAPER["cores"],
        PAPER["average_seconds"],
        marker="s",
        linestyle="--",
        label="paper (Java 8, Opteron 6136)",
    )
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    ticks = sorted({*PAPER["cores"], *(r.config.count for r in cores)})
    axes.set_xticks(ticks, [str(t) for t in ticks])
    axes.legend()
    return _save(figure, path)


def plot_speedup(study: StudyResult, path: Path) -> Path:
    """Fig. 11: ideal against actual speed-up over one core, ours and the paper's."""
    _, base = baseline(study)
    cores = [r for r in _counted(study) if r.config.kind == "cores"]
    figure, axes = _figure(
        "Ideal vs actual speed-up (cf. the paper's Fig. 11)", "cores", "speed-up over 1 core"
    )
    top = max([*PAPER["cores"], *(r.config.count for r in cores)])
    axes.plot([1, top], [1, top], color="gray", linestyle=":", label="ideal")
    usable = int(study.machine.get("usable_cores") or top)
    if usable < top:
        # past the usable cores more threads cannot help: the best this machine can do
        axes.plot(
            [1, usable, top],
            [1, usable, usable],
            color="gray",
            linestyle="--",
            linewidth=1,
            label=f"ideal here ({usable} usable cores)",
        )
    if cores:
        xs = [r.config.count for r in cores]
        ys = [base / r.average for r in cores]
        axes.plot(xs, ys, marker="o", label="ours")
        _mark_oversubscribed(axes, cores, ys)
    paper_base = PAPER["average_seconds"][0]
    axes.plot(
        PAPER["cores"],
        [paper_base / t for t in PAPER["average_seconds"]],
        marker="s",
        linestyle="--",
        label="paper (Java 8, Opteron 6136)",
    )
    axes.legend()
    return _save(figure, path)


def plot_time_vs_workers(study: StudyResult, path: Path) -> Path | None:
    """Average time against worker count through the coordinator, with the engine's times as references."""
    workers = [r for r in _counted(study) if r.config.kind == "workers"]
    if not workers:
        return None
    figure, axes = _figure("Average time vs workers (through the coordinator)", "workers", "average time (s)")
    xs = [r.config.count for r in workers]
    ys = [r.average for r in workers]
    spread = [
        [y - min(r.times) for r, y in zip(workers, ys, strict=True)],
        [max(r.times) - y for r, y in zip(workers, ys, strict=True)],
    ]
    axes.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, label="coordinator")
    _mark_oversubscribed(axes, workers, ys)
    for result in _counted(study):
        if result.config.kind == "cores":
            axes.axhline(
                result.average,
                linestyle="--",
                linewidth=1,
                alpha=0.7,
                label=f"engine alone, {result.config.label}",
                color=f"C{1 + result.config.count % 8}",
            )
    axes.set_xticks(xs, [str(x) for x in xs])
    axes.set_ylim(bottom=0)
    axes.legend()
    return _save(figure, path)


def write_results_json(study: StudyResult, path: Path) -> Path:
    """results.json: the study itself plus the derived speed-ups and efficiencies and the paper's figures."""
    data = study.to_dict()
    data["derived"] = {
        "busy_factor": busy_factor(study),
        "baseline": dict(zip(("label", "seconds"), baseline(study), strict=True)),
        "efficiency": efficiency_rows(study),
        "speedup_matrix": {
            "labels": [r.config.label for r in _counted(study)],
            "rows_over_columns": speedup_matrix([r.average for r in _counted(study)]),
        },
    }
    data["paper"] = PAPER
    path.write_text(
        json.dumps(data, indent=2, allow_nan=False, default=_json_default) + "\n", encoding="utf-8"
    )
    return path


def _json_default(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_report(study: StudyResult, out: Path) -> list[Path]:
    """Write every table, results.json and every plot into `out` (created); return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = write_tables(study, out)
    written.append(write_results_json(study, out / "results.json"))
    written.append(plot_time_vs_cores(study, out / "fig10_time_vs_cores.png"))
    written.append(plot_speedup(study, out / "fig11_speedup.png"))
    workers_plot = plot_time_vs_workers(study, out / "time_vs_workers.png")
    if workers_plot is not None:
        written.append(workers_plot)
    logger.info("wrote %d files to %s", len(written), out)
    return written


def summary(study: StudyResult) -> str:
    """The terminal's closing table: each configuration's average, speed-up, efficiency; then the paper's."""
    rows = [_efficiency_cells(row, "{:.0%}") for row in efficiency_rows(study) + _paper_rows()]
    rows += [[r.config.label, str(r.config.threads), "not counted", "", ""] for r in study.failed]
    header = ["configuration", "threads", "average (s)", "speed-up", "efficiency"]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    extra = [note for note in (versus_paper(study), busy_note(study)) if note]
    return "\n".join(lines + extra)


def versus_paper(study: StudyResult) -> str | None:
    """How our single core compares with the paper's, when the job is the paper's; otherwise None."""
    job = study.job
    if job.image_shape[:2] != (720, 1280) or job.kernels_shape[:3] != (128, 11, 11) or job.channels != 1:
        return None
    label, seconds = baseline(study)
    paper = PAPER["average_seconds"][0]
    return (
        f"The paper's job: our single core ({label}) took {format_seconds(seconds)} s against the paper's "
        f"{paper} s, {paper / seconds:.0f}x faster."
    )


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


def busy_note(study: StudyResult) -> str | None:
    """A warning when the machine was busy during the study, or None."""
    factor = busy_factor(study)
    if factor is None or factor <= BUSY_THRESHOLD:
        return None
    return (
        f"Warning: the machine was busy: 1-core wall time was {factor:.2f}x its CPU time, so other work "
        "held the cores; timings are inflated and speed-ups are unreliable. Re-run on a quiet machine."
    )


def prediction_block(cal: Calibration, predictions: Sequence[Prediction]) -> dict[str, Any]:
    """What results.json keeps of a prediction: the calibration, its error, and every predicted point."""
    return {
        "model": "see rmidl.client.bench.predict's module docstring",
        "calibration": cal.to_dict(),
        "points": [p.to_dict() for p in predictions],
    }


def prediction_rows(predictions: Sequence[Prediction]) -> list[list[str]]:
    return [
        [
            p.link,
            str(p.nodes),
            str(p.cores),
            format_seconds(p.seconds),
            f"{p.speedup:.2f}",
            str(p.ideal_speedup),
            format_seconds(p.rowband_seconds),
            format_seconds(p.kgroup_seconds),
            p.best,
            p.bound + (" (gathering the output)" if p.gather_bound else ""),
        ]
        for p in predictions
    ]


PREDICTION_HEADER = [
    "link",
    "nodes",
    "cores/node",
    "predicted (s)",
    "speed-up",
    "ideal",
    "row bands (s)",
    "kernel groups (s)",
    "better partitioning",
    "bound",
]


def model_error(cal: Calibration) -> str:
    """How far the model is off on the runs it was fitted to, or that no run could check it."""
    if not cal.fit:
        return "not checked (no configuration was measured; the model rests on the reference run alone)"
    return f"at most {cal.stated_error:.1%}, mean {cal.mean_error:.1%}"


def write_prediction(cal: Calibration, predictions: Sequence[Prediction], out: Path) -> list[Path]:
    """prediction.md / .csv (each point, what bounds it, which partitioning wins) and its plot."""
    keys = list(predictions[0].to_dict()) if predictions else []
    written = [
        _write_csv(
            out / "prediction.csv", keys, [[_csv_value(p.to_dict()[k]) for k in keys] for p in predictions]
        )
    ]
    fit_rows = [
        [
            f["configuration"],
            format_seconds(f["measured_seconds"]),
            format_seconds(f["predicted_seconds"]),
            f"{f['relative_error']:+.1%}",
        ]
        for f in cal.fit
    ]
    bandwidth = (
        f"{cal.dataplane_bandwidth / 1e6:.4g} MB/s ({cal.dataplane_path})"
        if cal.dataplane_bandwidth
        else "not measured (no worker configuration, or no measurable cost)"
    )
    per_task = f"{cal.bytes_per_task(1, cal.usable_cores) / 1e6:.4g} MB as the model plans row bands here"
    if cal.measured_bytes_per_task:
        per_task += f", {cal.measured_bytes_per_task / 1e6:.4g} MB as the coordinator planned the worker runs"
    calibration = "\n".join(
        [
            f"- compute rate per core: {cal.rate_per_core / 1e9:.4g} GFLOP/s "
            f"(1 core: {format_seconds(cal.single_core_seconds)} s for {cal.flops / 1e9:.4g} GFLOP)",
            f"- serial fraction: {cal.serial_fraction:.3f}",
            f"- data-plane bandwidth: {bandwidth}",
            f"- bytes per task: {per_task}; input {cal.input_bytes / 1e6:.4g} MB, bank "
            f"{cal.bank_bytes / 1e6:.4g} MB, output {cal.output_bytes / 1e6:.4g} MB",
            f"- links are payload rates: line rate x {LINK_EFFICIENCY} (TCP over 1500-byte Ethernet frames)",
        ]
    )
    error = f"Model error on the measured configurations: {model_error(cal)}."
    if cal.fit:
        error = error[:-1] + " (fitted to these same runs, so this is the floor of its error elsewhere)."
    written.append(
        _write_markdown(
            out / "prediction.md",
            "Predicted time and speed-up for N nodes x C cores (cost model calibrated on this run)",
            [
                markdown_table(PREDICTION_HEADER, prediction_rows(predictions)),
                "Speed-up is over one core of this machine; nodes are assumed to have its per-core rate. "
                'Bound "gather" marks where gathering the output over the coordinator\'s link decides the '
                'time; "better partitioning" says whether kernel groups beat row bands.',
                "## Calibration\n\n" + calibration,
                "## Model error\n\n"
                + error
                + "\n\n"
                + markdown_table(["configuration", "measured (s)", "model (s)", "error"], fit_rows),
            ],
        )
    )
    written.append(plot_prediction(predictions, out / "prediction_speedup.png"))
    return written


def plot_prediction(predictions: Sequence[Prediction], path: Path) -> Path:
    """Predicted speed-up against nodes, one line per link, gather-bound points hollow, ideal dotted."""
    cores = predictions[0].cores if predictions else 0
    title = f"Predicted speed-up, N nodes x {cores} cores (cost model)"
    figure, axes = _figure(title, "nodes", "speed-up over 1 core")
    links = list(dict.fromkeys(p.link for p in predictions))
    for i, link in enumerate(links):
        points = [p for p in predictions if p.link == link]
        xs = [p.nodes for p in points]
        axes.plot(xs, [p.speedup for p in points], marker="o", color=f"C{i}", label=f"{link}")
        bound = [p for p in points if p.gather_bound]
        if bound:
            axes.scatter(
                [p.nodes for p in bound],
                [p.speedup for p in bound],
                s=120,
                facecolors="none",
                edgecolors="black",
                zorder=3,
                label="gather-bound" if i == 0 else None,
            )
    if predictions:
        nodes = sorted({p.nodes for p in predictions})
        axes.plot(
            nodes, [n * predictions[0].cores for n in nodes], color="gray", linestyle=":", label="ideal"
        )
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xticks(nodes, [str(n) for n in nodes])
    axes.legend()
    return _save(figure, path)
