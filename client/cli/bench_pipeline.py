"""`rmidl bench pipeline`: the paper's pipeline study (stage times, predicted and measured speed-ups,
task parallelism, Gantt charts) on this machine, for a dataset and a network."""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from rmidl.client.cli.common import EXIT_FAILED, EXIT_OK, add_output_arguments, note, table
from rmidl.errors import OptionError

__all__ = ["HELP", "add_parser", "run"]

HELP = ("the paper's pipeline study: per-stage times (Table III), predicted vs measured pipelined "
        "speed-up, task-parallel speed-up by workers, Gantt charts")


def add_parser(studies: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    """`pipeline` under `rmidl bench`."""
    parser = studies.add_parser("pipeline", help=HELP, description=HELP, formatter_class=formatter)
    parser.add_argument("dataset", nargs="?", metavar="DATASET",
                        help="ImageFolder directory, glob or .npz (default: a generated texture set)")
    parser.add_argument("--net", default="seed004", metavar="SPEC|FILE", help="network spec, preset or file")
    parser.add_argument("--seed", type=int, default=0, help="seed of a spec's banks")
    parser.add_argument("--images", type=int, default=48, metavar="N", help="images used (the first N)")
    parser.add_argument("--size", type=int, default=200, metavar="S",
                        help="side of the generated textures (without DATASET)")
    parser.add_argument("--batch", type=int, default=4, metavar="B", help="images per batch (pipeline item)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per scheme (interleaved; medians)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each scheme first")
    parser.add_argument("--workers", default="1,2", metavar="N[,N...]",
                        help="local worker counts for task parallelism ('' for none)")
    parser.add_argument("--threads-per-worker", type=int, default=1, metavar="T",
                        help="threads of each worker")
    parser.add_argument("--pipelines", type=int, default=2, metavar="P",
                        help="copies of the pipeline for the combined scheme (1: none)")
    parser.add_argument("--replicas", metavar="R1,R2,...", help="processors per CNP stage (default 1 each)")
    parser.add_argument("--out", default="bench-pipeline", metavar="DIR", help="where tables and plots go")
    add_output_arguments(parser, nested=True)
    parser.set_defaults(handler=run)


def _dataset(args: argparse.Namespace, scratch: Path):  # type: ignore[no-untyped-def]
    from rmidl.datasets import make_textures, open_dataset

    if args.images < 1:
        raise OptionError(f"--images {args.images} must be at least 1")
    if args.dataset is None:
        if args.size < 16:
            raise OptionError(f"--size {args.size} must be at least 16")
        per_class = math.ceil(args.images / 6 / 0.8) + 1
        made = make_textures(scratch, per_class=per_class, size=args.size, seed=args.seed)
        dataset = open_dataset(made.train)
    else:
        dataset = open_dataset(args.dataset)
    return dataset[: min(args.images, len(dataset))]


def run(args: argparse.Namespace) -> int:
    from rmidl.client.bench import pipeline_report
    from rmidl.client.bench.pipeline_study import PipelineSettings, check_settings, run_pipeline_study
    from rmidl.client.cli.bench import parse_counts
    from rmidl.client.cli.features import parse_replicas
    from rmidl.network import resolve_network

    workers = parse_counts(args.workers, "--workers", minimum=1) if args.workers else ()
    replicas = parse_replicas(args.replicas)
    settings = PipelineSettings(batch=args.batch, runs=args.runs, warmup=args.warmup, workers=workers,
                                threads_per_worker=args.threads_per_worker, pipelines=args.pipelines,
                                replicas=None if replicas is None else tuple(replicas))
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="rmidl-pipeline-") as scratch:
        dataset = _dataset(args, Path(scratch))
        shape = dataset.shape
        net = resolve_network(args.net, seed=args.seed, channels=shape[2] if len(shape) == 3 else 1)
        net.output_shape(shape)  # a network that does not fit the images: one line, before anything else
        check_settings(settings, net)
        try:
            out.mkdir(parents=True, exist_ok=True)  # before the study: a bad --out must not cost minutes
        except OSError as error:
            why = error.strerror or error
            raise OptionError(f"--out {str(out)!r} cannot be a directory: {why}") from None
        colour = f" with {shape[2]} channels" if len(shape) == 3 else ""
        note(args, f"{len(dataset)} images of {shape[1]}x{shape[0]}{colour} through {net!r}: "
                   f"{settings.runs} runs of {2 + len(workers) + (settings.pipelines > 1)} schemes")
        study = run_pipeline_study(dataset, net, settings)
    written = pipeline_report.write_pipeline_report(study, out)
    print(summary(study))
    print(f"\nwrote {len(written)} files to {out}/")
    failed = [s for s in study["schemes"] if s["failure"]]
    for scheme in failed:
        print(f"rmidl: not counted: {scheme['name']}: {scheme['failure']}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def summary(study: dict) -> str:
    """The terminal's closing tables: schemes, speed-ups beside the paper's, Table III."""
    from rmidl.client.bench import pipeline_report as report

    table3 = [[cell.replace("**", "") for cell in row] for row in report.table3_rows(study)]
    return "\n\n".join([table(report.SCHEME_HEADER, report.scheme_rows(study)),
                        table(report.SPEEDUP_HEADER, report.speedup_rows(study)),
                        table(report.TABLE3_HEADER, table3)])
