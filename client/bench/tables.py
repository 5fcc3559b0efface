"""A study's Tables III-IV and efficiency table in markdown and CSV, and the terminal's summary.

The paper's own figures sit beside ours, always labelled as the paper's.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rmidl.client.bench.derived import (
    BUSY_THRESHOLD,
    PAPER,
    baseline,
    busy_factor,
    counted_results,
    efficiency_rows,
    paper_label,
    paper_rows,
    speedup_matrix,
)
from rmidl.client.bench.output import write_text
from rmidl.client.bench.results import ConfigurationResult, StudyResult

__all__ = [
    "OVERSUBSCRIBED_MARK",
    "busy_note",
    "csv_value",
    "format_seconds",
    "column_label",
    "markdown_table",
    "SUMMARY_ALIGN",
    "SUMMARY_HEADER",
    "summary_notes",
    "summary_rows",
    "versus_paper",
    "write_csv",
    "write_markdown",
    "write_tables",
]


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


def column_label(result: ConfigurationResult) -> str:
    return result.config.label + (OVERSUBSCRIBED_MARK if result.config.oversubscribed else "")


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, text.getvalue())


def write_markdown(path: Path, title: str, blocks: Sequence[str]) -> Path:
    return write_text(path, f"# {title}\n\n" + "\n\n".join(blocks) + "\n")


def csv_value(value: object) -> object:
    return repr(value) if isinstance(value, float) else value


def _table3(study: StudyResult) -> tuple[list[str], list[list[object]], list[list[str]]]:
    """Table III: rows run 1..R, total, average; our configurations, then the paper's averages beside them."""
    counted = counted_results(study)
    runs = max((len(r.times) for r in counted), default=0)
    header = ["run", *(column_label(r) for r in counted), *(paper_label(c) for c in PAPER["cores"])]
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


def write_tables(study: StudyResult, out: Path) -> list[Path]:
    """table3.md/.csv, table4.md/.csv and efficiency.md/.csv."""
    written = []
    notes = "\n".join(f"- {n}" for n in _notes(study))
    header, csv_rows, md_rows = _table3(study)
    written.append(write_csv(out / "table3.csv", header, csv_rows))
    written.append(
        write_markdown(
            out / "table3.md", "Table III: time per run (s)", [markdown_table(header, md_rows), notes]
        )
    )

    counted = counted_results(study)
    labels = [column_label(r) for r in counted]
    ours = speedup_matrix([r.average for r in counted])
    paper_labels = [paper_label(c) for c in PAPER["cores"]]
    paper = speedup_matrix(PAPER["average_seconds"])
    all_labels = labels + paper_labels
    csv_rows4: list[list[object]] = [
        [label, *map(repr, row), *[""] * len(paper_labels)] for label, row in zip(labels, ours, strict=True)
    ]
    csv_rows4 += [
        [label, *[""] * len(labels), *map(repr, row)] for label, row in zip(paper_labels, paper, strict=True)
    ]
    written.append(write_csv(out / "table4.csv", ["speed-up of row over column", *all_labels], csv_rows4))
    md_ours = [[label, *(f"{v:.3f}" for v in row)] for label, row in zip(labels, ours, strict=True)]
    md_paper = [[label, *(f"{v:.3f}" for v in row)] for label, row in zip(paper_labels, paper, strict=True)]
    written.append(
        write_markdown(
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
    rows = efficiency_rows(study) + paper_rows()
    written.append(
        write_csv(out / "efficiency.csv", keys, [[csv_value(row[k]) for k in keys] for row in rows])
    )
    md_rows_e = [_efficiency_cells(row, "{:.1%}") for row in rows]
    base_label, _ = baseline(study)
    written.append(
        write_markdown(
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


SUMMARY_HEADER = ("configuration", "threads", "average (s)", "speed-up", "efficiency")
SUMMARY_ALIGN = ("left", "right", "right", "right", "right")


def summary_rows(study: StudyResult) -> list[list[str]]:
    """The terminal's closing table (SUMMARY_HEADER): each configuration's average, speed-up and
    efficiency, then the paper's, then what was not counted."""
    rows = [_efficiency_cells(row, "{:.0%}") for row in efficiency_rows(study) + paper_rows()]
    rows += [[r.config.label, str(r.config.threads), "not counted", "", ""] for r in study.failed]
    return rows


def summary_notes(study: StudyResult) -> list[str]:
    """What the terminal says under the summary table: the paper comparison and a busy-machine warning."""
    return [note for note in (versus_paper(study), busy_note(study)) if note]


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


def busy_note(study: StudyResult) -> str | None:
    """A warning when the machine was busy during the study, or None."""
    factor = busy_factor(study)
    if factor is None or factor <= BUSY_THRESHOLD:
        return None
    return (
        f"Warning: the machine was busy: 1-core wall time was {factor:.2f}x its CPU time, so other work "
        "held the cores; timings are inflated and speed-ups are unreliable. Re-run on a quiet machine."
    )
