"""`rmidl bench`: the paper's scaling study on this machine and cluster: tables, plots and predictions.

The study itself lives in client/bench/; this module turns options into its settings and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from rmidl._files import clipped, read_small, shown
from rmidl.client.bench import forecast, plots, predict, report, results, study, tables
from rmidl.client.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    LOCAL,
    add_security_arguments,
    choose_cluster,
    config_from_args,
    note,
    table,
)
from rmidl.errors import ImageReadError, OptionError, RmidlError

__all__ = ["HELP", "add_arguments", "load_inputs", "parse_counts", "parse_size", "run"]

logger = logging.getLogger(__name__)

HELP = ("reproduce the paper's scaling study (time per core and worker count, tables, plots, predictions); "
        "`rmidl bench pipeline` the pipeline study")


def parse_counts(text: str, option: str, *, minimum: int) -> tuple[int, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8), each at least `minimum`, no repeats."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise OptionError(f"{option} {text!r} is not a comma-separated list of integers") from None
    bad = [c for c in counts if c < minimum]
    if bad:
        raise OptionError(f"{option} {text!r}: {bad[0]} is below {minimum}")
    if len(set(counts)) != len(counts):
        raise OptionError(f"{option} {text!r} repeats a value")
    return counts


def parse_size(text: str) -> tuple[int, int]:
    """'1280x720' -> (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise OptionError(f"--size {text!r} is not WIDTHxHEIGHT with positive integers, e.g. 1280x720")
    return int(match[1]), int(match[2])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rmidl.client.cli import bench_pipeline

    studies = parser.add_subparsers(dest="study", metavar="STUDY",
                                    help="pipeline: the feature pipeline study (none: the scaling study)")
    bench_pipeline.add_parser(studies, parser.formatter_class)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--image", metavar="PATH", help="image file to convolve (default: the built-in image)"
    )
    source.add_argument(
        "--size", default="1280x720", metavar="WxH",
        help="size (width x height) the built-in image is resized to"
    )
    parser.add_argument(
        "--kernels", default="random:128x11x11", metavar="BANK",
        help="kernel bank spec or file (syntax: rmidl run --help)"
    )
    parser.add_argument("--mode", default="valid", choices=("valid", "same", "full"),
                        help="output size rule, as scipy.signal.correlate's")
    parser.add_argument(
        "--cores", default="1,2,4,8", help="core counts for the engine alone"
    )
    parser.add_argument(
        "--workers",
        default="",
        help="worker counts through the coordinator, e.g. 0,1,2: a local cluster of each size, or with --ns "
        "the first N workers of that name server (default with --ns: all of them, once)",
    )
    parser.add_argument(
        "--threads-per-worker", type=int, default=1, metavar="T", help="threads of each worker"
    )
    parser.add_argument("--local-threads", type=int, default=0, metavar="N", help="coordinator's own threads")
    parser.add_argument(
        "--no-shared-memory", action="store_true", help="send arrays over TCP even on one host"
    )
    parser.add_argument("--ns", metavar="HOST:PORT|local",
                        help="also run on the workers of this name server (local: the running local cluster, "
                        "from its cluster file; without --ns the study starts clusters of its own)")
    add_security_arguments(parser)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed checked runs first")
    parser.add_argument("--out", default="bench-out", metavar="DIR", help="where tables and plots go")
    parser.add_argument("--predict", metavar="NODES", help="predict these node counts, e.g. 1,2,4,8,16,64")
    parser.add_argument("--link", default="1Gbit,10Gbit,25Gbit", help="link rate(s) for --predict")
    parser.add_argument("--pool", type=int, default=predict.FEATURE_POOL, metavar="P",
                        help="--predict also keeps the maps on the nodes and gathers them pooled PxP "
                             "(default %(default)s, the paper network's pooling)")
    parser.add_argument(
        "--node-cores", type=int, metavar="C", help="cores per predicted node (default: ours)"
    )
    parser.add_argument(
        "--from",
        dest="from_results",
        metavar="PATH",
        help="report/predict from an earlier results.json, no runs",
    )


