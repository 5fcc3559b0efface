"""What `rmidl bench pipeline` writes: Table III (stage times), the speed-ups predicted and measured beside
the paper's, the schemes' throughput, pipeline.json, and (matplotlib permitting) the Gantt charts of the
paper's Figs. 4-7 drawn from the spans of real runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rmidl.client.bench import plots
from rmidl.client.bench.output import save_figure, write_json
from rmidl.client.bench.tables import markdown_table, write_csv, write_markdown

__all__ = ["SCHEME_HEADER", "SPEEDUP_HEADER", "TABLE3_HEADER", "scheme_rows", "speedup_rows", "table3_rows",
           "write_pipeline_report"]

STAGE_COLOURS = {"LOAD": "C0", "FLAT": "C7"}


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def table3_rows(study: dict[str, Any]) -> list[list[str]]:
    """stage, our seconds over the dataset, ms per image, share, the paper's seconds (where known)."""
    seconds = study["table3"]["seconds"]
    images = study["dataset"]["images"]
    total = sum(seconds.values()) or 1.0
    paper = study["paper"]["stage_seconds"]
    rows = [[name, _fmt(s, ".4f"), _fmt(1000 * s / images, ".2f"), f"{100 * s / total:.1f}%",
             _fmt(paper.get(name), "g")] for name, s in seconds.items()]
    rows.append(["**total**", _fmt(total, ".4f"), _fmt(1000 * total / images, ".2f"), "100%",
                 _fmt(study["paper"]["total_seconds"], "g")])
    return rows


def speedup_rows(study: dict[str, Any]) -> list[list[str]]:
    """Per scheme: Eq. (2) as printed, the bottleneck formula, it on this machine's cores, measured, ratio;
    then the paper's pipelined and six-pipeline rows (stated, and corrected from its own Table III)."""
    rows = [[p["scheme"], _fmt(p["eq2"], ".2f"), _fmt(p["bottleneck"], ".2f"), _fmt(p["on_cores"], ".2f"),
             _fmt(p["measured"], ".2f"), _fmt(p["measured_over_predicted"], ".2f")]
            for p in study["predictions"]]
    paper = study["paper"]
    rows.append(["paper: pipelined", _fmt(paper["claimed_pipelined"], ".2f") + " (stated)",
                 _fmt(paper["corrected_pipelined"], ".2f"), "", "", ""])
    stated = _fmt(paper["claimed_combined"], ".2f") + " (stated)"
    rows.append([f"paper: {paper['pipelines']} pipelines", stated, _fmt(paper["corrected_combined"], ".2f"),
                 "", "", ""])
    return rows


SPEEDUP_HEADER = ["scheme", "Eq. (2) as printed", "bottleneck", "bottleneck on our cores", "measured",
                  "measured / predicted"]
SCHEME_HEADER = ["scheme", "processors", "median (s)", "images/s", "speed-up", "per processor"]
TABLE3_HEADER = ["stage", "ours: s (dataset)", "ours: ms / image", "share", "paper: s"]


def scheme_rows(study: dict[str, Any]) -> list[list[str]]:
    """Every scheme's median time, throughput and speed-up over the sequential run."""
    images = study["dataset"]["images"]
    base = study["sequential"]["median"]
    rows = []
    for scheme in [study["sequential"], *study["schemes"]]:
        median = scheme["median"]
        if median is None:
            rows.append([scheme["name"], str(scheme["processors"]), "not counted", "", "", ""])
            continue
        speedup = base / median
        rows.append([scheme["name"], str(scheme["processors"]), f"{median:.4g}", f"{images / median:.1f}",
                     f"{speedup:.2f}", f"{speedup / scheme['processors']:.0%}"])
    return rows


def _notes(study: dict[str, Any]) -> list[str]:
    machine, settings, data = study["machine"], study["settings"], study["dataset"]
    stages = ", ".join(f"{s['name']} {s['spec']} ({s['mflop']:.1f} MFLOP)" for s in study["net"]["stages"])
    seq = study["sequential"]
    busy = (float(sum(seq["times"]) / sum(seq["cpu_times"])) if seq["cpu_times"] and sum(seq["cpu_times"])
            else None)
    shape = f"{data['shape'][1]}x{data['shape'][0]}" + (f" with {data['shape'][2]} channels"
                                                         if len(data["shape"]) == 3 else "")
    notes = [
        f"Ours: {machine.get('cpu_model')}, {settings['cores']} usable cores; {data['images']} images of "
        f"{shape} from {data['origin']}; network {study['net']['spec']}: {stages}.",
        f"{settings['runs']} timed runs per scheme, interleaved, after {settings['warmup']} untimed; "
        f"medians. Batches of {settings['batch']} images ({study['table3']['batches']} batches) are the "
        "pipeline's items.",
        "Sequential: LOAD, every CNP stage and FLAT one after another on one thread (the baseline). "
        "Pipelined: each stage on its own thread (--placement stages). Combined: P copies of the pipeline. "
        "Workers: whole batches on N local worker processes (task parallelism). Every run's features were "
        "compared with the sequential run's before its time counted.",
        "Predictions use the sequential run's per-batch stage times: Eq. (2) as printed takes the last "
        "stage's time as the interval between results; the bottleneck formula (makespan = sum tau + (m - 1) "
        "max tau_i / r_i, a replicated stage counted as such) the slowest stage's; on our cores the "
        "interval is also at least sum tau / cores.",
        f"Paper's rows: {study['paper']['source']}; its corrected values are its own Table III through the "
        "bottleneck formula (many items: total / CNP1).",
    ]
    if busy is not None and busy > 1.25:
        notes.append(f"Warning: the sequential runs' wall time was {busy:.2f}x their CPU time: the machine "
                     "was busy, timings are inflated and ratios less sure. Re-run on a quiet machine.")
    notes += [f"Not counted: {s['name']}: {s['failure']}" for s in study["schemes"] if s["failure"]]
    return notes


