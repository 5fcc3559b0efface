"""The prediction's report: each predicted point, the calibration and the model's error, in markdown, CSV
and results.json (the cost model itself is predict.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rmidl.client.bench.predict import LINK_EFFICIENCY, Calibration, Prediction
from rmidl.client.bench.tables import csv_value, format_seconds, markdown_table, write_csv, write_markdown

__all__ = [
    "PREDICTION_HEADER",
    "model_error",
    "prediction_block",
    "payoff",
    "prediction_rows",
    "write_prediction_tables",
]


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
            f"{format_seconds(p.features_seconds)} ({p.features_bound})",
            f"{p.dataset_images_per_s:.3g} ({p.dataset_bound})",
            f"{p.dataset_features_images_per_s:.3g} ({p.dataset_features_bound})",
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
    "maps kept, features back (s)",
    "dataset img/s, maps back",
    "dataset img/s, features back",
]


def payoff(predictions: Sequence[Prediction]) -> list[str]:
    """Per link, the fewest nodes that beat one node by more than 1 % and by how much, and the gain at the
    most nodes predicted: for the image and for a dataset, maps or pooled features gathered."""
    lines = []
    options = {
        "one image, maps gathered": lambda p: 1.0 / p.seconds,
        "one image, pooled features gathered": lambda p: 1.0 / p.features_seconds,
        "a dataset, maps gathered": lambda p: p.dataset_images_per_s,
        "a dataset, pooled features gathered": lambda p: p.dataset_features_images_per_s,
    }
    for link in dict.fromkeys(p.link for p in predictions):
        points = sorted((p for p in predictions if p.link == link), key=lambda p: p.nodes)
        one = next((p for p in points if p.nodes == 1), None)
        if one is None or len(points) < 2:
            continue
        said = []
        for what, speed in options.items():
            gains = [(p.nodes, speed(p) / speed(one)) for p in points if p.nodes > 1]
            first = next(((n, g) for n, g in gains if g > 1.01), None)
            most = gains[-1]
            if first is None:
                said.append(f"{what}: never up to {most[0]} nodes ({most[1]:.2f}x one node there)")
            else:
                said.append(f"{what}: from {first[0]} nodes ({first[1]:.2f}x one node; {most[1]:.2f}x at "
                            f"{most[0]})")
        lines.append(f"- {link}: " + "; ".join(said))
    return lines


def model_error(cal: Calibration) -> str:
    """How far the model is off on the runs it was fitted to, or that no run could check it."""
    if not cal.fit:
        return "not checked (no configuration was measured; the model rests on the reference run alone)"
    return f"at most {cal.stated_error:.1%}, mean {cal.mean_error:.1%}"


def write_prediction_tables(cal: Calibration, predictions: Sequence[Prediction], out: Path) -> list[Path]:
    """prediction.md / .csv: each point, what bounds it, which partitioning wins; calibration and error."""
    keys = list(predictions[0].to_dict()) if predictions else []
    written = [
        write_csv(
            out / "prediction.csv", keys, [[csv_value(p.to_dict()[k]) for k in keys] for p in predictions]
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
            f"- features: {format_seconds(cal.stage_seconds)} s per image on 1 core to activate and pool the "
            "maps, added to the compute" if cal.stage_seconds else
            "- features: activating and pooling the maps was not measured (an older results.json): the "
            "features predictions count the correlation's compute alone",
            f"- links are payload rates: line rate x {LINK_EFFICIENCY} (TCP over 1500-byte Ethernet frames)",
        ]
    )
    pool = predictions[0].pool if predictions else 2
    error = f"Model error on the measured configurations: {model_error(cal)}."
    if cal.fit:
        error = error[:-1] + " (fitted to these same runs, so this is the floor of its error elsewhere)."
    written.append(
        write_markdown(
            out / "prediction.md",
            "Predicted time and speed-up for N nodes x C cores (cost model calibrated on this run)",
            [
                markdown_table(PREDICTION_HEADER, prediction_rows(predictions)),
                "Speed-up is over one core of this machine; nodes are assumed to have its per-core rate. "
                'Bound "gather" marks where gathering the output over the coordinator\'s link decides the '
                'time; "better partitioning" says whether kernel groups beat row bands. "Maps kept, '
                f'features back" keeps the maps on the nodes and gathers them pooled {pool}x{pool} (what the '
                "feature pipeline's next stage needs); the dataset columns are the steady-state throughput "
                "of many such images, each image one task, its input sent out and its maps or features "
                "gathered over the coordinator's link.",
                "## When a second node pays off\n\n" + ("\n".join(payoff(predictions)) or "(one node count)"),
                "## Calibration\n\n" + calibration,
                "## Model error\n\n"
                + error
                + "\n\n"
                + markdown_table(["configuration", "measured (s)", "model (s)", "error"], fit_rows),
            ],
        )
    )
    return written