def _sized_default_image(width: int, height: int) -> tuple[np.ndarray, str]:
    """The library's built-in image resized to WxH; a seeded synthetic one if the library has none."""
    try:
        from rmidl.imaging import default_image

        base = default_image(np.float32)
    except (ImportError, NotImplementedError, ImageReadError) as missing:
        # timings do not depend on pixel values, so a seeded random image serves the study equally
        logger.warning("no built-in image (%s); using a seeded synthetic one", missing)
        rng = np.random.default_rng(20240101)
        return rng.random((height, width), dtype=np.float32), f"synthetic {width}x{height} (seeded)"
    if base.ndim == 3:
        base = base.mean(axis=2)
    if base.shape != (height, width):
        from PIL import Image

        base = np.asarray(Image.fromarray(base, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    return np.ascontiguousarray(base, dtype=np.float32), f"built-in image at {width}x{height}"


def load_inputs(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, results.Job]:
    """The image and bank the options name, checked and made canonical before any timing starts."""
    import rmidl
    from rmidl.client.cli.inputs import image_and_bank
    from rmidl.validate import prepare

    if args.image:
        image_source = str(args.image)
        # as `rmidl run` reads it: grayscale for a (K, kh, kw) bank, colour for a (K, kh, kw, C) one
        image, kernels = image_and_bank(args.kernels, lambda gray: rmidl.load_image(args.image, gray=gray),
                                        args.mode)
    else:
        default, image_source = _sized_default_image(*parse_size(args.size))
        image, kernels = image_and_bank(args.kernels, lambda gray: default, args.mode)
    prepared = prepare(image, kernels, args.mode)
    job = results.job_of(
        prepared.image,
        prepared.kernels,
        args.mode,
        image_source=image_source,
        kernels_source=str(args.kernels),
    )
    return prepared.image, prepared.kernels, job


def _settings(args: argparse.Namespace) -> tuple[results.StudySettings, str | None]:
    """The study's settings from the options, and what to tell the user about the cluster chosen."""
    for option, value, minimum in (
        ("--runs", args.runs, 1),
        ("--warmup", args.warmup, 0),
        ("--threads-per-worker", args.threads_per_worker, 1),
        ("--local-threads", args.local_threads, 0),
    ):
        if value < minimum:
            raise OptionError(f"{option} {value} must be at least {minimum}")
    if args.ns is not None and args.ns != LOCAL and not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", args.ns):
        raise OptionError(f"--ns {args.ns!r} is not HOST:PORT")
    target = choose_cluster(args, config_from_args(args)) if args.ns else None
    settings = results.StudySettings(
        cores=parse_counts(args.cores, "--cores", minimum=1) if args.cores else (),
        workers=parse_counts(args.workers, "--workers", minimum=0) if args.workers else (),
        runs=args.runs,
        warmup=args.warmup,
        mode=args.mode,
        threads_per_worker=args.threads_per_worker,
        local_threads=args.local_threads,
        shared_memory=not args.no_shared_memory,
        ns=target.ns if target else None,
        config=target.config if target else None,
    )
    return settings, target.note if target else None


def _prediction_options(
    args: argparse.Namespace,
) -> tuple[tuple[int, ...], list[tuple[str, float]], int | None]:
    if not args.predict:
        return (), [], None
    nodes = parse_counts(args.predict, "--predict", minimum=1)
    links = [predict.parse_link(text) for text in args.link.split(",")]
    if args.node_cores is not None and args.node_cores < 1:
        raise OptionError(f"--node-cores {args.node_cores} must be at least 1")
    if args.pool < 1:
        raise OptionError(f"--pool {args.pool} must be at least 1")
    return nodes, links, args.node_cores


@contextmanager
def _progress(total: int) -> Iterator[study.OnRun]:
    """A tqdm bar on a terminal; nothing when stderr is a file or a pipe."""
    from tqdm import tqdm

    # the first timed run comes after the untimed single-thread reference, so name that meanwhile
    with tqdm(
        total=total, unit="run", desc="reference", file=sys.stderr, disable=not sys.stderr.isatty()
    ) as bar:

        def advance(config: results.Configuration, index: int, seconds: float) -> None:
            bar.set_description(config.label)
            bar.update(1)

        yield advance


def _load_earlier(path: str) -> results.StudyResult:
    """The study in an earlier results.json (or the one in a directory), read bounded: a FIFO, a device
    or a huge file is refused in one line rather than waited on or held in memory."""
    file = Path(path)
    if file.is_dir():
        file = file / "results.json"
    where = f"--from {shown(file)}"
    text = read_small(file, where, results.MAX_RESULTS_BYTES, OptionError)
    try:
        data = json.loads(text)
    except ValueError as error:  # also a UnicodeDecodeError
        raise OptionError(f"{where} is not JSON ({clipped(error)})") from None
    if not isinstance(data, dict):
        raise OptionError(f"{where} is not a results.json of rmidl bench (it holds a {type(data).__name__})")
    try:
        return results.StudyResult.from_dict(data)
    except (KeyError, TypeError, ValueError, RmidlError) as error:
        raise OptionError(f"{where} is not a results.json of rmidl bench ({clipped(repr(error))})") from None


def _make_out(out: Path) -> None:
    """Create the --out directory, or say in one line why it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OptionError(f"--out {str(out)!r} cannot be a directory: {error.strerror or error}") from None


def run(args: argparse.Namespace) -> int:
    """Run (or reload) the study, write every file into --out, print the summary; 1 if a run did not count."""
    nodes, links, node_cores = _prediction_options(args)
    if args.from_results:
        result = _load_earlier(args.from_results)
    else:
        settings, chosen = _settings(args)
        if not settings.cores and not settings.workers and not settings.ns:
            raise OptionError("nothing to run: give --cores, --workers or --ns")
        image, kernels, job = load_inputs(args)
        _make_out(Path(args.out))  # before the study: a bad --out must not cost its minutes
        if chosen:
            note(args, chosen)
        total = len(study.configurations(settings)) * settings.runs
        with _progress(total) as on_run:
            result = study.run_study(image, kernels, settings, job=job, on_run=on_run)
    out = Path(args.out)
    _make_out(out)
    lines = [table(tables.SUMMARY_HEADER, tables.summary_rows(result), align=tables.SUMMARY_ALIGN),
             *tables.summary_notes(result)]
    written = report.write_report(result, out)
    if nodes:
        calibration = predict.calibrate(result)
        cores = node_cores or int(result.machine.get("usable_cores") or 1)
        predictions = predict.predict_many(calibration, nodes, cores, links, pool=args.pool)
        result.extra["prediction"] = forecast.prediction_block(calibration, predictions)
        written += report.write_prediction(calibration, predictions, out)
        report.write_results_json(result, out / "results.json")  # again, now with the prediction in it
        lines += [
            "",
            table(forecast.PREDICTION_HEADER, forecast.prediction_rows(predictions),
                  align=["left"] + ["right"] * (len(forecast.PREDICTION_HEADER) - 1)),
            f"model error on the measured configurations: {forecast.model_error(calibration)}",
            *forecast.payoff(predictions),
        ]
    lines.append(f"\nwrote {len(written)} files to {out}/")
    print("\n".join(lines))
    skipped = plots.unavailable()
    if skipped is not None:
        print(f"rmidl: plots skipped: {skipped}", file=sys.stderr)
    for failed in result.failed:
        print(f"rmidl: not counted: {failed.config.label}: {failed.failure}", file=sys.stderr)
    return EXIT_FAILED if result.failed else EXIT_OK