def write_pipeline_report(study: dict[str, Any], out: Path) -> list[Path]:
    """table3.md/.csv, speedup.md/.csv, schemes.md/.csv, pipeline.json and the plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    notes = "\n".join(f"- {n}" for n in _notes(study))
    written = []
    for name, title, header, rows in (
        ("table3", "Table III: time per pipeline stage", TABLE3_HEADER, table3_rows(study)),
        ("speedup", "Pipelined speed-up: predicted and measured", SPEEDUP_HEADER, speedup_rows(study)),
        ("schemes", "Schemes: time, throughput and speed-up over the sequential run", SCHEME_HEADER,
         scheme_rows(study)),
    ):
        plain = [[cell.replace("**", "") for cell in row] for row in rows]
        written.append(write_csv(out / f"{name}.csv", header, plain))
        written.append(write_markdown(out / f"{name}.md", title, [markdown_table(header, rows), notes]))
    written.append(write_json(out / "pipeline.json", study))
    if plots.unavailable() is None:
        written.append(plot_gantt(study, out / "gantt.png"))
        written.append(plot_speedups(study, out / "speedup.png"))
    return written


def _colour(stage: str) -> str:
    if stage in STAGE_COLOURS:
        return STAGE_COLOURS[stage]
    return f"C{1 + int(stage.removeprefix('CNP')) % 6}"


def plot_gantt(study: dict[str, Any], path: Path) -> Path:
    """Figs. 4-7 of the paper from real spans: which processor ran which stage of which batch, when."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    panels = [study["sequential"], *[s for s in study["schemes"] if s["spans"]]]
    figure = Figure(figsize=(10, 2.2 + 1.6 * len(panels)), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes_list = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for axes, scheme in zip(axes_list, panels, strict=True):
        rows = sorted({(s[0], s[1]) for s in scheme["spans"]},
                      key=lambda r: (study["stages"].index(r[0]) if r[0] in study["stages"] else 0, r[1]))
        if scheme["kind"] in ("sequential", "workers"):  # one row per processor, stages by colour
            labels = sorted({s[1] for s in scheme["spans"]})
            place = {label: i for i, label in enumerate(labels)}
            where = [place[s[1]] for s in scheme["spans"]]
        else:
            labels = [f"{stage} @ {proc}" for stage, proc in rows]
            place = {row: i for i, row in enumerate(rows)}
            where = [place[(s[0], s[1])] for s in scheme["spans"]]
        for span, y in zip(scheme["spans"], where, strict=True):
            axes.broken_barh([(span[3], max(span[4] - span[3], 1e-6))], (y - 0.4, 0.8),
                             facecolors=_colour(span[0]), edgecolors="white", linewidth=0.3)
        axes.set_yticks(range(len(labels)), labels, fontsize=7)
        axes.invert_yaxis()
        median = scheme["median"]
        runs = f" (median of all {median:.3g} s)" if median else ""
        axes.set_title(f"{scheme['name']}: first timed run{runs}", fontsize=9)
        axes.grid(True, axis="x", alpha=0.3)
    axes_list[-1].set_xlabel("seconds since the run began")
    figure.legend(handles=[Patch(color=_colour(s), label=s) for s in study["stages"]],
                  loc="outside right upper")
    figure.suptitle("Space-time diagrams of the pipeline (cf. the paper's Figs. 4-7), from real runs")
    return save_figure(figure, path)


def plot_speedups(study: dict[str, Any], path: Path) -> Path:
    """Measured speed-up of every scheme over the sequential run, with the predictions beside."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    base = study["sequential"]["median"]
    schemes = [s for s in study["schemes"] if s["median"]]
    names = [s["name"] for s in schemes]
    axes.bar(range(len(names)), [base / s["median"] for s in schemes], color="C0", label="measured")
    predicted = {p["scheme"]: p["on_cores"] for p in study["predictions"]}
    for i, scheme in enumerate(schemes):
        key = "pipelined" if scheme["kind"] == "pipelined" else scheme["name"]
        if key in predicted:
            axes.plot([i - 0.4, i + 0.4], [predicted[key]] * 2, color="C3", linewidth=2,
                      label="predicted (bottleneck, our cores)" if i == 0 else None)
    axes.axhline(study["settings"]["cores"], color="gray", linestyle=":", label="cores")
    axes.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    axes.set_ylabel("speed-up over the sequential run")
    axes.set_title("Pipeline and task parallelism on this machine")
    axes.legend(fontsize=8)
    return save_figure(figure, path)
