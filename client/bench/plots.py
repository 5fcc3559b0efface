"""The study's plots (the paper's Figs. 10-11, time vs workers, predicted speed-up), drawn with matplotlib.

matplotlib is an optional extra (`pip install 'rmidl[plot]'`), imported only when a plot is drawn:
`unavailable()` says why plots cannot be drawn here, and the report skips them then.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rmidl.client.bench.derived import PAPER, baseline, counted_results
from rmidl.client.bench.output import save_figure
from rmidl.client.bench.predict import Prediction
from rmidl.client.bench.results import ConfigurationResult, StudyResult

__all__ = [
    "INSTALL_HINT",
    "plot_dataset_prediction",
    "plot_prediction",
    "plot_speedup",
    "plot_time_vs_cores",
    "plot_time_vs_workers",
    "unavailable",
]

INSTALL_HINT = "pip install 'rmidl[plot]'"
"""What gives a user the plots when matplotlib is missing."""


def unavailable() -> str | None:
    """Why plots cannot be drawn in this environment (matplotlib cannot be imported), or None."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401 (only whether it imports)
    except ImportError as error:
        return f"matplotlib is not installed ({error}); {INSTALL_HINT} draws them"
    return None


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


def _mark_oversubscribed(axes: Any, results: Sequence[ConfigurationResult], values: Sequence[float]) -> None:
    over = [(r.config.count, v) for r, v in zip(results, values, strict=True) if r.config.oversubscribed]
    if over:
        xs, ys = zip(*over, strict=True)
        axes.scatter(xs, ys, s=160, facecolors="none", edgecolors="red", label="oversubscribed", zorder=3)


def plot_time_vs_cores(study: StudyResult, path: Path) -> Path:
    """Fig. 10: average time against cores, ours (min-max bars) and the paper's, on a log time axis."""
    cores = [r for r in counted_results(study) if r.config.kind == "cores"]
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
    return save_figure(figure, path)


def plot_speedup(study: StudyResult, path: Path) -> Path:
    """Fig. 11: ideal against actual speed-up over one core, ours and the paper's."""
    _, base = baseline(study)
    cores = [r for r in counted_results(study) if r.config.kind == "cores"]
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
    return save_figure(figure, path)


def plot_time_vs_workers(study: StudyResult, path: Path) -> Path | None:
    """Average time against worker count through the coordinator, with the engine's times as references."""
    workers = [r for r in counted_results(study) if r.config.kind == "workers"]
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
    for result in counted_results(study):
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
    return save_figure(figure, path)


def plot_prediction(predictions: Sequence[Prediction], path: Path) -> Path:
    """Predicted speed-up against nodes, one line per link, gather-bound points hollow, ideal dotted."""
    cores = predictions[0].cores if predictions else 0
    title = f"Predicted speed-up, N nodes x {cores} cores (cost model)"
    figure, axes = _figure(title, "nodes", "speed-up over 1 core")
    links = list(dict.fromkeys(p.link for p in predictions))
    for i, link in enumerate(links):
        points = [p for p in predictions if p.link == link]
        xs = [p.nodes for p in points]
        axes.plot(xs, [p.speedup for p in points], marker="o", color=f"C{i}", label=f"{link}, maps gathered")
        axes.plot(xs, [p.features_speedup for p in points], marker=".", linestyle="--", color=f"C{i}",
                  label=f"{link}, maps kept, {points[0].pool}x{points[0].pool}-pooled features gathered")
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
    return save_figure(figure, path)


def plot_dataset_prediction(predictions: Sequence[Prediction], path: Path) -> Path:
    """Predicted images per second of a dataset against nodes: per link, maps gathered (solid) and only
    pooled features gathered (dashed), beside N times one node (dotted)."""
    cores = predictions[0].cores if predictions else 0
    figure, axes = _figure(f"Predicted dataset throughput, N nodes x {cores} cores (cost model)", "nodes",
                           "images per second")
    for i, link in enumerate(dict.fromkeys(p.link for p in predictions)):
        points = [p for p in predictions if p.link == link]
        xs = [p.nodes for p in points]
        axes.plot(xs, [p.dataset_images_per_s for p in points], marker="o", color=f"C{i}",
                  label=f"{link}, maps gathered")
        axes.plot(xs, [p.dataset_features_images_per_s for p in points], marker=".", linestyle="--",
                  color=f"C{i}", label=f"{link}, pooled features gathered")
    ones = [p for p in predictions if p.nodes == 1]
    if ones:
        nodes = sorted({p.nodes for p in predictions})
        single = max(p.dataset_features_images_per_s for p in ones)
        axes.plot(nodes, [n * single for n in nodes], color="gray", linestyle=":", label="N x one node")
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xticks(nodes, [str(n) for n in nodes])
    axes.legend()
    return save_figure(figure, path)
